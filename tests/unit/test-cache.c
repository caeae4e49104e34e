/* agent/keystore/cache.c: the sealed-cache file format and its atomic file I/O. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "cache.h"
#include "macro.h"

#define P_SIZE 90
#define Q_SIZE 130
#define PCR_COUNT 2
#define PCR_DSIZE 32
#define POLICY_SIZE 32
#define COUNTER UINT64_C(0x0102030405060708)
/* Format 1: no kind byte after the version, no u64 counter at the end. */
#define HEADER1_SIZE (8 + 4 + 2 + 4 + 2 + P_SIZE + 2 + Q_SIZE + 1 + 1 + PCR_COUNT * PCR_DSIZE + 1 + POLICY_SIZE)
#define HEADER_SIZE (HEADER1_SIZE + 1 + 8)
/* byte offsets in a format-2 header */
#define OFF_KIND 12
#define OFF_MASK 15            /* u32, most significant byte first */
#define OFF_PUBLIC_SIZE 19     /* u16 */
#define OFF_COUNTER (HEADER_SIZE - 8)

static struct tpm_sealed sealed;
static struct cache_header header;   /* sealed, COUNTER */
static uint8_t cache_key[AES256_KEY_SIZE], kek1[AES256_KEY_SIZE], kek2[AES256_KEY_SIZE], kek3[AES256_KEY_SIZE];
static struct keyring *kr;
static char tmpdir[] = "/tmp/test-cache.XXXXXX";

static struct key_version kv(const char *id, const char *central_id, enum key_role role,
                             uint64_t created, uint8_t *kek) {
        struct key_version v = { .role = role, .created_usec = created,
                                 .first_seen_usec = created + 1000, .kek = kek };

        snprintf(v.id, sizeof(v.id), "%s", id);
        snprintf(v.central_id, sizeof(v.central_id), "%s", central_id);
        return v;
}

static int setup(void **state) {
        struct key_version keys[3];

        if (keyring_secure_heap_init() < 0 || !mkdtemp(tmpdir))
                return -1;

        memset(&sealed, 0, sizeof(sealed));
        for (size_t i = 0; i < P_SIZE; i++)
                sealed.public_blob[i] = (uint8_t) (0x10 + i);
        sealed.public_size = P_SIZE;
        for (size_t i = 0; i < Q_SIZE; i++)
                sealed.private_blob[i] = (uint8_t) (0x80 + i);
        sealed.private_size = Q_SIZE;
        sealed.pcrs.sel.hash_alg = 0x000b;   /* TPM2_ALG_SHA256 */
        sealed.pcrs.sel.mask = (1u << 7) | (1u << 14);
        sealed.pcrs.count = PCR_COUNT;
        sealed.pcrs.digest_size = PCR_DSIZE;
        memset(sealed.pcrs.digest[0], 0x77, PCR_DSIZE);
        memset(sealed.pcrs.digest[1], 0x14, PCR_DSIZE);
        memset(sealed.policy_digest, 0x9d, POLICY_SIZE);
        sealed.policy_digest_size = POLICY_SIZE;
        sealed.kind = TPM_SEALED_HMAC_PCR;
        header = (struct cache_header) { .version = CACHE_FORMAT_VERSION, .sealed = sealed,
                                         .counter = COUNTER };

        /* Distinct, non-repeating byte patterns so memmem() is meaningful. */
        for (size_t i = 0; i < 32; i++) {
                cache_key[i] = (uint8_t) (i * 7 + 3);
                kek1[i] = (uint8_t) (i * 11 + 5);
                kek2[i] = (uint8_t) (i * 13 + 1);
                kek3[i] = (uint8_t) (i * 17 + 9);
        }
        keys[0] = kv("kmip:uid-1.0011223344556677", "uid-1", KEY_ROLE_RETIRED, 1000, kek1);
        keys[1] = kv("kmip:uid-2.8899aabbccddeeff", "uid-2", KEY_ROLE_PRIMARY, 2000, kek2);
        keys[2] = kv("local.0123456789abcdef", "", KEY_ROLE_STAGED, 3000, kek3);
        return keyring_new(keys, 3, &kr) < 0 ? -1 : 0;
}

static int teardown(void **state) {
        char path[256];

        snprintf(path, sizeof(path), "%s/%s", tmpdir, CACHE_FILE_NAME);
        unlink(path);
        rmdir(tmpdir);
        keyring_unref(kr);
        return 0;
}

static void encode(uint8_t **buf, size_t *len) {
        assert_int_equal(cache_encode(&header, cache_key, kr, buf, len), 0);
}

static void assert_sealed_equal(const struct tpm_sealed *a, const struct tpm_sealed *b) {
        assert_int_equal(a->kind, b->kind);
        assert_int_equal(a->public_size, b->public_size);
        assert_memory_equal(a->public_blob, b->public_blob, a->public_size);
        assert_int_equal(a->private_size, b->private_size);
        assert_memory_equal(a->private_blob, b->private_blob, a->private_size);
        assert_int_equal(a->pcrs.sel.hash_alg, b->pcrs.sel.hash_alg);
        assert_int_equal(a->pcrs.sel.mask, b->pcrs.sel.mask);
        assert_int_equal(a->pcrs.count, b->pcrs.count);
        assert_int_equal(a->pcrs.digest_size, b->pcrs.digest_size);
        for (size_t i = 0; i < a->pcrs.count; i++)
                assert_memory_equal(a->pcrs.digest[i], b->pcrs.digest[i], a->pcrs.digest_size);
        assert_int_equal(a->policy_digest_size, b->policy_digest_size);
        assert_memory_equal(a->policy_digest, b->policy_digest, a->policy_digest_size);
}

