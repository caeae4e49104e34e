/* agent/kmip/message.c: KMIP 1.2 request builders and response parsers. Requests are
 * decoded back with the TTLV decoder; responses are built by hand with the
 * TTLV encoder. Tag and enumeration values are written out here as numbers
 * from KMIP 1.2 section 9.1.3, independently of kmip.c's tables. The same
 * code against a real PyKMIP server: kmip-interop.py. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "message.h"
#include "ttlv.h"

/* KMIP 1.2 section 9.1.3.1 */
#define T_ATTRIBUTE 0x420008
#define T_ATTRIBUTE_NAME 0x42000A
#define T_ATTRIBUTE_VALUE 0x42000B
#define T_BATCH_COUNT 0x42000D
#define T_BATCH_ITEM 0x42000F
#define T_CRYPTO_ALG 0x420028
#define T_CRYPTO_LEN 0x42002A
#define T_KEY 0x42003F
#define T_KEY_BLOCK 0x420040
#define T_KEY_FORMAT_TYPE 0x420042
#define T_KEY_MATERIAL 0x420043
#define T_KEY_VALUE 0x420045
#define T_KEY_WRAPPING_DATA 0x420046
#define T_MAXIMUM_ITEMS 0x42004F
#define T_NAME_TYPE 0x420054
#define T_NAME_VALUE 0x420055
#define T_OBJECT_TYPE 0x420057
#define T_OPERATION 0x42005C
#define T_PROTOCOL_VERSION 0x420069
#define T_PV_MAJOR 0x42006A
#define T_PV_MINOR 0x42006B
#define T_REQUEST_HEADER 0x420077
#define T_REQUEST_MESSAGE 0x420078
#define T_REQUEST_PAYLOAD 0x420079
#define T_RESPONSE_HEADER 0x42007A
#define T_RESPONSE_MESSAGE 0x42007B
#define T_RESPONSE_PAYLOAD 0x42007C
#define T_RESULT_MESSAGE 0x42007D
#define T_RESULT_REASON 0x42007E
#define T_RESULT_STATUS 0x42007F
#define T_SYMMETRIC_KEY 0x42008F
#define T_TIME_STAMP 0x420092
#define T_UNIQUE_IDENTIFIER 0x420094

/* section 9.1.3.2.27 Operation */
#define OP_LOCATE 0x08
#define OP_GET 0x0A
#define OP_GET_ATTRIBUTES 0x0B
#define OP_DISCOVER_VERSIONS 0x1E

#define BUF 8192

/* twice the key size, so a test can send a key that is too long */
static const uint8_t test_key[2 * AES256_KEY_SIZE] = {
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
        0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2, 0xe1, 0xf0,
};

/* ---- request checks --------------------------------------------------- */

/* Decode a request: check the header (version, Batch Count 1), one batch item
 * with operation op; return its payload. */
static void check_request(const uint8_t *req, size_t len, int32_t major, int32_t minor,
                          uint32_t op, struct ttlv_item *payload) {
        struct ttlv_item msg, hdr, pv, bi, it;
        int32_t v;
        uint32_t e;

        assert_int_equal(ttlv_parse(req, len, &msg), 0);
        assert_int_equal(msg.tag, T_REQUEST_MESSAGE);
        assert_int_equal(msg.type, TTLV_STRUCTURE);
        assert_int_equal(ttlv_count(&msg, 0), 2);
        assert_int_equal(ttlv_find(&msg, T_REQUEST_HEADER, TTLV_STRUCTURE, &hdr), 0);
        assert_int_equal(ttlv_find(&hdr, T_PROTOCOL_VERSION, TTLV_STRUCTURE, &pv), 0);
        assert_int_equal(ttlv_find(&pv, T_PV_MAJOR, TTLV_INTEGER, &it), 0);
        assert_int_equal(ttlv_get_integer(&it, &v), 0);
        assert_int_equal(v, major);
        assert_int_equal(ttlv_find(&pv, T_PV_MINOR, TTLV_INTEGER, &it), 0);
        assert_int_equal(ttlv_get_integer(&it, &v), 0);
        assert_int_equal(v, minor);
        assert_int_equal(ttlv_find(&hdr, T_BATCH_COUNT, TTLV_INTEGER, &it), 0);
        assert_int_equal(ttlv_get_integer(&it, &v), 0);
        assert_int_equal(v, 1);
        assert_int_equal(ttlv_count(&msg, T_BATCH_ITEM), 1);
        assert_int_equal(ttlv_find(&msg, T_BATCH_ITEM, TTLV_STRUCTURE, &bi), 0);
        assert_int_equal(ttlv_find(&bi, T_OPERATION, TTLV_ENUMERATION, &it), 0);
        assert_int_equal(ttlv_get_enum(&it, &e), 0);
        assert_int_equal(e, op);
        assert_int_equal(ttlv_find(&bi, T_REQUEST_PAYLOAD, TTLV_STRUCTURE, payload), 0);
}

static void test_kmip_request_discover_versions_fields(void **state) {
        uint8_t *req = NULL;
        size_t len = 0;
        struct ttlv_item payload, it, c;
        struct ttlv_iter iter;
        static const int32_t expect[3][2] = { { 1, 2 }, { 1, 1 }, { 1, 0 } };
        int32_t v;
        int i = 0;

        assert_int_equal(kmip_request_discover_versions(&req, &len), 0);
        check_request(req, len, 1, 2, OP_DISCOVER_VERSIONS, &payload);
        assert_int_equal(ttlv_count(&payload, 0), 3);
        assert_int_equal(ttlv_iter_init(&iter, &payload), 0);
        while (ttlv_iter_next(&iter, &it) > 0) {
                assert_int_equal(it.tag, T_PROTOCOL_VERSION);
                assert_int_equal(ttlv_find(&it, T_PV_MAJOR, TTLV_INTEGER, &c), 0);
                assert_int_equal(ttlv_get_integer(&c, &v), 0);
                assert_int_equal(v, expect[i][0]);
                assert_int_equal(ttlv_find(&it, T_PV_MINOR, TTLV_INTEGER, &c), 0);
                assert_int_equal(ttlv_get_integer(&c, &v), 0);
                assert_int_equal(v, expect[i][1]);
                i++;
        }
        assert_int_equal(i, 3);
        free(req);
}

/* The Attribute structure at `index` among the payload's Attributes. */
static void get_attribute(const struct ttlv_item *payload, int index, const char *name,
                          struct ttlv_item *value) {
        struct ttlv_iter iter;
        struct ttlv_item it, n;
        int i = 0;

        assert_int_equal(ttlv_iter_init(&iter, payload), 0);
        while (ttlv_iter_next(&iter, &it) > 0) {
                if (it.tag != T_ATTRIBUTE)
                        continue;
                if (i++ != index)
                        continue;
                assert_int_equal(it.type, TTLV_STRUCTURE);
                assert_int_equal(ttlv_find(&it, T_ATTRIBUTE_NAME, TTLV_TEXT_STRING, &n), 0);
                assert_true(ttlv_text_equal(&n, name));
                assert_int_equal(ttlv_find(&it, T_ATTRIBUTE_VALUE, 0, value), 0);
                return;
        }
        fail_msg("attribute %d (%s) missing", index, name);
}

