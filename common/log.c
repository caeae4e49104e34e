#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <systemd/sd-journal.h>

#include "log.h"
#include "socket.h"
#include "util.h"

static int log_max_prio = LOG_INFO;
static bool log_to_journal;
static char stderr_buffer[64 * 1024];

/* systemd sets JOURNAL_STREAM=dev:inode when stderr is connected to the
 * journal (systemd.exec(5)); only then are structured records worth sending. */
static bool stderr_is_journal(void) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;

        if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
                return false;
        if (fstat(STDERR_FILENO, &st) < 0)
                return false;
        return st.st_dev == dev && st.st_ino == ino;
}

void log_setup(int max_prio) {
        log_max_prio = max_prio;
        log_to_journal = stderr_is_journal();
        /* Audit records arrive at request rate: buffer them and write once per
         * event-loop iteration (log_flush) rather than once per record. */
        if (!log_to_journal)
                setvbuf(stderr, stderr_buffer, _IOFBF, sizeof(stderr_buffer));
}

void log_flush(void) {
        log_audit_flush(now_usec(CLOCK_MONOTONIC), false);
        fflush(stderr);
}

static const char *prio_name(int prio) {
        static const char *const names[] = {
                "emerg", "alert", "crit", "error", "warning", "notice", "info", "debug",
        };
        return names[prio & 7];
}

static void log_emit(int prio, int error, const char *msg) {
        if (log_to_journal) {
                int r = error
                        ? sd_journal_send("MESSAGE=%s", msg, "PRIORITY=%i", prio, "ERRNO=%i", error,
                                          "SYSLOG_IDENTIFIER=%s", program_invocation_short_name, NULL)
                        : sd_journal_send("MESSAGE=%s", msg, "PRIORITY=%i", prio,
                                          "SYSLOG_IDENTIFIER=%s", program_invocation_short_name, NULL);
                /* A record the journal did not take goes to stderr rather than nowhere. */
                if (r >= 0)
                        return;
        }
        fprintf(stderr, "%s: %s%s%s\n", program_invocation_short_name,
                prio <= LOG_WARNING ? prio_name(prio) : "",
                prio <= LOG_WARNING ? ": " : "", msg);
        if (prio <= LOG_ERR)
                fflush(stderr);
}

int log_internal(int prio, int error, const char *fmt, ...) {
        char msg[2048];
        va_list ap;

        if (prio > log_max_prio)
                return error == 0 ? 0 : -abs(error);
        errno = abs(error);   /* for %m */
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        log_emit(prio, abs(error), msg);
        return error == 0 ? 0 : -abs(error);
}

/* Copy a peer-supplied string for a log line: bounded, printable ASCII only,
 * so a request uid cannot forge records. */
static const char *printable(const char *in, char *buf, size_t size) {
        size_t i = 0;

        if (!in || !*in)
                return "-";
        for (; in[i] && i + 1 < size; i++)
                buf[i] = in[i] >= 0x21 && in[i] <= 0x7e ? in[i] : '?';
        buf[i] = 0;
        return buf;
}

static const char *result_name(int result) {
        const char *res = result >= 0 ? "ok" : strerrorname_np(-result);
        return res ? res : "error";
}

/* One audit record: a call (count 0) or the summary of count more calls of
 * a window (first_usec..last_usec, CLOCK_REALTIME). */
struct audit_record {
        const char *op;
        const char *key_id;
        const char *request_uid;
        uid_t uid;
        pid_t pid;
        const char *result;
        uint64_t count, first_usec, last_usec;
};

static void audit_write(const struct audit_record *a) {
        char kbuf[300], ubuf[300], msg[900];

        if (a->count == 0)
                snprintf(msg, sizeof(msg), "audit %s key_id=%s uid=%s peer_uid=%u peer_pid=%i result=%s", a->op,
                         printable(a->key_id, kbuf, sizeof(kbuf)), printable(a->request_uid, ubuf, sizeof(ubuf)),
                         (unsigned) a->uid, (int) a->pid, a->result);
        else
                snprintf(msg, sizeof(msg), "audit %s key_id=%s result=%s: %" PRIu64 " more call(s) in %.3f s "
                         "(peer_uid=%u, last peer_pid=%i uid=%s)", a->op, printable(a->key_id, kbuf, sizeof(kbuf)),
                         a->result, a->count, (double) (a->last_usec - a->first_usec) / 1e6, (unsigned) a->uid,
                         (int) a->pid, printable(a->request_uid, ubuf, sizeof(ubuf)));
        if (log_to_journal &&
            sd_journal_send("MESSAGE=%s", msg,
                            "MESSAGE_ID=%s", a->count ? LOG_MESSAGE_AUDIT_SUMMARY : LOG_MESSAGE_AUDIT,
                            "PRIORITY=%i", strcmp(a->result, "ok") == 0 ? LOG_INFO : LOG_WARNING,
                            "SYSLOG_IDENTIFIER=%s", program_invocation_short_name,
                            "TPMKMS_AUDIT=1",
                            "TPMKMS_OPERATION=%s", a->op,
                            "TPMKMS_KEY_ID=%s", a->key_id ? a->key_id : "",
                            "TPMKMS_REQUEST_UID=%s", a->request_uid ? a->request_uid : "",
                            "TPMKMS_PEER_UID=%u", (unsigned) a->uid,
                            "TPMKMS_PEER_PID=%i", (int) a->pid,
                            "TPMKMS_RESULT=%s", a->result,
                            "TPMKMS_COUNT=%" PRIu64, a->count ? a->count : 1,
                            "TPMKMS_FIRST_USEC=%" PRIu64, a->first_usec,
                            "TPMKMS_LAST_USEC=%" PRIu64, a->last_usec, NULL) >= 0)
                return;
        if (LOG_INFO <= log_max_prio)
                fprintf(stderr, "%s: %s\n", program_invocation_short_name, msg);
}

