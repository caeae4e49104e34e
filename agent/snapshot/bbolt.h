/* A read-only, bounded reader for bbolt, the B+tree file under etcd v3
 * (internal to agent/snapshot/).
 *
 * The file is an array of pages of one size. Every page starts with a
 * 16-byte header (u64 id, u16 flags, u16 count, u32 overflow: the number of
 * further pages it spans). Pages 0 and 1 are meta pages; the valid one
 * (magic, version 2, FNV-1a 64 checksum over its first 56 bytes) with the
 * higher transaction id is current. A bucket is a B+tree of branch pages
 * (elements: u32 pos, u32 ksize, u64 child page id) over leaf pages
 * (elements: u32 flags, u32 pos, u32 ksize, u32 vsize); pos counts from the
 * element itself. A leaf element with flag 1 is a nested bucket whose value
 * is a 16-byte bucket header (u64 root page id, u64 sequence), followed,
 * when the root is 0, by the bucket's one leaf page inline. Integers are in
 * the byte order of the machine that wrote the file: little-endian here (etcd
 * on amd64 and arm64).
 *
 * Nothing outside [data, data + size) is read; a page id beyond the meta
 * page's high-water mark, a page whose overflow runs past it, a page whose
 * header names another id, a page reached twice in one walk (a cycle, or a
 * subtree shared by two parents), a tree deeper than BBOLT_DEPTH_MAX and
 * elements outside their page are errors (-EBADMSG, with the page id in err),
 * so a walk visits each page at most once. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BBOLT_PAGE_HEADER_SIZE 16
#define BBOLT_ELEMENT_SIZE 16
#define BBOLT_BUCKET_HEADER_SIZE 16
#define BBOLT_META_SIZE 64                     /* the meta struct after the page header */
#define BBOLT_META_CHECKSUMMED 56              /* bytes before the checksum field */
#define BBOLT_MAGIC UINT32_C(0xED0CDAED)
#define BBOLT_VERSION 2
#define BBOLT_PAGE_SIZE_MIN 1024
#define BBOLT_PAGE_SIZE_MAX 65536
#define BBOLT_DEPTH_MAX 32                     /* B+tree levels (etcd's are < 10) */

enum {
        BBOLT_PAGE_BRANCH = 0x01,
        BBOLT_PAGE_LEAF = 0x02,
        BBOLT_PAGE_META = 0x04,
        BBOLT_PAGE_FREELIST = 0x10,
};
#define BBOLT_LEAF_BUCKET 0x01

struct bbolt {
        const uint8_t *data;
        size_t size;
        uint32_t page_size;
        uint64_t page_count;       /* the current meta's high-water mark */
        uint64_t txid;
        uint64_t root_page;        /* the root bucket's B+tree */
};

/* A bucket: a B+tree from root_page, or (root_page 0) one inline leaf page. */
struct bbolt_bucket {
        uint64_t root_page;
        const uint8_t *inline_page;
        size_t inline_size;
};

/* Called for each leaf element of a bucket, in page order. Returns < 0 to
 * abort the walk with that error, > 0 to stop it (the walk returns the
 * value), 0 to go on. key and value point into the file. */
typedef int (*bbolt_visit_t)(const uint8_t *key, size_t key_len, const uint8_t *value, size_t value_len,
                             bool is_bucket, void *userdata);

/* FNV-1a 64-bit (bbolt's meta checksum; also a fast hash for keys). */
uint64_t fnv1a64(const void *p, size_t n);

/* Check the meta pages of the bbolt file in [data, data + size) and fill db.
 * Returns 0, or -EBADMSG (no valid meta page, or the file is shorter than
 * the current meta says: truncated) with the reason in err. */
int bbolt_open(struct bbolt *db, const uint8_t *data, size_t size, char *err, size_t err_size);

/* The root bucket: the one whose elements are the top-level buckets. */
struct bbolt_bucket bbolt_root(const struct bbolt *db);

/* Find the nested bucket called name in parent. Returns 0, -ENOENT when
 * there is none (or name is a plain key), -EBADMSG (corrupt; err says where). */
int bbolt_bucket_open(const struct bbolt *db, const struct bbolt_bucket *parent, const char *name,
                      struct bbolt_bucket *ret, char *err, size_t err_size);

/* Visit every leaf element of bucket (not descending into nested buckets).
 * Returns 0 when all were visited, the visitor's positive value when it
 * stopped, its negative value, -EBADMSG (corrupt; err says where) or
 * -ENOMEM. */
int bbolt_walk(const struct bbolt *db, const struct bbolt_bucket *bucket, bbolt_visit_t visit, void *userdata,
               char *err, size_t err_size);