static void test_kmip_request_locate_fields(void **state) {
        uint8_t *req = NULL;
        size_t len = 0;
        struct ttlv_item payload, it, first;
        struct kmip_version v11 = { 1, 1 };
        struct ttlv_iter iter;
        int32_t max;
        uint32_t e;

        assert_int_equal(kmip_request_locate(NULL, "cluster-a-kek", KMIP_STATE_ACTIVE, &req, &len), 0);
        check_request(req, len, 1, 2, OP_LOCATE, &payload);
        /* section 4.9: Maximum Items first, then the Attributes */
        assert_int_equal(ttlv_iter_init(&iter, &payload), 0);
        assert_int_equal(ttlv_iter_next(&iter, &first), 1);
        assert_int_equal(first.tag, T_MAXIMUM_ITEMS);
        assert_int_equal(ttlv_get_integer(&first, &max), 0);
        /* one more than accepted, so that a group over the limit is detected */
        assert_int_equal(max, KMIP_LOCATE_MAX + 1);
        assert_int_equal(ttlv_count(&payload, T_ATTRIBUTE), 3);
        get_attribute(&payload, 0, "Object Type", &it);
        assert_int_equal(ttlv_get_enum(&it, &e), 0);
        assert_int_equal(e, 2);                         /* Symmetric Key */
        get_attribute(&payload, 1, "Object Group", &it);
        assert_true(ttlv_text_equal(&it, "cluster-a-kek"));
        get_attribute(&payload, 2, "State", &it);
        assert_int_equal(ttlv_get_enum(&it, &e), 0);
        assert_int_equal(e, 2);                         /* Active */
        free(req);

        /* any state: no State attribute; another 1.x version in the header */
        assert_int_equal(kmip_request_locate(&v11, "g", 0, &req, &len), 0);
        check_request(req, len, 1, 1, OP_LOCATE, &payload);
        assert_int_equal(ttlv_count(&payload, T_ATTRIBUTE), 2);
        get_attribute(&payload, 1, "Object Group", &it);
        assert_true(ttlv_text_equal(&it, "g"));
        free(req);
}

static void test_kmip_request_get_fields(void **state) {
        uint8_t *req = NULL;
        size_t len = 0;
        struct ttlv_item payload, it;
        uint32_t e;

        assert_int_equal(kmip_request_get(NULL, "7f3c-42", &req, &len), 0);
        check_request(req, len, 1, 2, OP_GET, &payload);
        assert_int_equal(ttlv_find(&payload, T_UNIQUE_IDENTIFIER, TTLV_TEXT_STRING, &it), 0);
        assert_true(ttlv_text_equal(&it, "7f3c-42"));
        assert_int_equal(ttlv_find(&payload, T_KEY_FORMAT_TYPE, TTLV_ENUMERATION, &it), 0);
        assert_int_equal(ttlv_get_enum(&it, &e), 0);
        assert_int_equal(e, 1);                         /* Raw */
        free(req);
}

static void test_kmip_request_get_attributes_fields(void **state) {
        static const char *const names[] = {
                "Unique Identifier", "Object Type", "State", "Initial Date",
                "Cryptographic Algorithm", "Cryptographic Length", "Name",
        };
        uint8_t *req = NULL;
        size_t len = 0;
        struct ttlv_item payload, it;
        struct ttlv_iter iter;
        size_t i = 0;

        assert_int_equal(kmip_request_get_attributes(NULL, "42", &req, &len), 0);
        check_request(req, len, 1, 2, OP_GET_ATTRIBUTES, &payload);
        assert_int_equal(ttlv_iter_init(&iter, &payload), 0);
        assert_int_equal(ttlv_iter_next(&iter, &it), 1);
        assert_int_equal(it.tag, T_UNIQUE_IDENTIFIER);
        assert_true(ttlv_text_equal(&it, "42"));
        while (ttlv_iter_next(&iter, &it) > 0) {
                assert_int_equal(it.tag, T_ATTRIBUTE_NAME);
                assert_true(i < sizeof(names) / sizeof(names[0]));
                assert_true(ttlv_text_equal(&it, names[i]));
                i++;
        }
        assert_int_equal(i, sizeof(names) / sizeof(names[0]));
        free(req);
}

static void test_kmip_request_invalid(void **state) {
        uint8_t *req = NULL;
        size_t len = 0;
        char long_id[KMIP_ID_MAX + 1], long_group[KMIP_GROUP_MAX + 2];
        struct kmip_version v20 = { 2, 0 }, v1neg = { 1, -1 };

        memset(long_id, 'x', KMIP_ID_MAX);
        long_id[KMIP_ID_MAX] = 0;
        memset(long_group, 'g', KMIP_GROUP_MAX + 1);
        long_group[KMIP_GROUP_MAX + 1] = 0;

        assert_int_equal(kmip_request_get(NULL, NULL, &req, &len), -EINVAL);
        assert_int_equal(kmip_request_get(NULL, "", &req, &len), -EINVAL);
        assert_int_equal(kmip_request_get(NULL, long_id, &req, &len), -EINVAL);
        long_id[KMIP_ID_MAX - 1] = 0;                   /* 127 characters: fits */
        assert_int_equal(kmip_request_get(NULL, long_id, &req, &len), 0);
        free(req);
        req = NULL;
        assert_int_equal(kmip_request_get(&v20, "1", &req, &len), -EINVAL);
        assert_int_equal(kmip_request_get(&v1neg, "1", &req, &len), -EINVAL);
        assert_int_equal(kmip_request_get(NULL, "1", NULL, &len), -EINVAL);
        assert_int_equal(kmip_request_get_attributes(NULL, "", &req, &len), -EINVAL);
        assert_int_equal(kmip_request_get_attributes(&v20, "1", &req, &len), -EINVAL);
        assert_int_equal(kmip_request_locate(NULL, NULL, 0, &req, &len), -EINVAL);
        assert_int_equal(kmip_request_locate(NULL, "", 0, &req, &len), -EINVAL);
        assert_int_equal(kmip_request_locate(NULL, long_group, 0, &req, &len), -EINVAL);
        assert_int_equal(kmip_request_locate(NULL, "g", 7, &req, &len), -EINVAL);
        assert_int_equal(kmip_request_locate(NULL, "g", -1, &req, &len), -EINVAL);
        assert_int_equal(kmip_request_discover_versions(NULL, &len), -EINVAL);
        assert_null(req);
        long_group[KMIP_GROUP_MAX] = 0;
        assert_int_equal(kmip_request_locate(NULL, long_group, 0, &req, &len), 0);
        free(req);
}

static void test_kmip_message_length_header(void **state) {
        uint8_t h[8] = { 0x42, 0x00, 0x7B, 0x01, 0x00, 0x00, 0x01, 0x00 };

        assert_int_equal(kmip_message_length(h), 8 + 256);
        h[3] = TTLV_TEXT_STRING;
        assert_int_equal(kmip_message_length(h), -EBADMSG);
        h[3] = TTLV_STRUCTURE;
        h[7] = 0x04;                                    /* not a multiple of 8 */
        assert_int_equal(kmip_message_length(h), -EBADMSG);
        h[4] = 0x00, h[5] = 0x0F, h[6] = 0xFF, h[7] = 0xF8;   /* exactly KMIP_MESSAGE_MAX */
        assert_int_equal(kmip_message_length(h), KMIP_MESSAGE_MAX);
        h[5] = 0x10, h[6] = 0x00, h[7] = 0x00;               /* 8 bytes more */
        assert_int_equal(kmip_message_length(h), -EBADMSG);
        h[4] = 0xFF;
        assert_int_equal(kmip_message_length(h), -EBADMSG);
        memcpy(h, "HTTP/1.1", 8);
        assert_int_equal(kmip_message_length(h), -EBADMSG);
}

/* ---- response builders ------------------------------------------------ */

struct resp_opts {
        int32_t major, minor;
        int32_t batch_count;
        int batch_items;            /* how many Batch Items to write */
        bool no_operation;
        bool no_payload;
        uint32_t outer_tag;
};

static const struct resp_opts normal = { 1, 2, 1, 1, false, false, T_RESPONSE_MESSAGE };

