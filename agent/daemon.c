#include <errno.h>
#include <openssl/crypto.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "macro.h"
#include "util.h"
#include "control.h"
#include "daemon.h"
#include "identity.h"
#include "log.h"
#include "metrics.h"
#include "plugin.h"
#include "policy.h"
#include "status.h"
#include "sync.h"
#include "worker.h"
#include "keystore.h"

#define PENDING_SYNC_MAX 8

struct daemon {
        const struct config *config;
        sd_event *event;
        struct kms_server *kms;
        struct control_server *control;
        struct vault vault;
        struct keyring_slot keys;
        pthread_mutex_t state_lock;   /* writers of cache + slot: sync, rotate, reseal */
        struct sync *sync;            /* fleet mode, when the cache was unsealed */
        struct metrics *metrics;      /* [metrics] listen set */
        struct pending_sync {                   /* tpmkmsctl sync, waiting */
                struct control_conn *conn;
                uint64_t token;
        } pending_sync[PENDING_SYNC_MAX];
        size_t n_pending_sync;
        char notified_status[512];              /* last STATUS= sent */
        struct backend backend;
        struct worker *worker;     /* TPM and cache work off the loop (rotate, reseal, purge) */
        struct tpm_pcr_selection sealed_pcrs;   /* what the cache is sealed to (status) */
        bool have_sealed_pcrs;
        bool stop_requested;       /* SIGTERM before the server runs */
        bool kms_socket_ours;      /* we created the socket file (not systemd) */
        uint64_t started_usec;     /* CLOCK_REALTIME */
        sd_event_source *identity_timer;   /* daily certificate expiry check */
        /* Which client key the sealed cache holds a secret for (the digest
         * only, never the secret): a copy the loop reads without state_lock,
         * which a TPM job may hold for long. Updated after open and jobs. */
        struct vault_identity identity_seen;
        bool have_identity;
};

/* The identity as it stands (key file, certificate, whether the sealed cache
 * holds the key's secret). On the loop: never takes state_lock. */
static void daemon_identity(struct daemon *d, struct identity_info *ret) {
        identity_inspect(d->config, d->have_identity ? &d->identity_seen : NULL, ret);
}

/* Copy which key the vault holds a secret for; with state_lock held (or no
 * other thread yet). */
static void identity_seen_copy(const struct vault *v, struct vault_identity *ret, bool *ret_have) {
        *ret = (struct vault_identity) {};
        *ret_have = v->identity != NULL;
        if (v->identity)
                memcpy(ret->key_digest, v->identity->key_digest, sizeof(ret->key_digest));
}

/* At start and daily: the client certificate's expiry in the journal, a
 * warning from IDENTITY_EXPIRY_WARN_DAYS before it. */
static void daemon_check_identity(struct daemon *d) {
        struct identity_info id;
        char when[32] = "";
        int64_t days;

        daemon_identity(d, &id);
        if (id.not_after_usec == 0) {
                log_warning("Cannot read the client certificate %s: no TLS session with the central KMS "
                            "until it is installed (tpmkmsctl enroll writes the CSR to sign)", d->config->cert_file);
                return;
        }
        days = identity_days_left(id.not_after_usec, now_usec(CLOCK_REALTIME));
        {
                time_t t = (time_t) (id.not_after_usec / USEC_PER_SEC);
                struct tm tm;
                if (gmtime_r(&t, &tm))
                        strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
        }
        if (days < 0)
                log_key_event(LOG_MESSAGE_IDENTITY, NULL, NULL,
                              "ALARM: the client certificate %s expired on %s: the central KMS refuses this "
                              "host; have the fleet CA sign a new one (tpmkmsctl enroll --force)",
                              d->config->cert_file, when);
        else if (days < IDENTITY_EXPIRY_WARN_DAYS)
                log_key_event(LOG_MESSAGE_IDENTITY, NULL, NULL,
                              "The client certificate %s expires on %s, in %" PRId64 " day(s): renew it "
                              "(tpmkmsctl enroll --force, then the fleet CA signs the CSR)",
                              d->config->cert_file, when, days);
        else
                log_info("The client certificate %s (%s) expires on %s, in %" PRId64 " days",
                         d->config->cert_file, id.subject, when, days);
        if (*id.problem)
                log_warning("%s", id.problem);
}

static int on_identity_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct daemon *d = userdata;

        daemon_check_identity(d);
        (void) sd_event_source_set_time(s, usec + USEC_PER_DAY);
        return 0;
}

