/* tpm/ — TPM 2.0 through tpm2-tss ESAPI: the cache key (derived inside the
 * TPM from a TPM-generated HMAC key under a PCR policy), the legacy sealed
 * cache key it replaces, and an NV rollback counter. The only folder that
 * includes <tss2/...>; TSS2_RC values are translated here into negative
 * errno values:
 *   -ENODEV   no TPM reachable through the TCTI
 *   -EPERM    policy mismatch: the PCRs differ from those sealed to; for
 *             tpm_sealed_check, an object weaker than or other than required
 *   -ENOLCK   TPM in dictionary-attack lockout
 *   -EXDEV    the sealed object does not load: another TPM, or altered blobs
 *   -EINVAL   bad argument (selection string, blob sizes, unknown kind)
 *   -ENOMEM   out of memory
 *   -ENOENT, -EEXIST, -ENOTUNIQ, -EACCES   NV counter (see there)
 *   -EIO      any other TPM failure (logged at debug level with the decoded RC)
 * Nothing is logged unless a log function is set with tpm_set_log() (or, for
 * debugging without one, the environment has TPMKMS_DEBUG set: then stderr).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "macro.h"

#define TPM_PCR_MAX 24
#define TPM_DIGEST_MAX 64        /* sha512 */
#define TPM_BLOB_MAX 1024         /* marshalled TPM2B_PUBLIC / TPM2B_PRIVATE */
#define TPM_SRK_HANDLE 0x81000001u

struct tpm;

/* Route this module's debug messages (decoded TPM response codes, why an SRK
 * was refused, ...) to fn; prio is a syslog priority (LOG_DEBUG). NULL, the
 * default, is silent. Call before using the module; not thread-safe. */
void tpm_set_log(void (*fn)(int prio, const char *msg));

/* A PCR selection in one bank, e.g. "sha256:7" or "sha256:0,2,7".
 * "none" gives an empty selection (mask 0): no PCR policy at all. */
struct tpm_pcr_selection {
        uint16_t hash_alg;  /* TPM2_ALG_SHA1/SHA256/SHA384/SHA512; 0 when empty */
        uint32_t mask;      /* bit n = PCR n */
};

/* The values of the selected PCRs, in ascending PCR order. */
struct tpm_pcr_values {
        struct tpm_pcr_selection sel;
        size_t count;
        size_t digest_size;
        uint8_t digest[TPM_PCR_MAX][TPM_DIGEST_MAX];
};

/* What the object in a struct tpm_sealed is. Stored in the cache beside the
 * blobs, so that a later kind (TPM_SEALED_HMAC_AUTHORIZED: the same HMAC key,
 * but authPolicy = PolicyAuthorize by a signing key, so that signed PCR
 * policies survive firmware updates, as systemd does) is one more value here
 * and one more branch in tpm_cache_key_derive/tpm_sealed_check: the cache
 * format needs no second migration for it. 0 is "unknown" (a zeroed struct):
 * only the legacy tpm_unseal accepts it, as kind 1. */
enum {
        /* A sealed data object holding a cache key chosen by its creator
         * (tpm_seal). Read only, to migrate old caches: anyone who can run
         * TPM2_Create under this SRK can make one with data of his choice. */
        TPM_SEALED_DATA_PCR = 1,
        /* A keyedHash HMAC key the TPM generated (sensitiveDataOrigin); the
         * cache key is TPM2_HMAC(key, label) (tpm_cache_key_create). */
        TPM_SEALED_HMAC_PCR = 2,
};

/* A TPM object as created: public and private areas, marshalled (Tss2_MU)
 * so they survive TPM restarts, plus the PCR values and policy digest it was
 * bound to (for diagnostics and for tpm_sealed_check: they are not secret,
 * and are checked against the object's authPolicy before use). */
struct tpm_sealed {
        uint8_t kind;                    /* TPM_SEALED_* */
        uint8_t public_blob[TPM_BLOB_MAX];
        size_t public_size;
        uint8_t private_blob[TPM_BLOB_MAX];
        size_t private_size;
        struct tpm_pcr_values pcrs;      /* PCR values at seal time */
        uint8_t policy_digest[TPM_DIGEST_MAX];
        size_t policy_digest_size;
};

