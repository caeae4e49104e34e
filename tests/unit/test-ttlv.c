/* agent/kmip/ttlv.c: KMIP TTLV encoder and bounded decoder (KMIP 1.2 section 9.1). */
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

#include "ttlv.h"

/* KMIP 1.2 section 9.1.2 examples, all with tag 0x420020. */
static const uint8_t vec_integer[] = {            /* Integer 8 */
        0x42, 0x00, 0x20, 0x02, 0x00, 0x00, 0x00, 0x04,
        0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00,
};
static const uint8_t vec_long[] = {               /* Long Integer 123456789000000000 */
        0x42, 0x00, 0x20, 0x03, 0x00, 0x00, 0x00, 0x08,
        0x01, 0xB6, 0x9B, 0x4B, 0xA5, 0x74, 0x92, 0x00,
};
static const uint8_t vec_big[] = {                /* Big Integer 1234567890000000000000000000 */
        0x42, 0x00, 0x20, 0x04, 0x00, 0x00, 0x00, 0x10,
        0x00, 0x00, 0x00, 0x00, 0x03, 0xFD, 0x35, 0xEB,
        0x6B, 0xC2, 0xDF, 0x46, 0x18, 0x08, 0x00, 0x00,
};
static const uint8_t vec_enum[] = {               /* Enumeration 255 */
        0x42, 0x00, 0x20, 0x05, 0x00, 0x00, 0x00, 0x04,
        0x00, 0x00, 0x00, 0xFF, 0x00, 0x00, 0x00, 0x00,
};
static const uint8_t vec_bool[] = {               /* Boolean True */
        0x42, 0x00, 0x20, 0x06, 0x00, 0x00, 0x00, 0x08,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
};
static const uint8_t vec_text[] = {               /* Text String "Hello World" */
        0x42, 0x00, 0x20, 0x07, 0x00, 0x00, 0x00, 0x0B,
        0x48, 0x65, 0x6C, 0x6C, 0x6F, 0x20, 0x57, 0x6F,
        0x72, 0x6C, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00,
};
static const uint8_t vec_bytes[] = {              /* Byte String 01 02 03 */
        0x42, 0x00, 0x20, 0x08, 0x00, 0x00, 0x00, 0x03,
        0x01, 0x02, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00,
};
static const uint8_t vec_datetime[] = {           /* Date-Time Fri 14 Mar 2008 11:56:40 GMT */
        0x42, 0x00, 0x20, 0x09, 0x00, 0x00, 0x00, 0x08,
        0x00, 0x00, 0x00, 0x00, 0x47, 0xDA, 0x67, 0xF8,
};
static const uint8_t vec_interval[] = {           /* Interval 10 days */
        0x42, 0x00, 0x20, 0x0A, 0x00, 0x00, 0x00, 0x04,
        0x00, 0x0D, 0x2F, 0x00, 0x00, 0x00, 0x00, 0x00,
};
static const uint8_t vec_struct[] = {             /* Structure { Enum 254 (420004), Integer 255 (420005) } */
        0x42, 0x00, 0x20, 0x01, 0x00, 0x00, 0x00, 0x20,
        0x42, 0x00, 0x04, 0x05, 0x00, 0x00, 0x00, 0x04,
        0x00, 0x00, 0x00, 0xFE, 0x00, 0x00, 0x00, 0x00,
        0x42, 0x00, 0x05, 0x02, 0x00, 0x00, 0x00, 0x04,
        0x00, 0x00, 0x00, 0xFF, 0x00, 0x00, 0x00, 0x00,
};

static const uint8_t big_value[] = {
        0x00, 0x00, 0x00, 0x00, 0x03, 0xFD, 0x35, 0xEB,
        0x6B, 0xC2, 0xDF, 0x46, 0x18, 0x08, 0x00, 0x00,
};

#define TAG 0x420020