static void daemon_update_status(struct daemon *d) {
        _cleanup_(keyring_unrefp) struct keyring *kr = keyring_slot_get(&d->keys);
        const struct key_version *p = kr ? keyring_primary(kr) : NULL;
        char status[sizeof(d->notified_status)];

        metrics_set_primary(d->metrics, p ? p->id : "");
        if (d->vault.refused)
                snprintf(status, sizeof(status), "Refusing: %s", d->vault.reason);
        else
                snprintf(status, sizeof(status), "Serving %zu key(s), primary %s",
                         kr ? keyring_size(kr) : 0, p ? p->id : "none");
        /* Only changes: every sync ends here, most change nothing. */
        if (strcmp(status, d->notified_status) == 0)
                return;
        memcpy(d->notified_status, status, sizeof(status));
        (void) sd_notifyf(false, "STATUS=%s", status);
}

static int cmd_status(struct daemon *d, bool json, FILE *out) {
        _cleanup_(keyring_unrefp) struct keyring *kr = keyring_slot_get(&d->keys);
        struct kms_status st = {};
        struct identity_info id;
        bool fleet = d->config->central_type == CENTRAL_KMIP;

        if (fleet)
                daemon_identity(d, &id);
        backend_ops.status(&d->backend, &st);
        status_render(&(struct status_view) {
                              .config = d->config,
                              .keys = kr,
                              .refused = d->vault.refused,
                              .sealed_pcrs = d->have_sealed_pcrs ? &d->sealed_pcrs : NULL,
                              .tpm_busy_usec = vault_tpm_busy(&d->vault),
                              .healthz = st.healthz,
                              .started_usec = d->started_usec,
                              .sync = d->sync,
                              .identity = fleet ? &id : NULL,
                      },
                      json, out);
        return 0;
}

static int cmd_rotate_locked(struct daemon *d, FILE *out, char *err, size_t err_size) {
        _cleanup_(keyring_unrefp) struct keyring *old = keyring_slot_get(&d->keys);
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        _cleanup_erase_key_ uint8_t kek[AES256_KEY_SIZE];
        const struct key_version *prev;
        struct key_version next;
        int r;

        if (d->config->central_type != CENTRAL_NONE) {
                snprintf(err, err_size, "keys rotate at the central KMS in this mode; see README, rotation");
                return -EOPNOTSUPP;
        }
        if (!old) {
                snprintf(err, err_size, "no keys held (%s)", d->vault.refused ? d->vault.reason : "nothing unsealed");
                return -EPERM;
        }
        if (keyring_size(old) >= KEYRING_MAX_KEYS) {
                snprintf(err, err_size, "the cache holds the maximum of %d key versions; a standalone host "
                         "cannot retire versions: move to fleet mode to rotate further", KEYRING_MAX_KEYS);
                return -E2BIG;
        }
        prev = keyring_primary(old);
        r = vault_new_local_version(&next, kek);
        if (r >= 0)
                r = keyring_add_primary(old, &next, &kr);
        if (r < 0) {
                snprintf(err, err_size, "cannot make a new key version: %s", strerror(-r));
                return r;
        }
        /* Persist before publishing: a key that Encrypt hands out must
         * survive a crash. */
        r = vault_store(&d->vault, kr);
        if (r < 0) {
                snprintf(err, err_size, "cannot persist the new key: %s",
                         *d->vault.error ? d->vault.error : strerror(-r));
                return r;
        }
        keyring_slot_publish(&d->keys, kr);
        if (prev)
                log_key_event(LOG_MESSAGE_KEY_ROLE, prev->id, "retired", "Key %s retired (decrypt only)", prev->id);
        log_key_event(LOG_MESSAGE_KEY_CREATED, next.id, "primary", "Rotated: key %s is the new primary", next.id);
        fprintf(out, "%s\n", next.id);
        return 0;
}

static int cmd_reseal_locked(struct daemon *d, const struct tpm_pcr_selection *sel, FILE *out,
                             char *err, size_t err_size) {
        _cleanup_(keyring_unrefp) struct keyring *kr = keyring_slot_get(&d->keys);
        char pcrs[64];
        int r;

        if (d->vault.refused || !kr) {
                snprintf(err, err_size, "refusing to re-seal: the daemon holds no keys (%s)",
                         d->vault.refused ? d->vault.reason : "nothing unsealed");
                return -EPERM;
        }
        r = vault_reseal(&d->vault, kr, sel);
        if (r < 0) {
                snprintf(err, err_size, "re-seal failed, the previous cache stays in force: %s",
                         *d->vault.error ? d->vault.error : strerror(-r));
                return r;
        }
        (void) tpm_pcr_selection_format(vault_sealed_pcrs(&d->vault), pcrs, sizeof(pcrs));
        fprintf(out, "re-sealed %zu key(s) to the current values of PCRs %s\n", keyring_size(kr), pcrs);
        if (memcmp(vault_sealed_pcrs(&d->vault), &d->config->pcrs, sizeof(d->config->pcrs)) != 0)
                fprintf(out, "the configuration names other PCRs: set [tpm] pcrs = %s before the next start, "
                        "or the daemon refuses this cache if it is weaker than configured\n", pcrs);
        return 0;
}

