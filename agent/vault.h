/* The vault: the sealed cache on disk and the TPM that unlocks it.
 *
 * At start the cache file is read, its cache key unsealed by the TPM under the
 * PCR policy, and the keyring decrypted. Any refusal (measured boot mismatch,
 * a cache from another TPM, a tampered or truncated file) leaves the file
 * untouched for forensics and the daemon serving nothing but the reason.
 * While serving, the vault holds the cache key (secure heap) and the sealed
 * object, so a changed keyring is persisted without the TPM; reseal makes a new
 * cache key sealed to the current PCRs. The TPM is opened only for the
 * operations that need it and closed again. */
#pragma once

#include <stdbool.h>

#include "cache.h"
#include "config.h"
#include "keyring.h"
#include "tpm/tpm.h"

#define VAULT_REASON_MAX 256

struct vault {
        const struct config *config;
        struct tpm_sealed sealed;     /* the sealed object of the current cache key */
        uint8_t *cache_key;           /* CACHE_KEY_SIZE bytes, secure heap; NULL when refused */
        bool refused;
        char reason[VAULT_REASON_MAX];   /* for Status healthz: "sealed cache: ..." */
};

/* Open the cache of c's state dir. Sets *ret_keys to the unsealed keyring.
 * First start (no cache file): makes and seals a cache key and, when
 * make_first_key is set, a first KEK version; writes the cache.
 * Returns 0 serving; 1 refused (v->reason says why, *ret_keys NULL, the file
 * untouched); a negative errno when the TPM or the state dir is unusable
 * (logged). */
int vault_open(struct vault *v, const struct config *c, bool make_first_key,
               struct keyring **ret_keys);
/* Persist kr under the current cache key (atomic). Returns 0 or -errno (logged);
 * -EPERM when refused. */
int vault_store(struct vault *v, const struct keyring *kr);
/* Seal a new cache key to the current PCRs and persist kr under it.
 * On failure the previous cache stays in force. Returns 0 or -errno (logged). */
int vault_reseal(struct vault *v, const struct keyring *kr);
void vault_done(struct vault *v);

/* A new local KEK version (standalone mode): random KEK and identity. The KEK
 * is written to kek, which the caller wipes. Returns 0 or -errno. */
int vault_new_local_version(struct key_version *ret, uint8_t kek[KEK_SIZE]);
