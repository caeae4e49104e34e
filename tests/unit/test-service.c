/* plugin/service.c (with proto.c and grpc.c): kms_service_call() against a
 * fake backend, requests packed and replies unpacked with protobuf-c as a
 * client would. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kms_v2.pb-c.h"
#include "proto.h"
#include "service.h"

#define PATH_STATUS "/v2.KeyManagementService/Status"
#define PATH_ENCRYPT "/v2.KeyManagementService/Encrypt"
#define PATH_DECRYPT "/v2.KeyManagementService/Decrypt"

/* ---- fake backend ------------------------------------------------------- */

struct fake {
        /* behaviour */
        const char *healthz;
        const char *key_id;               /* Status and Encrypt */
        int ret;                          /* < 0: fail with it */
        const char *error;                /* written to call->error on failure */
        int ct_len;                       /* > 0: override the length returned */
        int pt_len;
        int key_id_fill;                  /* > 0: fill key_id with this many 'k', no NUL */
        bool may_defer;                   /* passed to kms_service_call */
        bool park_unknown;                /* unknown key id: -EAGAIN when allowed */
        uint64_t park_token;              /* ... naming this event */
        /* what the backend saw */
        unsigned calls;
        char uid[KMS_UID_MAX + 1];
        char seen_key_id[KMS_KEY_ID_MAX + 1];
        const struct peer_cred *peer;
};

static void fake_status(void *userdata, struct kms_status *st) {
        struct fake *f = userdata;

        f->calls++;
        snprintf(st->healthz, sizeof(st->healthz), "%s", f->healthz);
        snprintf(st->key_id, sizeof(st->key_id), "%s", f->key_id);
}

/* "Ciphertext" is 'C', the plaintext XOR 0x5a: enough to see a round trip. */
static int fake_encrypt(void *userdata, struct kms_call *call, const uint8_t *pt, size_t pt_len,
                        uint8_t ct[KMS_CIPHERTEXT_MAX], char key_id[KMS_KEY_ID_MAX + 1]) {
        struct fake *f = userdata;

        f->calls++;
        f->peer = call->peer;
        snprintf(f->uid, sizeof(f->uid), "%s", call->request_uid);
        assert_string_equal(call->error, "");
        if (f->ret < 0) {
                if (f->error)
                        snprintf(call->error, sizeof(call->error), "%s", f->error);
                return f->ret;
        }
        memset(ct, 'c', KMS_CIPHERTEXT_MAX);
        ct[0] = 'C';
        for (size_t i = 0; i < pt_len; i++)
                ct[1 + i] = pt[i] ^ 0x5a;
        if (f->key_id_fill > 0)
                memset(key_id, 'k', (size_t) f->key_id_fill);
        else
                snprintf(key_id, KMS_KEY_ID_MAX + 1, "%s", f->key_id);
        return f->ct_len != 0 ? f->ct_len : (int) pt_len + 1;
}

static int fake_decrypt(void *userdata, struct kms_call *call, const char *key_id,
                        const uint8_t *ct, size_t ct_len, uint8_t pt[KMS_PLAINTEXT_MAX]) {
        struct fake *f = userdata;

        f->calls++;
        f->peer = call->peer;
        snprintf(f->uid, sizeof(f->uid), "%s", call->request_uid);
        snprintf(f->seen_key_id, sizeof(f->seen_key_id), "%s", key_id);
        if (f->ret < 0) {
                if (f->error)
                        snprintf(call->error, sizeof(call->error), "%s", f->error);
                return f->ret;
        }
        assert_int_equal(call->park_token, 0);
        if (strcmp(key_id, f->key_id) != 0) {
                if (!f->park_unknown || !call->may_defer)
                        return -ENOENT;
                call->park_token = f->park_token;
                return -EAGAIN;
        }
        if (ct_len < 1 || ct[0] != 'C' || ct_len - 1 > KMS_PLAINTEXT_MAX)
                return -EBADMSG;
        for (size_t i = 1; i < ct_len; i++)
                pt[i - 1] = ct[i] ^ 0x5a;
        return f->pt_len != 0 ? f->pt_len : (int) ct_len - 1;
}

static const struct kms_backend_ops fake_ops = {
        .status = fake_status,
        .encrypt = fake_encrypt,
        .decrypt = fake_decrypt,
};

