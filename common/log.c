#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <systemd/sd-journal.h>

#include "log.h"
#include "socket.h"

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

void log_audit(const char *op, const char *key_id, const char *request_uid,
               const struct peer_cred *peer, int result) {
        const char *res = result >= 0 ? "ok" : strerrorname_np(-result);
        char kbuf[300], ubuf[300];

        if (!res)
                res = "error";
        if (log_to_journal &&
            sd_journal_send("MESSAGE=audit %s key_id=%s uid=%s peer_uid=%u result=%s",
                                op, printable(key_id, kbuf, sizeof(kbuf)),
                                printable(request_uid, ubuf, sizeof(ubuf)),
                                (unsigned) peer->uid, res,
                                "PRIORITY=%i", LOG_INFO,
                                "SYSLOG_IDENTIFIER=%s", program_invocation_short_name,
                                "TPMKMS_AUDIT=1",
                                "TPMKMS_OPERATION=%s", op,
                                "TPMKMS_KEY_ID=%s", key_id ? key_id : "",
                                "TPMKMS_REQUEST_UID=%s", request_uid ? request_uid : "",
                                "TPMKMS_PEER_UID=%u", (unsigned) peer->uid,
                                "TPMKMS_PEER_PID=%i", (int) peer->pid,
                                "TPMKMS_RESULT=%s", res, NULL) >= 0)
                return;
        if (LOG_INFO > log_max_prio)
                return;
        fprintf(stderr, "%s: audit op=%s key_id=%s uid=%s peer_uid=%u peer_pid=%i result=%s\n",
                program_invocation_short_name, op, printable(key_id, kbuf, sizeof(kbuf)),
                printable(request_uid, ubuf, sizeof(ubuf)),
                (unsigned) peer->uid, (int) peer->pid, res);
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
