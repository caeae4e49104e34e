/* Immutable keyring snapshots. A snapshot never changes after keyring_new, so
 * readers (the Encrypt/Decrypt path) use it without locks; the only shared
 * mutable things are the reference count (atomic) and the slot pointer
 * (mutex, held for a pointer swap and a ref only). */
#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "keystore.h"
#include "macro.h"
#include "util.h"

/* 1 MiB of mlock'ed memory (a power of two, as OpenSSL requires). It holds
 * two snapshots of KEYRING_MAX_KEYS KEKs during a publish (32 KiB), the
 * plaintext serialisation of the cache (cache.c: at most 512 records of up
 * to ~560 bytes, which the buddy allocator rounds to 512 KiB) and what
 * libcrypto itself puts there (the KMIP client's TLS key). */
#define SECURE_HEAP_SIZE (1024 * 1024)
#define SECURE_HEAP_MINSIZE 16

#define KEY_CHECK_LABEL "tpmkms key check value v1"

struct keyring_entry {
        struct key_version v;
        size_t id_len;   /* compared before the bytes on lookup */
};

struct keyring {
        atomic_uint n_ref;
        size_t n;
        const struct key_version *primary;
        struct keyring_entry e[];
};

static const char *const role_names[_KEY_ROLE_MAX] = {
        [KEY_ROLE_STAGED] = "staged",
        [KEY_ROLE_PRIMARY] = "primary",
        [KEY_ROLE_RETIRED] = "retired",
        [KEY_ROLE_MISSING] = "missing",
};

const char *key_role_to_string(enum key_role r) {
        if ((unsigned) r >= _KEY_ROLE_MAX)
                return NULL;
        return role_names[r];
}

int key_role_from_string(const char *s) {
        if (!s)
                return -EINVAL;
        for (int i = 0; i < _KEY_ROLE_MAX; i++)
                if (strcmp(s, role_names[i]) == 0)
                        return i;
        return -EINVAL;
}

/* CRYPTO_secure_malloc_init returns 2 when the arena exists but could not be
 * mlock'ed or marked MADV_DONTDUMP: for KEKs that is a failure, so the heap is
 * torn down again. The usual cause is RLIMIT_MEMLOCK below SECURE_HEAP_SIZE
 * (LimitMEMLOCK= in the unit). */
int keyring_secure_heap_init(void) {
        int r;

        if (CRYPTO_secure_malloc_initialized())
                return 0;
        r = CRYPTO_secure_malloc_init(SECURE_HEAP_SIZE, SECURE_HEAP_MINSIZE);
        if (r == 1)
                return 0;
        if (r == 2)
                CRYPTO_secure_malloc_done();
        return -ENOMEM;
}

static void keyring_free(struct keyring *kr) {
        for (size_t i = 0; i < kr->n; i++)
                /* Falls back to cleanse + free for memory that came from the
                 * ordinary heap (no secure heap initialised). */
                OPENSSL_secure_clear_free(kr->e[i].v.kek, AES256_KEY_SIZE);
        free(kr);
}

static int version_cmp(const void *a, const void *b) {
        const struct keyring_entry *x = a, *y = b;
        int r;

        if (x->v.created_usec != y->v.created_usec)
                return x->v.created_usec < y->v.created_usec ? -1 : 1;
        r = strcmp(x->v.central_id, y->v.central_id);
        if (r != 0)
                return r;
        return strcmp(x->v.id, y->v.id);
}

static bool version_valid(const struct key_version *v) {
        size_t n = strnlen(v->id, sizeof(v->id));

        return n > 0 && n < sizeof(v->id) &&
               strnlen(v->central_id, sizeof(v->central_id)) < sizeof(v->central_id) &&
               (unsigned) v->role < _KEY_ROLE_MAX && v->kek;
}

int keyring_new(const struct key_version *keys, size_t n, struct keyring **ret) {
        struct keyring *kr;
        size_t n_primary = 0;

        if (!ret || (n > 0 && !keys) || n > KEYRING_MAX_KEYS)
                return -EINVAL;

        for (size_t i = 0; i < n; i++) {
                if (!version_valid(&keys[i]))
                        return -EINVAL;
                if (keys[i].role == KEY_ROLE_PRIMARY && ++n_primary > 1)
                        return -EINVAL;
                for (size_t j = 0; j < i; j++) {
                        if (strcmp(keys[i].id, keys[j].id) == 0)
                                return -EINVAL;
                        /* One central object is one KEK version. */
                        if (keys[i].central_id[0] != '\0' &&
                            strcmp(keys[i].central_id, keys[j].central_id) == 0)
                                return -EINVAL;
                }
        }

        kr = calloc(1, sizeof(*kr) + n * sizeof(kr->e[0]));
        if (!kr)
                return -ENOMEM;
        atomic_init(&kr->n_ref, 1);

        for (size_t i = 0; i < n; i++) {
                struct keyring_entry *e = &kr->e[i];

                e->v = keys[i];
                e->v.kek = OPENSSL_secure_malloc(AES256_KEY_SIZE);
                if (!e->v.kek) {
                        keyring_free(kr);
                        return -ENOMEM;
                }
                kr->n++;
                memcpy(e->v.kek, keys[i].kek, AES256_KEY_SIZE);
                e->id_len = strlen(e->v.id);
        }

        qsort(kr->e, n, sizeof(kr->e[0]), version_cmp);
        for (size_t i = 0; i < n; i++)
                if (kr->e[i].v.role == KEY_ROLE_PRIMARY)
                        kr->primary = &kr->e[i].v;

        *ret = kr;
        return 0;
}

