/* agent/keystore/keyring.c: ordering, primary, lookups, validation, reference counts,
 * the slot, add_primary and key ids. */
#include <errno.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "keystore.h"
#include "macro.h"

static uint8_t kek_a[AES256_KEY_SIZE], kek_b[AES256_KEY_SIZE], kek_c[AES256_KEY_SIZE];

static int setup(void **state) {
        if (keyring_secure_heap_init() < 0)
                return -1;
        memset(kek_a, 0xa1, sizeof(kek_a));
        memset(kek_b, 0xb2, sizeof(kek_b));
        memset(kek_c, 0xc3, sizeof(kek_c));
        return 0;
}

static struct key_version kv(const char *id, const char *central_id, enum key_role role,
                             uint64_t created, uint8_t *kek) {
        struct key_version v = { .role = role, .created_usec = created, .first_seen_usec = 7,
                                 .kek = kek };

        snprintf(v.id, sizeof(v.id), "%s", id);
        snprintf(v.central_id, sizeof(v.central_id), "%s", central_id);
        return v;
}

static void test_keyring_secure_heap_init_idempotent(void **state) {
        assert_true(CRYPTO_secure_malloc_initialized());
        assert_int_equal(keyring_secure_heap_init(), 0);
}

static void test_key_role_strings(void **state) {
        assert_string_equal(key_role_to_string(KEY_ROLE_STAGED), "staged");
        assert_string_equal(key_role_to_string(KEY_ROLE_PRIMARY), "primary");
        assert_string_equal(key_role_to_string(KEY_ROLE_RETIRED), "retired");
        assert_null(key_role_to_string(_KEY_ROLE_MAX));
        assert_null(key_role_to_string((enum key_role) -1));
        for (int r = 0; r < _KEY_ROLE_MAX; r++)
                assert_int_equal(key_role_from_string(key_role_to_string(r)), r);
        assert_int_equal(key_role_from_string("Primary"), -EINVAL);
        assert_int_equal(key_role_from_string(""), -EINVAL);
        assert_int_equal(key_role_from_string(NULL), -EINVAL);
}

static void test_keyring_new_ordering(void **state) {
        struct key_version keys[] = {
                kv("c", "uid-3", KEY_ROLE_STAGED, 300, kek_c),
                kv("b2", "uid-2b", KEY_ROLE_RETIRED, 200, kek_b),
                kv("a", "uid-1", KEY_ROLE_RETIRED, 100, kek_a),
                kv("b1", "uid-2a", KEY_ROLE_PRIMARY, 200, kek_b),  /* tie: central id decides */
                kv("z", "", KEY_ROLE_RETIRED, 100, kek_a),          /* tie: "" < "uid-1" */
                kv("y", "", KEY_ROLE_RETIRED, 100, kek_a),          /* tie on both: id decides */
        };
        static const char *const want[] = { "y", "z", "a", "b1", "b2", "c" };
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;

        assert_int_equal(keyring_new(keys, 6, &kr), 0);
        assert_int_equal(keyring_size(kr), 6);
        for (size_t i = 0; i < 6; i++)
                assert_string_equal(keyring_get(kr, i)->id, want[i]);
        assert_null(keyring_get(kr, 6));
        assert_string_equal(keyring_primary(kr)->id, "b1");
        assert_int_equal(keyring_primary(kr)->role, KEY_ROLE_PRIMARY);
}

static void test_keyring_new_copies_keks(void **state) {
        uint8_t kek[AES256_KEY_SIZE];
        struct key_version k;
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        const struct key_version *v;

        memset(kek, 0x42, sizeof(kek));
        k = kv("id1", "", KEY_ROLE_PRIMARY, 1, kek);
        assert_int_equal(keyring_new(&k, 1, &kr), 0);
        memset(kek, 0, sizeof(kek));
        memset(&k, 0, sizeof(k));

        v = keyring_get(kr, 0);
        assert_ptr_not_equal(v->kek, kek);
        assert_true(CRYPTO_secure_allocated(v->kek));
        memset(kek, 0x42, sizeof(kek));
        assert_memory_equal(v->kek, kek, AES256_KEY_SIZE);
        assert_string_equal(v->id, "id1");
        assert_int_equal(v->first_seen_usec, 7);
}

static void test_keyring_new_empty(void **state) {
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;

        assert_int_equal(keyring_new(NULL, 0, &kr), 0);
        assert_int_equal(keyring_size(kr), 0);
        assert_null(keyring_primary(kr));
        assert_null(keyring_find(kr, "x"));
        assert_null(keyring_get(kr, 0));
        assert_int_equal(keyring_size(NULL), 0);
        assert_null(keyring_primary(NULL));
        assert_null(keyring_find(NULL, "x"));
}

