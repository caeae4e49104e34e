/* KMIP 1.2 request builders and response parsers for DiscoverVersions,
 * Locate, Get and GetAttributes, alone or batched, on the TTLV codec of ttlv.c. Bytes in,
 * bytes out: the TLS transport lives in tls.c. See message.h. */
#include "message.h"

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ttlv.h"
#include "macro.h"

/* KMIP 1.2 section 9.1.3.1 Tags (only those this module uses). */
enum {
        TAG_ATTRIBUTE = 0x420008,
        TAG_ATTRIBUTE_INDEX = 0x420009,
        TAG_ATTRIBUTE_NAME = 0x42000A,
        TAG_ATTRIBUTE_VALUE = 0x42000B,
        TAG_BATCH_COUNT = 0x42000D,
        TAG_BATCH_ERROR_CONTINUATION_OPTION = 0x42000E,
        TAG_BATCH_ITEM = 0x42000F,
        TAG_CRYPTOGRAPHIC_ALGORITHM = 0x420028,
        TAG_CRYPTOGRAPHIC_LENGTH = 0x42002A,
        TAG_KEY = 0x42003F,
        TAG_KEY_BLOCK = 0x420040,
        TAG_KEY_COMPRESSION_TYPE = 0x420041,
        TAG_KEY_FORMAT_TYPE = 0x420042,
        TAG_KEY_MATERIAL = 0x420043,
        TAG_KEY_VALUE = 0x420045,
        TAG_KEY_WRAPPING_DATA = 0x420046,
        TAG_MAXIMUM_ITEMS = 0x42004F,
        TAG_NAME_TYPE = 0x420054,
        TAG_NAME_VALUE = 0x420055,
        TAG_OBJECT_TYPE = 0x420057,
        TAG_OPERATION = 0x42005C,
        TAG_PROTOCOL_VERSION = 0x420069,
        TAG_PROTOCOL_VERSION_MAJOR = 0x42006A,
        TAG_PROTOCOL_VERSION_MINOR = 0x42006B,
        TAG_REQUEST_HEADER = 0x420077,
        TAG_REQUEST_MESSAGE = 0x420078,
        TAG_REQUEST_PAYLOAD = 0x420079,
        TAG_RESPONSE_HEADER = 0x42007A,
        TAG_RESPONSE_MESSAGE = 0x42007B,
        TAG_RESPONSE_PAYLOAD = 0x42007C,
        TAG_RESULT_MESSAGE = 0x42007D,
        TAG_RESULT_REASON = 0x42007E,
        TAG_RESULT_STATUS = 0x42007F,
        TAG_SYMMETRIC_KEY = 0x42008F,
        TAG_TIME_STAMP = 0x420092,
        TAG_UNIQUE_BATCH_ITEM_ID = 0x420093,
        TAG_UNIQUE_IDENTIFIER = 0x420094,
};

/* Section 9.1.3.2.27 Operation (message.h) */
enum {
        OP_LOCATE = KMIP_OP_LOCATE,
        OP_GET = KMIP_OP_GET,
        OP_GET_ATTRIBUTES = KMIP_OP_GET_ATTRIBUTES,
        OP_DISCOVER_VERSIONS = KMIP_OP_DISCOVER_VERSIONS,
};

/* Section 9.1.3.2.30 Batch Error Continuation Option */
#define BATCH_ERROR_CONTINUE 0x01

/* Section 9.1.3.2.12 Object Type, 9.1.3.2.13 Cryptographic Algorithm,
 * 9.1.3.2.3 Key Format Type */
enum {
        OBJECT_TYPE_SYMMETRIC_KEY = 0x02,
        ALGORITHM_AES = 0x03,
        KEY_FORMAT_RAW = 0x01,
        KEY_FORMAT_TRANSPARENT_SYMMETRIC_KEY = 0x07,
};

/* Section 3 attribute names (Attribute Name is a Text String in 1.x). */
#define ATTR_UNIQUE_IDENTIFIER "Unique Identifier"
#define ATTR_NAME "Name"
#define ATTR_OBJECT_TYPE "Object Type"
#define ATTR_ALGORITHM "Cryptographic Algorithm"
#define ATTR_LENGTH "Cryptographic Length"
#define ATTR_OBJECT_GROUP "Object Group"
#define ATTR_STATE "State"
#define ATTR_INITIAL_DATE "Initial Date"

#define REQUEST_MAX 4096            /* a one-item request is a few hundred bytes */
/* A batch item we build: a Get or GetAttributes of a uid of up to
 * KMIP_ID_MAX - 1 bytes with its Attribute Names, or a Locate of a group of up
 * to KMIP_GROUP_MAX bytes, fits in this (checked: -ENOBUFS otherwise). */
#define REQUEST_ITEM_MAX 640
#define BATCH_ID_SIZE 4             /* Unique Batch Item ID: the item's index, big endian */

const char *kmip_state_to_string(int state) {
        switch (state) {
        case KMIP_STATE_PRE_ACTIVE:
                return "Pre-Active";
        case KMIP_STATE_ACTIVE:
                return "Active";
        case KMIP_STATE_DEACTIVATED:
                return "Deactivated";
        case KMIP_STATE_COMPROMISED:
                return "Compromised";
        case KMIP_STATE_DESTROYED:
                return "Destroyed";
        case KMIP_STATE_DESTROYED_COMPROMISED:
                return "Destroyed Compromised";
        default:
                return "unknown";
        }
}