/* Encode with one call of `put` and compare with the spec vector. */
#define ASSERT_ENCODES(vec, put)                                               \
        do {                                                                   \
                uint8_t _b[64];                                                \
                struct ttlv_writer _w;                                         \
                size_t _n;                                                     \
                ttlv_writer_init(&_w, _b, sizeof(_b));                         \
                assert_int_equal((put), 0);                                    \
                assert_int_equal(ttlv_writer_finish(&_w, &_n), 0);             \
                assert_int_equal(_n, sizeof(vec));                             \
                assert_memory_equal(_b, (vec), sizeof(vec));                   \
        } while (0)

static void test_ttlv_put_spec_vectors(void **state) {
        ASSERT_ENCODES(vec_integer, ttlv_put_integer(&_w, TAG, 8));
        ASSERT_ENCODES(vec_long, ttlv_put_long(&_w, TAG, 123456789000000000LL));
        ASSERT_ENCODES(vec_big, ttlv_put_big_integer(&_w, TAG, big_value, sizeof(big_value)));
        ASSERT_ENCODES(vec_enum, ttlv_put_enum(&_w, TAG, 255));
        ASSERT_ENCODES(vec_bool, ttlv_put_bool(&_w, TAG, true));
        ASSERT_ENCODES(vec_text, ttlv_put_text(&_w, TAG, "Hello World", 11));
        ASSERT_ENCODES(vec_bytes, ttlv_put_bytes(&_w, TAG, (const uint8_t *) "\x01\x02\x03", 3));
        ASSERT_ENCODES(vec_datetime, ttlv_put_datetime(&_w, TAG, 1205495800));
        ASSERT_ENCODES(vec_interval, ttlv_put_interval(&_w, TAG, 10 * 86400));
        ASSERT_ENCODES(vec_struct, ttlv_begin(&_w, TAG) || ttlv_put_enum(&_w, 0x420004, 254) ||
                                   ttlv_put_integer(&_w, 0x420005, 255) || ttlv_end(&_w));
}

static void test_ttlv_parse_spec_vectors(void **state) {
        struct ttlv_item it, c;
        struct ttlv_iter iter;
        int32_t i32;
        int64_t i64;
        uint32_t u32;
        bool b;
        const char *s;
        const uint8_t *p;
        size_t n;

        assert_int_equal(ttlv_parse(vec_integer, sizeof(vec_integer), &it), 0);
        assert_int_equal(it.tag, TAG);
        assert_int_equal(it.depth, 1);
        assert_int_equal(ttlv_get_integer(&it, &i32), 0);
        assert_int_equal(i32, 8);
        assert_int_equal(ttlv_get_enum(&it, &u32), -EBADMSG);   /* wrong type */

        assert_int_equal(ttlv_parse(vec_long, sizeof(vec_long), &it), 0);
        assert_int_equal(ttlv_get_long(&it, &i64), 0);
        assert_true(i64 == 123456789000000000LL);

        assert_int_equal(ttlv_parse(vec_big, sizeof(vec_big), &it), 0);
        assert_int_equal(it.type, TTLV_BIG_INTEGER);
        assert_int_equal(ttlv_get_bytes(&it, &p, &n), 0);
        assert_int_equal(n, 16);
        assert_memory_equal(p, big_value, 16);

        assert_int_equal(ttlv_parse(vec_enum, sizeof(vec_enum), &it), 0);
        assert_int_equal(ttlv_get_enum(&it, &u32), 0);
        assert_int_equal(u32, 255);

        assert_int_equal(ttlv_parse(vec_bool, sizeof(vec_bool), &it), 0);
        assert_int_equal(ttlv_get_bool(&it, &b), 0);
        assert_true(b);

        assert_int_equal(ttlv_parse(vec_text, sizeof(vec_text), &it), 0);
        assert_int_equal(ttlv_get_text(&it, &s, &n), 0);
        assert_int_equal(n, 11);
        assert_memory_equal(s, "Hello World", 11);
        assert_true(ttlv_text_equal(&it, "Hello World"));
        assert_false(ttlv_text_equal(&it, "Hello Worl"));
        assert_false(ttlv_text_equal(&it, "Hello World!"));

        assert_int_equal(ttlv_parse(vec_bytes, sizeof(vec_bytes), &it), 0);
        assert_int_equal(ttlv_get_bytes(&it, &p, &n), 0);
        assert_int_equal(n, 3);
        assert_memory_equal(p, "\x01\x02\x03", 3);

        assert_int_equal(ttlv_parse(vec_datetime, sizeof(vec_datetime), &it), 0);
        assert_int_equal(ttlv_get_datetime(&it, &i64), 0);
        assert_int_equal(i64, 1205495800);

        assert_int_equal(ttlv_parse(vec_interval, sizeof(vec_interval), &it), 0);
        assert_int_equal(ttlv_get_interval(&it, &u32), 0);
        assert_int_equal(u32, 864000);

        assert_int_equal(ttlv_parse(vec_struct, sizeof(vec_struct), &it), 0);
        assert_int_equal(it.type, TTLV_STRUCTURE);
        assert_int_equal(ttlv_count(&it, 0), 2);
        assert_int_equal(ttlv_iter_init(&iter, &it), 0);
        assert_int_equal(ttlv_iter_next(&iter, &c), 1);
        assert_int_equal(c.tag, 0x420004);
        assert_int_equal(c.depth, 2);
        assert_int_equal(ttlv_get_enum(&c, &u32), 0);
        assert_int_equal(u32, 254);
        assert_int_equal(ttlv_iter_next(&iter, &c), 1);
        assert_int_equal(ttlv_get_integer(&c, &i32), 0);
        assert_int_equal(i32, 255);
        assert_int_equal(ttlv_iter_next(&iter, &c), 0);

        assert_int_equal(ttlv_find(&it, 0x420005, TTLV_INTEGER, &c), 0);
        assert_int_equal(ttlv_find(&it, 0x420005, 0, &c), 0);
        assert_int_equal(ttlv_find(&it, 0x420005, TTLV_ENUMERATION, &c), -EBADMSG);
        assert_int_equal(ttlv_find(&it, 0x420006, 0, &c), -ENOENT);
        assert_int_equal(ttlv_count(&it, 0x420004), 1);
        /* not a structure */
        assert_int_equal(ttlv_find(&c, 0x420005, 0, NULL), -EBADMSG);
        assert_int_equal(ttlv_iter_init(&iter, &c), -EBADMSG);
}

