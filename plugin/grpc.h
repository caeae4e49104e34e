/* gRPC pieces that know neither HTTP/2 nor protobuf (grpc.c): status codes,
 * the one errno -> gRPC status table, message framing, and the grpc-timeout
 * and grpc-message header encodings. Internal to plugin/. */
#pragma once

#include <stddef.h>
#include <stdint.h>

/* gRPC status codes (grpc/doc/statuscodes.md). */
enum grpc_code {
        GRPC_OK = 0,
        GRPC_CANCELLED = 1,
        GRPC_UNKNOWN = 2,
        GRPC_INVALID_ARGUMENT = 3,
        GRPC_DEADLINE_EXCEEDED = 4,
        GRPC_NOT_FOUND = 5,
        GRPC_ALREADY_EXISTS = 6,
        GRPC_PERMISSION_DENIED = 7,
        GRPC_RESOURCE_EXHAUSTED = 8,
        GRPC_FAILED_PRECONDITION = 9,
        GRPC_ABORTED = 10,
        GRPC_OUT_OF_RANGE = 11,
        GRPC_UNIMPLEMENTED = 12,
        GRPC_INTERNAL = 13,
        GRPC_UNAVAILABLE = 14,
        GRPC_DATA_LOSS = 15,
        GRPC_UNAUTHENTICATED = 16,
};

#define GRPC_FRAME_HEADER_SIZE 5
#define GRPC_MESSAGE_MAX 512      /* grpc-message text before percent-encoding */
#define GRPC_PATH_QUOTE_MAX 128   /* :path bytes quoted in a grpc-message */

/* Where a failure arose decides what its errno tells the client: -EBADMSG
 * from the backend is a ciphertext that failed authentication (the caller's
 * input), from the framing a broken unary stream. */
enum grpc_origin {
        GRPC_ORIGIN_SERVICE,      /* the request's content or the backend's
                                     answer (plugin.h, struct kms_backend_ops) */
        GRPC_ORIGIN_CALL,         /* the gRPC call around it: request headers,
                                     framing, size, deadline (call.c) */
};

struct grpc_status {
        unsigned http_status;     /* :status; 200 unless HTTP itself refused */
        enum grpc_code code;
        const char *message;      /* default grpc-message; never NULL */
};

/* The one errno -> gRPC status table. r is a negative errno from origin;
 * anything the table does not list (positive values included) is INTERNAL
 * with strerror's text. */
struct grpc_status grpc_status_from_errno(enum grpc_origin origin, int r);

/* Parse a grpc-timeout header value ("1S", "100m", "250000u"...; at most 8
 * digits and one unit). Returns 0 or -EINVAL. */
int grpc_timeout_parse(const char *value, uint64_t *ret_usec);
/* Percent-encode a grpc-message per the gRPC HTTP/2 spec (bytes outside
 * 0x20-0x7E and '%'). Always NUL-terminates; returns the length written, or
 * -ENOBUFS if out was too small (output truncated at a character boundary). */
int grpc_percent_encode(const char *in, char *out, size_t size);
/* Split a gRPC length-prefixed message off buf: the only place that reads
 * the prefix's compressed flag. Requires exactly one message filling buf.
 * Returns 0, -EBADMSG (truncated, trailing bytes, undefined flag), -EPROTO
 * (compressed flag set), -EMSGSIZE (length above max). */
int grpc_frame_unpack(const uint8_t *buf, size_t len, size_t max,
                      const uint8_t **ret_msg, size_t *ret_len);
/* Write the 5-byte prefix for an uncompressed message of len bytes. */
void grpc_frame_header(uint8_t out[GRPC_FRAME_HEADER_SIZE], size_t len);
