/* Unix stream sockets (see socket.h). */
#include <errno.h>
#include <stdbool.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <stddef.h>
#include <sys/un.h>
#include <unistd.h>

#include "macro.h"
#include "socket.h"

#define LISTEN_BACKLOG 128

static int bind_with_mode(int fd, const struct sockaddr_un *sa, socklen_t len, mode_t mode) {
        mode_t old;
        int r;

        /* bind() creates the file as 0777 & ~umask and fchmod() on the socket
         * before bind does not reach the inode on Linux: narrow the umask
         * around bind so the file is never wider than mode, not even for a
         * moment. (umask is per process; nothing else here creates files.) */
        old = umask(~mode & 0777);
        r = bind(fd, (const struct sockaddr *) sa, len);
        r = r < 0 ? -errno : 0;
        umask(old);
        return r;
}

/* Is something accepting connections on path? 1 yes, 0 no (stale), <0 error. */
static int socket_is_live(const struct sockaddr_un *sa, socklen_t len) {
        _cleanup_close_ int fd = -1;

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (const struct sockaddr *) sa, len) == 0)
                return 1;
        /* A full backlog (EAGAIN) still means a live listener. */
        if (errno == EAGAIN || errno == EINPROGRESS)
                return 1;
        if (errno == ECONNREFUSED || errno == ENOENT)
                return 0;
        return -errno;
}

int unix_socket_listen(const char *path, mode_t mode) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;
        socklen_t len;
        size_t l;
        int r;

        if (!path || path[0] != '/')
                return -EINVAL;   /* no abstract or relative names: modes matter */
        l = strlen(path);
        if (l >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        memcpy(sa.sun_path, path, l);
        len = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + l + 1);

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return -errno;

        r = bind_with_mode(fd, &sa, len, mode);
        if (r == -EADDRINUSE) {
                struct stat st;

                /* Something is at path. Only a socket nobody answers on may be
                 * replaced: a live second instance is refused, and a regular
                 * file (or symlink, or directory) is never unlinked. */
                if (lstat(path, &st) < 0) {
                        if (errno != ENOENT)
                                return -errno;
                } else {
                        if (!S_ISSOCK(st.st_mode))
                                return -EEXIST;
                        r = socket_is_live(&sa, len);
                        if (r < 0)
                                return r;
                        if (r > 0)
                                return -EADDRINUSE;
                        if (unlink(path) < 0 && errno != ENOENT)
                                return -errno;
                }
                r = bind_with_mode(fd, &sa, len, mode);
        }
        if (r < 0)
                return r;

        /* A default ACL on the directory overrides the umask: set the mode
         * explicitly too. */
        if (chmod(path, mode) < 0) {
                r = -errno;
                (void) unlink(path);
                return r;
        }
        if (listen(fd, LISTEN_BACKLOG) < 0) {
                r = -errno;
                (void) unlink(path);
                return r;
        }
        return TAKE_FD(fd);
}

int unix_socket_peer(int fd, struct peer_cred *ret) {
        struct ucred uc;
        socklen_t len = sizeof(uc);

        if (!ret)
                return -EINVAL;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &len) < 0)
                return -errno;
        if (len != sizeof(uc))
                return -EIO;
        ret->pid = uc.pid;
        ret->uid = uc.uid;
        ret->gid = uc.gid;
        return 0;
}
