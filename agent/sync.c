#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <systemd/sd-event.h>
#include <time.h>
#include <unistd.h>

#include "common/macro.h"
#include "common/util.h"
#include "log.h"
#include "sync.h"


struct sync {
        const struct config *config;
        struct vault *vault;
        pthread_mutex_t *state_lock;
        struct keyring_slot *keys;

        sd_event_source *done_source;
        int done_fd;                       /* eventfd: the thread wakes the loop */
        void (*on_done)(void *userdata);
        void *userdata;

        pthread_t thread;
        bool thread_started;
        pthread_mutex_t lock;              /* guards everything below */
        pthread_cond_t cond;
        bool stop, requested;
        uint64_t gen_started, gen_done;    /* syncs started / finished (see sync.h) */
        uint64_t last_on_demand;           /* CLOCK_MONOTONIC */
        struct sync_status status;
        struct central_client *central;    /* NULL until it could be set up */

        uint64_t started_usec;             /* CLOCK_REALTIME */
        _Atomic uint64_t last_success_usec;   /* read on the request path */
};

/* "kmip:<group>/<uid>", with bytes outside key_id_make's alphabet
 * percent-encoded so that distinct central identities stay distinct. */
static int central_identity(const char *group, const char *uid, char *out, size_t size) {
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
        const struct central_key *x = a, *y = b;

        if (x->attr.initial_date != y->attr.initial_date)
                return x->attr.initial_date < y->attr.initial_date ? -1 : 1;
        return strcmp(x->attr.uid, y->attr.uid);
}

static const struct key_version *find_central(const struct keyring *kr, const char *uid) {
        for (size_t i = 0; kr && i < keyring_size(kr); i++)
                if (strcmp(keyring_get(kr, i)->central_id, uid) == 0)
                        return keyring_get(kr, i);
        return NULL;
}

