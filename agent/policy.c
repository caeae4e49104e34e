/* The role policy (see policy.h). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "macro.h"
#include "policy.h"
#include "util.h"

static bool plain_char(unsigned char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               (c && strchr("._-", c));
}

size_t policy_encoded_length(const char *s) {
        size_t n = 0;

        for (const unsigned char *c = (const unsigned char *) s; *c; c++)
                n += plain_char(*c) ? 1 : 3;
        return n;
}

int policy_central_identity(const char *group, const char *uid, char *out, size_t size) {
        static const char hex[] = "0123456789ABCDEF";
        const char *parts[] = { "kmip:", group, "/", uid };
        size_t n = 0;

        for (size_t p = 0; p < ARRAY_SIZE(parts); p++)
                for (const unsigned char *c = (const unsigned char *) parts[p]; *c; c++) {
                        bool plain = p == 0 || p == 2 || plain_char(*c);
                        if (n + 4 > size)
                                return -ENOBUFS;
                        if (plain)
                                out[n++] = (char) *c;
                        else {
                                out[n++] = '%';
                                out[n++] = hex[*c >> 4];
                                out[n++] = hex[*c & 15];
                        }
                }
        out[n] = 0;
        return 0;
}

static int compare_central(const void *a, const void *b) {
        const struct central_key *x = *(const struct central_key *const *) a;
        const struct central_key *y = *(const struct central_key *const *) b;

        if (x->created_usec != y->created_usec)
                return x->created_usec < y->created_usec ? -1 : 1;
        return strcmp(x->uid, y->uid);
}

static const struct key_version *find_central(const struct keyring *kr, const char *uid) {
        for (size_t i = 0; kr && i < keyring_size(kr); i++)
                if (strcmp(keyring_get(kr, i)->central_id, uid) == 0)
                        return keyring_get(kr, i);
        return NULL;
}

static const struct central_key *find_key(const struct central_key *keys, size_t n, const char *uid) {
        for (size_t i = 0; *uid && i < n; i++)
                if (strcmp(keys[i].uid, uid) == 0)
                        return &keys[i];
        return NULL;
}

static struct policy_change *add_change(struct policy_result *r, enum policy_event ev,
                                        const struct key_version *k) {
        struct policy_change *c = &r->changes[r->n_changes++];

        *c = (struct policy_change) { .event = ev };
        if (k) {
                snprintf(c->id, sizeof(c->id), "%s", k->id);
                snprintf(c->central_id, sizeof(c->central_id), "%s", k->central_id);
                c->from = c->to = k->role;
        }
        return c;
}

void policy_result_done(struct policy_result *r) {
        free(r->versions);
        free(r->changes);
        *r = (struct policy_result) {};
}

/* A cached central version the answer says nothing usable about: Destroyed,
 * or not located. Kept decrypt-only as missing, or purged once it has been
 * missing for purge_after. Returns true when it is kept (in *kv). */
static bool keep_missing(struct policy_result *res, const struct key_version *prev, const char *why,
                         uint64_t now_usec, const struct policy_options *opt, struct key_version *kv) {
        struct policy_change *c;
        uint64_t since = prev->role == KEY_ROLE_MISSING ? prev->missing_since_usec : now_usec;
        uint64_t missing_for = now_usec > since ? now_usec - since : 0;

        if (prev->role == KEY_ROLE_MISSING && opt->purge_after_usec != POLICY_PURGE_NEVER &&
            missing_for >= opt->purge_after_usec) {
                c = add_change(res, POLICY_PURGED, prev);
                c->missing_since_usec = since;
                snprintf(c->why, sizeof(c->why), "%s; missing for %" PRIu64 " s, longer than purge_after",
                         why, missing_for / USEC_PER_SEC);
                return false;
        }
        *kv = *prev;
        kv->role = KEY_ROLE_MISSING;
        kv->missing_since_usec = since;
        if (prev->role != KEY_ROLE_MISSING) {
                c = add_change(res, POLICY_MISSING, prev);
                c->to = KEY_ROLE_MISSING;
                c->missing_since_usec = since;
                snprintf(c->why, sizeof(c->why), "%s", why);
        }
        return true;
}

/* The guard against answers that say nothing: counted before anything is
 * decided, so that a refused sync changes nothing at all. */
