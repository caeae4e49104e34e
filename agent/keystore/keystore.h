/* keystore/ — the sealed state: keyring snapshots, the Encrypt envelope, the
 * cache file and the vault that seals it to the TPM. This is its one public
 * header; cache.h is internal (the file format, for the vault and its tests).
 * Functions return >= 0 on success and a negative errno value on failure. */
#pragma once

#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tpm.h"

struct cache_header;

/* ==== keyring ============================================================
 *
 * The keyring: an immutable, reference-counted snapshot of KEK versions with
 * their roles. KEKs live in OpenSSL's secure heap (mlock'ed, MADV_DONTDUMP)
 * and are wiped when the last reference goes. Snapshots are published with an
 * atomic swap (struct keyring_slot); readers keep the snapshot they took. */
#define KEY_ID_MAX 256
#define KEY_CHECK_VALUE_SIZE 8     /* bytes of HMAC-SHA256(KEK, label) */
#define KEYRING_MAX_KEYS 512       /* versions per snapshot: bounds secure-heap use */

enum key_role {
        KEY_ROLE_STAGED,   /* may decrypt, not encrypt yet (central Pre-Active) */
        KEY_ROLE_PRIMARY,  /* encrypts; at most one per keyring */
        KEY_ROLE_RETIRED,  /* decrypt only */
        KEY_ROLE_MISSING,  /* decrypt only: Destroyed or no longer found at the central KMS,
                            * kept until [central] purge_after (docs/key-lifecycle.md) */
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
        uint64_t missing_since_usec;  /* CLOCK_REALTIME: when it went missing; 0 unless
                                       * role is KEY_ROLE_MISSING */
        uint8_t *kek;                 /* AES256_KEY_SIZE bytes; inside a keyring: secure heap */
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
int key_id_make(const char *identity, const uint8_t kek[AES256_KEY_SIZE], char *out, size_t size);

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

/* ==== envelope ===========================================================
 *
 * The ciphertext tpmkms returns from Encrypt (format version 1):
 *
 *   byte 0      format version (1)
 *   bytes 1-12  random 96-bit GCM nonce
 *   bytes 13..  AES-256-GCM ciphertext of the plaintext
 *   last 16     GCM tag
 *
 * Additional authenticated data: "tpmkms-envelope" || version byte ||
 * the key id, so a ciphertext cannot be replayed under another key id or
 * format. Overhead: 29 bytes. */
#define ENVELOPE_VERSION 1
#define ENVELOPE_NONCE_SIZE 12
#define ENVELOPE_TAG_SIZE 16
#define ENVELOPE_OVERHEAD (1 + ENVELOPE_NONCE_SIZE + ENVELOPE_TAG_SIZE)

/* Encrypt pt under kek for key_id into out. Returns the ciphertext length
 * (pt_len + ENVELOPE_OVERHEAD), -ENOBUFS if out_size is too small, -EINVAL
 * for empty input, -EIO on a crypto library failure. */
int envelope_seal(const uint8_t kek[AES256_KEY_SIZE], const char *key_id,
                  const uint8_t *pt, size_t pt_len, uint8_t *out, size_t out_size);

/* Decrypt and authenticate. Returns the plaintext length; -EBADMSG when the
 * ciphertext is truncated, of an unknown format version, or fails
 * authentication (wrong key, wrong key id, altered byte); -ENOBUFS; -EIO.
 * out is wiped on failure. */
int envelope_open(const uint8_t kek[AES256_KEY_SIZE], const char *key_id,
                  const uint8_t *ct, size_t ct_len, uint8_t *out, size_t out_size);

/* ==== vault ==============================================================
 *
 * The sealed cache on disk and the TPM that unlocks it (docs/threat-model.md,
 * docs/file-formats.md).
 *
 * At start the cache file is read; its sealed object is checked against the
 * configured PCR policy (never trusted from the file: tpm_sealed_check), the
 * cache key derived by the TPM from it, the keyring decrypted, and the
 * file's rollback counter value compared with the TPM's NV counter. Any
 * refusal (a weaker policy than configured, measured boot mismatch, a cache
 * from another TPM, a tampered or truncated file, an older copy put back)
 * leaves the file untouched for forensics and the daemon serving nothing but
 * the reason. A transient TPM failure is an error, never a refusal: the
 * daemon exits and systemd restarts it.
 *
 * Every cache write advances the NV counter, in this order: write the file
 * with counter + 1, then increment. A crash in between leaves a file one
 * ahead of the TPM, which the next start accepts and completes; a file behind
 * the TPM is an older copy and is refused unless accept_restore is set (the
 * operator's explicit step: tpmkmsctl accept-restore). The cache is written
 * only when the key set or the seal changes, never per request. */

/* The client key's secret (agent/identity.h): kept only inside the sealed
 * cache, so only this TPM in the measured state reads it. */
struct vault_identity {
        uint8_t key_digest[32];            /* SHA-256 of the key's TPM2B_PUBLIC blob: which key */
        uint8_t auth[TPM_KEY_AUTH_SIZE];   /* its authValue */
};

struct vault_options {
        char state_dir[PATH_MAX];
        char tcti[256];                  /* tpm2-tss TCTI configuration string */
        struct tpm_pcr_selection pcrs;   /* the PCR policy the cache must be sealed to */
        uint32_t counter_index;          /* TPM NV index of the rollback counter */
        char owner_auth_file[PATH_MAX];  /* owner hierarchy auth to define it; "": empty auth */
        bool accept_restore;             /* accept a cache older than the counter (once) */
        bool allow_new_cache;            /* standalone: make a new cache although one existed */
        bool migrate;                    /* read a format-1 cache and re-seal it (tpmkmsctl migrate) */
};

#define VAULT_REASON_MAX 320
/* The cache file in the state dir (its mtime is the last write: metrics,
 * tpmkmsctl doctor). */
#define CACHE_FILE_NAME "kek-cache"

struct vault {
        struct vault_options options;
        struct cache_header *header;  /* the cache in force: sealed object, counter value */
        uint8_t *cache_key;           /* AES256_KEY_SIZE bytes, secure heap; NULL when refused */
        struct vault_identity *identity; /* secure heap; NULL: no client key enrolled */
        bool refused;
        bool created;                 /* vault_open made a new cache (first start) */
        bool locked;                  /* lock_fd holds the state dir's flock */
        int lock_fd;
        char reason[VAULT_REASON_MAX];   /* for Status healthz: "sealed cache: ..." */
        char error[256];              /* what the last failed vault_* call said (logged too) */
        _Atomic uint64_t tpm_since_usec; /* CLOCK_MONOTONIC: the TPM is in use since; 0 idle */
        const char *refusal_cause;    /* with refused, one word for metrics: rollback, format,
                                         state_dir, vanished,
                                         tampered, policy, measured_boot, wrong_tpm */
};

/* Open the cache of opt's state dir. Sets *ret_keys to the unsealed keyring.
 * First start (no cache file): makes a cache key in the TPM and, when
 * make_first_key is set, a first KEK version; writes the cache. A cache of
 * format 1 is refused unless opt->migrate (the operator's explicit step after
 * the upgrade, tpmkmsctl migrate): its sealed data object may hold a secret
 * whoever wrote the file chose, so it is never taken on its own.
 * Returns 0 with v->refused telling serving from refused (v->reason says
 * why, *ret_keys NULL, the file untouched); a negative errno when the TPM or
 * the state dir is unusable (logged). */
int vault_open(struct vault *v, const struct vault_options *opt, bool make_first_key,
               struct keyring **ret_keys);
/* Persist kr under the current cache key (atomic) and advance the counter.
 * Returns 0 or -errno (logged); -EPERM when refused. */
int vault_store(struct vault *v, const struct keyring *kr);
/* Make a new cache key in the TPM bound to the current values of sel (NULL:
 * the configured selection) and persist kr under it. On failure the previous
 * cache stays in force. Returns 0 or -errno (logged). */
int vault_reseal(struct vault *v, const struct keyring *kr, const struct tpm_pcr_selection *sel);
/* How long the vault has been waiting on the TPM (0: not using it). Safe
 * from any thread: tpmkmsctl status reads it while a job may be stuck. */
uint64_t vault_tpm_busy(const struct vault *v);
/* Persist kr with identity (NULL: none) as the cache's identity section,
 * replacing any before it; it survives every later store and reseal.
 * Returns 0 or -errno (logged); -EPERM when refused. */
int vault_set_identity(struct vault *v, const struct keyring *kr, const struct vault_identity *identity);

/* The PCR selection the cache in force is sealed to (NULL when refused
 * before a header was read). */
const struct tpm_pcr_selection *vault_sealed_pcrs(const struct vault *v);
void vault_done(struct vault *v);

/* The PCR values the cache in state_dir is sealed to, from its header,
 * without the TPM or the keys (diagnostics: tpmkmsctl doctor compares them
 * with the TPM's). The header is not authenticated here: the values show
 * what a start will be checked against, they prove nothing. Returns 0, or
 * as cache_read_file (-ENOENT: no cache), -EBADMSG, -EPROTONOSUPPORT. */
int vault_sealed_values(const char *state_dir, struct tpm_pcr_values *ret);

/* A new local KEK version (standalone mode): random KEK and identity. The KEK
 * is written to kek, which the caller wipes. Returns 0 or -errno. */
int vault_new_local_version(struct key_version *ret, uint8_t kek[AES256_KEY_SIZE]);
