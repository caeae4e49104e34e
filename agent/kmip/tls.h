/* A mutual-TLS client connection (OpenSSL 3) for the central KMS: TLS 1.2 or
 * later, forward-secret suites only, the server's certificate verified against
 * one CA file and the endpoint's host name or IP address, our certificate and
 * key presented. Every step is bounded in time: the socket is non-blocking and
 * each wait is a poll() against a deadline, so a server that accepts TCP and
 * then says nothing, or drips one byte at a time, cannot hold the caller past
 * the deadline (SO_RCVTIMEO would bound each recv(), not the operation).
 *
 * Failure returns: -ETIMEDOUT a deadline passed; -ECONNREFUSED and other
 * connect() errors as they are; -EHOSTUNREACH the name did not resolve;
 * -EKEYREJECTED the server's certificate failed verification; -EPROTO other
 * TLS failures (including an alert from the server); -ECONNRESET the server
 * closed the connection; -ENOMEM. Every failure writes one line to err.
 *
 * Writes may raise SIGPIPE on a socket the server closed: callers ignore
 * SIGPIPE (tpmkmsd does, at start). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "macro.h"

struct tls_context;
struct central_probe_result;
struct tls_conn;
typedef struct evp_pkey_st EVP_PKEY;
struct tls_session;

/* Load the CA file (the only trust anchors: no system store), our certificate
 * chain and our key (cert_file NULL: none, and key_file and key unused). The key file must be a regular file that neither group
 * nor others may access (like OpenSSH's identity files): -EPERM otherwise,
 * naming the file and its mode. With key non-NULL that key is used (a
 * reference is taken) and key_file only names it in messages. Returns 0, or
 * -ENOENT/-EACCES/-EPERM/-EINVAL (unreadable or unusable file) or -ENOMEM,
 * with a message in err. */
int tls_context_new(const char *ca_file, const char *cert_file, const char *key_file, EVP_PKEY *key,
                    struct tls_context **ret, char *err, size_t err_size);
void tls_context_free(struct tls_context *t);

/* Connect to host:port (a name, IPv4 or IPv6 literal) and complete the TLS
 * handshake. The TCP connect (over all resolved addresses) and the handshake
 * are each bounded by timeout_usec. Name resolution uses the system resolver
 * and its own timeouts (resolv.conf); IP literals never touch it. probe (may
 * be NULL) gets the transport's part of a central_probe: the step reached,
 * the address, timings, the server certificate's verification and expiry,
 * failure or not. Returns 0 and *ret, or a negative errno (see above). */
int tls_connect(struct tls_context *t, const char *host, uint16_t port, uint64_t timeout_usec,
                struct central_probe_result *probe, struct tls_conn **ret, char *err, size_t err_size);

/* tls_connect, offering to resume *resume (the TLS session of an earlier
 * connection to the same host:port, or NULL): an abbreviated handshake when
 * the server still knows it, a full one otherwise. *resume is not changed;
 * see tls_conn_save_session. */
int tls_connect_resume(struct tls_context *t, const char *host, uint16_t port, uint64_t timeout_usec,
                       struct tls_session **resume, struct central_probe_result *probe,
                       struct tls_conn **ret, char *err, size_t err_size);
/* Whether c resumed a session. */
bool tls_conn_resumed(const struct tls_conn *c);
/* After the last read on c: keep its session in *slot (freeing the one
 * there) if it is resumable and c had no error; else leave *slot. */
void tls_conn_save_session(const struct tls_conn *c, struct tls_session **slot);
/* Accepts NULL. The session holds its master secret: wiped when freed. */
void tls_session_free(struct tls_session *s);

/* Write all len bytes, or read exactly len bytes, before deadline_usec
 * (now_usec(CLOCK_MONOTONIC), common/util.h). Returns 0 or a negative errno. */
int tls_write(struct tls_conn *c, const void *buf, size_t len, uint64_t deadline_usec,
              char *err, size_t err_size);
int tls_read(struct tls_conn *c, void *buf, size_t len, uint64_t deadline_usec,
             char *err, size_t err_size);

/* The negotiated protocol and cipher ("TLSv1.2", "ECDHE-RSA-AES256-SHA384"),
 * for debug logs. */
const char *tls_conn_version(const struct tls_conn *c);
const char *tls_conn_cipher(const struct tls_conn *c);

/* Send close_notify if that can be done without waiting, and close. Accepts
 * NULL. The record buffers are wiped (SSL_OP_CLEANSE_PLAINTEXT): they held
 * decrypted key material. */
void tls_conn_free(struct tls_conn *c);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct tls_conn *, tls_conn_free);
