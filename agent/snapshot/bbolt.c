/* bbolt, read-only and bounded (the format is described in bbolt.h). */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bbolt.h"
#include "macro.h"
#include "util.h"

uint64_t fnv1a64(const void *p, size_t n) {
        const uint8_t *b = p;
        uint64_t h = UINT64_C(0xcbf29ce484222325);

        for (size_t i = 0; i < n; i++) {
                h ^= b[i];
                h *= UINT64_C(0x100000001b3);
        }
        return h;
}

static uint16_t get_u16(const uint8_t *p) {
        uint16_t v;
        memcpy(&v, p, sizeof(v));
        return le16toh(v);
}

static uint32_t get_u32(const uint8_t *p) {
        uint32_t v;
        memcpy(&v, p, sizeof(v));
        return le32toh(v);
}

static uint64_t get_u64(const uint8_t *p) {
        uint64_t v;
        memcpy(&v, p, sizeof(v));
        return le64toh(v);
}

/* ---- meta pages ---------------------------------------------------------- */

struct meta {
        uint32_t page_size;
        uint64_t root_page, page_count, txid;
};

static const char beyond_end[] = "beyond the end of the file", no_magic[] = "no bbolt magic";

/* The meta page at offset: NULL if valid, else why not. */
static const char *meta_read(const uint8_t *data, size_t size, size_t offset, struct meta *m) {
        const uint8_t *p, *meta;

        if (offset > size || size - offset < BBOLT_PAGE_HEADER_SIZE + BBOLT_META_SIZE)
                return beyond_end;
        p = data + offset;
        meta = p + BBOLT_PAGE_HEADER_SIZE;
        if (get_u32(meta) != BBOLT_MAGIC)
                return no_magic;
        if (get_u32(meta + 4) != BBOLT_VERSION)
                return "unsupported bbolt version";
        if (get_u64(meta + BBOLT_META_CHECKSUMMED) != fnv1a64(meta, BBOLT_META_CHECKSUMMED))
                return "checksum mismatch";
        if (!(get_u16(p + 8) & BBOLT_PAGE_META))
                return "not flagged as a meta page";
        m->page_size = get_u32(meta + 8);
        if (m->page_size < BBOLT_PAGE_SIZE_MIN || m->page_size > BBOLT_PAGE_SIZE_MAX ||
            (m->page_size & (m->page_size - 1)))
                return "page size out of range";
        /* meta + 16: flags; + 16: root bucket header {root, sequence};
         * + 32: freelist; + 40: high-water mark; + 48: txid. */
        m->root_page = get_u64(meta + 16);
        m->page_count = get_u64(meta + 40);
        m->txid = get_u64(meta + 48);
        return NULL;
}

int bbolt_open(struct bbolt *db, const uint8_t *data, size_t size, char *err, size_t err_size) {
        struct meta m0, m1;
        const char *why0, *why1 = NULL;
        const struct meta *m;

        why0 = meta_read(data, size, 0, &m0);
        if (!why0)
                why1 = meta_read(data, size, m0.page_size, &m1);
        else
                /* Page 0 unreadable: page 1 is at its own page size, the
                 * first one that holds the magic. */
                for (uint32_t ps = BBOLT_PAGE_SIZE_MIN; ps <= BBOLT_PAGE_SIZE_MAX; ps *= 2) {
                        why1 = meta_read(data, size, ps, &m1);
                        if (!why1 && m1.page_size != ps)
                                why1 = "page size does not match its position";
                        if (why1 != no_magic && why1 != beyond_end)
                                break;
                }
        if (why0 && why1) {
                errorf(err, err_size, "not a valid bbolt file: meta page 0: %s; meta page 1: %s", why0, why1);
                return -EBADMSG;
        }
        m = why0 ? &m1 : why1 ? &m0 : m0.txid >= m1.txid ? &m0 : &m1;

        if (m->page_count < 3 || m->page_count > size / m->page_size) {
                errorf(err, err_size, "truncated or corrupt: the meta page (txid %" PRIu64 ") says %" PRIu64
                       " pages of %" PRIu32 " bytes, the file has %zu bytes", m->txid, m->page_count,
                       m->page_size, size);
                return -EBADMSG;
        }
        if (m->root_page < 2 || m->root_page >= m->page_count) {
                errorf(err, err_size, "corrupt: root page %" PRIu64 " out of range (%" PRIu64 " pages)",
                       m->root_page, m->page_count);
                return -EBADMSG;
        }
        *db = (struct bbolt) {
                .data = data,
                .size = size,
                .page_size = m->page_size,
                .page_count = m->page_count,
                .txid = m->txid,
                .root_page = m->root_page,
        };
        return 0;
}

struct bbolt_bucket bbolt_root(const struct bbolt *db) {
        return (struct bbolt_bucket) { .root_page = db->root_page };
}

/* ---- walking a bucket ---------------------------------------------------- */

struct walk {
        const struct bbolt *db;
        uint8_t *visited;                 /* one bit per page id */
        bbolt_visit_t visit;
        void *userdata;
        char *err;
        size_t err_size;
};

/* page 0 stands for an inline bucket (page 0 is a meta page, never walked). */
static int corrupt(struct walk *w, uint64_t page, const char *what) {
        if (page == 0)
                errorf(w->err, w->err_size, "corrupt: an inline bucket: %s", what);
        else
                errorf(w->err, w->err_size, "corrupt: page %" PRIu64 ": %s", page, what);
        return -EBADMSG;
}

