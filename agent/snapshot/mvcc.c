/* etcd's MVCC layout: the newest revision of every key (see mvcc.h). */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bbolt.h"
#include "mvcc.h"
#include "snapshot.pb-c.h"
#include "util.h"

int mvcc_revision_parse(const uint8_t *key, size_t len, struct mvcc_revision *ret) {
        uint64_t main, sub;

        if (len != MVCC_REVISION_SIZE && !(len == MVCC_REVISION_SIZE + 1 && key[len - 1] == MVCC_TOMBSTONE_MARK))
                return -EBADMSG;
        if (key[8] != '_')
                return -EBADMSG;
        memcpy(&main, key, sizeof(main));
        memcpy(&sub, key + 9, sizeof(sub));
        *ret = (struct mvcc_revision) {
                .main = be64toh(main),
                .sub = be64toh(sub),
                .tombstone = len == MVCC_REVISION_SIZE + 1,
        };
        return 0;
}

/* An open-addressing hash table of user keys; the keys live in one pool,
 * the values stay in the file. */
struct slot {
        uint64_t hash;                 /* 0: empty */
        uint64_t key_offset;           /* in the pool */
        uint32_t key_len;
        uint32_t record_len;
        const uint8_t *record;         /* the newest KeyValue, in the file */
        struct mvcc_revision revision;
};

struct mvcc_index {
        struct slot *slots;
        size_t capacity;               /* a power of two */
        size_t used;
        uint8_t *pool;
        size_t pool_used, pool_size;
        uint64_t revision;
};

void mvcc_index_free(struct mvcc_index *idx) {
        if (!idx)
                return;
        free(idx->slots);
        free(idx->pool);
        free(idx);
}

uint64_t mvcc_index_revision(const struct mvcc_index *idx) {
        return idx->revision;
}

static bool revision_newer(const struct mvcc_revision *a, const struct mvcc_revision *b) {
        return a->main > b->main || (a->main == b->main && a->sub > b->sub);
}

static int index_grow(struct mvcc_index *idx) {
        const size_t capacity = idx->capacity ? idx->capacity * 2 : 1024;
        struct slot *slots = calloc(capacity, sizeof(*slots));

        if (!slots)
                return -ENOMEM;
        for (size_t i = 0; i < idx->capacity; i++) {
                const struct slot *s = &idx->slots[i];
                size_t j;

                if (s->hash == 0)
                        continue;
                for (j = s->hash & (capacity - 1); slots[j].hash != 0; j = (j + 1) & (capacity - 1))
                        ;
                slots[j] = *s;
        }
        free(idx->slots);
        idx->slots = slots;
        idx->capacity = capacity;
        return 0;
}

static int pool_append(struct mvcc_index *idx, const uint8_t *key, size_t len, uint64_t *ret_offset) {
        if (!idx->pool || len > idx->pool_size - idx->pool_used) {
                size_t size = idx->pool_size ? idx->pool_size : 65536;
                uint8_t *pool;

                while (len > size - idx->pool_used)
                        size *= 2;
                pool = realloc(idx->pool, size);
                if (!pool)
                        return -ENOMEM;
                idx->pool = pool;
                idx->pool_size = size;
        }
        memcpy(idx->pool + idx->pool_used, key, len);
        *ret_offset = idx->pool_used;
        idx->pool_used += len;
        return 0;
}

static int index_put(struct mvcc_index *idx, const uint8_t *key, size_t key_len, const struct mvcc_revision *rev,
                     const uint8_t *record, size_t record_len) {
        const uint64_t hash = fnv1a64(key, key_len) | 1;   /* never 0, the empty mark */
        struct slot *s;
        int r;

        if (idx->used + 1 > idx->capacity / 4 * 3) {
                r = index_grow(idx);
                if (r < 0)
                        return r;
        }
        for (size_t i = hash & (idx->capacity - 1);; i = (i + 1) & (idx->capacity - 1)) {
                s = &idx->slots[i];
                if (s->hash == 0)
                        break;
                if (s->hash == hash && s->key_len == key_len && memcmp(idx->pool + s->key_offset, key, key_len) == 0) {
                        if (revision_newer(rev, &s->revision)) {
                                s->revision = *rev;
                                s->record = record;
                                s->record_len = (uint32_t) record_len;
                        }
                        return 0;
                }
        }
        if (idx->used >= MVCC_KEYS_MAX)
                return -E2BIG;
        r = pool_append(idx, key, key_len, &s->key_offset);
        if (r < 0)
                return r;
        s->hash = hash;
        s->key_len = (uint32_t) key_len;
        s->revision = *rev;
        s->record = record;
        s->record_len = (uint32_t) record_len;
        idx->used++;
        return 0;
}

