/* KMIP TTLV codec, KMIP 1.2 section 9.1. See ttlv.h. */
#include "ttlv.h"

#include <errno.h>
#include <string.h>

/* ---- byte order ------------------------------------------------------- */

static void put_be32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t) (v >> 24);
        p[1] = (uint8_t) (v >> 16);
        p[2] = (uint8_t) (v >> 8);
        p[3] = (uint8_t) v;
}

static void put_be64(uint8_t *p, uint64_t v) {
        put_be32(p, (uint32_t) (v >> 32));
        put_be32(p + 4, (uint32_t) v);
}

static uint32_t get_be32(const uint8_t *p) {
        return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8 | p[3];
}

static uint64_t get_be64(const uint8_t *p) {
        return (uint64_t) get_be32(p) << 32 | get_be32(p + 4);
}

/* Section 9.1.1.3: values are padded to the next multiple of 8. */
static uint64_t padded(uint64_t len) {
        return (len + 7) & ~(uint64_t) 7;
}

/* Section 9.1.3.1: 0x42xxxx are the standard tags, 0x54xxxx extensions;
 * everything else is unused. */
static bool tag_valid(uint32_t tag) {
        return (tag >> 16) == 0x42 || (tag >> 16) == 0x54;
}

/* Fixed value lengths per type (section 9.1.1.4); 0 = variable. */
static int fixed_length(uint8_t type) {
        switch (type) {
        case TTLV_INTEGER:
        case TTLV_ENUMERATION:
        case TTLV_INTERVAL:
                return 4;
        case TTLV_LONG_INTEGER:
        case TTLV_BOOLEAN:
        case TTLV_DATE_TIME:
                return 8;
        case TTLV_STRUCTURE:
        case TTLV_BIG_INTEGER:
        case TTLV_TEXT_STRING:
        case TTLV_BYTE_STRING:
                return 0;
        default:
                return -1;
        }
}

/* ---- encoder ---------------------------------------------------------- */

void ttlv_writer_init(struct ttlv_writer *w, uint8_t *buf, size_t cap) {
        *w = (struct ttlv_writer) { .buf = buf, .cap = buf ? cap : 0 };
}

static int fail(struct ttlv_writer *w, int r) {
        if (w->error == 0)
                w->error = r;
        return w->error;
}

/* Append header and value, zero-padded. */
static int put_item(struct ttlv_writer *w, uint32_t tag, uint8_t type, const void *v, size_t len) {
        if (w->error < 0)
                return w->error;
        if (!tag_valid(tag) || len > UINT32_MAX || (len > 0 && !v))
                return fail(w, -EINVAL);
        if (w->cap - w->len < TTLV_HEADER_SIZE ||
            padded(len) > w->cap - w->len - TTLV_HEADER_SIZE)
                return fail(w, -ENOBUFS);

        uint8_t *p = w->buf + w->len;
        p[0] = (uint8_t) (tag >> 16);
        p[1] = (uint8_t) (tag >> 8);
        p[2] = (uint8_t) tag;
        p[3] = type;
        put_be32(p + 4, (uint32_t) len);
        if (len > 0)
                memcpy(p + TTLV_HEADER_SIZE, v, len);
        memset(p + TTLV_HEADER_SIZE + len, 0, padded(len) - len);
        w->len += TTLV_HEADER_SIZE + padded(len);
        return 0;
}

int ttlv_begin(struct ttlv_writer *w, uint32_t tag) {
        if (w->error < 0)
                return w->error;
        if (w->depth >= TTLV_DEPTH_MAX)
                return fail(w, -EINVAL);
        size_t off = w->len;
        if (put_item(w, tag, TTLV_STRUCTURE, NULL, 0) < 0)
                return w->error;
        w->open[w->depth++] = off;
        return 0;
}

int ttlv_end(struct ttlv_writer *w) {
        if (w->error < 0)
                return w->error;
        if (w->depth == 0)
                return fail(w, -EPROTO);
        size_t off = w->open[--w->depth];
        size_t len = w->len - off - TTLV_HEADER_SIZE;
        if (len > UINT32_MAX)
                return fail(w, -ENOBUFS);
        put_be32(w->buf + off + 4, (uint32_t) len);
        return 0;
}

int ttlv_put_integer(struct ttlv_writer *w, uint32_t tag, int32_t v) {
        uint8_t b[4];
        put_be32(b, (uint32_t) v);
        return put_item(w, tag, TTLV_INTEGER, b, sizeof(b));
}

int ttlv_put_long(struct ttlv_writer *w, uint32_t tag, int64_t v) {
        uint8_t b[8];
        put_be64(b, (uint64_t) v);
        return put_item(w, tag, TTLV_LONG_INTEGER, b, sizeof(b));
}

int ttlv_put_big_integer(struct ttlv_writer *w, uint32_t tag, const uint8_t *v, size_t len) {
        if (len == 0 || len % 8 != 0)
                return fail(w, -EINVAL);
        return put_item(w, tag, TTLV_BIG_INTEGER, v, len);
}

