/* One gRPC call on one HTTP/2 stream (call.c), following gRPC over HTTP/2
 * (grpc/doc/PROTOCOL-HTTP2.md): request headers in, response header blocks
 * out. Knows neither nghttp2 nor protobuf: server.c moves the frames and the
 * body, service.c answers the call. Internal to plugin/. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "grpc.h"

struct grpc_reply;

/* One header field to send; both NUL-terminated. */
struct grpc_field {
        const char *name;
        const char *value;
};

/* What the request headers said. Zeroed is a call with none seen yet. */
struct grpc_call {
        char *path;                       /* :path; NULL until seen */
        uint64_t timeout_usec;            /* grpc-timeout, when has_timeout */
        bool has_timeout:1;
        bool timeout_bad:1;
        bool post:1;                      /* :method POST */
        bool content_type_ok:1;
        bool encoding_compressed:1;       /* grpc-encoding other than identity */
};

#define GRPC_HEAD_FIELDS_MAX 5

/* A response HEADERS block: the headers before the message, or the whole
 * answer (Trailers-Only). */
struct grpc_head {
        struct grpc_field fields[GRPC_HEAD_FIELDS_MAX];
        size_t n_fields;
        enum grpc_code code;              /* the status the call ends with */
        bool trailers_only;               /* no message follows: END_STREAM */
        /* private: what fields point into */
        char http_status[4];
        char grpc_status[4];
        char grpc_message[GRPC_MESSAGE_MAX * 3 + 1];
};

/* The trailers after the message of a call that succeeded. */
extern const struct grpc_field grpc_trailers_ok[1];

/* Free what the call holds; leaves it zeroed. */
void grpc_call_done(struct grpc_call *call);
/* Take one request header field; value is NUL-terminated at valuelen (as
 * nghttp2 hands it over). Returns 0, or -ENOMEM. */
int grpc_call_header(struct grpc_call *call, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen);
/* The request headers are complete. Returns 0 if the call may go on, else
 * the negative errno (GRPC_ORIGIN_CALL) to answer with grpc_head_from_errno(). */
int grpc_call_check(const struct grpc_call *call);
/* The answer to a failure r of the call (GRPC_ORIGIN_CALL), Trailers-Only;
 * message NULL says what the errno table says. */
void grpc_head_from_errno(struct grpc_head *h, const struct grpc_call *call, int r,
                          const char *message);
/* The answer to the service's reply: response headers when it carries a
 * message, else Trailers-Only. */
void grpc_head_from_reply(struct grpc_head *h, const struct grpc_call *call,
                          const struct grpc_reply *reply);
