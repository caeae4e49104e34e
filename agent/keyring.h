/* The keyring: an immutable, reference-counted snapshot of KEK versions with
 * their roles. KEKs live in OpenSSL's secure heap (mlock'ed, MADV_DONTDUMP)
 * and are wiped when the last reference goes. Snapshots are published with an
 * atomic swap (struct keyring_slot); readers keep the snapshot they took. */
#pragma once

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define KEK_SIZE 32
#define KEY_ID_MAX 256
#define KEY_CHECK_VALUE_SIZE 8     /* bytes of HMAC-SHA256(KEK, label) */
#define KEYRING_MAX_KEYS 512       /* versions per snapshot: bounds secure-heap use */

enum key_role {
        KEY_ROLE_STAGED,   /* may decrypt, not encrypt yet (central Pre-Active) */
        KEY_ROLE_PRIMARY,  /* encrypts; at most one per keyring */
        KEY_ROLE_RETIRED,  /* decrypt only */
        _KEY_ROLE_MAX,
};

const char *key_role_to_string(enum key_role r);
/* Returns the role, or -EINVAL. */
int key_role_from_string(const char *s);

struct key_version {
        char id[KEY_ID_MAX];          /* key_id given to the apiserver */
        char central_id[KEY_ID_MAX];  /* KMIP Unique Identifier; "" standalone */
        enum key_role role;
        uint64_t created_usec;        /* CLOCK_REALTIME: central Initial Date or local creation */
        uint64_t first_seen_usec;     /* CLOCK_REALTIME: when this host first cached it */
        uint8_t *kek;                 /* KEK_SIZE bytes; inside a keyring: secure heap */
};

struct keyring;

/* Initialise the secure heap once per process (before any keyring; a second
 * call is a no-op). 1 MiB, so RLIMIT_MEMLOCK (LimitMEMLOCK=) must allow at
 * least that. Without it KEKs would land in the ordinary heap, so the daemon
 * must treat a failure as fatal. Returns 0, or -ENOMEM when it cannot be
 * allocated or locked. */
int keyring_secure_heap_init(void);

/* Build a snapshot from n versions, copying each KEK into the secure heap.
 * Versions are kept ordered by created_usec, then central_id, then id.
 * Returns 0; -EINVAL (more than one primary, duplicate id, duplicate
 * non-empty central_id, empty id, more than KEYRING_MAX_KEYS); -ENOMEM (also
 * when the secure heap is full). */
int keyring_new(const struct key_version *keys, size_t n, struct keyring **ret);
struct keyring *keyring_ref(struct keyring *kr);
/* Accepts NULL; always returns NULL. Wipes KEKs on the last reference. */
struct keyring *keyring_unref(struct keyring *kr);
static inline void keyring_unrefp(struct keyring **kr) {
        keyring_unref(*kr);
}

size_t keyring_size(const struct keyring *kr);
/* i < keyring_size(); in the order described at keyring_new. */
const struct key_version *keyring_get(const struct keyring *kr, size_t i);
/* NULL when no version is primary. */
const struct key_version *keyring_primary(const struct keyring *kr);
/* NULL when no version has that key id. */
const struct key_version *keyring_find(const struct keyring *kr, const char *id);

/* A new snapshot: kr's versions with the primary demoted to retired, plus
 * next (copied) as primary whatever its role says. kr may be NULL (a host's
 * first key). Used by standalone rotation. Returns 0, -EINVAL, -ENOMEM. */
int keyring_add_primary(const struct keyring *kr, const struct key_version *next,
                        struct keyring **ret);

/* key_id = "<identity>.<hex of KEY_CHECK_VALUE_SIZE bytes of
 * HMAC-SHA256(kek, "tpmkms key check value v1")>". identity is the central
 * key's identity (or a random one per local version); never host-local state.
 * Returns 0, -EINVAL (identity empty or with characters outside
 * [A-Za-z0-9._:/%-]: callers percent-encode anything else), -ENOBUFS, -EIO (HMAC failed in libcrypto). */
int key_id_make(const char *identity, const uint8_t kek[KEK_SIZE], char *out, size_t size);

/* The published snapshot, swapped atomically. */
struct keyring_slot {
        pthread_mutex_t lock;
        struct keyring *current;   /* may be NULL: nothing unsealed */
};
void keyring_slot_init(struct keyring_slot *s);
/* Returns a new reference to the current snapshot, or NULL. */
struct keyring *keyring_slot_get(struct keyring_slot *s);
/* Publish kr (takes a new reference; NULL clears) and drop the old one. */
void keyring_slot_publish(struct keyring_slot *s, struct keyring *kr);
void keyring_slot_done(struct keyring_slot *s);