static void test_keyring_new_rejects(void **state) {
        struct key_version two_primaries[] = {
                kv("a", "", KEY_ROLE_PRIMARY, 1, kek_a),
                kv("b", "", KEY_ROLE_PRIMARY, 2, kek_b),
        };
        struct key_version dup_id[] = {
                kv("a", "u1", KEY_ROLE_RETIRED, 1, kek_a),
                kv("a", "u2", KEY_ROLE_PRIMARY, 2, kek_b),
        };
        struct key_version dup_central[] = {
                kv("a", "u1", KEY_ROLE_RETIRED, 1, kek_a),
                kv("b", "u1", KEY_ROLE_PRIMARY, 2, kek_b),
        };
        struct key_version empty_central[] = {   /* standalone: "" twice is fine */
                kv("a", "", KEY_ROLE_RETIRED, 1, kek_a),
                kv("b", "", KEY_ROLE_PRIMARY, 2, kek_b),
        };
        struct key_version bad = kv("", "", KEY_ROLE_PRIMARY, 1, kek_a);
        struct keyring *kr = NULL;

        assert_int_equal(keyring_new(two_primaries, 2, &kr), -EINVAL);
        assert_int_equal(keyring_new(dup_id, 2, &kr), -EINVAL);
        assert_int_equal(keyring_new(dup_central, 2, &kr), -EINVAL);
        assert_int_equal(keyring_new(&bad, 1, &kr), -EINVAL);             /* empty id */
        bad = kv("x", "", KEY_ROLE_PRIMARY, 1, NULL);
        assert_int_equal(keyring_new(&bad, 1, &kr), -EINVAL);             /* no KEK */
        bad = kv("x", "", _KEY_ROLE_MAX, 1, kek_a);
        assert_int_equal(keyring_new(&bad, 1, &kr), -EINVAL);             /* bad role */
        bad = kv("x", "", KEY_ROLE_PRIMARY, 1, kek_a);
        memset(bad.id, 'x', sizeof(bad.id));                              /* unterminated */
        assert_int_equal(keyring_new(&bad, 1, &kr), -EINVAL);
        bad = kv("x", "", KEY_ROLE_PRIMARY, 1, kek_a);
        memset(bad.central_id, 'x', sizeof(bad.central_id));
        assert_int_equal(keyring_new(&bad, 1, &kr), -EINVAL);
        assert_int_equal(keyring_new(NULL, 1, &kr), -EINVAL);
        assert_null(kr);

        assert_int_equal(keyring_new(empty_central, 2, &kr), 0);
        keyring_unref(kr);
}

static void test_keyring_new_max_keys(void **state) {
        struct key_version *keys = calloc(KEYRING_MAX_KEYS + 1, sizeof(*keys));
        struct keyring *kr = NULL;

        assert_non_null(keys);
        for (size_t i = 0; i <= KEYRING_MAX_KEYS; i++) {
                keys[i] = kv("", "", KEY_ROLE_RETIRED, i, kek_a);
                snprintf(keys[i].id, sizeof(keys[i].id), "k%zu", i);
        }
        assert_int_equal(keyring_new(keys, KEYRING_MAX_KEYS + 1, &kr), -EINVAL);
        assert_int_equal(keyring_new(keys, KEYRING_MAX_KEYS, &kr), 0);
        assert_int_equal(keyring_size(kr), KEYRING_MAX_KEYS);
        assert_string_equal(keyring_find(kr, "k511")->id, "k511");
        keyring_unref(kr);
        free(keys);
}

static void test_keyring_find_exact(void **state) {
        struct key_version keys[] = {
                kv("key", "", KEY_ROLE_RETIRED, 1, kek_a),
                kv("key.1", "", KEY_ROLE_PRIMARY, 2, kek_b),
                kv("key.10", "", KEY_ROLE_STAGED, 3, kek_c),
        };
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;

        assert_int_equal(keyring_new(keys, 3, &kr), 0);
        assert_memory_equal(keyring_find(kr, "key")->kek, kek_a, AES256_KEY_SIZE);
        assert_memory_equal(keyring_find(kr, "key.1")->kek, kek_b, AES256_KEY_SIZE);
        assert_memory_equal(keyring_find(kr, "key.10")->kek, kek_c, AES256_KEY_SIZE);
        assert_null(keyring_find(kr, "key.100"));
        assert_null(keyring_find(kr, "key.0"));
        assert_null(keyring_find(kr, "ke"));
        assert_null(keyring_find(kr, ""));
        assert_null(keyring_find(kr, NULL));
}

