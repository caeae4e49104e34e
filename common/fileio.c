/* Bounded reads of trusted files (see fileio.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"
#include "macro.h"

/* The open and the fstat checks both readers share: an fd of a regular
 * file of at most max bytes (its size in *ret_size if not NULL), or a negative errno
 * (see fileio.h). */
static int open_regular_bounded(int dirfd, const char *path, size_t max, bool follow, size_t *ret_size) {
        _cleanup_close_ int fd = -1;
        struct stat st;

        /* O_NONBLOCK: opening a FIFO with no writer would block for ever. */
        fd = openat(dirfd, path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC | (follow ? 0 : O_NOFOLLOW));
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (S_ISDIR(st.st_mode))
                return -EISDIR;
        if (!S_ISREG(st.st_mode))
                return -EINVAL;
        if ((uint64_t) st.st_size > max)
                return -EFBIG;
        if (ret_size)
                *ret_size = (size_t) st.st_size;
        return TAKE_FD(fd);
}

int read_file_bounded(int dirfd, const char *path, size_t max, bool follow, uint8_t **ret, size_t *ret_len) {
        _cleanup_close_ int fd = -1;
        _cleanup_free_ uint8_t *buf = NULL;
        size_t size = 0, cap, len = 0;

        if (!path || !ret || !ret_len || max > SIZE_MAX / 2)
                return -EINVAL;
        fd = open_regular_bounded(dirfd, path, max, follow, &size);
        if (fd < 0)
                return fd;

        /* The size is a hint: read to end of file, but never past max. */
        cap = size + 1;
        buf = malloc(cap + 1);
        if (!buf)
                return -ENOMEM;
        for (;;) {
                ssize_t k;

                if (len == cap) {
                        uint8_t *nbuf;

                        if (cap > max)
                                return -EFBIG;
                        cap = cap * 2 > max + 1 ? max + 1 : cap * 2;
                        nbuf = realloc(buf, cap + 1);
                        if (!nbuf)
                                return -ENOMEM;
                        buf = nbuf;
                }
                k = read(fd, buf + len, cap - len);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        break;
                len += (size_t) k;
        }
        if (len > max)
                return -EFBIG;
        buf[len] = '\0';
        *ret = TAKE_PTR(buf);
        *ret_len = len;
        return 0;
}

int read_secret_file_bounded(int dirfd, const char *path, size_t max, uint8_t **ret, size_t *ret_len) {
        _cleanup_close_ int fd = -1;
        uint8_t *buf;
        size_t len = 0;

        if (!path || !ret || !ret_len || max > SIZE_MAX / 2)
                return -EINVAL;
        fd = open_regular_bounded(dirfd, path, max, true, NULL);
        if (fd < 0)
                return fd;
        buf = malloc(max + 1);
        if (!buf)
                return -ENOMEM;
        for (;;) {
                ssize_t k = read(fd, buf + len, max + 1 - len);

                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0) {
                        int r = -errno;
                        erase_and_free(buf, max + 1);
                        return r;
                }
                if (k == 0)
                        break;
                len += (size_t) k;
                if (len > max) {
                        erase_and_free(buf, max + 1);
                        return -EFBIG;
                }
        }
        buf[len] = '\0';
        *ret = buf;
        *ret_len = len;
        return 0;
}