/* Section 9.1.3.2.29 Result Reason */
const char *kmip_result_reason_to_string(int32_t reason) {
        static const struct {
                int32_t reason;
                const char *name;
        } table[] = {
                { 0x01, "Item Not Found" },
                { 0x02, "Response Too Large" },
                { 0x03, "Authentication Not Successful" },
                { 0x04, "Invalid Message" },
                { 0x05, "Operation Not Supported" },
                { 0x06, "Missing Data" },
                { 0x07, "Invalid Field" },
                { 0x08, "Feature Not Supported" },
                { 0x09, "Operation Canceled By Requester" },
                { 0x0A, "Cryptographic Failure" },
                { 0x0B, "Illegal Operation" },
                { 0x0C, "Permission Denied" },
                { 0x0D, "Object Archived" },
                { 0x0E, "Index Out of Bounds" },
                { 0x0F, "Application Namespace Not Supported" },
                { 0x10, "Key Format Type Not Supported" },
                { 0x11, "Key Compression Type Not Supported" },
                { 0x12, "Encoding Option Error" },
                { 0x13, "Key Value Not Present" },
                { 0x14, "Attestation Required" },
                { 0x15, "Attestation Failed" },
                { 0x100, "General Failure" },
        };
        static __thread char buf[32];

        for (size_t i = 0; i < ARRAY_SIZE(table); i++)
                if (table[i].reason == reason)
                        return table[i].name;
        snprintf(buf, sizeof(buf), "reason %" PRId32, reason);
        return buf;
}

int kmip_message_length(const uint8_t hdr[KMIP_HEADER_SIZE]) {
        if (!hdr)
                return -EINVAL;
        /* Section 9.1.1: a message is one Structure (Request/Response Message);
         * its length counts whole padded items, so it is a multiple of 8. A
         * peer that is not speaking KMIP at all fails the tag check. */
        if (hdr[0] != 0x42 || hdr[3] != TTLV_STRUCTURE)
                return -EBADMSG;
        uint32_t len = (uint32_t) hdr[4] << 24 | (uint32_t) hdr[5] << 16 |
                       (uint32_t) hdr[6] << 8 | hdr[7];
        if (len % 8 != 0 || len > KMIP_MESSAGE_MAX - KMIP_HEADER_SIZE)
                return -EBADMSG;
        return (int) (KMIP_HEADER_SIZE + len);
}

/* ---- requests --------------------------------------------------------- */

static int check_version(const struct kmip_version *version, struct kmip_version *ret) {
        if (!version) {
                *ret = (struct kmip_version) { 1, 2 };
                return 0;
        }
        /* The payloads below are KMIP 1.x (Attribute structures, Section 2.1.1);
         * 2.0 replaced them. */
        if (version->major != 1 || version->minor < 0)
                return -EINVAL;
        *ret = *version;
        return 0;
}

static int check_text(const char *s, size_t max) {
        if (!s)
                return -EINVAL;
        size_t n = strnlen(s, max + 1);
        if (n == 0 || n > max)
                return -EINVAL;
        return 0;
}

/* Section 2.1.1 Attribute: Attribute Name (Text String) and Attribute Value. */
static void put_attribute_text(struct ttlv_writer *w, const char *name, const char *value) {
        ttlv_begin(w, TAG_ATTRIBUTE);
        ttlv_put_text(w, TAG_ATTRIBUTE_NAME, name, strlen(name));
        ttlv_put_text(w, TAG_ATTRIBUTE_VALUE, value, strlen(value));
        ttlv_end(w);
}

static void put_attribute_enum(struct ttlv_writer *w, const char *name, uint32_t value) {
        ttlv_begin(w, TAG_ATTRIBUTE);
        ttlv_put_text(w, TAG_ATTRIBUTE_NAME, name, strlen(name));
        ttlv_put_enum(w, TAG_ATTRIBUTE_VALUE, value);
        ttlv_end(w);
}

static void put_version(struct ttlv_writer *w, const struct kmip_version *v) {
        ttlv_begin(w, TAG_PROTOCOL_VERSION);
        ttlv_put_integer(w, TAG_PROTOCOL_VERSION_MAJOR, v->major);
        ttlv_put_integer(w, TAG_PROTOCOL_VERSION_MINOR, v->minor);
        ttlv_end(w);
}

/* Ours, highest preference first (section 4.26): the server answers with
 * those it supports too. */
static const struct kmip_version our_versions[KMIP_VERSIONS_MAX] = { { 1, 2 }, { 1, 1 }, { 1, 0 } };

static int check_op(const struct kmip_batch_op *op) {
        switch (op->operation) {
        case KMIP_OP_DISCOVER_VERSIONS:
                return 0;
        case KMIP_OP_LOCATE:
                if (op->state < 0 || op->state > KMIP_STATE_DESTROYED_COMPROMISED)
                        return -EINVAL;
                return check_text(op->arg, KMIP_GROUP_MAX);
        case KMIP_OP_GET:
        case KMIP_OP_GET_ATTRIBUTES:
                return check_text(op->arg, KMIP_ID_MAX - 1);
        default:
                return -EINVAL;
        }
}

