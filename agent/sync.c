#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <systemd/sd-event.h>
#include <time.h>
#include <unistd.h>

#include "identity.h"
#include "macro.h"
#include "util.h"
#include "log.h"
#include "policy.h"
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
        bool reload_identity;              /* tpmkmsctl enroll: rebuild the client */
        uint64_t gen_started, gen_done;    /* syncs started / finished (see sync.h) */
        uint64_t last_on_demand;           /* CLOCK_MONOTONIC */
        struct sync_status status;
        struct central_client *central;    /* NULL until it could be set up */

        uint64_t started_usec;             /* CLOCK_REALTIME */
        uint64_t last_full_usec;           /* CLOCK_MONOTONIC: last sync that fetched all
                                            * material again; 0 none yet (the sync thread) */
        _Atomic uint64_t last_success_usec;   /* read on the request path */
};

/* Log what the policy decided and describe it in change (for tpmkmsctl sync). */
static void sync_report(const struct sync *s, const struct policy_result *res, char *change, size_t size) {
        change[0] = 0;
        for (size_t i = 0; i < res->n_changes; i++) {
                const struct policy_change *c = &res->changes[i];
                const char *central = *c->central_id ? c->central_id : "-";
                const char *to = key_role_to_string(c->to);

                switch (c->event) {
                case POLICY_ADDED:
                        strappendf(change, size, "%s%s new (%s)", *change ? "; " : "", c->id, to);
                        log_key_event(LOG_MESSAGE_KEY_CREATED, c->id, to, "Key %s (central %s) synced as %s",
                                      c->id, central, to);
                        break;
                case POLICY_ROLE_CHANGED:
                        strappendf(change, size, "%s%s %s -> %s", *change ? "; " : "", c->id,
                                   key_role_to_string(c->from), to);
                        log_key_event(LOG_MESSAGE_KEY_ROLE, c->id, to, "Key %s (central %s): %s -> %s",
                                      c->id, central, key_role_to_string(c->from), to);
                        break;
                case POLICY_PURGED:
                        strappendf(change, size, "%s%s purged", *change ? "; " : "", c->id);
                        log_key_event(LOG_MESSAGE_KEY_ROLE, c->id, "purged",
                                      "Key %s (central %s) purged from the cache: %s", c->id, central, c->why);
                        break;
                case POLICY_MISSING:
                        strappendf(change, size, "%s%s %s -> missing", *change ? "; " : "", c->id,
                                   key_role_to_string(c->from));
                        log_key_event(LOG_MESSAGE_KEY_MISSING, c->id, to,
                                      "ALARM: key %s (central %s) is missing: %s. Kept decrypt-only; purged "
                                      "after [central] purge_after unless it reappears (tpmkmsctl purge "
                                      "to purge it now). If the central KMS lost it, this cache may hold "
                                      "the last copy", c->id, central, c->why);
                        break;
                case POLICY_IGNORED:
                        log_warning("Central key %s in group %s is not an AES-256 key (%s): ignored; "
                                    "keep only KEK versions in the group", central, s->config->key_group, c->why);
                        break;
                }
        }
        if (!res->changed)
                snprintf(change, size, "no change");
}

/* The central identifiers of the cached versions that have material (all
 * of them, missing ones included), for central_fetch. */
static int held_versions(struct sync *s, char (**ret)[CENTRAL_ID_MAX], size_t *ret_n) {
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        char (*held)[CENTRAL_ID_MAX];
        size_t n = 0, size;

        pthread_mutex_lock(s->state_lock);
        kr = keyring_slot_get(s->keys);
        pthread_mutex_unlock(s->state_lock);
        size = kr ? keyring_size(kr) : 0;
        held = calloc(size > 0 ? size : 1, sizeof(*held));
        if (!held)
                return -ENOMEM;
        for (size_t i = 0; i < size && n < CENTRAL_KEYS_MAX; i++) {
                const struct key_version *k = keyring_get(kr, i);

                size_t l = strlen(k->central_id);

                if (l > 0 && l < CENTRAL_ID_MAX && k->kek)
                        memcpy(held[n++], k->central_id, l + 1);
        }
        *ret = held;
        *ret_n = n;
        return 0;
}

/* Whether the cache holds any central version (at start). */
static bool holds_central_versions(struct sync *s) {
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        bool any = false;

        pthread_mutex_lock(s->state_lock);
        kr = keyring_slot_get(s->keys);
        pthread_mutex_unlock(s->state_lock);
        for (size_t i = 0; kr && i < keyring_size(kr) && !any; i++)
                any = *keyring_get(kr, i)->central_id != '\0';
        return any;
}

static uint64_t random_below(uint64_t max) {
        uint64_t rnd = 0;

        /* Jitter needs no cryptographic quality; without it, no jitter. */
        (void) RAND_bytes((unsigned char *) &rnd, sizeof(rnd));
        return max > 0 ? rnd % max : 0;
}