/* Open Response Message / header / Batch Item / (status) / Response Payload. */
static void resp_begin_opts(struct ttlv_writer *w, uint8_t *b, uint32_t op, const struct resp_opts *o) {
        ttlv_writer_init(w, b, BUF);
        ttlv_begin(w, o->outer_tag);
        ttlv_begin(w, T_RESPONSE_HEADER);
        ttlv_begin(w, T_PROTOCOL_VERSION);
        ttlv_put_integer(w, T_PV_MAJOR, o->major);
        ttlv_put_integer(w, T_PV_MINOR, o->minor);
        ttlv_end(w);
        ttlv_put_datetime(w, T_TIME_STAMP, 1700000000);
        ttlv_put_integer(w, T_BATCH_COUNT, o->batch_count);
        ttlv_end(w);
        for (int i = 1; i < o->batch_items; i++) {
                ttlv_begin(w, T_BATCH_ITEM);
                ttlv_put_enum(w, T_OPERATION, op);
                ttlv_put_enum(w, T_RESULT_STATUS, 0);
                ttlv_begin(w, T_RESPONSE_PAYLOAD);
                ttlv_end(w);
                ttlv_end(w);
        }
        ttlv_begin(w, T_BATCH_ITEM);
        if (!o->no_operation)
                ttlv_put_enum(w, T_OPERATION, op);
        ttlv_put_enum(w, T_RESULT_STATUS, 0);
        if (!o->no_payload)
                ttlv_begin(w, T_RESPONSE_PAYLOAD);
}

static void resp_begin(struct ttlv_writer *w, uint8_t *b, uint32_t op) {
        resp_begin_opts(w, b, op, &normal);
}

static size_t resp_end_opts(struct ttlv_writer *w, const struct resp_opts *o) {
        size_t n;

        if (!o->no_payload)
                ttlv_end(w);
        ttlv_end(w);
        ttlv_end(w);
        assert_int_equal(ttlv_writer_finish(w, &n), 0);
        return n;
}

static size_t resp_end(struct ttlv_writer *w) {
        return resp_end_opts(w, &normal);
}

/* Open a KMIP 1.2 Response Message and write its header. */
static void resp_header(struct ttlv_writer *w, uint8_t *b, int32_t batch_count) {
        ttlv_writer_init(w, b, BUF);
        ttlv_begin(w, T_RESPONSE_MESSAGE);
        ttlv_begin(w, T_RESPONSE_HEADER);
        ttlv_begin(w, T_PROTOCOL_VERSION);
        ttlv_put_integer(w, T_PV_MAJOR, 1);
        ttlv_put_integer(w, T_PV_MINOR, 2);
        ttlv_end(w);
        ttlv_put_datetime(w, T_TIME_STAMP, 1700000000);
        ttlv_put_integer(w, T_BATCH_COUNT, batch_count);
        ttlv_end(w);
}

/* A failed batch item: Result Status, Reason, Message (section 6.9-6.11). */
static size_t resp_failure(uint8_t *b, uint32_t op, bool with_operation, uint32_t status,
                           uint32_t reason, const char *message, size_t message_len) {
        struct ttlv_writer w;
        size_t n;

        resp_header(&w, b, 1);
        ttlv_begin(&w, T_BATCH_ITEM);
        if (with_operation)
                ttlv_put_enum(&w, T_OPERATION, op);
        ttlv_put_enum(&w, T_RESULT_STATUS, status);
        ttlv_put_enum(&w, T_RESULT_REASON, reason);
        if (message)
                ttlv_put_text(&w, T_RESULT_MESSAGE, message, message_len);
        ttlv_end(&w);
        ttlv_end(&w);
        assert_int_equal(ttlv_writer_finish(&w, &n), 0);
        return n;
}

/* Run every parser on a message for op `op`; return the result of the one
 * that matches op, and check the others all refuse it (-EBADMSG as the
 * operation differs, unless the message failed before naming one). */
static int parse_as(uint32_t op, const uint8_t *b, size_t n, struct kmip_error *err) {
        struct kmip_version versions[4];
        char uids[4][KMIP_ID_MAX], uid[KMIP_ID_MAX];
        uint8_t key[AES256_KEY_SIZE];
        struct kmip_key_attributes attr;
        size_t count;

        switch (op) {
        case OP_DISCOVER_VERSIONS:
                return kmip_response_discover_versions(b, n, versions, 4, &count, err);
        case OP_LOCATE:
                return kmip_response_locate(b, n, uids, 4, &count, err);
        case OP_GET:
                return kmip_response_get_symmetric_key(b, n, uid, key, err);
        case OP_GET_ATTRIBUTES:
                return kmip_response_get_attributes(b, n, &attr, err);
        }
        fail();
        return 0;
}

static const uint32_t all_ops[] = { OP_DISCOVER_VERSIONS, OP_LOCATE, OP_GET, OP_GET_ATTRIBUTES };

static void test_kmip_response_failure_each_operation(void **state) {
        uint8_t *b = malloc(BUF);
        struct kmip_error err;
        size_t n;

        assert_non_null(b);
        for (size_t i = 0; i < 4; i++) {
                uint32_t op = all_ops[i];

                n = resp_failure(b, op, true, 1, 1, "no such object\n\x01\xff", 17);
                memset(&err, 0x55, sizeof(err));
                assert_int_equal(parse_as(op, b, n, &err), -EREMOTEIO);
                assert_int_equal(err.result_status, 1);
                assert_int_equal(err.result_reason, KMIP_REASON_ITEM_NOT_FOUND);
                assert_string_equal(err.message, "no such object???");
                assert_string_equal(kmip_result_reason_to_string(err.result_reason), "Item Not Found");

                /* the other parsers see an operation they did not ask for */
                for (size_t j = 0; j < 4; j++)
                        if (j != i)
                                assert_int_equal(parse_as(all_ops[j], b, n, &err), -EBADMSG);

                /* PyKMIP answers a request it could not parse without an
                 * Operation: a failure all the same */
                n = resp_failure(b, op, false, 1, 4, "Invalid Message", 15);
                assert_int_equal(parse_as(op, b, n, &err), -EREMOTEIO);
                assert_int_equal(err.result_reason, KMIP_REASON_INVALID_MESSAGE);
                assert_string_equal(err.message, "Invalid Message");

                /* err is optional; a long message is cut; pending is a failure too */
                char longmsg[600];
                memset(longmsg, 'm', sizeof(longmsg));
                n = resp_failure(b, op, true, 2, 0x0C, longmsg, sizeof(longmsg));
                assert_int_equal(parse_as(op, b, n, NULL), -EREMOTEIO);
                assert_int_equal(parse_as(op, b, n, &err), -EREMOTEIO);
                assert_int_equal(err.result_status, 2);
                assert_string_equal(kmip_result_reason_to_string(err.result_reason), "Permission Denied");
                assert_int_equal(strlen(err.message), sizeof(err.message) - 1);

                /* no Result Message at all */
                n = resp_failure(b, op, true, 1, 0x100, NULL, 0);
                assert_int_equal(parse_as(op, b, n, &err), -EREMOTEIO);
                assert_string_equal(err.message, "");
        }
        assert_string_equal(kmip_result_reason_to_string(0x4242), "reason 16962");
        free(b);
}

