/* agent/snapshot/: the bbolt reader on crafted (and hostile) pages, etcd's
 * revision keys, and the audit's newest-revision rule on a crafted backend. */
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

#include "audit.h"
#include "bbolt.h"
#include "mvcc.h"
#include "snapshot.h"

#define PS 4096u
#define PAGES 48u

static uint8_t file[PAGES * PS];
static char err[256];

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static void page_header(uint64_t id, uint16_t flags, uint16_t count, uint32_t overflow) {
        uint8_t *p = file + id * PS;

        put64(p, id);
        put16(p + 8, flags);
        put16(p + 10, count);
        put32(p + 12, overflow);
}

static void meta(uint64_t id, uint64_t txid, uint64_t root, uint64_t page_count) {
        uint8_t *m = file + id * PS + BBOLT_PAGE_HEADER_SIZE;

        page_header(id, BBOLT_PAGE_META, 0, 0);
        put32(m, BBOLT_MAGIC);
        put32(m + 4, BBOLT_VERSION);
        put32(m + 8, PS);
        put64(m + 16, root);
        put64(m + 40, page_count);
        put64(m + 48, txid);
        put64(m + BBOLT_META_CHECKSUMMED, fnv1a64(m, BBOLT_META_CHECKSUMMED));
}

struct kv {
        const void *key;
        size_t key_len;
        const void *value;
        size_t value_len;
        uint32_t flags;
};

/* A leaf page at p (a page of the file, or an inline page): elements, then
 * keys and values. Returns its length. */
static size_t leaf_at(uint8_t *p, uint64_t id, const struct kv *kvs, size_t n, uint32_t overflow) {
        size_t data = BBOLT_PAGE_HEADER_SIZE + n * BBOLT_ELEMENT_SIZE;

        put64(p, id);
        put16(p + 8, BBOLT_PAGE_LEAF);
        put16(p + 10, (uint16_t) n);
        put32(p + 12, overflow);
        for (size_t i = 0; i < n; i++) {
                uint8_t *e = p + BBOLT_PAGE_HEADER_SIZE + i * BBOLT_ELEMENT_SIZE;

                put32(e, kvs[i].flags);
                put32(e + 4, (uint32_t) (data - (size_t) (e - p)));
                put32(e + 8, (uint32_t) kvs[i].key_len);
                put32(e + 12, (uint32_t) kvs[i].value_len);
                memcpy(p + data, kvs[i].key, kvs[i].key_len);
                memcpy(p + data + kvs[i].key_len, kvs[i].value, kvs[i].value_len);
                data += kvs[i].key_len + kvs[i].value_len;
        }
        return data;
}

static void leaf(uint64_t id, const struct kv *kvs, size_t n) {
        leaf_at(file + id * PS, id, kvs, n, 0);
}

static void branch(uint64_t id, const uint64_t *children, size_t n) {
        page_header(id, BBOLT_PAGE_BRANCH, (uint16_t) n, 0);
        for (size_t i = 0; i < n; i++) {
                uint8_t *e = file + id * PS + BBOLT_PAGE_HEADER_SIZE + i * BBOLT_ELEMENT_SIZE;

                put32(e, 0);
                put32(e + 4, 0);
                put64(e + 8, children[i]);
        }
}

static int reset(void **state) {
        memset(file, 0, sizeof(file));
        err[0] = '\0';
        meta(0, 4, 2, PAGES);
        meta(1, 3, 2, PAGES);
        return 0;
}

struct visits {
        size_t n;
        size_t last_value_len;
};

static int count_visit(const uint8_t *key, size_t key_len, const uint8_t *value, size_t value_len, bool is_bucket,
                       void *userdata) {
        struct visits *v = userdata;

        v->n++;
        v->last_value_len = value_len;
        return 0;
}

static int walk_root(struct visits *v) {
        struct bbolt db;
        struct bbolt_bucket root;

        assert_int_equal(bbolt_open(&db, file, sizeof(file), err, sizeof(err)), 0);
        root = bbolt_root(&db);
        return bbolt_walk(&db, &root, count_visit, v, err, sizeof(err));
}