static void assert_keyring_equal(const struct keyring *a, const struct keyring *b) {
        assert_int_equal(keyring_size(a), keyring_size(b));
        for (size_t i = 0; i < keyring_size(a); i++) {
                const struct key_version *x = keyring_get(a, i), *y = keyring_get(b, i);

                assert_string_equal(x->id, y->id);
                assert_string_equal(x->central_id, y->central_id);
                assert_int_equal(x->role, y->role);
                assert_int_equal(x->created_usec, y->created_usec);
                assert_int_equal(x->first_seen_usec, y->first_seen_usec);
                assert_int_equal(x->missing_since_usec, y->missing_since_usec);
                assert_memory_equal(x->kek, y->kek, AES256_KEY_SIZE);
        }
}

static void test_cache_encode_round_trip(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        _cleanup_(keyring_unrefp) struct keyring *got = NULL;
        struct cache_header hdr, h;
        size_t len;

        encode(&buf, &len);
        assert_int_equal(len, HEADER_SIZE + 12 + 4 + 16 + 4 +
                                      3 * (1 + 8 + 8 + 8 + 2 + 2 + AES256_KEY_SIZE) +
                                      strlen("kmip:uid-1.0011223344556677") + 5 +
                                      strlen("kmip:uid-2.8899aabbccddeeff") + 5 +
                                      strlen("local.0123456789abcdef"));
        assert_memory_equal(buf, "TPMKMSC\0\0\0\0\2", 12);
        assert_int_equal(buf[OFF_KIND], TPM_SEALED_HMAC_PCR);
        /* the counter ends the header (the AAD), big-endian */
        assert_memory_equal(buf + OFF_COUNTER, "\1\2\3\4\5\6\7\10", 8);

        assert_int_equal(cache_decode_header(buf, len, &hdr), 0);
        assert_int_equal(hdr.version, CACHE_FORMAT_VERSION);
        assert_sealed_equal(&hdr.sealed, &sealed);
        assert_int_equal(hdr.counter, COUNTER);

        assert_int_equal(cache_decode_keys(buf, len, cache_key, &got), 0);
        assert_keyring_equal(got, kr);
        assert_string_equal(keyring_primary(got)->id, "kmip:uid-2.8899aabbccddeeff");
        free(buf);
        buf = NULL;

        /* cache_encode ignores h->version: it always writes the current
         * format, so a header read from an older file is written back new */
        h = header;
        h.version = 1;
        assert_int_equal(cache_encode(&h, cache_key, kr, &buf, &len), 0);
        assert_memory_equal(buf, "TPMKMSC\0\0\0\0\2", 12);
        assert_int_equal(cache_decode_header(buf, len, &hdr), 0);
        assert_int_equal(hdr.version, CACHE_FORMAT_VERSION);
        assert_sealed_equal(&hdr.sealed, &sealed);
        assert_int_equal(hdr.counter, COUNTER);
}

static void test_cache_encode_empty_keyring(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        _cleanup_(keyring_unrefp) struct keyring *empty = NULL, *got = NULL;
        struct cache_header h = header;
        size_t len;

        /* "none" PCR policy: no values, no policy digest */
        h.sealed.pcrs.sel.hash_alg = 0;
        h.sealed.pcrs.sel.mask = 0;
        h.sealed.pcrs.count = 0;
        h.sealed.pcrs.digest_size = 0;
        h.sealed.policy_digest_size = 0;

        assert_int_equal(keyring_new(NULL, 0, &empty), 0);
        assert_int_equal(cache_encode(&h, cache_key, empty, &buf, &len), 0);
        assert_int_equal(cache_decode_keys(buf, len, cache_key, &got), 0);
        assert_int_equal(keyring_size(got), 0);
        free(buf);
        buf = NULL;
        keyring_unref(got);
        got = NULL;
        /* NULL keyring: the same as an empty one */
        assert_int_equal(cache_encode(&h, cache_key, NULL, &buf, &len), 0);
        assert_int_equal(cache_decode_keys(buf, len, cache_key, &got), 0);
        assert_int_equal(keyring_size(got), 0);
}

static void test_cache_encode_invalid_sealed(void **state) {
        struct cache_header h;
        uint8_t *buf = NULL;
        size_t len;

        h = header;
        h.sealed.public_size = 0;
        assert_int_equal(cache_encode(&h, cache_key, kr, &buf, &len), -EINVAL);
        h = header;
        h.sealed.private_size = TPM_BLOB_MAX + 1;
        assert_int_equal(cache_encode(&h, cache_key, kr, &buf, &len), -EINVAL);
        h = header;
        h.sealed.pcrs.count = TPM_PCR_MAX + 1;
        assert_int_equal(cache_encode(&h, cache_key, kr, &buf, &len), -EINVAL);
        h = header;
        h.sealed.policy_digest_size = TPM_DIGEST_MAX + 1;
        assert_int_equal(cache_encode(&h, cache_key, kr, &buf, &len), -EINVAL);
        /* kind 0 is no kind: the reader would refuse it */
        h = header;
        h.sealed.kind = 0;
        assert_int_equal(cache_encode(&h, cache_key, kr, &buf, &len), -EINVAL);
        assert_int_equal(cache_encode(NULL, cache_key, kr, &buf, &len), -EINVAL);
        assert_null(buf);
}

