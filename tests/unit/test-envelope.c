/* agent/keystore/envelope.c: AES-256-GCM envelopes bound to key id and version. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "keystore.h"

#define PT_SIZE 32   /* the apiserver's DEK seed */

static uint8_t kek[32], kek2[32], pt[PT_SIZE];

static int setup(void **state) {
        for (size_t i = 0; i < 32; i++) {
                kek[i] = (uint8_t) i;
                kek2[i] = (uint8_t) (i + 1);
                pt[i] = (uint8_t) (0xf0 ^ i);
        }
        return 0;
}

static bool all_zero(const uint8_t *p, size_t n) {
        for (size_t i = 0; i < n; i++)
                if (p[i])
                        return false;
        return true;
}

static void test_envelope_seal_round_trip(void **state) {
        uint8_t ct[PT_SIZE + ENVELOPE_OVERHEAD], out[PT_SIZE];
        int n;

        n = envelope_seal(kek, "key-1.abcdef", pt, sizeof(pt), ct, sizeof(ct));
        assert_int_equal(n, PT_SIZE + 29);
        assert_int_equal(ct[0], ENVELOPE_VERSION);
        assert_memory_not_equal(ct + 13, pt, PT_SIZE);
        assert_int_equal(envelope_open(kek, "key-1.abcdef", ct, (size_t) n, out, sizeof(out)), PT_SIZE);
        assert_memory_equal(out, pt, PT_SIZE);

        /* odd sizes, bigger than a block, one byte */
        for (size_t len = 1; len <= 100; len += 33) {
                uint8_t big_pt[100], big_ct[100 + ENVELOPE_OVERHEAD], big_out[100];

                memset(big_pt, 0x5c, sizeof(big_pt));
                n = envelope_seal(kek, "k", big_pt, len, big_ct, sizeof(big_ct));
                assert_int_equal(n, (int) (len + ENVELOPE_OVERHEAD));
                assert_int_equal(envelope_open(kek, "k", big_ct, (size_t) n, big_out, sizeof(big_out)),
                                 (int) len);
                assert_memory_equal(big_out, big_pt, len);
        }
}

static void test_envelope_open_every_byte_flip(void **state) {
        uint8_t ct[PT_SIZE + ENVELOPE_OVERHEAD], out[PT_SIZE];
        int n = envelope_seal(kek, "id", pt, sizeof(pt), ct, sizeof(ct));

        assert_int_equal(n, (int) sizeof(ct));
        for (size_t i = 0; i < sizeof(ct); i++)
                for (int bit = 0; bit < 8; bit++) {
                        ct[i] ^= (uint8_t) (1 << bit);
                        memset(out, 0xee, sizeof(out));
                        assert_int_equal(envelope_open(kek, "id", ct, sizeof(ct), out, sizeof(out)),
                                         -EBADMSG);
                        assert_true(all_zero(out, sizeof(out)));   /* wiped */
                        ct[i] ^= (uint8_t) (1 << bit);
                }
        assert_int_equal(envelope_open(kek, "id", ct, sizeof(ct), out, sizeof(out)), PT_SIZE);
}

static void test_envelope_open_truncated(void **state) {
        uint8_t ct[PT_SIZE + ENVELOPE_OVERHEAD], longer[sizeof(ct) + 1], out[PT_SIZE + 1];
        int n = envelope_seal(kek, "id", pt, sizeof(pt), ct, sizeof(ct));

        assert_int_equal(n, (int) sizeof(ct));
        for (size_t len = 0; len < sizeof(ct); len++)
                assert_int_equal(envelope_open(kek, "id", ct, len, out, sizeof(out)), -EBADMSG);
        /* a byte appended shifts the tag */
        memcpy(longer, ct, sizeof(ct));
        longer[sizeof(ct)] = 0;
        assert_int_equal(envelope_open(kek, "id", longer, sizeof(longer), out, sizeof(out)), -EBADMSG);
}

static void test_envelope_open_wrong_key(void **state) {
        uint8_t ct[PT_SIZE + ENVELOPE_OVERHEAD], out[PT_SIZE];

        assert_int_equal(envelope_seal(kek, "id", pt, sizeof(pt), ct, sizeof(ct)), (int) sizeof(ct));
        memset(out, 0xee, sizeof(out));
        assert_int_equal(envelope_open(kek2, "id", ct, sizeof(ct), out, sizeof(out)), -EBADMSG);
        assert_true(all_zero(out, sizeof(out)));
}

static void test_envelope_open_wrong_key_id(void **state) {
        static const char *const other[] = { "id2", "i", "", "ID", "id\n", "tpmkms-envelope" };
        uint8_t ct[PT_SIZE + ENVELOPE_OVERHEAD], out[PT_SIZE];

        assert_int_equal(envelope_seal(kek, "id", pt, sizeof(pt), ct, sizeof(ct)), (int) sizeof(ct));
        for (size_t i = 0; i < sizeof(other) / sizeof(other[0]); i++)
                assert_int_equal(envelope_open(kek, other[i], ct, sizeof(ct), out, sizeof(out)), -EBADMSG);
        assert_int_equal(envelope_open(kek, "id", ct, sizeof(ct), out, sizeof(out)), PT_SIZE);
}