static void test_keyring_unref_refcount(void **state) {
        struct key_version k = kv("a", "", KEY_ROLE_PRIMARY, 1, kek_a);
        struct keyring *kr = NULL;

        assert_int_equal(keyring_new(&k, 1, &kr), 0);
        assert_ptr_equal(keyring_ref(kr), kr);
        assert_null(keyring_unref(kr));
        /* still alive: one reference left (ASan would flag a use after free) */
        assert_string_equal(keyring_get(kr, 0)->id, "a");
        assert_null(keyring_unref(kr));
        assert_null(keyring_unref(NULL));
        assert_null(keyring_ref(NULL));
}

static void test_keyring_slot_publish(void **state) {
        struct key_version k1 = kv("one", "", KEY_ROLE_PRIMARY, 1, kek_a);
        struct key_version k2 = kv("two", "", KEY_ROLE_PRIMARY, 2, kek_b);
        struct keyring_slot slot;
        struct keyring *kr1 = NULL, *kr2 = NULL, *held, *got;

        keyring_slot_init(&slot);
        assert_null(keyring_slot_get(&slot));

        assert_int_equal(keyring_new(&k1, 1, &kr1), 0);
        assert_int_equal(keyring_new(&k2, 1, &kr2), 0);
        keyring_slot_publish(&slot, kr1);
        keyring_unref(kr1);              /* the slot holds its own reference */

        held = keyring_slot_get(&slot);  /* a reader in flight */
        assert_ptr_equal(held, kr1);
        keyring_slot_publish(&slot, kr2);
        keyring_unref(kr2);

        /* the reader keeps the old snapshot intact after the swap */
        assert_string_equal(keyring_primary(held)->id, "one");
        assert_memory_equal(keyring_primary(held)->kek, kek_a, AES256_KEY_SIZE);
        keyring_unref(held);

        got = keyring_slot_get(&slot);
        assert_string_equal(keyring_primary(got)->id, "two");
        keyring_unref(got);

        keyring_slot_publish(&slot, NULL);
        assert_null(keyring_slot_get(&slot));
        keyring_slot_publish(&slot, kr2 = NULL);
        keyring_slot_done(&slot);
}

struct race {
        struct keyring_slot *slot;
        int iterations;
};

static void *reader(void *p) {
        struct race *r = p;

        for (int i = 0; i < r->iterations; i++) {
                struct keyring *kr = keyring_slot_get(r->slot);

                if (kr) {
                        const struct key_version *v = keyring_primary(kr);

                        /* every snapshot is internally consistent */
                        if (!v || v->kek[0] != (uint8_t) v->id[0])
                                abort();
                        keyring_unref(kr);
                }
        }
        return NULL;
}

static void test_keyring_slot_concurrent(void **state) {
        struct keyring_slot slot;
        struct race race = { .slot = &slot, .iterations = 20000 };
        pthread_t t[3];

        keyring_slot_init(&slot);
        for (int i = 0; i < 3; i++)
                assert_int_equal(pthread_create(&t[i], NULL, reader, &race), 0);
        for (int i = 0; i < 2000; i++) {
                uint8_t kek[AES256_KEY_SIZE];
                struct key_version k;
                struct keyring *kr = NULL;
                char id[2] = { (char) ('a' + i % 26), 0 };

                memset(kek, id[0], sizeof(kek));
                k = kv(id, "", KEY_ROLE_PRIMARY, (uint64_t) i, kek);
                assert_int_equal(keyring_new(&k, 1, &kr), 0);
                keyring_slot_publish(&slot, kr);
                keyring_unref(kr);
        }
        for (int i = 0; i < 3; i++)
                pthread_join(t[i], NULL);
        keyring_slot_done(&slot);
}

static void test_keyring_add_primary_demotes(void **state) {
        struct key_version keys[] = {
                kv("old", "", KEY_ROLE_RETIRED, 1, kek_a),
                kv("cur", "", KEY_ROLE_PRIMARY, 2, kek_b),
        };
        struct key_version next = kv("new", "", KEY_ROLE_STAGED, 3, kek_c);
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL, *kr2 = NULL, *kr3 = NULL;

        assert_int_equal(keyring_new(keys, 2, &kr), 0);
        assert_int_equal(keyring_add_primary(kr, &next, &kr2), 0);
        assert_int_equal(keyring_size(kr2), 3);
        assert_string_equal(keyring_primary(kr2)->id, "new");
        assert_memory_equal(keyring_primary(kr2)->kek, kek_c, AES256_KEY_SIZE);
        assert_int_equal(keyring_find(kr2, "cur")->role, KEY_ROLE_RETIRED);
        assert_int_equal(keyring_find(kr2, "old")->role, KEY_ROLE_RETIRED);
        assert_memory_equal(keyring_find(kr2, "cur")->kek, kek_b, AES256_KEY_SIZE);
        /* the old snapshot is untouched */
        assert_string_equal(keyring_primary(kr)->id, "cur");
        assert_int_equal(keyring_size(kr), 2);
        assert_ptr_not_equal(keyring_find(kr2, "cur")->kek, keyring_find(kr, "cur")->kek);

        /* a duplicate id is refused */
        next = kv("old", "", KEY_ROLE_PRIMARY, 4, kek_c);
        assert_int_equal(keyring_add_primary(kr2, &next, &kr3), -EINVAL);
        assert_null(kr3);

        /* the very first key of a standalone host */
        next = kv("first", "", KEY_ROLE_PRIMARY, 4, kek_c);
        assert_int_equal(keyring_add_primary(NULL, &next, &kr3), 0);
        assert_int_equal(keyring_size(kr3), 1);
        assert_string_equal(keyring_primary(kr3)->id, "first");
        assert_int_equal(keyring_add_primary(kr, NULL, &kr3), -EINVAL);
}