static int setup(void **state) {
        struct fake *f = calloc(1, sizeof(*f));

        assert_non_null(f);
        f->healthz = "ok";
        f->key_id = "tpmkms:v1:central-1:abcdef";
        *state = f;
        return 0;
}

static int teardown(void **state) {
        free(*state);
        return 0;
}

/* ---- helpers ------------------------------------------------------------ */

static const struct peer_cred test_peer = { .pid = 1234, .uid = 0, .gid = 0 };

/* Frame raw protobuf bytes and call. */
static void call_raw(struct fake *f, const char *path, const void *msg, size_t len,
                     struct grpc_reply *reply) {
        uint8_t *body = malloc(GRPC_FRAME_HEADER_SIZE + len);

        assert_non_null(body);
        grpc_frame_header(body, len);
        if (len > 0)
                memcpy(body + GRPC_FRAME_HEADER_SIZE, msg, len);
        kms_service_call(&fake_ops, f, path, body, GRPC_FRAME_HEADER_SIZE + len, &test_peer, f->may_defer, reply);
        free(body);
}

static void call_msg(struct fake *f, const char *path, const ProtobufCMessage *m,
                     struct grpc_reply *reply) {
        size_t len = protobuf_c_message_get_packed_size(m);
        uint8_t *buf = malloc(len + 1);

        assert_non_null(buf);
        assert_int_equal(protobuf_c_message_pack(m, buf), len);
        call_raw(f, path, buf, len, reply);
        free(buf);
}

/* The message inside an OK reply. */
static const uint8_t *reply_msg(const struct grpc_reply *reply, size_t *len) {
        const uint8_t *msg;

        assert_int_equal(reply->code, GRPC_OK);
        assert_string_equal(reply->message, "");
        assert_non_null(reply->body);
        assert_int_equal(grpc_frame_unpack(reply->body, reply->body_len, reply->body_len, &msg, len), 0);
        return msg;
}

static void assert_error(const struct grpc_reply *reply, enum grpc_code code, const char *message) {
        assert_int_equal(reply->code, code);
        assert_null(reply->body);
        assert_int_equal(reply->body_len, 0);
        if (message)
                assert_string_equal(reply->message, message);
        else
                assert_string_not_equal(reply->message, "");
}

static void encrypt(struct fake *f, const uint8_t *pt, size_t pt_len, const char *uid,
                    struct grpc_reply *reply) {
        V2__EncryptRequest req = V2__ENCRYPT_REQUEST__INIT;

        req.plaintext = (ProtobufCBinaryData) { .len = pt_len, .data = (uint8_t *) pt };
        req.uid = (char *) uid;
        call_msg(f, PATH_ENCRYPT, &req.base, reply);
}

static void decrypt(struct fake *f, const uint8_t *ct, size_t ct_len, const char *key_id,
                    const char *uid, struct grpc_reply *reply) {
        V2__DecryptRequest req = V2__DECRYPT_REQUEST__INIT;

        req.ciphertext = (ProtobufCBinaryData) { .len = ct_len, .data = (uint8_t *) ct };
        req.key_id = (char *) key_id;
        req.uid = (char *) uid;
        call_msg(f, PATH_DECRYPT, &req.base, reply);
}

static void status(struct fake *f, V2__StatusResponse **ret) {
        V2__StatusRequest req = V2__STATUS_REQUEST__INIT;
        struct grpc_reply reply;
        const uint8_t *msg;
        size_t len;

        call_msg(f, PATH_STATUS, &req.base, &reply);
        msg = reply_msg(&reply, &len);
        *ret = v2__status_response__unpack(NULL, len, msg);
        assert_non_null(*ret);
        grpc_reply_done(&reply);
}

/* ---- Status ------------------------------------------------------------- */

static void test_kms_service_call_status_good(void **state) {
        struct fake *f = *state;
        V2__StatusResponse *resp;

        status(f, &resp);
        assert_string_equal(resp->version, "v2");
        assert_string_equal(resp->healthz, "ok");
        assert_string_equal(resp->key_id, "tpmkms:v1:central-1:abcdef");
        assert_int_equal(f->calls, 1);
        v2__status_response__free_unpacked(resp, NULL);
}

