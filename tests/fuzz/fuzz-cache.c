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