static int check_answer(const char *group, const struct central_key *keys, size_t n,
                        const struct keyring *old, const struct policy_options *opt,
                        char *err, size_t err_size) {
        size_t cached = 0, found = 0, going = 0;

        for (size_t i = 0; old && i < keyring_size(old); i++) {
                const struct key_version *k = keyring_get(old, i);
                const struct central_key *ck;

                if (!*k->central_id)
                        continue;
                cached++;
                ck = find_key(keys, n, k->central_id);
                found += ck != NULL;
                if (k->role != KEY_ROLE_MISSING && (!ck || ck->state == CENTRAL_STATE_DESTROYED))
                        going++;
        }
        if (cached > 0 && found == 0) {
                errorf(err, err_size, "the central KMS located none of the %zu cached versions of key group "
                       "%s (%zu objects answered): nothing purged, nothing marked missing. Likely causes: "
                       "a restored or empty central database, a changed access policy for this host's "
                       "certificate, a wrong key_group. Check what this host's identity can Locate in the "
                       "group at the central KMS; the cached keys keep serving", cached, group, n);
                return -ENODATA;
        }
        if (going * 100 > (size_t) opt->max_missing_percent * cached) {
                errorf(err, err_size, "%zu of the %zu cached versions of key group %s would go missing in one "
                       "sync (more than max_missing_share = %u%%): nothing purged, nothing marked missing. "
                       "Likely causes: a restored central database, a changed access policy, a wrong "
                       "key_group. Check the group at the central KMS; if the versions were destroyed on "
                       "purpose, raise [central] max_missing_share for one sync", going, cached, group,
                       opt->max_missing_percent);
                return -ENODATA;
        }
        return 0;
}