static void test_cache_encode_no_secret_in_file(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        size_t len;

        encode(&buf, &len);
        assert_null(memmem(buf, len, kek1, AES256_KEY_SIZE));
        assert_null(memmem(buf, len, kek2, AES256_KEY_SIZE));
        assert_null(memmem(buf, len, kek3, AES256_KEY_SIZE));
        assert_null(memmem(buf, len, cache_key, AES256_KEY_SIZE));
        /* not even a fragment of one: 8 bytes is already a lot */
        for (size_t i = 0; i + 8 <= AES256_KEY_SIZE; i++)
                assert_null(memmem(buf, len, kek2 + i, 8));
        /* and ids are not in clear either: the key list is all encrypted */
        assert_null(memmem(buf, len, "uid-1", 5));
}

static void test_cache_encode_fresh_nonce(void **state) {
        _cleanup_free_ uint8_t *a = NULL, *b = NULL;
        size_t alen, blen;

        encode(&a, &alen);
        encode(&b, &blen);
        assert_int_equal(alen, blen);
        assert_memory_equal(a, b, HEADER_SIZE);
        assert_memory_not_equal(a + HEADER_SIZE, b + HEADER_SIZE, 12);
}

static void test_cache_decode_keys_every_byte_flip(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        struct cache_header hdr;
        size_t len;

        encode(&buf, &len);
        for (size_t i = 0; i < len; i++)
                for (int bit = 0; bit < 8; bit++) {
                        struct keyring *got = NULL;
                        int want = (i >= 8 && i < 12) ? -EPROTONOSUPPORT : -EBADMSG;

                        buf[i] ^= (uint8_t) (1 << bit);
                        if (cache_decode_keys(buf, len, cache_key, &got) != want)
                                print_error("flip of bit %d at offset %zu\n", bit, i);
                        assert_int_equal(cache_decode_keys(buf, len, cache_key, &got), want);
                        assert_null(got);
                        /* magic and version also fail the header, and so
                                 * does a kind flipped to 0 */
                        if (i < 12 || (i == OFF_KIND && buf[i] == 0))
                                assert_int_equal(cache_decode_header(buf, len, &hdr), want);
                        buf[i] ^= (uint8_t) (1 << bit);
                }
}

static void test_cache_decode_truncated(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        struct cache_header hdr;
        size_t len;

        encode(&buf, &len);
        for (size_t n = 0; n < len; n++) {
                struct keyring *got = NULL;
                /* a fresh copy, so ASan sees any read past n */
                uint8_t *cut = malloc(n ? n : 1);

                assert_non_null(cut);
                memcpy(cut, buf, n);
                assert_int_equal(cache_decode_header(cut, n, &hdr), -EBADMSG);
                assert_int_equal(cache_decode_keys(cut, n, cache_key, &got), -EBADMSG);
                assert_null(got);
                free(cut);
        }
}

static void test_cache_decode_trailing_bytes(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        struct keyring *got = NULL;
        struct cache_header hdr;
        uint8_t *longer;
        size_t len;

        encode(&buf, &len);
        longer = malloc(len + 1);
        assert_non_null(longer);
        memcpy(longer, buf, len);
        longer[len] = 0;
        assert_int_equal(cache_decode_header(longer, len + 1, &hdr), -EBADMSG);
        assert_int_equal(cache_decode_keys(longer, len + 1, cache_key, &got), -EBADMSG);
        free(longer);
}

static void test_cache_decode_keys_wrong_key(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        uint8_t other[AES256_KEY_SIZE];
        struct keyring *got = NULL;
        size_t len;

        encode(&buf, &len);
        memcpy(other, cache_key, sizeof(other));
        other[31] ^= 1;
        assert_int_equal(cache_decode_keys(buf, len, other, &got), -EBADMSG);
        assert_null(got);
}

static void test_cache_decode_header_other_version(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        struct cache_header hdr;
        size_t len;

        encode(&buf, &len);
        buf[11] = 3;
        assert_int_equal(cache_decode_header(buf, len, &hdr), -EPROTONOSUPPORT);
        buf[11] = 0;
        assert_int_equal(cache_decode_header(buf, len, &hdr), -EPROTONOSUPPORT);
        buf[11] = 3;
        /* the version is checked before anything after it is believed */
        assert_int_equal(cache_decode_header(buf, 12, &hdr), -EPROTONOSUPPORT);
}

/* A whole file: the header hdr (hdr_len bytes, which are the AAD), nonce, and
 * GCM(cache_key, pt) in out; returns its length. */