static void test_kmip_response_header_malformed(void **state) {
        uint8_t *b = malloc(BUF);
        struct ttlv_writer w;
        struct kmip_version versions[4];
        size_t n, count;
        struct resp_opts o;

        assert_non_null(b);

        /* Batch Count 2 */
        o = normal;
        o.batch_count = 2;
        resp_begin_opts(&w, b, OP_DISCOVER_VERSIONS, &o);
        n = resp_end_opts(&w, &o);
        assert_int_equal(kmip_response_discover_versions(b, n, versions, 4, &count, NULL), -EBADMSG);

        /* two Batch Items */
        o = normal;
        o.batch_items = 2;
        resp_begin_opts(&w, b, OP_DISCOVER_VERSIONS, &o);
        n = resp_end_opts(&w, &o);
        assert_int_equal(kmip_response_discover_versions(b, n, versions, 4, &count, NULL), -EBADMSG);

        /* zero Batch Items */
        o = normal;
        o.batch_items = 0;
        resp_begin_opts(&w, b, OP_DISCOVER_VERSIONS, &o);
        n = resp_end_opts(&w, &o);
        /* (batch_items 0 still writes the last item: drop it by hand) */
        {
                struct ttlv_writer w2;
                ttlv_writer_init(&w2, b, BUF);
                ttlv_begin(&w2, T_RESPONSE_MESSAGE);
                ttlv_begin(&w2, T_RESPONSE_HEADER);
                ttlv_begin(&w2, T_PROTOCOL_VERSION);
                ttlv_put_integer(&w2, T_PV_MAJOR, 1);
                ttlv_put_integer(&w2, T_PV_MINOR, 2);
                ttlv_end(&w2);
                ttlv_put_integer(&w2, T_BATCH_COUNT, 1);
                ttlv_end(&w2);
                ttlv_end(&w2);
                assert_int_equal(ttlv_writer_finish(&w2, &n), 0);
        }
        assert_int_equal(kmip_response_discover_versions(b, n, versions, 4, &count, NULL), -EBADMSG);

        /* protocol major 2 */
        o = normal;
        o.major = 2;
        resp_begin_opts(&w, b, OP_DISCOVER_VERSIONS, &o);
        n = resp_end_opts(&w, &o);
        assert_int_equal(kmip_response_discover_versions(b, n, versions, 4, &count, NULL), -EBADMSG);

        /* a Request Message, not a Response Message */
        o = normal;
        o.outer_tag = T_REQUEST_MESSAGE;
        resp_begin_opts(&w, b, OP_DISCOVER_VERSIONS, &o);
        n = resp_end_opts(&w, &o);
        assert_int_equal(kmip_response_discover_versions(b, n, versions, 4, &count, NULL), -EBADMSG);

        /* success without Operation */
        o = normal;
        o.no_operation = true;
        resp_begin_opts(&w, b, OP_DISCOVER_VERSIONS, &o);
        n = resp_end_opts(&w, &o);
        assert_int_equal(kmip_response_discover_versions(b, n, versions, 4, &count, NULL), -EBADMSG);

        /* success without Response Payload */
        o = normal;
        o.no_payload = true;
        resp_begin_opts(&w, b, OP_DISCOVER_VERSIONS, &o);
        n = resp_end_opts(&w, &o);
        assert_int_equal(kmip_response_discover_versions(b, n, versions, 4, &count, NULL), -EBADMSG);

        /* the well-formed one parses, and trailing bytes do not */
        resp_begin(&w, b, OP_DISCOVER_VERSIONS);
        n = resp_end(&w);
        assert_int_equal(kmip_response_discover_versions(b, n, versions, 4, &count, NULL), 0);
        assert_int_equal(count, 0);
        memset(b + n, 0, 8);
        assert_int_equal(kmip_response_discover_versions(b, n + 8, versions, 4, &count, NULL), -EBADMSG);
        /* and neither does any truncation */
        for (size_t k = 0; k < n; k++)
                assert_int_equal(kmip_response_discover_versions(b, k, versions, 4, &count, NULL), -EBADMSG);
        assert_int_equal(kmip_response_discover_versions(NULL, 0, versions, 4, &count, NULL), -EINVAL);
        free(b);
}

static void put_version(struct ttlv_writer *w, int32_t major, int32_t minor) {
        ttlv_begin(w, T_PROTOCOL_VERSION);
        ttlv_put_integer(w, T_PV_MAJOR, major);
        ttlv_put_integer(w, T_PV_MINOR, minor);
        ttlv_end(w);
}

static void test_kmip_response_discover_versions_success(void **state) {
        uint8_t *b = malloc(BUF);
        struct ttlv_writer w;
        struct kmip_version v[KMIP_VERSIONS_MAX];
        struct kmip_error err;
        size_t n, count;

        assert_non_null(b);
        resp_begin(&w, b, OP_DISCOVER_VERSIONS);
        put_version(&w, 1, 2);
        put_version(&w, 1, 1);
        n = resp_end(&w);
        assert_int_equal(kmip_response_discover_versions(b, n, v, KMIP_VERSIONS_MAX, &count, &err), 0);
        assert_int_equal(count, 2);
        assert_int_equal(v[0].major, 1);
        assert_int_equal(v[0].minor, 2);
        assert_int_equal(v[1].minor, 1);
        assert_int_equal(err.result_status, 0);

        /* more than max: refused, not truncated */
        assert_int_equal(kmip_response_discover_versions(b, n, v, 1, &count, &err), -ENOBUFS);
        assert_int_equal(count, 0);

        /* a Protocol Version missing its minor */
        resp_begin(&w, b, OP_DISCOVER_VERSIONS);
        ttlv_begin(&w, T_PROTOCOL_VERSION);
        ttlv_put_integer(&w, T_PV_MAJOR, 1);
        ttlv_end(&w);
        n = resp_end(&w);
        assert_int_equal(kmip_response_discover_versions(b, n, v, KMIP_VERSIONS_MAX, &count, &err), -EBADMSG);
        free(b);
}

static void test_kmip_response_locate_success(void **state) {
        uint8_t *b = malloc(BUF);
        struct ttlv_writer w;
        char (*ids)[KMIP_ID_MAX] = calloc(KMIP_LOCATE_MAX + 1, KMIP_ID_MAX);
        size_t n, count;

        assert_non_null(b);
        assert_non_null(ids);
        resp_begin(&w, b, OP_LOCATE);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "3", 1);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "1", 1);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "a-much-longer-identifier", 24);
        n = resp_end(&w);
        assert_int_equal(kmip_response_locate(b, n, ids, KMIP_LOCATE_MAX, &count, NULL), 0);
        assert_int_equal(count, 3);
        assert_string_equal(ids[0], "3");
        assert_string_equal(ids[1], "1");
        assert_string_equal(ids[2], "a-much-longer-identifier");

        /* more items than max */
        assert_int_equal(kmip_response_locate(b, n, ids, 2, &count, NULL), -ENOBUFS);
        assert_int_equal(count, 0);
        assert_int_equal(kmip_response_locate(b, n, ids, 3, &count, NULL), 0);

        /* nothing found */
        resp_begin(&w, b, OP_LOCATE);
        n = resp_end(&w);
        assert_int_equal(kmip_response_locate(b, n, ids, KMIP_LOCATE_MAX, &count, NULL), 0);
        assert_int_equal(count, 0);

        /* a server ignoring Maximum Items (needs a bigger buffer) */
        free(b);
        b = malloc(64 * 1024);
        assert_non_null(b);
        ttlv_writer_init(&w, b, 64 * 1024);
        ttlv_begin(&w, T_RESPONSE_MESSAGE);
        ttlv_begin(&w, T_RESPONSE_HEADER);
        put_version(&w, 1, 2);
        ttlv_put_integer(&w, T_BATCH_COUNT, 1);
        ttlv_end(&w);
        ttlv_begin(&w, T_BATCH_ITEM);
        ttlv_put_enum(&w, T_OPERATION, OP_LOCATE);
        ttlv_put_enum(&w, T_RESULT_STATUS, 0);
        ttlv_begin(&w, T_RESPONSE_PAYLOAD);
        for (int i = 0; i < KMIP_LOCATE_MAX + 1; i++) {
                char id[16];
                int l = snprintf(id, sizeof(id), "%d", i);
                ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, id, (size_t) l);
        }
        n = resp_end(&w);
        assert_int_equal(kmip_response_locate(b, n, ids, KMIP_LOCATE_MAX + 1, &count, NULL), 0);
        assert_int_equal(count, KMIP_LOCATE_MAX + 1);
        assert_int_equal(kmip_response_locate(b, n, ids, KMIP_LOCATE_MAX, &count, NULL), -ENOBUFS);
        free(b);
        free(ids);
}

