/* tpmkmsctl doctor (see doctor.h). The daemon is asked through the control
 * socket (its status --json, agent/status.c); the KMS socket, the TPM, the
 * central KMS endpoints and the client certificate are checked from here,
 * so that the answers hold with the daemon stopped too. */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "config.h"
#include "control.h"
#include "doctor.h"
#include "identity.h"
#include "keystore.h"
#include "kmip.h"
#include "macro.h"
#include "tpm.h"
#include "util.h"

#define FINDINGS_MAX (8 + CENTRAL_ENDPOINTS_MAX)
#define STATUS_REPLY_MAX (1u << 20)         /* status --json is a few KiB per key: refuse more */
#define JSON_DEPTH_MAX 8
#define TPM_PROBE_MAX_USEC (10 * USEC_PER_SEC)  /* doctor never waits longer on a TPM */
#define TPM_BUSY_TRIES 5                    /* status polls, 1 s apart, for a busy TPM to be idle */
#define SOCKET_MODE_MAX 0660
#define CLOCK_SKEW_WARN_SEC 60              /* TLS validity and key dates depend on the clocks */
#define CERT_WARN_DAYS IDENTITY_EXPIRY_WARN_DAYS

enum level {
        LEVEL_OK,
        LEVEL_WARNING,
        LEVEL_FAILURE,
};

static const char *const level_names[] = { "ok", "warning", "failure" };

struct finding {
        char check[320];     /* "daemon", "central 10.0.0.5:5696", ... */
        enum level level;
        char detail[1024];
        char action[512];    /* what to do; "" when ok */
        double latency_ms;   /* endpoint findings: the probe's request; < 0 none */
};

struct doctor {
        const struct config *config;
        struct finding findings[FINDINGS_MAX];
        size_t n;
        char *status;        /* the daemon's status --json; NULL: it does not answer */
        bool serving;        /* it answers and serves (not refused) */
};