static size_t seal_behind(const uint8_t *hdr, size_t hdr_len, const uint8_t *nonce,
                          const uint8_t *pt, size_t pt_len, uint8_t *out) {
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        uint8_t *p = out;
        int outl;

        assert_non_null(ctx);
        memcpy(p, hdr, hdr_len);
        p += hdr_len;
        memcpy(p, nonce, 12);
        p += 12;
        *p++ = (uint8_t) (pt_len >> 24);
        *p++ = (uint8_t) (pt_len >> 16);
        *p++ = (uint8_t) (pt_len >> 8);
        *p++ = (uint8_t) pt_len;
        assert_int_equal(EVP_EncryptInit_ex2(ctx, EVP_aes_256_gcm(), cache_key, nonce, NULL), 1);
        assert_int_equal(EVP_EncryptUpdate(ctx, NULL, &outl, hdr, (int) hdr_len), 1);
        if (pt_len > 0)
                assert_int_equal(EVP_EncryptUpdate(ctx, p, &outl, pt, (int) pt_len), 1);
        assert_int_equal(EVP_EncryptFinal_ex(ctx, p + pt_len, &outl), 1);
        assert_int_equal(EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, p + pt_len), 1);
        EVP_CIPHER_CTX_free(ctx);
        return hdr_len + 12 + 4 + pt_len + 16;
}

/* The format-1 header for s, as the previous release wrote it: no kind byte
 * (s->kind is not written), no counter. Returns its length. */
static size_t put_header_v1(uint8_t *p, const struct tpm_sealed *s) {
        uint8_t *start = p;

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
        *p++ = (uint8_t) s->pcrs.count;
        *p++ = (uint8_t) s->pcrs.digest_size;
        for (size_t i = 0; i < s->pcrs.count; i++) {
                memcpy(p, s->pcrs.digest[i], s->pcrs.digest_size);
                p += s->pcrs.digest_size;
        }
        *p++ = (uint8_t) s->policy_digest_size;
        memcpy(p, s->policy_digest, s->policy_digest_size);
        p += s->policy_digest_size;
        return (size_t) (p - start);
}

/* A record of format version (1: no missing_since), missing since `since`. */
static size_t put_record(uint8_t *p, uint32_t version, uint8_t role, uint64_t since, const char *id,
                         size_t id_len, const uint8_t *kek) {
        uint8_t *start = p;

        *p++ = role;
        memset(p, 0, 16);   /* created, first seen */
        p += 16;
        if (version >= 2)
                for (int i = 7; i >= 0; i--)
                        *p++ = (uint8_t) (since >> (8 * i));
        *p++ = (uint8_t) (id_len >> 8);
        *p++ = (uint8_t) id_len;
        memcpy(p, id, id_len);
        p += id_len;
        *p++ = 0;           /* central id: empty */
        *p++ = 0;
        memcpy(p, kek, AES256_KEY_SIZE);
        return (size_t) (p + AES256_KEY_SIZE - start);
}

static size_t put_key(uint8_t *p, uint8_t role, const char *id, size_t id_len, const uint8_t *kek) {
        return put_record(p, CACHE_FORMAT_VERSION, role, 0, id, id_len, kek);
}

/* cache_decode_keys of pt sealed behind the header hdr under nonce. */
static int decode_behind(const uint8_t *hdr, size_t hdr_len, const uint8_t *nonce,
                         const uint8_t *pt, size_t pt_len) {
        uint8_t out[HEADER_SIZE + 12 + 4 + 1024 + 16];
        struct keyring *got = NULL;
        size_t n;
        int r;

        assert_true(hdr_len <= HEADER_SIZE);
        assert_true(pt_len <= 1024);
        n = seal_behind(hdr, hdr_len, nonce, pt, pt_len, out);
        r = cache_decode_keys(out, n, cache_key, &got);
        if (r == 0)
                assert_non_null(got);
        else
                assert_null(got);
        keyring_unref(got);
        return r;
}

/* Replace the payload of a valid file with GCM(cache_key, pt) under the same
 * header and nonce, so that malformed key lists get past authentication, and
 * decode that. */
static int decode_plaintext(const uint8_t *file, const uint8_t *pt, size_t pt_len) {
        return decode_behind(file, HEADER_SIZE, file + HEADER_SIZE, pt, pt_len);
}