struct keyring *keyring_ref(struct keyring *kr) {
        if (kr)
                atomic_fetch_add_explicit(&kr->n_ref, 1, memory_order_relaxed);
        return kr;
}

struct keyring *keyring_unref(struct keyring *kr) {
        if (!kr)
                return NULL;
        /* release/acquire: every reader's use happens before the wipe */
        if (atomic_fetch_sub_explicit(&kr->n_ref, 1, memory_order_release) == 1) {
                atomic_thread_fence(memory_order_acquire);
                keyring_free(kr);
        }
        return NULL;
}

size_t keyring_size(const struct keyring *kr) {
        return kr ? kr->n : 0;
}

const struct key_version *keyring_get(const struct keyring *kr, size_t i) {
        if (!kr || i >= kr->n)
                return NULL;
        return &kr->e[i].v;
}

const struct key_version *keyring_primary(const struct keyring *kr) {
        return kr ? kr->primary : NULL;
}

const struct key_version *keyring_find(const struct keyring *kr, const char *id) {
        size_t n;

        if (!kr || !id)
                return NULL;
        n = strlen(id);
        for (size_t i = 0; i < kr->n; i++)
                if (kr->e[i].id_len == n && memcmp(kr->e[i].v.id, id, n) == 0)
                        return &kr->e[i].v;
        return NULL;
}

int keyring_add_primary(const struct keyring *kr, const struct key_version *next,
                        struct keyring **ret) {
        _cleanup_free_ struct key_version *keys = NULL;
        size_t n = keyring_size(kr);

        if (!next || !ret || n >= KEYRING_MAX_KEYS)
                return -EINVAL;

        keys = calloc(n + 1, sizeof(*keys));
        if (!keys)
                return -ENOMEM;
        /* Shallow copies: the kek pointers still point into kr, which
         * keyring_new copies from; nothing secret lands in keys itself. */
        for (size_t i = 0; i < n; i++) {
                keys[i] = kr->e[i].v;
                if (keys[i].role == KEY_ROLE_PRIMARY)
                        keys[i].role = KEY_ROLE_RETIRED;
        }
        keys[n] = *next;
        keys[n].role = KEY_ROLE_PRIMARY;

        return keyring_new(keys, n + 1, ret);
}

static bool identity_valid(const char *s) {
        if (!s || !*s)
                return false;
        for (; *s; s++)
                if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') ||
                      (*s >= '0' && *s <= '9') || strchr("._:/%-", *s)))
                        return false;
        return true;
}

int key_id_make(const char *identity, const uint8_t kek[AES256_KEY_SIZE], char *out, size_t size) {
        uint8_t mac[EVP_MAX_MD_SIZE];
        unsigned mac_len = 0;
        size_t n;

        if (!identity_valid(identity) || !kek || !out)
                return -EINVAL;
        n = strlen(identity);
        /* identity '.' hex NUL */
        if (size < n + 1 + 2 * KEY_CHECK_VALUE_SIZE + 1)
                return -ENOBUFS;

        /* A key check value: binds the id to the KEK bytes, so the same
         * central version gets the same id on every host and a different KEK
         * under a reused identity never collides. Not secret, but derived
         * from one: wiped anyway. */
        if (!HMAC(EVP_sha256(), kek, AES256_KEY_SIZE, (const unsigned char *) KEY_CHECK_LABEL,
                  strlen(KEY_CHECK_LABEL), mac, &mac_len) ||
            mac_len < KEY_CHECK_VALUE_SIZE) {
                OPENSSL_cleanse(mac, sizeof(mac));
                return -EIO;
        }

        memcpy(out, identity, n);
        out[n] = '.';
        (void) hex_encode(mac, KEY_CHECK_VALUE_SIZE, out + n + 1, size - n - 1);
        OPENSSL_cleanse(mac, sizeof(mac));
        return 0;
}

void keyring_slot_init(struct keyring_slot *s) {
        pthread_mutex_init(&s->lock, NULL);
        s->current = NULL;
}

struct keyring *keyring_slot_get(struct keyring_slot *s) {
        struct keyring *kr;

        pthread_mutex_lock(&s->lock);
        kr = keyring_ref(s->current);
        pthread_mutex_unlock(&s->lock);
        return kr;
}

void keyring_slot_publish(struct keyring_slot *s, struct keyring *kr) {
        struct keyring *old;

        keyring_ref(kr);
        pthread_mutex_lock(&s->lock);
        old = s->current;
        s->current = kr;
        pthread_mutex_unlock(&s->lock);
        /* Outside the lock: the last unref wipes, which readers need not wait for. */
        keyring_unref(old);
}

void keyring_slot_done(struct keyring_slot *s) {
        keyring_unref(s->current);
        s->current = NULL;
        pthread_mutex_destroy(&s->lock);
}