/* tpmkmsctl purge ID: the operator drops a missing version before
 * purge_after (agent/policy.c decides what may go). */
static int cmd_purge_locked(struct daemon *d, const char *id, FILE *out, char *err, size_t err_size) {
        _cleanup_(keyring_unrefp) struct keyring *old = keyring_slot_get(&d->keys);
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        struct policy_result res;
        int r;

        if (d->vault.refused || !old) {
                snprintf(err, err_size, "refusing to purge: the daemon holds no keys (%s)",
                         d->vault.refused ? d->vault.reason : "nothing unsealed");
                return -EPERM;
        }
        r = policy_purge(old, id, &res, err, err_size);
        if (r < 0)
                return r;
        r = keyring_new(res.versions, res.n_versions, &kr);
        if (r < 0)
                snprintf(err, err_size, "cannot build the keyring: %s", strerror(-r));
        else {
                r = vault_store(&d->vault, kr);
                if (r < 0)
                        snprintf(err, err_size, "cannot persist the cache without %s: %s (see the journal); "
                                 "nothing purged", id, strerror(-r));
        }
        if (r >= 0) {
                const struct policy_change *c = &res.changes[0];

                keyring_slot_publish(&d->keys, kr);
                log_key_event(LOG_MESSAGE_KEY_ROLE, c->id, "purged", "Key %s (central %s) purged from the "
                              "cache: %s", c->id, *c->central_id ? c->central_id : "-", c->why);
                fprintf(out, "%s purged\n", c->id);
        }
        policy_result_done(&res);
        return r;
}

/* The subject and SANs come percent-encoded (a control argument has no
 * blanks): decode in place. */
static int percent_decode(char *s) {
        char *w = s;

        for (char *p = s; *p; p++) {
                if (*p == '%') {
                        unsigned v;
                        if (!p[1] || !p[2] || sscanf(p + 1, "%2x", &v) != 1 || v == 0)
                                return -EINVAL;
                        *w++ = (char) v;
                        p += 2;
                } else
                        *w++ = *p;
        }
        *w = '\0';
        return 0;
}

/* tpmkmsctl enroll on a running daemon: enroll SUBJECT TYPE FORCE SANS. The
 * daemon makes the key (the TPM is its), keeps the secret in its cache and
 * hands back the key file and the CSR for tpmkmsctl to write (the daemon may
 * not write /etc). */
static int cmd_enroll_locked(struct daemon *d, char **argv, FILE *out, char *err, size_t err_size) {
        _cleanup_(keyring_unrefp) struct keyring *kr = keyring_slot_get(&d->keys);
        _cleanup_free_ char *key_pem = NULL, *csr_pem = NULL;
        struct identity_enroll_options o = {};
        struct vault_identity *secret = NULL;
        bool force = strcmp(argv[3], "1") == 0;
        char *save = NULL;
        int r;

        if (d->config->central_type != CENTRAL_KMIP) {
                snprintf(err, err_size, "enroll: only in fleet mode ([central] type = kmip)");
                return -EOPNOTSUPP;
        }
        if (d->vault.refused) {
                snprintf(err, err_size, "refusing to enroll: the sealed cache was refused (%.200s); to re-provision, "
                         "stop tpmkmsd, move %.150s aside and run tpmkmsctl enroll --force (README, recovery)",
                         d->vault.reason, d->config->state_dir);
                return -EPERM;
        }
        if (d->vault.identity && !force) {
                snprintf(err, err_size, "this host already has an enrolled client key (%.200s); --force replaces it",
                         d->config->key_file);
                return -EEXIST;
        }
        o.key_type = identity_key_type_from_string(argv[2]);
        if (percent_decode(argv[1]) < 0 || percent_decode(argv[4]) < 0 || o.key_type < 0) {
                snprintf(err, err_size, "enroll: bad arguments");
                return -EINVAL;
        }
        o.subject = argv[1];
        if (strcmp(argv[4], "-") != 0)
                for (char *t = strtok_r(argv[4], ",", &save); t && o.n_sans < IDENTITY_SANS_MAX;
                     t = strtok_r(NULL, ",", &save))
                        o.sans[o.n_sans++] = t;
        if (!kr) {
                r = keyring_new(NULL, 0, &kr);
                if (r < 0) {
                        snprintf(err, err_size, "out of memory");
                        return r;
                }
        }
        secret = OPENSSL_secure_zalloc(sizeof(*secret));
        if (!secret) {
                snprintf(err, err_size, "out of locked memory");
                return -ENOMEM;
        }
        r = identity_enroll(d->config, &o, secret, &key_pem, &csr_pem, err, err_size);
        if (r >= 0) {
                r = vault_set_identity(&d->vault, kr, secret);
                if (r < 0)
                        snprintf(err, err_size, "cannot keep the client key's secret in the sealed cache: %s "
                                 "(see the journal); nothing changed", strerror(-r));
        }
        OPENSSL_secure_clear_free(secret, sizeof(*secret));
        if (r < 0)
                return r;
        if (d->sync)
                sync_reload_identity(d->sync);
        log_key_event(LOG_MESSAGE_IDENTITY, NULL, NULL,
                      "Enrolled a new TPM-bound client key (%s, subject %s); its secret is in the sealed "
                      "cache. Until the fleet CA signs the CSR into %s, the central KMS is not reachable.",
                      argv[2], o.subject, d->config->cert_file);
        fputs(key_pem, out);
        fputs(csr_pem, out);
        return 0;
}