static void test_kms_service_call_status_empty_key_id(void **state) {
        struct fake *f = *state;
        V2__StatusResponse *resp;

        /* the apiserver rejects an empty key_id, so this cannot be "ok" */
        f->key_id = "";
        status(f, &resp);
        assert_string_equal(resp->version, "v2");
        assert_string_equal(resp->healthz, "no primary key");
        assert_string_equal(resp->key_id, "");
        v2__status_response__free_unpacked(resp, NULL);
}

static void test_kms_service_call_status_unhealthy(void **state) {
        struct fake *f = *state;
        V2__StatusResponse *resp;

        f->healthz = "sealed cache: measured boot mismatch, PCRs sha256:7";
        status(f, &resp);
        assert_string_equal(resp->healthz, "sealed cache: measured boot mismatch, PCRs sha256:7");
        assert_string_equal(resp->key_id, "tpmkms:v1:central-1:abcdef");
        v2__status_response__free_unpacked(resp, NULL);

        f->healthz = "";
        status(f, &resp);
        assert_string_not_equal(resp->healthz, "ok");
        assert_string_not_equal(resp->healthz, "");
        v2__status_response__free_unpacked(resp, NULL);
}

static void test_kms_service_call_status_not_utf8(void **state) {
        struct fake *f = *state;
        V2__StatusResponse *resp;

        /* a Go client would fail to unmarshal this; report it instead */
        f->key_id = "key-\xff";
        status(f, &resp);
        assert_string_not_equal(resp->healthz, "ok");
        assert_string_equal(resp->key_id, "");
        v2__status_response__free_unpacked(resp, NULL);

        f->key_id = "k1";
        f->healthz = "broken \xc0\x80";
        status(f, &resp);
        assert_string_equal(resp->healthz, "backend health is not UTF-8");
        v2__status_response__free_unpacked(resp, NULL);
}

/* ---- Encrypt ------------------------------------------------------------ */

static void test_kms_service_call_encrypt_round_trip(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        uint8_t seed[32];
        V2__EncryptResponse *er;
        V2__DecryptResponse *dr;
        const uint8_t *msg;
        size_t len;

        for (size_t i = 0; i < sizeof(seed); i++)
                seed[i] = (uint8_t) (i * 7 + 1);

        encrypt(f, seed, sizeof(seed), "6a6ad5e6-1111-4f5e-9c33-0c7d9f0f4a11", &reply);
        msg = reply_msg(&reply, &len);
        er = v2__encrypt_response__unpack(NULL, len, msg);
        assert_non_null(er);
        assert_int_equal(er->ciphertext.len, sizeof(seed) + 1);
        assert_string_equal(er->key_id, "tpmkms:v1:central-1:abcdef");
        assert_int_equal(er->n_annotations, 0);
        assert_string_equal(f->uid, "6a6ad5e6-1111-4f5e-9c33-0c7d9f0f4a11");
        assert_ptr_equal(f->peer, &test_peer);
        grpc_reply_done(&reply);
        assert_null(reply.body);

        decrypt(f, er->ciphertext.data, er->ciphertext.len, er->key_id, "uid-2", &reply);
        msg = reply_msg(&reply, &len);
        dr = v2__decrypt_response__unpack(NULL, len, msg);
        assert_non_null(dr);
        assert_int_equal(dr->plaintext.len, sizeof(seed));
        assert_memory_equal(dr->plaintext.data, seed, sizeof(seed));
        assert_string_equal(f->uid, "uid-2");
        assert_string_equal(f->seen_key_id, "tpmkms:v1:central-1:abcdef");
        grpc_reply_done(&reply);
        grpc_reply_done(&reply);          /* idempotent */

        v2__decrypt_response__free_unpacked(dr, NULL);
        v2__encrypt_response__free_unpacked(er, NULL);
}

static void test_kms_service_call_encrypt_empty_plaintext(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;

        encrypt(f, NULL, 0, "uid", &reply);
        assert_error(&reply, GRPC_INVALID_ARGUMENT, "plaintext is empty");
        assert_int_equal(f->calls, 0);
}

static void test_kms_service_call_encrypt_oversize_plaintext(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        uint8_t pt[KMS_PLAINTEXT_MAX + 1] = { 0 };

        encrypt(f, pt, sizeof(pt), "uid", &reply);
        assert_error(&reply, GRPC_INVALID_ARGUMENT, "plaintext is 513 bytes, at most 512 allowed");
        assert_int_equal(f->calls, 0);

        /* the limit itself is fine (the fake's ciphertext is one byte more) */
        encrypt(f, pt, KMS_PLAINTEXT_MAX, "uid", &reply);
        assert_int_equal(reply.code, GRPC_OK);
        grpc_reply_done(&reply);
}

