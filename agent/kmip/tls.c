/* The central KMS's mutual-TLS client (see tls.h). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "macro.h"
#include "util.h"
#include "tls.h"
#include "kmip.h"

/* TLS 1.2 suites, best first. All are ECDHE (forward secret) with AEAD
 * first; the CBC-SHA256/384 ones last because PyKMIP 0.10 offers nothing
 * better with an RSA certificate. No static-RSA key exchange: a leaked server
 * key would decrypt every recorded session, and with it the KEKs. TLS 1.3
 * suites (all forward secret) stay at OpenSSL's defaults. */
#define TLS12_CIPHERS                                                          \
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"           \
        "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"           \
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"           \
        "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384:"                   \
        "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256"

/* What our CertificateVerify may use: digests a TPM signs (SHA-256/384/512)
 * and the schemes KMIP servers accept over TLS 1.2 (ECDSA, RSA PKCS#1 v1.5)
 * and 1.3 (ECDSA, RSA-PSS). */
#define CLIENT_SIGALGS                                                         \
        "ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512:"                              \
        "rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:rsa_pss_rsae_sha512:"         \
        "RSA+SHA256:RSA+SHA384:RSA+SHA512"

#define KEY_FILE_MAX (64u * 1024u)   /* a PEM private key is a few KiB */
/* A TLS 1.2 resumption keeps the full handshake's master secret: after this
 * long a new ECDHE exchange makes fresh keys (forward secrecy per hour). */
#define RESUME_MAX_AGE_SEC 3600

struct tls_context {
        SSL_CTX *ctx;
        char cert_file[PATH_MAX];   /* named when the server rejects it */
};

struct tls_session {
        SSL_SESSION *session;
};

struct tls_conn {
        SSL *ssl;
        int fd;
        bool broken;                /* a fatal error: no close_notify */
        char peer[300];             /* "host:port" for messages */
        const struct tls_context *t;
};

DEFINE_TRIVIAL_CLEANUP_FUNC(BIO *, BIO_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(EVP_PKEY *, EVP_PKEY_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct addrinfo *, freeaddrinfo);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct tls_context *, tls_context_free);


/* The oldest queued OpenSSL error as text, then clear the queue (it is
 * per thread and would otherwise confuse the next call). */
static const char *ssl_error_text(char *buf, size_t size) {
        const char *reason, *data = NULL;
        int flags = 0;
        unsigned long e = ERR_peek_error_data(&data, &flags);

        if (e == 0)
                snprintf(buf, size, "unknown error");
        else if (ERR_GET_LIB(e) == ERR_LIB_USER && (flags & ERR_TXT_STRING) && data && *data)
                /* Our own key method's reason (tpm/key.c): the text says it all. */
                snprintf(buf, size, "%s", data);
        else if ((reason = ERR_reason_error_string(e)))
                snprintf(buf, size, "%s", reason);
        else
                ERR_error_string_n(e, buf, size);
        ERR_clear_error();
        return buf;
}

/* A file-loading failure: the errno when OpenSSL saw one (missing file,
 * permission), else -EINVAL (bad content). */
static int load_failure(const char *what, const char *path, char *err, size_t err_size) {
        unsigned long e = ERR_peek_error();
        int r = -EINVAL;
        char text[256];

        if (e != 0 && ERR_SYSTEM_ERROR(e) && ERR_GET_REASON(e) > 0)
                r = -ERR_GET_REASON(e);
        if (r != -EINVAL) {
                ERR_clear_error();
                errorf(err, err_size, "%s %s: %s", what, path, strerror(-r));
        } else
                errorf(err, err_size, "%s %s: %s", what, path, ssl_error_text(text, sizeof(text)));
        return r;
}

/* PEM keys are not encrypted here: the daemon runs unattended. */
static int no_passphrase(char *buf, int size, int rwflag, void *u) {
        return -1;
}

