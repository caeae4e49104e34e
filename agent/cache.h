/* The sealed cache file in the state dir. Format version 1, all integers
 * big-endian:
 *
 *   header   "TPMKMSC\0" magic, u32 format version, then TLV-free fixed
 *            order: the PCR selection, the sealed object's TPM2B_PUBLIC and
 *            TPM2B_PRIVATE blobs (u16 length each), the PCR values and policy
 *            digest sealed to (diagnostics only)
 *   payload  12-byte nonce, u32 length, AES-256-GCM(cache key, keys), tag
 *
 * The header is the payload's additional data, so any altered byte fails.
 * The cache key is the 32-byte secret sealed in the TPM object. The keys
 * serialisation (count, then per version: id, central id, role, created,
 * first seen, KEK) is only ever plaintext in wiped memory. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "keyring.h"
#include "tpm/tpm.h"

#define CACHE_FILE_NAME "kek-cache"
#define CACHE_FORMAT_VERSION 1
#define CACHE_FILE_MAX (1u << 20)   /* refuse larger files */
#define CACHE_KEY_SIZE 32

/* Serialise a whole cache file. *ret is malloc'ed (no secret in it).
 * Returns 0, -ENOMEM, -EIO. */
int cache_encode(const struct tpm_sealed *sealed, const uint8_t cache_key[CACHE_KEY_SIZE],
                 const struct keyring *kr, uint8_t **ret, size_t *ret_len);

/* Parse the header only. Returns 0; -EBADMSG (bad magic, truncated, bad
 * lengths); -EPROTONOSUPPORT (unknown format version). */
int cache_decode_header(const uint8_t *buf, size_t len, struct tpm_sealed *ret);

/* Authenticate and decrypt the payload, and build the keyring. Returns 0;
 * -EBADMSG (tampered, truncated, wrong key, malformed keys); -ENOMEM. */
int cache_decode_keys(const uint8_t *buf, size_t len, const uint8_t cache_key[CACHE_KEY_SIZE],
                      struct keyring **ret);

/* Write dir/CACHE_FILE_NAME atomically: temp file (0600), write, fsync,
 * rename, fsync dir. Returns 0 or a negative errno (the old file stays). */
int cache_write_file(const char *dir, const uint8_t *buf, size_t len);

/* Read dir/CACHE_FILE_NAME. Returns 0; -ENOENT (no cache yet); -EFBIG (over
 * CACHE_FILE_MAX); another negative errno. */
int cache_read_file(const char *dir, uint8_t **ret, size_t *ret_len);