static void test_kms_service_call_encrypt_uid_too_long(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        char uid[KMS_UID_MAX + 2];
        uint8_t pt[32] = { 1 };

        memset(uid, 'u', sizeof(uid) - 1);
        uid[sizeof(uid) - 1] = '\0';
        encrypt(f, pt, sizeof(pt), uid, &reply);
        assert_error(&reply, GRPC_INVALID_ARGUMENT, NULL);
        assert_int_equal(f->calls, 0);
}

static void test_kms_service_call_encrypt_backend_errors(void **state) {
        static const struct {
                int r;
                enum grpc_code code;
                const char *message;
        } t[] = {
                { -EINVAL, GRPC_INVALID_ARGUMENT, "encrypt: invalid request" },
                { -ENOENT, GRPC_NOT_FOUND, "encrypt: unknown key id" },
                { -ENOKEY, GRPC_UNAVAILABLE, "encrypt: no keys unsealed" },
                { -EPERM, GRPC_FAILED_PRECONDITION, "encrypt: measured boot refused the key cache" },
                { -EIO, GRPC_INTERNAL, "encrypt: Input/output error" },
                { -ENOMEM, GRPC_INTERNAL, "encrypt: Cannot allocate memory" },
                { -99999, GRPC_INTERNAL, "encrypt: internal error" },
        };
        struct fake *f = *state;
        struct grpc_reply reply;
        uint8_t pt[32] = { 1 };

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
                f->ret = t[i].r;
                f->error = NULL;
                encrypt(f, pt, sizeof(pt), "uid", &reply);
                assert_error(&reply, t[i].code, t[i].message);

                /* the backend's own explanation wins */
                f->error = "sealed cache: measured boot mismatch, PCR 7 changed";
                encrypt(f, pt, sizeof(pt), "uid", &reply);
                assert_error(&reply, t[i].code, "sealed cache: measured boot mismatch, PCR 7 changed");
        }
}

static void test_kms_service_call_encrypt_backend_bad_output(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        uint8_t pt[32] = { 1 };

        /* ciphertext must be 1..1024 bytes (KMS v2 proto) */
        f->ct_len = KMS_CIPHERTEXT_MAX + 1;
        encrypt(f, pt, sizeof(pt), "uid", &reply);
        assert_error(&reply, GRPC_INTERNAL, NULL);

        f->ct_len = KMS_CIPHERTEXT_MAX;
        encrypt(f, pt, sizeof(pt), "uid", &reply);
        assert_int_equal(reply.code, GRPC_OK);
        grpc_reply_done(&reply);
        f->ct_len = 0;

        /* key_id must be 1..1024 bytes and UTF-8 */
        f->key_id = "";
        encrypt(f, pt, sizeof(pt), "uid", &reply);
        assert_error(&reply, GRPC_INTERNAL, "encrypt: backend returned an invalid key id");

        f->key_id_fill = KMS_KEY_ID_MAX + 1;  /* no NUL anywhere */
        encrypt(f, pt, sizeof(pt), "uid", &reply);
        assert_error(&reply, GRPC_INTERNAL, "encrypt: backend returned an invalid key id");

        f->key_id_fill = KMS_KEY_ID_MAX;
        encrypt(f, pt, sizeof(pt), "uid", &reply);
        assert_error(&reply, GRPC_INTERNAL, "encrypt: backend returned an invalid key id");
        f->key_id_fill = 0;

        f->key_id = "key\xed\xa0\x80";        /* a UTF-16 surrogate */
        encrypt(f, pt, sizeof(pt), "uid", &reply);
        assert_error(&reply, GRPC_INTERNAL, "encrypt: backend returned an invalid key id");
}

static void test_kms_service_call_encrypt_unknown_fields(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        /* plaintext "ab", uid "u", then field 15 (varint) and field 16 (bytes)
         * that a newer apiserver might send: proto3 skips them */
        const uint8_t msg[] = { 0x0a, 2, 'a', 'b', 0x12, 1, 'u', 0x78, 0x01, 0x82, 0x01, 1, 'x' };

        call_raw(f, PATH_ENCRYPT, msg, sizeof(msg), &reply);
        assert_int_equal(reply.code, GRPC_OK);
        assert_string_equal(f->uid, "u");
        grpc_reply_done(&reply);
}

