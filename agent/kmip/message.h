/* KMIP 1.2 messages (OASIS KMIP Specification v1.2, section 9.1 TTLV encoding;
 * KMIP Profiles for the operations used) for the four requests tpmkms makes:
 * DiscoverVersions, Locate, Get and GetAttributes, one per message or several
 * in one batch (section 6.14, 6.15, 7.1). Builds request messages and
 * parses response messages as bytes: it knows nothing of sockets or keyrings.
 * The TTLV codec underneath (ttlv.h) is bounded: every length is
 * checked, nesting is limited, and nothing is read past the buffer.
 *
 * Failure returns: -EBADMSG malformed or unexpected response; -EREMOTEIO the
 * server answered with a failed Result Status (details in struct kmip_error);
 * -ENOBUFS; -ENOMEM; -EINVAL bad argument. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kmip.h"
#include "ttlv.h"

#define KMIP_HEADER_SIZE 8          /* tag(3) type(1) length(4) of the outer structure */
#define KMIP_MESSAGE_MAX (1u << 20) /* refuse longer responses */
#define KMIP_ID_MAX CENTRAL_ID_MAX          /* Unique Identifier (text) */
#define KMIP_LOCATE_MAX CENTRAL_KEYS_MAX    /* Maximum Items we ask for and accept */
#define KMIP_GROUP_MAX CENTRAL_GROUP_MAX    /* Object Group (text) we send in a Locate */
#define KMIP_VERSIONS_MAX 3         /* versions we offer in DiscoverVersions: 1.2, 1.1, 1.0 */
#define KMIP_BATCH_MAX (CENTRAL_KEYS_MAX + 1)   /* items in one request: a Locate and a
                                                 * GetAttributes of every version */

/* KMIP 1.2 section 9.1.3.2.27 Operation (those tpmkms sends) */
enum kmip_operation {
        KMIP_OP_LOCATE = 0x08,
        KMIP_OP_GET = 0x0A,
        KMIP_OP_GET_ATTRIBUTES = 0x0B,
        KMIP_OP_DISCOVER_VERSIONS = 0x1E,
};

/* KMIP 1.2 section 9.1.3.2.17 State */
enum kmip_state {
        KMIP_STATE_PRE_ACTIVE = 1,
        KMIP_STATE_ACTIVE = 2,
        KMIP_STATE_DEACTIVATED = 3,
        KMIP_STATE_COMPROMISED = 4,
        KMIP_STATE_DESTROYED = 5,
        KMIP_STATE_DESTROYED_COMPROMISED = 6,
};
const char *kmip_state_to_string(int state);

struct kmip_version {
        int32_t major, minor;
};

/* KMIP 1.2 section 9.1.3.2.28 Result Status */
enum kmip_result_status {
        KMIP_STATUS_SUCCESS = 0,
        KMIP_STATUS_OPERATION_FAILED = 1,
        KMIP_STATUS_OPERATION_PENDING = 2,
        KMIP_STATUS_OPERATION_UNDONE = 3,
};

/* KMIP 1.2 section 9.1.3.2.29 Result Reason (the ones sync tells apart) */
enum kmip_result_reason {
        KMIP_REASON_ITEM_NOT_FOUND = 0x01,
        KMIP_REASON_AUTHENTICATION_NOT_SUCCESSFUL = 0x03,
        KMIP_REASON_INVALID_MESSAGE = 0x04,
        KMIP_REASON_OPERATION_NOT_SUPPORTED = 0x05,
        KMIP_REASON_FEATURE_NOT_SUPPORTED = 0x08,
        KMIP_REASON_PERMISSION_DENIED = 0x0C,
        KMIP_REASON_KEY_FORMAT_TYPE_NOT_SUPPORTED = 0x10,
        KMIP_REASON_GENERAL_FAILURE = 0x100,
};

/* What a failed operation said (KMIP 1.2 section 6.9-6.11). */
struct kmip_error {
        int32_t result_status;      /* 1 failed, 2 pending, 3 undone */
        int32_t result_reason;      /* e.g. 1 item not found, 12 permission denied; 0 if absent */
        char message[256];          /* Result Message, printable ASCII only: other bytes
                                     * become '?', and a longer one is cut (diagnostic) */
};
/* "Item Not Found" etc. for a Result Reason; "reason N" for unknown ones. */
const char *kmip_result_reason_to_string(int32_t reason);

/* The attributes tpmkms reads from a key (GetAttributes). */
struct kmip_key_attributes {
        char uid[KMIP_ID_MAX];
        int32_t object_type;        /* 2 = Symmetric Key */
        int32_t state;              /* enum kmip_state */
        int64_t initial_date;       /* seconds since the epoch (Date-Time) */
        int32_t algorithm;          /* 3 = AES */
        int32_t length;             /* bits */
        char name[256];             /* first Name, "" if none */
};

/* Total length of a message whose first KMIP_HEADER_SIZE bytes are hdr
 * (header + value). Returns it, or -EBADMSG (not a structure, a tag outside
 * 0x42xxxx, i.e. a peer not speaking KMIP, a length that is not a multiple of
 * 8, or longer than KMIP_MESSAGE_MAX in total). */
int kmip_message_length(const uint8_t hdr[KMIP_HEADER_SIZE]);

/* Request builders: a complete Request Message with one batch item, protocol
 * version `version` (1.2 by default: pass NULL; only 1.x, whose message layout
 * this module speaks: -EINVAL otherwise). *ret is malloc'ed. Return 0 or a
 * negative errno (-EINVAL: NULL, empty or over-long uid or group, unknown
 * state; -ENOMEM). */
