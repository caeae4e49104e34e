/* The ciphertext tpmkms returns from Encrypt (format version 1):
 *
 *   byte 0      format version (1)
 *   bytes 1-12  random 96-bit GCM nonce
 *   bytes 13..  AES-256-GCM ciphertext of the plaintext
 *   last 16     GCM tag
 *
 * Additional authenticated data: "tpmkms-envelope" || version byte ||
 * the key id, so a ciphertext cannot be replayed under another key id or
 * format. Overhead: 29 bytes. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#define ENVELOPE_VERSION 1
#define ENVELOPE_NONCE_SIZE 12
#define ENVELOPE_TAG_SIZE 16
#define ENVELOPE_OVERHEAD (1 + ENVELOPE_NONCE_SIZE + ENVELOPE_TAG_SIZE)

/* Encrypt pt under kek for key_id into out. Returns the ciphertext length
 * (pt_len + ENVELOPE_OVERHEAD), -ENOBUFS if out_size is too small, -EINVAL
 * for empty input, -EIO on a crypto library failure. */
int envelope_seal(const uint8_t kek[32], const char *key_id,
                  const uint8_t *pt, size_t pt_len, uint8_t *out, size_t out_size);

/* Decrypt and authenticate. Returns the plaintext length; -EBADMSG when the
 * ciphertext is truncated, of an unknown format version, or fails
 * authentication (wrong key, wrong key id, altered byte); -ENOBUFS; -EIO.
 * out is wiped on failure. */
int envelope_open(const uint8_t kek[32], const char *key_id,
                  const uint8_t *ct, size_t ct_len, uint8_t *out, size_t out_size);