/* ---- Decrypt ------------------------------------------------------------ */

static void test_kms_service_call_decrypt_bounds(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        uint8_t ct[KMS_CIPHERTEXT_MAX + 1];
        char key_id[KMS_KEY_ID_MAX + 2];
        char uid[KMS_UID_MAX + 2];

        memset(ct, 'C', sizeof(ct));
        memset(key_id, 'k', sizeof(key_id) - 1);
        key_id[sizeof(key_id) - 1] = '\0';
        memset(uid, 'u', sizeof(uid) - 1);
        uid[sizeof(uid) - 1] = '\0';

        decrypt(f, ct, 0, "k1", "uid", &reply);
        assert_error(&reply, GRPC_INVALID_ARGUMENT, "ciphertext is empty");
        decrypt(f, ct, KMS_CIPHERTEXT_MAX + 1, "k1", "uid", &reply);
        assert_error(&reply, GRPC_INVALID_ARGUMENT, "ciphertext is 1025 bytes, at most 1024 allowed");
        decrypt(f, ct, 16, "", "uid", &reply);
        assert_error(&reply, GRPC_INVALID_ARGUMENT, "key_id is empty");
        decrypt(f, ct, 16, key_id, "uid", &reply);
        assert_error(&reply, GRPC_INVALID_ARGUMENT, "key_id is 1025 bytes, at most 1024 allowed");
        decrypt(f, ct, 16, "k1", uid, &reply);
        assert_error(&reply, GRPC_INVALID_ARGUMENT, "uid is 257 bytes, at most 256 allowed");
        assert_int_equal(f->calls, 0);

        /* the limits themselves reach the backend */
        key_id[KMS_KEY_ID_MAX] = '\0';
        uid[KMS_UID_MAX] = '\0';
        f->ret = -ENOENT;
        decrypt(f, ct, KMS_CIPHERTEXT_MAX, key_id, uid, &reply);
        assert_error(&reply, GRPC_NOT_FOUND, "decrypt: unknown key id");
        assert_int_equal(f->calls, 1);
        assert_string_equal(f->seen_key_id, key_id);
        assert_string_equal(f->uid, uid);
}

static void decrypt_with_annotations(struct fake *f, size_t n, size_t value_len,
                                     struct grpc_reply *reply) {
        V2__DecryptRequest req = V2__DECRYPT_REQUEST__INIT;
        V2__DecryptRequest__AnnotationsEntry *entries = calloc(n, sizeof(*entries));
        V2__DecryptRequest__AnnotationsEntry **ptrs = calloc(n, sizeof(*ptrs));
        uint8_t *value = calloc(1, value_len + 1);
        char (*keys)[48] = calloc(n, sizeof(*keys));   /* "a" + 20 digits + suffix */
        const uint8_t ct[] = { 'C', 1, 2, 3 };

        assert_true(entries && ptrs && value && keys);
        for (size_t i = 0; i < n; i++) {
                v2__decrypt_request__annotations_entry__init(&entries[i]);
                snprintf(keys[i], sizeof(keys[i]), "a%zu.example.com", i);
                entries[i].key = keys[i];
                entries[i].value = (ProtobufCBinaryData) { .len = value_len, .data = value };
                ptrs[i] = &entries[i];
        }
        req.ciphertext = (ProtobufCBinaryData) { .len = sizeof(ct), .data = (uint8_t *) ct };
        req.key_id = (char *) f->key_id;
        req.n_annotations = n;
        req.annotations = ptrs;
        call_msg(f, PATH_DECRYPT, &req.base, reply);

        free(keys);
        free(value);
        free(ptrs);
        free(entries);
}

static void test_kms_service_call_decrypt_annotations_too_large(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        const size_t key_len = strlen("a0.example.com");

        /* keys + values exactly 32 KiB: accepted (and ignored) */
        decrypt_with_annotations(f, 1, KMS_ANNOTATIONS_SIZE_MAX - key_len, &reply);
        assert_int_equal(reply.code, GRPC_OK);
        grpc_reply_done(&reply);
        assert_int_equal(f->calls, 1);

        decrypt_with_annotations(f, 1, KMS_ANNOTATIONS_SIZE_MAX - key_len + 1, &reply);
        assert_error(&reply, GRPC_INVALID_ARGUMENT, "annotations are 32769 bytes, at most 32768 allowed");

        decrypt_with_annotations(f, KMS_ANNOTATIONS_MAX, 8, &reply);
        assert_int_equal(reply.code, GRPC_OK);
        grpc_reply_done(&reply);

        decrypt_with_annotations(f, KMS_ANNOTATIONS_MAX + 1, 8, &reply);
        assert_error(&reply, GRPC_INVALID_ARGUMENT, "65 annotations, at most 64 allowed");
        assert_int_equal(f->calls, 2);
}

