/* KMS v2 messages (plugin/kms_v2.proto) as plain C structs: the only part of
 * plugin/ that includes protobuf-c. Internal to plugin/.
 *
 * Decoding is two steps so that the service checks sizes before anything is
 * unpacked (STYLE 9): proto_request_scan() walks the wire format without
 * allocating and fills in the lengths; proto_request_unpack() then runs
 * protobuf-c and fills in the pointers. Unpacked memory comes from an arena
 * inside struct proto_request (heap beyond it) and is wiped by
 * proto_request_done(), so request plaintexts never linger. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "service.h"

/* Big enough for a valid Encrypt or Decrypt without annotations: the
 * protobuf-c message struct plus ciphertext, key id and uid copies. */
#define PROTO_ARENA_SIZE 4096
/* Top-level fields in one request; the KMS v2 messages have at most four,
 * the rest leaves room for fields a newer apiserver may add. */
#define PROTO_FIELDS_MAX 256

struct proto_arena {
        size_t used;
        _Alignas(16) uint8_t buf[PROTO_ARENA_SIZE];
};

struct proto_encrypt_request {
        const uint8_t *plaintext;
        size_t plaintext_len;
        const char *uid;                  /* NUL-terminated, UTF-8, no NUL inside */
        size_t uid_len;
};

struct proto_decrypt_request {
        const uint8_t *ciphertext;
        size_t ciphertext_len;
        const char *uid;                  /* NUL-terminated, UTF-8, no NUL inside */
        size_t uid_len;
        const char *key_id;               /* NUL-terminated, UTF-8, no NUL inside */
        size_t key_id_len;
        size_t n_annotations;             /* map entries on the wire */
        size_t annotations_size;          /* keys + values, summed over entries */
};

struct proto_request {
        enum kms_method method;
        union {
                struct proto_encrypt_request encrypt;
                struct proto_decrypt_request decrypt;
        };
        /* private */
        const uint8_t *wire;
        size_t wire_len;
        void *msg;                        /* the protobuf-c message */
        struct proto_arena arena;
};

/* Make req safe for proto_request_done(); cheap (does not clear the arena). */
void proto_request_init(struct proto_request *req);
/* Check that buf[0..len) is well-formed protobuf for method m's request:
 * bounded varints and lengths, no groups, known fields with their declared
 * wire types, strings UTF-8 without NUL, at most PROTO_FIELDS_MAX fields.
 * Fills in the lengths (the last occurrence of a field wins, as protobuf
 * does). buf must outlive req. Allocates nothing.
 * Returns 0, -EBADMSG (malformed), -E2BIG (too many fields). */
int proto_request_scan(struct proto_request *req, enum kms_method m,
                       const uint8_t *buf, size_t len);
/* Unpack a scanned request with protobuf-c and fill in the pointers.
 * Returns 0, -EBADMSG if protobuf-c rejects it, -ENOMEM. */
int proto_request_unpack(struct proto_request *req);
/* Free and wipe everything unpacked. Accepts an initialized request in any
 * state; leaves it initialized. */
void proto_request_done(struct proto_request *req);

/* Responses: each packs into a new malloc'ed buffer of *ret_len bytes, the
 * message after `headroom` bytes the caller fills (the gRPC prefix), so the
 * reply needs no copy. Returns 0 or -ENOMEM. */
int proto_status_response_pack(const char *version, const char *healthz, const char *key_id,
                               size_t headroom, uint8_t **ret, size_t *ret_len);
int proto_encrypt_response_pack(const uint8_t *ct, size_t ct_len, const char *key_id,
                                size_t headroom, uint8_t **ret, size_t *ret_len);
int proto_decrypt_response_pack(const uint8_t *pt, size_t pt_len,
                                size_t headroom, uint8_t **ret, size_t *ret_len);

/* True if s[0..len) is well-formed UTF-8 (RFC 3629: no overlong forms, no
 * surrogates, nothing above U+10FFFF), as proto3 requires of strings. */
bool proto_utf8_valid(const char *s, size_t len);