static void test_key_id_make_deterministic(void **state) {
        char a[KEY_ID_MAX], b[KEY_ID_MAX], c[KEY_ID_MAX], d[KEY_ID_MAX];
        uint8_t zero[AES256_KEY_SIZE] = {};

        assert_int_equal(key_id_make("kmip:1234-abcd", kek_a, a, sizeof(a)), 0);
        assert_int_equal(key_id_make("kmip:1234-abcd", kek_a, b, sizeof(b)), 0);
        assert_string_equal(a, b);
        assert_int_equal(strlen(a), strlen("kmip:1234-abcd") + 1 + 2 * KEY_CHECK_VALUE_SIZE);
        assert_int_equal(strncmp(a, "kmip:1234-abcd.", 15), 0);
        assert_int_equal(strspn(a + 15, "0123456789abcdef"), 2 * KEY_CHECK_VALUE_SIZE);

        /* another KEK under the same identity: another id */
        assert_int_equal(key_id_make("kmip:1234-abcd", kek_b, c, sizeof(c)), 0);
        assert_string_not_equal(a, c);
        assert_int_equal(key_id_make("other", kek_a, d, sizeof(d)), 0);
        assert_string_equal(a + 15, d + 6);

        /* a known answer, so the label cannot drift silently between hosts:
         * HMAC-SHA256(32 zero bytes, "tpmkms key check value v1")[0..8] */
        assert_int_equal(key_id_make("x", zero, d, sizeof(d)), 0);
        assert_string_equal(d, "x.b6f932d487d33032");
}

static void test_key_id_make_identity(void **state) {
        char out[KEY_ID_MAX];

        assert_int_equal(key_id_make("A-Za-z0-9._:/-", kek_a, out, sizeof(out)), 0);
        assert_int_equal(key_id_make("", kek_a, out, sizeof(out)), -EINVAL);
        assert_int_equal(key_id_make(NULL, kek_a, out, sizeof(out)), -EINVAL);
        assert_int_equal(key_id_make("a b", kek_a, out, sizeof(out)), -EINVAL);
        assert_int_equal(key_id_make("a,b", kek_a, out, sizeof(out)), -EINVAL);
        assert_int_equal(key_id_make("a\nb", kek_a, out, sizeof(out)), -EINVAL);
        assert_int_equal(key_id_make("caf\xc3\xa9", kek_a, out, sizeof(out)), -EINVAL);
        assert_int_equal(key_id_make("a", NULL, out, sizeof(out)), -EINVAL);
}

static void test_key_id_make_enobufs(void **state) {
        char out[KEY_ID_MAX];
        size_t need = 3 + 1 + 2 * KEY_CHECK_VALUE_SIZE + 1;

        assert_int_equal(key_id_make("abc", kek_a, out, need - 1), -ENOBUFS);
        assert_int_equal(key_id_make("abc", kek_a, out, need), 0);
        assert_int_equal(strlen(out), need - 1);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_keyring_secure_heap_init_idempotent),
                cmocka_unit_test(test_key_role_strings),
                cmocka_unit_test(test_keyring_new_ordering),
                cmocka_unit_test(test_keyring_new_copies_keks),
                cmocka_unit_test(test_keyring_new_empty),
                cmocka_unit_test(test_keyring_new_rejects),
                cmocka_unit_test(test_keyring_new_max_keys),
                cmocka_unit_test(test_keyring_find_exact),
                cmocka_unit_test(test_keyring_unref_refcount),
                cmocka_unit_test(test_keyring_slot_publish),
                cmocka_unit_test(test_keyring_slot_concurrent),
                cmocka_unit_test(test_keyring_add_primary_demotes),
                cmocka_unit_test(test_key_id_make_deterministic),
                cmocka_unit_test(test_key_id_make_identity),
                cmocka_unit_test(test_key_id_make_enobufs),
        };

        return cmocka_run_group_tests(tests, setup, NULL);
}