static void test_kms_service_call_decrypt_backend_errors(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        const uint8_t ct[] = { 'C', 1, 2, 3 };
        const uint8_t bad[] = { 'X', 1, 2, 3 };

        decrypt(f, ct, sizeof(ct), "some-other-key", "uid", &reply);
        assert_error(&reply, GRPC_NOT_FOUND, "decrypt: unknown key id");

        decrypt(f, bad, sizeof(bad), f->key_id, "uid", &reply);
        assert_error(&reply, GRPC_INVALID_ARGUMENT, "decrypt: ciphertext failed authentication");

        f->ret = -ENOKEY;
        f->error = "no keys: cache not yet unsealed";
        decrypt(f, ct, sizeof(ct), f->key_id, "uid", &reply);
        assert_error(&reply, GRPC_UNAVAILABLE, "no keys: cache not yet unsealed");

        f->ret = -EPERM;
        f->error = NULL;
        decrypt(f, ct, sizeof(ct), f->key_id, "uid", &reply);
        assert_error(&reply, GRPC_FAILED_PRECONDITION, "decrypt: measured boot refused the key cache");
}

static void test_kms_service_call_decrypt_deferred(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        const uint8_t ct[] = { 'C', 1, 2, 3 };

        /* allowed to park: no answer, no body */
        f->park_unknown = true;
        f->may_defer = true;
        decrypt(f, ct, sizeof(ct), "not-yet-synced", "uid", &reply);
        assert_true(reply.deferred);
        assert_null(reply.body);
        assert_int_equal(reply.park_token, 0);

        /* the event the backend waits for travels with the deferred reply */
        f->park_token = 42;
        decrypt(f, ct, sizeof(ct), "not-yet-synced", "uid", &reply);
        assert_true(reply.deferred);
        assert_null(reply.body);
        assert_int_equal(reply.park_token, 42);

        /* the retry may not park again: a final answer */
        f->may_defer = false;
        decrypt(f, ct, sizeof(ct), "not-yet-synced", "uid", &reply);
        assert_false(reply.deferred);
        assert_int_equal(reply.park_token, 0);
        assert_error(&reply, GRPC_NOT_FOUND, "decrypt: unknown key id");

        /* -EAGAIN without permission to park is an error, not a silent park */
        f->ret = -EAGAIN;
        decrypt(f, ct, sizeof(ct), f->key_id, "uid", &reply);
        assert_false(reply.deferred);
        assert_int_equal(reply.code, GRPC_INTERNAL);
        grpc_reply_done(&reply);
}

static void test_kms_service_call_decrypt_backend_bad_output(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        const uint8_t ct[] = { 'C', 1, 2, 3 };

        f->pt_len = KMS_PLAINTEXT_MAX + 1;
        decrypt(f, ct, sizeof(ct), f->key_id, "uid", &reply);
        assert_error(&reply, GRPC_INTERNAL, NULL);

        f->pt_len = 0;
        decrypt(f, ct, 1, f->key_id, "uid", &reply);    /* fake returns 0 bytes */
        assert_error(&reply, GRPC_INTERNAL, "decrypt: backend returned 0 bytes of plaintext");
}

/* ---- malformed input ---------------------------------------------------- */