static void test_cache_decode_keys_malformed_plaintext(void **state) {
        _cleanup_free_ uint8_t *file = NULL;
        uint8_t pt[1024];
        size_t len, n;

        encode(&file, &len);

        /* control: a well-formed list re-sealed this way decodes */
        n = 4;
        memcpy(pt, "\0\0\0\2", 4);
        n += put_key(pt + n, KEY_ROLE_RETIRED, "a", 1, kek1);
        n += put_key(pt + n, KEY_ROLE_PRIMARY, "b", 1, kek2);
        assert_int_equal(decode_plaintext(file, pt, n), 0);

        /* a trailing byte after the records */
        pt[n] = 0;
        assert_int_equal(decode_plaintext(file, pt, n + 1), -EBADMSG);
        /* a record cut short */
        assert_int_equal(decode_plaintext(file, pt, n - 1), -EBADMSG);
        /* a count larger than the records */
        pt[3] = 3;
        assert_int_equal(decode_plaintext(file, pt, n), -EBADMSG);
        pt[3] = 2;
        /* an absurd count is refused before any allocation */
        memcpy(pt, "\xff\xff\xff\xff", 4);
        assert_int_equal(decode_plaintext(file, pt, n), -EBADMSG);
        /* no count at all */
        assert_int_equal(decode_plaintext(file, pt, 0), -EBADMSG);
        assert_int_equal(decode_plaintext(file, pt, 3), -EBADMSG);

        /* two primaries */
        n = 4;
        memcpy(pt, "\0\0\0\2", 4);
        n += put_key(pt + n, KEY_ROLE_PRIMARY, "a", 1, kek1);
        n += put_key(pt + n, KEY_ROLE_PRIMARY, "b", 1, kek2);
        assert_int_equal(decode_plaintext(file, pt, n), -EBADMSG);
        /* duplicate ids */
        n = 4;
        n += put_key(pt + n, KEY_ROLE_RETIRED, "a", 1, kek1);
        n += put_key(pt + n, KEY_ROLE_PRIMARY, "a", 1, kek2);
        assert_int_equal(decode_plaintext(file, pt, n), -EBADMSG);
        /* unknown role */
        n = 4;
        memcpy(pt, "\0\0\0\1", 4);
        n += put_key(pt + n, _KEY_ROLE_MAX, "a", 1, kek1);
        assert_int_equal(decode_plaintext(file, pt, n), -EBADMSG);
        /* empty id */
        n = 4;
        n += put_key(pt + n, KEY_ROLE_PRIMARY, "", 0, kek1);
        assert_int_equal(decode_plaintext(file, pt, n), -EBADMSG);
        /* NUL inside an id */
        n = 4;
        n += put_key(pt + n, KEY_ROLE_PRIMARY, "a\0b", 3, kek1);
        assert_int_equal(decode_plaintext(file, pt, n), -EBADMSG);
        /* an id too long for struct key_version */
        {
                char id[KEY_ID_MAX];

                memset(id, 'x', sizeof(id));
                n = 4;
                n += put_key(pt + n, KEY_ROLE_PRIMARY, id, KEY_ID_MAX - 1, kek1);
                assert_int_equal(decode_plaintext(file, pt, n), 0);
                n = 4;
                n += put_key(pt + n, KEY_ROLE_PRIMARY, id, KEY_ID_MAX, kek1);
                assert_int_equal(decode_plaintext(file, pt, n), -EBADMSG);
        }
}

/* The identity section (an enrolled client key's digest and authValue)
 * after the records: round trip, kept out of the plain file, and a file
 * without it (every format-2 file written before it) still reads. */
static void test_cache_identity_round_trip(void **state) {
        _cleanup_free_ uint8_t *with = NULL, *without = NULL;
        _cleanup_(keyring_unrefp) struct keyring *got = NULL, *got2 = NULL;
        struct vault_identity id, *got_id = NULL;
        size_t len_with, len_without;

        memset(id.key_digest, 0x5a, sizeof(id.key_digest));
        memset(id.auth, 0xc3, sizeof(id.auth));
        assert_int_equal(cache_encode_identity(&header, cache_key, kr, &id, &with, &len_with), 0);
        encode(&without, &len_without);
        assert_int_equal(len_with, len_without + 1 + 32 + TPM_KEY_AUTH_SIZE);
        /* still format 2, the header unchanged */
        assert_memory_equal(with, "TPMKMSC\0\0\0\0\2", 12);
        assert_null(memmem(with, len_with, id.auth, sizeof(id.auth)));

        assert_int_equal(cache_decode_identity(with, len_with, cache_key, &got, &got_id), 0);
        assert_keyring_equal(got, kr);
        assert_non_null(got_id);
        assert_memory_equal(got_id->key_digest, id.key_digest, 32);
        assert_memory_equal(got_id->auth, id.auth, TPM_KEY_AUTH_SIZE);
        OPENSSL_secure_clear_free(got_id, sizeof(*got_id));
        got_id = NULL;

        /* a format-2 file without the section: no identity, same keys */
        assert_int_equal(cache_decode_identity(without, len_without, cache_key, &got2, &got_id), 0);
        assert_null(got_id);
        assert_keyring_equal(got2, kr);
        keyring_unref(got2);
        got2 = NULL;
        /* cache_decode_keys reads both */
        assert_int_equal(cache_decode_keys(with, len_with, cache_key, &got2), 0);
        assert_keyring_equal(got2, kr);
}

static void test_cache_identity_malformed(void **state) {
        _cleanup_free_ uint8_t *file = NULL;
        uint8_t pt[1024];
        size_t len, n;

        encode(&file, &len);
        n = 4;
        memcpy(pt, "\0\0\0\1", 4);
        n += put_key(pt + n, KEY_ROLE_PRIMARY, "a", 1, kek1);
        pt[n] = CACHE_SECTION_IDENTITY;
        memset(pt + n + 1, 0x11, 64);
        assert_int_equal(decode_plaintext(file, pt, n + 65), 0);
        /* cut short, one byte too many, an unknown section tag */
        assert_int_equal(decode_plaintext(file, pt, n + 64), -EBADMSG);
        pt[n + 65] = 0;
        assert_int_equal(decode_plaintext(file, pt, n + 66), -EBADMSG);
        pt[n] = 2;
        assert_int_equal(decode_plaintext(file, pt, n + 65), -EBADMSG);
}

