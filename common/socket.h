/* Unix stream sockets, shared by the KMS v2 endpoint (plugin/) and the
 * agent's control socket. */
#pragma once

#include <sys/types.h>

/* The process on the other end of a connection (SO_PEERCRED). */
struct peer_cred {
        pid_t pid;
        uid_t uid;
        gid_t gid;
};

/* Bind and listen on path with the given mode (umask-proof). A stale socket
 * file is replaced only if nothing answers on it. Returns the fd, -EADDRINUSE
 * if a live instance answers there, -ENAMETOOLONG, or another negative errno. */
int unix_socket_listen(const char *path, mode_t mode);
/* SO_PEERCRED of a connected socket. Returns 0 or a negative errno. */
int unix_socket_peer(int fd, struct peer_cred *ret);