static void test_kms_service_call_garbage_protobuf(void **state) {
        static const struct {
                const char *path;
                uint8_t msg[16];
                size_t len;
        } t[] = {
                { PATH_STATUS, { 0xff, 0xff, 0xff }, 3 },                 /* truncated varint tag */
                { PATH_STATUS, { 0x0a, 5, 'a' }, 3 },                     /* length past the end */
                { PATH_STATUS, { 0x0b }, 1 },                             /* group */
                { PATH_STATUS, { 0x00, 0x00 }, 2 },                       /* field 0 */
                { PATH_ENCRYPT, { 0x08, 0x01 }, 2 },                      /* plaintext as varint */
                { PATH_ENCRYPT, { 0x0a, 1, 'a', 0x12, 2, 'u', 0 }, 7 },   /* NUL in uid */
                { PATH_ENCRYPT, { 0x0a, 1, 'a', 0x12, 1, 0xff }, 6 },     /* uid not UTF-8 */
                { PATH_ENCRYPT, { 0x0a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01 }, 12 },
                { PATH_DECRYPT, { 0x0a, 1, 'C', 0x1a, 3, 'k', 0, 'x' }, 8 }, /* NUL in key_id */
                { PATH_DECRYPT, { 0x0a, 1, 'C', 0x1d, 1, 2, 3, 4 }, 8 },  /* key_id as fixed32 */
                { PATH_DECRYPT, { 0x0a, 1, 'C', 0x22, 2, 0x0a, 5 }, 7 },  /* broken map entry */
                { PATH_DECRYPT, { 0x0a, 1, 'C', 0x22, 3, 0x0a, 1, 0x80 }, 8 }, /* map key not UTF-8 */
                { PATH_DECRYPT, { 0x0a, 1, 'C', 0x1a, 1 }, 5 },           /* cut mid-field */
        };
        struct fake *f = *state;
        struct grpc_reply reply;

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
                call_raw(f, t[i].path, t[i].msg, t[i].len, &reply);
                assert_int_equal(reply.code, GRPC_INVALID_ARGUMENT);
                assert_null(reply.body);
                assert_non_null(strstr(reply.message, "malformed"));
        }
        assert_int_equal(f->calls, 0);
}

static void test_kms_service_call_too_many_fields(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        uint8_t msg[2 * (PROTO_FIELDS_MAX + 1)];

        /* PROTO_FIELDS_MAX + 1 unknown varint fields (field 15 = 0) */
        for (size_t i = 0; i < PROTO_FIELDS_MAX + 1; i++) {
                msg[2 * i] = 0x78;
                msg[2 * i + 1] = 0;
        }
        call_raw(f, PATH_STATUS, msg, sizeof(msg), &reply);
        assert_error(&reply, GRPC_INVALID_ARGUMENT, "malformed StatusRequest: too many fields");

        call_raw(f, PATH_STATUS, msg, sizeof(msg) - 2, &reply);
        assert_int_equal(reply.code, GRPC_OK);
        grpc_reply_done(&reply);
}

static void test_kms_service_call_unknown_path(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        const uint8_t body[] = { 0, 0, 0, 0, 0 };

        kms_service_call(&fake_ops, f, "/v2.KeyManagementService/Rotate", body, sizeof(body), NULL, false, &reply);
        assert_error(&reply, GRPC_UNIMPLEMENTED, "unknown method /v2.KeyManagementService/Rotate");
        kms_service_call(&fake_ops, f, "/grpc.health.v1.Health/Check", body, sizeof(body), NULL, false, &reply);
        assert_error(&reply, GRPC_UNIMPLEMENTED, NULL);
        kms_service_call(&fake_ops, f, NULL, body, sizeof(body), NULL, false, &reply);
        assert_error(&reply, GRPC_UNIMPLEMENTED, NULL);
        assert_int_equal(f->calls, 0);
}

static void test_kms_service_call_bad_framing(void **state) {
        struct fake *f = *state;
        struct grpc_reply reply;
        const uint8_t compressed[] = { 1, 0, 0, 0, 0 };
        const uint8_t truncated[] = { 0, 0, 0, 0, 9, 1 };
        const uint8_t two[] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 };
        const uint8_t huge[] = { 0, 0, 1, 0, 1 };       /* 64 KiB + 1 */

        kms_service_call(&fake_ops, f, PATH_STATUS, compressed, sizeof(compressed), NULL, false, &reply);
        assert_error(&reply, GRPC_UNIMPLEMENTED, "compressed messages are not supported");
        kms_service_call(&fake_ops, f, PATH_STATUS, truncated, sizeof(truncated), NULL, false, &reply);
        assert_error(&reply, GRPC_INTERNAL, NULL);
        kms_service_call(&fake_ops, f, PATH_STATUS, two, sizeof(two), NULL, false, &reply);
        assert_error(&reply, GRPC_INTERNAL, NULL);
        kms_service_call(&fake_ops, f, PATH_DECRYPT, huge, sizeof(huge), NULL, false, &reply);
        assert_error(&reply, GRPC_RESOURCE_EXHAUSTED, "request larger than 65536 bytes");
        kms_service_call(&fake_ops, f, PATH_DECRYPT, NULL, 0, NULL, false, &reply);
        assert_error(&reply, GRPC_INTERNAL, NULL);
        assert_int_equal(f->calls, 0);
}