static void test_kmip_response_locate_bad_identifier(void **state) {
        uint8_t *b = malloc(BUF);
        struct ttlv_writer w;
        char ids[4][KMIP_ID_MAX], longid[KMIP_ID_MAX];
        size_t n, count;

        assert_non_null(b);
        /* NUL inside */
        resp_begin(&w, b, OP_LOCATE);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "ab\0c", 4);
        n = resp_end(&w);
        assert_int_equal(kmip_response_locate(b, n, ids, 4, &count, NULL), -EBADMSG);

        /* KMIP_ID_MAX characters: no room for the NUL */
        memset(longid, 'u', sizeof(longid));
        resp_begin(&w, b, OP_LOCATE);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, longid, sizeof(longid));
        n = resp_end(&w);
        assert_int_equal(kmip_response_locate(b, n, ids, 4, &count, NULL), -EBADMSG);
        resp_begin(&w, b, OP_LOCATE);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, longid, sizeof(longid) - 1);
        n = resp_end(&w);
        assert_int_equal(kmip_response_locate(b, n, ids, 4, &count, NULL), 0);
        assert_int_equal(strlen(ids[0]), KMIP_ID_MAX - 1);

        /* empty, or a Byte String */
        resp_begin(&w, b, OP_LOCATE);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "", 0);
        n = resp_end(&w);
        assert_int_equal(kmip_response_locate(b, n, ids, 4, &count, NULL), -EBADMSG);
        resp_begin(&w, b, OP_LOCATE);
        ttlv_put_bytes(&w, T_UNIQUE_IDENTIFIER, (const uint8_t *) "1", 1);
        n = resp_end(&w);
        assert_int_equal(kmip_response_locate(b, n, ids, 4, &count, NULL), -EBADMSG);
        free(b);
}

/* ---- Get -------------------------------------------------------------- */

struct key_opts {
        uint32_t object_type;       /* 2 symmetric key */
        uint32_t format;            /* 1 raw, 7 transparent symmetric */
        uint32_t algorithm;         /* 3 AES */
        int32_t length;             /* 256 */
        size_t key_len;             /* 32 */
        bool wrapped;               /* add Key Wrapping Data */
        bool key_value_bytes;       /* Key Value as a Byte String (wrapped form) */
        bool no_algorithm;
        uint32_t object_tag;        /* 0x42008F */
};

static const struct key_opts good_key = { 2, 1, 3, 256, 32, false, false, false, T_SYMMETRIC_KEY };

static size_t build_get(uint8_t *b, const struct key_opts *k) {
        struct ttlv_writer w;

        resp_begin(&w, b, OP_GET);
        ttlv_put_enum(&w, T_OBJECT_TYPE, k->object_type);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "17", 2);
        ttlv_begin(&w, k->object_tag);
        ttlv_begin(&w, T_KEY_BLOCK);
        ttlv_put_enum(&w, T_KEY_FORMAT_TYPE, k->format);
        if (k->key_value_bytes) {
                ttlv_put_bytes(&w, T_KEY_VALUE, test_key, k->key_len);
        } else {
                ttlv_begin(&w, T_KEY_VALUE);
                if (k->format == 7) {
                        ttlv_begin(&w, T_KEY_MATERIAL);
                        ttlv_put_bytes(&w, T_KEY, test_key, k->key_len);
                        ttlv_end(&w);
                } else
                        ttlv_put_bytes(&w, T_KEY_MATERIAL, test_key, k->key_len);
                ttlv_end(&w);
        }
        if (!k->no_algorithm)
                ttlv_put_enum(&w, T_CRYPTO_ALG, k->algorithm);
        ttlv_put_integer(&w, T_CRYPTO_LEN, k->length);
        if (k->wrapped) {
                ttlv_begin(&w, T_KEY_WRAPPING_DATA);
                ttlv_put_enum(&w, 0x42009E, 1);         /* Wrapping Method: Encrypt */
                ttlv_end(&w);
        }
        ttlv_end(&w);
        ttlv_end(&w);
        return resp_end(&w);
}

static void test_kmip_response_get_symmetric_key_raw(void **state) {
        uint8_t *b = malloc(BUF);
        uint8_t key[AES256_KEY_SIZE];
        char uid[KMIP_ID_MAX];
        struct kmip_error err;
        size_t n;

        assert_non_null(b);
        n = build_get(b, &good_key);
        assert_int_equal(kmip_response_get_symmetric_key(b, n, uid, key, &err), 0);
        assert_memory_equal(key, test_key, AES256_KEY_SIZE);
        assert_string_equal(uid, "17");
        assert_int_equal(kmip_response_get_symmetric_key(b, n, NULL, key, NULL), 0);
        explicit_bzero(key, sizeof(key));
        explicit_bzero(b, n);
        free(b);
}

static void test_kmip_response_get_symmetric_key_transparent(void **state) {
        uint8_t *b = malloc(BUF);
        uint8_t key[AES256_KEY_SIZE];
        char uid[KMIP_ID_MAX];
        struct key_opts k = good_key;
        size_t n;

        assert_non_null(b);
        k.format = 7;
        n = build_get(b, &k);
        assert_int_equal(kmip_response_get_symmetric_key(b, n, uid, key, NULL), 0);
        assert_memory_equal(key, test_key, AES256_KEY_SIZE);
        explicit_bzero(key, sizeof(key));
        explicit_bzero(b, n);
        free(b);
}

static void check_get_refused(const struct key_opts *k) {
        uint8_t *b = malloc(BUF);
        uint8_t key[AES256_KEY_SIZE];
        static const uint8_t zero[AES256_KEY_SIZE];
        char uid[KMIP_ID_MAX];
        size_t n;

        assert_non_null(b);
        n = build_get(b, k);
        memset(key, 0xAA, sizeof(key));
        memset(uid, 'x', sizeof(uid));
        assert_int_equal(kmip_response_get_symmetric_key(b, n, uid, key, NULL), -EBADMSG);
        assert_memory_equal(key, zero, AES256_KEY_SIZE);  /* wiped */
        assert_string_equal(uid, "");
        explicit_bzero(b, n);
        free(b);
}

static void test_kmip_response_get_symmetric_key_wrong(void **state) {
        struct key_opts k;

        k = good_key, k.algorithm = 2;                  /* 3DES */
        check_get_refused(&k);
        k = good_key, k.no_algorithm = true;
        check_get_refused(&k);
        k = good_key, k.length = 128;                   /* AES-128 ... */
        check_get_refused(&k);
        k = good_key, k.length = 128, k.key_len = 16;   /* ... whole */
        check_get_refused(&k);
        k = good_key, k.key_len = 16;                   /* claims 256, holds 128 */
        check_get_refused(&k);
        k = good_key, k.key_len = 33;
        check_get_refused(&k);
        k = good_key, k.format = 2;                     /* Opaque */
        check_get_refused(&k);
        k = good_key, k.format = 4;                     /* PKCS#8 */
        check_get_refused(&k);
        k = good_key, k.object_type = 7;                /* Secret Data */
        check_get_refused(&k);
        k = good_key, k.object_tag = 0x420085;          /* Secret Data structure */
        check_get_refused(&k);
        k = good_key, k.wrapped = true;
        check_get_refused(&k);
        k = good_key, k.key_value_bytes = true;
        check_get_refused(&k);
        k = good_key, k.format = 7, k.key_len = 31;
        check_get_refused(&k);
}

/* ---- GetAttributes ---------------------------------------------------- */

static void put_attr_begin(struct ttlv_writer *w, const char *name) {
        ttlv_begin(w, T_ATTRIBUTE);
        ttlv_put_text(w, T_ATTRIBUTE_NAME, name, strlen(name));
}

static void put_attr_enum(struct ttlv_writer *w, const char *name, uint32_t v) {
        put_attr_begin(w, name);
        ttlv_put_enum(w, T_ATTRIBUTE_VALUE, v);
        ttlv_end(w);
}

static void put_attr_text(struct ttlv_writer *w, const char *name, const char *v) {
        put_attr_begin(w, name);
        ttlv_put_text(w, T_ATTRIBUTE_VALUE, v, strlen(v));
        ttlv_end(w);
}

static void put_attr_name(struct ttlv_writer *w, const char *v, size_t len) {
        put_attr_begin(w, "Name");
        ttlv_begin(w, T_ATTRIBUTE_VALUE);
        ttlv_put_text(w, T_NAME_VALUE, v, len);
        ttlv_put_enum(w, T_NAME_TYPE, 1);               /* Uninterpreted Text String */
        ttlv_end(w);
        ttlv_end(w);
}

