/* The three methods of v2.KeyManagementService on plain structs: bounds from
 * the KMS v2 contract (plugin/kms_v2.proto, DESIGN.md), then the backend.
 * Never fails: every error becomes a gRPC status and a grpc-message. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "macro.h"
#include "proto.h"
#include "service.h"

/* explicit_bzero() rather than OPENSSL_cleanse(): the compiler may not drop
 * it either, and it runs at memset speed on the Decrypt hot path. */
static void wipe_plaintextp(uint8_t (*p)[KMS_PLAINTEXT_MAX]) {
        explicit_bzero(*p, sizeof(*p));
}

/* Fail the call with r, a negative errno from origin: the code from the one
 * table (grpc.c), the message from fmt. */
__attribute__((format(printf, 4, 5)))
static void reply_errno(struct grpc_reply *reply, enum grpc_origin origin, int r,
                        const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(reply->message, sizeof(reply->message), fmt, ap);
        va_end(ap);
        reply->code = grpc_status_from_errno(origin, r).code;
        reply->origin = origin;
        reply->error = r;
        reply->body = NULL;
        reply->body_len = 0;
}

/* A request that failed proto_request_scan() or proto_request_unpack(). */
static void reply_malformed(struct grpc_reply *reply, int r, const char *what) {
        if (r == -ENOMEM)
                reply_errno(reply, GRPC_ORIGIN_SERVICE, r, "out of memory");
        else if (r == -E2BIG)
                reply_errno(reply, GRPC_ORIGIN_SERVICE, -EBADMSG, "malformed %s: too many fields", what);
        else
                reply_errno(reply, GRPC_ORIGIN_SERVICE, -EBADMSG, "malformed %s", what);
}

/* The backend failed: its explanation if it gave one, else the table's. */
static void reply_backend_error(struct grpc_reply *reply, int r, struct kms_call *call,
                                const char *op) {
        call->error[sizeof(call->error) - 1] = '\0';
        if (call->error[0])
                reply_errno(reply, GRPC_ORIGIN_SERVICE, r, "%s", call->error);
        else
                reply_errno(reply, GRPC_ORIGIN_SERVICE, r, "%s: %s", op,
                            grpc_status_from_errno(GRPC_ORIGIN_SERVICE, r).message);
}

/* buf came from a proto_*_response_pack() with GRPC_FRAME_HEADER_SIZE bytes
 * of headroom: put the prefix there and hand it over. */
static void reply_body(struct grpc_reply *reply, int r, uint8_t *buf, size_t len) {
        if (r < 0) {
                reply_errno(reply, GRPC_ORIGIN_SERVICE, r, "out of memory");
                return;
        }
        grpc_frame_header(buf, len - GRPC_FRAME_HEADER_SIZE);
        reply->code = GRPC_OK;
        reply->body = buf;
        reply->body_len = len;
}

static void call_status(const struct kms_backend_ops *ops, void *userdata,
                        const uint8_t *msg, size_t len, struct grpc_reply *reply) {
        _cleanup_(proto_request_done) struct proto_request req;
        struct kms_status st;
        const char *healthz = st.healthz, *key_id = st.key_id;
        uint8_t *buf = NULL;
        size_t buf_len = 0;
        int r;

        proto_request_init(&req);
        r = proto_request_scan(&req, KMS_METHOD_STATUS, msg, len);
        if (r >= 0)
                r = proto_request_unpack(&req);
        if (r < 0)
                return reply_malformed(reply, r, "StatusRequest");

        st.healthz[0] = '\0';
        st.key_id[0] = '\0';
        ops->status(userdata, &st);
        st.healthz[sizeof(st.healthz) - 1] = '\0';
        st.key_id[sizeof(st.key_id) - 1] = '\0';

        /* proto3 strings must be UTF-8 or the apiserver's unmarshal fails and
         * it reports a transport error instead of our reason. The apiserver
         * also rejects an empty key_id, so "ok" without one is not ok. */
        if (!proto_utf8_valid(key_id, strlen(key_id))) {
                key_id = "";
                healthz = "backend key id is not UTF-8";
        } else if (healthz[0] == '\0')
                healthz = "backend reported no health";
        else if (!proto_utf8_valid(healthz, strlen(healthz)))
                healthz = "backend health is not UTF-8";
        if (strcmp(healthz, "ok") == 0 && key_id[0] == '\0')
                healthz = "no primary key";

        /* Status always answers OK: the apiserver reads health from the
         * message (KMS v2 proto, StatusResponse). */
        r = proto_status_response_pack("v2", healthz, key_id, GRPC_FRAME_HEADER_SIZE,
                                       &buf, &buf_len);
        reply_body(reply, r, buf, buf_len);
}