/* The page with this id and its extent (with its overflow pages). */
static int page_get(struct walk *w, uint64_t id, const uint8_t **ret, size_t *ret_span) {
        const struct bbolt *db = w->db;
        const uint8_t *p;
        uint32_t overflow;

        /* 0 and 1 are the meta pages; page_count * page_size <= size (bbolt_open). */
        if (id < 2 || id >= db->page_count)
                return corrupt(w, id, "page id out of range");
        p = db->data + id * db->page_size;
        overflow = get_u32(p + 12);
        if (overflow >= db->page_count - id)
                return corrupt(w, id, "overflow pages run past the end of the file");
        if (get_u64(p) != id)
                return corrupt(w, id, "its header names another page id");
        if (w->visited[id / 8] & (1u << (id % 8)))
                return corrupt(w, id, "reached twice (a cycle in the tree)");
        w->visited[id / 8] |= (uint8_t) (1u << (id % 8));
        *ret = p;
        *ret_span = ((size_t) overflow + 1) * db->page_size;
        return 0;
}

static int walk_page(struct walk *w, uint64_t id, const uint8_t *page, size_t span, unsigned depth);

static int walk_child(struct walk *w, uint64_t id, unsigned depth) {
        const uint8_t *page;
        size_t span;
        int r;

        if (depth > BBOLT_DEPTH_MAX)
                return corrupt(w, id, "the tree is deeper than bbolt.h's BBOLT_DEPTH_MAX levels");
        r = page_get(w, id, &page, &span);
        if (r < 0)
                return r;
        return walk_page(w, id, page, span, depth);
}

/* id is for messages only. */
static int walk_page(struct walk *w, uint64_t id, const uint8_t *page, size_t span, unsigned depth) {
        uint16_t flags, count;
        int r;

        if (span < BBOLT_PAGE_HEADER_SIZE)
                return corrupt(w, id, "shorter than a page header");
        flags = get_u16(page + 8);
        count = get_u16(page + 10);
        if ((size_t) count * BBOLT_ELEMENT_SIZE > span - BBOLT_PAGE_HEADER_SIZE)
                return corrupt(w, id, "more elements than fit in the page");

        for (size_t i = 0; i < count; i++) {
                const size_t at = BBOLT_PAGE_HEADER_SIZE + i * BBOLT_ELEMENT_SIZE;
                const uint8_t *e = page + at;

                if (flags & BBOLT_PAGE_BRANCH) {
                        r = walk_child(w, get_u64(e + 8), depth + 1);
                } else if (flags & BBOLT_PAGE_LEAF) {
                        /* u32 values: the sums cannot overflow 64 bits. */
                        const uint64_t key_at = (uint64_t) at + get_u32(e + 4), key_len = get_u32(e + 8),
                                       value_len = get_u32(e + 12);

                        if (key_at + key_len + value_len > span)
                                return corrupt(w, id, "a leaf element lies outside the page");
                        r = w->visit(page + key_at, key_len, page + key_at + key_len, value_len,
                                     get_u32(e) & BBOLT_LEAF_BUCKET, w->userdata);
                } else
                        return corrupt(w, id, "neither a branch nor a leaf page");
                if (r != 0)
                        return r;
        }
        return 0;
}

int bbolt_walk(const struct bbolt *db, const struct bbolt_bucket *bucket, bbolt_visit_t visit, void *userdata,
               char *err, size_t err_size) {
        _cleanup_free_ uint8_t *visited = calloc(db->page_count / 8 + 1, 1);
        struct walk w = {
                .db = db,
                .visited = visited,
                .visit = visit,
                .userdata = userdata,
                .err = err,
                .err_size = err_size,
        };

        if (!visited)
                return -ENOMEM;
        if (bucket->root_page != 0)
                return walk_child(&w, bucket->root_page, 0);
        /* An inline bucket is a single leaf page. */
        if (bucket->inline_size >= BBOLT_PAGE_HEADER_SIZE &&
            !(get_u16(bucket->inline_page + 8) & BBOLT_PAGE_LEAF))
                return corrupt(&w, 0, "not a leaf page");
        return walk_page(&w, 0, bucket->inline_page, bucket->inline_size, 0);
}

struct bucket_lookup {
        const char *name;
        size_t name_len;
        struct bbolt_bucket *found;
        bool short_header;
};

static int bucket_lookup_visit(const uint8_t *key, size_t key_len, const uint8_t *value, size_t value_len,
                               bool is_bucket, void *userdata) {
        struct bucket_lookup *l = userdata;

        if (!is_bucket || key_len != l->name_len || memcmp(key, l->name, key_len) != 0)
                return 0;
        if (value_len < BBOLT_BUCKET_HEADER_SIZE) {
                l->short_header = true;
                return -EBADMSG;
        }
        *l->found = (struct bbolt_bucket) { .root_page = get_u64(value) };
        if (l->found->root_page == 0) {
                l->found->inline_page = value + BBOLT_BUCKET_HEADER_SIZE;
                l->found->inline_size = value_len - BBOLT_BUCKET_HEADER_SIZE;
        }
        return 1;
}

int bbolt_bucket_open(const struct bbolt *db, const struct bbolt_bucket *parent, const char *name,
                      struct bbolt_bucket *ret, char *err, size_t err_size) {
        struct bucket_lookup l = { .name = name, .name_len = strlen(name), .found = ret };
        int r;

        r = bbolt_walk(db, parent, bucket_lookup_visit, &l, err, err_size);
        if (l.short_header)
                errorf(err, err_size, "corrupt: bucket '%s' has a short header", name);
        if (r < 0)
                return r;
        return r > 0 ? 0 : -ENOENT;
}