static int sync_once(struct sync *s, char *change, size_t change_size, char *err, size_t err_size) {
        struct central_key *ck = NULL;
        _cleanup_(keyring_unrefp) struct keyring *old = NULL, *kr = NULL;
        struct policy_result res = {};
        struct policy_options popt;
        _cleanup_free_ char (*held)[CENTRAL_ID_MAX] = NULL;
        struct central_client *cc;
        bool changed = false;
        size_t n = 0, n_held = 0;
        int r;

        pthread_mutex_lock(&s->lock);
        if (s->reload_identity) {
                central_client_free(s->central);
                s->central = NULL;
                s->reload_identity = false;
        }
        cc = s->central;
        pthread_mutex_unlock(&s->lock);
        if (!cc) {
                /* Certificates may be fixed while we run: try again each time. */
                EVP_PKEY *key = NULL;
                struct central_options opt;

                /* The TPM client key's secret is in the sealed cache, which
                 * enroll may replace: read it as the writers do. */
                pthread_mutex_lock(s->state_lock);
                r = identity_load_key(s->config, s->vault->identity, &key, err, err_size);
                pthread_mutex_unlock(s->state_lock);
                if (r < 0)
                        return r;
                config_central_options(s->config, &opt);
                opt.key = key;
                r = central_client_new(&opt, &cc, err, err_size);
                EVP_PKEY_free(key);   /* the TLS context holds its own reference */
                if (r < 0)
                        return r;
                pthread_mutex_lock(&s->lock);
                s->central = cc;
                if (s->stop)   /* sync_free ran before there was a client to cancel */
                        central_client_cancel(cc);
                pthread_mutex_unlock(&s->lock);
        }

        /* Material is fetched once per version: later syncs name the
         * versions held and the central KMS answers what can change (State,
         * dates). Every material_check, and at the first sync after start,
         * all of it is fetched again and compared with the cache
         * (policy_apply refuses a changed one): the one way to learn that
         * the central KMS would answer other material under a known
         * identifier, as PyKMIP 0.10 has no Digest attribute (README,
         * "Fleet sync load"). */
        uint64_t now = now_usec(CLOCK_MONOTONIC);
        bool full = s->last_full_usec == 0 || now - s->last_full_usec >= s->config->material_check_usec;
        if (!full) {
                r = held_versions(s, &held, &n_held);
                if (r < 0) {
                        snprintf(err, err_size, "out of memory");
                        return r;
                }
        }
        r = central_fetch(cc, (const char (*)[CENTRAL_ID_MAX]) held, n_held, &ck, &n, err, err_size);
        if (r < 0)
                return r;

        pthread_mutex_lock(s->state_lock);
        old = keyring_slot_get(s->keys);
        config_policy_options(s->config, &popt);
        r = policy_apply(s->config->key_group, ck, n, old, now_usec(CLOCK_REALTIME), &popt, &res, err, err_size);
        if (r == -EBADMSG && res.conflict)
                log_key_event(LOG_MESSAGE_KEY_MATERIAL_CHANGED, res.conflict->id,
                              key_role_to_string(res.conflict->role),
                              "ALARM: %s; keeping the cached key %s", err, res.conflict->id);
        else if (r == -ENODATA)
                log_error("ALARM: sync with the central KMS refused: %s", err);
        if (r >= 0) {
                sync_report(s, &res, change, change_size);
                changed = res.changed;
                if (changed) {
                        r = keyring_new(res.versions, res.n_versions, &kr);
                        if (r < 0)
                                snprintf(err, err_size, "cannot build the keyring: %s", strerror(-r));
                }
        }
        if (r >= 0 && changed) {
                /* Persist first: a key the apiserver gets must survive a crash. */
                r = vault_store(s->vault, kr);
                if (r < 0)
                        snprintf(err, err_size, "cannot persist the synced keys: %s",
                                 *s->vault->error ? s->vault->error : strerror(-r));
                else
                        keyring_slot_publish(s->keys, kr);
        }
        pthread_mutex_unlock(s->state_lock);
        policy_result_done(&res);
        central_keys_free(ck, n);
        /* A refused answer (changed material, ...) is checked in full
         * again at the next sync, and refused again. */
        if (r >= 0 && full)
                s->last_full_usec = now;
        return r;
}

static void *sync_thread(void *userdata) {
        struct sync *s = userdata;
        uint64_t next = 0;   /* first sync right away, */

        /* ... unless this host already has central versions to serve: then
         * at a random point of the first interval, so that a fleet started
         * together (a control-plane upgrade, a power cut) does not poll the
         * central KMS in step. A host with none has nothing to serve until
         * it syncs; tpmkmsctl sync and a Decrypt of an unknown key id still
         * sync at once. */
        if (holds_central_versions(s))
                next = now_usec(CLOCK_MONOTONIC) + random_below(s->config->sync_interval_usec);

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
                /* +-10% jitter keeps hosts that drifted apart from
                 * falling back into step. */
                uint64_t iv = s->config->sync_interval_usec;
                next = now_usec(CLOCK_MONOTONIC) + iv - iv / 10 + random_below(iv / 5 + 1);
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
        (void) sync_free(s, 0);
        return r;
}

bool sync_free(struct sync *s, uint64_t wait_usec) {
        if (!s)
                return true;
        if (s->thread_started) {
                uint64_t deadline = now_usec(CLOCK_REALTIME) + wait_usec;
                struct timespec ts = { (time_t) (deadline / USEC_PER_SEC),
                                       (long) (deadline % USEC_PER_SEC) * 1000 };

                pthread_mutex_lock(&s->lock);
                s->stop = true;
                if (s->central)
                        central_client_cancel(s->central);
                pthread_cond_signal(&s->cond);
                pthread_mutex_unlock(&s->lock);
                /* A fetch in progress ends after its current request; a
                 * persist stuck in the TPM may not end at all. */
                if (pthread_timedjoin_np(s->thread, NULL, &ts) != 0) {
                        log_warning("Stopping with the sync thread still persisting after %" PRIu64
                                    " s: abandoned (is the TPM answering?)", wait_usec / USEC_PER_SEC);
                        pthread_detach(s->thread);
                        return false;
                }
        }
        sd_event_source_disable_unref(s->done_source);
        if (s->done_fd >= 0)
                close(s->done_fd);
        central_client_free(s->central);
        pthread_cond_destroy(&s->cond);
        pthread_mutex_destroy(&s->lock);
        free(s);
        return true;
}

void sync_reload_identity(struct sync *s) {
        pthread_mutex_lock(&s->lock);
        s->reload_identity = true;
        pthread_mutex_unlock(&s->lock);
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
