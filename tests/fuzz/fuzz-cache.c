/* libFuzzer: the sealed-cache parser on arbitrary bytes, two ways.
 *
 * 1. The input as a whole file: cache_decode_header, then cache_decode_keys
 *    under a fixed cache key. Random bytes essentially never authenticate,
 *    so this covers the header and framing parser.
 * 2. The input as the *plaintext* key list: sealed under the fixed key behind
 *    a valid header, so it gets through GCM and reaches the key-list parser
 *    and keyring_new, which no attacker without the cache key can reach but
 *    which must be bounded all the same. The plaintext is sealed twice:
 *    behind a format-2 header (CACHE_FORMAT_VERSION) and behind the same
 *    header saying format 1, whose records have no missing_since
 *    (agent/keystore/cache.h). */
#include <errno.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const uint8_t fuzz_key[AES256_KEY_SIZE] = { 0x6b, 0x65, 0x79 };
static uint8_t *header;      /* a valid header, made once */
static size_t header_len;

static void make_header(void) {
        struct tpm_sealed s = { .public_size = 4, .private_size = 4 };
        struct keyring *empty = NULL;
        uint8_t *file;
        size_t len;

        if (keyring_new(NULL, 0, &empty) < 0 || cache_encode(&s, fuzz_key, empty, &file, &len) < 0)
                abort();
        keyring_unref(empty);
        /* header | nonce 12 | u32 length | 4-byte empty key list | tag 16 */
        header_len = len - 12 - 4 - 4 - 16;
        header = file;
}

static void check(const uint8_t *buf, size_t len) {
        struct tpm_sealed s;
        struct keyring *kr = NULL;
        int r;

        r = cache_decode_header(buf, len, &s);
        if (r != 0 && r != -EBADMSG && r != -EPROTONOSUPPORT)
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

/* The plaintext data sealed behind the valid header, saying format version. */
static void check_sealed(const uint8_t *data, size_t size, uint8_t version) {
        EVP_CIPHER_CTX *ctx;
        uint8_t *file, *p;
        size_t len;
        int outl;

        len = header_len + 12 + 4 + size + 16;
        file = malloc(len);
        ctx = EVP_CIPHER_CTX_new();
        if (!file || !ctx)
                abort();
        memcpy(file, header, header_len);
        file[11] = version;    /* u32 format version, big-endian, after the 8-byte magic */
        p = file + header_len;
        memset(p, 0x4e, 12);   /* fixed nonce: fine for a fuzzer, never in the daemon */
        p[12] = (uint8_t) (size >> 24);
        p[13] = (uint8_t) (size >> 16);
        p[14] = (uint8_t) (size >> 8);
        p[15] = (uint8_t) size;
        if (EVP_EncryptInit_ex2(ctx, EVP_aes_256_gcm(), fuzz_key, p, NULL) != 1 ||
            EVP_EncryptUpdate(ctx, NULL, &outl, file, (int) header_len) != 1 ||
            (size > 0 && EVP_EncryptUpdate(ctx, p + 16, &outl, data, (int) size) != 1) ||
            EVP_EncryptFinal_ex(ctx, p + 16 + size, &outl) != 1 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, p + 16 + size) != 1)
                abort();
        EVP_CIPHER_CTX_free(ctx);
        check(file, len);
        free(file);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        if (!header)
                make_header();

        check(data, size);

        if (size > 64 * 1024)
                return 0;
        check_sealed(data, size, CACHE_FORMAT_VERSION);
        check_sealed(data, size, 1);
        return 0;
}
