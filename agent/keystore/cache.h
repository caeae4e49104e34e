/* The sealed cache file in the state dir (dir/CACHE_FILE_NAME). Format
 * version 2 (version 1 is read, for migration: it has neither the kind nor
 * the counter), all integers big-endian, no padding, nothing after the tag:
 *
 *   size      field
 *   -- header (all of it is the GCM additional data) -----------------------
 *   8         magic "TPMKMSC\0"
 *   4         u32 format version (1 or 2); another value: -EPROTONOSUPPORT
 *   1         u8 sealed-object kind: TPM_SEALED_HMAC_PCR (absent in 1, which is
 *             always TPM_SEALED_DATA_PCR); any other value: -EBADMSG
 *   2         u16 PCR bank hash algorithm (TPM2_ALG_*; 0 with "none")
 *   4         u32 PCR mask (bit n = PCR n; PCRs 0..23 only)
 *   2         u16 P = TPM2B_PUBLIC size, 1..TPM_BLOB_MAX
 *   P         sealed object's marshalled TPM2B_PUBLIC
 *   2         u16 Q = TPM2B_PRIVATE size, 1..TPM_BLOB_MAX
 *   Q         sealed object's marshalled TPM2B_PRIVATE
 *   1         u8 C = number of PCR values, 0..TPM_PCR_MAX
 *   1         u8 D = PCR digest size, 0..TPM_DIGEST_MAX
 *   C*D       PCR values sealed to, ascending PCR order (diagnostics)
 *   1         u8 E = policy digest size, 0..TPM_DIGEST_MAX
 *   E         policy digest sealed to (checked against the object: tpm_sealed_check)
 *   8         u64 rollback counter value the file was written with (absent in 1)
 *   -- payload -----------------------------------------------------------
 *   12        random GCM nonce (new for every write)
 *   4         u32 L = ciphertext length, >= 4, file total <= CACHE_FILE_MAX
 *   L         AES-256-GCM(cache key, keys) ciphertext
 *   16        GCM tag
 *
 * keys (the plaintext, L bytes; only ever in wiped memory):
 *   4         u32 N = number of versions, 0..KEYRING_MAX_KEYS
 *   N times (format 2):
 *     1       u8 role (enum key_role)
 *     8       u64 created_usec
 *     8       u64 first_seen_usec
 *     8       u64 missing_since_usec (non-zero exactly when role is missing)
 *     2+I     u16 I (1..KEY_ID_MAX-1), key id, no NUL
 *     2+J     u16 J (0..KEY_ID_MAX-1), central id, no NUL
 *     32      KEK
 *   then, optionally (an enrolled client key, agent/identity.h; files
 *   written before it have none and stay readable as they are):
 *     1       u8 section tag CACHE_SECTION_IDENTITY (1)
 *     32      SHA-256 of the client key's marshalled TPM2B_PUBLIC
 *     32      the client key's authValue (tpm.h, "the client key")
 *   then nothing: the payload must end exactly at L.
 *   A format-1 file (the same header with version 1) has records without
 *   missing_since_usec and no missing role; it is read, and the next write
 *   makes it format 2.
 *
 * The header is the payload's additional data, so any altered byte fails
 * authentication (the nonce and L are covered by GCM itself). The cache key
 * is derived by the TPM from the sealed object (tpm_cache_key_derive). The header is parsed
 * before it is authenticated (its blobs go to the TPM, which checks the
 * private blob's integrity itself), so cache_decode_header is strictly
 * bounded but proves nothing; cache_decode_keys does. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "keystore.h"
#include "tpm.h"

#define CACHE_FORMAT_VERSION 2
#define CACHE_FORMAT_OLDEST 1       /* read, to migrate */
#define CACHE_FILE_MAX (1u << 20)   /* refuse larger files */

struct cache_header {
        uint32_t version;            /* of the file read; cache_encode always writes
                                      * CACHE_FORMAT_VERSION */
        struct tpm_sealed sealed;    /* kind TPM_SEALED_DATA_PCR in version 1 */
        uint64_t counter;            /* rollback counter value; 0 in version 1 */
};

#define CACHE_SECTION_IDENTITY 1

/* Serialise a whole cache file; identity (may be NULL: none) goes after
 * the records. */
int cache_encode_identity(const struct cache_header *h, const uint8_t cache_key[AES256_KEY_SIZE],
                          const struct keyring *kr, const struct vault_identity *identity,
                          uint8_t **ret, size_t *ret_len);
/* Authenticate and decrypt as cache_decode_keys; *ret_identity (in the
 * secure heap, free with OPENSSL_secure_clear_free) is the identity
 * section, or NULL when the file has none. */
int cache_decode_identity(const uint8_t *buf, size_t len, const uint8_t cache_key[AES256_KEY_SIZE],
                          struct keyring **ret, struct vault_identity **ret_identity);

/* Serialise a whole cache file without an identity. *ret is malloc'ed (no secret in it).
 * Returns 0, -EINVAL (sealed kind 0 or sizes out of range), -EFBIG (over
 * CACHE_FILE_MAX), -ENOMEM, -EIO. */
int cache_encode(const struct cache_header *h, const uint8_t cache_key[AES256_KEY_SIZE],
                 const struct keyring *kr, uint8_t **ret, size_t *ret_len);

/* Parse the header only (the framing of the payload is checked too, so a
 * truncated file fails here before the TPM is touched). Returns 0; -EBADMSG
 * (bad magic, truncated, bad lengths, trailing bytes); -EPROTONOSUPPORT
 * (unknown format version). */
int cache_decode_header(const uint8_t *buf, size_t len, struct cache_header *ret);

/* Authenticate and decrypt the payload, and build the keyring (an identity
 * section is checked, then ignored). Returns 0;
 * -EBADMSG (tampered, truncated, wrong key, malformed keys);
 * -EPROTONOSUPPORT (unknown format version); -ENOMEM. */
int cache_decode_keys(const uint8_t *buf, size_t len, const uint8_t cache_key[AES256_KEY_SIZE],
                      struct keyring **ret);

/* Write dir/CACHE_FILE_NAME atomically: temp file (O_EXCL, exactly 0600),
 * write, fsync, rename, fsync dir. Returns 0; -EFBIG (over CACHE_FILE_MAX);
 * another negative errno. A failure before the rename leaves the old file and
 * no temp file; only a failing fsync of the directory comes after it. */
int cache_write_file(const char *dir, const uint8_t *buf, size_t len);

/* Remove the temp files a write killed before its rename left in dir
 * (".kek-cache.XXXXXXXX"): they hold the whole key set under an old seal, so
 * they are overwritten with zeros first. *ret_n counts them. Returns 0 or a
 * negative errno (the first failure; the others are still tried). */
int cache_remove_stray(const char *dir, unsigned *ret_n);

/* Read dir/CACHE_FILE_NAME. Returns 0; -ENOENT (no cache yet); -EFBIG (over
 * CACHE_FILE_MAX); -ELOOP (a symlink, not followed); -EINVAL (not a regular
 * file: a directory, a FIFO, a device; never opened blocking); another
 * negative errno. */
int cache_read_file(const char *dir, uint8_t **ret, size_t *ret_len);