/* The Request Payload of one operation. */
static void put_payload(struct ttlv_writer *w, const struct kmip_batch_op *op) {
        static const char *const names[] = {
                ATTR_UNIQUE_IDENTIFIER, ATTR_OBJECT_TYPE, ATTR_STATE, ATTR_INITIAL_DATE,
                ATTR_ALGORITHM, ATTR_LENGTH, ATTR_NAME,
        };

        switch (op->operation) {
        case KMIP_OP_DISCOVER_VERSIONS:
                for (size_t i = 0; i < ARRAY_SIZE(our_versions); i++)
                        put_version(w, &our_versions[i]);
                break;
        case KMIP_OP_LOCATE:
                /* Section 4.9 Locate: Maximum Items, then the Attributes an
                 * object must all match. One more than we accept: a full
                 * answer then proves the group is larger than
                 * KMIP_LOCATE_MAX (-ENOBUFS) instead of being cut short
                 * silently, which would purge the versions left out. */
                ttlv_put_integer(w, TAG_MAXIMUM_ITEMS, KMIP_LOCATE_MAX + 1);
                put_attribute_enum(w, ATTR_OBJECT_TYPE, OBJECT_TYPE_SYMMETRIC_KEY);
                put_attribute_text(w, ATTR_OBJECT_GROUP, op->arg);
                if (op->state != 0)
                        put_attribute_enum(w, ATTR_STATE, (uint32_t) op->state);
                break;
        case KMIP_OP_GET:
                /* Section 4.11 Get: ask for the key in Raw format, unwrapped. */
                ttlv_put_text(w, TAG_UNIQUE_IDENTIFIER, op->arg, strlen(op->arg));
                ttlv_put_enum(w, TAG_KEY_FORMAT_TYPE, KEY_FORMAT_RAW);
                break;
        case KMIP_OP_GET_ATTRIBUTES:
                /* Section 4.12 Get Attributes: Unique Identifier, Attribute Names. */
                ttlv_put_text(w, TAG_UNIQUE_IDENTIFIER, op->arg, strlen(op->arg));
                for (size_t i = 0; i < ARRAY_SIZE(names); i++)
                        ttlv_put_text(w, TAG_ATTRIBUTE_NAME, names[i], strlen(names[i]));
                break;
        }
}

/* Section 7.1 Request Message: a Request Header (Protocol Version, then
 * with several items the Batch Error Continuation Option Continue, section
 * 6.13, so that one failed item does not stop the others; Batch Count,
 * section 6.14) and the Batch Items (section 6.15: Operation, Unique Batch
 * Item ID, section 6.4, when there are several; Request Payload). No Batch
 * Order Option (section 6.12): our items never depend on each other (no ID
 * Placeholder), the server may run them in any order. */
int kmip_request_batch(const struct kmip_version *version, const struct kmip_batch_op *ops, size_t n,
                       uint8_t **ret, size_t *ret_len) {
        _cleanup_free_ uint8_t *buf = NULL;
        struct ttlv_writer w;
        struct kmip_version v;
        size_t cap, len;
        int r;

        if (!ret || !ret_len || !ops || n == 0 || n > KMIP_BATCH_MAX)
                return -EINVAL;
        r = check_version(version, &v);
        if (r < 0)
                return r;
        for (size_t i = 0; i < n; i++) {
                r = check_op(&ops[i]);
                if (r < 0)
                        return r;
        }
        cap = n == 1 ? REQUEST_MAX : REQUEST_MAX + n * REQUEST_ITEM_MAX;
        buf = malloc(cap);
        if (!buf)
                return -ENOMEM;
        ttlv_writer_init(&w, buf, cap);

        ttlv_begin(&w, TAG_REQUEST_MESSAGE);
        ttlv_begin(&w, TAG_REQUEST_HEADER);
        put_version(&w, &v);
        if (n > 1)
                ttlv_put_enum(&w, TAG_BATCH_ERROR_CONTINUATION_OPTION, BATCH_ERROR_CONTINUE);
        ttlv_put_integer(&w, TAG_BATCH_COUNT, (int32_t) n);
        ttlv_end(&w);
        for (size_t i = 0; i < n; i++) {
                uint8_t id[BATCH_ID_SIZE] = { (uint8_t) (i >> 24), (uint8_t) (i >> 16),
                                              (uint8_t) (i >> 8), (uint8_t) i };

                ttlv_begin(&w, TAG_BATCH_ITEM);
                ttlv_put_enum(&w, TAG_OPERATION, (uint32_t) ops[i].operation);
                if (n > 1)
                        ttlv_put_bytes(&w, TAG_UNIQUE_BATCH_ITEM_ID, id, sizeof(id));
                ttlv_begin(&w, TAG_REQUEST_PAYLOAD);
                put_payload(&w, &ops[i]);
                ttlv_end(&w);
                ttlv_end(&w);
        }
        ttlv_end(&w);
        r = ttlv_writer_finish(&w, &len);
        if (r < 0)
                return r;
        uint8_t *shrunk = realloc(buf, len);
        if (shrunk)
                buf = shrunk;
        *ret = TAKE_PTR(buf);
        *ret_len = len;
        return 0;
}