static void test_bbolt_open_newer_meta(void **state) {
        struct bbolt db;

        meta(1, 9, 5, PAGES);
        assert_int_equal(bbolt_open(&db, file, sizeof(file), err, sizeof(err)), 0);
        assert_int_equal(db.txid, 9);
        assert_int_equal(db.root_page, 5);
        assert_int_equal(db.page_size, PS);
}

static void test_bbolt_open_bad_checksum_falls_back(void **state) {
        struct bbolt db;

        meta(1, 9, 5, PAGES);
        file[PS + BBOLT_PAGE_HEADER_SIZE + 48] ^= 1;           /* txid of page 1 */
        assert_int_equal(bbolt_open(&db, file, sizeof(file), err, sizeof(err)), 0);
        assert_int_equal(db.txid, 4);
        assert_int_equal(db.root_page, 2);
}

static void test_bbolt_open_no_valid_meta(void **state) {
        struct bbolt db;

        file[BBOLT_PAGE_HEADER_SIZE + 20] ^= 1;
        file[PS + BBOLT_PAGE_HEADER_SIZE] ^= 1;
        assert_int_equal(bbolt_open(&db, file, sizeof(file), err, sizeof(err)), -EBADMSG);
        assert_non_null(strstr(err, "meta page 0: checksum mismatch"));
        assert_non_null(strstr(err, "meta page 1: no bbolt magic"));
        memset(file, 0, sizeof(file));
        assert_int_equal(bbolt_open(&db, file, 100, err, sizeof(err)), -EBADMSG);
}

static void test_bbolt_open_truncated(void **state) {
        struct bbolt db;

        assert_int_equal(bbolt_open(&db, file, (PAGES - 1) * PS, err, sizeof(err)), -EBADMSG);
        assert_non_null(strstr(err, "truncated"));
}

static void test_bbolt_walk_leaf(void **state) {
        const struct kv kvs[] = { { "a", 1, "1", 1, 0 }, { "b", 1, "22", 2, 0 } };
        struct visits v = {};

        leaf(2, kvs, 2);
        assert_int_equal(walk_root(&v), 0);
        assert_int_equal(v.n, 2);
        assert_int_equal(v.last_value_len, 2);
}

static void test_bbolt_walk_branches(void **state) {
        const struct kv kvs[] = { { "a", 1, "1", 1, 0 } };
        struct visits v = {};

        branch(2, (uint64_t[]) { 3, 4 }, 2);
        leaf(3, kvs, 1);
        leaf(4, kvs, 1);
        assert_int_equal(walk_root(&v), 0);
        assert_int_equal(v.n, 2);
}

static void test_bbolt_walk_cycle(void **state) {
        struct visits v = {};

        branch(2, (uint64_t[]) { 3 }, 1);
        branch(3, (uint64_t[]) { 2 }, 1);
        assert_int_equal(walk_root(&v), -EBADMSG);
        assert_non_null(strstr(err, "page 2: reached twice"));
}

static void test_bbolt_walk_shared_subtree(void **state) {
        const struct kv kvs[] = { { "a", 1, "1", 1, 0 } };
        struct visits v = {};

        /* Shared children would make the walk exponential in the depth. */
        branch(2, (uint64_t[]) { 3, 3 }, 2);
        leaf(3, kvs, 1);
        assert_int_equal(walk_root(&v), -EBADMSG);
        assert_int_equal(v.n, 1);
}

static void test_bbolt_walk_page_out_of_range(void **state) {
        struct visits v = {};

        branch(2, (uint64_t[]) { PAGES }, 1);
        assert_int_equal(walk_root(&v), -EBADMSG);
        assert_non_null(strstr(err, "out of range"));
        branch(2, (uint64_t[]) { 1 }, 1);                     /* a meta page */
        assert_int_equal(walk_root(&v), -EBADMSG);
        branch(2, (uint64_t[]) { UINT64_MAX }, 1);
        assert_int_equal(walk_root(&v), -EBADMSG);
}