/* Read the private key from an fd we checked: fstat on the opened file, so
 * what we check is what we read (no race with a rename between stat and
 * open). Symlinks are followed on purpose: mounted secrets are symlinks. */
static int load_key(SSL_CTX *ctx, const char *path, const char *cert_file, char *err, size_t err_size) {
        _cleanup_close_ int fd = -1;
        _cleanup_(EVP_PKEY_freep) EVP_PKEY *pkey = NULL;
        _cleanup_(BIO_freep) BIO *bio = NULL;
        uint8_t *buf = NULL;
        size_t len = 0;
        struct stat st;
        char text[256];
        int r = 0;

        /* O_NONBLOCK: opening a FIFO must not hang; it is refused below. */
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0) {
                r = -errno;
                errorf(err, err_size, "key file %s: %s", path, strerror(-r));
                return r;
        }
        if (fstat(fd, &st) < 0) {
                r = -errno;
                errorf(err, err_size, "key file %s: %s", path, strerror(-r));
                return r;
        }
        if (!S_ISREG(st.st_mode)) {
                errorf(err, err_size, "key file %s is not a regular file (mode %06o)",
                       path, (unsigned) st.st_mode);
                return -EINVAL;
        }
        /* Any access for group or others is refused, as OpenSSH does for
         * identity files: the key is the host's identity at the KMS. */
        if (st.st_mode & (S_IRWXG | S_IRWXO)) {
                errorf(err, err_size,
                       "key file %s has mode %04o: group or others may access it; "
                       "it must be 0600 or 0400 (chmod 0600 %s)",
                       path, (unsigned) (st.st_mode & 07777), path);
                return -EPERM;
        }
        if (st.st_size <= 0 || (uint64_t) st.st_size > KEY_FILE_MAX) {
                errorf(err, err_size, "key file %s: size %lld is not that of a PEM key",
                       path, (long long) st.st_size);
                return -EINVAL;
        }

        buf = malloc((size_t) st.st_size);
        if (!buf) {
                errorf(err, err_size, "key file %s: out of memory", path);
                return -ENOMEM;
        }
        while (len < (size_t) st.st_size) {
                ssize_t n = read(fd, buf + len, (size_t) st.st_size - len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        r = -errno;
                        errorf(err, err_size, "key file %s: %s", path, strerror(-r));
                        goto out;
                }
                if (n == 0)
                        break;
                len += (size_t) n;
        }

        ERR_clear_error();
        bio = BIO_new_mem_buf(buf, (int) len);
        if (!bio) {
                r = -ENOMEM;
                errorf(err, err_size, "key file %s: out of memory", path);
                goto out;
        }
        pkey = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
        if (!pkey) {
                errorf(err, err_size, "key file %s: not an unencrypted PEM private key (%s)",
                       path, ssl_error_text(text, sizeof(text)));
                r = -EINVAL;
                goto out;
        }
        if (SSL_CTX_use_PrivateKey(ctx, pkey) != 1) {
                unsigned long e = ERR_peek_error();

                if (ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH) {
                        ERR_clear_error();
                        errorf(err, err_size, "key file %s does not match certificate %s", path, cert_file);
                } else
                        errorf(err, err_size, "key file %s: %s", path, ssl_error_text(text, sizeof(text)));
                r = -EINVAL;
                goto out;
        }
out:
        erase_and_free(buf, (size_t) st.st_size);
        return r;
}