static struct finding *add(struct doctor *d, enum level level, const char *check, const char *action,
                           const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static struct finding *add(struct doctor *d, enum level level, const char *check, const char *action,
                           const char *fmt, ...) {
        struct finding *f;
        va_list ap;

        /* FINDINGS_MAX counts every check once; the last slot takes any
         * excess rather than losing a failure. */
        f = &d->findings[d->n < FINDINGS_MAX ? d->n++ : FINDINGS_MAX - 1];
        *f = (struct finding) { .level = level, .latency_ms = -1 };
        snprintf(f->check, sizeof(f->check), "%s", check);
        snprintf(f->action, sizeof(f->action), "%s", action ? action : "");
        va_start(ap, fmt);
        (void) vsnprintf(f->detail, sizeof(f->detail), fmt, ap);
        va_end(ap);
        return f;
}

/* ---- reading status --json ------------------------------------------------
 *
 * Enough JSON to take scalar members out of the one object agent/status.c
 * writes: bounded in depth, and never trusting the text to be well formed
 * (a malformed reply reads as members that are absent). */

static const char *json_ws(const char *p) {
        while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')
                p++;
        return p;
}

/* p at '"': the end of the string, or NULL. */
static const char *json_skip_string(const char *p) {
        for (p++; *p && *p != '"'; p++)
                if (*p == '\\' && !*++p)
                        return NULL;
        return *p == '"' ? p + 1 : NULL;
}

/* The end of the value at p, or NULL when it is malformed or too deep. */
static const char *json_skip(const char *p, unsigned depth) {
        const char *start;
        char close;

        p = json_ws(p);
        if (*p == '"')
                return json_skip_string(p);
        if (*p != '{' && *p != '[') {
                for (start = p; *p && strchr("+-.0123456789eEtrufalsn", *p); p++)
                        ;
                return p > start ? p : NULL;
        }
        if (depth >= JSON_DEPTH_MAX)
                return NULL;
        close = *p == '{' ? '}' : ']';
        p = json_ws(p + 1);
        if (*p == close)
                return p + 1;
        for (;;) {
                if (close == '}') {
                        if (*p != '"' || !(p = json_skip_string(p)))
                                return NULL;
                        p = json_ws(p);
                        if (*p++ != ':')
                                return NULL;
                }
                if (!(p = json_skip(p, depth + 1)))
                        return NULL;
                p = json_ws(p);
                if (*p == close)
                        return p + 1;
                if (*p != ',')
                        return NULL;
                p = json_ws(p + 1);
        }
}

/* The value of member path ("central.staleness_seconds") of the object at
 * json, or NULL. Member names are compared as written (status.c's have no
 * escapes). */
static const char *json_find(const char *json, const char *path) {
        const char *p = json_ws(json);

        for (;;) {
                size_t len = strcspn(path, ".");
                const char *found = NULL;

                if (*p != '{')
                        return NULL;
                p = json_ws(p + 1);
                while (*p != '}') {
                        const char *name = p + 1, *end;

                        if (*p != '"' || !(end = json_skip_string(p)))
                                return NULL;
                        p = json_ws(end);
                        if (*p++ != ':')
                                return NULL;
                        p = json_ws(p);
                        if ((size_t) (end - 1 - name) == len && memcmp(name, path, len) == 0) {
                                found = p;
                                break;
                        }
                        if (!(p = json_skip(p, 1)))
                                return NULL;
                        p = json_ws(p);
                        if (*p == ',')
                                p = json_ws(p + 1);
                        else if (*p != '}')
                                return NULL;
                }
                if (!found)
                        return NULL;
                if (path[len] != '.')
                        return found;
                path += len + 1;
                p = found;
        }
}

/* The scalar at p into out: a string unescaped (a \u escape outside ASCII
 * becomes '?': these are messages), anything else as written. Returns 0,
 * -ENOENT (p NULL), -EBADMSG, or -ENOBUFS (out holds what fitted). */
static int json_scalar(const char *p, char *out, size_t size) {
        const char *end;
        size_t n = 0;

        out[0] = '\0';
        if (!p)
                return -ENOENT;
        if (!(end = json_skip(p, JSON_DEPTH_MAX)))
                return -EBADMSG;
        if (*p != '"') {
                if (*p == '{' || *p == '[' || (size_t) (end - p) >= size)
                        return -EBADMSG;
                memcpy(out, p, (size_t) (end - p));
                out[end - p] = '\0';
                return 0;
        }
        for (p++; p < end - 1; p++) {
                char ch = *p;

                if (ch == '\\') {
                        ch = *++p;
                        if (ch == 'n' || ch == 't' || ch == 'r')
                                ch = ' ';
                        else if (ch == 'u') {
                                unsigned v = 0;
                                if (sscanf(p + 1, "%4x", &v) != 1 || end - p < 5)
                                        return -EBADMSG;
                                ch = v >= 0x20 && v < 0x7f ? (char) v : '?';
                                p += 4;
                        }
                }
                if (n + 1 >= size) {
                        out[n] = '\0';
                        return -ENOBUFS;
                }
                out[n++] = ch;
        }
        out[n] = '\0';
        return 0;
}

static int status_string(const struct doctor *d, const char *path, char *out, size_t size) {
        return json_scalar(d->status ? json_find(d->status, path) : NULL, out, size);
}

/* A number member; -1 when absent or not a number. */
static double status_number(const struct doctor *d, const char *path) {
        char buf[64], *end;
        double v;

        if (status_string(d, path, buf, sizeof(buf)) < 0)
                return -1;
        errno = 0;
        v = strtod(buf, &end);
        return errno == 0 && end != buf && *end == '\0' && v >= 0 && v < 1e15 ? v : -1;
}

/* ---- the daemon ------------------------------------------------------------ */

static int fetch_status(struct doctor *d, char *err, size_t err_size) {
        _cleanup_free_ char *reply = NULL;
        size_t len = 0;
        FILE *f;
        int r;

        free(d->status);
        d->status = NULL;
        f = open_memstream(&reply, &len);
        if (!f) {
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        r = control_call(d->config->control_socket, 2, (char *[]) { (char *) "status", (char *) "--json", NULL },
                         f, err, err_size);
        if (fclose(f) != 0 && r >= 0) {
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        if (r < 0)
                return r;
        if (!reply || len > STATUS_REPLY_MAX || strlen(reply) != len || !json_skip(reply, 0)) {
                errorf(err, err_size, "tpmkmsd's status --json is not one JSON object");
                return -EBADMSG;
        }
        d->status = TAKE_PTR(reply);
        return 0;
}

static void check_daemon(struct doctor *d) {
        char err[512], state[16], healthz[512], primary[KEY_ID_MAX];
        int r;

        r = fetch_status(d, err, sizeof(err));
        if (r < 0) {
                add(d, LEVEL_FAILURE, "daemon",
                    "start tpmkmsd (systemctl start tpmkmsd); if it exits, journalctl -u tpmkmsd -b says why "
                    "(docs/runbook.md, 'Triage')",
                    "tpmkmsd does not answer on %s: %s", d->config->control_socket, err);
                return;
        }
        (void) status_string(d, "state", state, sizeof(state));
        (void) status_string(d, "healthz", healthz, sizeof(healthz));
        (void) status_string(d, "primary", primary, sizeof(primary));
        if (strcmp(state, "refused") == 0) {
                add(d, LEVEL_FAILURE, "daemon", "docs/runbook.md, 'Recovery of a refused host'",
                    "the sealed cache is refused; Status answers the apiserver: %s", healthz);
                return;
        }
        d->serving = strcmp(state, "serving") == 0;
        if (!d->serving)
                add(d, LEVEL_FAILURE, "daemon", "docs/runbook.md, 'Triage'",
                    "tpmkmsd answers, but with no state doctor knows ('%s')", state);
        else if (strcmp(healthz, "ok") != 0)
                add(d, LEVEL_FAILURE, "daemon", "docs/runbook.md, 'Triage'",
                    "serving, but Status answers the apiserver: %s", healthz);
        else
                add(d, LEVEL_OK, "daemon", NULL, "serving, healthz ok, primary %s", *primary ? primary : "-");
}

/* ---- the KMS socket --------------------------------------------------------- */

static bool uid_allowed(const struct config *c, uid_t uid) {
        for (size_t i = 0; i < c->n_allowed_uids; i++)
                if (c->allowed_uids[i] == uid)
                        return true;
        return false;
}

/* Whether uid may connect to a socket file with st's owner and mode:
 * connect(2) needs write permission on it. */
static bool uid_can_open(uid_t uid, const struct stat *st) {
        const struct passwd *pw;
        gid_t groups[64];
        int n = (int) ARRAY_SIZE(groups);

        if (uid == 0)
                return true;
        if (uid == st->st_uid)
                return st->st_mode & S_IWUSR;
        pw = getpwuid(uid);
        if (pw && getgrouplist(pw->pw_name, pw->pw_gid, groups, &n) >= 0)
                for (int i = 0; i < n; i++)
                        if (groups[i] == st->st_gid)
                                return st->st_mode & S_IWGRP;
        return st->st_mode & S_IWOTH;
}

static int socket_connect(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;

        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        memcpy(sa.sun_path, path, strlen(path) + 1);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        return connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0 ? -errno : 0;
}

static void check_kms_socket(struct doctor *d) {
        const struct config *c = d->config;
        char uids[CONFIG_MAX_UIDS * 12] = "", blocked[CONFIG_MAX_UIDS * 12] = "", conn[160];
        struct stat st;
        mode_t mode;
        int r;

        if (lstat(c->kms_socket, &st) < 0) {
                add(d, LEVEL_FAILURE, "kms-socket", "start tpmkmsd: it creates the socket ([kms] socket)",
                    "%s: %s", c->kms_socket, strerror(errno));
                return;
        }
        if (!S_ISSOCK(st.st_mode)) {
                add(d, LEVEL_FAILURE, "kms-socket", "move the file away and restart tpmkmsd",
                    "%s is not a socket", c->kms_socket);
                return;
        }
        mode = st.st_mode & 07777;
        for (size_t i = 0; i < c->n_allowed_uids; i++) {
                (void) strappendf(uids, sizeof(uids), "%s%u", i ? "," : "", (unsigned) c->allowed_uids[i]);
                if (!uid_can_open(c->allowed_uids[i], &st))
                        (void) strappendf(blocked, sizeof(blocked), "%s%u", *blocked ? "," : "",
                                          (unsigned) c->allowed_uids[i]);
        }
        if (st.st_uid != 0 && !uid_allowed(c, st.st_uid)) {
                add(d, LEVEL_FAILURE, "kms-socket",
                    "restart tpmkmsd (it makes the socket root-owned, 0600); give the apiserver access "
                    "through [kms] allowed_uids and the socket's group, never its owner",
                    "%s is owned by uid %u, which is not in [kms] allowed_uids (%s): that user can change "
                    "its mode or replace it", c->kms_socket, (unsigned) st.st_uid, uids);
                return;
        }
        if (*blocked) {
                add(d, LEVEL_FAILURE, "kms-socket",
                    "the apiserver's uid must be able to open the socket: chgrp it to a group of that uid "
                    "and chmod 0660, or run the apiserver as an owner the mode allows",
                    "uid(s) %s of [kms] allowed_uids cannot open %s (owner %u, group %u, mode %04o)", blocked,
                    c->kms_socket, (unsigned) st.st_uid, (unsigned) st.st_gid, (unsigned) mode);
                return;
        }

        /* A connection from a uid that is not allowed counts as refused
         * (tpmkms_connections_refused_total, an alert): only when ours is. */
        if (uid_allowed(c, geteuid())) {
                r = socket_connect(c->kms_socket);
                if (r < 0) {
                        add(d, LEVEL_FAILURE, "kms-socket",
                            r == -ECONNREFUSED ? "nothing listens on it (a stale file): start tpmkmsd"
                                               : "restart tpmkmsd",
                            "connect %s: %s", c->kms_socket, strerror(-r));
                        return;
                }
                snprintf(conn, sizeof(conn), "accepts connections");
        } else
                snprintf(conn, sizeof(conn), "not connected to (uid %u is not in allowed_uids)",
                         (unsigned) geteuid());
        if (mode & ~SOCKET_MODE_MAX)
                add(d, LEVEL_WARNING, "kms-socket", "chmod 0660 (or 0600) the socket; only allowed_uids are served",
                    "%s has mode %04o, wider than %04o; %s", c->kms_socket, (unsigned) mode, SOCKET_MODE_MAX, conn);
        else
                add(d, LEVEL_OK, "kms-socket", NULL, "%s %s; owner %u, mode %04o; allowed uids %s",
                    c->kms_socket, conn, (unsigned) st.st_uid, (unsigned) mode, uids);
}

/* ---- the TPM and measured boot ------------------------------------------- */

struct tpm_answer {
        int r;
        struct tpm_pcr_values values;
};

/* tpm_open and tpm_pcr_read in a child, killed at the deadline: a TPM that
 * does not answer must not hang doctor. Returns 0, the TPM's negative
 * errno (tpm.h), or -ETIMEDOUT. */
static int tpm_read_bounded(const struct config *c, const struct tpm_pcr_selection *sel, uint64_t timeout_usec,
                            struct tpm_pcr_values *ret) {
        uint64_t deadline = now_usec(CLOCK_MONOTONIC) + timeout_usec;
        struct tpm_answer a = { .r = -EIO };
        size_t got = 0;
        int fds[2], r = 0;
        pid_t pid;

        if (pipe2(fds, O_CLOEXEC) < 0)
                return -errno;
        pid = fork();
        if (pid < 0) {
                r = -errno;
                close(fds[0]);
                close(fds[1]);
                return r;
        }
        if (pid == 0) {
                struct tpm *t = NULL;

                close(fds[0]);
                a.r = tpm_open(c->tpm_tcti, NULL, &t);
                if (a.r >= 0)
                        a.r = tpm_pcr_read(t, sel, &a.values);
                tpm_close(t);
                _exit(write_all(fds[1], &a, sizeof(a)) < 0);
        }
        close(fds[1]);
        while (got < sizeof(a)) {
                uint64_t now = now_usec(CLOCK_MONOTONIC);
                struct pollfd p = { .fd = fds[0], .events = POLLIN };
                ssize_t k;

                if (now >= deadline) {
                        r = -ETIMEDOUT;
                        break;
                }
                k = poll(&p, 1, (int) ((deadline - now + 999) / 1000));
                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0) {
                        r = k < 0 ? -errno : -ETIMEDOUT;
                        break;
                }
                k = read(fds[0], (uint8_t *) &a + got, sizeof(a) - got);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0) {
                        r = -EIO;
                        break;
                }
                got += (size_t) k;
        }
        close(fds[0]);
        if (r < 0)
                (void) kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                ;
        if (r < 0)
                return r;
        if (a.r >= 0)
                *ret = a.values;
        return a.r;
}

/* "7, 8" of the PCRs whose values differ between a and b (same selection). */
static void pcrs_differing(const struct tpm_pcr_values *a, const struct tpm_pcr_values *b, char *out, size_t size) {
        size_t k = 0;

        out[0] = '\0';
        for (unsigned pcr = 0; pcr < TPM_PCR_MAX && k < a->count; pcr++) {
                if (!(a->sel.mask & (UINT32_C(1) << pcr)))
                        continue;
                if (k >= b->count || memcmp(a->digest[k], b->digest[k], a->digest_size) != 0)
                        (void) strappendf(out, size, "%s%u", *out ? ", " : "", pcr);
                k++;
        }
}

static void check_measured_boot(struct doctor *d, bool have_sealed, const struct tpm_pcr_values *sealed,
                                const struct tpm_pcr_values *now) {
        char differ[96], s1[TPM_PCR_MAX * 140], s2[TPM_PCR_MAX * 140];

        if (!have_sealed)
                return;
        pcrs_differing(sealed, now, differ, sizeof(differ));
        (void) tpm_pcr_values_format(sealed, s1, sizeof(s1));
        (void) tpm_pcr_values_format(now, s2, sizeof(s2));
        if (!*differ)
                add(d, LEVEL_OK, "measured-boot", NULL, "the PCRs match the values the cache is sealed to (%s)", s1);
        else if (d->serving)
                add(d, LEVEL_WARNING, "measured-boot",
                    "planned (a firmware or kernel update): tpmkmsctl reseal now, then [tpm] pcrs "
                    "(docs/runbook.md, 'Re-seal after a firmware or kernel update'); unplanned: treat the host "
                    "as compromised",
                    "PCR(s) %s changed after tpmkmsd started: the next start refuses the cache (sealed %s, now %s)",
                    differ, s1, s2);
        else
                add(d, LEVEL_FAILURE, "measured-boot", "docs/runbook.md, 'Recovery of a refused host'",
                    "measured boot mismatch: PCR(s) %s differ from the values the cache is sealed to "
                    "(sealed %s, now %s)", differ, s1, s2);
}

static void check_tpm(struct doctor *d) {
        const struct config *c = d->config;
        uint64_t timeout = c->tpm_timeout_usec < TPM_PROBE_MAX_USEC ? c->tpm_timeout_usec : TPM_PROBE_MAX_USEC;
        struct tpm_pcr_values sealed = {}, now = {};
        const struct tpm_pcr_selection *sel = &c->pcrs;
        char tpm[64] = "", err[256];
        bool have_sealed;
        uint64_t t0;
        int r;

        /* One client at a time (tpm_open's lock, swtpm): open the TPM only
         * while the daemon is not using it. */
        for (int i = 0; d->status && i < TPM_BUSY_TRIES; i++) {
                (void) status_string(d, "tpm", tpm, sizeof(tpm));
                if (strcmp(tpm, "in use") != 0)
                        break;
                sleep(1);
                if (fetch_status(d, err, sizeof(err)) < 0)
                        break;
        }
        if (strncmp(tpm, "not answering", 13) == 0) {
                add(d, LEVEL_FAILURE, "tpm",
                    "the keys keep serving from memory; check the TPM (dmesg, /dev/tpmrm0, the tcti) and "
                    "restart tpmkmsd once it answers (docs/runbook.md, 'Triage')",
                    "tpmkmsd's TPM command sequence is %s (%s)", tpm, c->tpm_tcti);
                return;
        }
        if (strcmp(tpm, "in use") == 0) {
                add(d, LEVEL_WARNING, "tpm", "run tpmkmsctl doctor again",
                    "tpmkmsd was using the TPM throughout %d s: not probed", TPM_BUSY_TRIES);
                return;
        }

        r = vault_sealed_values(c->state_dir, &sealed);
        have_sealed = r >= 0;
        if (have_sealed)
                sel = &sealed.sel;
        else if (r != -ENOENT)
                add(d, LEVEL_WARNING, "measured-boot", "docs/runbook.md, 'Recovery of a refused host'",
                    "cannot read the PCR values the cache in %s is sealed to: %s", c->state_dir, strerror(-r));

        t0 = now_usec(CLOCK_MONOTONIC);
        r = tpm_read_bounded(c, sel, timeout, &now);
        if (r == -ETIMEDOUT) {
                add(d, LEVEL_FAILURE, "tpm",
                    "check the TPM (dmesg, /dev/tpmrm0, the tcti); tpmkmsd keeps serving from memory, but "
                    "cannot start or re-seal until it answers",
                    "no answer from the TPM at %s within %" PRIu64 " s", c->tpm_tcti, timeout / USEC_PER_SEC);
                return;
        }
        if (r < 0) {
                add(d, LEVEL_FAILURE, "tpm",
                    r == -ENODEV ? "check the TPM device (/dev/tpmrm0, its permissions) and [tpm] tcti"
                                 : "check the TPM (journalctl -k, tpm2_getcap properties-variable)",
                    "the TPM at %s: %s", c->tpm_tcti,
                    r == -ENODEV ? "no TPM answers" : r == -ENOLCK ? "in dictionary-attack lockout" : strerror(-r));
                return;
        }
        add(d, LEVEL_OK, "tpm", NULL, "the TPM at %s answers (%.0f ms)", c->tpm_tcti,
            (now_usec(CLOCK_MONOTONIC) - t0) / 1000.0);
        check_measured_boot(d, have_sealed, &sealed, &now);
}

/* ---- the cache and the central KMS ------------------------------------------ */

static void check_cache(struct doctor *d) {
        char path[PATH_MAX + sizeof(CACHE_FILE_NAME) + 1], rotated[32];
        uint64_t now = now_usec(CLOCK_REALTIME), mtime;
        struct stat st;

        snprintf(path, sizeof(path), "%s/%s", d->config->state_dir, CACHE_FILE_NAME);
        if (stat(path, &st) < 0) {
                add(d, errno == ENOENT && !d->status ? LEVEL_WARNING : LEVEL_FAILURE, "cache",
                    errno == ENOENT ? "a first start makes one; a host that had one: docs/runbook.md, "
                                      "'Recovery of a refused host'" : "check the state dir's permissions",
                    "%s: %s", path, strerror(errno));
                return;
        }
        mtime = (uint64_t) st.st_mtim.tv_sec * USEC_PER_SEC + (uint64_t) st.st_mtim.tv_nsec / 1000;
        (void) status_string(d, "last_rotation", rotated, sizeof(rotated));
        add(d, LEVEL_OK, "cache", NULL, "%s last written %" PRIu64 " s ago%s%s", path,
            now > mtime ? (now - mtime) / USEC_PER_SEC : 0, *rotated ? "; last rotation " : "", rotated);
}

static void check_central_sync(struct doctor *d) {
        double age = status_number(d, "central.staleness_seconds");
        double max = status_number(d, "central.max_staleness_seconds");
        char last[32], error[512];

        if (!d->serving)
                return;
        (void) status_string(d, "central.last_sync", last, sizeof(last));
        (void) status_string(d, "central.last_error", error, sizeof(error));
        if (!*last)
                add(d, LEVEL_WARNING, "central-sync", "docs/runbook.md, 'Central KMS unreachable'",
                    "no successful sync since tpmkmsd started%s%s", *error ? ": " : "", error);
        else if (max > 0 && age > max)
                add(d, LEVEL_FAILURE, "central-sync", "docs/runbook.md, 'Central KMS unreachable'",
                    "last sync %s, %.0f s ago: over max_staleness (%.0f s), nothing is served", last, age, max);
        else if (max > 0 && age > 0.75 * max)
                add(d, LEVEL_WARNING, "central-sync", "docs/runbook.md, 'Central KMS unreachable'",
                    "last sync %s, %.0f s ago: near max_staleness (%.0f s)%s%s", last, age, max,
                    *error ? "; " : "", error);
        else if (*error)
                add(d, LEVEL_WARNING, "central-sync", "docs/runbook.md, 'Central KMS unreachable'",
                    "last sync %s (%.0f s ago), the latest attempt failed: %s", last, age, error);
        else
                add(d, LEVEL_OK, "central-sync", NULL, "last sync %s (%.0f s ago)", last, age);
}

static void check_certificate(struct doctor *d) {
        const struct config *c = d->config;
        uint64_t not_after;
        int64_t days;
        char t[32];
        int r;

        r = identity_cert_not_after(c->cert_file, &not_after);
        if (r < 0) {
                add(d, LEVEL_FAILURE, "client-certificate",
                    "install the certificate the fleet CA signed ([central] cert_file; tpmkmsctl enroll makes the CSR)",
                    "%s: %s", c->cert_file, r == -EINVAL ? "no readable certificate" : strerror(-r));
                return;
        }
        days = identity_days_left(not_after, now_usec(CLOCK_REALTIME));
        format_utc(not_after, t, sizeof(t));
        if (not_after <= now_usec(CLOCK_REALTIME))
                add(d, LEVEL_FAILURE, "client-certificate",
                    "renew now: tpmkmsctl enroll --force makes a new key and CSR; install the signed certificate "
                    "as [central] cert_file",
                    "%s expired on %s: the central KMS refuses every sync", c->cert_file, t);
        else if (days < CERT_WARN_DAYS)
                add(d, LEVEL_WARNING, "client-certificate",
                    "renew it: tpmkmsctl enroll --force makes the CSR; install the signed certificate as "
                    "[central] cert_file",
                    "%s expires on %s, in %" PRId64 " day(s)", c->cert_file, t, days);
        else
                add(d, LEVEL_OK, "client-certificate", NULL, "%s expires on %s (%" PRId64 " days)", c->cert_file, t,
                    days);
}

static const char *probe_action(const struct central_probe_result *p, int r) {
        switch (p->failed) {
        case CENTRAL_PROBE_SETUP:
                return "fix [central] ca_file, cert_file or key_file (the error names the file)";
        case CENTRAL_PROBE_RESOLVE:
                return "the name does not resolve: check DNS (/etc/resolv.conf) or [central] endpoints";
        case CENTRAL_PROBE_CONNECT:
                return r == -ECONNREFUSED ? "nothing listens there: start the central KMS, or fix the port in "
                                            "[central] endpoints (docs/runbook.md, 'Central KMS unreachable')"
                                          : "no route or a firewall drops the packets: check the network path "
                                            "(docs/runbook.md, 'Central KMS unreachable')";
        case CENTRAL_PROBE_HANDSHAKE:
                return r == -EKEYREJECTED ? "the server's certificate fails verification: fix [central] ca_file "
                                            "or the endpoint name (it must match the certificate)"
                                          : "the TLS handshake failed: check that the server accepts our client "
                                            "certificate (clientAuth, signed by its CA, not expired)";
        default:
                return "the server did not answer a KMIP request: is it a KMIP server, and is it healthy?";
        }
}

static void check_endpoint(struct doctor *d, const struct central_options *opt, size_t i, bool tpm_bound) {
        const struct central_endpoint *e = &opt->endpoints[i];
        struct central_probe_result p;
        char check[300], err[640], expiry[200] = "", skew[96] = "";
        const char *action = NULL;
        struct finding *f;
        int64_t days = 0;
        int r;

        snprintf(check, sizeof(check), strchr(e->host, ':') ? "central [%s]:%u" : "central %s:%u", e->host,
                 (unsigned) e->port);
        r = central_probe(opt, i, &p, err, sizeof(err));
        if (p.server_not_after_usec) {
                days = identity_days_left(p.server_not_after_usec, now_usec(CLOCK_REALTIME));
                snprintf(expiry, sizeof(expiry), ", server certificate %s%s, expires in %" PRId64 " days",
                         strcmp(p.server_verify, "ok") == 0 ? "verified" : "failed verification: ",
                         strcmp(p.server_verify, "ok") == 0 ? "" : p.server_verify, days);
        }
        if (r < 0 && tpm_bound && p.failed == CENTRAL_PROBE_HANDSHAKE && strcmp(p.server_verify, "ok") == 0) {
                /* Only tpmkmsd can sign with a TPM-bound key: the server's
                 * side is verified, ours is what the daemon's syncs show. */
                add(d, days < CERT_WARN_DAYS ? LEVEL_WARNING : LEVEL_OK, check,
                    days < CERT_WARN_DAYS ? "renew the central KMS's server certificate" : NULL,
                    "%s connected in %.1f ms%s; client authentication not probed (the client key is TPM-bound: "
                    "see central-sync)", p.address, p.connect_usec / 1000.0, expiry);
                return;
        }
        if (r < 0) {
                add(d, LEVEL_FAILURE, check, probe_action(&p, r), "%s failed%s%s: %s",
                    central_probe_step_to_string(p.failed), *p.address ? " at " : "", p.address, err);
                return;
        }
        if (p.server_time_usec) {
                double s = ((double) p.server_time_usec - (double) p.local_time_usec) / USEC_PER_SEC;
                snprintf(skew, sizeof(skew), "; clock skew %+.0f s", s);
                if (s > CLOCK_SKEW_WARN_SEC || s < -CLOCK_SKEW_WARN_SEC)
                        action = "the clocks differ: check NTP on both sides (timedatectl); certificate "
                                 "validity and key dates depend on them";
        }
        if (days < CERT_WARN_DAYS)
                action = "the central KMS's server certificate expires soon: have it renewed";
        f = add(d, action ? LEVEL_WARNING : LEVEL_OK, check, action,
                "%s: connect %.1f ms, TLS handshake %.1f ms (%s%s), request answered in %.1f ms%s", p.address,
                p.connect_usec / 1000.0, p.handshake_usec / 1000.0, p.protocol, expiry, p.request_usec / 1000.0, skew);
        f->latency_ms = p.request_usec / 1000.0;
}

static void check_central(struct doctor *d) {
        const struct config *c = d->config;
        struct central_options opt;
        struct identity_info id;

        if (c->central_type != CENTRAL_KMIP)
                return;
        check_certificate(d);
        identity_inspect(c, NULL, &id);
        config_central_options(c, &opt);
        if (id.tpm_bound) {
                opt.cert_file = NULL;
                opt.key_file = NULL;
        }
        for (size_t i = 0; i < opt.n_endpoints; i++)
                check_endpoint(d, &opt, i, id.tpm_bound);
        check_central_sync(d);
}

/* ---- output ------------------------------------------------------------------ */

static void print_json(const struct doctor *d, enum level worst, FILE *out) {
        fprintf(out, "{\"status\": \"%s\", \"findings\": [", level_names[worst]);
        for (size_t i = 0; i < d->n; i++) {
                const struct finding *f = &d->findings[i];

                fputs(i ? ", {\"check\": " : "{\"check\": ", out);
                json_string(out, f->check);
                fprintf(out, ", \"status\": \"%s\", \"detail\": ", level_names[f->level]);
                json_string(out, f->detail);
                fputs(", \"action\": ", out);
                json_string(out, f->action);
                if (f->latency_ms >= 0)
                        fprintf(out, ", \"latency_ms\": %.1f", f->latency_ms);
                fputs("}", out);
        }
        fputs("]}\n", out);
}

static void print_text(const struct doctor *d, enum level worst, FILE *out) {
        static const char *const tags[] = { "ok     ", "WARNING", "FAILURE" };
        size_t counts[3] = {};

        for (size_t i = 0; i < d->n; i++) {
                const struct finding *f = &d->findings[i];

                counts[f->level]++;
                fprintf(out, "%s  %s: %s\n", tags[f->level], f->check, f->detail);
                if (*f->action)
                        fprintf(out, "         what to do: %s\n", f->action);
        }
        fprintf(out, "%s: %zu failure(s), %zu warning(s)\n", worst == LEVEL_OK ? "healthy" : level_names[worst],
                counts[LEVEL_FAILURE], counts[LEVEL_WARNING]);
}

int doctor_run(const struct config *c, bool json, FILE *out) {
        struct doctor d = { .config = c };
        enum level worst = LEVEL_OK;

        check_daemon(&d);
        check_kms_socket(&d);
        check_tpm(&d);
        check_cache(&d);
        check_central(&d);
        free(d.status);

        for (size_t i = 0; i < d.n; i++)
                if (d.findings[i].level > worst)
                        worst = d.findings[i].level;
        if (json)
                print_json(&d, worst, out);
        else
                print_text(&d, worst, out);
        return (int) worst;
}