/* What PyKMIP 0.10 answers, in its order, plus attributes we did not ask for. */
static void put_pykmip_attributes(struct ttlv_writer *w, const char *uid) {
        ttlv_put_text(w, T_UNIQUE_IDENTIFIER, uid, strlen(uid));
        put_attr_text(w, "Unique Identifier", uid);
        put_attr_name(w, "kek-v1", 6);
        put_attr_name(w, "second-name", 11);
        put_attr_enum(w, "Object Type", 2);
        put_attr_enum(w, "Cryptographic Algorithm", 3);
        put_attr_begin(w, "Cryptographic Length");
        ttlv_put_integer(w, T_ATTRIBUTE_VALUE, 256);
        ttlv_end(w);
        put_attr_text(w, "Operation Policy Name", "shared");
        put_attr_begin(w, "Cryptographic Usage Mask");
        ttlv_put_integer(w, T_ATTRIBUTE_VALUE, 12);
        ttlv_end(w);
        put_attr_enum(w, "State", 1);
        put_attr_begin(w, "Initial Date");
        ttlv_put_datetime(w, T_ATTRIBUTE_VALUE, 1700000123);
        ttlv_end(w);
}

static void test_kmip_response_get_attributes_success(void **state) {
        uint8_t *b = malloc(BUF);
        struct ttlv_writer w;
        struct kmip_key_attributes a;
        size_t n;

        assert_non_null(b);
        resp_begin(&w, b, OP_GET_ATTRIBUTES);
        put_pykmip_attributes(&w, "5");
        n = resp_end(&w);
        assert_int_equal(kmip_response_get_attributes(b, n, &a, NULL), 0);
        assert_string_equal(a.uid, "5");
        assert_int_equal(a.object_type, 2);
        assert_int_equal(a.state, KMIP_STATE_PRE_ACTIVE);
        assert_int_equal(a.initial_date, 1700000123);
        assert_int_equal(a.algorithm, 3);
        assert_int_equal(a.length, 256);
        assert_string_equal(a.name, "kek-v1");
        assert_string_equal(kmip_state_to_string(a.state), "Pre-Active");

        /* only the Unique Identifier: the rest stays empty */
        resp_begin(&w, b, OP_GET_ATTRIBUTES);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "9", 1);
        n = resp_end(&w);
        memset(&a, 0x5a, sizeof(a));
        assert_int_equal(kmip_response_get_attributes(b, n, &a, NULL), 0);
        assert_string_equal(a.uid, "9");
        assert_int_equal(a.state, 0);
        assert_int_equal(a.initial_date, 0);
        assert_string_equal(a.name, "");
        free(b);
}

static void test_kmip_response_get_attributes_malformed(void **state) {
        uint8_t *b = malloc(BUF);
        struct ttlv_writer w;
        struct kmip_key_attributes a;
        char longname[300];
        size_t n;

        assert_non_null(b);
        /* duplicated State */
        resp_begin(&w, b, OP_GET_ATTRIBUTES);
        put_pykmip_attributes(&w, "5");
        put_attr_enum(&w, "State", 2);
        n = resp_end(&w);
        assert_int_equal(kmip_response_get_attributes(b, n, &a, NULL), -EBADMSG);
        assert_string_equal(a.uid, "");                 /* nothing half-filled */

        /* State as an Integer */
        resp_begin(&w, b, OP_GET_ATTRIBUTES);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "5", 1);
        put_attr_begin(&w, "State");
        ttlv_put_integer(&w, T_ATTRIBUTE_VALUE, 2);
        ttlv_end(&w);
        n = resp_end(&w);
        assert_int_equal(kmip_response_get_attributes(b, n, &a, NULL), -EBADMSG);

        /* Unique Identifier attribute naming another object */
        resp_begin(&w, b, OP_GET_ATTRIBUTES);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "5", 1);
        put_attr_text(&w, "Unique Identifier", "6");
        n = resp_end(&w);
        assert_int_equal(kmip_response_get_attributes(b, n, &a, NULL), -EBADMSG);

        /* no Unique Identifier in the payload */
        resp_begin(&w, b, OP_GET_ATTRIBUTES);
        put_attr_enum(&w, "State", 2);
        n = resp_end(&w);
        assert_int_equal(kmip_response_get_attributes(b, n, &a, NULL), -EBADMSG);

        /* Name longer than the field, Name as text, Name with NUL */
        memset(longname, 'n', sizeof(longname));
        resp_begin(&w, b, OP_GET_ATTRIBUTES);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "5", 1);
        put_attr_name(&w, longname, sizeof(longname));
        n = resp_end(&w);
        assert_int_equal(kmip_response_get_attributes(b, n, &a, NULL), -EBADMSG);
        resp_begin(&w, b, OP_GET_ATTRIBUTES);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "5", 1);
        put_attr_text(&w, "Name", "plain");
        n = resp_end(&w);
        assert_int_equal(kmip_response_get_attributes(b, n, &a, NULL), -EBADMSG);
        resp_begin(&w, b, OP_GET_ATTRIBUTES);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "5", 1);
        put_attr_name(&w, "a\0b", 3);
        n = resp_end(&w);
        assert_int_equal(kmip_response_get_attributes(b, n, &a, NULL), -EBADMSG);

        /* Attribute without a value */
        resp_begin(&w, b, OP_GET_ATTRIBUTES);
        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "5", 1);
        put_attr_begin(&w, "State");
        ttlv_end(&w);
        n = resp_end(&w);
        assert_int_equal(kmip_response_get_attributes(b, n, &a, NULL), -EBADMSG);
        free(b);
}

/* ---- batches ---------------------------------------------------------- */

#define T_BATCH_ERROR_CONT 0x42000E
#define T_UNIQUE_BATCH_ITEM_ID 0x420093

static void test_kmip_request_batch_fields(void **state) {
        const struct kmip_batch_op ops[] = {
                { .operation = OP_LOCATE, .arg = "grp" },
                { .operation = OP_GET_ATTRIBUTES, .arg = "1" },
                { .operation = OP_GET, .arg = "2" },
        };
        struct ttlv_item msg, hdr, bi, it, payload;
        struct ttlv_iter iter;
        uint8_t *req = NULL, *one = NULL;
        size_t len, one_len, k = 0;
        const uint8_t *id;
        size_t id_len;
        int32_t v;
        uint32_t e;

        assert_int_equal(kmip_request_batch(NULL, ops, 3, &req, &len), 0);
        assert_int_equal(ttlv_parse(req, len, &msg), 0);
        assert_int_equal(ttlv_find(&msg, T_REQUEST_HEADER, TTLV_STRUCTURE, &hdr), 0);
        assert_int_equal(ttlv_find(&hdr, T_BATCH_COUNT, TTLV_INTEGER, &it), 0);
        assert_int_equal(ttlv_get_integer(&it, &v), 0);
        assert_int_equal(v, 3);
        /* section 9.1.3.2.30: Continue = 1 */
        assert_int_equal(ttlv_find(&hdr, T_BATCH_ERROR_CONT, TTLV_ENUMERATION, &it), 0);
        assert_int_equal(ttlv_get_enum(&it, &e), 0);
        assert_int_equal(e, 1);
        assert_int_equal(ttlv_count(&msg, T_BATCH_ITEM), 3);
        assert_int_equal(ttlv_iter_init(&iter, &msg), 0);
        while (ttlv_iter_next(&iter, &bi) > 0) {
                if (bi.tag != T_BATCH_ITEM)
                        continue;
                assert_int_equal(ttlv_find(&bi, T_OPERATION, TTLV_ENUMERATION, &it), 0);
                assert_int_equal(ttlv_get_enum(&it, &e), 0);
                assert_int_equal(e, (uint32_t) ops[k].operation);
                /* distinct IDs: the index, 4 bytes big endian */
                assert_int_equal(ttlv_find(&bi, T_UNIQUE_BATCH_ITEM_ID, TTLV_BYTE_STRING, &it), 0);
                assert_int_equal(ttlv_get_bytes(&it, &id, &id_len), 0);
                assert_int_equal(id_len, 4);
                assert_int_equal(id[0] | id[1] | id[2], 0);
                assert_int_equal(id[3], k);
                assert_int_equal(ttlv_find(&bi, T_REQUEST_PAYLOAD, TTLV_STRUCTURE, &payload), 0);
                assert_int_equal(ttlv_find(&payload, k == 0 ? T_ATTRIBUTE : T_UNIQUE_IDENTIFIER, 0, &it), 0);
                k++;
        }
        assert_int_equal(k, 3);
        free(req);

        /* a batch of one is the one-item request: no ID, no option */
        assert_int_equal(kmip_request_batch(NULL, &ops[2], 1, &req, &len), 0);
        assert_int_equal(kmip_request_get(NULL, "2", &one, &one_len), 0);
        assert_int_equal(len, one_len);
        assert_memory_equal(req, one, len);
        check_request(req, len, 1, 2, OP_GET, &payload);
        assert_int_equal(ttlv_parse(req, len, &msg), 0);
        assert_int_equal(ttlv_find(&msg, T_REQUEST_HEADER, TTLV_STRUCTURE, &hdr), 0);
        assert_int_equal(ttlv_find(&hdr, T_BATCH_ERROR_CONT, 0, NULL), -ENOENT);
        free(req);
        free(one);
}