static int request_one(const struct kmip_version *version, const struct kmip_batch_op *op,
                       uint8_t **ret, size_t *ret_len) {
        return kmip_request_batch(version, op, 1, ret, ret_len);
}

int kmip_request_discover_versions(uint8_t **ret, size_t *ret_len) {
        /* Sent as a 1.2 message: the version we would rather speak. */
        return request_one(&our_versions[0], &(struct kmip_batch_op) { .operation = KMIP_OP_DISCOVER_VERSIONS },
                           ret, ret_len);
}

int kmip_request_locate(const struct kmip_version *version, const char *group, int32_t state,
                        uint8_t **ret, size_t *ret_len) {
        return request_one(version, &(struct kmip_batch_op) { .operation = KMIP_OP_LOCATE, .arg = group,
                                                              .state = state },
                           ret, ret_len);
}

int kmip_request_get(const struct kmip_version *version, const char *uid,
                     uint8_t **ret, size_t *ret_len) {
        return request_one(version, &(struct kmip_batch_op) { .operation = KMIP_OP_GET, .arg = uid },
                           ret, ret_len);
}

int kmip_request_get_attributes(const struct kmip_version *version, const char *uid,
                                uint8_t **ret, size_t *ret_len) {
        return request_one(version, &(struct kmip_batch_op) { .operation = KMIP_OP_GET_ATTRIBUTES, .arg = uid },
                           ret, ret_len);
}

/* ---- responses -------------------------------------------------------- */

/* A required child: absent is as malformed as mistyped. */
static int need(const struct ttlv_item *parent, uint32_t tag, uint8_t type, struct ttlv_item *ret) {
        int r = ttlv_find(parent, tag, type, ret);
        return r == -ENOENT ? -EBADMSG : r;
}

static int need_enum(const struct ttlv_item *parent, uint32_t tag, uint32_t *ret) {
        struct ttlv_item it;
        int r = need(parent, tag, TTLV_ENUMERATION, &it);
        return r < 0 ? r : ttlv_get_enum(&it, ret);
}

static int need_integer(const struct ttlv_item *parent, uint32_t tag, int32_t *ret) {
        struct ttlv_item it;
        int r = need(parent, tag, TTLV_INTEGER, &it);
        return r < 0 ? r : ttlv_get_integer(&it, ret);
}

/* Text into a fixed buffer: a NUL inside, an empty string or one too long for
 * the buffer is a malformed response (never truncated). */
static int copy_text(const struct ttlv_item *it, char *buf, size_t size, bool allow_empty) {
        int r = ttlv_copy_text(it, buf, size);
        if (r < 0)
                return -EBADMSG;
        if (r == 0 && !allow_empty)
                return -EBADMSG;
        return 0;
}

/* Result Message is a diagnostic for a log line: keep printable ASCII,
 * replace the rest, cut what does not fit. */
static void copy_message(const struct ttlv_item *it, char *buf, size_t size) {
        const char *s;
        size_t n, i;

        buf[0] = 0;
        if (ttlv_get_text(it, &s, &n) < 0)
                return;
        for (i = 0; i < n && i + 1 < size; i++)
                buf[i] = s[i] >= 0x20 && s[i] < 0x7f ? s[i] : '?';
        buf[i] = 0;
}

static int parse_version(const struct ttlv_item *pv, struct kmip_version *ret) {
        int r;

        r = need_integer(pv, TAG_PROTOCOL_VERSION_MAJOR, &ret->major);
        if (r < 0)
                return r;
        return need_integer(pv, TAG_PROTOCOL_VERSION_MINOR, &ret->minor);
}

/* Section 6.4 Unique Batch Item ID: ours are the item's index in
 * BATCH_ID_SIZE bytes, big endian. Returns the index, or -EBADMSG for an
 * ID we did not send. */
static int batch_item_index(const struct ttlv_item *id, size_t n) {
        const uint8_t *p;
        size_t len;
        uint32_t v = 0;

        if (ttlv_get_bytes(id, &p, &len) < 0 || len != BATCH_ID_SIZE)
                return -EBADMSG;
        for (size_t i = 0; i < BATCH_ID_SIZE; i++)
                v = v << 8 | p[i];
        return v < n ? (int) v : -EBADMSG;
}

/* Section 6.9-6.11: Result Status, Result Reason and Result Message of a
 * batch item into err. Returns 0 or -EBADMSG. */
static int parse_result(const struct ttlv_item *bi, struct kmip_error *err) {
        struct ttlv_item it;
        uint32_t status, reason = 0;
        int r;

        *err = (struct kmip_error) {};
        r = need_enum(bi, TAG_RESULT_STATUS, &status);
        if (r < 0)
                return r;
        if (status == KMIP_STATUS_SUCCESS)
                return 0;
        r = ttlv_find(bi, TAG_RESULT_REASON, TTLV_ENUMERATION, &it);
        if (r == 0)
                r = ttlv_get_enum(&it, &reason);
        if (r < 0 && r != -ENOENT)
                return r;
        /* A status that does not fit would be read as success. */
        err->result_status = status > INT32_MAX ? INT32_MAX : (int32_t) status;
        err->result_reason = (int32_t) reason;
        if (ttlv_find(bi, TAG_RESULT_MESSAGE, TTLV_TEXT_STRING, &it) == 0)
                copy_message(&it, err->message, sizeof(err->message));
        return 0;
}