/* Open windows of successful calls, found by operation, key id and peer
 * uid. The strings are copies: key ids are ours and bounded, request uids
 * are cut at AUDIT_UID_MAX like printable() would cut them. */
#define AUDIT_WINDOWS_MAX 64
#define AUDIT_KEY_ID_MAX 256
#define AUDIT_UID_MAX 128
static struct audit_window {
        const char *op;                 /* the caller's string literal; NULL: slot free */
        char key_id[AUDIT_KEY_ID_MAX];
        char request_uid[AUDIT_UID_MAX];   /* of the last call summarised */
        uid_t uid;
        pid_t pid;
        uint64_t opened, count;          /* CLOCK_MONOTONIC; calls after the first */
        uint64_t first_usec, last_usec;  /* CLOCK_REALTIME of the summarised calls */
} audit_windows[AUDIT_WINDOWS_MAX];

void log_audit_flush(uint64_t now, bool all) {
        for (size_t i = 0; i < AUDIT_WINDOWS_MAX; i++) {
                struct audit_window *w = &audit_windows[i];

                if (!w->op || (!all && now < w->opened + LOG_AUDIT_WINDOW_USEC))
                        continue;
                if (w->count)
                        audit_write(&(struct audit_record) {
                                .op = w->op, .key_id = w->key_id, .request_uid = w->request_uid,
                                .uid = w->uid, .pid = w->pid, .result = "ok", .count = w->count,
                                .first_usec = w->first_usec, .last_usec = w->last_usec,
                        });
                w->op = NULL;
        }
}

void log_audit(const char *op, const char *key_id, const char *request_uid,
               const struct peer_cred *peer, int result) {
        uint64_t real = now_usec(CLOCK_REALTIME), mono = now_usec(CLOCK_MONOTONIC);
        struct audit_window *w = NULL, *free_slot = NULL;

        log_audit_flush(mono, false);   /* ended windows make room */
        if (result >= 0 && key_id && strlen(key_id) < AUDIT_KEY_ID_MAX)
                for (size_t i = 0; i < AUDIT_WINDOWS_MAX && !w; i++) {
                        struct audit_window *c = &audit_windows[i];

                        if (!c->op)
                                free_slot = free_slot ? free_slot : c;
                        else if (c->uid == peer->uid && strcmp(c->op, op) == 0 && strcmp(c->key_id, key_id) == 0)
                                w = c;
                }
        if (w) {
                if (w->count++ == 0)
                        w->first_usec = real;
                w->last_usec = real;
                w->pid = peer->pid;
                snprintf(w->request_uid, sizeof(w->request_uid), "%s", request_uid ? request_uid : "");
                return;
        }
        audit_write(&(struct audit_record) {
                .op = op, .key_id = key_id, .request_uid = request_uid, .uid = peer->uid, .pid = peer->pid,
                .result = result_name(result), .first_usec = real, .last_usec = real,
        });
        if (result >= 0 && free_slot) {
                *free_slot = (struct audit_window) { .op = op, .uid = peer->uid, .pid = peer->pid, .opened = mono };
                snprintf(free_slot->key_id, sizeof(free_slot->key_id), "%s", key_id);
        }
}

void log_key_event(const char *message_id, const char *key_id, const char *role,
                   const char *fmt, ...) {
        char msg[1024];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        if (log_to_journal &&
            sd_journal_send("MESSAGE=%s", msg, "PRIORITY=%i", LOG_NOTICE,
                            "MESSAGE_ID=%s", message_id,
                            "SYSLOG_IDENTIFIER=%s", program_invocation_short_name,
                            "TPMKMS_KEY_ID=%s", key_id ? key_id : "",
                            "TPMKMS_KEY_ROLE=%s", role ? role : "", NULL) >= 0)
                return;
        log_emit(LOG_NOTICE, 0, msg);
}
