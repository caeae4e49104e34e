/* Seam inside plugin/ between the HTTP/2 transport (server.c) and the gRPC
 * service (grpc.c framing, proto.c messages, service.c methods). Nothing here
 * knows nghttp2; server.c knows nothing of protobuf. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "plugin.h"

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

/* Request bounds enforced by kms_service_call() before anything is unpacked.
 * The largest valid request is a Decrypt with 1 KiB ciphertext, 1 KiB key id
 * and 32 KiB of annotations (KMS v2 proto), well under KMS_REQUEST_MAX; a
 * transport max_message_size above it buys nothing. */
#define KMS_REQUEST_MAX (64u * 1024u)     /* protobuf message, without prefix */
#define KMS_UID_MAX 256                   /* the apiserver sends a UUID */
#define KMS_ANNOTATIONS_MAX 64            /* entries */
#define KMS_ANNOTATIONS_SIZE_MAX (32u * 1024u) /* keys + values (KMS v2 proto) */

/* The methods of v2.KeyManagementService. */
enum kms_method {
        KMS_METHOD_STATUS,
        KMS_METHOD_ENCRYPT,
        KMS_METHOD_DECRYPT,
        _KMS_METHOD_MAX,
};

struct grpc_reply {
        enum grpc_code code;
        char message[GRPC_MESSAGE_MAX];   /* raw; the transport percent-encodes */
        uint8_t *body;                    /* framed response (prefix + protobuf);
                                             malloc'ed; NULL unless code == OK */
        size_t body_len;
        bool deferred;                    /* the backend parked the call (-EAGAIN
                                             with may_defer): no answer yet */
        uint64_t park_token;              /* when deferred: the backend's
                                             kms_call.park_token; else 0 */
};

/* Handle one unary call. path is the :path pseudo-header; body is the complete
 * request DATA: exactly one length-prefixed, uncompressed message. Never
 * fails: every error becomes reply->code/message. Wipes request plaintext. */
void kms_service_call(const struct kms_backend_ops *ops, void *userdata,
                      const char *path, const uint8_t *body, size_t body_len,
                      const struct peer_cred *peer, bool may_defer, struct grpc_reply *reply);
/* Free (and wipe) reply->body. Accepts a zeroed reply. */
void grpc_reply_done(struct grpc_reply *reply);

/* grpc.c */

/* True when path names a method of v2.KeyManagementService. */
int kms_service_has_method(const char *path);
/* The method path names. Returns an enum kms_method, or -ENOENT. */
int kms_method_from_path(const char *path);
/* "Status", "Encrypt", "Decrypt" (metrics, logs); NULL if m is out of range. */
const char *kms_method_name(enum kms_method m);
/* Parse a grpc-timeout header value ("1S", "100m", "250000u"...; at most 8
 * digits and one unit). Returns 0 or -EINVAL. */
int grpc_timeout_parse(const char *value, uint64_t *ret_usec);
/* Percent-encode a grpc-message per the gRPC HTTP/2 spec (bytes outside
 * 0x20-0x7E and '%'). Always NUL-terminates; returns the length written, or
 * -ENOBUFS if out was too small (output truncated at a character boundary). */
int grpc_percent_encode(const char *in, char *out, size_t size);
/* Map a backend's negative errno to a gRPC code (the one table). */
enum grpc_code grpc_code_from_errno(int r);
/* Map a grpc_frame_unpack() failure to the code grpc-go answers with:
 * -EMSGSIZE RESOURCE_EXHAUSTED, -EPROTO UNIMPLEMENTED (we accept no
 * grpc-encoding), anything else INTERNAL (a broken unary stream). */
enum grpc_code grpc_code_from_frame_error(int r);
/* Split a gRPC length-prefixed message off buf. Requires exactly one message
 * filling buf. Returns 0, -EBADMSG (truncated or trailing bytes), -EPROTO
 * (compressed flag set), -EMSGSIZE (length above max). */
int grpc_frame_unpack(const uint8_t *buf, size_t len, size_t max,
                      const uint8_t **ret_msg, size_t *ret_len);
/* Write the 5-byte prefix for an uncompressed message of len bytes. */
void grpc_frame_header(uint8_t out[GRPC_FRAME_HEADER_SIZE], size_t len);
