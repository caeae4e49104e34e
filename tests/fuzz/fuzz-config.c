/* libFuzzer: config_load on arbitrary bytes, through a memfd so that the
 * real path (fopen, our line reader, inih) runs. Checks that a failure always
 * names the file and leaves the config untouched, and that a success passes
 * the whole-config checks. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static struct config c, before;
        char path[64], err[512];
        size_t off = 0;
        int fd, r;

        fd = memfd_create("fuzz-config", MFD_CLOEXEC);
        if (fd < 0)
                abort();
        while (off < size) {
                ssize_t k = write(fd, data + off, size - off);

                if (k <= 0)
                        abort();
                off += (size_t) k;
        }
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);

        memset(&c, 0x5a, sizeof(c));
        before = c;
        r = config_load(path, &c, err, sizeof(err));
        if (r < 0) {
                if (r != -EINVAL || strncmp(err, path, strlen(path)) != 0 ||
                    memcmp(&c, &before, sizeof(c)) != 0)
                        abort();
        } else {
                if (r != 0 || c.n_allowed_uids == 0 || c.n_allowed_uids > CONFIG_MAX_UIDS ||
                    c.n_endpoints > CENTRAL_ENDPOINTS_MAX || c.kms_socket[0] != '/' ||
                    c.control_socket[0] != '/' ||
                    (tpm_pcr_selection_is_empty(&c.pcrs) && !c.insecure_no_pcr_policy) ||
                    (c.central_type == CENTRAL_KMIP && c.n_endpoints == 0))
                        abort();
        }
        close(fd);
        return 0;
}