/* Rotate, reseal and purge write the cache (and use the TPM) like the sync
 * thread does: on the worker, one writer at a time under state_lock, each
 * working from the snapshot it will replace; the control reply is deferred
 * until the job is done, so the event loop keeps serving meanwhile. */
enum slow_command {
        SLOW_ROTATE,
        SLOW_RESEAL,
        SLOW_PURGE,
        SLOW_ENROLL,
};

struct slow_job {
        struct daemon *d;
        struct control_conn *conn;        /* NULL once the client went away */
        enum slow_command command;
        struct tpm_pcr_selection sel;     /* reseal: what to seal to */
        bool has_sel;
        char id[KEY_ID_MAX];              /* purge: which version */
        char args[5][CONTROL_LINE_MAX];   /* enroll: its control arguments */
        struct tpm_pcr_selection sealed;  /* after the job: what the cache is sealed to */
        struct vault_identity identity;   /* after the job: which client key (digest only) */
        bool has_identity;
        char *body;
        size_t body_size;
        char err[512];
};

static int slow_job_run(void *userdata) {
        struct slow_job *j = userdata;
        struct daemon *d = j->d;
        FILE *out;
        int r;

        out = open_memstream(&j->body, &j->body_size);
        if (!out) {
                snprintf(j->err, sizeof(j->err), "out of memory");
                return -ENOMEM;
        }
        pthread_mutex_lock(&d->state_lock);
        switch (j->command) {
        case SLOW_ROTATE:
                r = cmd_rotate_locked(d, out, j->err, sizeof(j->err));
                break;
        case SLOW_RESEAL:
                r = cmd_reseal_locked(d, j->has_sel ? &j->sel : NULL, out, j->err, sizeof(j->err));
                break;
        case SLOW_PURGE:
                r = cmd_purge_locked(d, j->id, out, j->err, sizeof(j->err));
                break;
        default: {
                char *argv[5];

                for (size_t i = 0; i < ARRAY_SIZE(argv); i++)
                        argv[i] = j->args[i];
                r = cmd_enroll_locked(d, argv, out, j->err, sizeof(j->err));
                break;
        }
        }
        if (vault_sealed_pcrs(&d->vault))
                j->sealed = *vault_sealed_pcrs(&d->vault);
        identity_seen_copy(&d->vault, &j->identity, &j->has_identity);
        pthread_mutex_unlock(&d->state_lock);
        fclose(out);
        return r;
}

static void slow_job_done(void *userdata, int r) {
        struct slow_job *j = userdata;

        j->d->sealed_pcrs = j->sealed;
        j->d->identity_seen = j->identity;
        j->d->have_identity = j->has_identity;
        if (j->conn)
                control_conn_reply(j->conn, r, j->body ? j->body : "", j->err);
        daemon_update_status(j->d);
        free(j->body);
        free(j);
}

static void slow_job_dropped(struct control_conn *conn, void *userdata) {
        struct slow_job *j = userdata;

        j->conn = NULL;   /* the job runs on; its result goes to the journal only */
}