static void test_kmip_request_batch_bounds(void **state) {
        struct kmip_batch_op *ops = calloc(KMIP_BATCH_MAX + 1, sizeof(*ops));
        char uid[KMIP_ID_MAX], group[KMIP_GROUP_MAX + 1];
        struct ttlv_item msg;
        uint8_t *req = NULL;
        size_t len;

        assert_non_null(ops);
        memset(uid, 'u', sizeof(uid) - 1);
        uid[sizeof(uid) - 1] = 0;
        memset(group, 'g', sizeof(group) - 1);
        group[sizeof(group) - 1] = 0;
        /* the largest batch we send: a Locate and KMIP_BATCH_MAX - 1
         * GetAttributes, every argument as long as allowed */
        ops[0] = (struct kmip_batch_op) { .operation = OP_LOCATE, .arg = group, .state = 6 };
        for (size_t i = 1; i <= KMIP_BATCH_MAX; i++)
                ops[i] = (struct kmip_batch_op) { .operation = i % 2 ? OP_GET_ATTRIBUTES : OP_GET, .arg = uid };
        assert_int_equal(kmip_request_batch(NULL, ops, KMIP_BATCH_MAX, &req, &len), 0);
        assert_int_equal(ttlv_parse(req, len, &msg), 0);
        assert_int_equal(ttlv_count(&msg, T_BATCH_ITEM), KMIP_BATCH_MAX);
        assert_true(len <= KMIP_MESSAGE_MAX);
        free(req);

        assert_int_equal(kmip_request_batch(NULL, ops, KMIP_BATCH_MAX + 1, &req, &len), -EINVAL);
        assert_int_equal(kmip_request_batch(NULL, ops, 0, &req, &len), -EINVAL);
        assert_int_equal(kmip_request_batch(NULL, NULL, 1, &req, &len), -EINVAL);
        ops[1].arg = NULL;
        assert_int_equal(kmip_request_batch(NULL, ops, 2, &req, &len), -EINVAL);
        ops[1] = (struct kmip_batch_op) { .operation = 0x42, .arg = "1" };
        assert_int_equal(kmip_request_batch(NULL, ops, 2, &req, &len), -EINVAL);
        ops[1] = (struct kmip_batch_op) { .operation = OP_GET, .arg = "" };
        assert_int_equal(kmip_request_batch(NULL, ops, 2, &req, &len), -EINVAL);
        ops[0].state = 7;
        ops[1].arg = "1";
        assert_int_equal(kmip_request_batch(NULL, ops, 2, &req, &len), -EINVAL);
        assert_int_equal(kmip_request_batch(&(struct kmip_version) { 2, 0 }, &ops[1], 1, &req, &len), -EINVAL);
        free(ops);
}

/* One Batch Item of a response: id -1 none, -2 one of 3 bytes, else that
 * index; status 0 with the payload of `op` (Locate: uids "1" "2"; Get: the
 * test key as uid; GetAttributes of uid), else that status and reason. */
struct item_spec {
        int id;
        uint32_t op;
        uint32_t status, reason;
        const char *uid;
        bool no_operation;
};

static size_t build_batch(uint8_t *b, int32_t batch_count, const struct item_spec *items, size_t n) {
        struct ttlv_writer w;
        size_t len;

        resp_header(&w, b, batch_count);
        for (size_t i = 0; i < n; i++) {
                const struct item_spec *s = &items[i];
                uint8_t id[4] = { 0, 0, 0, (uint8_t) s->id };

                ttlv_begin(&w, T_BATCH_ITEM);
                if (!s->no_operation)
                        ttlv_put_enum(&w, T_OPERATION, s->op);
                if (s->id != -1)
                        ttlv_put_bytes(&w, T_UNIQUE_BATCH_ITEM_ID, s->id == -2 ? id + 1 : id, s->id == -2 ? 3 : 4);
                ttlv_put_enum(&w, T_RESULT_STATUS, s->status);
                if (s->status != 0) {
                        ttlv_put_enum(&w, T_RESULT_REASON, s->reason);
                        ttlv_put_text(&w, T_RESULT_MESSAGE, "failed", 6);
                        ttlv_end(&w);
                        continue;
                }
                ttlv_begin(&w, T_RESPONSE_PAYLOAD);
                if (s->op == OP_LOCATE) {
                        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "1", 1);
                        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, "2", 1);
                } else if (s->op == OP_GET) {
                        ttlv_put_enum(&w, T_OBJECT_TYPE, 2);
                        ttlv_put_text(&w, T_UNIQUE_IDENTIFIER, s->uid, strlen(s->uid));
                        ttlv_begin(&w, T_SYMMETRIC_KEY);
                        ttlv_begin(&w, T_KEY_BLOCK);
                        ttlv_put_enum(&w, T_KEY_FORMAT_TYPE, 1);
                        ttlv_begin(&w, T_KEY_VALUE);
                        ttlv_put_bytes(&w, T_KEY_MATERIAL, test_key, AES256_KEY_SIZE);
                        ttlv_end(&w);
                        ttlv_put_enum(&w, T_CRYPTO_ALG, 3);
                        ttlv_put_integer(&w, T_CRYPTO_LEN, 256);
                        ttlv_end(&w);
                        ttlv_end(&w);
                } else
                        put_pykmip_attributes(&w, s->uid);
                ttlv_end(&w);
                ttlv_end(&w);
        }
        ttlv_end(&w);
        assert_int_equal(ttlv_writer_finish(&w, &len), 0);
        return len;
}

static const struct kmip_batch_op three_ops[] = {
        { .operation = OP_LOCATE, .arg = "grp" },
        { .operation = OP_GET_ATTRIBUTES, .arg = "1" },
        { .operation = OP_GET, .arg = "2" },
};

/* The answer a sync gets when one object was destroyed: the Locate and the
 * Get succeed, the GetAttributes fails; items in another order than sent. */
