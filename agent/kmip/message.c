/* KMIP 1.2 request builders and response parsers for DiscoverVersions,
 * Locate, Get and GetAttributes, on the TTLV codec of ttlv.c. Bytes in,
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
        TAG_UNIQUE_IDENTIFIER = 0x420094,
};

/* Section 9.1.3.2.27 Operation */
enum {
        OP_LOCATE = 0x08,
        OP_GET = 0x0A,
        OP_GET_ATTRIBUTES = 0x0B,
        OP_DISCOVER_VERSIONS = 0x1E,
};

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

#define REQUEST_MAX 4096            /* our requests are a few hundred bytes */

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

/* Section 7.1 Request Message: Request Header (Protocol Version, Batch Count
 * = 1, section 6.14) and one Batch Item (Operation, Request Payload). Opens
 * the message, batch item and payload; request_end() closes them. */
static void request_begin(struct ttlv_writer *w, const struct kmip_version *v, uint32_t op) {
        ttlv_begin(w, TAG_REQUEST_MESSAGE);
        ttlv_begin(w, TAG_REQUEST_HEADER);
        ttlv_begin(w, TAG_PROTOCOL_VERSION);
        ttlv_put_integer(w, TAG_PROTOCOL_VERSION_MAJOR, v->major);
        ttlv_put_integer(w, TAG_PROTOCOL_VERSION_MINOR, v->minor);
        ttlv_end(w);
        ttlv_put_integer(w, TAG_BATCH_COUNT, 1);
        ttlv_end(w);
        ttlv_begin(w, TAG_BATCH_ITEM);
        ttlv_put_enum(w, TAG_OPERATION, op);
        ttlv_begin(w, TAG_REQUEST_PAYLOAD);
}