static int slow_submit(struct daemon *d, struct control_conn *conn, struct slow_job *proto,
                       char *err, size_t err_size) {
        struct slow_job *j;
        int r;

        j = malloc(sizeof(*j));
        if (!j) {
                snprintf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        *j = *proto;
        j->d = d;
        j->conn = conn;
        j->sealed = d->sealed_pcrs;
        j->identity = d->identity_seen;
        j->has_identity = d->have_identity;
        r = worker_submit(d->worker, slow_job_run, slow_job_done, j);
        if (r < 0) {
                free(j);
                snprintf(err, err_size, "too many commands waiting for the TPM or the disk%s; retry later",
                         vault_tpm_busy(&d->vault) > 5 * USEC_PER_SEC ? " (the TPM is not answering)" : "");
                return r;
        }
        control_conn_on_drop(conn, slow_job_dropped, j);
        return CONTROL_DEFERRED;
}

/* A waiting tpmkmsctl sync went away unanswered (timeout, stop). */
static void pending_sync_dropped(struct control_conn *conn, void *userdata) {
        struct daemon *d = userdata;
        size_t kept = 0;

        for (size_t i = 0; i < d->n_pending_sync; i++)
                if (d->pending_sync[i].conn != conn)
                        d->pending_sync[kept++] = d->pending_sync[i];
        d->n_pending_sync = kept;
}

static int cmd_sync(struct daemon *d, struct control_conn *conn, char *err, size_t err_size) {
        if (!d->sync) {
                snprintf(err, err_size, "%s", d->vault.refused ? "refusing to sync: the sealed cache was refused"
                                                               : "standalone mode ([central] type = none): nothing to sync");
                return -EOPNOTSUPP;
        }
        if (d->n_pending_sync == PENDING_SYNC_MAX) {
                snprintf(err, err_size, "too many sync requests waiting; retry when the running sync ends");
                return -EBUSY;
        }
        control_conn_on_drop(conn, pending_sync_dropped, d);
        d->pending_sync[d->n_pending_sync++] = (struct pending_sync) {
                .conn = conn,
                .token = sync_request(d->sync),
        };
        return CONTROL_DEFERRED;
}

/* After every sync: answer what waited for a sync that has now finished. */
static void on_sync_done(void *userdata) {
        struct daemon *d = userdata;
        uint64_t done = sync_done_generation(d->sync);
        struct sync_status st;
        char body[600];
        size_t kept = 0;

        /* Decrypts parked for an unknown key id until this sync: final answer. */
        kms_server_retry_parked(d->kms, done);
        daemon_update_status(d);
        sync_get_status(d->sync, &st);
        snprintf(body, sizeof(body), "%s\n", st.last_change);
        for (size_t i = 0; i < d->n_pending_sync; i++) {
                if (done < d->pending_sync[i].token)
                        d->pending_sync[kept++] = d->pending_sync[i];
                else
                        control_conn_reply(d->pending_sync[i].conn, *st.last_error ? -EREMOTEIO : 0,
                                           body, st.last_error);
        }
        d->n_pending_sync = kept;
}

static int daemon_control(void *userdata, struct control_conn *conn, int argc, char **argv,
                          FILE *out, char *err, size_t err_size) {
        struct daemon *d = userdata;

        static const struct {
                const char *name, *usage;
                int max_args;
        } commands[] = {
                { "status", "status [--json]", 1 },
                { "rotate", "rotate", 0 },
                { "reseal", "reseal [--pcrs SELECTION]", 2 },
                { "sync", "sync", 0 },
                { "purge", "purge KEY_ID", 1 },
                { "enroll", "enroll SUBJECT TYPE FORCE SANS", 4 },
        };
        const char *usage = NULL;

        for (size_t i = 0; i < ARRAY_SIZE(commands) && !usage; i++)
                if (strcmp(argv[0], commands[i].name) == 0) {
                        usage = commands[i].usage;
                        if (argc - 1 > commands[i].max_args) {
                                snprintf(err, err_size, "%s: unexpected argument '%s' (usage: %s)", argv[0],
                                         argv[commands[i].max_args + 1], usage);
                                return -EINVAL;
                        }
                }
        if (!usage) {
                snprintf(err, err_size, "unknown command '%s'", argv[0]);
                return -EINVAL;
        }

        if (strcmp(argv[0], "status") == 0) {
                if (argc == 2 && strcmp(argv[1], "--json") != 0) {
                        snprintf(err, err_size, "status: unknown option '%s' (usage: %s)", argv[1], usage);
                        return -EINVAL;
                }
                return cmd_status(d, argc == 2, out);
        }
        if (strcmp(argv[0], "rotate") == 0)
                return slow_submit(d, conn, &(struct slow_job) { .command = SLOW_ROTATE }, err, err_size);
        if (strcmp(argv[0], "reseal") == 0) {
                struct slow_job j = { .command = SLOW_RESEAL, .has_sel = argc == 3 };

                if (argc != 1 && (argc != 3 || strcmp(argv[1], "--pcrs") != 0)) {
                        snprintf(err, err_size, "reseal: unexpected argument '%s' (usage: %s)", argv[1], usage);
                        return -EINVAL;
                }
                if (argc == 3 && tpm_pcr_selection_parse(argv[2], &j.sel) < 0) {
                        snprintf(err, err_size, "reseal --pcrs: '%s' is not a PCR selection (e.g. sha256:7, "
                                 "sha256:0,7, none)", argv[2]);
                        return -EINVAL;
                }
                return slow_submit(d, conn, &j, err, err_size);
        }
        if (strcmp(argv[0], "enroll") == 0) {
                struct slow_job j = { .command = SLOW_ENROLL };

                if (argc != 5) {
                        snprintf(err, err_size, "usage: tpmkmsctl enroll --subject SUBJECT --csr FILE");
                        return -EINVAL;
                }
                for (int i = 0; i < 5; i++)
                        snprintf(j.args[i], sizeof(j.args[i]), "%s", argv[i]);
                return slow_submit(d, conn, &j, err, err_size);
        }
        if (strcmp(argv[0], "sync") == 0)
                return cmd_sync(d, conn, err, err_size);
        /* purge */
        if (argc != 2) {
                snprintf(err, err_size, "usage: purge KEY_ID (a missing version; see tpmkmsctl status)");
                return -EINVAL;
        }
        struct slow_job j = { .command = SLOW_PURGE };

        if (strlen(argv[1]) >= sizeof(j.id)) {
                snprintf(err, err_size, "purge: not a key id of this cache (too long)");
                return -EINVAL;
        }
        snprintf(j.id, sizeof(j.id), "%s", argv[1]);
        return slow_submit(d, conn, &j, err, err_size);
}

/* The KMS socket: from systemd (LISTEN_FDS, named "kms" or the only one), or
 * our own at [kms] socket. */
static int daemon_kms_socket(struct daemon *d) {
        char **names = NULL;
        int n, fd = -1;

        n = sd_listen_fds_with_names(true, &names);
        if (n < 0)
                return log_error_errno(n, "Cannot read the sockets passed by systemd: %m");
        for (int i = 0; i < n; i++) {
                int cand = SD_LISTEN_FDS_START + i;
                bool named = names && names[i] && strcmp(names[i], "kms") == 0;
                if (fd < 0 && sd_is_socket_unix(cand, SOCK_STREAM, 1, NULL, 0) > 0 && (named || n == 1))
                        fd = cand;
                else
                        (void) close(cand);
        }
        for (int i = 0; names && i < n; i++)
                free(names[i]);
        free(names);
        if (fd >= 0) {
                log_info("Serving KMS v2 on the socket passed by systemd");
                return fd;
        }
        fd = unix_socket_listen(d->config->kms_socket, 0600);
        if (fd == -EADDRINUSE)
                return log_error_errno(fd, "Another tpmkmsd already serves %s; refusing to start a second one",
                                       d->config->kms_socket);
        if (fd < 0)
                return log_error_errno(fd, "Cannot listen on %s: %m", d->config->kms_socket);
        d->kms_socket_ours = true;
        log_info("Serving KMS v2 on %s", d->config->kms_socket);
        return fd;
}

static void on_drained(void *userdata) {
        struct daemon *d = userdata;
        (void) sd_event_exit(d->event, 0);
}

static int on_stop_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        struct daemon *d = userdata;

        if (!d->kms) {
                /* Still starting (waiting for the TPM): stop right away. */
                log_info("Received %s while starting: stopping", strsignal((int) si->ssi_signo));
                d->stop_requested = true;
                return 0;
        }
        log_info("Received %s, finishing in-flight requests", strsignal((int) si->ssi_signo));
        (void) sd_notify(false, "STOPPING=1\nSTATUS=Stopping");
        control_server_free(d->control);   /* waiting syncs are told, and dropped */
        d->control = NULL;
        kms_server_retry_parked(d->kms, UINT64_MAX);
        kms_server_shutdown(d->kms, on_drained, d);
        return 0;
}