/* "sha256:7", "sha1:0,7", "none". Banks sha1, sha256, sha384, sha512; PCRs
 * 0..23, decimal, comma-separated, no blanks, no duplicates. Returns 0, or
 * -EINVAL. */
int tpm_pcr_selection_parse(const char *s, struct tpm_pcr_selection *ret);
/* Writes e.g. "sha256:0,2,7" or "none" into buf. Returns 0, -EINVAL (unknown
 * hash_alg, PCR > 23), or -ENOBUFS. */
int tpm_pcr_selection_format(const struct tpm_pcr_selection *sel, char *buf, size_t size);
bool tpm_pcr_selection_is_empty(const struct tpm_pcr_selection *sel);

/* Open the TPM through a TCTI config string ("device:/dev/tpmrm0",
 * "swtpm:host=127.0.0.1,port=2321"), run Startup if needed, and make sure the
 * SRK exists at TPM_SRK_HANDLE (ECC P-256 TCG template, RSA-2048 fallback),
 * creating and persisting it on first use with the owner hierarchy's
 * authorisation owner_auth (NULL or "" = empty; used only then, through an
 * HMAC session). One open TPM per process at a time: a second tpm_open from
 * another thread waits until tpm_close (tpm.c, tpm_lock); from the same
 * thread for the same tcti it is -EDEADLK. Returns 0, -ENODEV, -ENOLCK,
 * -EACCES (the owner authorisation was refused), -EINVAL, -EIO, -EDEADLK. */
int tpm_open(const char *tcti, const char *owner_auth, struct tpm **ret);
/* Accepts NULL. Flushes everything transient this module created. */
void tpm_close(struct tpm *t);
static inline void tpm_closep(struct tpm **t) {
        tpm_close(*t);
}

/* Read the current values of the selected PCRs (an empty selection gives
 * count 0). Returns 0, -EINVAL, -ENODEV or -EIO (e.g. bank not allocated). */
int tpm_pcr_read(struct tpm *t, const struct tpm_pcr_selection *sel, struct tpm_pcr_values *ret);

/* ---- the cache key -------------------------------------------------------
 *
 * Why tpm_sealed_check plus derivation inside the TPM is enough against
 * someone who boots other software with this TPM and a writable state dir:
 * whatever object he plants must (1) be fixedTPM, which only TPM2_Create or
 * CreatePrimary in this TPM can make (TPM2_Import and Duplicate refuse it),
 * and load under our SRK; (2) for kind 2 hold a secret the TPM generated
 * (sensitiveDataOrigin: nobody, its creator included, knows it), usable
 * only through a policy session (userWithAuth clear); (3) have an authPolicy
 * that is PolicyPCR over a selection containing every configured PCR, with
 * values recorded beside it. If those values are the ones of his boot, he
 * can derive the key and encrypt a cache with it, but the legitimate boot
 * cannot satisfy the policy: derivation fails with a mismatch (-EPERM) and
 * nothing is accepted. If they are the legitimate values, the legitimate
 * boot derives a key he never learnt (he could not satisfy the policy in
 * his boot, and the secret never left the TPM), so no cache he wrote
 * decrypts. A weaker policy ("none", other PCRs, another bank) is refused
 * by tpm_sealed_check against the configured selection, which never comes
 * from the file. Kind 1 does not have (2): accept it only to migrate, once.
 */

/* Create under the SRK a keyedHash HMAC-SHA256 key with a TPM-generated
 * secret, fixedTPM|fixedParent|sensitiveDataOrigin|noDA|adminWithPolicy,
 * userWithAuth clear, authPolicy = PolicyPCR over sel's current values
 * (read once and recorded in ret->pcrs), or PolicyCommandCode(TPM2_CC_HMAC)
 * for an empty sel so that a policy session is still needed; then derive
 * the cache key into key as tpm_cache_key_derive does. ret->kind is
 * TPM_SEALED_HMAC_PCR. Returns 0, -EINVAL, -ENODEV, -ENOLCK, -EIO (also when
 * a selected bank is not allocated), -EAGAIN (a selected PCR changed
 * between reading it and deriving: call again). key is wiped on failure. */