/* The Response Message structure of buf and its Response Header (section
 * 7.1). Returns 0 or -EBADMSG. */
static int response_header(const uint8_t *buf, size_t len, struct ttlv_item *ret_msg, struct ttlv_item *ret_hdr) {
        int r;

        if (len > KMIP_MESSAGE_MAX)
                return -EBADMSG;
        r = ttlv_parse(buf, len, ret_msg);
        if (r < 0)
                return r;
        if (ret_msg->tag != TAG_RESPONSE_MESSAGE || ret_msg->type != TTLV_STRUCTURE)
                return -EBADMSG;
        return need(ret_msg, TAG_RESPONSE_HEADER, TTLV_STRUCTURE, ret_hdr);
}

/* Section 7.1 Response Message: Response Header (Protocol Version, Time
 * Stamp, Batch Count) and Batch Items (section 6.15: Operation, Unique Batch
 * Item ID, Result Status, Result Reason, Result Message, Response Payload). */
static int parse_batch(const uint8_t *buf, size_t len, const struct kmip_batch_op *ops, size_t n,
                       struct kmip_batch_result *res, struct kmip_error *err) {
        struct ttlv_item msg, hdr, pv, bi, it;
        struct kmip_version version;
        struct ttlv_iter iter;
        int32_t batch_count;
        int items, r;

        r = response_header(buf, len, &msg, &hdr);
        if (r < 0)
                return r;
        r = need(&hdr, TAG_PROTOCOL_VERSION, TTLV_STRUCTURE, &pv);
        if (r < 0)
                return r;
        r = parse_version(&pv, &version);
        if (r < 0)
                return r;
        if (version.major != 1)
                return -EBADMSG;
        /* Time Stamp (section 6.5) is required, but not worth failing a key
         * fetch over: only its type is checked. */
        r = ttlv_find(&hdr, TAG_TIME_STAMP, TTLV_DATE_TIME, NULL);
        if (r < 0 && r != -ENOENT)
                return r;
        /* Batch Count (section 6.14) says how many items follow; a server
         * that stopped after a failed item answers fewer than we sent, never
         * more. */
        r = need_integer(&hdr, TAG_BATCH_COUNT, &batch_count);
        if (r < 0)
                return r;
        items = ttlv_count(&msg, TAG_BATCH_ITEM);
        if (items < 0)
                return items;
        if (batch_count < 1 || (size_t) batch_count > n || items != batch_count)
                return -EBADMSG;

        r = ttlv_iter_init(&iter, &msg);
        if (r < 0)
                return r;
        while ((r = ttlv_iter_next(&iter, &bi)) > 0) {
                struct kmip_error ke;
                uint32_t operation;
                bool has_operation;
                int idx;

                if (bi.tag != TAG_BATCH_ITEM)
                        continue;
                if (bi.type != TTLV_STRUCTURE)
                        return -EBADMSG;
                r = parse_result(&bi, &ke);
                if (r < 0)
                        return r;

                r = ttlv_find(&bi, TAG_UNIQUE_BATCH_ITEM_ID, TTLV_BYTE_STRING, &it);
                if (r < 0 && r != -ENOENT)
                        return r;
                if (n == 1)
                        idx = 0;        /* we sent no ID */
                else if (r == 0)
                        idx = batch_item_index(&it, n);
                else if (items == 1 && ke.result_status != KMIP_STATUS_SUCCESS) {
                        /* One failed item for no item of ours: the server
                         * refused the message as a whole (it could not
                         * parse it, or does not take batches). */
                        if (err)
                                *err = ke;
                        return -EREMOTEIO;
                } else
                        idx = -EBADMSG;
                if (idx < 0)
                        return idx;
                if (res[idx].answered)
                        return -EBADMSG;        /* the same item twice */

                /* Operation is in every answer to a batch item that named one,
                 * but a server that could not parse the request at all answers
                 * without it (PyKMIP does): accept its absence on failure only. */
                r = ttlv_find(&bi, TAG_OPERATION, TTLV_ENUMERATION, &it);
                if (r < 0 && r != -ENOENT)
                        return r;
                has_operation = r == 0;
                if (has_operation) {
                        r = ttlv_get_enum(&it, &operation);
                        if (r < 0)
                                return r;
                        if (operation != (uint32_t) ops[idx].operation)
                                return -EBADMSG;
                }
                if (ke.result_status == KMIP_STATUS_SUCCESS) {
                        if (!has_operation)
                                return -EBADMSG;
                        r = need(&bi, TAG_RESPONSE_PAYLOAD, TTLV_STRUCTURE, &res[idx].payload);
                        if (r < 0)
                                return r;
                }
                res[idx].answered = true;
                res[idx].operation = ops[idx].operation;
                res[idx].error = ke;
        }
        if (r < 0)
                return r;
        return 0;
}

int kmip_response_batch(const uint8_t *buf, size_t len, const struct kmip_batch_op *ops, size_t n,
                        struct kmip_batch_result *res, struct kmip_error *err) {
        int r;

        if (err)
                *err = (struct kmip_error) {};
        if (!buf || !ops || !res || n == 0 || n > KMIP_BATCH_MAX)
                return -EINVAL;
        memset(res, 0, n * sizeof(*res));
        r = parse_batch(buf, len, ops, n, res, err);
        if (r < 0)
                memset(res, 0, n * sizeof(*res));   /* nothing from a message refused */
        return r;
}