/* After every event-loop iteration: the buffered log lines out, and the KMS
 * server's counters to the metrics thread. */
static int on_post(sd_event_source *s, void *userdata) {
        struct daemon *d = userdata;

        log_flush();
        if (d->metrics && d->kms) {
                struct kms_server_stats st;

                kms_server_get_stats(d->kms, &st);
                metrics_set_server_stats(d->metrics, &st);
        }
        return 0;
}

/* Once per audit window: the summary of a burst is written when it ends
 * (on_post flushes), not at the next request. */
static int on_audit_tick(sd_event_source *s, uint64_t usec, void *userdata) {
        return sd_event_source_set_time_relative(s, LOG_AUDIT_WINDOW_USEC);
}

static void kms_server_log(void *userdata, int prio, const struct peer_cred *peer, const char *msg) {
        if (peer)
                log_internal(prio, 0, "KMS socket: %s (peer uid=%u pid=%i)", msg,
                             (unsigned) peer->uid, (int) peer->pid);
        else
                log_internal(prio, 0, "KMS socket: %s", msg);
}

static void tpm_log(int prio, const char *msg) {
        log_internal(prio, 0, "TPM: %s", msg);
}

/* A key daemon must not leave its memory in a core file or to ptrace by
 * other processes of the same uid. */