/* Every prefix of a valid message, and the message with a byte more, fail. */
static void test_ttlv_parse_truncated(void **state) {
        static const uint8_t *const vecs[] = {
                vec_integer, vec_long, vec_big, vec_enum, vec_bool, vec_text,
                vec_bytes, vec_datetime, vec_interval, vec_struct,
        };
        static const size_t lens[] = {
                sizeof(vec_integer), sizeof(vec_long), sizeof(vec_big), sizeof(vec_enum),
                sizeof(vec_bool), sizeof(vec_text), sizeof(vec_bytes), sizeof(vec_datetime),
                sizeof(vec_interval), sizeof(vec_struct),
        };
        struct ttlv_item it;

        for (size_t v = 0; v < sizeof(lens) / sizeof(lens[0]); v++) {
                uint8_t longer[64] = {};

                for (size_t n = 0; n < lens[v]; n++) {
                        /* a heap copy of exactly n bytes, so ASan sees any overread */
                        uint8_t *p = malloc(n ? n : 1);
                        assert_non_null(p);
                        memcpy(p, vecs[v], n);
                        assert_int_equal(ttlv_parse(p, n, &it), -EBADMSG);
                        free(p);
                }
                memcpy(longer, vecs[v], lens[v]);
                assert_int_equal(ttlv_parse(longer, lens[v] + 8, &it), -EBADMSG);
                assert_int_equal(ttlv_parse(longer, lens[v] + 1, &it), -EBADMSG);
        }
        assert_int_equal(ttlv_parse(NULL, 0, &it), -EBADMSG);
}