static void call_encrypt(const struct kms_backend_ops *ops, void *userdata,
                         const uint8_t *msg, size_t len, const struct peer_cred *peer,
                         struct grpc_reply *reply) {
        /* Holds the only copy of the request plaintext this layer makes; wiped
         * on return, i.e. right after the reply is packed. */
        _cleanup_(proto_request_done) struct proto_request req;
        const struct proto_encrypt_request *e = &req.encrypt;
        uint8_t ct[KMS_CIPHERTEXT_MAX];
        char key_id[KMS_KEY_ID_MAX + 1];
        uint8_t *buf = NULL;
        size_t buf_len = 0, key_id_len;
        int r;

        proto_request_init(&req);
        r = proto_request_scan(&req, KMS_METHOD_ENCRYPT, msg, len);
        if (r < 0)
                return reply_malformed(reply, r, "EncryptRequest");

        /* Bounds before unpacking (STYLE 9). */
        if (e->plaintext_len == 0)
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EINVAL, "plaintext is empty");
        if (e->plaintext_len > KMS_PLAINTEXT_MAX)
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EINVAL,
                                   "plaintext is %zu bytes, at most %d allowed",
                                   e->plaintext_len, KMS_PLAINTEXT_MAX);
        if (e->uid_len > KMS_UID_MAX)
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EINVAL,
                                   "uid is %zu bytes, at most %d allowed",
                                   e->uid_len, KMS_UID_MAX);

        r = proto_request_unpack(&req);
        if (r < 0)
                return reply_malformed(reply, r, "EncryptRequest");

        struct kms_call call = { .request_uid = e->uid, .peer = peer };
        /* A backend must NUL-terminate key_id; the last byte starts as a
         * non-NUL sentinel, so one that fills the buffer without a NUL is
         * caught by the length check below, never read past. */
        key_id[0] = '\0';
        key_id[KMS_KEY_ID_MAX] = 'x';
        r = ops->encrypt(userdata, &call, e->plaintext, e->plaintext_len, ct, key_id);
        if (r < 0)
                return reply_backend_error(reply, r, &call, "encrypt");

        /* What the apiserver checks of EncryptResponse (KMS v2 proto):
         * ciphertext and key_id non-empty and at most 1 KiB; key_id must also
         * be UTF-8 to unmarshal. A backend breaking that is our bug, not the
         * caller's. */
        if (r == 0 || r > KMS_CIPHERTEXT_MAX)
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EIO,
                                   "encrypt: backend returned %d bytes of ciphertext", r);
        key_id_len = strnlen(key_id, sizeof(key_id));
        if (key_id_len == 0 || key_id_len > KMS_KEY_ID_MAX ||
            !proto_utf8_valid(key_id, key_id_len))
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EIO, "encrypt: backend returned an invalid key id");

        /* No annotations. The ciphertext is self-describing (format version
         * and key id are bound into it as GCM additional data), and the
         * apiserver stores annotations next to it in etcd and hands them back
         * unauthenticated on Decrypt, so nothing may depend on them; leaving
         * them out also saves their bytes in every stored object and the
         * apiserver's rules on them (DNS-name keys, 32 KiB) cannot be broken. */
        r = proto_encrypt_response_pack(ct, (size_t) r, key_id, GRPC_FRAME_HEADER_SIZE,
                                        &buf, &buf_len);
        reply_body(reply, r, buf, buf_len);
}