static void test_cache_encode_round_trip_missing(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        _cleanup_(keyring_unrefp) struct keyring *with = NULL, *got = NULL;
        struct key_version keys[2];
        size_t len;

        keys[0] = kv("kmip:uid-1.0011223344556677", "uid-1", KEY_ROLE_MISSING, 1000, kek1);
        keys[0].missing_since_usec = UINT64_C(0x0102030405060708);
        keys[1] = kv("kmip:uid-2.8899aabbccddeeff", "uid-2", KEY_ROLE_PRIMARY, 2000, kek2);
        assert_int_equal(keyring_new(keys, 2, &with), 0);
        assert_int_equal(cache_encode(&header, cache_key, with, &buf, &len), 0);
        assert_int_equal(cache_decode_keys(buf, len, cache_key, &got), 0);
        assert_keyring_equal(got, with);
        assert_int_equal(keyring_find(got, keys[0].id)->role, KEY_ROLE_MISSING);
        assert_int_equal(keyring_find(got, keys[0].id)->missing_since_usec, UINT64_C(0x0102030405060708));
}

static void test_cache_decode_keys_missing_since_consistent(void **state) {
        _cleanup_free_ uint8_t *file = NULL;
        uint8_t pt[1024];
        size_t len, n;

        encode(&file, &len);
        /* missing with a time: fine */
        n = 4;
        memcpy(pt, "\0\0\0\1", 4);
        n += put_record(pt + n, 2, KEY_ROLE_MISSING, 42, "a", 1, kek1);
        assert_int_equal(decode_plaintext(file, pt, n), 0);
        /* missing without one, or a time on a version that is not missing */
        n = 4;
        n += put_record(pt + n, 2, KEY_ROLE_MISSING, 0, "a", 1, kek1);
        assert_int_equal(decode_plaintext(file, pt, n), -EBADMSG);
        n = 4;
        n += put_record(pt + n, 2, KEY_ROLE_RETIRED, 42, "a", 1, kek1);
        assert_int_equal(decode_plaintext(file, pt, n), -EBADMSG);
}

/* A format-1 file (what the previous release wrote): no kind byte after the
 * version, no counter after the policy digest, records without missing_since.
 * Still read, as kind TPM_SEALED_DATA_PCR and counter 0. */
static void test_cache_decode_keys_format_1(void **state) {
        _cleanup_free_ uint8_t *file = NULL, *again = NULL;
        uint8_t v1[HEADER1_SIZE], nonce[12], pt[1024], out[HEADER_SIZE + 12 + 4 + 1024 + 16];
        _cleanup_(keyring_unrefp) struct keyring *got = NULL;
        struct tpm_sealed want = sealed;
        struct cache_header hdr;
        size_t len, n, m;

        want.kind = TPM_SEALED_DATA_PCR;   /* the one kind format 1 knew */
        memset(nonce, 0x31, sizeof(nonce));
        assert_int_equal(put_header_v1(v1, &sealed), HEADER1_SIZE);
        n = 4;
        memcpy(pt, "\0\0\0\2", 4);
        n += put_record(pt + n, 1, KEY_ROLE_RETIRED, 0, "a", 1, kek1);
        n += put_record(pt + n, 1, KEY_ROLE_PRIMARY, 0, "b", 1, kek2);
        m = seal_behind(v1, HEADER1_SIZE, nonce, pt, n, out);
        assert_int_equal(m, HEADER1_SIZE + 12 + 4 + n + 16);
        memset(&hdr, 0xff, sizeof(hdr));
        assert_int_equal(cache_decode_header(out, m, &hdr), 0);
        assert_int_equal(hdr.version, 1);
        assert_int_equal(hdr.sealed.kind, TPM_SEALED_DATA_PCR);
        assert_sealed_equal(&hdr.sealed, &want);
        assert_int_equal(hdr.counter, 0);
        assert_int_equal(cache_decode_keys(out, m, cache_key, &got), 0);
        assert_int_equal(keyring_size(got), 2);
        assert_int_equal(keyring_find(got, "a")->role, KEY_ROLE_RETIRED);
        assert_int_equal(keyring_find(got, "a")->missing_since_usec, 0);
        assert_memory_equal(keyring_find(got, "b")->kek, kek2, AES256_KEY_SIZE);
        assert_string_equal(keyring_primary(got)->id, "b");

        /* a sealed data object is never written in format 2 (the vault
         * migrates to a new TPM-generated key), and a format-2 header naming
         * one is malformed: its secret was its maker's choice */
        assert_int_equal(cache_encode(&hdr, cache_key, got, &again, &len), -EINVAL);
        assert_null(again);
        encode(&file, &len);
        file[12] = TPM_SEALED_DATA_PCR;
        assert_int_equal(cache_decode_header(file, len, &hdr), -EBADMSG);
        free(file);
        file = NULL;

        /* the two header layouts are not confusable: a format-1 header that
         * says 2 reads the hash algorithm's high byte (0) as the kind, and a
         * format-2 header that says 1 reads a PCR mask above 23 */
        out[11] = 2;
        assert_int_equal(cache_decode_header(out, m, &hdr), -EBADMSG);
        out[11] = 1;
        encode(&file, &len);
        file[11] = 1;
        assert_int_equal(cache_decode_header(file, len, &hdr), -EBADMSG);
        file[11] = 2;

        /* format-2 records behind a format-1 header do not parse */
        n = 4;
        n += put_record(pt + n, 2, KEY_ROLE_RETIRED, 0, "a", 1, kek1);
        n += put_record(pt + n, 2, KEY_ROLE_PRIMARY, 0, "b", 1, kek2);
        assert_int_equal(decode_behind(v1, HEADER1_SIZE, nonce, pt, n), -EBADMSG);
        /* format 1 had no missing role */
        n = 4;
        memcpy(pt, "\0\0\0\1", 4);
        n += put_record(pt + n, 1, KEY_ROLE_MISSING, 0, "a", 1, kek1);
        assert_int_equal(decode_behind(v1, HEADER1_SIZE, nonce, pt, n), -EBADMSG);
        /* and format-1 records behind a format-2 header do not parse either */
        n = 4;
        n += put_record(pt + n, 1, KEY_ROLE_RETIRED, 0, "a", 1, kek1);
        assert_int_equal(decode_plaintext(file, pt, n), -EBADMSG);
        /* control: the same record in format 1 behind the format-1 header does */
        assert_int_equal(decode_behind(v1, HEADER1_SIZE, nonce, pt, n), 0);
}