static void test_ttlv_parse_bad_padding(void **state) {
        struct ttlv_item it;
        uint8_t b[64];

        /* each padding byte of Integer, Enumeration, Interval, Text, Bytes */
        for (size_t i = 12; i < 16; i++) {
                memcpy(b, vec_integer, sizeof(vec_integer));
                b[i] = 0x01;
                assert_int_equal(ttlv_parse(b, sizeof(vec_integer), &it), -EBADMSG);
                memcpy(b, vec_enum, sizeof(vec_enum));
                b[i] = 0x80;
                assert_int_equal(ttlv_parse(b, sizeof(vec_enum), &it), -EBADMSG);
                memcpy(b, vec_interval, sizeof(vec_interval));
                b[i] = 0xff;
                assert_int_equal(ttlv_parse(b, sizeof(vec_interval), &it), -EBADMSG);
        }
        for (size_t i = 8 + 11; i < sizeof(vec_text); i++) {
                memcpy(b, vec_text, sizeof(vec_text));
                b[i] = ' ';
                assert_int_equal(ttlv_parse(b, sizeof(vec_text), &it), -EBADMSG);
        }
        for (size_t i = 8 + 3; i < sizeof(vec_bytes); i++) {
                memcpy(b, vec_bytes, sizeof(vec_bytes));
                b[i] = 0x04;
                assert_int_equal(ttlv_parse(b, sizeof(vec_bytes), &it), -EBADMSG);
        }
        /* padding of a child inside a structure */
        memcpy(b, vec_struct, sizeof(vec_struct));
        b[8 + 8 + 7] = 0x01;
        assert_int_equal(ttlv_parse(b, sizeof(vec_struct), &it), -EBADMSG);

        /* Boolean other than 0 or 1 */
        memcpy(b, vec_bool, sizeof(vec_bool));
        b[15] = 0x02;
        assert_int_equal(ttlv_parse(b, sizeof(vec_bool), &it), -EBADMSG);
        memcpy(b, vec_bool, sizeof(vec_bool));
        b[8] = 0x80;
        assert_int_equal(ttlv_parse(b, sizeof(vec_bool), &it), -EBADMSG);
}

/* Fixed-size types with any other length are refused, whatever follows. */
static void test_ttlv_parse_wrong_fixed_length(void **state) {
        static const struct {
                uint8_t type;
                uint32_t good;
        } types[] = {
                { TTLV_INTEGER, 4 }, { TTLV_ENUMERATION, 4 }, { TTLV_INTERVAL, 4 },
                { TTLV_LONG_INTEGER, 8 }, { TTLV_DATE_TIME, 8 }, { TTLV_BOOLEAN, 8 },
        };
        struct ttlv_item it;

        for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++)
                for (uint32_t len = 0; len <= 16; len++) {
                        uint8_t b[8 + 16] = { 0x42, 0x00, 0x20, types[t].type, 0, 0, 0, (uint8_t) len };
                        size_t total = 8 + ((len + 7) & ~7u);
                        int expect = len == types[t].good ? 0 : -EBADMSG;
                        assert_int_equal(ttlv_parse(b, total, &it), expect);
                }

        /* Big Integer: a non-zero multiple of 8 only */
        {
                uint8_t b[8 + 16] = { 0x42, 0x00, 0x20, TTLV_BIG_INTEGER, 0, 0, 0, 12 };
                assert_int_equal(ttlv_parse(b, 24, &it), -EBADMSG);
                b[7] = 0;
                assert_int_equal(ttlv_parse(b, 8, &it), -EBADMSG);
                b[7] = 16;
                assert_int_equal(ttlv_parse(b, 24, &it), 0);
        }
        /* unknown types 0x00, 0x0B, 0xFF */
        {
                uint8_t b[16] = { 0x42, 0x00, 0x20, 0x00, 0, 0, 0, 4 };
                assert_int_equal(ttlv_parse(b, 16, &it), -EBADMSG);
                b[3] = 0x0B;
                assert_int_equal(ttlv_parse(b, 16, &it), -EBADMSG);
                b[3] = 0xFF;
                assert_int_equal(ttlv_parse(b, 16, &it), -EBADMSG);
        }
        /* tag outside 0x42xxxx / 0x54xxxx */
        {
                uint8_t b[16];
                memcpy(b, vec_integer, sizeof(b));
                b[0] = 0x43;
                assert_int_equal(ttlv_parse(b, 16, &it), -EBADMSG);
                b[0] = 0x54;
                assert_int_equal(ttlv_parse(b, 16, &it), 0);
        }
}