int tls_context_new(const char *ca_file, const char *cert_file, const char *key_file, EVP_PKEY *key,
                    struct tls_context **ret, char *err, size_t err_size) {
        _cleanup_(tls_context_freep) struct tls_context *t = NULL;
        char text[256];
        int r;

        ERR_clear_error();
        t = calloc(1, sizeof(*t));
        if (!t) {
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        snprintf(t->cert_file, sizeof(t->cert_file), "%s", cert_file ? cert_file : "(none)");

        t->ctx = SSL_CTX_new(TLS_client_method());
        if (!t->ctx) {
                errorf(err, err_size, "cannot create a TLS context: %s", ssl_error_text(text, sizeof(text)));
                return -ENOMEM;
        }
        if (SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION) != 1 ||
            SSL_CTX_set_cipher_list(t->ctx, TLS12_CIPHERS) != 1 ||
            SSL_CTX_set1_client_sigalgs_list(t->ctx, CLIENT_SIGALGS) != 1) {
                errorf(err, err_size, "cannot configure TLS: %s", ssl_error_text(text, sizeof(text)));
                return -EINVAL;
        }
        /* CLEANSE_PLAINTEXT: the record buffers hold decrypted Get responses
         * (KEKs); OpenSSL wipes them before freeing. NO_RENEGOTIATION: the
         * KMS has no reason to renegotiate, refuse it. Session tickets
         * (RFC 5077) are accepted: PyKMIP 0.10 resumes TLS 1.2 sessions
         * only from tickets (it drops a session from its cache when a
         * connection ends without close_notify), and a resumed session
         * reuses its master secret, so tls_connect_resume offers none
         * older than RESUME_MAX_AGE_SEC. The client keeps one session per
         * endpoint itself (tls_conn_save_session), no internal cache. */
        SSL_CTX_set_options(t->ctx, SSL_OP_CLEANSE_PLAINTEXT | SSL_OP_NO_RENEGOTIATION |
                                    SSL_OP_NO_COMPRESSION);
        SSL_CTX_set_session_cache_mode(t->ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);

        /* Only the configured CA: the system store would let any public CA
         * vouch for a "KMS". */
        if (SSL_CTX_load_verify_file(t->ctx, ca_file) != 1)
                return load_failure("CA file", ca_file, err, err_size);
        SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);

        if (!cert_file) {
                *ret = TAKE_PTR(t);
                return 0;
        }
        if (SSL_CTX_use_certificate_chain_file(t->ctx, cert_file) != 1)
                return load_failure("certificate file", cert_file, err, err_size);
        if (key) {
                if (SSL_CTX_use_PrivateKey(t->ctx, key) != 1) {
                        ERR_clear_error();
                        errorf(err, err_size, "key file %s does not match certificate %s", key_file, cert_file);
                        return -EINVAL;
                }
        } else {
                r = load_key(t->ctx, key_file, cert_file, err, err_size);
                if (r < 0)
                        return r;
        }
        if (SSL_CTX_check_private_key(t->ctx) != 1) {
                ERR_clear_error();
                errorf(err, err_size, "key file %s does not match certificate %s", key_file, cert_file);
                return -EINVAL;
        }

        *ret = TAKE_PTR(t);
        return 0;
}

void tls_context_free(struct tls_context *t) {
        if (!t)
                return;
        SSL_CTX_free(t->ctx);
        free(t);
}

/* Wait until fd is ready for events or the deadline passes. POLLERR and
 * POLLHUP count as ready: the next call reports what happened. */
static int wait_fd(int fd, short events, uint64_t deadline_usec) {
        for (;;) {
                struct pollfd p = { .fd = fd, .events = events };
                uint64_t now = now_usec(CLOCK_MONOTONIC), left_ms;
                int r;

                if (now >= deadline_usec)
                        return -ETIMEDOUT;
                left_ms = (deadline_usec - now + 999) / 1000;
                r = poll(&p, 1, left_ms > INT_MAX ? INT_MAX : (int) left_ms);
                if (r < 0 && errno == EINTR)
                        continue;
                if (r < 0)
                        return -errno;
                if (r > 0)
                        return 0;
        }
}