int policy_apply(const char *group, const struct central_key *keys, size_t n,
                 const struct keyring *old, uint64_t now_usec, const struct policy_options *opt,
                 struct policy_result *ret, char *err, size_t err_size) {
        _cleanup_free_ const struct central_key **sorted = NULL;
        struct policy_result res = {};
        size_t n_old = old ? keyring_size(old) : 0, m = 0, primary = SIZE_MAX;
        int r;

        *ret = (struct policy_result) {};
        r = check_answer(group, keys, n, old, opt, err, err_size);
        if (r < 0)
                return r;
        sorted = calloc(n + 1, sizeof(*sorted));
        res.versions = calloc(n + n_old + 1, sizeof(*res.versions));
        /* at most: one ignored per central key, one added or changed per
         * version kept, one purged or missing per cached version */
        res.changes = calloc(2 * (n + n_old) + 1, sizeof(*res.changes));
        if (!sorted || !res.versions || !res.changes) {
                policy_result_done(&res);
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        for (size_t i = 0; i < n; i++)
                sorted[i] = &keys[i];
        qsort(sorted, n, sizeof(*sorted), compare_central);

        for (size_t i = 0; i < n; i++) {
                const struct central_key *ck = sorted[i];
                const struct key_version *prev = find_central(old, ck->uid);
                struct key_version *kv = &res.versions[m];
                char identity[KEY_ID_MAX];

                if (ck->state == CENTRAL_STATE_COMPROMISED)
                        continue;   /* purged below */
                if (ck->state == CENTRAL_STATE_DESTROYED) {
                        if (prev && keep_missing(&res, prev, "Destroyed at the central KMS", now_usec, opt, kv))
                                m++;
                        continue;
                }
                /* Material the fetch did not ask for again (the sync said it
                 * holds it) is the cached one; central_fetch fetches all of
                 * it again now and then, so a change is still seen below. */
                const uint8_t *kek = ck->kek;
                if (!kek && ck->material_held && ck->is_aes256) {
                        if (!prev || !prev->kek) {
                                errorf(err, err_size, "central key %s: material neither fetched nor "
                                       "cached: sync refused", ck->uid);
                                policy_result_done(&res);
                                return -EINVAL;
                        }
                        kek = prev->kek;
                }
                if (!ck->is_aes256 || !kek) {
                        struct policy_change *c;

                        /* What we cached as an AES-256 KEK must not turn into
                         * something else: a changed or partial answer, never
                         * a reason to drop the key. */
                        if (prev) {
                                errorf(err, err_size, "central key %s is cached as an AES-256 key, but the "
                                       "central KMS now describes it as %s: sync refused, cache kept "
                                       "(check the object's Cryptographic Algorithm and Length at the "
                                       "central KMS)", ck->uid, *ck->kind ? ck->kind : "no AES-256 key");
                                policy_result_done(&res);
                                ret->conflict = prev;
                                return -EPROTO;
                        }
                        c = add_change(&res, POLICY_IGNORED, NULL);
                        snprintf(c->central_id, sizeof(c->central_id), "%s", ck->uid);
                        snprintf(c->why, sizeof(c->why), "%s", ck->kind);
                        continue;
                }
                /* The same identifier must always mean the same key: a change
                 * would make old ciphertexts unreadable, or is an attack on
                 * the central KMS. */
                if (prev && memcmp_ct(prev->kek, kek, AES256_KEY_SIZE) != 0) {
                        errorf(err, err_size, "key material of central key %s changed: sync refused "
                               "(investigate the central KMS)", ck->uid);
                        policy_result_done(&res);
                        ret->conflict = prev;
                        return -EBADMSG;
                }
                r = policy_central_identity(group, ck->uid, identity, sizeof(identity));
                if (r >= 0)
                        r = key_id_make(identity, kek, kv->id, sizeof(kv->id));
                if (r < 0) {
                        errorf(err, err_size, "central key %s: cannot make a key id: %s", ck->uid,
                               strerror(-r));
                        policy_result_done(&res);
                        return -EINVAL;
                }
                snprintf(kv->central_id, sizeof(kv->central_id), "%s", ck->uid);
                kv->kek = (uint8_t *) kek;
                kv->created_usec = ck->created_usec;
                kv->first_seen_usec = prev ? prev->first_seen_usec : now_usec;
                kv->missing_since_usec = 0;   /* seen again: back to its role */
                kv->role = ck->state == CENTRAL_STATE_PRE_ACTIVE ? KEY_ROLE_STAGED : KEY_ROLE_RETIRED;
                if (ck->state == CENTRAL_STATE_ACTIVE)
                        primary = m;   /* sorted: the last Active is the newest */
                m++;
        }
        if (primary != SIZE_MAX)
                res.versions[primary].role = KEY_ROLE_PRIMARY;
        for (size_t i = 0; i < n_old; i++) {
                const struct key_version *k = keyring_get(old, i);

                /* Cached central versions no longer located: missing. */
                if (*k->central_id && !find_key(keys, n, k->central_id)) {
                        if (keep_missing(&res, k, "no longer located at the central KMS", now_usec, opt,
                                         &res.versions[m]))
                                m++;
                        continue;
                }
                /* Keys made on this host before it joined a fleet stay
                 * readable: data written under them must not be lost by a
                 * configuration change. They never encrypt again. */
                if (!*k->central_id) {
                        res.versions[m] = *k;
                        res.versions[m].role = KEY_ROLE_RETIRED;
                        m++;
                }
        }
        if (m > KEYRING_MAX_KEYS) {
                errorf(err, err_size, "more than %d usable versions in key group %s (missing ones "
                       "included); destroy versions no longer needed at the central KMS, and purge "
                       "missing ones (tpmkmsctl purge)",
                       KEYRING_MAX_KEYS, group);
                policy_result_done(&res);
                return -E2BIG;
        }
        res.n_versions = m;

        /* What changed. */
        res.changed = !old || n_old != m;
        for (size_t i = 0; i < res.n_changes; i++)
                res.changed |= res.changes[i].event != POLICY_IGNORED;   /* missing, purged */
        for (size_t i = 0; i < m; i++) {
                const struct key_version *kv = &res.versions[i];
                const struct key_version *prev = *kv->central_id ? find_central(old, kv->central_id)
                                                                 : keyring_find(old, kv->id);
                if (!prev) {
                        add_change(&res, POLICY_ADDED, kv);
                        res.changed = true;
                } else if (prev->role != kv->role && kv->role != KEY_ROLE_MISSING) {
                        add_change(&res, POLICY_ROLE_CHANGED, kv)->from = prev->role;
                        res.changed = true;
                }
        }
        for (size_t i = 0; i < n_old; i++) {
                const struct key_version *k = keyring_get(old, i);
                const struct central_key *ck;
                struct policy_change *c;
                bool kept = false, reported = false;

                for (size_t j = 0; j < m && !kept; j++)
                        kept = strcmp(res.versions[j].id, k->id) == 0;
                for (size_t j = 0; j < res.n_changes && !reported; j++)
                        reported = res.changes[j].event == POLICY_PURGED && strcmp(res.changes[j].id, k->id) == 0;
                if (kept || reported)
                        continue;
                ck = find_key(keys, n, k->central_id);
                c = add_change(&res, POLICY_PURGED, k);
                snprintf(c->why, sizeof(c->why), "%s",
                         ck ? central_state_to_string(ck->state) : "no longer at the central KMS");
                res.changed = true;
        }
        *ret = res;
        return 0;
}

int policy_purge(const struct keyring *old, const char *id, struct policy_result *ret,
                 char *err, size_t err_size) {
        const struct key_version *k = old && id ? keyring_find(old, id) : NULL;
        struct policy_result res = {};
        size_t n_old = old ? keyring_size(old) : 0;
        struct policy_change *c;

        *ret = (struct policy_result) {};
        if (!k) {
                errorf(err, err_size, "no key version %s in the cache (see tpmkmsctl status)", id ? id : "");
                return -ENOENT;
        }
        if (k->role == KEY_ROLE_PRIMARY) {
                errorf(err, err_size, "refusing to purge %s: it is the primary key (it encrypts); "
                       "only missing versions can be purged", id);
                return -EPERM;
        }
        if (k->role != KEY_ROLE_MISSING) {
                errorf(err, err_size, "refusing to purge %s: it is %s, not missing (the central KMS still "
                       "has it; it would come back at the next sync); only missing versions can be purged",
                       id, key_role_to_string(k->role));
                return -EPERM;
        }
        res.versions = calloc(n_old, sizeof(*res.versions));
        res.changes = calloc(1, sizeof(*res.changes));
        if (!res.versions || !res.changes) {
                policy_result_done(&res);
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        for (size_t i = 0; i < n_old; i++)
                if (keyring_get(old, i) != k)
                        res.versions[res.n_versions++] = *keyring_get(old, i);
        c = add_change(&res, POLICY_PURGED, k);
        c->missing_since_usec = k->missing_since_usec;
        snprintf(c->why, sizeof(c->why), "purged by the operator (tpmkmsctl purge)");
        res.changed = true;
        *ret = res;
        return 0;
}