static void harden_process(void) {
        (void) prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        (void) setrlimit(RLIMIT_CORE, &(struct rlimit) { 0, 0 });
        umask(0077);
}

/* vault_open on the worker, while the loop waits for it at most [tpm]
 * timeout and honours SIGTERM: a TPM that does not answer at start must not
 * hang the start (or the stop) for ever. */
struct open_job {
        struct vault *vault;
        const struct vault_options *options;
        bool make_first_key;
        struct keyring *keys;
        bool done;
        int r;
};

static int open_job_run(void *userdata) {
        struct open_job *j = userdata;

        return vault_open(j->vault, j->options, j->make_first_key, &j->keys);
}

static void open_job_done(void *userdata, int r) {
        struct open_job *j = userdata;

        j->r = r;
        j->done = true;
}

static int daemon_open_vault(struct daemon *d, const struct vault_options *opt, struct keyring **ret) {
        static struct open_job j;   /* outlives a start abandoned in the TPM */
        uint64_t deadline = now_usec(CLOCK_MONOTONIC) + d->config->tpm_timeout_usec;
        int r;

        j = (struct open_job) {
                .vault = &d->vault,
                .options = opt,
                .make_first_key = d->config->central_type == CENTRAL_NONE,
        };
        r = worker_submit(d->worker, open_job_run, open_job_done, &j);
        if (r < 0)
                return log_error_errno(r, "Cannot start opening the sealed cache: %m");
        while (!j.done && !d->stop_requested) {
                uint64_t now = now_usec(CLOCK_MONOTONIC);

                if (now >= deadline)
                        return log_error_errno(ETIMEDOUT, "The TPM at '%s' did not finish opening the sealed cache "
                                               "within %" PRIu64 " s ([tpm] timeout): is it answering? Exiting "
                                               "so that systemd restarts tpmkmsd", d->config->tpm_tcti,
                                               d->config->tpm_timeout_usec / USEC_PER_SEC);
                r = sd_event_run(d->event, deadline - now);
                if (r < 0)
                        return log_error_errno(r, "Event loop failed: %m");
                log_flush();
        }
        if (d->stop_requested)
                return 0;
        *ret = j.keys;
        return j.r;
}

