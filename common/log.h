/* Logging for the daemon and the CLI. Under systemd (JOURNAL_STREAM names our
 * stderr) records go to the journal with structured fields; otherwise one line
 * each to stderr. tpm/ and plugin/ do not log (they take hooks); the kmip
 * client logs at debug level only; the vault and the agent log where they
 * decide (a refusal, a key event), with the cause. */
#pragma once

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <syslog.h>

struct peer_cred;

/* Choose journal or stderr; max_prio e.g. LOG_INFO (LOG_DEBUG with -v). */
void log_setup(int max_prio);
/* Flush buffered stderr records (called once per event-loop iteration). */
void log_flush(void);

/* Log and return -|error| (or 0 when error is 0), so that callers can
 * `return log_error_errno(r, "...: %m")`; %m prints strerror(|error|). */
int log_internal(int prio, int error, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#define log_debug(...) log_internal(LOG_DEBUG, 0, __VA_ARGS__)
#define log_info(...) log_internal(LOG_INFO, 0, __VA_ARGS__)
#define log_warning(...) log_internal(LOG_WARNING, 0, __VA_ARGS__)
#define log_error(...) log_internal(LOG_ERR, 0, __VA_ARGS__)
#define log_error_errno(r, ...) log_internal(LOG_ERR, (r), __VA_ARGS__)

/* Audit of Encrypt/Decrypt: operation, key id, request uid, peer uid/pid and
 * result ("ok" or the error's name), MESSAGE_ID LOG_MESSAGE_AUDIT. Every
 * failure is one record. Successes are summarised per operation, key id and
 * peer uid over LOG_AUDIT_WINDOW_USEC: the first of a window is a record of
 * its own, the rest one summary record (MESSAGE_ID LOG_MESSAGE_AUDIT_SUMMARY,
 * TPMKMS_COUNT, the window's start and end, the last request uid and pid)
 * when the window ends, so that an apiserver restart reading thousands of
 * objects writes a handful of records, not thousands, and journald's rate
 * limit never has to choose what to drop. A success that finds the table of
 * open windows full is a record of its own: nothing is ever dropped. */
#define LOG_AUDIT_WINDOW_USEC (1000u * 1000u)
#define LOG_MESSAGE_AUDIT         "e1a93c47d2b84f0e9a5c6b7d8e9f0a12"
#define LOG_MESSAGE_AUDIT_SUMMARY "4b7e2d90c1a34f58b6e7d8c9a0b1c2d3"
void log_audit(const char *op, const char *key_id, const char *request_uid,
               const struct peer_cred *peer, int result);
/* Write the summaries of the windows that have ended by now (CLOCK_MONOTONIC
 * usec), or of all of them with all set (at exit). log_flush calls it with the
 * current time; the daemon also wakes once per window so that a burst's
 * summary is written when it ends, not at the next request. */
void log_audit_flush(uint64_t now, bool all);

/* Key lifecycle events carry a MESSAGE_ID so they can be found with
 * `journalctl MESSAGE_ID=...`. */
#define LOG_MESSAGE_KEY_CREATED   "5c1a2f8e0b9d4f51a6d3e2c47b18f901"
#define LOG_MESSAGE_KEY_ROLE      "9e47d0c3a1b24d6c8f05e7a9b2c31d44"
#define LOG_MESSAGE_CACHE_REFUSED "2b8e6f1d4c7a4e0f9d3b5a1c8e7f6d20"
#define LOG_MESSAGE_CACHE_RESEALED "d41f7a2c9e3b4856a0c1f2e3d4b5a697"
#define LOG_MESSAGE_CACHE_RESTORED "a83e5d0f2b6c4e19b7d1c4f08e2a9b35"
#define LOG_MESSAGE_KEY_MATERIAL_CHANGED "7f3c9a1e5b2d4c80a6e1f9d3b7c5a214"
/* A cached version went missing at the central KMS (Destroyed, not located). */
#define LOG_MESSAGE_KEY_MISSING   "c3e85b1f6a0d4e27b94f2d7a1c6e8b35"
/* The client identity for the central KMS: enrolled, certificate expiry
 * (TPMKMS_CERT_NOT_AFTER, TPMKMS_CERT_DAYS_LEFT in the message). */
#define LOG_MESSAGE_IDENTITY      "e6b04c2f8d1a4b7e9c35f0a2d7e1b486"
void log_key_event(const char *message_id, const char *key_id, const char *role,
                   const char *fmt, ...) __attribute__((format(printf, 4, 5)));