int tpm_cache_key_create(struct tpm *t, const struct tpm_pcr_selection *sel, struct tpm_sealed *ret,
                         uint8_t key[AES256_KEY_SIZE]);

/* The cache key of s. Kind 2: load the object, compare the policy digest of
 * the current PCRs with its authPolicy first (mismatch: -EPERM with the
 * current values in current), then TPM2_HMAC of the label "tpmkms cache key
 * v2" through a salted policy session whose response is encrypted, so the
 * key does not cross the bus in clear. Kind 1: exactly tpm_unseal (the
 * secret it unseals is the key). The object is checked as by
 * tpm_sealed_check without a configured selection (call that first, with
 * the configured one); one that fails it is -EXDEV here. current may be
 * NULL; it is zeroed unless filled. Retries TPM2_RC_RETRY, YIELDED, TESTING
 * and PCR_CHANGED a bounded number of times. key is wiped on failure.
 * Returns 0, -EINVAL (sizes, selection, kind), -EPERM, -EXDEV, -ENOLCK,
 * -ENODEV, -EIO. */
int tpm_cache_key_derive(struct tpm *t, const struct tpm_sealed *s, uint8_t key[AES256_KEY_SIZE],
                         struct tpm_pcr_values *current);

/* Whether s may be used at all with the configured PCR policy; pure, no
 * TPM. Unmarshals the blobs; requires for kind 2 a keyedHash HMAC-SHA256 key that
 * is sensitiveDataOrigin|fixedTPM|fixedParent with userWithAuth clear, for
 * kind 1 a sealed data object (no scheme, sign/decrypt/restricted clear)
 * that is fixedTPM|fixedParent|noDA with userWithAuth clear; that the
 * PolicyPCR digest (PolicyCommandCode for an empty selection) of the
 * recorded selection and values, computed with the object's nameAlg,
 * equals the object's authPolicy and s->policy_digest; and that the
 * recorded selection is at least as strong as configured: same bank and
 * every configured PCR included (an empty configured selection accepts
 * any valid object). A pass for kind 1 proves less (see the kinds above).
 * why (may be NULL with why_size 0) gets a one-line reason on -EPERM, e.g.
 * "sealed to none, configured sha256:7", and "" otherwise.
 * Returns 0, -EPERM, -EXDEV (blobs that do not unmarshal), -EINVAL (NULL,
 * sizes out of range, bad selection, unknown kind). */
int tpm_sealed_check(const struct tpm_sealed *s, const struct tpm_pcr_selection *configured, char *why,
                     size_t why_size);

/* ---- legacy (kind 1) ------------------------------------------------------
 * tpm_unseal is how tpm_cache_key_derive reads a format-1 cache (to migrate
 * it, once); tpm_seal makes such objects, for the tests of that path only. */

/* Seal secret under PolicyPCR over sel's current values, read once and
 * reported in ret->pcrs. When sel is empty there is no PCR policy: the
 * object's policy is then PolicyCommandCode(TPM2_CC_Unseal), so that
 * userWithAuth stays clear either way and Unseal always needs a policy
 * session. The object is fixedTPM|fixedParent|noDA. The session is salted
 * to the SRK and uses AES-128-CFB parameter encryption. Returns 0, -EINVAL,
 * -ENODEV, -ENOLCK, -EIO (also when a selected bank is not allocated). */
int tpm_seal(struct tpm *t, const struct tpm_pcr_selection *sel,
             const uint8_t secret[AES256_KEY_SIZE], struct tpm_sealed *ret);
/* ret->kind is TPM_SEALED_DATA_PCR. New caches use tpm_cache_key_create. */

/* Load and unseal. Compares the policy digest of the current PCRs with the
 * sealed object's authPolicy first, so a mismatch is reported as -EPERM with
 * the current values in current (may be NULL; zeroed unless filled). Retries
 * TPM2_RC_RETRY, YIELDED, TESTING and PCR_CHANGED a bounded number of times.
 * The output is wiped on failure. Blobs that do not unmarshal or that the TPM
 * refuses to Load give -EXDEV; sizes out of range or a bad selection -EINVAL.
 * sealed->kind must be 0 (a struct from before kinds) or TPM_SEALED_DATA_PCR
 * (-EINVAL otherwise).
 * Returns 0, -EINVAL, -EPERM, -EXDEV, -ENOLCK, -ENODEV, -EIO. */
