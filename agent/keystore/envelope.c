/* Envelope format v1 (see envelope.h): AES-256-GCM with a random 96-bit nonce.
 *
 * Random nonces are safe here because Encrypt is rare: the apiserver draws a
 * DEK seed and calls Encrypt once per seed (at start and on rotation), so a
 * KEK sees nowhere near the 2^32 seals NIST SP 800-38D 8.3 allows for random
 * IVs; Decrypt, the frequent call, uses no nonce.
 *
 * Hot path: the cipher is fetched once per process, and each thread keeps one
 * EVP_CIPHER_CTX whose provider context is reused (re-initialising with
 * cipher = NULL keeps it; passing the cipher again would reset it). After
 * every operation the context is re-keyed with a fixed all-zero key: GCM's
 * init wipes its state and rebuilds the key schedule and GHASH table, so no
 * schedule of a real KEK (its first round key *is* the KEK) lingers in the
 * ordinary heap between calls. */
#include <errno.h>
#include <limits.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include "keystore.h"
#include "macro.h"

#define ENVELOPE_AAD_LABEL "tpmkms-envelope"
#define ENVELOPE_KEY_SIZE 32

static EVP_CIPHER *cipher;
static pthread_once_t cipher_once = PTHREAD_ONCE_INIT;
static pthread_key_t ctx_key;

static __thread EVP_CIPHER_CTX *thread_ctx;

static void ctx_destroy(void *p) {
        EVP_CIPHER_CTX_free(p);   /* cleanses the provider context */
}

static void cipher_init(void) {
        cipher = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
        /* Frees each thread's context at thread exit. */
        if (pthread_key_create(&ctx_key, ctx_destroy) != 0) {
                EVP_CIPHER_free(cipher);
                cipher = NULL;
        }
}

/* Returns this thread's context, initialised for AES-256-GCM, or NULL. */
static EVP_CIPHER_CTX *ctx_get(void) {
        static const uint8_t zero_key[ENVELOPE_KEY_SIZE];
        EVP_CIPHER_CTX *ctx;

        if (thread_ctx)
                return thread_ctx;
        if (pthread_once(&cipher_once, cipher_init) != 0 || !cipher)
                return NULL;

        ctx = EVP_CIPHER_CTX_new();
        if (!ctx)
                return NULL;
        if (EVP_CipherInit_ex2(ctx, cipher, zero_key, NULL, 1, NULL) != 1 ||
            pthread_setspecific(ctx_key, ctx) != 0) {
                EVP_CIPHER_CTX_free(ctx);
                return NULL;
        }
        thread_ctx = ctx;
        return ctx;
}

/* Replace the KEK's key schedule with the zero key's (see the top). */
static void ctx_scrub(EVP_CIPHER_CTX *ctx) {
        static const uint8_t zero_key[ENVELOPE_KEY_SIZE];

        if (EVP_CipherInit_ex2(ctx, NULL, zero_key, NULL, 1, NULL) != 1) {
                /* Cannot happen with a valid context; drop it rather than
                 * keep a live schedule around. */
                EVP_CIPHER_CTX_free(ctx);
                thread_ctx = NULL;
                pthread_setspecific(ctx_key, NULL);
        }
}

/* "tpmkms-envelope" || version || key id: a ciphertext opens only under the
 * key id and format it was sealed for. */
static bool add_aad(EVP_CIPHER_CTX *ctx, uint8_t version, const char *key_id) {
        int outl;

        return EVP_CipherUpdate(ctx, NULL, &outl, (const uint8_t *) ENVELOPE_AAD_LABEL,
                                (int) strlen(ENVELOPE_AAD_LABEL)) == 1 &&
               EVP_CipherUpdate(ctx, NULL, &outl, &version, 1) == 1 &&
               EVP_CipherUpdate(ctx, NULL, &outl, (const uint8_t *) key_id,
                                (int) strlen(key_id)) == 1;
}

int envelope_seal(const uint8_t kek[32], const char *key_id,
                  const uint8_t *pt, size_t pt_len, uint8_t *out, size_t out_size) {
        uint8_t *nonce = out + 1, *body = out + 1 + ENVELOPE_NONCE_SIZE;
        EVP_CIPHER_CTX *ctx;
        int outl, finl, r = -EIO;

        if (!kek || !key_id || !*key_id || !pt || pt_len == 0 || !out ||
            pt_len > (size_t) INT_MAX - ENVELOPE_OVERHEAD || strlen(key_id) > INT_MAX)
                return -EINVAL;
        if (out_size < pt_len + ENVELOPE_OVERHEAD)
                return -ENOBUFS;

        ctx = ctx_get();
        if (!ctx)
                return -EIO;

        out[0] = ENVELOPE_VERSION;
        if (RAND_bytes(nonce, ENVELOPE_NONCE_SIZE) != 1)
                goto out;
        if (EVP_CipherInit_ex2(ctx, NULL, kek, nonce, 1, NULL) != 1 ||
            !add_aad(ctx, ENVELOPE_VERSION, key_id) ||
            EVP_CipherUpdate(ctx, body, &outl, pt, (int) pt_len) != 1 ||
            (size_t) outl != pt_len ||
            EVP_CipherFinal_ex(ctx, body + outl, &finl) != 1 || finl != 0 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, ENVELOPE_TAG_SIZE,
                                body + pt_len) != 1)
                goto out;
        r = (int) (pt_len + ENVELOPE_OVERHEAD);
out:
        ctx_scrub(ctx);
        if (r < 0)
                OPENSSL_cleanse(out, out_size);
        return r;
}

int envelope_open(const uint8_t kek[32], const char *key_id,
                  const uint8_t *ct, size_t ct_len, uint8_t *out, size_t out_size) {
        const uint8_t *nonce = ct + 1, *body = ct + 1 + ENVELOPE_NONCE_SIZE;
        uint8_t tag[ENVELOPE_TAG_SIZE];
        EVP_CIPHER_CTX *ctx;
        size_t pt_len;
        int outl, finl, r;

        if (!kek || !key_id || !ct || (!out && out_size > 0))
                return -EINVAL;
        /* Empty plaintexts are never sealed, so OVERHEAD bytes are truncated too. */
        if (ct_len <= ENVELOPE_OVERHEAD || ct_len > INT_MAX || ct[0] != ENVELOPE_VERSION ||
            strlen(key_id) > INT_MAX) {
                r = -EBADMSG;
                goto fail;
        }
        pt_len = ct_len - ENVELOPE_OVERHEAD;
        if (out_size < pt_len) {
                r = -ENOBUFS;
                goto fail;
        }

        ctx = ctx_get();
        if (!ctx) {
                r = -EIO;
                goto fail;
        }

        memcpy(tag, body + pt_len, sizeof(tag));   /* the ctrl wants it writable */
        r = -EIO;
        if (EVP_CipherInit_ex2(ctx, NULL, kek, nonce, 0, NULL) != 1 ||
            !add_aad(ctx, ct[0], key_id) ||
            EVP_CipherUpdate(ctx, out, &outl, body, (int) pt_len) != 1 ||
            (size_t) outl != pt_len ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, sizeof(tag), tag) != 1)
                goto scrub;
        /* The tag comparison inside is OpenSSL's (CRYPTO_memcmp). */
        if (EVP_CipherFinal_ex(ctx, out + outl, &finl) != 1) {
                r = -EBADMSG;
                goto scrub;
        }
        r = (int) pt_len;
scrub:
        ctx_scrub(ctx);
        if (r >= 0)
                return r;
fail:
        if (out)
                OPENSSL_cleanse(out, out_size);
        return r;
}
