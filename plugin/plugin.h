/* plugin/ — the KMS v2 front: gRPC over HTTP/2 (nghttp2, prior-knowledge h2c) on
 * unix sockets, driven by sd-event. It reaches keys only through the backend
 * interface below, which the agent provides; it includes nothing from agent/,
 * and nothing here touches the TPM or the network.
 * Functions return >= 0 on success and a negative errno value on failure. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "socket.h"

typedef struct sd_event sd_event;

#define KMS_KEY_ID_MAX 1024       /* KMS v2: key_id at most 1 KiB */
#define KMS_CIPHERTEXT_MAX 1024   /* KMS v2: Encrypt ciphertext at most 1 KiB */
#define KMS_PLAINTEXT_MAX 512     /* the apiserver sends a 32-byte DEK seed */
#define KMS_HEALTHZ_MAX 256
#define KMS_ERROR_MAX 256

/* One Encrypt/Decrypt call as the backend sees it. */
struct kms_call {
        const char *request_uid;          /* the request's uid field (audit) */
        const struct peer_cred *peer;
        char error[KMS_ERROR_MAX];        /* backend may explain a failure here;
                                             sent as grpc-message */
        bool may_defer;                   /* Decrypt only: the backend may return
                                             -EAGAIN to park the call until
                                             kms_server_retry_parked() (e.g. an
                                             unknown key id while a sync runs);
                                             false on that retry */
        uint64_t park_token;              /* set by the backend with that -EAGAIN:
                                             the number of the event the call
                                             waits for (e.g. the agent's sync
                                             generation); 0 on entry */
};

struct kms_status {
        char healthz[KMS_HEALTHZ_MAX];    /* "ok", or a short reason */
        char key_id[KMS_KEY_ID_MAX + 1];  /* current primary; "" when none */
};

/* Failure returns map to gRPC codes in one table (plugin/grpc.c, which also
 * holds the codes of the call's own failures: RESOURCE_EXHAUSTED for size,
 * DEADLINE_EXCEEDED, UNIMPLEMENTED for an unknown method or compression):
 *   -EINVAL, -EBADMSG  INVALID_ARGUMENT (malformed, or fails authentication)
 *   -ENOENT            NOT_FOUND (unknown key id)
 *   -ENOKEY            UNAVAILABLE (no keys unsealed)
 *   -EPERM             FAILED_PRECONDITION (measured boot refused the cache)
 *   anything else      INTERNAL */
struct kms_backend_ops {
        /* Fill st; problems are reported through st->healthz. */
        void (*status)(void *userdata, struct kms_status *st);
        /* Encrypt pt with the primary KEK. Returns the ciphertext length
         * (1..KMS_CIPHERTEXT_MAX) and writes the key id, or a negative errno. */
        int (*encrypt)(void *userdata, struct kms_call *call,
                       const uint8_t *pt, size_t pt_len,
                       uint8_t ct[KMS_CIPHERTEXT_MAX], char key_id[KMS_KEY_ID_MAX + 1]);
        /* Decrypt ct made under key_id. Returns the plaintext length
         * (1..KMS_PLAINTEXT_MAX), or a negative errno. */
        int (*decrypt)(void *userdata, struct kms_call *call, const char *key_id,
                       const uint8_t *ct, size_t ct_len, uint8_t pt[KMS_PLAINTEXT_MAX]);
};

struct kms_server_options {
        const uid_t *allowed_uids;        /* peers allowed to talk (SO_PEERCRED);
                                             none: only the server's own euid */
        size_t n_allowed_uids;
        uint32_t max_connections;         /* 0: default 64; when reached, the
                                             longest-idle connection makes room */
        uint32_t max_concurrent_streams;  /* per connection; 0: default 100 */
        uint32_t max_message_size;        /* request message (without the gRPC
                                             prefix); 0: default 64 KiB, which is
                                             also the most the service accepts */
        uint32_t max_header_list_size;    /* 0: default 16 KiB */
        uint64_t idle_timeout_usec;       /* no stream open; 0: default 5 min */
        uint64_t stream_timeout_usec;     /* request not complete; 0: default 10 s */
        uint64_t handshake_timeout_usec;  /* preface + SETTINGS; 0: default 5 s */
};