static void test_ttlv_parse_structure_length_mismatch(void **state) {
        struct ttlv_item it;
        uint8_t b[64];

        /* structure claims 8 bytes more than it holds: overruns the buffer */
        memcpy(b, vec_struct, sizeof(vec_struct));
        b[7] = 0x28;
        assert_int_equal(ttlv_parse(b, sizeof(vec_struct), &it), -EBADMSG);
        /* ... and with 8 more zero bytes present: a child header that is all
         * zero has tag 0 and type 0 */
        memset(b + sizeof(vec_struct), 0, 8);
        assert_int_equal(ttlv_parse(b, sizeof(vec_struct) + 8, &it), -EBADMSG);

        /* structure 8 bytes shorter: the second child overruns it, and the
         * outer item no longer covers the buffer */
        memcpy(b, vec_struct, sizeof(vec_struct));
        b[7] = 0x18;
        assert_int_equal(ttlv_parse(b, sizeof(vec_struct), &it), -EBADMSG);
        assert_int_equal(ttlv_parse(b, 0x18 + 8, &it), -EBADMSG);

        /* structure length not a multiple of 8 */
        memcpy(b, vec_struct, sizeof(vec_struct));
        b[7] = 0x1C;
        assert_int_equal(ttlv_parse(b, 0x1C + 8 + 4, &it), -EBADMSG);

        /* a child whose length overruns its parent but not the buffer */
        {
                static const uint8_t nested[] = {
                        0x42, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00, 0x20,   /* outer, 32 */
                        0x42, 0x00, 0x02, 0x01, 0x00, 0x00, 0x00, 0x08,   /* inner, 8 */
                        0x42, 0x00, 0x03, 0x07, 0x00, 0x00, 0x00, 0x08,   /* text 8 > inner's 0 left */
                        'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h',
                };
                assert_int_equal(ttlv_parse(nested, sizeof(nested), &it), -EBADMSG);
        }
        /* huge length */
        {
                uint8_t h[16] = { 0x42, 0x00, 0x20, 0x07, 0xFF, 0xFF, 0xFF, 0xFF };
                assert_int_equal(ttlv_parse(h, sizeof(h), &it), -EBADMSG);
                h[3] = TTLV_STRUCTURE;
                h[7] = 0xF8;
                assert_int_equal(ttlv_parse(h, sizeof(h), &it), -EBADMSG);
        }
        /* empty structure is fine */
        {
                static const uint8_t e[8] = { 0x42, 0x00, 0x20, 0x01, 0, 0, 0, 0 };
                assert_int_equal(ttlv_parse(e, sizeof(e), &it), 0);
                assert_int_equal(ttlv_count(&it, 0), 0);
        }
}

/* Nested empty structures: TTLV_DEPTH_MAX levels parse, one more does not. */
static size_t nest(uint8_t *b, unsigned levels) {
        for (unsigned i = 0; i < levels; i++) {
                uint32_t len = 8 * (levels - 1 - i);
                uint8_t *p = b + 8 * i;
                p[0] = 0x42;
                p[1] = 0x00;
                p[2] = (uint8_t) (i + 1);
                p[3] = TTLV_STRUCTURE;
                p[4] = 0;
                p[5] = 0;
                p[6] = (uint8_t) (len >> 8);
                p[7] = (uint8_t) len;
        }
        return 8 * levels;
}

static void test_ttlv_parse_depth_limit(void **state) {
        uint8_t b[8 * (TTLV_DEPTH_MAX + 2)];
        struct ttlv_item it;
        struct ttlv_writer w;
        uint8_t wb[8 * (TTLV_DEPTH_MAX + 2)];

        assert_int_equal(ttlv_parse(b, nest(b, TTLV_DEPTH_MAX), &it), 0);
        assert_int_equal(ttlv_parse(b, nest(b, TTLV_DEPTH_MAX + 1), &it), -EBADMSG);
        assert_int_equal(ttlv_parse(b, nest(b, TTLV_DEPTH_MAX + 2), &it), -EBADMSG);

        /* the encoder refuses to nest deeper either, and the error sticks */
        ttlv_writer_init(&w, wb, sizeof(wb));
        for (unsigned i = 0; i < TTLV_DEPTH_MAX; i++)
                assert_int_equal(ttlv_begin(&w, 0x420001 + i), 0);
        assert_int_equal(ttlv_begin(&w, 0x420100), -EINVAL);
        assert_int_equal(ttlv_end(&w), -EINVAL);
        assert_int_equal(ttlv_writer_finish(&w, NULL), -EINVAL);
}

