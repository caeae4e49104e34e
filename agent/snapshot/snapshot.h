/* Auditing an etcd v3 snapshot for what Kubernetes stored unencrypted
 * (tpmkmsctl audit-snapshot). The snapshot is read in place (mmap), read
 * only, without etcd and without the tpmkms configuration: the bbolt file
 * (agent/snapshot/bbolt.h), etcd's MVCC records in it (mvcc.h), the newest
 * revision of each key under /registry/, and its storage prefix
 * (docs/kms-v2-contract.md, "What etcd stores"). Values are classified,
 * never printed: the report holds counts, KMS v2 key ids and the names of
 * plaintext objects of the required resource types. */
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "macro.h"

/* Bounds on one report. */
#define SNAPSHOT_REQUIRED_MAX 64          /* --require-encrypted resource types */
#define SNAPSHOT_RESOURCES_MAX 4096       /* resource types */
#define SNAPSHOT_KEY_IDS_MAX 4096         /* (provider, key id) pairs per resource type */

struct snapshot_report;

/* Audit the snapshot in [data, data + size): a file `etcdctl snapshot save`
 * wrote (bbolt plus a SHA-256 of it, checked when present) or an etcd
 * backend file (member/snap/db). required names the resource types whose
 * objects must be encrypted ("secrets", "certificates.cert-manager.io").
 * Returns 0 and the report, or -EBADMSG (not an etcd v3 snapshot, corrupt,
 * truncated: err says what), -E2BIG (over a bound of snapshot.h or mvcc.h),
 * -ENOMEM. data is not used after the call. */
int snapshot_audit(const uint8_t *data, size_t size, const char *const *required, size_t n_required,
                   struct snapshot_report **ret, char *err, size_t err_size);

/* The same for the file at path, mapped read-only. Also returns the
 * negative errno of open, fstat or mmap, and -EINVAL for something that is
 * not a non-empty regular file. */
int snapshot_audit_file(const char *path, const char *const *required, size_t n_required,
                        struct snapshot_report **ret, char *err, size_t err_size);

void snapshot_report_free(struct snapshot_report *r);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct snapshot_report *, snapshot_report_free);

/* How many objects of the required types are stored in plaintext. */
uint64_t snapshot_report_unencrypted(const struct snapshot_report *r);

/* The report as tables for people, or as one JSON object (tpmkmsctl(8)). */
void snapshot_report_print(const struct snapshot_report *r, FILE *out);
void snapshot_report_print_json(const struct snapshot_report *r, FILE *out);