/* The u64 rollback counter ends the header. A file cut inside it is not a
 * file, one without it does not frame, and since the header is the AAD, a
 * changed counter fails authentication: an old file cannot claim a newer
 * counter value. */
static void test_cache_decode_counter(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        uint8_t nonce[12], pt[1024], out[HEADER_SIZE + 12 + 4 + 1024 + 16];
        struct keyring *got = NULL;
        struct cache_header hdr;
        size_t len, n, m;

        encode(&buf, &len);
        for (size_t cut_len = OFF_COUNTER; cut_len < HEADER_SIZE; cut_len++) {
                uint8_t *cut = malloc(cut_len);   /* exact size, for ASan */

                assert_non_null(cut);
                memcpy(cut, buf, cut_len);
                assert_int_equal(cache_decode_header(cut, cut_len, &hdr), -EBADMSG);
                assert_int_equal(cache_decode_keys(cut, cut_len, cache_key, &got), -EBADMSG);
                assert_null(got);
                free(cut);
        }

        /* a format-2 header without its counter, a valid payload behind it */
        memset(nonce, 0x4e, sizeof(nonce));
        n = 4;
        memcpy(pt, "\0\0\0\1", 4);
        n += put_key(pt + n, KEY_ROLE_PRIMARY, "a", 1, kek1);
        assert_int_equal(decode_behind(buf, HEADER_SIZE, nonce, pt, n), 0);   /* control */
        m = seal_behind(buf, OFF_COUNTER, nonce, pt, n, out);
        assert_int_equal(cache_decode_header(out, m, &hdr), -EBADMSG);
        assert_int_equal(cache_decode_keys(out, m, cache_key, &got), -EBADMSG);
        assert_null(got);

        /* any counter byte changed: the header parses (it proves nothing)
         * and says the other value, the keys do not authenticate */
        for (size_t i = OFF_COUNTER; i < HEADER_SIZE; i++) {
                buf[i] ^= 0x01;
                assert_int_equal(cache_decode_header(buf, len, &hdr), 0);
                assert_int_equal(hdr.counter, COUNTER ^ (UINT64_C(1) << (8 * (HEADER_SIZE - 1 - i))));
                assert_int_equal(cache_decode_keys(buf, len, cache_key, &got), -EBADMSG);
                assert_null(got);
                buf[i] ^= 0x01;
        }
        assert_int_equal(cache_decode_keys(buf, len, cache_key, &got), 0);
        assert_keyring_equal(got, kr);
        keyring_unref(got);
}

static void test_cache_decode_header_bounds(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        struct cache_header hdr;
        size_t len;

        encode(&buf, &len);
        /* public size 0, and above TPM_BLOB_MAX */
        buf[OFF_PUBLIC_SIZE] = 0;
        buf[OFF_PUBLIC_SIZE + 1] = 0;
        assert_int_equal(cache_decode_header(buf, len, &hdr), -EBADMSG);
        buf[OFF_PUBLIC_SIZE] = (TPM_BLOB_MAX + 1) >> 8;
        buf[OFF_PUBLIC_SIZE + 1] = (TPM_BLOB_MAX + 1) & 0xff;
        assert_int_equal(cache_decode_header(buf, len, &hdr), -EBADMSG);
        buf[OFF_PUBLIC_SIZE] = 0;
        buf[OFF_PUBLIC_SIZE + 1] = P_SIZE;
        /* a PCR above 23 */
        buf[OFF_MASK] = 0x01;
        assert_int_equal(cache_decode_header(buf, len, &hdr), -EBADMSG);
        buf[OFF_MASK] = 0;
        /* sealed-object kind 0 */
        buf[OFF_KIND] = 0;
        assert_int_equal(cache_decode_header(buf, len, &hdr), -EBADMSG);
        buf[OFF_KIND] = TPM_SEALED_HMAC_PCR;
        assert_int_equal(cache_decode_header(buf, len, &hdr), 0);
        /* header is all zeroes after a failure */
        buf[0] = 'X';
        memset(&hdr, 0xff, sizeof(hdr));
        assert_int_equal(cache_decode_header(buf, len, &hdr), -EBADMSG);
        assert_int_equal(hdr.version, 0);
        assert_int_equal(hdr.sealed.kind, 0);
        assert_int_equal(hdr.sealed.public_size, 0);
        assert_int_equal(hdr.sealed.private_size, 0);
        assert_int_equal(hdr.counter, 0);
        assert_int_equal(cache_decode_header(NULL, 0, &hdr), -EBADMSG);
}

