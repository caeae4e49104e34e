/* libFuzzer: arbitrary request bodies into kms_service_call() for every
 * method path, against a trivial backend. Checks that every reply is either a
 * well-formed response (a single gRPC message protobuf-c decodes) or an error
 * without a body and with a grpc-message that percent-encodes.
 *
 * Input: byte 0 selects the call, the rest is the body.
 *   bits 0-1  path: Status, Encrypt, Decrypt, or an unknown one
 *   bit 2     body is raw (else it gets a correct gRPC prefix, so most inputs
 *             reach the protobuf code)
 *   bit 3     backend fails (-ENOENT, with an explanation)
 *   bit 4     backend fails without an explanation (-EPERM) */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_v2.pb-c.h"
#include "service.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct fuzz_backend {
        int fail;
        int explain;
};

static void fb_status(void *userdata, struct kms_status *st) {
        snprintf(st->healthz, sizeof(st->healthz), "ok");
        snprintf(st->key_id, sizeof(st->key_id), "fuzz-key");
}

static int fb_encrypt(void *userdata, struct kms_call *call, const uint8_t *pt, size_t pt_len,
                      uint8_t ct[KMS_CIPHERTEXT_MAX], char key_id[KMS_KEY_ID_MAX + 1]) {
        const struct fuzz_backend *b = userdata;

        if (!call->request_uid || pt_len < 1 || pt_len > KMS_PLAINTEXT_MAX)
                abort();                  /* the service must have checked */
        if (b->fail) {
                if (b->explain)
                        snprintf(call->error, sizeof(call->error), "no such key \xff%%");
                return b->fail;
        }
        memcpy(ct, pt, pt_len);
        snprintf(key_id, KMS_KEY_ID_MAX + 1, "fuzz-key");
        return (int) pt_len;
}

static int fb_decrypt(void *userdata, struct kms_call *call, const char *key_id,
                      const uint8_t *ct, size_t ct_len, uint8_t pt[KMS_PLAINTEXT_MAX]) {
        const struct fuzz_backend *b = userdata;
        size_t n = ct_len < KMS_PLAINTEXT_MAX ? ct_len : KMS_PLAINTEXT_MAX;
        size_t k = strlen(key_id);

        if (!call->request_uid || ct_len < 1 || ct_len > KMS_CIPHERTEXT_MAX ||
            k < 1 || k > KMS_KEY_ID_MAX)
                abort();
        if (b->fail) {
                if (b->explain)
                        snprintf(call->error, sizeof(call->error), "key %.40s unknown", key_id);
                return b->fail;
        }
        memcpy(pt, ct, n);
        return (int) n;
}

static const struct kms_backend_ops fb_ops = {
        .status = fb_status,
        .encrypt = fb_encrypt,
        .decrypt = fb_decrypt,
};

static const char *const paths[] = {
        "/v2.KeyManagementService/Status",
        "/v2.KeyManagementService/Encrypt",
        "/v2.KeyManagementService/Decrypt",
        "/v2.KeyManagementService/Rotate",
};

static void check_reply(int method, const struct grpc_reply *reply) {
        char encoded[3 * GRPC_MESSAGE_MAX + 1];
        const uint8_t *msg;
        size_t len;

        if (!memchr(reply->message, 0, sizeof(reply->message)))
                abort();
        if (grpc_percent_encode(reply->message, encoded, sizeof(encoded)) < 0)
                abort();

        if (reply->code != GRPC_OK) {
                if (reply->body || reply->body_len || reply->message[0] == '\0')
                        abort();
                return;
        }

        if (!reply->body || grpc_frame_unpack(reply->body, reply->body_len, reply->body_len, &msg, &len) < 0)
                abort();
        switch (method) {
        case 0: {
                V2__StatusResponse *m = v2__status_response__unpack(NULL, len, msg);

                if (!m || strcmp(m->version, "v2") != 0)
                        abort();
                v2__status_response__free_unpacked(m, NULL);
                break;
        }
        case 1: {
                V2__EncryptResponse *m = v2__encrypt_response__unpack(NULL, len, msg);

                if (!m || m->ciphertext.len < 1 || m->ciphertext.len > KMS_CIPHERTEXT_MAX ||
                    strlen(m->key_id) < 1)
                        abort();
                v2__encrypt_response__free_unpacked(m, NULL);
                break;
        }
        case 2: {
                V2__DecryptResponse *m = v2__decrypt_response__unpack(NULL, len, msg);

                if (!m || m->plaintext.len < 1 || m->plaintext.len > KMS_PLAINTEXT_MAX)
                        abort();
                v2__decrypt_response__free_unpacked(m, NULL);
                break;
        }
        default:
                abort();                  /* an unknown path never succeeds */
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct fuzz_backend b = { 0 };
        struct grpc_reply reply;
        uint8_t *body;
        size_t body_len;
        int method;

        if (size < 1 || size > 2 * KMS_REQUEST_MAX)
                return 0;

        method = data[0] & 3;
        if (data[0] & 8)
                b = (struct fuzz_backend) { .fail = -ENOENT, .explain = 1 };
        else if (data[0] & 16)
                b = (struct fuzz_backend) { .fail = -EPERM, .explain = 0 };

        /* Copy into an exactly sized heap block so ASan sees any overread. */
        if (data[0] & 4) {
                body_len = size - 1;
                body = malloc(body_len ?: 1);
                if (!body)
                        return 0;
                memcpy(body, data + 1, body_len);
        } else {
                body_len = GRPC_FRAME_HEADER_SIZE + size - 1;
                body = malloc(body_len);
                if (!body)
                        return 0;
                grpc_frame_header(body, size - 1);
                memcpy(body + GRPC_FRAME_HEADER_SIZE, data + 1, size - 1);
        }

        kms_service_call(&fb_ops, &b, paths[method], body, body_len, NULL, false, &reply);
        check_reply(method, &reply);
        grpc_reply_done(&reply);
        free(body);
        return 0;
}
