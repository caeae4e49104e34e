/* libFuzzer: the etcd snapshot audit (agent/snapshot/) on arbitrary bytes:
 * the bbolt reader, etcd's revision keys and KeyValue records, the
 * EncryptedObject decoding and both renderings of the report. The seeds in
 * tests/fuzz/corpus/fuzz-snapshot are backend files from real etcd (snapshots
 * without the SHA-256 trailer, which random changes would never match). */
#include <stdint.h>
#include <stdio.h>

#include "snapshot.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static const char *const required[] = { "secrets", "configmaps" };
        static FILE *null;
        struct snapshot_report *r = NULL;
        char err[512];

        if (!null)
                null = fopen("/dev/null", "we");
        if (snapshot_audit(data, size, required, 2, &r, err, sizeof(err)) < 0)
                return 0;
        snapshot_report_print(r, null);
        snapshot_report_print_json(r, null);
        snapshot_report_free(r);
        return 0;
}