static void test_ttlv_parse_item_limit(void **state) {
        /* one structure holding TTLV_ITEMS_MAX empty structures: one item too many */
        size_t n = TTLV_ITEMS_MAX;
        size_t len = 8 + 8 * n;
        uint8_t *b = calloc(1, len);
        struct ttlv_item it;

        assert_non_null(b);
        for (size_t i = 0; i < n + 1; i++) {
                b[8 * i] = 0x42;
                b[8 * i + 2] = 0x01;
                b[8 * i + 3] = TTLV_STRUCTURE;
        }
        b[4] = (uint8_t) ((8 * n) >> 24);
        b[5] = (uint8_t) ((8 * n) >> 16);
        b[6] = (uint8_t) ((8 * n) >> 8);
        b[7] = (uint8_t) (8 * n);
        assert_int_equal(ttlv_parse(b, len, &it), -EBADMSG);

        /* one fewer child fits */
        n--;
        b[4] = (uint8_t) ((8 * n) >> 24);
        b[5] = (uint8_t) ((8 * n) >> 16);
        b[6] = (uint8_t) ((8 * n) >> 8);
        b[7] = (uint8_t) (8 * n);
        assert_int_equal(ttlv_parse(b, 8 + 8 * n, &it), 0);
        assert_int_equal(ttlv_count(&it, 0), (int) n);
        free(b);
}

static void test_ttlv_copy_text_nul(void **state) {
        static const uint8_t nul[] = {
                0x42, 0x00, 0x20, 0x07, 0x00, 0x00, 0x00, 0x03, 'a', 0x00, 'b', 0, 0, 0, 0, 0,
        };
        struct ttlv_item it;
        char buf[16];
        const char *s;
        size_t n;

        /* a NUL inside is valid TTLV (text is counted), but not as a C string */
        assert_int_equal(ttlv_parse(nul, sizeof(nul), &it), 0);
        assert_int_equal(ttlv_get_text(&it, &s, &n), 0);
        assert_int_equal(n, 3);
        assert_int_equal(ttlv_copy_text(&it, buf, sizeof(buf)), -EBADMSG);
        assert_false(ttlv_text_equal(&it, "a"));

        assert_int_equal(ttlv_parse(vec_text, sizeof(vec_text), &it), 0);
        assert_int_equal(ttlv_copy_text(&it, buf, sizeof(buf)), 11);
        assert_string_equal(buf, "Hello World");
        assert_int_equal(ttlv_copy_text(&it, buf, 12), 11);
        assert_int_equal(ttlv_copy_text(&it, buf, 11), -ENAMETOOLONG);
        assert_int_equal(ttlv_parse(vec_bytes, sizeof(vec_bytes), &it), 0);
        assert_int_equal(ttlv_copy_text(&it, buf, sizeof(buf)), -EBADMSG);
}