static void append(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void append(char *buf, size_t size, const char *fmt, ...) {
        size_t n = strlen(buf);
        va_list ap;

        if (n >= size - 1)
                return;
        va_start(ap, fmt);
        vsnprintf(buf + n, size - n, fmt, ap);
        va_end(ap);
}

/* Build the keyring the central state asks for. Returns 0 (changed in
 * *ret_changed), or a negative errno with why in err. Called with the state
 * lock held, so old is the published snapshot. */
static int sync_compute(struct sync *s, struct central_key *ck, size_t n, const struct keyring *old,
                        struct keyring **ret, bool *ret_changed, char *change, size_t change_size,
                        char *err, size_t err_size) {
        _cleanup_free_ struct key_version *kv = NULL;
        size_t m = 0, primary = SIZE_MAX;
        uint64_t now = now_usec(CLOCK_REALTIME);
        bool changed;
        int r;

        qsort(ck, n, sizeof(*ck), compare_central);
        kv = calloc(n + (old ? keyring_size(old) : 0) + 1, sizeof(*kv));
        if (!kv)
                return -ENOMEM;

        for (size_t i = 0; i < n; i++) {
                const struct kmip_key_attributes *a = &ck[i].attr;
                const struct key_version *prev = find_central(old, a->uid);
                char identity[KEY_ID_MAX];

                if (!kmip_state_has_material(a->state))
                        continue;   /* compromised or destroyed: purged below */
                if (!ck[i].has_material) {
                        /* central.c fetched no material: not an AES-256 key. */
                        log_warning("Central key %s in group %s is not an AES-256 key (algorithm %d, "
                                    "%d bits): ignored; keep only KEK versions in the group",
                                    a->uid, s->config->key_group, a->algorithm, a->length);
                        continue;
                }
                /* The same identifier must always mean the same key: a
                 * change would make old ciphertexts unreadable, or is an
                 * attack on the central KMS. Refuse the whole sync. */
                if (prev && memcmp_ct(prev->kek, ck[i].kek, KEK_SIZE) != 0) {
                        log_key_event(LOG_MESSAGE_KEY_MATERIAL_CHANGED, prev->id, key_role_to_string(prev->role),
                                      "ALARM: key material of central key %s changed at the central KMS; "
                                      "refusing the sync and keeping the cached key %s", a->uid, prev->id);
                        snprintf(err, err_size, "key material of central key %s changed: sync refused "
                                 "(investigate the central KMS)", a->uid);
                        return -EBADMSG;
                }
                r = central_identity(s->config->key_group, a->uid, identity, sizeof(identity));
                if (r >= 0)
                        r = key_id_make(identity, ck[i].kek, kv[m].id, sizeof(kv[m].id));
                if (r < 0) {
                        snprintf(err, err_size, "central key %s: cannot make a key id: %s", a->uid, strerror(-r));
                        return r;
                }
                snprintf(kv[m].central_id, sizeof(kv[m].central_id), "%s", a->uid);
                kv[m].kek = ck[i].kek;
                kv[m].created_usec = a->initial_date > 0 ? (uint64_t) a->initial_date * USEC_PER_SEC : 0;
                kv[m].first_seen_usec = prev ? prev->first_seen_usec : now;
                kv[m].role = a->state == KMIP_STATE_PRE_ACTIVE ? KEY_ROLE_STAGED : KEY_ROLE_RETIRED;
                if (a->state == KMIP_STATE_ACTIVE)
                        primary = m;   /* sorted: the last Active is the newest */
                m++;
        }
        if (primary != SIZE_MAX)
                kv[primary].role = KEY_ROLE_PRIMARY;
        if (m > KEYRING_MAX_KEYS) {
                snprintf(err, err_size, "more than %d usable versions in key group %s; destroy versions "
                         "no longer needed at the central KMS", KEYRING_MAX_KEYS, s->config->key_group);
                return -E2BIG;
        }
        /* Keys made on this host before it joined a fleet (no central id)
         * stay readable: data written under them must not be lost by a
         * configuration change. They never encrypt again. */
        for (size_t i = 0; old && i < keyring_size(old); i++) {
                const struct key_version *k = keyring_get(old, i);
                if (*k->central_id)
                        continue;
                kv[m] = *k;
                kv[m].role = KEY_ROLE_RETIRED;
                m++;
        }

        /* What changed, for the journal and tpmkmsctl sync. */
        change[0] = 0;
        changed = !old || keyring_size(old) != m;
        for (size_t i = 0; i < m; i++) {
                const struct key_version *prev = *kv[i].central_id ? find_central(old, kv[i].central_id)
                                                                   : keyring_find(old, kv[i].id);
                if (!prev) {
                        changed = true;
                        append(change, change_size, "%s%s new (%s)", *change ? "; " : "", kv[i].id,
                               key_role_to_string(kv[i].role));
                        log_key_event(LOG_MESSAGE_KEY_CREATED, kv[i].id, key_role_to_string(kv[i].role),
                                      "Key %s (central %s) synced as %s", kv[i].id, kv[i].central_id,
                                      key_role_to_string(kv[i].role));
                } else if (prev->role != kv[i].role) {
                        changed = true;
                        append(change, change_size, "%s%s %s -> %s", *change ? "; " : "", kv[i].id,
                               key_role_to_string(prev->role), key_role_to_string(kv[i].role));
                        log_key_event(LOG_MESSAGE_KEY_ROLE, kv[i].id, key_role_to_string(kv[i].role),
                                      "Key %s (central %s): %s -> %s", kv[i].id, kv[i].central_id,
                                      key_role_to_string(prev->role), key_role_to_string(kv[i].role));
                }
        }
        for (size_t i = 0; old && i < keyring_size(old); i++) {
                const struct key_version *k = keyring_get(old, i);
                const struct central_key *c = NULL;
                bool kept = false;

                for (size_t j = 0; j < m && !kept; j++)
                        kept = strcmp(kv[j].id, k->id) == 0;
                if (kept)
                        continue;
                for (size_t j = 0; j < n && !c; j++)
                        if (strcmp(ck[j].attr.uid, k->central_id) == 0)
                                c = &ck[j];
                changed = true;
                append(change, change_size, "%s%s purged", *change ? "; " : "", k->id);
                log_key_event(LOG_MESSAGE_KEY_ROLE, k->id, "purged",
                              "Key %s (central %s) purged from the cache: %s", k->id,
                              *k->central_id ? k->central_id : "-",
                              c ? kmip_state_to_string(c->attr.state) : "no longer at the central KMS");
        }
        if (!changed)
                snprintf(change, change_size, "no change");
        *ret_changed = changed;
        if (!changed)
                return 0;
        r = keyring_new(kv, m, ret);
        if (r < 0)
                snprintf(err, err_size, "cannot build the keyring: %s", strerror(-r));
        return r;
}

static int sync_once(struct sync *s, char *change, size_t change_size, char *err, size_t err_size) {
        struct central_key *ck = NULL;
        _cleanup_(keyring_unrefp) struct keyring *old = NULL, *kr = NULL;
        struct central_client *cc;
        bool changed = false;
        size_t n = 0;
        int r;

        pthread_mutex_lock(&s->lock);
        cc = s->central;
        pthread_mutex_unlock(&s->lock);
        if (!cc) {
                /* Certificates may be fixed while we run: try again each time. */
                r = central_client_new(s->config, &cc, err, err_size);
                if (r < 0)
                        return r;
                pthread_mutex_lock(&s->lock);
                s->central = cc;
                if (s->stop)   /* sync_free ran before there was a client to cancel */
                        central_client_cancel(cc);
                pthread_mutex_unlock(&s->lock);
        }

        r = central_fetch(cc, &ck, &n, err, err_size);
        if (r < 0)
                return r;

        pthread_mutex_lock(s->state_lock);
        old = keyring_slot_get(s->keys);
        r = sync_compute(s, ck, n, old, &kr, &changed, change, change_size, err, err_size);
        if (r >= 0 && changed) {
                /* Persist first: a key the apiserver gets must survive a crash. */
                r = vault_store(s->vault, kr);
                if (r < 0)
                        snprintf(err, err_size, "cannot persist the synced keys: %s (see the journal)",
                                 strerror(-r));
                else
                        keyring_slot_publish(s->keys, kr);
        }
        pthread_mutex_unlock(s->state_lock);
        central_keys_free(ck, n);
        return r;
}

static void *sync_thread(void *userdata) {
        struct sync *s = userdata;
        uint64_t next = 0;   /* first sync right away */

        pthread_mutex_lock(&s->lock);
        for (;;) {
                while (!s->stop && !s->requested && now_usec(CLOCK_MONOTONIC) < next) {
                        uint64_t at = next;
                        struct timespec ts = { (time_t) (at / USEC_PER_SEC), (long) (at % USEC_PER_SEC) * 1000 };
                        pthread_cond_timedwait(&s->cond, &s->lock, &ts);
                }
                if (s->stop)
                        break;
                s->requested = false;
                s->gen_started++;
                s->status.in_progress = true;
                pthread_mutex_unlock(&s->lock);

                char change[512] = "", err[512] = "";
                uint64_t t0 = now_usec(CLOCK_MONOTONIC);
                int r = sync_once(s, change, sizeof(change), err, sizeof(err));
                uint64_t took = now_usec(CLOCK_MONOTONIC) - t0;

                if (r < 0)
                        log_warning("Sync with the central KMS failed after %" PRIu64 " ms: %s; "
                                    "still serving the %s", took / 1000, err,
                                    "cached keys");
                else
                        log_info("Sync with the central KMS took %" PRIu64 " ms: %s", took / 1000, change);

                pthread_mutex_lock(&s->lock);
                s->status.in_progress = false;
                s->status.last_attempt_usec = now_usec(CLOCK_REALTIME);
                if (r < 0) {
                        s->status.syncs_failed++;
                        snprintf(s->status.last_error, sizeof(s->status.last_error), "%s", err);
                } else {
                        s->status.syncs_ok++;
                        s->status.last_error[0] = 0;
                        snprintf(s->status.last_change, sizeof(s->status.last_change), "%s", change);
                        s->status.last_success_usec = s->status.last_attempt_usec;
                        atomic_store(&s->last_success_usec, s->status.last_attempt_usec);
                }
                /* +-10% jitter keeps a fleet from polling in lockstep. */
                uint32_t rnd = 0;
                (void) RAND_bytes((unsigned char *) &rnd, sizeof(rnd));
                uint64_t iv = s->config->sync_interval_usec;
                next = now_usec(CLOCK_MONOTONIC) + iv - iv / 10 + (iv / 5) * (rnd % 1000) / 1000;
                s->gen_done = s->gen_started;
                (void) eventfd_write(s->done_fd, 1);
        }
        pthread_mutex_unlock(&s->lock);
        return NULL;
}

static int on_sync_done(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        struct sync *s = userdata;
        eventfd_t v;

        (void) eventfd_read(fd, &v);
        if (s->on_done)
                s->on_done(s->userdata);
        return 0;
}

int sync_new(const struct config *c, struct vault *v, pthread_mutex_t *state_lock,
             struct keyring_slot *keys, sd_event *e, void (*on_done)(void *userdata),
             void *userdata, struct sync **ret) {
        struct sync *s;
        pthread_condattr_t ca;
        int r;

        s = calloc(1, sizeof(*s));
        if (!s)
                return log_error_errno(ENOMEM, "Cannot set up sync: %m");
        *s = (struct sync) {
                .config = c,
                .vault = v,
                .state_lock = state_lock,
                .keys = keys,
                .on_done = on_done,
                .userdata = userdata,
                .done_fd = -1,
                .started_usec = now_usec(CLOCK_REALTIME),
        };
        pthread_mutex_init(&s->lock, NULL);
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&s->cond, &ca);
        pthread_condattr_destroy(&ca);

        s->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (s->done_fd < 0) {
                r = log_error_errno(errno, "Cannot create an eventfd for sync: %m");
                goto fail;
        }
        r = sd_event_add_io(e, &s->done_source, s->done_fd, EPOLLIN, on_sync_done, s);
        if (r < 0) {
                log_error_errno(r, "Cannot watch the sync eventfd: %m");
                goto fail;
        }
        r = -pthread_create(&s->thread, NULL, sync_thread, s);
        if (r < 0) {
                log_error_errno(r, "Cannot start the sync thread: %m");
                goto fail;
        }
        s->thread_started = true;
        *ret = s;
        return 0;
fail:
        sync_free(s);
        return r;
}