static void call_decrypt(const struct kms_backend_ops *ops, void *userdata, bool may_defer,
                         const uint8_t *msg, size_t len, const struct peer_cred *peer,
                         struct grpc_reply *reply) {
        _cleanup_(proto_request_done) struct proto_request req;
        /* The decrypted DEK seed; wiped on return, after the reply is packed
         * (the packed copy is wiped by grpc_reply_done()). */
        _cleanup_(wipe_plaintextp) uint8_t pt[KMS_PLAINTEXT_MAX];
        const struct proto_decrypt_request *d = &req.decrypt;
        uint8_t *buf = NULL;
        size_t buf_len = 0;
        int r;

        proto_request_init(&req);
        r = proto_request_scan(&req, KMS_METHOD_DECRYPT, msg, len);
        if (r < 0)
                return reply_malformed(reply, r, "DecryptRequest");

        /* Bounds before unpacking (STYLE 9). The apiserver sends back what
         * Encrypt returned: ciphertext and key_id of 1..1024 bytes (KMS v2
         * proto), annotations of at most 32 KiB; ours has none, so any are
         * ignored once they pass the bounds. */
        if (d->ciphertext_len == 0)
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EINVAL, "ciphertext is empty");
        if (d->ciphertext_len > KMS_CIPHERTEXT_MAX)
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EINVAL,
                                   "ciphertext is %zu bytes, at most %d allowed",
                                   d->ciphertext_len, KMS_CIPHERTEXT_MAX);
        if (d->key_id_len == 0)
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EINVAL, "key_id is empty");
        if (d->key_id_len > KMS_KEY_ID_MAX)
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EINVAL,
                                   "key_id is %zu bytes, at most %d allowed",
                                   d->key_id_len, KMS_KEY_ID_MAX);
        if (d->uid_len > KMS_UID_MAX)
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EINVAL,
                                   "uid is %zu bytes, at most %d allowed",
                                   d->uid_len, KMS_UID_MAX);
        if (d->n_annotations > KMS_ANNOTATIONS_MAX)
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EINVAL,
                                   "%zu annotations, at most %d allowed",
                                   d->n_annotations, KMS_ANNOTATIONS_MAX);
        if (d->annotations_size > KMS_ANNOTATIONS_SIZE_MAX)
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EINVAL,
                                   "annotations are %zu bytes, at most %u allowed",
                                   d->annotations_size, KMS_ANNOTATIONS_SIZE_MAX);

        r = proto_request_unpack(&req);
        if (r < 0)
                return reply_malformed(reply, r, "DecryptRequest");

        struct kms_call call = { .request_uid = d->uid, .peer = peer, .may_defer = may_defer };
        r = ops->decrypt(userdata, &call, d->key_id, d->ciphertext, d->ciphertext_len, pt);
        if (r == -EAGAIN && may_defer) {
                /* parked: the transport calls again with the same body once
                 * the event the backend named has happened */
                reply->deferred = true;
                reply->park_token = call.park_token;
                return;
        }
        if (r < 0)
                return reply_backend_error(reply, r, &call, "decrypt");
        if (r == 0 || r > KMS_PLAINTEXT_MAX)
                return reply_errno(reply, GRPC_ORIGIN_SERVICE, -EIO,
                                   "decrypt: backend returned %d bytes of plaintext", r);

        r = proto_decrypt_response_pack(pt, (size_t) r, GRPC_FRAME_HEADER_SIZE, &buf, &buf_len);
        reply_body(reply, r, buf, buf_len);
}

void kms_service_call(const struct kms_backend_ops *ops, void *userdata,
                      const char *path, const uint8_t *body, size_t body_len,
                      const struct peer_cred *peer, bool may_defer, struct grpc_reply *reply) {
        const uint8_t *msg;
        size_t len;
        int m, r;

        reply->code = GRPC_OK;
        reply->message[0] = '\0';
        reply->origin = GRPC_ORIGIN_SERVICE;
        reply->error = 0;
        reply->body = NULL;
        reply->body_len = 0;
        reply->deferred = false;
        reply->park_token = 0;

        m = kms_method_from_path(path);
        if (m < 0)
                return reply_errno(reply, GRPC_ORIGIN_CALL, m, "unknown method %.*s",
                                   GRPC_PATH_QUOTE_MAX, path ?: "");

        r = grpc_frame_unpack(body, body_len, KMS_REQUEST_MAX, &msg, &len);
        if (r == -EMSGSIZE)
                return reply_errno(reply, GRPC_ORIGIN_CALL, r, "request larger than %u bytes",
                                   KMS_REQUEST_MAX);
        if (r < 0)
                return reply_errno(reply, GRPC_ORIGIN_CALL, r, "%s",
                                   grpc_status_from_errno(GRPC_ORIGIN_CALL, r).message);

        switch (m) {
        case KMS_METHOD_STATUS:
                return call_status(ops, userdata, msg, len, reply);
        case KMS_METHOD_ENCRYPT:
                return call_encrypt(ops, userdata, msg, len, peer, reply);
        case KMS_METHOD_DECRYPT:
                return call_decrypt(ops, userdata, may_defer, msg, len, peer, reply);
        }
}

void grpc_reply_done(struct grpc_reply *reply) {
        if (!reply)
                return;
        /* A Decrypt reply carries the DEK seed. */
        if (reply->body)
                explicit_bzero(reply->body, reply->body_len);
        free(reply->body);
        reply->body = NULL;
        reply->body_len = 0;
}