/* The payload of an answered, successful batch item for op; -EINVAL otherwise. */
static int result_payload(const struct kmip_batch_result *res, uint32_t op, const struct ttlv_item **ret) {
        if (!res || !res->answered || res->operation != (int32_t) op ||
            res->error.result_status != KMIP_STATUS_SUCCESS || res->payload.type != TTLV_STRUCTURE)
                return -EINVAL;
        *ret = &res->payload;
        return 0;
}

/* One whole response to a one-item request for op: its payload, -EREMOTEIO
 * with err filled for a failed item, -EBADMSG for anything unexpected. */
static int parse_response(const uint8_t *buf, size_t len, uint32_t op,
                          struct ttlv_item *ret_payload, struct kmip_error *err) {
        struct kmip_batch_op o = { .operation = (int32_t) op };
        struct kmip_batch_result res;
        int r;

        r = kmip_response_batch(buf, len, &o, 1, &res, err);
        if (r < 0)
                return r;
        if (res.error.result_status != KMIP_STATUS_SUCCESS) {
                if (err)
                        *err = res.error;
                return -EREMOTEIO;
        }
        *ret_payload = res.payload;
        return 0;
}

int kmip_response_time_stamp(const uint8_t *buf, size_t len, int64_t *ret) {
        struct ttlv_item msg, hdr, ts;
        int r;

        if (!buf)
                return -EBADMSG;
        r = response_header(buf, len, &msg, &hdr);
        if (r < 0)
                return r;
        r = ttlv_find(&hdr, TAG_TIME_STAMP, TTLV_DATE_TIME, &ts);
        if (r < 0)
                return r;
        return ttlv_get_datetime(&ts, ret);
}

int kmip_response_discover_versions(const uint8_t *buf, size_t len, struct kmip_version *ret,
                                    size_t max, size_t *ret_n, struct kmip_error *err) {
        struct ttlv_item payload, child;
        struct ttlv_iter iter;
        size_t n = 0;
        int r;

        if (!ret_n || (max > 0 && !ret))
                return -EINVAL;
        *ret_n = 0;
        r = parse_response(buf, len, OP_DISCOVER_VERSIONS, &payload, err);
        if (r < 0)
                return r;

        /* Section 4.26: the Protocol Versions both sides support, highest
         * preference first; none at all means no version in common. */
        r = ttlv_iter_init(&iter, &payload);
        if (r < 0)
                return r;
        while ((r = ttlv_iter_next(&iter, &child)) > 0) {
                if (child.tag != TAG_PROTOCOL_VERSION)
                        continue;
                if (child.type != TTLV_STRUCTURE)
                        return -EBADMSG;
                if (n >= max)
                        return -ENOBUFS;
                r = parse_version(&child, &ret[n]);
                if (r < 0)
                        return r;
                n++;
        }
        if (r < 0)
                return r;
        *ret_n = n;
        return 0;
}

/* Section 4.9: zero or more Unique Identifiers (1.3 adds Located Items,
 * which is skipped like anything else we do not know). */
static int payload_locate(const struct ttlv_item *payload, char (*ret)[KMIP_ID_MAX], size_t max,
                          size_t *ret_n) {
        struct ttlv_item child;
        struct ttlv_iter iter;
        size_t n = 0;
        int r;

        r = ttlv_iter_init(&iter, payload);
        if (r < 0)
                return r;
        while ((r = ttlv_iter_next(&iter, &child)) > 0) {
                if (child.tag != TAG_UNIQUE_IDENTIFIER)
                        continue;
                if (n >= max)
                        return -ENOBUFS;
                r = copy_text(&child, ret[n], KMIP_ID_MAX, false);
                if (r < 0)
                        return r;
                n++;
        }
        if (r < 0)
                return r;
        *ret_n = n;
        return 0;
}

int kmip_response_locate(const uint8_t *buf, size_t len, char (*ret)[KMIP_ID_MAX],
                         size_t max, size_t *ret_n, struct kmip_error *err) {
        struct ttlv_item payload;
        int r;

        if (!ret_n || (max > 0 && !ret))
                return -EINVAL;
        *ret_n = 0;
        r = parse_response(buf, len, OP_LOCATE, &payload, err);
        if (r < 0)
                return r;
        return payload_locate(&payload, ret, max, ret_n);
}

int kmip_result_locate(const struct kmip_batch_result *res, char (*ret)[KMIP_ID_MAX], size_t max,
                       size_t *ret_n) {
        const struct ttlv_item *payload;
        int r;

        if (!ret_n || (max > 0 && !ret))
                return -EINVAL;
        *ret_n = 0;
        r = result_payload(res, OP_LOCATE, &payload);
        if (r < 0)
                return r;
        return payload_locate(payload, ret, max, ret_n);
}

/* Section 2.1.3 Key Block of a Symmetric Key, unwrapped and uncompressed:
 * Raw (Key Material is the Byte String) or Transparent Symmetric Key (Key
 * Material is a structure holding Key, section 2.1.7.1); AES, 256 bits. */