int daemon_run(const struct config *c) {
        /* static: a worker stuck in the TPM may outlive this frame until exit */
        static struct daemon d;
        struct kms_server_options opt = {
                .allowed_uids = c->allowed_uids,
                .n_allowed_uids = c->n_allowed_uids,
        };
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        sigset_t mask;
        struct vault_options vopt;
        bool abandoned;
        sd_event_source *audit_tick = NULL;
        int r, fd, status = 1;

        d = (struct daemon) { .config = c };
        harden_process();
        /* Before any thread exists: threads inherit the mask, so SIGTERM
         * reaches only the event loop's signalfd, never the sync thread. */
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        (void) signal(SIGPIPE, SIG_IGN);
        /* tpm/ explains TPM failures through tpm_log; tpm2-tss's own stderr
         * lines would only repeat them without context. */
        (void) setenv("TSS2_LOG", "all+none", 0);
        tpm_set_log(tpm_log);
        d.started_usec = now_usec(CLOCK_REALTIME);
        keyring_slot_init(&d.keys);
        pthread_mutex_init(&d.state_lock, NULL);

        r = keyring_secure_heap_init();
        if (r < 0) {
                log_error_errno(r, "Cannot set up locked memory for keys (raise LimitMEMLOCK / ulimit -l): %m");
                goto out;
        }
        r = sd_event_default(&d.event);
        if (r < 0) {
                log_error_errno(r, "Cannot create the event loop: %m");
                goto out;
        }
        if (sd_event_add_signal(d.event, NULL, SIGTERM, on_stop_signal, &d) < 0 ||
            sd_event_add_signal(d.event, NULL, SIGINT, on_stop_signal, &d) < 0 ||
            sd_event_add_post(d.event, NULL, on_post, &d) < 0 ||
            sd_event_add_time_relative(d.event, &audit_tick, CLOCK_MONOTONIC, LOG_AUDIT_WINDOW_USEC, 0,
                                       on_audit_tick, NULL) < 0 ||
            sd_event_source_set_enabled(audit_tick, SD_EVENT_ON) < 0) {
                log_error("Cannot set up signal handling");
                goto out;
        }
        r = worker_new(d.event, &d.worker);
        if (r < 0)
                goto out;

        config_vault_options(c, &vopt);
        r = daemon_open_vault(&d, &vopt, &kr);
        if (r < 0 || d.stop_requested) {
                status = r < 0 ? 1 : 0;
                goto out;
        }
        if (!d.vault.refused) {
                keyring_slot_publish(&d.keys, kr);
                log_info("Unsealed %zu key(s) from %s", keyring_size(kr), c->state_dir);
        } else
                d.backend.refusal = d.vault.reason;
        d.backend.keys = &d.keys;
        if (vault_sealed_pcrs(&d.vault)) {
                d.sealed_pcrs = *vault_sealed_pcrs(&d.vault);
                d.have_sealed_pcrs = true;
        }
        identity_seen_copy(&d.vault, &d.identity_seen, &d.have_identity);

        /* A host whose cache was refused for measured boot does not fetch
         * keys from the central KMS either (DESIGN.md, "Measured boot"). */
        if (c->central_type == CENTRAL_KMIP && !d.vault.refused) {
                r = sync_new(c, &d.vault, &d.state_lock, &d.keys, d.event, on_sync_done, &d, &d.sync);
                if (r < 0)
                        goto out;
                d.backend.sync = d.sync;
        }
        if (c->metrics_listen[0]) {
                r = metrics_new(&(struct metrics_sources) {
                                        .config = c,
                                        .keys = &d.keys,
                                        .sync = d.sync,
                                        .refusal_cause = d.vault.refused ? d.vault.refusal_cause : NULL,
                                        .started_usec = d.started_usec,
                                }, &d.metrics);
                if (r < 0)
                        goto out;
                d.backend.metrics = d.metrics;
        }
        /* Pings the watchdog from the loop when WATCHDOG_USEC is set: a
         * wedged loop stops the pings and systemd restarts us. */
        (void) sd_event_set_watchdog(d.event, true);

        r = kms_server_new(d.event, &opt, &backend_ops, &d.backend, &d.kms);
        if (r < 0) {
                log_error_errno(r, "Cannot create the KMS server: %m");
                goto out;
        }
        kms_server_set_log(d.kms, kms_server_log, NULL);
        if (d.metrics)
                kms_server_set_call_observer(d.kms, metrics_observe_call, d.metrics);
        fd = daemon_kms_socket(&d);
        if (fd < 0)
                goto out;
        r = kms_server_add_listener(d.kms, fd);
        if (r < 0) {
                log_error_errno(r, "Cannot serve the KMS socket: %m");
                goto out;
        }
        r = control_server_new(d.event, c->control_socket, daemon_control, &d, &d.control);
        if (r < 0) {
                log_error_errno(r, "Cannot listen on the control socket %s: %m", c->control_socket);
                goto out;
        }

        if (c->central_type == CENTRAL_KMIP) {
                daemon_check_identity(&d);
                r = sd_event_add_time_relative(d.event, &d.identity_timer, CLOCK_REALTIME, USEC_PER_DAY, 0,
                                               on_identity_timer, &d);
                if (r < 0) {
                        log_error_errno(r, "Cannot set up the daily certificate check: %m");
                        goto out;
                }
        }

        (void) sd_notify(false, "READY=1");
        daemon_update_status(&d);
        log_flush();
        r = sd_event_loop(d.event);
        if (r < 0) {
                log_error_errno(r, "Event loop failed: %m");
                goto out;
        }
        status = 0;
        log_info("Stopped");
out:
        metrics_free(d.metrics);   /* first: its thread reads the keys and the sync state */
        sd_event_source_unref(d.identity_timer);
        control_server_free(d.control);
        kms_server_free(d.kms);
        if (d.kms_socket_ours)
                (void) unlink(c->kms_socket);
        /* A thread stuck in the TPM is left to end with the process: what it
         * uses (the vault, the keys, the lock) is not freed under it. */
        abandoned = !sync_free(d.sync, c->central_timeout_usec + 2 * USEC_PER_SEC);
        abandoned |= !worker_free(d.worker, 2 * USEC_PER_SEC);
        if (!abandoned) {
                keyring_slot_done(&d.keys);
                pthread_mutex_destroy(&d.state_lock);
                vault_done(&d.vault);
                sd_event_source_unref(audit_tick);
                sd_event_unref(d.event);
        }
        log_audit_flush(0, true);
        log_flush();
        return status;
}