static int connect_addr(const struct addrinfo *ai, uint64_t deadline_usec, int *ret_fd) {
        _cleanup_close_ int fd = -1;
        int one = 1, e = 0, r;
        socklen_t l = sizeof(e);

        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0)
                return -errno;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
                if (errno != EINPROGRESS)
                        return -errno;
                r = wait_fd(fd, POLLOUT, deadline_usec);
                if (r < 0)
                        return r;
                if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &l) < 0)
                        return -errno;
                if (e != 0)
                        return -e;
        }
        /* Small request/response messages: don't let Nagle hold a record. */
        (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        *ret_fd = TAKE_FD(fd);
        return 0;
}

/* The numeric address of ai into probe (may be NULL). */
static void probe_address(struct central_probe_result *probe, const struct addrinfo *ai) {
        if (probe && getnameinfo(ai->ai_addr, ai->ai_addrlen, probe->address, sizeof(probe->address),
                                 NULL, 0, NI_NUMERICHOST) != 0)
                probe->address[0] = '\0';
}

static int tcp_connect(const char *host, uint16_t port, uint64_t timeout_usec, int *ret_fd,
                       struct central_probe_result *probe, char *err, size_t err_size, const char *peer) {
        _cleanup_(freeaddrinfop) struct addrinfo *res = NULL;
        struct addrinfo hints = {
                .ai_family = AF_UNSPEC,
                .ai_socktype = SOCK_STREAM,
                .ai_protocol = IPPROTO_TCP,
                .ai_flags = AI_NUMERICSERV,
        };
        char service[8];
        uint64_t deadline;
        int r = -EHOSTUNREACH;

        snprintf(service, sizeof(service), "%u", (unsigned) port);
        r = getaddrinfo(host, service, &hints, &res);
        if (r != 0) {
                errorf(err, err_size, "%s: cannot resolve host: %s", peer,
                       r == EAI_SYSTEM ? strerror(errno) : gai_strerror(r));
                return -EHOSTUNREACH;
        }

        /* One deadline for all the addresses: the bound is per operation. */
        deadline = now_usec(CLOCK_MONOTONIC) + timeout_usec;
        r = -EHOSTUNREACH;
        if (probe)
                probe->failed = CENTRAL_PROBE_CONNECT;
        for (const struct addrinfo *ai = res; ai; ai = ai->ai_next) {
                probe_address(probe, ai);
                r = connect_addr(ai, deadline, ret_fd);
                if (r >= 0)
                        return 0;
                if (r == -ETIMEDOUT)
                        break;
        }
        if (r == -ETIMEDOUT)
                errorf(err, err_size, "%s: connect timed out after %llu ms", peer,
                       (unsigned long long) (timeout_usec / 1000));
        else
                errorf(err, err_size, "%s: connect: %s", peer, strerror(-r));
        return r;
}

static bool is_client_cert_alert(int alert) {
        switch (alert) {
        case SSL_AD_BAD_CERTIFICATE:
        case SSL_AD_UNSUPPORTED_CERTIFICATE:
        case SSL_AD_CERTIFICATE_REVOKED:
        case SSL_AD_CERTIFICATE_EXPIRED:
        case SSL_AD_CERTIFICATE_UNKNOWN:
        case SSL_AD_UNKNOWN_CA:
        case SSL_AD_ACCESS_DENIED:
        case SSL_AD_CERTIFICATE_REQUIRED:
                return true;
        default:
                return false;
        }
}

/* Turn a failed SSL call into a message and an errno. ret is the SSL call's
 * return value; what is "TLS handshake", "reading the response", ... */