static int parse_symmetric_key(const struct ttlv_item *payload, char uid[KMIP_ID_MAX],
                               uint8_t key[AES256_KEY_SIZE]) {
        struct ttlv_item it, sk, block, value, material;
        uint32_t object_type, format, algorithm;
        int32_t length;
        const uint8_t *bytes;
        size_t n;
        int r;

        /* Section 4.11 Get response: Object Type, Unique Identifier, object. */
        r = need_enum(payload, TAG_OBJECT_TYPE, &object_type);
        if (r < 0)
                return r;
        if (object_type != OBJECT_TYPE_SYMMETRIC_KEY)
                return -EBADMSG;
        r = need(payload, TAG_UNIQUE_IDENTIFIER, TTLV_TEXT_STRING, &it);
        if (r < 0)
                return r;
        if (uid) {
                r = copy_text(&it, uid, KMIP_ID_MAX, false);
                if (r < 0)
                        return r;
        }
        r = need(payload, TAG_SYMMETRIC_KEY, TTLV_STRUCTURE, &sk);
        if (r < 0)
                return r;
        r = need(&sk, TAG_KEY_BLOCK, TTLV_STRUCTURE, &block);
        if (r < 0)
                return r;

        r = need_enum(&block, TAG_KEY_FORMAT_TYPE, &format);
        if (r < 0)
                return r;
        if (format != KEY_FORMAT_RAW && format != KEY_FORMAT_TRANSPARENT_SYMMETRIC_KEY)
                return -EBADMSG;
        /* A wrapped key would need the wrapping key; compression is for EC
         * public keys only. Neither is what we asked for. */
        if (ttlv_find(&block, TAG_KEY_WRAPPING_DATA, 0, NULL) != -ENOENT ||
            ttlv_find(&block, TAG_KEY_COMPRESSION_TYPE, 0, NULL) != -ENOENT)
                return -EBADMSG;
        r = need_enum(&block, TAG_CRYPTOGRAPHIC_ALGORITHM, &algorithm);
        if (r < 0)
                return r;
        r = need_integer(&block, TAG_CRYPTOGRAPHIC_LENGTH, &length);
        if (r < 0)
                return r;
        if (algorithm != ALGORITHM_AES || length != AES256_KEY_SIZE * 8)
                return -EBADMSG;

        /* Key Value is a structure when not wrapped (a Byte String when it is). */
        r = need(&block, TAG_KEY_VALUE, TTLV_STRUCTURE, &value);
        if (r < 0)
                return r;
        if (format == KEY_FORMAT_RAW) {
                r = need(&value, TAG_KEY_MATERIAL, TTLV_BYTE_STRING, &material);
        } else {
                r = need(&value, TAG_KEY_MATERIAL, TTLV_STRUCTURE, &it);
                if (r < 0)
                        return r;
                r = need(&it, TAG_KEY, TTLV_BYTE_STRING, &material);
        }
        if (r < 0)
                return r;
        r = ttlv_get_bytes(&material, &bytes, &n);
        if (r < 0)
                return r;
        if (n != AES256_KEY_SIZE)
                return -EBADMSG;
        memcpy(key, bytes, AES256_KEY_SIZE);
        return 0;
}

static int key_result(int r, char uid[KMIP_ID_MAX], uint8_t key[AES256_KEY_SIZE]) {
        if (r < 0) {
                explicit_bzero(key, AES256_KEY_SIZE);
                if (uid)
                        uid[0] = 0;
        }
        return r;
}

int kmip_response_get_symmetric_key(const uint8_t *buf, size_t len, char uid[KMIP_ID_MAX],
                                    uint8_t key[AES256_KEY_SIZE], struct kmip_error *err) {
        struct ttlv_item payload;
        int r;

        if (!key)
                return -EINVAL;
        if (uid)
                uid[0] = 0;
        r = parse_response(buf, len, OP_GET, &payload, err);
        if (r >= 0)
                r = parse_symmetric_key(&payload, uid, key);
        return key_result(r, uid, key);
}

int kmip_result_get_symmetric_key(const struct kmip_batch_result *res, char uid[KMIP_ID_MAX],
                                  uint8_t key[AES256_KEY_SIZE]) {
        const struct ttlv_item *payload;
        int r;

        if (!key)
                return -EINVAL;
        if (uid)
                uid[0] = 0;
        r = result_payload(res, OP_GET, &payload);
        if (r >= 0)
                r = parse_symmetric_key(payload, uid, key);
        return key_result(r, uid, key);
}

enum {
        SEEN_UID = 1 << 0,
        SEEN_OBJECT_TYPE = 1 << 1,
        SEEN_STATE = 1 << 2,
        SEEN_INITIAL_DATE = 1 << 3,
        SEEN_ALGORITHM = 1 << 4,
        SEEN_LENGTH = 1 << 5,
        SEEN_NAME = 1 << 6,
};

/* Mark a single-valued attribute seen: twice is malformed. */
static int seen_once(unsigned *seen, unsigned bit) {
        if (*seen & bit)
                return -EBADMSG;
        *seen |= bit;
        return 0;
}