int tpm_unseal(struct tpm *t, const struct tpm_sealed *sealed,
               uint8_t secret[AES256_KEY_SIZE], struct tpm_pcr_values *current);

/* The PCR values for logs: "sha256:7=ab12..,8=cd34..", or "none" for an
 * empty selection. Returns 0, -EINVAL (inconsistent v) or -ENOBUFS; buf holds
 * "" on failure. */
int tpm_pcr_values_format(const struct tpm_pcr_values *v, char *buf, size_t size);

/* ---- rollback counter (TPM NV index, TPM_NT_COUNTER) ----------------------
 *
 * A monotonic counter the agent advances whenever the key set changes and
 * records in the cache, so an old copy of the state dir is refused. It cannot
 * be rolled back: a counter index defined after an undefine starts at no less
 * than the highest value any counter on this TPM ever had (TPM 2.0 Part 1,
 * "NV Counters"; Part 3, TPM2_NV_Increment), so undefine+define never gives
 * an old value again. Its authValue is empty (AUTHREAD|AUTHWRITE): anyone
 * can increment it, which only makes the agent refuse its cache (denial of
 * service, which root can do anyway), never accept an old one. An index at
 * our handle with any other attributes (an ordinary index someone can write
 * at will) has another Name, checked on every read and increment.
 */

/* In the owner range of NV indices (TCG Registry of Reserved TPM 2.0 Handles
 * and Localities, 0x01800000-0x01BFFFFF); away from its first handles,
 * where tools default to. */
#define TPM_COUNTER_INDEX_DEFAULT 0x01A71C00u

/* The counter's value in ret. Returns 0, -EINVAL (index outside the NV
 * range), -ENOENT (not defined; or defined by us but never incremented, an
 * interrupted tpm_counter_define: call that again), -ENOTUNIQ (defined, but
 * its Name is not the one of our template: somebody else's index), -ENODEV,
 * -ENOLCK, -EIO. */
int tpm_counter_read(struct tpm *t, uint32_t index, uint64_t *ret);

/* Define the counter at index with a fixed template (nameAlg sha256,
 * AUTHREAD|AUTHWRITE with an empty authValue, NO_DA, TPM_NT_COUNTER) under
 * the owner hierarchy, authorized with owner_auth (NULL or "" = empty)
 * through a salted session, and increment it once so that it is readable;
 * its value in ret (may be NULL). Completes an index of our template that
 * was defined but never incremented. Returns 0, -EINVAL, -EACCES (wrong
 * owner auth), -EEXIST (already defined and written: read it instead),
 * -ENOTUNIQ (defined by somebody else), -ENOSPC (no NV space left),
 * -ENODEV, -ENOLCK, -EIO. */
int tpm_counter_define(struct tpm *t, uint32_t index, const char *owner_auth, uint64_t *ret);

/* Increment the counter by one; the new value in ret (may be NULL).
 * Returns 0, -EINVAL, -ENOENT, -ENOTUNIQ, -ENODEV, -ENOLCK, -EIO. */
int tpm_counter_increment(struct tpm *t, uint32_t index, uint64_t *ret);

/* ---- the client key: this host's identity at the central KMS --------------
 *
 * A signing key the TPM generates under the SRK: fixedTPM|fixedParent|
 * sensitiveDataOrigin (the private key never exists outside this TPM),
 * userWithAuth with a random 32-byte authValue that the agent keeps only
 * inside the sealed cache (agent/keystore/cache.h, the identity section),
 * noDA, scheme NULL. Using it needs the blobs (the key file, not secret:
 * useless on any other TPM) and the authValue (readable only where the
 * cache key derives: this TPM, the measured state). Every use goes through
 * a salted HMAC session, so the authValue never crosses the bus. */

enum {
        TPM_KEY_ECC_P256 = 1,   /* ECDSA P-256: the default */
        TPM_KEY_RSA_2048 = 2,   /* for central KMSes that want RSA */
};
#define TPM_KEY_AUTH_SIZE 32