static int ssl_failure(struct tls_conn *c, int ret, const char *what, char *err, size_t err_size) {
        int e = SSL_get_error(c->ssl, ret), saved_errno = errno;
        unsigned long l = ERR_peek_error();
        long v = X509_V_OK;
        char text[256];

        c->broken = true;
        if (!SSL_is_init_finished(c->ssl))
                v = SSL_get_verify_result(c->ssl);
        if (v != X509_V_OK) {
                /* Name the check that failed: "hostname mismatch", "unable to
                 * get local issuer certificate", "certificate has expired". */
                ERR_clear_error();
                errorf(err, err_size, "%s: %s: server certificate verify failed: %s", c->peer, what,
                       X509_verify_cert_error_string(v));
                return -EKEYREJECTED;
        }

        switch (e) {
        case SSL_ERROR_ZERO_RETURN:
                ERR_clear_error();
                errorf(err, err_size, "%s: %s: the server closed the connection", c->peer, what);
                return -ECONNRESET;
        case SSL_ERROR_SYSCALL:
                if (l == 0) {
                        ERR_clear_error();
                        if (saved_errno != 0) {
                                errorf(err, err_size, "%s: %s: %s", c->peer, what, strerror(saved_errno));
                                return -saved_errno;
                        }
                        errorf(err, err_size, "%s: %s: the server closed the connection", c->peer, what);
                        return -ECONNRESET;
                }
                break;
        case SSL_ERROR_SSL:
                break;
        default:
                ERR_clear_error();
                errorf(err, err_size, "%s: %s: unexpected OpenSSL state %d", c->peer, what, e);
                return -EPROTO;
        }

        if (ERR_GET_LIB(l) == ERR_LIB_SSL && ERR_GET_REASON(l) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
                /* No close_notify, no alert: some servers refuse a client
                 * certificate so, after a TLS 1.3 handshake. */
                ERR_clear_error();
                errorf(err, err_size, "%s: %s: the server closed the connection without a TLS close "
                       "(did it refuse our client certificate %s?)", c->peer, what, c->t->cert_file);
                return -ECONNRESET;
        }
        if (ERR_GET_LIB(l) == ERR_LIB_SSL && ERR_GET_REASON(l) >= SSL_AD_REASON_OFFSET &&
            is_client_cert_alert(ERR_GET_REASON(l) - SSL_AD_REASON_OFFSET)) {
                errorf(err, err_size, "%s: %s: the server rejected our client certificate %s: %s",
                       c->peer, what, c->t->cert_file, ssl_error_text(text, sizeof(text)));
                return -EPROTO;
        }
        errorf(err, err_size, "%s: %s failed: %s", c->peer, what, ssl_error_text(text, sizeof(text)));
        return -EPROTO;
}

enum ssl_op {
        OP_HANDSHAKE,
        OP_READ,
        OP_WRITE,
};

/* Run one non-blocking SSL call until it makes progress or the deadline
 * passes; *n is what SSL_read_ex/SSL_write_ex moved. A read may need to write
 * and a write to read (TLS 1.3 key updates): wait for whatever it asks. */
static int ssl_run(struct tls_conn *c, enum ssl_op op, void *buf, size_t len, size_t *n,
                   const char *what, uint64_t deadline_usec, char *err, size_t err_size) {
        for (;;) {
                int ret, e, r;

                ERR_clear_error();
                errno = 0;
                switch (op) {
                case OP_HANDSHAKE:
                        ret = SSL_do_handshake(c->ssl);
                        break;
                case OP_READ:
                        ret = SSL_read_ex(c->ssl, buf, len, n);
                        break;
                default:
                        ret = SSL_write_ex(c->ssl, buf, len, n);
                        break;
                }
                if (ret > 0)
                        return 0;

                e = SSL_get_error(c->ssl, ret);
                if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
                        return ssl_failure(c, ret, what, err, err_size);

                r = wait_fd(c->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline_usec);
                if (r < 0) {
                        /* A half-done record cannot be resumed later. */
                        c->broken = true;
                        if (r == -ETIMEDOUT)
                                errorf(err, err_size, "%s: %s timed out", c->peer, what);
                        else
                                errorf(err, err_size, "%s: %s: poll: %s", c->peer, what, strerror(-r));
                        return r;
                }
        }
}

static bool is_ip_literal(const char *host) {
        struct in6_addr a6;
        struct in_addr a4;

        return inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1;
}

