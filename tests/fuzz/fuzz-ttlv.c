/* libFuzzer target: the TTLV decoder (agent/kmip/ttlv.c) and every KMIP response
 * parser (agent/kmip/message.c) on arbitrary bytes. Seeds: real PyKMIP responses from
 * KMIP_INTEROP_CORPUS=DIR /usr/bin/python3 tests/unit/kmip-interop.py HELPER.
 *
 * Beyond "no crash": anything ttlv_parse() accepts must be walkable to the
 * leaves with every accessor agreeing with the item's type, and a parser that
 * fails must leave nothing behind (a Get's key wiped, counts zero). Batch
 * responses are parsed as the answer to the batches a sync sends (a Locate
 * and GetAttributes; GetAttributes and Get pairs), each item with the parser
 * of its operation; the seeds include PyKMIP's answer to a batch. */
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "message.h"
#include "ttlv.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void walk(const struct ttlv_item *item) {
        struct ttlv_iter it;
        struct ttlv_item child;
        const uint8_t *p;
        const char *s;
        size_t n;
        int32_t i32;
        int64_t i64;
        uint32_t u32;
        bool b;
        char buf[64];
        int r;

        /* exactly one typed accessor accepts each item */
        int ok = (ttlv_get_integer(item, &i32) == 0) + (ttlv_get_long(item, &i64) == 0) +
                 (ttlv_get_enum(item, &u32) == 0) + (ttlv_get_bool(item, &b) == 0) +
                 (ttlv_get_datetime(item, &i64) == 0) + (ttlv_get_interval(item, &u32) == 0) +
                 (ttlv_get_text(item, &s, &n) == 0) + (ttlv_get_bytes(item, &p, &n) == 0) +
                 (item->type == TTLV_STRUCTURE);
        if (ok != 1)
                abort();
        r = ttlv_copy_text(item, buf, sizeof(buf));
        if (r >= 0 && (item->type != TTLV_TEXT_STRING || strlen(buf) != (size_t) r))
                abort();

        if (item->type != TTLV_STRUCTURE)
                return;
        if (ttlv_iter_init(&it, item) < 0)
                abort();
        while ((r = ttlv_iter_next(&it, &child)) > 0) {
                if (child.depth != item->depth + 1 || child.depth > TTLV_DEPTH_MAX)
                        abort();
                walk(&child);
        }
        if (r < 0)              /* ttlv_parse() validated all of it */
                abort();
        if (ttlv_count(item, 0) < 0)
                abort();
}

/* What a sync sends: a Locate and 3 GetAttributes, or GetAttributes and Get
 * of 2 uids, or each of those alone. */
static const struct kmip_batch_op check_ops[] = {
        { .operation = KMIP_OP_LOCATE, .arg = "g" },
        { .operation = KMIP_OP_GET_ATTRIBUTES, .arg = "1" },
        { .operation = KMIP_OP_GET_ATTRIBUTES, .arg = "2" },
        { .operation = KMIP_OP_GET_ATTRIBUTES, .arg = "3" },
};
static const struct kmip_batch_op new_ops[] = {
        { .operation = KMIP_OP_GET_ATTRIBUTES, .arg = "1" },
        { .operation = KMIP_OP_GET, .arg = "1" },
        { .operation = KMIP_OP_GET_ATTRIBUTES, .arg = "2" },
        { .operation = KMIP_OP_GET, .arg = "2" },
};

static void fuzz_batch(const uint8_t *data, size_t size, const struct kmip_batch_op *ops, size_t n) {
        static char ids[16][KMIP_ID_MAX];
        static const uint8_t zero[AES256_KEY_SIZE];
        struct kmip_batch_result res[4];
        struct kmip_key_attributes attr;
        struct kmip_error err;
        uint8_t key[AES256_KEY_SIZE];
        char uid[KMIP_ID_MAX];
        size_t m;
        int r, rb;

        rb = kmip_response_batch(data, size, ops, n, res, &err);
        if (rb == -EREMOTEIO && (n == 1 || err.result_status == 0))
                abort();        /* a refusal of the whole batch only for several items */
        for (size_t i = 0; i < n; i++) {
                const struct kmip_batch_result *x = &res[i];
                bool ok = rb == 0 && x->answered && x->error.result_status == 0;

                if (rb < 0 && x->answered)
                        abort();        /* nothing answered from a message refused */
                if (x->answered && x->operation != ops[i].operation)
                        abort();
                if (strlen(x->error.message) >= sizeof(x->error.message))
                        abort();
                /* each parser takes only a successful item of its operation */
                r = kmip_result_locate(x, ids, 16, &m);
                if ((r >= 0 && !(ok && ops[i].operation == KMIP_OP_LOCATE)) || (r < 0 && m != 0) || m > 16)
                        abort();
                memset(key, 0xAA, sizeof(key));
                r = kmip_result_get_symmetric_key(x, uid, key);
                if ((r < 0 && memcmp(key, zero, sizeof(key)) != 0) ||
                    (r >= 0 && !(ok && ops[i].operation == KMIP_OP_GET)))
                        abort();
                r = kmip_result_get_attributes(x, &attr);
                if ((r < 0 && attr.uid[0] != 0) || (r >= 0 && !(ok && ops[i].operation == KMIP_OP_GET_ATTRIBUTES)))
                        abort();
        }
        explicit_bzero(key, sizeof(key));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct ttlv_item root;
        struct kmip_error err;
        struct kmip_version versions[KMIP_VERSIONS_MAX];
        static char ids[16][KMIP_ID_MAX];
        char uid[KMIP_ID_MAX];
        uint8_t key[AES256_KEY_SIZE];
        static const uint8_t zero[AES256_KEY_SIZE];
        struct kmip_key_attributes attr;
        size_t n;
        int r;

        if (ttlv_parse(data, size, &root) == 0)
                walk(&root);
        if (size >= KMIP_HEADER_SIZE) {
                r = kmip_message_length(data);
                if (r >= 0 && (r < KMIP_HEADER_SIZE || (size_t) r > KMIP_MESSAGE_MAX))
                        abort();
        }

        r = kmip_response_discover_versions(data, size, versions, KMIP_VERSIONS_MAX, &n, &err);
        if ((r < 0 && n != 0) || n > KMIP_VERSIONS_MAX)
                abort();
        r = kmip_response_locate(data, size, ids, 16, &n, &err);
        if ((r < 0 && n != 0) || n > 16)
                abort();
        for (size_t i = 0; r >= 0 && i < n; i++)
                if (ids[i][0] == 0 || strlen(ids[i]) >= KMIP_ID_MAX)
                        abort();
        memset(key, 0xAA, sizeof(key));
        r = kmip_response_get_symmetric_key(data, size, uid, key, &err);
        if (r < 0 && memcmp(key, zero, sizeof(key)) != 0)
                abort();
        if (r == -EREMOTEIO && strlen(err.message) >= sizeof(err.message))
                abort();
        r = kmip_response_get_attributes(data, size, &attr, &err);
        if (r < 0 && attr.uid[0] != 0)
                abort();

        fuzz_batch(data, size, check_ops, ARRAY_SIZE(check_ops));
        fuzz_batch(data, size, check_ops, 1);
        fuzz_batch(data, size, new_ops, ARRAY_SIZE(new_ops));
        return 0;
}