struct tpm_key {
        uint32_t parent;                  /* TPM_SRK_HANDLE */
        uint8_t public_blob[TPM_BLOB_MAX];   /* marshalled TPM2B_PUBLIC */
        size_t public_size;
        uint8_t private_blob[TPM_BLOB_MAX];  /* marshalled TPM2B_PRIVATE (wrapped by the SRK) */
        size_t private_size;
};

/* The public half, from the public blob. */
struct tpm_key_public {
        int type;                         /* TPM_KEY_* */
        uint8_t x[32], y[32];             /* ECC P-256 point, big-endian */
        uint8_t n[256];                   /* RSA modulus, big-endian */
        size_t n_size;
        uint32_t exponent;
};

/* Create a client key of type with auth as its authValue (sent encrypted).
 * Returns 0, -EINVAL, -ENODEV, -ENOLCK, -EIO. */
int tpm_key_create(struct tpm *t, int type, const uint8_t auth[TPM_KEY_AUTH_SIZE], struct tpm_key *ret);

/* Whether k is a key tpm_key_create makes (parent, attributes, type,
 * scheme); pure, no TPM. ret (may be NULL) gets the public half. Returns 0
 * or -EINVAL. */
int tpm_key_check(const struct tpm_key *k, struct tpm_key_public *ret);

/* ECDSA signature (r, s, each 32 bytes big-endian) of a SHA-256, -384 or
 * -512 digest (the size says which). Loads k, signs through a salted HMAC
 * session keyed with auth, flushes. Returns 0, -EINVAL, -EXDEV (k does not
 * load: another TPM's key, or the TPM was cleared), -EACCES (auth is not
 * k's authValue), -ENODEV, -ENOLCK, -EIO. */
int tpm_key_sign_ecdsa(struct tpm *t, const struct tpm_key *k, const uint8_t auth[TPM_KEY_AUTH_SIZE],
                       const uint8_t *digest, size_t digest_size, uint8_t sig_r[32], uint8_t sig_s[32]);

/* RSA-2048: the raw private operation (RSADP) on a 256-byte block the
 * caller padded (PSS or PKCS#1 v1.5 signature padding). Returns as
 * tpm_key_sign_ecdsa. */
int tpm_key_rsa_private(struct tpm *t, const struct tpm_key *k, const uint8_t auth[TPM_KEY_AUTH_SIZE],
                        const uint8_t *in, size_t in_size, uint8_t out[256]);

/* tpm/key.c: the key file and the key as OpenSSL sees it. */

/* The "TSS2 PRIVATE KEY" PEM that tpm2-openssl and the TPM2 engines read
 * (TCG/IETF draft-bottomley-tpm2-keys: OID 2.23.133.10.1.3, emptyAuth
 * absent, parent, TPM2B_PUBLIC, TPM2B_PRIVATE). *ret is malloc'ed and
 * NUL-terminated. Returns 0, -EINVAL, -ENOMEM. */
int tpm_key_pem_write(const struct tpm_key *k, char **ret, size_t *ret_len);
/* Parse such a PEM (the first PEM block in buf). Returns 0; -ENOMSG (buf
 * is some other PEM, e.g. a plain private key); -EINVAL (a TSS2 key that
 * is malformed or not one tpm_key_create makes). */
int tpm_key_pem_read(const void *buf, size_t len, struct tpm_key *ret);

typedef struct evp_pkey_st EVP_PKEY;
/* An OpenSSL key whose private operations run in the TPM at tcti: each
 * signature opens the TPM (tpm_open, so it waits for any other user in this
 * process), loads k, signs, flushes and closes; nothing stays open between
 * handshakes. tcti, k and auth are copied (auth into the secure heap, wiped
 * when the key is freed). Failures in a signature are queued as OpenSSL
 * errors whose data names the cause (e.g. "the TPM refused the client key's
 * authorization value"). Returns 0, -EINVAL, -ENOMEM. */
int tpm_key_evp_pkey(const char *tcti, const struct tpm_key *k, const uint8_t auth[TPM_KEY_AUTH_SIZE],
                     EVP_PKEY **ret);