static void test_grpc_reply_done_zeroed(void **state) {
        struct grpc_reply reply = { 0 };

        grpc_reply_done(&reply);
        grpc_reply_done(NULL);
}

/* ---- proto.c: wiping ---------------------------------------------------- */

static void test_proto_request_done_wipes(void **state) {
        struct proto_request req;
        const uint8_t msg[] = { 0x0a, 4, 's', 'e', 'e', 'd', 0x12, 1, 'u' };
        const uint8_t *pt;
        uintptr_t p, b;

        proto_request_init(&req);
        assert_int_equal(proto_request_scan(&req, KMS_METHOD_ENCRYPT, msg, sizeof(msg)), 0);
        assert_int_equal(req.encrypt.plaintext_len, 4);
        assert_int_equal(req.encrypt.uid_len, 1);
        assert_int_equal(proto_request_unpack(&req), 0);
        assert_memory_equal(req.encrypt.plaintext, "seed", 4);
        assert_string_equal(req.encrypt.uid, "u");
        pt = req.encrypt.plaintext;

        p = (uintptr_t) pt;
        b = (uintptr_t) req.arena.buf;
        proto_request_done(&req);
        assert_null(req.msg);
        assert_int_equal(req.arena.used, 0);
        /* Without ASan the copy lives in the arena, which must now be zero;
         * under ASan it was a heap block, wiped and freed (not readable). */
        if (p >= b && p < b + sizeof(req.arena.buf))
                assert_memory_equal(pt, ((const uint8_t[4]) { 0 }), 4);

        proto_request_done(&req);         /* idempotent */
}

static void test_proto_utf8_valid_cases(void **state) {
        assert_true(proto_utf8_valid("", 0));
        assert_true(proto_utf8_valid("plain", 5));
        assert_true(proto_utf8_valid("\xc3\xa9\xe2\x82\xac\xf0\x9f\x94\x91", 9));
        assert_false(proto_utf8_valid("\xc0\x80", 2));           /* overlong NUL */
        assert_false(proto_utf8_valid("\xe0\x80\x80", 3));       /* overlong */
        assert_false(proto_utf8_valid("\xed\xa0\x80", 3));       /* surrogate */
        assert_false(proto_utf8_valid("\xf4\x90\x80\x80", 4));   /* > U+10FFFF */
        assert_false(proto_utf8_valid("\xc3", 1));               /* cut short */
        assert_false(proto_utf8_valid("\x80", 1));
        assert_false(proto_utf8_valid("\xff", 1));
}

#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)

int main(void) {
        const struct CMUnitTest tests[] = {
                T(test_kms_service_call_status_good),
                T(test_kms_service_call_status_empty_key_id),
                T(test_kms_service_call_status_unhealthy),
                T(test_kms_service_call_status_not_utf8),
                T(test_kms_service_call_encrypt_round_trip),
                T(test_kms_service_call_encrypt_empty_plaintext),
                T(test_kms_service_call_encrypt_oversize_plaintext),
                T(test_kms_service_call_encrypt_uid_too_long),
                T(test_kms_service_call_encrypt_backend_errors),
                T(test_kms_service_call_encrypt_backend_bad_output),
                T(test_kms_service_call_encrypt_unknown_fields),
                T(test_kms_service_call_decrypt_bounds),
                T(test_kms_service_call_decrypt_annotations_too_large),
                T(test_kms_service_call_decrypt_backend_errors),
                T(test_kms_service_call_decrypt_deferred),
                T(test_kms_service_call_decrypt_backend_bad_output),
                T(test_kms_service_call_garbage_protobuf),
                T(test_kms_service_call_too_many_fields),
                T(test_kms_service_call_unknown_path),
                T(test_kms_service_call_bad_framing),
                cmocka_unit_test(test_grpc_reply_done_zeroed),
                cmocka_unit_test(test_proto_request_done_wipes),
                cmocka_unit_test(test_proto_utf8_valid_cases),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