int ttlv_put_enum(struct ttlv_writer *w, uint32_t tag, uint32_t v) {
        uint8_t b[4];
        put_be32(b, v);
        return put_item(w, tag, TTLV_ENUMERATION, b, sizeof(b));
}

int ttlv_put_bool(struct ttlv_writer *w, uint32_t tag, bool v) {
        uint8_t b[8];
        put_be64(b, v ? 1 : 0);
        return put_item(w, tag, TTLV_BOOLEAN, b, sizeof(b));
}

int ttlv_put_text(struct ttlv_writer *w, uint32_t tag, const char *s, size_t len) {
        return put_item(w, tag, TTLV_TEXT_STRING, s, len);
}

int ttlv_put_bytes(struct ttlv_writer *w, uint32_t tag, const uint8_t *v, size_t len) {
        return put_item(w, tag, TTLV_BYTE_STRING, v, len);
}

int ttlv_put_datetime(struct ttlv_writer *w, uint32_t tag, int64_t seconds) {
        uint8_t b[8];
        put_be64(b, (uint64_t) seconds);
        return put_item(w, tag, TTLV_DATE_TIME, b, sizeof(b));
}

int ttlv_put_interval(struct ttlv_writer *w, uint32_t tag, uint32_t seconds) {
        uint8_t b[4];
        put_be32(b, seconds);
        return put_item(w, tag, TTLV_INTERVAL, b, sizeof(b));
}

int ttlv_writer_finish(struct ttlv_writer *w, size_t *ret_len) {
        if (w->error < 0)
                return w->error;
        if (w->depth != 0)
                return fail(w, -EPROTO);
        if (ret_len)
                *ret_len = w->len;
        return 0;
}

/* ---- decoder ---------------------------------------------------------- */

static bool all_zero(const uint8_t *p, size_t n) {
        uint8_t d = 0;
        for (size_t i = 0; i < n; i++)
                d |= p[i];
        return d == 0;
}

/* Decode the item at p, of which `left` bytes lie inside the enclosing
 * structure (or the buffer), and check everything that can be checked
 * without descending: type, length against `left`, fixed sizes, padding.
 * *ret_size is the item's encoded size (header + padded value). */
static int read_item(const uint8_t *p, size_t left, unsigned depth,
                     struct ttlv_item *ret, size_t *ret_size) {
        if (depth == 0 || depth > TTLV_DEPTH_MAX)
                return -EBADMSG;
        if (left < TTLV_HEADER_SIZE)
                return -EBADMSG;

        uint32_t tag = (uint32_t) p[0] << 16 | (uint32_t) p[1] << 8 | p[2];
        uint8_t type = p[3];
        uint32_t length = get_be32(p + 4);
        if (!tag_valid(tag))
                return -EBADMSG;

        int fixed = fixed_length(type);
        if (fixed < 0)
                return -EBADMSG;
        if (fixed > 0 && length != (uint32_t) fixed)
                return -EBADMSG;
        /* A structure's value is a sequence of padded items, so its length is
         * a multiple of 8 itself; a Big Integer is sign-extended to 8-byte
         * blocks (section 9.1.1.4). */
        if ((type == TTLV_STRUCTURE || type == TTLV_BIG_INTEGER) && length % 8 != 0)
                return -EBADMSG;
        if (type == TTLV_BIG_INTEGER && length == 0)
                return -EBADMSG;

        uint64_t size = padded(length);
        if (size > left - TTLV_HEADER_SIZE)
                return -EBADMSG;

        const uint8_t *value = p + TTLV_HEADER_SIZE;
        if (!all_zero(value + length, (size_t) (size - length)))
                return -EBADMSG;
        /* Section 9.1.1.4: a Boolean is 0 (False) or 1 (True), nothing else. */
        if (type == TTLV_BOOLEAN && get_be64(value) > 1)
                return -EBADMSG;

        *ret = (struct ttlv_item) {
                .tag = tag,
                .type = type,
                .length = length,
                .value = value,
                .depth = depth,
        };
        *ret_size = TTLV_HEADER_SIZE + (size_t) size;
        return 0;
}

int ttlv_iter_init(struct ttlv_iter *it, const struct ttlv_item *parent) {
        if (!parent || parent->type != TTLV_STRUCTURE || !parent->value)
                return -EBADMSG;
        *it = (struct ttlv_iter) {
                .p = parent->value,
                .left = parent->length,
                .depth = parent->depth + 1,
        };
        return 0;
}

int ttlv_iter_next(struct ttlv_iter *it, struct ttlv_item *ret) {
        size_t size;
        int r;

        if (it->left == 0)
                return 0;
        r = read_item(it->p, it->left, it->depth, ret, &size);
        if (r < 0) {
                it->left = 0;       /* stop: the rest cannot be trusted */
                return r;
        }
        it->p += size;
        it->left -= size;
        return 1;
}