static void test_bbolt_walk_overflow_past_end(void **state) {
        const struct kv kvs[] = { { "a", 1, "1", 1, 0 } };
        struct visits v = {};

        branch(2, (uint64_t[]) { PAGES - 2 }, 1);
        leaf_at(file + (PAGES - 2) * PS, PAGES - 2, kvs, 1, 2);
        assert_int_equal(walk_root(&v), -EBADMSG);
        assert_non_null(strstr(err, "run past the end"));
        put32(file + (PAGES - 2) * PS + 12, UINT32_MAX);
        assert_int_equal(walk_root(&v), -EBADMSG);
}

static void test_bbolt_walk_overflow_value(void **state) {
        static uint8_t big[PS + 100];
        const struct kv kvs[] = { { "big", 3, big, sizeof(big), 0 } };
        struct visits v = {};

        memset(big, 0x5a, sizeof(big));
        leaf_at(file + 2 * PS, 2, kvs, 1, 1);
        assert_int_equal(walk_root(&v), 0);
        assert_int_equal(v.last_value_len, sizeof(big));
        put32(file + 2 * PS + 12, 0);                          /* the value now runs past its page */
        assert_int_equal(walk_root(&v), -EBADMSG);
        assert_non_null(strstr(err, "outside the page"));
}

static void test_bbolt_walk_hostile_elements(void **state) {
        const struct kv kvs[] = { { "a", 1, "1", 1, 0 } };
        struct visits v = {};

        leaf(2, kvs, 1);
        put32(file + 2 * PS + BBOLT_PAGE_HEADER_SIZE + 4, UINT32_MAX);     /* pos */
        assert_int_equal(walk_root(&v), -EBADMSG);
        leaf(2, kvs, 1);
        put32(file + 2 * PS + BBOLT_PAGE_HEADER_SIZE + 12, UINT32_MAX);    /* vsize */
        assert_int_equal(walk_root(&v), -EBADMSG);
        page_header(2, BBOLT_PAGE_LEAF, UINT16_MAX, 0);                    /* count */
        assert_int_equal(walk_root(&v), -EBADMSG);
        assert_non_null(strstr(err, "more elements than fit"));
        page_header(2, BBOLT_PAGE_FREELIST, 1, 0);
        assert_int_equal(walk_root(&v), -EBADMSG);
        page_header(3, BBOLT_PAGE_LEAF, 0, 0);
        put64(file + 2 * PS, 3);                                           /* names another id */
        assert_int_equal(walk_root(&v), -EBADMSG);
        assert_non_null(strstr(err, "another page id"));
}

static void test_bbolt_walk_depth(void **state) {
        const struct kv kvs[] = { { "a", 1, "1", 1, 0 } };
        struct visits v = {};

        for (uint64_t id = 2; id < 2 + BBOLT_DEPTH_MAX + 2; id++)
                branch(id, (uint64_t[]) { id + 1 }, 1);
        leaf(2 + BBOLT_DEPTH_MAX + 2, kvs, 1);
        assert_int_equal(walk_root(&v), -EBADMSG);
        assert_non_null(strstr(err, "deeper"));
        assert_int_equal(v.n, 0);
}