static int parse_attribute(const struct ttlv_item *attr, struct kmip_key_attributes *ret, unsigned *seen) {
        struct ttlv_item name, value, it;
        char uid[KMIP_ID_MAX];
        uint32_t e;
        int r;

        /* Section 2.1.1 Attribute: Attribute Name, Attribute Index (optional),
         * Attribute Value whose type depends on the name (section 3). */
        r = need(attr, TAG_ATTRIBUTE_NAME, TTLV_TEXT_STRING, &name);
        if (r < 0)
                return r;
        r = ttlv_find(attr, TAG_ATTRIBUTE_INDEX, TTLV_INTEGER, NULL);
        if (r < 0 && r != -ENOENT)
                return r;
        r = need(attr, TAG_ATTRIBUTE_VALUE, 0, &value);
        if (r < 0)
                return r;

        if (ttlv_text_equal(&name, ATTR_UNIQUE_IDENTIFIER)) {
                r = seen_once(seen, SEEN_UID);
                if (r >= 0)
                        r = copy_text(&value, uid, sizeof(uid), false);
                if (r >= 0 && strcmp(uid, ret->uid) != 0)
                        r = -EBADMSG;
        } else if (ttlv_text_equal(&name, ATTR_OBJECT_TYPE)) {
                r = seen_once(seen, SEEN_OBJECT_TYPE);
                if (r >= 0)
                        r = ttlv_get_enum(&value, &e);
                if (r >= 0)
                        ret->object_type = (int32_t) e;
        } else if (ttlv_text_equal(&name, ATTR_STATE)) {
                r = seen_once(seen, SEEN_STATE);
                if (r >= 0)
                        r = ttlv_get_enum(&value, &e);
                if (r >= 0)
                        ret->state = (int32_t) e;
        } else if (ttlv_text_equal(&name, ATTR_INITIAL_DATE)) {
                r = seen_once(seen, SEEN_INITIAL_DATE);
                if (r >= 0)
                        r = ttlv_get_datetime(&value, &ret->initial_date);
        } else if (ttlv_text_equal(&name, ATTR_ALGORITHM)) {
                r = seen_once(seen, SEEN_ALGORITHM);
                if (r >= 0)
                        r = ttlv_get_enum(&value, &e);
                if (r >= 0)
                        ret->algorithm = (int32_t) e;
        } else if (ttlv_text_equal(&name, ATTR_LENGTH)) {
                r = seen_once(seen, SEEN_LENGTH);
                if (r >= 0)
                        r = ttlv_get_integer(&value, &ret->length);
        } else if (ttlv_text_equal(&name, ATTR_NAME)) {
                /* Section 3.2 Name: a structure of Name Value and Name Type;
                 * multi-valued, the first one is kept. */
                if (value.type != TTLV_STRUCTURE)
                        return -EBADMSG;
                r = need(&value, TAG_NAME_VALUE, TTLV_TEXT_STRING, &it);
                if (r < 0)
                        return r;
                if (!(*seen & SEEN_NAME)) {
                        r = copy_text(&it, ret->name, sizeof(ret->name), true);
                        if (r < 0)
                                return r;
                        *seen |= SEEN_NAME;
                }
                r = ttlv_find(&value, TAG_NAME_TYPE, TTLV_ENUMERATION, NULL);
                if (r == -ENOENT)
                        r = 0;
        } else
                r = 0;      /* not asked for, or newer than us: ignore */

        return r < 0 ? -EBADMSG : 0;
}

/* Section 4.12 Get Attributes response: Unique Identifier, then the
 * Attributes the object has among those asked for. */
static int payload_get_attributes(const struct ttlv_item *payload, struct kmip_key_attributes *ret) {
        struct ttlv_item it;
        struct ttlv_iter iter;
        unsigned seen = 0;
        int r;

        r = need(payload, TAG_UNIQUE_IDENTIFIER, TTLV_TEXT_STRING, &it);
        if (r >= 0)
                r = copy_text(&it, ret->uid, sizeof(ret->uid), false);
        if (r >= 0)
                r = ttlv_iter_init(&iter, payload);
        while (r >= 0 && (r = ttlv_iter_next(&iter, &it)) > 0) {
                if (it.tag != TAG_ATTRIBUTE)
                        continue;
                if (it.type != TTLV_STRUCTURE)
                        r = -EBADMSG;
                else
                        r = parse_attribute(&it, ret, &seen);
        }
        if (r < 0) {
                *ret = (struct kmip_key_attributes) {};
                return r;
        }
        return 0;
}

int kmip_response_get_attributes(const uint8_t *buf, size_t len, struct kmip_key_attributes *ret,
                                 struct kmip_error *err) {
        struct ttlv_item payload;
        int r;

        if (!ret)
                return -EINVAL;
        *ret = (struct kmip_key_attributes) {};
        r = parse_response(buf, len, OP_GET_ATTRIBUTES, &payload, err);
        if (r < 0)
                return r;
        return payload_get_attributes(&payload, ret);
}

int kmip_result_get_attributes(const struct kmip_batch_result *res, struct kmip_key_attributes *ret) {
        const struct ttlv_item *payload;
        int r;

        if (!ret)
                return -EINVAL;
        *ret = (struct kmip_key_attributes) {};
        r = result_payload(res, OP_GET_ATTRIBUTES, &payload);
        if (r < 0)
                return r;
        return payload_get_attributes(payload, ret);
}