/* ASN1_TIME as CLOCK_REALTIME usec; 0 when it cannot be read. */
static uint64_t asn1_time_usec(const ASN1_TIME *t) {
        struct tm tm;
        time_t secs;

        if (!t || ASN1_TIME_to_tm(t, &tm) != 1)
                return 0;
        secs = timegm(&tm);
        return secs > 0 ? (uint64_t) secs * USEC_PER_SEC : 0;
}

/* What the handshake showed of the server's certificate, into probe. */
static void probe_server_certificate(struct central_probe_result *probe, const struct tls_conn *c) {
        const X509 *x = SSL_get0_peer_certificate(c->ssl);
        long v = SSL_get_verify_result(c->ssl);

        if (!x)
                return;
        snprintf(probe->server_verify, sizeof(probe->server_verify), "%s",
                 v == X509_V_OK ? "ok" : X509_verify_cert_error_string(v));
        probe->server_not_after_usec = asn1_time_usec(X509_get0_notAfter(x));
}

int tls_connect(struct tls_context *t, const char *host, uint16_t port, uint64_t timeout_usec,
                struct central_probe_result *probe, struct tls_conn **ret, char *err, size_t err_size) {
        return tls_connect_resume(t, host, port, timeout_usec, NULL, probe, ret, err, err_size);
}

int tls_connect_resume(struct tls_context *t, const char *host, uint16_t port, uint64_t timeout_usec,
                       struct tls_session **resume, struct central_probe_result *probe,
                       struct tls_conn **ret, char *err, size_t err_size) {
        _cleanup_(tls_conn_freep) struct tls_conn *c = NULL;
        char text[256];
        uint64_t deadline, start = now_usec(CLOCK_MONOTONIC);
        int r;

        c = calloc(1, sizeof(*c));
        if (!c) {
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        c->fd = -1;
        c->t = t;
        snprintf(c->peer, sizeof(c->peer), strchr(host, ':') ? "[%s]:%u" : "%s:%u", host, (unsigned) port);

        if (probe)
                probe->failed = CENTRAL_PROBE_RESOLVE;
        r = tcp_connect(host, port, timeout_usec, &c->fd, probe, err, err_size, c->peer);
        if (probe)
                probe->connect_usec = now_usec(CLOCK_MONOTONIC) - start;
        if (r < 0)
                return r;
        if (probe)
                probe->failed = CENTRAL_PROBE_HANDSHAKE;

        ERR_clear_error();
        c->ssl = SSL_new(t->ctx);
        if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) {
                errorf(err, err_size, "%s: cannot set up TLS: %s", c->peer, ssl_error_text(text, sizeof(text)));
                return -ENOMEM;
        }
        if (is_ip_literal(host)) {
                /* RFC 6066 section 3: no IP literals in SNI; the
                 * certificate must carry the address as an IP SAN. */
                if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), host) != 1) {
                        errorf(err, err_size, "%s: bad IP address", c->peer);
                        return -EINVAL;
                }
        } else {
                SSL_set_hostflags(c->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
                if (SSL_set_tlsext_host_name(c->ssl, host) != 1 || SSL_set1_host(c->ssl, host) != 1) {
                        errorf(err, err_size, "%s: bad host name: %s", c->peer,
                               ssl_error_text(text, sizeof(text)));
                        return -EINVAL;
                }
        }
        SSL_set_connect_state(c->ssl);
        /* The server verified our certificate and we its, for this
         * host:port, when the session was made; a server that no longer
         * knows it makes a full handshake. */
        if (resume && *resume && (uint64_t) time(NULL) - (uint64_t) SSL_SESSION_get_time((*resume)->session) <
                                         RESUME_MAX_AGE_SEC &&
            SSL_set_session(c->ssl, (*resume)->session) != 1)
                ERR_clear_error();

        /* The handshake gets its own deadline: connect and handshake are
         * separate operations, each bounded by the timeout. */
        start = now_usec(CLOCK_MONOTONIC);
        deadline = start + timeout_usec;
        r = ssl_run(c, OP_HANDSHAKE, NULL, 0, NULL, "TLS handshake", deadline, err, err_size);
        if (probe) {
                probe->handshake_usec = now_usec(CLOCK_MONOTONIC) - start;
                probe_server_certificate(probe, c);
        }
        if (r < 0)
                return r;
        if (probe)
                probe->failed = CENTRAL_PROBE_REQUEST;

        *ret = TAKE_PTR(c);
        return 0;
}