static void test_kmip_response_batch_one_failed_item(void **state) {
        const struct item_spec items[] = {
                { .id = 2, .op = OP_GET, .uid = "2" },
                { .id = 1, .op = OP_GET_ATTRIBUTES, .status = 1, .reason = 1 },
                { .id = 0, .op = OP_LOCATE },
        };
        uint8_t *b = malloc(BUF);
        struct kmip_batch_result res[3];
        struct kmip_key_attributes a;
        char uids[4][KMIP_ID_MAX], uid[KMIP_ID_MAX];
        uint8_t key[AES256_KEY_SIZE];
        size_t n, count;

        assert_non_null(b);
        n = build_batch(b, 3, items, 3);
        assert_int_equal(kmip_response_batch(b, n, three_ops, 3, res, NULL), 0);
        for (size_t i = 0; i < 3; i++)
                assert_true(res[i].answered);
        assert_int_equal(kmip_result_locate(&res[0], uids, 4, &count), 0);
        assert_int_equal(count, 2);
        assert_string_equal(uids[1], "2");
        assert_int_equal(res[1].error.result_status, 1);
        assert_int_equal(res[1].error.result_reason, KMIP_REASON_ITEM_NOT_FOUND);
        assert_string_equal(res[1].error.message, "failed");
        assert_int_equal(kmip_result_get_attributes(&res[1], &a), -EINVAL);
        assert_int_equal(kmip_result_get_symmetric_key(&res[2], uid, key), 0);
        assert_string_equal(uid, "2");
        assert_memory_equal(key, test_key, AES256_KEY_SIZE);
        /* a payload parser for another operation refuses the item */
        assert_int_equal(kmip_result_get_attributes(&res[2], &a), -EINVAL);
        assert_int_equal(kmip_result_locate(&res[1], uids, 4, &count), -EINVAL);
        assert_int_equal(count, 0);

        /* a server that stopped after the failure (Stop): fewer items, the
         * rest not answered */
        n = build_batch(b, 2, items + 1, 2);
        assert_int_equal(kmip_response_batch(b, n, three_ops, 3, res, NULL), 0);
        assert_false(res[2].answered);
        assert_true(res[0].answered && res[1].answered);
        assert_int_equal(kmip_result_get_symmetric_key(&res[2], uid, key), -EINVAL);

        /* GetAttributes answered */
        const struct item_spec ga[] = { { .id = 1, .op = OP_GET_ATTRIBUTES, .uid = "1" } };
        n = build_batch(b, 1, ga, 1);
        assert_int_equal(kmip_response_batch(b, n, three_ops, 3, res, NULL), 0);
        assert_int_equal(kmip_result_get_attributes(&res[1], &a), 0);
        assert_string_equal(a.uid, "1");
        assert_int_equal(a.state, KMIP_STATE_PRE_ACTIVE);
        explicit_bzero(b, BUF);
        free(b);
}

static void test_kmip_response_batch_refused_whole(void **state) {
        /* one failed item for none of ours: PyKMIP's answer to a message it
         * could not parse (no Operation, no ID) */
        const struct item_spec refused = { .id = -1, .status = 1, .reason = 4, .no_operation = true };
        uint8_t *b = malloc(BUF);
        struct kmip_batch_result res[3];
        struct kmip_error err;
        size_t n;

        assert_non_null(b);
        n = build_batch(b, 1, &refused, 1);
        assert_int_equal(kmip_response_batch(b, n, three_ops, 3, res, &err), -EREMOTEIO);
        assert_int_equal(err.result_reason, KMIP_REASON_INVALID_MESSAGE);
        /* to a one-item request it is that item's failure */
        assert_int_equal(kmip_response_batch(b, n, three_ops, 1, res, &err), 0);
        assert_true(res[0].answered);
        assert_int_equal(res[0].error.result_reason, KMIP_REASON_INVALID_MESSAGE);
        free(b);
}

static void test_kmip_response_batch_malformed(void **state) {
        static const struct {
                int32_t batch_count;
                struct item_spec items[3];
                size_t n;
        } bad[] = {
                /* the same ID twice */
                { 2, { { .id = 0, .op = OP_LOCATE }, { .id = 0, .op = OP_LOCATE } }, 2 },
                /* an ID we did not send */
                { 1, { { .id = 3, .op = OP_LOCATE } }, 1 },
                /* an ID of another size */
                { 1, { { .id = -2, .op = OP_LOCATE } }, 1 },
                /* no ID on a success, in a batch of several */
                { 1, { { .id = -1, .op = OP_LOCATE } }, 1 },
                /* no ID on one failure of two */
                { 2, { { .id = 0, .op = OP_LOCATE }, { .id = -1, .op = OP_GET, .status = 1, .reason = 1 } }, 2 },
                /* the operation of another item */
                { 1, { { .id = 1, .op = OP_GET, .uid = "1" } }, 1 },
                /* Batch Count and items disagree; more than sent */
                { 3, { { .id = 0, .op = OP_LOCATE }, { .id = 1, .op = OP_GET_ATTRIBUTES, .uid = "1" } }, 2 },
                { 1, { { .id = 0, .op = OP_LOCATE }, { .id = 1, .op = OP_GET_ATTRIBUTES, .uid = "1" } }, 2 },
                { 0, { { .id = 0, .op = OP_LOCATE } }, 1 },
                /* a success without an Operation */
                { 1, { { .id = 0, .op = OP_LOCATE, .no_operation = true } }, 1 },
        };
        uint8_t *b = malloc(BUF);
        struct kmip_batch_result res[3];
        size_t n;

        assert_non_null(b);
        for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
                n = build_batch(b, bad[i].batch_count, bad[i].items, bad[i].n);
                if (kmip_response_batch(b, n, three_ops, 3, res, NULL) != -EBADMSG)
                        fail_msg("case %zu accepted", i);
        }
        /* more items than sent, each well-formed */
        const struct item_spec four[] = {
                { .id = 0, .op = OP_LOCATE }, { .id = 1, .op = OP_GET_ATTRIBUTES, .uid = "1" },
                { .id = 2, .op = OP_GET, .uid = "2" }, { .id = 3, .op = OP_GET, .uid = "2" },
        };
        n = build_batch(b, 4, four, 4);
        assert_int_equal(kmip_response_batch(b, n, three_ops, 3, res, NULL), -EBADMSG);
        assert_int_equal(kmip_response_batch(b, n, three_ops, 0, res, NULL), -EINVAL);
        assert_int_equal(kmip_response_batch(NULL, n, three_ops, 3, res, NULL), -EINVAL);
        free(b);
}

static void test_kmip_state_to_string_all(void **state) {
        assert_string_equal(kmip_state_to_string(KMIP_STATE_ACTIVE), "Active");
        assert_string_equal(kmip_state_to_string(KMIP_STATE_DEACTIVATED), "Deactivated");
        assert_string_equal(kmip_state_to_string(KMIP_STATE_COMPROMISED), "Compromised");
        assert_string_equal(kmip_state_to_string(KMIP_STATE_DESTROYED), "Destroyed");
        assert_string_equal(kmip_state_to_string(KMIP_STATE_DESTROYED_COMPROMISED), "Destroyed Compromised");
        assert_string_equal(kmip_state_to_string(0), "unknown");
        assert_string_equal(kmip_state_to_string(99), "unknown");
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_kmip_request_discover_versions_fields),
                cmocka_unit_test(test_kmip_request_locate_fields),
                cmocka_unit_test(test_kmip_request_get_fields),
                cmocka_unit_test(test_kmip_request_get_attributes_fields),
                cmocka_unit_test(test_kmip_request_invalid),
                cmocka_unit_test(test_kmip_message_length_header),
                cmocka_unit_test(test_kmip_response_failure_each_operation),
                cmocka_unit_test(test_kmip_response_header_malformed),
                cmocka_unit_test(test_kmip_response_discover_versions_success),
                cmocka_unit_test(test_kmip_response_locate_success),
                cmocka_unit_test(test_kmip_response_locate_bad_identifier),
                cmocka_unit_test(test_kmip_response_get_symmetric_key_raw),
                cmocka_unit_test(test_kmip_response_get_symmetric_key_transparent),
                cmocka_unit_test(test_kmip_response_get_symmetric_key_wrong),
                cmocka_unit_test(test_kmip_response_get_attributes_success),
                cmocka_unit_test(test_kmip_response_get_attributes_malformed),
                cmocka_unit_test(test_kmip_request_batch_fields),
                cmocka_unit_test(test_kmip_request_batch_bounds),
                cmocka_unit_test(test_kmip_response_batch_one_failed_item),
                cmocka_unit_test(test_kmip_response_batch_refused_whole),
                cmocka_unit_test(test_kmip_response_batch_malformed),
                cmocka_unit_test(test_kmip_state_to_string_all),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
