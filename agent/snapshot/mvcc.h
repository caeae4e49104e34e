/* etcd's MVCC layout in its bbolt backend (internal to agent/snapshot/).
 *
 * The bucket "key" holds every revision etcd still keeps (everything since
 * the last compaction): its keys are revisions, 8 bytes big-endian main
 * revision, '_', 8 bytes big-endian sub revision, and one more byte 't' for
 * a tombstone (a delete); its values are mvccpb.KeyValue messages
 * (agent/snapshot/snapshot.proto) naming the user key. A user key's state is
 * its record with the highest revision; a key whose newest record is a
 * tombstone is deleted. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "macro.h"

struct bbolt;

#define MVCC_REVISION_SIZE 17
#define MVCC_TOMBSTONE_MARK 't'
#define MVCC_KEY_BUCKET "key"
/* Bounds on what one index holds: Kubernetes keys are a few hundred bytes. */
#define MVCC_KEYS_MAX (UINT32_C(1) << 24)
#define MVCC_KEY_SIZE_MAX 65536

struct mvcc_revision {
        uint64_t main, sub;
        bool tombstone;
};

/* Parse a key of the "key" bucket. Returns 0 or -EBADMSG. */
int mvcc_revision_parse(const uint8_t *key, size_t len, struct mvcc_revision *ret);

/* The newest revision of every user key in a backend. */
struct mvcc_index;

/* Read the "key" bucket of db. Returns 0, -EBADMSG (no such bucket, a record
 * that is not a revision and a KeyValue, or a corrupt tree; err says which),
 * -E2BIG (over MVCC_KEYS_MAX keys or a key over MVCC_KEY_SIZE_MAX bytes) or
 * -ENOMEM. */
int mvcc_index_build(const struct bbolt *db, struct mvcc_index **ret, char *err, size_t err_size);
void mvcc_index_free(struct mvcc_index *idx);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct mvcc_index *, mvcc_index_free);

/* The highest main revision seen (0 when the bucket is empty). */
uint64_t mvcc_index_revision(const struct mvcc_index *idx);

/* Called once per live (not deleted) user key with its newest value. */
typedef int (*mvcc_visit_t)(const uint8_t *key, size_t key_len, const uint8_t *value, size_t value_len,
                            void *userdata);

/* Visit every live key, in no particular order. Returns 0, the visitor's
 * negative value, or -ENOMEM. */
int mvcc_index_foreach_live(const struct mvcc_index *idx, mvcc_visit_t visit, void *userdata);
