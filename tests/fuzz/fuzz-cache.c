/* libFuzzer: the sealed-cache parser on arbitrary bytes, two ways.
 *
 * 1. The input as a whole file: cache_decode_header, then cache_decode_keys
 *    under a fixed cache key. Random bytes essentially never authenticate,
 *    so this covers the header and framing parser.
 * 2. The input as the *plaintext* key list: sealed under the fixed key behind
 *    a valid header, so it gets through GCM and reaches the key-list parser
 *    and keyring_new, which no attacker without the cache key can reach but
 *    which must be bounded all the same. The plaintext is sealed twice:
 *    behind a format-2 header (CACHE_FORMAT_VERSION, from cache_encode) and
 *    behind a format-1 header for the same object (no kind byte, no counter,
 *    written here as the previous release did), whose records have no
 *    missing_since (agent/keystore/cache.h). */
#include <errno.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const uint8_t fuzz_key[AES256_KEY_SIZE] = { 0x6b, 0x65, 0x79 };
static uint8_t *header;      /* a valid format-2 header, made once */
static size_t header_len;
static uint8_t header_v1[64];   /* the format-1 header for the same object */
static size_t header_v1_len;

static void make_header(void) {
        struct cache_header h = {
                .sealed = { .kind = TPM_SEALED_HMAC_PCR,
                            .public_blob = { 0x50, 0x55, 0x42, 0x4c }, .public_size = 4,
                            .private_blob = { 0x50, 0x52, 0x49, 0x56 }, .private_size = 4 },
                .counter = UINT64_C(0x0102030405060708),
        };
        const struct tpm_sealed *s = &h.sealed;
        struct keyring *empty = NULL;
        uint8_t *file, *p;
        size_t len;

        if (keyring_new(NULL, 0, &empty) < 0 || cache_encode(&h, fuzz_key, empty, &file, &len) < 0)
                abort();
        keyring_unref(empty);
        /* header | nonce 12 | u32 length | 4-byte empty key list | tag 16 */
        header_len = len - 12 - 4 - 4 - 16;
        header = file;

        /* Format 1: magic, u32 version 1, then (no kind) u16 hash alg, u32
         * PCR mask, u16 P, public, u16 Q, private, u8 C, u8 D, C*D PCR
         * values, u8 E, policy digest, and no counter. */
        p = header_v1;
        memcpy(p, "TPMKMSC\0\0\0\0\1", 12);
        p += 12;
        *p++ = (uint8_t) (s->pcrs.sel.hash_alg >> 8);
        *p++ = (uint8_t) s->pcrs.sel.hash_alg;
        for (int i = 3; i >= 0; i--)
                *p++ = (uint8_t) (s->pcrs.sel.mask >> (8 * i));
        *p++ = (uint8_t) (s->public_size >> 8);
        *p++ = (uint8_t) s->public_size;
        memcpy(p, s->public_blob, s->public_size);
        p += s->public_size;
        *p++ = (uint8_t) (s->private_size >> 8);
        *p++ = (uint8_t) s->private_size;
        memcpy(p, s->private_blob, s->private_size);
        p += s->private_size;
        *p++ = (uint8_t) s->pcrs.count;          /* 0: no PCR values */
        *p++ = (uint8_t) s->pcrs.digest_size;
        *p++ = (uint8_t) s->policy_digest_size;  /* 0: no policy digest */
        header_v1_len = (size_t) (p - header_v1);
        /* the same object less the kind byte and the counter */
        if (header_v1_len != header_len - 1 - 8)
                abort();
}

static void check(const uint8_t *buf, size_t len) {
        struct cache_header h;
        struct keyring *kr = NULL;
        int r;

        r = cache_decode_header(buf, len, &h);
        if (r != 0 && r != -EBADMSG && r != -EPROTONOSUPPORT)
                abort();
        if (r == 0 && (h.version < CACHE_FORMAT_OLDEST || h.version > CACHE_FORMAT_VERSION ||
                       h.sealed.kind == 0 ||
                       (h.version == 1 && (h.sealed.kind != TPM_SEALED_DATA_PCR || h.counter != 0))))
                abort();
        r = cache_decode_keys(buf, len, fuzz_key, &kr);
        if (r == 0) {
                /* whatever decodes is a consistent keyring */
                size_t n_primary = 0;

                for (size_t i = 0; i < keyring_size(kr); i++) {
                        const struct key_version *v = keyring_get(kr, i);

                        if (keyring_find(kr, v->id) != v)
                                abort();
                        n_primary += v->role == KEY_ROLE_PRIMARY;
                        /* missing exactly when it says since when */
                        if ((v->role == KEY_ROLE_MISSING) != (v->missing_since_usec != 0))
                                abort();
                }
                if (n_primary > 1)
                        abort();
                keyring_unref(kr);
        } else if (kr || (r != -EBADMSG && r != -EPROTONOSUPPORT && r != -ENOMEM))
                abort();
}

/* The plaintext data sealed behind the valid header hdr of format version. */
static void check_sealed(const uint8_t *data, size_t size, const uint8_t *hdr, size_t hdr_len,
                         uint32_t version) {
        struct cache_header h;
        EVP_CIPHER_CTX *ctx;
        uint8_t *file, *p;
        size_t len;
        int outl;

        len = hdr_len + 12 + 4 + size + 16;
        file = malloc(len);
        ctx = EVP_CIPHER_CTX_new();
        if (!file || !ctx)
                abort();
        memcpy(file, hdr, hdr_len);
        p = file + hdr_len;
        memset(p, 0x4e, 12);   /* fixed nonce: fine for a fuzzer, never in the daemon */
        p[12] = (uint8_t) (size >> 24);
        p[13] = (uint8_t) (size >> 16);
        p[14] = (uint8_t) (size >> 8);
        p[15] = (uint8_t) size;
        if (EVP_EncryptInit_ex2(ctx, EVP_aes_256_gcm(), fuzz_key, p, NULL) != 1 ||
            EVP_EncryptUpdate(ctx, NULL, &outl, file, (int) hdr_len) != 1 ||
            (size > 0 && EVP_EncryptUpdate(ctx, p + 16, &outl, data, (int) size) != 1) ||
            EVP_EncryptFinal_ex(ctx, p + 16 + size, &outl) != 1 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, p + 16 + size) != 1)
                abort();
        EVP_CIPHER_CTX_free(ctx);
        /* a valid header with a well-framed payload (the key list is at
         * least its 4-byte count) always parses, as the version it says */
        if (size >= 4 && (cache_decode_header(file, len, &h) != 0 || h.version != version))
                abort();
        check(file, len);
        free(file);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        if (!header)
                make_header();

        check(data, size);

        if (size > 64 * 1024)
                return 0;
        check_sealed(data, size, header, header_len, CACHE_FORMAT_VERSION);
        check_sealed(data, size, header_v1, header_v1_len, 1);
        return 0;
}