static void test_envelope_open_unknown_version(void **state) {
        uint8_t ct[PT_SIZE + ENVELOPE_OVERHEAD], out[PT_SIZE];

        assert_int_equal(envelope_seal(kek, "id", pt, sizeof(pt), ct, sizeof(ct)), (int) sizeof(ct));
        for (int v = 0; v < 256; v++) {
                if (v == ENVELOPE_VERSION)
                        continue;
                ct[0] = (uint8_t) v;
                assert_int_equal(envelope_open(kek, "id", ct, sizeof(ct), out, sizeof(out)), -EBADMSG);
        }
}

static int nonce_cmp(const void *a, const void *b) {
        return memcmp(a, b, ENVELOPE_NONCE_SIZE);
}

static void test_envelope_seal_nonce_unique(void **state) {
        enum { N = 20000 };
        uint8_t (*nonces)[ENVELOPE_NONCE_SIZE] = calloc(N, ENVELOPE_NONCE_SIZE);
        uint8_t ct[PT_SIZE + ENVELOPE_OVERHEAD];

        assert_non_null(nonces);
        for (int i = 0; i < N; i++) {
                assert_int_equal(envelope_seal(kek, "id", pt, sizeof(pt), ct, sizeof(ct)), (int) sizeof(ct));
                memcpy(nonces[i], ct + 1, ENVELOPE_NONCE_SIZE);
        }
        qsort(nonces, N, ENVELOPE_NONCE_SIZE, nonce_cmp);
        for (int i = 1; i < N; i++)
                assert_memory_not_equal(nonces[i - 1], nonces[i], ENVELOPE_NONCE_SIZE);
        free(nonces);
}

static void test_envelope_seal_enobufs(void **state) {
        uint8_t ct[PT_SIZE + ENVELOPE_OVERHEAD], out[PT_SIZE];

        assert_int_equal(envelope_seal(kek, "id", pt, sizeof(pt), ct, sizeof(ct) - 1), -ENOBUFS);
        assert_int_equal(envelope_seal(kek, "id", pt, sizeof(pt), ct, sizeof(ct)), (int) sizeof(ct));
        memset(out, 0xee, sizeof(out));
        assert_int_equal(envelope_open(kek, "id", ct, sizeof(ct), out, sizeof(out) - 1), -ENOBUFS);
        assert_true(all_zero(out, sizeof(out) - 1));
        assert_int_equal(envelope_open(kek, "id", ct, sizeof(ct), out, sizeof(out)), PT_SIZE);
}

static void test_envelope_seal_invalid(void **state) {
        uint8_t ct[64];

        assert_int_equal(envelope_seal(kek, "id", pt, 0, ct, sizeof(ct)), -EINVAL);
        assert_int_equal(envelope_seal(kek, "id", NULL, 1, ct, sizeof(ct)), -EINVAL);
        assert_int_equal(envelope_seal(kek, "", pt, 1, ct, sizeof(ct)), -EINVAL);
        assert_int_equal(envelope_seal(kek, NULL, pt, 1, ct, sizeof(ct)), -EINVAL);
        assert_int_equal(envelope_seal(NULL, "id", pt, 1, ct, sizeof(ct)), -EINVAL);
}

/* The per-thread context: many threads sealing and opening at once, each
 * with its own key, must never see another's key or state. */
static void *worker(void *p) {
        uint8_t k[32], ct[PT_SIZE + ENVELOPE_OVERHEAD], out[PT_SIZE];
        char id[16];

        memset(k, (int) (intptr_t) p, sizeof(k));
        snprintf(id, sizeof(id), "t%d", (int) (intptr_t) p);
        for (int i = 0; i < 2000; i++) {
                if (envelope_seal(k, id, pt, sizeof(pt), ct, sizeof(ct)) != (int) sizeof(ct) ||
                    envelope_open(k, id, ct, sizeof(ct), out, sizeof(out)) != PT_SIZE ||
                    memcmp(out, pt, PT_SIZE) != 0 ||
                    envelope_open(kek, id, ct, sizeof(ct), out, sizeof(out)) != -EBADMSG)
                        return (void *) 1;
        }
        return NULL;
}

static void test_envelope_seal_threads(void **state) {
        pthread_t t[4];

        for (intptr_t i = 0; i < 4; i++)
                assert_int_equal(pthread_create(&t[i], NULL, worker, (void *) (i + 100)), 0);
        for (int i = 0; i < 4; i++) {
                void *ret;

                assert_int_equal(pthread_join(t[i], &ret), 0);
                assert_null(ret);
        }
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_envelope_seal_round_trip),
                cmocka_unit_test(test_envelope_open_every_byte_flip),
                cmocka_unit_test(test_envelope_open_truncated),
                cmocka_unit_test(test_envelope_open_wrong_key),
                cmocka_unit_test(test_envelope_open_wrong_key_id),
                cmocka_unit_test(test_envelope_open_unknown_version),
                cmocka_unit_test(test_envelope_seal_nonce_unique),
                cmocka_unit_test(test_envelope_seal_enobufs),
                cmocka_unit_test(test_envelope_seal_invalid),
                cmocka_unit_test(test_envelope_seal_threads),
        };

        return cmocka_run_group_tests(tests, setup, NULL);
}