static void test_cache_write_file_atomic(void **state) {
        _cleanup_free_ uint8_t *buf = NULL, *back = NULL;
        char path[256];
        struct stat st;
        struct dirent *de;
        DIR *d;
        size_t len, back_len;
        mode_t old;

        encode(&buf, &len);
        old = umask(0277);   /* the mode must not depend on the umask */
        assert_int_equal(cache_write_file(tmpdir, buf, len), 0);
        umask(old);

        snprintf(path, sizeof(path), "%s/%s", tmpdir, CACHE_FILE_NAME);
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal(st.st_mode & 07777, 0600);
        assert_int_equal(st.st_size, len);

        /* overwrite: the new content replaces the old by rename */
        assert_int_equal(cache_write_file(tmpdir, (const uint8_t *) "second", 6), 0);
        assert_int_equal(cache_read_file(tmpdir, &back, &back_len), 0);
        assert_int_equal(back_len, 6);
        assert_memory_equal(back, "second", 6);
        free(back);
        back = NULL;

        assert_int_equal(cache_write_file(tmpdir, buf, len), 0);
        assert_int_equal(cache_read_file(tmpdir, &back, &back_len), 0);
        assert_int_equal(back_len, len);
        assert_memory_equal(back, buf, len);

        /* no temp file left behind */
        d = opendir(tmpdir);
        assert_non_null(d);
        while ((de = readdir(d))) {
                if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
                        continue;
                assert_string_equal(de->d_name, CACHE_FILE_NAME);
        }
        closedir(d);
}

static void test_cache_write_file_errors(void **state) {
        static uint8_t dummy[1];

        assert_int_equal(cache_write_file("/nonexistent-dir-tpmkms", dummy, 1), -ENOENT);
        assert_int_equal(cache_write_file(tmpdir, dummy, CACHE_FILE_MAX + 1), -EFBIG);
        assert_int_equal(cache_write_file("/etc/passwd", dummy, 1), -ENOTDIR);
}

static void test_cache_read_file_missing(void **state) {
        char dir[] = "/tmp/test-cache-empty.XXXXXX";
        uint8_t *buf = NULL;
        size_t len;

        assert_non_null(mkdtemp(dir));
        assert_int_equal(cache_read_file(dir, &buf, &len), -ENOENT);
        assert_int_equal(cache_read_file("/nonexistent-dir-tpmkms", &buf, &len), -ENOENT);
        assert_null(buf);
        rmdir(dir);
}

static void test_cache_read_file_oversize(void **state) {
        char dir[] = "/tmp/test-cache-big.XXXXXX", path[256], link[256];
        uint8_t *buf = NULL;
        size_t len;
        int fd;

        assert_non_null(mkdtemp(dir));
        snprintf(path, sizeof(path), "%s/%s", dir, CACHE_FILE_NAME);
        fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        assert_int_equal(ftruncate(fd, CACHE_FILE_MAX + 1), 0);
        assert_int_equal(cache_read_file(dir, &buf, &len), -EFBIG);
        assert_null(buf);

        /* exactly the limit is fine */
        assert_int_equal(ftruncate(fd, CACHE_FILE_MAX), 0);
        assert_int_equal(cache_read_file(dir, &buf, &len), 0);
        assert_int_equal(len, CACHE_FILE_MAX);
        free(buf);
        buf = NULL;
        close(fd);

        /* a symlink is refused, not followed */
        snprintf(link, sizeof(link), "%s/target", dir);
        assert_int_equal(rename(path, link), 0);
        assert_int_equal(symlink(link, path), 0);
        assert_int_equal(cache_read_file(dir, &buf, &len), -ELOOP);
        unlink(path);
        unlink(link);

        /* a directory in its place is not a cache */
        assert_int_equal(mkdir(path, 0700), 0);
        assert_int_equal(cache_read_file(dir, &buf, &len), -EINVAL);
        rmdir(path);
        rmdir(dir);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_cache_encode_round_trip),
                cmocka_unit_test(test_cache_encode_empty_keyring),
                cmocka_unit_test(test_cache_encode_invalid_sealed),
                cmocka_unit_test(test_cache_encode_no_secret_in_file),
                cmocka_unit_test(test_cache_encode_fresh_nonce),
                cmocka_unit_test(test_cache_decode_keys_every_byte_flip),
                cmocka_unit_test(test_cache_decode_truncated),
                cmocka_unit_test(test_cache_decode_trailing_bytes),
                cmocka_unit_test(test_cache_decode_keys_wrong_key),
                cmocka_unit_test(test_cache_decode_header_other_version),
                cmocka_unit_test(test_cache_decode_keys_malformed_plaintext),
                cmocka_unit_test(test_cache_decode_header_bounds),
                cmocka_unit_test(test_cache_identity_round_trip),
                cmocka_unit_test(test_cache_identity_malformed),
                cmocka_unit_test(test_cache_encode_round_trip_missing),
                cmocka_unit_test(test_cache_decode_keys_missing_since_consistent),
                cmocka_unit_test(test_cache_decode_keys_format_1),
                cmocka_unit_test(test_cache_decode_counter),
                cmocka_unit_test(test_cache_write_file_atomic),
                cmocka_unit_test(test_cache_write_file_errors),
                cmocka_unit_test(test_cache_read_file_missing),
                cmocka_unit_test(test_cache_read_file_oversize),
        };

        return cmocka_run_group_tests(tests, setup, teardown);
}