static int request_end(struct ttlv_writer *w, uint8_t **buf, uint8_t **ret, size_t *ret_len) {
        size_t n;
        int r;

        ttlv_end(w);                /* payload */
        ttlv_end(w);                /* batch item */
        ttlv_end(w);                /* message */
        r = ttlv_writer_finish(w, &n);
        if (r < 0)
                return r;
        uint8_t *shrunk = realloc(*buf, n);
        if (shrunk)
                *buf = shrunk;
        *ret = TAKE_PTR(*buf);
        *ret_len = n;
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

/* Check the version, allocate the buffer and open the message for op. */
static int request_start(const struct kmip_version *version, uint32_t op, struct ttlv_writer *w,
                         uint8_t **buf) {
        struct kmip_version v;
        int r;

        r = check_version(version, &v);
        if (r < 0)
                return r;
        *buf = malloc(REQUEST_MAX);
        if (!*buf)
                return -ENOMEM;
        ttlv_writer_init(w, *buf, REQUEST_MAX);
        request_begin(w, &v, op);
        return 0;
}

/* Get and GetAttributes name one object by its Unique Identifier first. */
static int request_start_uid(const struct kmip_version *version, uint32_t op, const char *uid,
                             struct ttlv_writer *w, uint8_t **buf) {
        int r = check_text(uid, KMIP_ID_MAX - 1);

        if (r < 0)
                return r;
        r = request_start(version, op, w, buf);
        if (r < 0)
                return r;
        ttlv_put_text(w, TAG_UNIQUE_IDENTIFIER, uid, strlen(uid));
        return 0;
}

int kmip_request_discover_versions(uint8_t **ret, size_t *ret_len) {
        /* Ours, highest preference first (section 4.26): the server answers
         * with those it supports too. */
        static const struct kmip_version ours[KMIP_VERSIONS_MAX] = { { 1, 2 }, { 1, 1 }, { 1, 0 } };
        _cleanup_free_ uint8_t *buf = NULL;
        struct ttlv_writer w;
        int r;

        if (!ret || !ret_len)
                return -EINVAL;
        r = request_start(&ours[0], OP_DISCOVER_VERSIONS, &w, &buf);
        if (r < 0)
                return r;
        for (size_t i = 0; i < ARRAY_SIZE(ours); i++) {
                ttlv_begin(&w, TAG_PROTOCOL_VERSION);
                ttlv_put_integer(&w, TAG_PROTOCOL_VERSION_MAJOR, ours[i].major);
                ttlv_put_integer(&w, TAG_PROTOCOL_VERSION_MINOR, ours[i].minor);
                ttlv_end(&w);
        }
        return request_end(&w, &buf, ret, ret_len);
}

int kmip_request_locate(const struct kmip_version *version, const char *group, int32_t state,
                        uint8_t **ret, size_t *ret_len) {
        _cleanup_free_ uint8_t *buf = NULL;
        struct ttlv_writer w;
        int r;

        if (!ret || !ret_len)
                return -EINVAL;
        r = check_text(group, KMIP_GROUP_MAX);
        if (r < 0)
                return r;
        if (state < 0 || state > KMIP_STATE_DESTROYED_COMPROMISED)
                return -EINVAL;
        r = request_start(version, OP_LOCATE, &w, &buf);
        if (r < 0)
                return r;
        /* Section 4.9 Locate: Maximum Items, then the Attributes an object must
         * all match. */
        /* One more than we accept: a full answer then proves the group is
         * larger than KMIP_LOCATE_MAX (-ENOBUFS) instead of being cut short
         * silently, which would purge the versions left out. */
        ttlv_put_integer(&w, TAG_MAXIMUM_ITEMS, KMIP_LOCATE_MAX + 1);
        put_attribute_enum(&w, ATTR_OBJECT_TYPE, OBJECT_TYPE_SYMMETRIC_KEY);
        put_attribute_text(&w, ATTR_OBJECT_GROUP, group);
        if (state != 0)
                put_attribute_enum(&w, ATTR_STATE, (uint32_t) state);
        return request_end(&w, &buf, ret, ret_len);
}

int kmip_request_get(const struct kmip_version *version, const char *uid,
                     uint8_t **ret, size_t *ret_len) {
        _cleanup_free_ uint8_t *buf = NULL;
        struct ttlv_writer w;
        int r;

        if (!ret || !ret_len)
                return -EINVAL;
        r = request_start_uid(version, OP_GET, uid, &w, &buf);
        if (r < 0)
                return r;
        /* Section 4.11 Get: ask for the key in Raw format, unwrapped. */
        ttlv_put_enum(&w, TAG_KEY_FORMAT_TYPE, KEY_FORMAT_RAW);
        return request_end(&w, &buf, ret, ret_len);
}

int kmip_request_get_attributes(const struct kmip_version *version, const char *uid,
                                uint8_t **ret, size_t *ret_len) {
        static const char *const names[] = {
                ATTR_UNIQUE_IDENTIFIER, ATTR_OBJECT_TYPE, ATTR_STATE, ATTR_INITIAL_DATE,
                ATTR_ALGORITHM, ATTR_LENGTH, ATTR_NAME,
        };
        _cleanup_free_ uint8_t *buf = NULL;
        struct ttlv_writer w;
        int r;

        if (!ret || !ret_len)
                return -EINVAL;
        /* Section 4.12 Get Attributes: Unique Identifier, Attribute Names. */
        r = request_start_uid(version, OP_GET_ATTRIBUTES, uid, &w, &buf);
        if (r < 0)
                return r;
        for (size_t i = 0; i < ARRAY_SIZE(names); i++)
                ttlv_put_text(&w, TAG_ATTRIBUTE_NAME, names[i], strlen(names[i]));
        return request_end(&w, &buf, ret, ret_len);
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

/* Section 7.1 Response Message: Response Header (Protocol Version, Time Stamp,
 * Batch Count) and, as we send one batch item, exactly one Batch Item
 * (section 6.15: Operation, Result Status, Result Reason, Result Message,
 * Response Payload). Returns the payload of a successful `op`, -EREMOTEIO
 * with err filled for a failed one, -EBADMSG for anything unexpected. */
static int parse_response(const uint8_t *buf, size_t len, uint32_t op,
                          struct ttlv_item *ret_payload, struct kmip_error *err) {
        struct ttlv_item msg, hdr, pv, bi, it;
        struct kmip_version version;
        uint32_t operation = 0, status, reason;
        bool has_operation;
        int32_t batch_count;
        int r;

        if (err)
                *err = (struct kmip_error) {};
        if (!buf)
                return -EINVAL;
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
        r = need_integer(&hdr, TAG_BATCH_COUNT, &batch_count);
        if (r < 0)
                return r;
        if (batch_count != 1)
                return -EBADMSG;
        r = ttlv_count(&msg, TAG_BATCH_ITEM);
        if (r < 0)
                return r;
        if (r != 1)
                return -EBADMSG;
        r = need(&msg, TAG_BATCH_ITEM, TTLV_STRUCTURE, &bi);
        if (r < 0)
                return r;

        /* Operation is in every answer to a batch item that named one, but a
         * server that could not parse the request at all answers without it
         * (PyKMIP does): accept its absence on failure only. */
        r = ttlv_find(&bi, TAG_OPERATION, TTLV_ENUMERATION, &it);
        if (r < 0 && r != -ENOENT)
                return r;
        has_operation = r == 0;
        if (has_operation) {
                r = ttlv_get_enum(&it, &operation);
                if (r < 0)
                        return r;
                if (operation != op)
                        return -EBADMSG;
        }

        r = need_enum(&bi, TAG_RESULT_STATUS, &status);
        if (r < 0)
                return r;
        if (status != KMIP_STATUS_SUCCESS) {
                reason = 0;
                r = ttlv_find(&bi, TAG_RESULT_REASON, TTLV_ENUMERATION, &it);
                if (r == 0)
                        r = ttlv_get_enum(&it, &reason);
                if (r < 0 && r != -ENOENT)
                        return r;
                if (err) {
                        err->result_status = (int32_t) status;
                        err->result_reason = (int32_t) reason;
                        r = ttlv_find(&bi, TAG_RESULT_MESSAGE, TTLV_TEXT_STRING, &it);
                        if (r == 0)
                                copy_message(&it, err->message, sizeof(err->message));
                }
                return -EREMOTEIO;
        }
        if (!has_operation)
                return -EBADMSG;
        return need(&bi, TAG_RESPONSE_PAYLOAD, TTLV_STRUCTURE, ret_payload);
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

int kmip_response_locate(const uint8_t *buf, size_t len, char (*ret)[KMIP_ID_MAX],
                         size_t max, size_t *ret_n, struct kmip_error *err) {
        struct ttlv_item payload, child;
        struct ttlv_iter iter;
        size_t n = 0;
        int r;

        if (!ret_n || (max > 0 && !ret))
                return -EINVAL;
        *ret_n = 0;
        r = parse_response(buf, len, OP_LOCATE, &payload, err);
        if (r < 0)
                return r;

        /* Section 4.9: zero or more Unique Identifiers (1.3 adds Located
         * Items, which is skipped like anything else we do not know). */
        r = ttlv_iter_init(&iter, &payload);
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
        if (r < 0) {
                explicit_bzero(key, AES256_KEY_SIZE);
                if (uid)
                        uid[0] = 0;
        }
        return r;
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

int kmip_response_get_attributes(const uint8_t *buf, size_t len, struct kmip_key_attributes *ret,
                                 struct kmip_error *err) {
        struct ttlv_item payload, it;
        struct ttlv_iter iter;
        unsigned seen = 0;
        int r;

        if (!ret)
                return -EINVAL;
        *ret = (struct kmip_key_attributes) {};
        r = parse_response(buf, len, OP_GET_ATTRIBUTES, &payload, err);
        if (r < 0)
                return r;

        /* Section 4.12 Get Attributes response: Unique Identifier, then the
         * Attributes the object has among those asked for. */
        r = need(&payload, TAG_UNIQUE_IDENTIFIER, TTLV_TEXT_STRING, &it);
        if (r >= 0)
                r = copy_text(&it, ret->uid, sizeof(ret->uid), false);
        if (r >= 0)
                r = ttlv_iter_init(&iter, &payload);
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
