/* Reading the files the daemon and the CLI trust (configuration, cache,
 * owner authorisation): whatever is at the path, a FIFO, a device, a huge
 * file or a symlink, the read neither blocks nor runs without bound. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Read the whole regular file path (relative to dirfd, or AT_FDCWD),
 * opened O_NONBLOCK|O_NOCTTY|O_CLOEXEC (and O_NOFOLLOW unless follow) and
 * checked with fstat to be a regular file of at most max bytes; read to
 * end of file, a read error kept apart from it. *ret is malloc'ed with a
 * NUL after the *ret_len bytes. Returns 0; -ENOENT; -ELOOP (a symlink and
 * !follow); -EISDIR; -EINVAL (not a regular file or a directory); -EFBIG (over max, also if it grew
 * while read); -ENOMEM; another negative errno. */
int read_file_bounded(int dirfd, const char *path, size_t max, bool follow, uint8_t **ret, size_t *ret_len);

/* The same for a file that holds a secret (the owner authorisation): no
 * copy is left behind, the buffer is never realloc'ed (it is allocated at
 * max + 1 bytes) and is wiped on every failure. Free *ret with
 * erase_and_free(*ret, max + 1). */
int read_secret_file_bounded(int dirfd, const char *path, size_t max, uint8_t **ret, size_t *ret_len);