static void test_ttlv_writer_overflow_sticky(void **state) {
        uint8_t b[32];
        struct ttlv_writer w;
        size_t n;

        ttlv_writer_init(&w, b, sizeof(b));
        assert_int_equal(ttlv_begin(&w, 0x420001), 0);
        assert_int_equal(ttlv_put_integer(&w, 0x420002, 1), 0);
        assert_int_equal(ttlv_put_text(&w, 0x420003, "too long", 8), -ENOBUFS);
        /* everything after fails the same way, even what would fit */
        assert_int_equal(ttlv_put_integer(&w, 0x420002, 1), -ENOBUFS);
        assert_int_equal(ttlv_end(&w), -ENOBUFS);
        assert_int_equal(ttlv_writer_finish(&w, &n), -ENOBUFS);

        /* exactly full is fine */
        ttlv_writer_init(&w, b, 24);
        assert_int_equal(ttlv_begin(&w, 0x420001), 0);
        assert_int_equal(ttlv_put_integer(&w, 0x420002, 1), 0);
        assert_int_equal(ttlv_end(&w), 0);
        assert_int_equal(ttlv_writer_finish(&w, &n), 0);
        assert_int_equal(n, 24);
        assert_int_equal(b[7], 16);

        /* unbalanced */
        ttlv_writer_init(&w, b, sizeof(b));
        assert_int_equal(ttlv_begin(&w, 0x420001), 0);
        assert_int_equal(ttlv_writer_finish(&w, &n), -EPROTO);
        ttlv_writer_init(&w, b, sizeof(b));
        assert_int_equal(ttlv_end(&w), -EPROTO);

        /* bad arguments */
        ttlv_writer_init(&w, b, sizeof(b));
        assert_int_equal(ttlv_put_integer(&w, 0x1000000, 1), -EINVAL);
        ttlv_writer_init(&w, b, sizeof(b));
        assert_int_equal(ttlv_put_big_integer(&w, 0x420001, big_value, 12), -EINVAL);
        ttlv_writer_init(&w, NULL, 100);
        assert_int_equal(ttlv_put_integer(&w, 0x420001, 1), -ENOBUFS);
}

/* A nested message built by the encoder decodes back field by field. */
static void test_ttlv_round_trip_nested(void **state) {
        uint8_t b[256];
        struct ttlv_writer w;
        struct ttlv_item root, a, c;
        size_t n;
        int64_t v64;
        bool bo;

        ttlv_writer_init(&w, b, sizeof(b));
        ttlv_begin(&w, 0x420078);
        ttlv_begin(&w, 0x420077);
        ttlv_put_long(&w, 0x420001, -2);
        ttlv_put_bool(&w, 0x420002, false);
        ttlv_end(&w);
        ttlv_put_text(&w, 0x420003, "", 0);
        ttlv_put_bytes(&w, 0x420004, NULL, 0);
        ttlv_put_text(&w, 0x420005, "12345678", 8);
        ttlv_end(&w);
        assert_int_equal(ttlv_writer_finish(&w, &n), 0);
        assert_int_equal(n, 8 + (8 + 16 + 16) + 8 + 8 + 16);

        assert_int_equal(ttlv_parse(b, n, &root), 0);
        assert_int_equal(ttlv_count(&root, 0), 4);
        assert_int_equal(ttlv_find(&root, 0x420077, TTLV_STRUCTURE, &a), 0);
        assert_int_equal(ttlv_find(&a, 0x420001, TTLV_LONG_INTEGER, &c), 0);
        assert_int_equal(ttlv_get_long(&c, &v64), 0);
        assert_int_equal(v64, -2);
        assert_int_equal(ttlv_find(&a, 0x420002, 0, &c), 0);
        assert_int_equal(ttlv_get_bool(&c, &bo), 0);
        assert_false(bo);
        assert_int_equal(ttlv_find(&root, 0x420003, TTLV_TEXT_STRING, &c), 0);
        assert_int_equal(c.length, 0);
        assert_true(ttlv_text_equal(&c, ""));
        assert_int_equal(ttlv_find(&root, 0x420005, TTLV_TEXT_STRING, &c), 0);
        assert_true(ttlv_text_equal(&c, "12345678"));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_ttlv_put_spec_vectors),
                cmocka_unit_test(test_ttlv_parse_spec_vectors),
                cmocka_unit_test(test_ttlv_parse_truncated),
                cmocka_unit_test(test_ttlv_parse_bad_padding),
                cmocka_unit_test(test_ttlv_parse_wrong_fixed_length),
                cmocka_unit_test(test_ttlv_parse_structure_length_mismatch),
                cmocka_unit_test(test_ttlv_parse_depth_limit),
                cmocka_unit_test(test_ttlv_parse_item_limit),
                cmocka_unit_test(test_ttlv_copy_text_nul),
                cmocka_unit_test(test_ttlv_writer_overflow_sticky),
                cmocka_unit_test(test_ttlv_round_trip_nested),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
