/* KMIP TTLV codec (OASIS KMIP Specification v1.2, section 9.1): every item is
 * a 3-byte Tag, a 1-byte Type, a 4-byte Length (big endian) and a Value
 * padded with zero bytes to a multiple of 8.
 *
 * The encoder appends to a caller-provided buffer and keeps a stack of open
 * structures whose lengths it patches when they close; its first error is
 * sticky, so a builder checks once, at ttlv_writer_finish().
 *
 * The decoder never allocates and never reads past its input: ttlv_parse()
 * validates a whole message up front (lengths against the enclosing
 * structure, fixed sizes, zero padding, depth and item count), and the
 * accessors below check again whatever they touch, so a struct ttlv_item
 * only ever describes bytes inside the buffer it came from.
 *
 * Knows nothing of sockets or of KMIP semantics (agent/kmip/message.c does). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TTLV_HEADER_SIZE 8
#define TTLV_DEPTH_MAX 16           /* nesting, the outer structure is depth 1 */
#define TTLV_ITEMS_MAX 65536        /* items in one message: a GetAttributes answer of
                                     * every version (CENTRAL_KEYS_MAX) is ~25 each */

/* KMIP 1.2 section 9.1.1.2 Item Type */
enum ttlv_type {
        TTLV_STRUCTURE = 0x01,
        TTLV_INTEGER = 0x02,
        TTLV_LONG_INTEGER = 0x03,
        TTLV_BIG_INTEGER = 0x04,
        TTLV_ENUMERATION = 0x05,
        TTLV_BOOLEAN = 0x06,
        TTLV_TEXT_STRING = 0x07,
        TTLV_BYTE_STRING = 0x08,
        TTLV_DATE_TIME = 0x09,
        TTLV_INTERVAL = 0x0A,
};

/* ---- encoder ---------------------------------------------------------- */

struct ttlv_writer {
        uint8_t *buf;
        size_t len, cap;
        size_t open[TTLV_DEPTH_MAX];        /* offsets of open structures */
        unsigned depth;
        int error;                          /* first error, sticky */
};

/* Write into buf (cap bytes; the caller owns and frees it). */
void ttlv_writer_init(struct ttlv_writer *w, uint8_t *buf, size_t cap);

/* Each returns the writer's error state: 0, or the first failure (-ENOBUFS
 * out of space, -EINVAL bad argument or nesting deeper than TTLV_DEPTH_MAX,
 * -EPROTO ttlv_end() without an open structure). */
int ttlv_begin(struct ttlv_writer *w, uint32_t tag);
int ttlv_end(struct ttlv_writer *w);
int ttlv_put_integer(struct ttlv_writer *w, uint32_t tag, int32_t v);
int ttlv_put_long(struct ttlv_writer *w, uint32_t tag, int64_t v);
/* Big Integer: two's complement big endian, len a non-zero multiple of 8
 * (section 9.1.1.4: sign-extended to whole 8-byte blocks). */
int ttlv_put_big_integer(struct ttlv_writer *w, uint32_t tag, const uint8_t *v, size_t len);
int ttlv_put_enum(struct ttlv_writer *w, uint32_t tag, uint32_t v);
int ttlv_put_bool(struct ttlv_writer *w, uint32_t tag, bool v);
int ttlv_put_text(struct ttlv_writer *w, uint32_t tag, const char *s, size_t len);
int ttlv_put_bytes(struct ttlv_writer *w, uint32_t tag, const uint8_t *v, size_t len);
int ttlv_put_datetime(struct ttlv_writer *w, uint32_t tag, int64_t seconds);
int ttlv_put_interval(struct ttlv_writer *w, uint32_t tag, uint32_t seconds);

/* The encoded length once every structure is closed. Returns 0, the sticky
 * error, or -EPROTO if a structure is still open. */
int ttlv_writer_finish(struct ttlv_writer *w, size_t *ret_len);

/* ---- decoder ---------------------------------------------------------- */

struct ttlv_item {
        uint32_t tag;
        uint8_t type;                       /* enum ttlv_type */
        uint32_t length;                    /* of the value, without padding */
        const uint8_t *value;               /* length bytes inside the input */
        unsigned depth;                     /* 1 for the outer item */
};

/* Validate buf as exactly one item (normally the outer structure of a
 * message) and return it. Returns 0, or -EBADMSG: unknown type, a length
 * that overruns the enclosing structure or the buffer, a fixed-size type
 * with another length, non-zero padding, a Boolean other than 0 or 1, a
 * tag outside 0x42xxxx/0x54xxxx, nesting deeper than TTLV_DEPTH_MAX, more
 * than TTLV_ITEMS_MAX items, or bytes left over. */
int ttlv_parse(const uint8_t *buf, size_t len, struct ttlv_item *ret);

/* Children of a structure, in order. */
struct ttlv_iter {
        const uint8_t *p;
        size_t left;
        unsigned depth;                     /* of the children */
};
/* -EBADMSG if parent is not a structure. */
int ttlv_iter_init(struct ttlv_iter *it, const struct ttlv_item *parent);
/* Returns 1 and the next child, 0 at the end, -EBADMSG if malformed. */
int ttlv_iter_next(struct ttlv_iter *it, struct ttlv_item *ret);

/* The first child of parent with this tag. Returns 0, -ENOENT if there is
 * none, -EBADMSG if parent is not a structure or is malformed, or if the child
 * has another type than `type` (pass 0 for any type). */
int ttlv_find(const struct ttlv_item *parent, uint32_t tag, uint8_t type, struct ttlv_item *ret);
/* How many children of parent have this tag (0 for any tag): >= 0 or -EBADMSG. */
int ttlv_count(const struct ttlv_item *parent, uint32_t tag);

/* Typed values: -EBADMSG if the item has another type. */
int ttlv_get_integer(const struct ttlv_item *it, int32_t *ret);
int ttlv_get_long(const struct ttlv_item *it, int64_t *ret);
int ttlv_get_enum(const struct ttlv_item *it, uint32_t *ret);
int ttlv_get_bool(const struct ttlv_item *it, bool *ret);
int ttlv_get_datetime(const struct ttlv_item *it, int64_t *ret);
int ttlv_get_interval(const struct ttlv_item *it, uint32_t *ret);
/* Text String: its bytes and length, not NUL-terminated. */
int ttlv_get_text(const struct ttlv_item *it, const char **ret, size_t *ret_len);
/* Byte String (or Big Integer with TTLV_BIG_INTEGER). */
int ttlv_get_bytes(const struct ttlv_item *it, const uint8_t **ret, size_t *ret_len);
/* A Text String as a C string in buf (size bytes with the NUL). Returns the
 * length, or -EBADMSG if it is not a Text String or holds a NUL byte, or
 * -ENAMETOOLONG if it does not fit (never truncates). */
int ttlv_copy_text(const struct ttlv_item *it, char *buf, size_t size);
/* Text String equal to the C string s. */
bool ttlv_text_equal(const struct ttlv_item *it, const char *s);