static void test_bbolt_inline_bucket(void **state) {
        const struct kv inner[] = { { "x", 1, "1", 1, 0 }, { "y", 1, "2", 1, 0 } };
        uint8_t value[BBOLT_BUCKET_HEADER_SIZE + 256] = { 0 };
        size_t len = BBOLT_BUCKET_HEADER_SIZE + leaf_at(value + BBOLT_BUCKET_HEADER_SIZE, 0, inner, 2, 0);
        const struct kv outer[] = { { "plain", 5, "v", 1, 0 }, { "key", 3, value, len, BBOLT_LEAF_BUCKET } };
        struct bbolt db;
        struct bbolt_bucket root, b;
        struct visits v = {};

        leaf(2, outer, 2);
        assert_int_equal(bbolt_open(&db, file, sizeof(file), err, sizeof(err)), 0);
        root = bbolt_root(&db);
        assert_int_equal(bbolt_bucket_open(&db, &root, "plain", &b, err, sizeof(err)), -ENOENT);
        assert_int_equal(bbolt_bucket_open(&db, &root, "nope", &b, err, sizeof(err)), -ENOENT);
        assert_int_equal(bbolt_bucket_open(&db, &root, "key", &b, err, sizeof(err)), 0);
        assert_int_equal(b.root_page, 0);
        assert_int_equal(bbolt_walk(&db, &b, count_visit, &v, err, sizeof(err)), 0);
        assert_int_equal(v.n, 2);

        /* An inline "page" claiming more elements than its value holds. */
        put16(value + BBOLT_BUCKET_HEADER_SIZE + 10, 200);
        leaf(2, outer, 2);
        assert_int_equal(bbolt_bucket_open(&db, &root, "key", &b, err, sizeof(err)), 0);
        assert_int_equal(bbolt_walk(&db, &b, count_visit, &v, err, sizeof(err)), -EBADMSG);
        assert_non_null(strstr(err, "inline bucket"));

        /* A bucket value shorter than a bucket header. */
        leaf(2, (struct kv[]) { { "key", 3, "short", 5, BBOLT_LEAF_BUCKET } }, 1);
        assert_int_equal(bbolt_bucket_open(&db, &root, "key", &b, err, sizeof(err)), -EBADMSG);
        assert_non_null(strstr(err, "short header"));
}

static void test_mvcc_revision_parse(void **state) {
        uint8_t key[MVCC_REVISION_SIZE + 1] = { 0, 0, 0, 0, 0, 0, 1, 2, '_', 0, 0, 0, 0, 0, 0, 0, 3, 't' };
        struct mvcc_revision rev;

        assert_int_equal(mvcc_revision_parse(key, MVCC_REVISION_SIZE, &rev), 0);
        assert_int_equal(rev.main, 0x102);
        assert_int_equal(rev.sub, 3);
        assert_false(rev.tombstone);
        assert_int_equal(mvcc_revision_parse(key, MVCC_REVISION_SIZE + 1, &rev), 0);
        assert_true(rev.tombstone);
        key[MVCC_REVISION_SIZE] = 'x';
        assert_int_equal(mvcc_revision_parse(key, MVCC_REVISION_SIZE + 1, &rev), -EBADMSG);
        assert_int_equal(mvcc_revision_parse(key, 16, &rev), -EBADMSG);
        key[8] = '-';
        assert_int_equal(mvcc_revision_parse(key, MVCC_REVISION_SIZE, &rev), -EBADMSG);
}

/* A revision key and an mvccpb.KeyValue {1: key, 5: value}, encoded here
 * by hand (short fields: one-byte lengths). */
struct record {
        uint8_t rev[MVCC_REVISION_SIZE + 1];
        size_t rev_len;
        uint8_t kv[256];
        size_t kv_len;
};

static void record(struct record *r, uint64_t main, bool tombstone, const char *key, const char *value) {
        uint64_t be = htobe64(main), sub = 0;
        size_t n = 0;

        memcpy(r->rev, &be, 8);
        r->rev[8] = '_';
        memcpy(r->rev + 9, &sub, 8);
        r->rev[MVCC_REVISION_SIZE] = 't';
        r->rev_len = MVCC_REVISION_SIZE + tombstone;
        r->kv[n++] = 0x0a;
        r->kv[n++] = (uint8_t) strlen(key);
        memcpy(r->kv + n, key, strlen(key));
        n += strlen(key);
        if (value) {
                r->kv[n++] = 0x2a;
                r->kv[n++] = (uint8_t) strlen(value);
                memcpy(r->kv + n, value, strlen(value));
                n += strlen(value);
        }
        r->kv_len = n;
}