void sync_free(struct sync *s) {
        if (!s)
                return;
        if (s->thread_started) {
                pthread_mutex_lock(&s->lock);
                s->stop = true;
                if (s->central)
                        central_client_cancel(s->central);
                pthread_cond_signal(&s->cond);
                pthread_mutex_unlock(&s->lock);
                /* A fetch in progress ends after its current request. */
                pthread_join(s->thread, NULL);
        }
        sd_event_source_disable_unref(s->done_source);
        if (s->done_fd >= 0)
                close(s->done_fd);
        central_client_free(s->central);
        pthread_cond_destroy(&s->cond);
        pthread_mutex_destroy(&s->lock);
        free(s);
}

uint64_t sync_request(struct sync *s) {
        uint64_t token;

        pthread_mutex_lock(&s->lock);
        s->requested = true;
        token = s->gen_started + 1;   /* the next sync to start */
        pthread_cond_signal(&s->cond);
        pthread_mutex_unlock(&s->lock);
        return token;
}

uint64_t sync_request_on_demand(struct sync *s) {
        uint64_t now = now_usec(CLOCK_MONOTONIC), token = 0;

        pthread_mutex_lock(&s->lock);
        if (s->requested)
                token = s->gen_started + 1;   /* join the queued one */
        else if (s->last_on_demand == 0 || now >= s->last_on_demand + SYNC_ON_DEMAND_INTERVAL_USEC) {
                s->last_on_demand = now;
                s->status.on_demand++;
                s->requested = true;
                token = s->gen_started + 1;
                pthread_cond_signal(&s->cond);
                log_info("Sync (on demand): a Decrypt named a key id this host does not have");
        }
        pthread_mutex_unlock(&s->lock);
        return token;
}

uint64_t sync_done_generation(struct sync *s) {
        uint64_t done;

        pthread_mutex_lock(&s->lock);
        done = s->gen_done;
        pthread_mutex_unlock(&s->lock);
        return done;
}

void sync_get_status(struct sync *s, struct sync_status *ret) {
        pthread_mutex_lock(&s->lock);
        *ret = s->status;
        pthread_mutex_unlock(&s->lock);
}

size_t sync_endpoint_health(struct sync *s, struct central_endpoint_health *ret, size_t max) {
        struct central_client *cc;

        pthread_mutex_lock(&s->lock);
        cc = s->central;
        pthread_mutex_unlock(&s->lock);
        return cc ? central_client_health(cc, ret, max) : 0;
}

bool sync_too_stale(struct sync *s, uint64_t *ret_age_usec) {
        uint64_t last = atomic_load(&s->last_success_usec), now = now_usec(CLOCK_REALTIME);
        uint64_t since = last ? last : s->started_usec;
        uint64_t age = now > since ? now - since : 0;

        if (ret_age_usec)
                *ret_age_usec = age;
        return s->config->max_staleness_usec != 0 && age > s->config->max_staleness_usec;
}
