/* common/socket.c: unix_socket_listen and unix_socket_peer. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmocka.h>

#include "macro.h"
#include "socket.h"

struct dir {
        char path[64];
        char sock[128];
};

static int setup(void **state) {
        struct dir *d = calloc(1, sizeof(*d));

        assert_non_null(d);
        snprintf(d->path, sizeof(d->path), "/tmp/test-socket.XXXXXX");
        assert_non_null(mkdtemp(d->path));
        snprintf(d->sock, sizeof(d->sock), "%s/kms.sock", d->path);
        *state = d;
        return 0;
}

static int teardown(void **state) {
        struct dir *d = *state;

        unlink(d->sock);
        rmdir(d->path);
        free(d);
        return 0;
}

static int connect_to(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

        assert_true(fd >= 0);
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0) {
                int r = -errno;
                close(fd);
                return r;
        }
        return fd;
}

static void test_unix_socket_listen_mode_ignores_umask(void **state) {
        struct dir *d = *state;
        struct stat st;
        mode_t old;
        int fd, fl;

        /* a permissive umask must not widen the mode ... */
        old = umask(0000);
        fd = unix_socket_listen(d->sock, 0600);
        umask(old);
        assert_true(fd >= 0);
        assert_int_equal(lstat(d->sock, &st), 0);
        assert_true(S_ISSOCK(st.st_mode));
        assert_int_equal(st.st_mode & 07777, 0600);
        fl = fcntl(fd, F_GETFL);
        assert_true(fl & O_NONBLOCK);
        assert_true(fcntl(fd, F_GETFD) & FD_CLOEXEC);
        close(fd);
        unlink(d->sock);

        /* ... and a strict one must not narrow it */
        old = umask(0077);
        fd = unix_socket_listen(d->sock, 0660);
        umask(old);
        assert_true(fd >= 0);
        assert_int_equal(lstat(d->sock, &st), 0);
        assert_int_equal(st.st_mode & 07777, 0660);
        /* the process umask is restored */
        old = umask(0022);
        assert_int_equal(old, 0022);
        close(fd);
}

static void test_unix_socket_listen_accepts(void **state) {
        struct dir *d = *state;
        int fd = unix_socket_listen(d->sock, 0600), c, a;

        assert_true(fd >= 0);
        c = connect_to(d->sock);
        assert_true(c >= 0);
        a = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        assert_true(a >= 0);
        close(a);
        close(c);
        close(fd);
}

static void test_unix_socket_listen_replaces_stale(void **state) {
        struct dir *d = *state;
        int fd, c;

        /* a previous instance died without unlinking its socket */
        fd = unix_socket_listen(d->sock, 0600);
        assert_true(fd >= 0);
        close(fd);
        assert_int_equal(connect_to(d->sock), -ECONNREFUSED);

        fd = unix_socket_listen(d->sock, 0600);
        assert_true(fd >= 0);
        c = connect_to(d->sock);
        assert_true(c >= 0);
        close(c);
        close(fd);
}

static void test_unix_socket_listen_refuses_live(void **state) {
        struct dir *d = *state;
        int fd, c;

        fd = unix_socket_listen(d->sock, 0600);
        assert_true(fd >= 0);
        assert_int_equal(unix_socket_listen(d->sock, 0600), -EADDRINUSE);
        /* the live instance keeps its socket */
        c = connect_to(d->sock);
        assert_true(c >= 0);
        close(c);
        close(fd);
}

static void test_unix_socket_listen_keeps_regular_file(void **state) {
        struct dir *d = *state;
        struct stat st;
        int fd;

        fd = open(d->sock, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, "keep", 4), 4);
        close(fd);

        assert_int_equal(unix_socket_listen(d->sock, 0600), -EEXIST);
        assert_int_equal(lstat(d->sock, &st), 0);
        assert_true(S_ISREG(st.st_mode));
        assert_int_equal(st.st_size, 4);
}

static void test_unix_socket_listen_keeps_symlink(void **state) {
        struct dir *d = *state;
        struct stat st;

        assert_int_equal(symlink("/nonexistent", d->sock), 0);
        assert_int_equal(unix_socket_listen(d->sock, 0600), -EEXIST);
        assert_int_equal(lstat(d->sock, &st), 0);
        assert_true(S_ISLNK(st.st_mode));
}

static void test_unix_socket_listen_path_too_long(void **state) {
        char path[200];

        memset(path, 'a', sizeof(path) - 1);
        path[0] = '/';
        path[sizeof(path) - 1] = '\0';
        assert_int_equal(unix_socket_listen(path, 0600), -ENAMETOOLONG);
        /* exactly sizeof(sun_path) - 1 characters still fit */
        path[sizeof(((struct sockaddr_un *) 0)->sun_path)] = '\0';
        assert_int_equal(unix_socket_listen(path, 0600), -ENAMETOOLONG);
}

static void test_unix_socket_listen_bad_args(void **state) {
        assert_int_equal(unix_socket_listen(NULL, 0600), -EINVAL);
        assert_int_equal(unix_socket_listen("", 0600), -EINVAL);
        assert_int_equal(unix_socket_listen("relative.sock", 0600), -EINVAL);
        assert_int_equal(unix_socket_listen("/nonexistent-dir/x/kms.sock", 0600), -ENOENT);
}

static void test_unix_socket_peer_self(void **state) {
        struct dir *d = *state;
        struct peer_cred p = { .pid = -1 };
        int fd, c, a;

        fd = unix_socket_listen(d->sock, 0600);
        assert_true(fd >= 0);
        c = connect_to(d->sock);
        assert_true(c >= 0);
        a = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        assert_true(a >= 0);

        assert_int_equal(unix_socket_peer(a, &p), 0);
        assert_int_equal(p.uid, getuid());
        assert_int_equal(p.gid, getgid());
        assert_int_equal(p.pid, getpid());
        assert_int_equal(unix_socket_peer(c, &p), 0);
        assert_int_equal(p.pid, getpid());

        assert_true(unix_socket_peer(-1, &p) < 0);
        close(a);
        close(c);
        close(fd);
}

int main(void) {
        const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
                T(test_unix_socket_listen_mode_ignores_umask),
                T(test_unix_socket_listen_accepts),
                T(test_unix_socket_listen_replaces_stale),
                T(test_unix_socket_listen_refuses_live),
                T(test_unix_socket_listen_keeps_regular_file),
                T(test_unix_socket_listen_keeps_symlink),
                T(test_unix_socket_listen_path_too_long),
                T(test_unix_socket_listen_bad_args),
                T(test_unix_socket_peer_self),
#undef T
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