/* protobuf-c leaves empty bytes NULL; memcmp, memchr and pointer arithmetic
 * want a pointer all the same. */
static const uint8_t *bytes_data(ProtobufCBinaryData b) {
        return b.len > 0 ? b.data : (const uint8_t *) "";
}

struct build {
        struct mvcc_index *idx;
        char *err;
        size_t err_size;
};

static int build_visit(const uint8_t *key, size_t key_len, const uint8_t *value, size_t value_len, bool is_bucket,
                       void *userdata) {
        struct build *b = userdata;
        Snapshot__KeyValue *kv;
        struct mvcc_revision rev;
        int r;

        if (is_bucket || mvcc_revision_parse(key, key_len, &rev) < 0) {
                errorf(b->err, b->err_size, "corrupt: the key bucket holds a %s that is not a revision",
                       is_bucket ? "bucket" : "key");
                return -EBADMSG;
        }
        kv = snapshot__key_value__unpack(NULL, value_len, value);
        if (!kv) {
                errorf(b->err, b->err_size, "corrupt: revision %" PRIu64 "_%" PRIu64 " is not a KeyValue",
                       rev.main, rev.sub);
                return -EBADMSG;
        }
        if (kv->key.len > MVCC_KEY_SIZE_MAX) {
                errorf(b->err, b->err_size, "revision %" PRIu64 "_%" PRIu64 ": a key of %zu bytes (at most %d)",
                       rev.main, rev.sub, kv->key.len, MVCC_KEY_SIZE_MAX);
                r = -E2BIG;
        } else {
                r = index_put(b->idx, bytes_data(kv->key), kv->key.len, &rev, value, value_len);
                if (r == -E2BIG)
                        errorf(b->err, b->err_size, "more than %" PRIu32 " keys", MVCC_KEYS_MAX);
        }
        snapshot__key_value__free_unpacked(kv, NULL);
        if (rev.main > b->idx->revision)
                b->idx->revision = rev.main;
        return r;
}

int mvcc_index_build(const struct bbolt *db, struct mvcc_index **ret, char *err, size_t err_size) {
        _cleanup_(mvcc_index_freep) struct mvcc_index *idx = calloc(1, sizeof(*idx));
        const struct bbolt_bucket root = bbolt_root(db);
        struct bbolt_bucket keys;
        struct build b = { .idx = idx, .err = err, .err_size = err_size };
        int r;

        if (!idx)
                return -ENOMEM;
        r = index_grow(idx);
        if (r < 0)
                return r;
        r = bbolt_bucket_open(db, &root, MVCC_KEY_BUCKET, &keys, err, err_size);
        if (r == -ENOENT) {
                errorf(err, err_size, "not an etcd v3 backend: no bucket '" MVCC_KEY_BUCKET "'");
                return -EBADMSG;
        }
        if (r < 0)
                return r;
        r = bbolt_walk(db, &keys, build_visit, &b, err, err_size);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(idx);
        return 0;
}

int mvcc_index_foreach_live(const struct mvcc_index *idx, mvcc_visit_t visit, void *userdata) {
        for (size_t i = 0; i < idx->capacity; i++) {
                const struct slot *s = &idx->slots[i];
                Snapshot__KeyValue *kv;
                int r;

                if (s->hash == 0 || s->revision.tombstone)
                        continue;
                /* Decoded once already (mvcc_index_build): only memory fails. */
                kv = snapshot__key_value__unpack(NULL, s->record_len, s->record);
                if (!kv)
                        return -ENOMEM;
                r = visit(bytes_data(kv->key), kv->key.len, bytes_data(kv->value), kv->value.len, userdata);
                snapshot__key_value__free_unpacked(kv, NULL);
                if (r < 0)
                        return r;
        }
        return 0;
}