/* Move all len bytes one way before the deadline. Without
 * SSL_MODE_ENABLE_PARTIAL_WRITE SSL_write_ex writes all or asks to be retried
 * with the same arguments, which the loop does; reads come in pieces. */
static int tls_transfer(struct tls_conn *c, int op, uint8_t *buf, size_t len, const char *what,
                        uint64_t deadline_usec, char *err, size_t err_size) {
        size_t done = 0;
        int r;

        if (c->broken) {
                errorf(err, err_size, "%s: connection unusable after an earlier error", c->peer);
                return -ENOTCONN;
        }
        while (done < len) {
                size_t n = 0;

                r = ssl_run(c, op, buf + done, len - done, &n, what, deadline_usec, err, err_size);
                if (r < 0)
                        return r;
                done += n;
        }
        return 0;
}

int tls_write(struct tls_conn *c, const void *buf, size_t len, uint64_t deadline_usec,
              char *err, size_t err_size) {
        return tls_transfer(c, OP_WRITE, (uint8_t *) buf, len, "sending the request",
                            deadline_usec, err, err_size);
}

int tls_read(struct tls_conn *c, void *buf, size_t len, uint64_t deadline_usec,
             char *err, size_t err_size) {
        return tls_transfer(c, OP_READ, buf, len, "reading the response", deadline_usec, err, err_size);
}

const char *tls_conn_version(const struct tls_conn *c) {
        return SSL_get_version(c->ssl);
}

const char *tls_conn_cipher(const struct tls_conn *c) {
        return SSL_get_cipher_name(c->ssl);
}

void tls_conn_free(struct tls_conn *c) {
        if (!c)
                return;
        if (c->ssl) {
                /* One non-blocking attempt at close_notify; never wait for
                 * the server's (RFC 8446 section 6.1 allows not waiting). */
                if (!c->broken && SSL_is_init_finished(c->ssl))
                        (void) SSL_shutdown(c->ssl);
                ERR_clear_error();
                SSL_free(c->ssl);
        }
        if (c->fd >= 0)
                close(c->fd);
        free(c);
}

int central_certificate_not_after(const char *path, uint64_t *ret_usec) {
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        X509 *x;

        if (!f)
                return -errno;
        x = PEM_read_X509(f, NULL, NULL, NULL);
        ERR_clear_error();
        if (!x)
                return -EBADMSG;
        *ret_usec = asn1_time_usec(X509_get0_notAfter(x));
        X509_free(x);
        return *ret_usec ? 0 : -EBADMSG;
}

bool tls_conn_resumed(const struct tls_conn *c) {
        return SSL_session_reused(c->ssl) == 1;
}

void tls_conn_save_session(const struct tls_conn *c, struct tls_session **slot) {
        struct tls_session *s;
        SSL_SESSION *sess;

        if (c->broken)
                return;
        sess = SSL_get1_session(c->ssl);
        if (!sess)
                return;
        if (SSL_SESSION_is_resumable(sess) != 1 || !(s = calloc(1, sizeof(*s)))) {
                SSL_SESSION_free(sess);
                return;
        }
        s->session = sess;
        tls_session_free(*slot);
        *slot = s;
}

void tls_session_free(struct tls_session *s) {
        if (!s)
                return;
        /* SSL_SESSION_free cleanses the master secret. */
        SSL_SESSION_free(s->session);
        free(s);
}
