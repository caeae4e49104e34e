/* Seam inside plugin/ between the gRPC call (call.c, on server.c's HTTP/2
 * streams) and the service (service.c methods, proto.c messages). Nothing
 * here knows nghttp2; call.c and server.c know nothing of protobuf. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "grpc.h"
#include "plugin.h"

/* Request bounds enforced by kms_service_call() before anything is unpacked.
 * The largest valid request is a Decrypt with 1 KiB ciphertext, 1 KiB key id
 * and 32 KiB of annotations (KMS v2 proto), well under KMS_REQUEST_MAX; a
 * transport max_message_size above it buys nothing. */
#define KMS_REQUEST_MAX (64u * 1024u)     /* protobuf message, without prefix */
#define KMS_UID_MAX 256                   /* the apiserver sends a UUID */
#define KMS_ANNOTATIONS_MAX 64            /* entries */
#define KMS_ANNOTATIONS_SIZE_MAX (32u * 1024u) /* keys + values (KMS v2 proto) */

struct grpc_reply {
        enum grpc_code code;
        char message[GRPC_MESSAGE_MAX];   /* raw; call.c percent-encodes */
        enum grpc_origin origin;          /* unless code == OK: where it failed */
        int error;                        /* and the negative errno the table
                                             made code of (0 when OK) */
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

/* grpc.c: the method table */

/* True when path names a method of v2.KeyManagementService. */
bool kms_service_has_method(const char *path);
/* The method path names. Returns an enum kms_method, or -ENOENT. */
int kms_method_from_path(const char *path);
/* "Status", "Encrypt", "Decrypt" (metrics, logs); NULL if m is out of range. */
