/* The role policy (see policy.h). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "macro.h"
#include "policy.h"
#include "util.h"

int policy_central_identity(const char *group, const char *uid, char *out, size_t size) {
        static const char hex[] = "0123456789ABCDEF";
        const char *parts[] = { "kmip:", group, "/", uid };
        size_t n = 0;

        for (size_t p = 0; p < ARRAY_SIZE(parts); p++)
                for (const unsigned char *c = (const unsigned char *) parts[p]; *c; c++) {
                        bool plain = p == 0 || p == 2 || (*c >= 'A' && *c <= 'Z') ||
                                     (*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') ||
                                     strchr("._-", *c);
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

int policy_apply(const char *group, const struct central_key *keys, size_t n,
                 const struct keyring *old, uint64_t now_usec, struct policy_result *ret,
                 char *err, size_t err_size) {
        _cleanup_free_ const struct central_key **sorted = NULL;
        struct policy_result res = {};
        size_t n_old = old ? keyring_size(old) : 0, m = 0, primary = SIZE_MAX;
        int r;

        *ret = (struct policy_result) {};
        sorted = calloc(n + 1, sizeof(*sorted));
        res.versions = calloc(n + n_old + 1, sizeof(*res.versions));
        /* at most: one ignored per central key, one added or changed per
         * version kept, one purged per cached version */
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

                if (!central_state_has_material(ck->state))
                        continue;   /* compromised or destroyed: purged below */
                if (!ck->is_aes256 || !ck->kek) {
                        struct policy_change *c = add_change(&res, POLICY_IGNORED, NULL);
                        snprintf(c->central_id, sizeof(c->central_id), "%s", ck->uid);
                        snprintf(c->why, sizeof(c->why), "%s", ck->kind);
                        continue;
                }
                /* The same identifier must always mean the same key: a change
                 * would make old ciphertexts unreadable, or is an attack on
                 * the central KMS. */
                if (prev && memcmp_ct(prev->kek, ck->kek, AES256_KEY_SIZE) != 0) {
                        errorf(err, err_size, "key material of central key %s changed: sync refused "
                               "(investigate the central KMS)", ck->uid);
                        policy_result_done(&res);
                        ret->conflict = prev;
                        return -EBADMSG;
                }
                r = policy_central_identity(group, ck->uid, identity, sizeof(identity));
                if (r >= 0)
                        r = key_id_make(identity, ck->kek, kv->id, sizeof(kv->id));
                if (r < 0) {
                        errorf(err, err_size, "central key %s: cannot make a key id: %s", ck->uid,
                               strerror(-r));
                        policy_result_done(&res);
                        return -EINVAL;
                }
                snprintf(kv->central_id, sizeof(kv->central_id), "%s", ck->uid);
                kv->kek = ck->kek;
                kv->created_usec = ck->created_usec;
                kv->first_seen_usec = prev ? prev->first_seen_usec : now_usec;
                kv->role = ck->state == CENTRAL_STATE_PRE_ACTIVE ? KEY_ROLE_STAGED : KEY_ROLE_RETIRED;
                if (ck->state == CENTRAL_STATE_ACTIVE)
                        primary = m;   /* sorted: the last Active is the newest */
                m++;
        }
        if (primary != SIZE_MAX)
                res.versions[primary].role = KEY_ROLE_PRIMARY;
        if (m > KEYRING_MAX_KEYS) {
                errorf(err, err_size, "more than %d usable versions in key group %s; destroy versions "
                       "no longer needed at the central KMS", KEYRING_MAX_KEYS, group);
                policy_result_done(&res);
                return -E2BIG;
        }
        /* Keys made on this host before it joined a fleet stay readable: data
         * written under them must not be lost by a configuration change. They
         * never encrypt again. */
        for (size_t i = 0; i < n_old; i++) {
                const struct key_version *k = keyring_get(old, i);

                if (*k->central_id)
                        continue;
                res.versions[m] = *k;
                res.versions[m].role = KEY_ROLE_RETIRED;
                m++;
        }
        res.n_versions = m;

        /* What changed. */
        res.changed = !old || n_old != m;
        for (size_t i = 0; i < m; i++) {
                const struct key_version *kv = &res.versions[i];
                const struct key_version *prev = *kv->central_id ? find_central(old, kv->central_id)
                                                                 : keyring_find(old, kv->id);
                if (!prev) {
                        add_change(&res, POLICY_ADDED, kv);
                        res.changed = true;
                } else if (prev->role != kv->role) {
                        add_change(&res, POLICY_ROLE_CHANGED, kv)->from = prev->role;
                        res.changed = true;
                }
        }
        for (size_t i = 0; i < n_old; i++) {
                const struct key_version *k = keyring_get(old, i);
                const struct central_key *ck;
                struct policy_change *c;
                bool kept = false;

                for (size_t j = 0; j < m && !kept; j++)
                        kept = strcmp(res.versions[j].id, k->id) == 0;
                if (kept)
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