/* Sent as a 1.2 message offering 1.2, 1.1 and 1.0 (KMIP 1.2 section 4.26):
 * the server answers with the ones it supports, in its order of preference. */
int kmip_request_discover_versions(uint8_t **ret, size_t *ret_len);
/* Locate objects of the Object Group `group` of Object Type Symmetric Key;
 * state 0 = any state, else that State only. */
int kmip_request_locate(const struct kmip_version *version, const char *group, int32_t state,
                        uint8_t **ret, size_t *ret_len);
int kmip_request_get(const struct kmip_version *version, const char *uid,
                     uint8_t **ret, size_t *ret_len);
int kmip_request_get_attributes(const struct kmip_version *version, const char *uid,
                                uint8_t **ret, size_t *ret_len);

/* One operation of a batch: Locate of the Object Group arg (Object Type
 * Symmetric Key; state 0 = any State, else that State only), Get (Raw) or
 * GetAttributes (the attributes of struct kmip_key_attributes) of the Unique
 * Identifier arg, or DiscoverVersions (arg unused). */
struct kmip_batch_op {
        int32_t operation;          /* enum kmip_operation */
        const char *arg;
        int32_t state;
};

/* A Request Message with the n (1..KMIP_BATCH_MAX) operations ops. With more
 * than one, each Batch Item carries a Unique Batch Item ID (its index) and
 * the header asks the server to Continue after a failed item (KMIP 1.2
 * section 6.13); a batch of one is exactly the one-item request below.
 * Returns 0 with *ret malloc'ed, or -EINVAL (see below), -ENOBUFS, -ENOMEM. */
int kmip_request_batch(const struct kmip_version *version, const struct kmip_batch_op *ops, size_t n,
                       uint8_t **ret, size_t *ret_len);

/* What the server answered to one batch item. payload describes bytes of
 * the response buffer: valid while it lives. */
struct kmip_batch_result {
        bool answered;              /* false: the server stopped before it */
        int32_t operation;          /* the operation sent (when answered) */
        struct kmip_error error;    /* result_status 0: success */
        struct ttlv_item payload;   /* of a successful item */
};

/* Parse the response to the n operations ops into res[0..n-1], each item
 * matched by its Unique Batch Item ID (for n = 1: the one item) and checked
 * against its operation. Returns 0 whatever each item's Result Status;
 * -EREMOTEIO with err filled when a batch of several got one failed item
 * without an ID (the server refused the message as a whole); -EBADMSG
 * malformed, a Batch Count other than the items present or more than n, an
 * ID we did not send, the same ID twice, an operation that is not the one
 * sent; -EINVAL bad arguments. */
int kmip_response_batch(const uint8_t *buf, size_t len, const struct kmip_batch_op *ops, size_t n,
                        struct kmip_batch_result *res, struct kmip_error *err);

/* The payload of a successful item of kmip_response_batch, as the one-item
 * parsers below read it; -EINVAL for an item not answered, failed or of
 * another operation. */
int kmip_result_locate(const struct kmip_batch_result *res, char (*ret)[KMIP_ID_MAX], size_t max,
                       size_t *ret_n);
int kmip_result_get_symmetric_key(const struct kmip_batch_result *res, char uid[KMIP_ID_MAX],
                                  uint8_t key[AES256_KEY_SIZE]);
int kmip_result_get_attributes(const struct kmip_batch_result *res, struct kmip_key_attributes *ret);

/* Response parsers: buf is one whole Response Message (len = what
 * kmip_message_length() said). They check the response header (protocol
 * major version 1, Batch Count 1, exactly one Batch Item), the batch item's
 * operation and Result Status; on failure fill err (which may be NULL) and
 * return -EREMOTEIO. A list longer than `max` is refused with -ENOBUFS, never
 * truncated; *ret_n is 0 after any failure. */
int kmip_response_discover_versions(const uint8_t *buf, size_t len, struct kmip_version *ret,
                                    size_t max, size_t *ret_n, struct kmip_error *err);
/* The Time Stamp of a Response Header (section 6.5) in *ret, seconds since
 * the epoch: the server's clock, for diagnostics. Returns 0, -ENOENT (none
 * given), -EBADMSG. */
int kmip_response_time_stamp(const uint8_t *buf, size_t len, int64_t *ret);
/* Unique Identifiers found, in the server's order (pass max = KMIP_LOCATE_MAX,
 * the Maximum Items the request asks for). */
int kmip_response_locate(const uint8_t *buf, size_t len, char (*ret)[KMIP_ID_MAX],
                         size_t max, size_t *ret_n, struct kmip_error *err);
/* A Symmetric Key, Key Format Type Raw (or Transparent Symmetric Key, which
 * some servers answer with), unwrapped, AES, 256 bits: its 32 bytes in key
 * (wiped on failure; -EBADMSG for any other kind of object or format) and its
 * Unique Identifier in uid (may be NULL). The response buffer holds key
 * material: the caller wipes it. */
int kmip_response_get_symmetric_key(const uint8_t *buf, size_t len, char uid[KMIP_ID_MAX],
                                    uint8_t key[AES256_KEY_SIZE], struct kmip_error *err);
/* Attributes the server did not return are left 0 / "" (PyKMIP has no
 * Activation Date, for instance); a duplicated single-valued attribute, a
 * value of the wrong type or a Unique Identifier attribute that differs from
 * the payload's is -EBADMSG. */
int kmip_response_get_attributes(const uint8_t *buf, size_t len, struct kmip_key_attributes *ret,
                                 struct kmip_error *err);