static void test_snapshot_audit_newest_revision(void **state) {
        /* EncryptedObject {2: keyID "k1"} */
        static const char kms[] = "k8s:enc:kms:v2:tpmkms:\x12\x02k1";
        struct record recs[6];
        struct kv kvs[6];
        uint8_t value[BBOLT_BUCKET_HEADER_SIZE] = { 0 };
        const struct resource *secrets;
        const char *required[] = { "secrets" };
        _cleanup_(snapshot_report_freep) struct snapshot_report *r = NULL;

        record(&recs[0], 2, false, "/registry/secrets/ns/a", "{plain}");
        record(&recs[1], 3, false, "/registry/secrets/ns/a", kms);         /* overwritten: encrypted now */
        record(&recs[2], 4, false, "/registry/secrets/ns/b", kms);
        record(&recs[3], 5, false, "/registry/secrets/ns/b", "{plain}");   /* overwritten: plaintext now */
        record(&recs[4], 6, false, "/registry/secrets/ns/c", "{plain}");
        record(&recs[5], 7, true, "/registry/secrets/ns/c", NULL);         /* deleted */
        for (size_t i = 0; i < 6; i++)
                kvs[i] = (struct kv) { recs[i].rev, recs[i].rev_len, recs[i].kv, recs[i].kv_len, 0 };
        put64(value, 3);
        leaf(2, (struct kv[]) { { "key", 3, value, sizeof(value), BBOLT_LEAF_BUCKET } }, 1);
        leaf(3, kvs, 6);

        assert_int_equal(snapshot_audit(file, sizeof(file), required, 1, &r, err, sizeof(err)), 0);
        assert_int_equal(r->revision, 7);
        assert_int_equal(r->live_keys, 2);
        assert_int_equal(snapshot_report_unencrypted(r), 1);
        assert_int_equal(r->n_resources, 1);
        secrets = &r->resources[0];
        assert_string_equal(secrets->name, "secrets");
        assert_int_equal(secrets->by_class[VALUE_PLAINTEXT], 1);
        assert_int_equal(secrets->by_class[VALUE_KMS_V2], 1);
        assert_int_equal(secrets->n_key_ids, 1);
        assert_string_equal(secrets->key_ids[0].provider, "tpmkms");
        assert_string_equal(secrets->key_ids[0].key_id, "k1");
        assert_int_equal(secrets->n_plaintext_names, 1);
        assert_string_equal(secrets->plaintext_names[0], "ns/b");

        /* No "key" bucket: not an etcd backend. */
        leaf(2, (struct kv[]) { { "meta", 4, value, sizeof(value), BBOLT_LEAF_BUCKET } }, 1);
        assert_int_equal(snapshot_audit(file, sizeof(file), NULL, 0, &r, err, sizeof(err)), -EBADMSG);
        assert_non_null(strstr(err, "not an etcd v3 backend"));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup(test_bbolt_open_newer_meta, reset),
                cmocka_unit_test_setup(test_bbolt_open_bad_checksum_falls_back, reset),
                cmocka_unit_test_setup(test_bbolt_open_no_valid_meta, reset),
                cmocka_unit_test_setup(test_bbolt_open_truncated, reset),
                cmocka_unit_test_setup(test_bbolt_walk_leaf, reset),
                cmocka_unit_test_setup(test_bbolt_walk_branches, reset),
                cmocka_unit_test_setup(test_bbolt_walk_cycle, reset),
                cmocka_unit_test_setup(test_bbolt_walk_shared_subtree, reset),
                cmocka_unit_test_setup(test_bbolt_walk_page_out_of_range, reset),
                cmocka_unit_test_setup(test_bbolt_walk_overflow_past_end, reset),
                cmocka_unit_test_setup(test_bbolt_walk_overflow_value, reset),
                cmocka_unit_test_setup(test_bbolt_walk_hostile_elements, reset),
                cmocka_unit_test_setup(test_bbolt_walk_depth, reset),
                cmocka_unit_test_setup(test_bbolt_inline_bucket, reset),
                cmocka_unit_test(test_mvcc_revision_parse),
                cmocka_unit_test_setup(test_snapshot_audit_newest_revision, reset),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