static int validate(const struct ttlv_item *item, size_t *count) {
        struct ttlv_iter it;
        struct ttlv_item child;
        int r;

        if (++*count > TTLV_ITEMS_MAX)
                return -EBADMSG;
        if (item->type != TTLV_STRUCTURE)
                return 0;
        r = ttlv_iter_init(&it, item);
        if (r < 0)
                return r;
        /* Recursion is bounded by TTLV_DEPTH_MAX (read_item refuses deeper). */
        while ((r = ttlv_iter_next(&it, &child)) > 0) {
                r = validate(&child, count);
                if (r < 0)
                        return r;
        }
        return r;
}

int ttlv_parse(const uint8_t *buf, size_t len, struct ttlv_item *ret) {
        struct ttlv_item root;
        size_t size, count = 0;
        int r;

        if (!buf || !ret)
                return -EBADMSG;
        r = read_item(buf, len, 1, &root, &size);
        if (r < 0)
                return r;
        if (size != len)
                return -EBADMSG;
        r = validate(&root, &count);
        if (r < 0)
                return r;
        *ret = root;
        return 0;
}

int ttlv_find(const struct ttlv_item *parent, uint32_t tag, uint8_t type, struct ttlv_item *ret) {
        struct ttlv_iter it;
        struct ttlv_item child;
        int r;

        r = ttlv_iter_init(&it, parent);
        if (r < 0)
                return r;
        while ((r = ttlv_iter_next(&it, &child)) > 0) {
                if (child.tag != tag)
                        continue;
                if (type != 0 && child.type != type)
                        return -EBADMSG;
                if (ret)
                        *ret = child;
                return 0;
        }
        return r < 0 ? r : -ENOENT;
}

int ttlv_count(const struct ttlv_item *parent, uint32_t tag) {
        struct ttlv_iter it;
        struct ttlv_item child;
        int r, n = 0;

        r = ttlv_iter_init(&it, parent);
        if (r < 0)
                return r;
        while ((r = ttlv_iter_next(&it, &child)) > 0)
                if (tag == 0 || child.tag == tag)
                        n++;
        return r < 0 ? r : n;
}

/* The accessors check type and length again: an item may have been filled
 * in by hand rather than by ttlv_parse(). */
static bool is(const struct ttlv_item *it, uint8_t type, uint32_t length) {
        return it && it->value && it->type == type && it->length == length;
}

int ttlv_get_integer(const struct ttlv_item *it, int32_t *ret) {
        if (!is(it, TTLV_INTEGER, 4))
                return -EBADMSG;
        *ret = (int32_t) get_be32(it->value);
        return 0;
}

int ttlv_get_long(const struct ttlv_item *it, int64_t *ret) {
        if (!is(it, TTLV_LONG_INTEGER, 8))
                return -EBADMSG;
        *ret = (int64_t) get_be64(it->value);
        return 0;
}

int ttlv_get_enum(const struct ttlv_item *it, uint32_t *ret) {
        if (!is(it, TTLV_ENUMERATION, 4))
                return -EBADMSG;
        *ret = get_be32(it->value);
        return 0;
}

int ttlv_get_bool(const struct ttlv_item *it, bool *ret) {
        if (!is(it, TTLV_BOOLEAN, 8))
                return -EBADMSG;
        uint64_t v = get_be64(it->value);
        if (v > 1)
                return -EBADMSG;
        *ret = v == 1;
        return 0;
}

int ttlv_get_datetime(const struct ttlv_item *it, int64_t *ret) {
        if (!is(it, TTLV_DATE_TIME, 8))
                return -EBADMSG;
        *ret = (int64_t) get_be64(it->value);
        return 0;
}

int ttlv_get_interval(const struct ttlv_item *it, uint32_t *ret) {
        if (!is(it, TTLV_INTERVAL, 4))
                return -EBADMSG;
        *ret = get_be32(it->value);
        return 0;
}

int ttlv_get_text(const struct ttlv_item *it, const char **ret, size_t *ret_len) {
        if (!it || !it->value || it->type != TTLV_TEXT_STRING)
                return -EBADMSG;
        *ret = (const char *) it->value;
        *ret_len = it->length;
        return 0;
}

int ttlv_get_bytes(const struct ttlv_item *it, const uint8_t **ret, size_t *ret_len) {
        if (!it || !it->value || (it->type != TTLV_BYTE_STRING && it->type != TTLV_BIG_INTEGER))
                return -EBADMSG;
        *ret = it->value;
        *ret_len = it->length;
        return 0;
}

int ttlv_copy_text(const struct ttlv_item *it, char *buf, size_t size) {
        const char *s;
        size_t n;
        int r;

        r = ttlv_get_text(it, &s, &n);
        if (r < 0)
                return r;
        if (memchr(s, 0, n))
                return -EBADMSG;
        if (n >= size || n > INT32_MAX)
                return -ENAMETOOLONG;
        memcpy(buf, s, n);
        buf[n] = 0;
        return (int) n;
}

bool ttlv_text_equal(const struct ttlv_item *it, const char *s) {
        const char *t;
        size_t n;

        if (ttlv_get_text(it, &t, &n) < 0)
                return false;
        return n == strlen(s) && memcmp(t, s, n) == 0;
}