struct kms_server;

/* Create a server on event loop e. ops/userdata must outlive it.
 * Returns 0, -EINVAL (max_message_size above 64 KiB, or allowed_uids NULL with
 * n_allowed_uids > 0), or -ENOMEM. */
int kms_server_new(sd_event *e, const struct kms_server_options *opt,
                   const struct kms_backend_ops *ops, void *userdata,
                   struct kms_server **ret);
/* Serve a listening SOCK_STREAM unix socket; the server takes ownership of fd.
 * Returns 0, or a negative errno. */
int kms_server_add_listener(struct kms_server *s, int fd);
/* Stop accepting; let in-flight calls finish, then close connections; call
 * done(userdata) once everything is closed (or after the stream timeout). */
void kms_server_shutdown(struct kms_server *s, void (*done)(void *userdata), void *userdata);
/* Accepts NULL. Closes everything immediately. */
void kms_server_free(struct kms_server *s);
/* Event number done has happened: run again every parked call whose
 * park_token is <= done, with may_defer false so each gets a final answer;
 * calls waiting for a later event stay parked. done UINT64_MAX runs all of
 * them (shutdown). Parked calls that reach their deadline first get
 * DEADLINE_EXCEEDED. Accepts NULL. */
void kms_server_retry_parked(struct kms_server *s, uint64_t done);

/* The library never logs on its own. An agent that wants to hear about refused
 * peers, timeouts and protocol errors installs this hook: level is a syslog
 * priority (LOG_DEBUG..LOG_WARNING), peer is NULL before SO_PEERCRED is known,
 * msg has no trailing newline. fn NULL removes the hook. Hooks run inside the
 * server's callbacks: they must not call back into the server. */
typedef void (*kms_server_log_fn)(void *userdata, int level,
                                  const struct peer_cred *peer, const char *msg);
void kms_server_set_log(struct kms_server *s, kms_server_log_fn fn, void *userdata);

/* The methods of v2.KeyManagementService. */
enum kms_method {
        KMS_METHOD_STATUS,
        KMS_METHOD_ENCRYPT,
        KMS_METHOD_DECRYPT,
        _KMS_METHOD_MAX,
};
/* "Status", "Encrypt", "Decrypt"; NULL for anything else. */
const char *kms_method_name(enum kms_method m);

/* Called once per answered call, for metrics: method the enum kms_method the
 * :path named, or -1 for any other path, grpc_code the status sent and usec
 * the time from the request's HEADERS to the response being queued. */
typedef void (*kms_server_call_fn)(void *userdata, int method, int grpc_code, uint64_t usec);
void kms_server_set_call_observer(struct kms_server *s, kms_server_call_fn fn,
                                  void *userdata);
/* The name of a gRPC status code ("OK", "NOT_FOUND", ...; grpc/doc/
 * statuscodes.md), or NULL for a number that is none. */
const char *kms_grpc_code_to_string(int code);

/* Counters since kms_server_new (plus the current connection count). */
struct kms_server_stats {
        uint64_t connections_accepted;    /* admitted after the peer check */
        uint64_t connections_refused;     /* peer uid not allowed */
        uint64_t connections_over_limit;  /* closed: max_connections reached, none idle */
        uint64_t connections_evicted;     /* idle, closed to admit a new one */
        uint64_t connections_open;
        uint64_t protocol_errors;         /* connections dropped for bad HTTP/2 */
        uint64_t timeouts;                /* handshake, idle, stream, stalled output;
                                             a connection already closing after a
                                             timeout is not counted again when its
                                             output then stalls */
        uint64_t streams;                 /* requests (HTTP/2 streams) started */
};
void kms_server_get_stats(const struct kms_server *s, struct kms_server_stats *ret);
