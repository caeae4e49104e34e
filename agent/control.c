#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <systemd/sd-event.h>
#include <unistd.h>

#include "macro.h"
#include "util.h"
#include "control.h"
#include "log.h"
#include "plugin.h"

/* Root's commands are few; the cap keeps a client that opens connections
 * and holds them from taking the file descriptors the KMS socket needs. */
#define CONTROL_CONNECTIONS_MAX 16
#define ACCEPT_RETRY_USEC (100 * USEC_PER_MSEC)   /* after EMFILE and friends */

struct control_server {
        sd_event *event;
        struct control_conn *conns;
        sd_event_source *listener;
        sd_event_source *retry;     /* re-enables the listener after an accept failure */
        unsigned n_conns;
        bool paused;                /* accept failed: the retry timer re-enables */
        int fd;
        char *path;
        control_handler_t handler;
        void *userdata;
};

struct control_conn {
        struct control_server *server;
        struct control_conn *prev, *next;
        bool deferred;
        void (*on_drop)(struct control_conn *c, void *userdata);
        void *drop_userdata;
        sd_event_source *io;
        sd_event_source *timer;
        int fd;
        size_t len;
        char line[CONTROL_LINE_MAX + 1];
};

static void control_conn_free(struct control_conn *c) {
        if (c->on_drop)
                c->on_drop(c, c->drop_userdata);
        /* A slot is free again: take the next one waiting in the backlog. */
        if (c->server->n_conns-- == CONTROL_CONNECTIONS_MAX && !c->server->paused)
                (void) sd_event_source_set_enabled(c->server->listener, SD_EVENT_ON);
        if (c->prev)
                c->prev->next = c->next;
        else
                c->server->conns = c->next;
        if (c->next)
                c->next->prev = c->prev;
        sd_event_source_disable_unref(c->io);
        sd_event_source_disable_unref(c->timer);
        if (c->fd >= 0)
                close(c->fd);
        free(c);
}

static void control_conn_send(struct control_conn *c, int r, const char *body, size_t body_len,
                              const char *err) {
        char head[600];

        /* The client is root's tpmkmsctl; bound a stuck one with a send
         * timeout rather than buffering replies on the event loop. */
        (void) setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO,
                          &(struct timeval) { .tv_sec = 2 }, sizeof(struct timeval));
        (void) fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) & ~O_NONBLOCK);
        snprintf(head, sizeof(head), r < 0 ? "ERR %s\n" : "OK\n", err && *err ? err : strerror(-r));
        if (write_all(c->fd, head, strlen(head)) >= 0 && r >= 0 && body)
                (void) write_all(c->fd, body, body_len);
}

void control_conn_reply(struct control_conn *c, int r, const char *body, const char *err) {
        c->on_drop = NULL;   /* answered: the owner lets go of it itself */
        control_conn_send(c, r, body, body ? strlen(body) : 0, err);
        control_conn_free(c);
}

void control_conn_on_drop(struct control_conn *c, void (*fn)(struct control_conn *c, void *userdata),
                          void *userdata) {
        c->on_drop = fn;
        c->drop_userdata = userdata;
}

/* A deferred conn ends unanswered: say why rather than just closing. */
static void control_conn_drop(struct control_conn *c, const char *why) {
        if (c->deferred)
                control_conn_send(c, -ETIMEDOUT, NULL, 0, why);
        control_conn_free(c);
}

int control_parse_line(char *line, char *argv[CONTROL_ARGS_MAX + 1], char *err, size_t err_size) {
        char *save = NULL;
        int argc = 0;

        for (char *tok = strtok_r(line, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save)) {
                if (argc == CONTROL_ARGS_MAX) {
                        errorf(err, err_size, "too many arguments (at most %d)", CONTROL_ARGS_MAX);
                        return -E2BIG;
                }
                if (!utf8_valid(tok)) {
                        errorf(err, err_size, "argument %d is not valid UTF-8", argc);
                        return -EINVAL;
                }
                argv[argc++] = tok;
        }
        argv[argc] = NULL;
        if (argc == 0) {
                errorf(err, err_size, "empty command");
                return -EINVAL;
        }
        return argc;
}

/* Returns true when the handler kept c for a deferred reply. */
static bool control_conn_answer(struct control_conn *c) {
        char *argv[CONTROL_ARGS_MAX + 1], err[512] = "";
        _cleanup_free_ char *body = NULL;
        size_t body_len = 0;
        int argc, r;
        FILE *out;

        argc = control_parse_line(c->line, argv, err, sizeof(err));
        out = open_memstream(&body, &body_len);
        if (!out)
                r = -ENOMEM;
        else if (argc < 0)
                r = argc;
        else
                r = c->server->handler(c->server->userdata, c, argc, argv, out, err, sizeof(err));
        if (out)
                fclose(out);
        if (r == CONTROL_DEFERRED) {
                uint64_t now;
                c->deferred = true;
                /* Stop reading; the answer comes when the work is done, within
                 * the client's own timeout. */
                (void) sd_event_source_set_enabled(c->io, SD_EVENT_OFF);
                (void) sd_event_now(c->server->event, CLOCK_MONOTONIC, &now);
                (void) sd_event_source_set_time(c->timer, now + CONTROL_TIMEOUT_USEC);
                return true;
        }
        control_conn_send(c, r, body, body_len, err);
        return false;
}

static int control_conn_on_io(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        struct control_conn *c = userdata;
        char *nl;
        ssize_t n;

        n = read(fd, c->line + c->len, CONTROL_LINE_MAX - c->len);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return 0;
        if (n <= 0) {
                control_conn_free(c);
                return 0;
        }
        c->len += (size_t) n;
        c->line[c->len] = 0;
        nl = memchr(c->line, '\n', c->len);
        if (!nl) {
                if (c->len < CONTROL_LINE_MAX)
                        return 0;
                (void) write_all(fd, "ERR command line too long\n", 26);
                control_conn_free(c);
                return 0;
        }
        *nl = 0;
        if (!control_conn_answer(c))
                control_conn_free(c);
        return 0;
}

static int control_conn_on_timeout(sd_event_source *src, uint64_t usec, void *userdata) {
        control_conn_drop(userdata, "no answer in time: the work is still running; see 'tpmkmsctl status'");
        return 0;
}

static int control_on_retry(sd_event_source *src, uint64_t usec, void *userdata) {
        struct control_server *s = userdata;

        s->paused = false;
        if (s->n_conns < CONTROL_CONNECTIONS_MAX)
                (void) sd_event_source_set_enabled(s->listener, SD_EVENT_ON);
        return 0;
}

static int control_on_accept(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        struct control_server *s = userdata;
        _cleanup_close_ int cfd = -1;
        struct control_conn *c;
        struct peer_cred peer;
        uint64_t now;
        int r;

        cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0) {
                if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
                        return 0;
                /* EMFILE, ENFILE, ENOBUFS, ENOMEM: the listener stays
                 * readable, so pause it instead of spinning. */
                log_warning("Control socket: accept: %m; pausing it for %llu ms",
                            (unsigned long long) (ACCEPT_RETRY_USEC / USEC_PER_MSEC));
                (void) sd_event_source_set_enabled(s->listener, SD_EVENT_OFF);
                s->paused = true;
                (void) sd_event_now(s->event, CLOCK_MONOTONIC, &now);
                if (s->retry)
                        r = sd_event_source_set_time(s->retry, now + ACCEPT_RETRY_USEC) < 0 ? -1
                            : sd_event_source_set_enabled(s->retry, SD_EVENT_ONESHOT);
                else
                        r = sd_event_add_time(s->event, &s->retry, CLOCK_MONOTONIC, now + ACCEPT_RETRY_USEC, 0,
                                              control_on_retry, s);
                if (r < 0) {   /* no timer: better a busy listener than a dead one */
                        s->paused = false;
                        (void) sd_event_source_set_enabled(s->listener, SD_EVENT_ON);
                }
                return 0;
        }
        r = unix_socket_peer(cfd, &peer);
        if (r < 0 || peer.uid != 0) {
                log_warning("Control socket: refused peer uid=%u pid=%i (root only)",
                            r < 0 ? (unsigned) -1 : (unsigned) peer.uid, r < 0 ? 0 : (int) peer.pid);
                return 0;
        }
        c = calloc(1, sizeof(*c));
        if (!c)
                return 0;
        c->server = s;
        c->fd = TAKE_FD(cfd);
        c->next = s->conns;
        if (s->conns)
                s->conns->prev = c;
        s->conns = c;
        /* At the cap, stop accepting: later clients wait in the kernel's
         * backlog (holding no descriptor of ours) until a slot is free; an
         * idle connection is closed after 5 s. */
        if (++s->n_conns == CONTROL_CONNECTIONS_MAX) {
                log_warning("Control socket: %u connections open; new ones wait until one closes", s->n_conns);
                (void) sd_event_source_set_enabled(s->listener, SD_EVENT_OFF);
        }
        r = sd_event_add_io(s->event, &c->io, c->fd, EPOLLIN, control_conn_on_io, c);
        if (r >= 0) {
                (void) sd_event_now(s->event, CLOCK_MONOTONIC, &now);
                r = sd_event_add_time(s->event, &c->timer, CLOCK_MONOTONIC, now + 5 * USEC_PER_SEC, 0,
                                      control_conn_on_timeout, c);
        }
        if (r < 0)
                control_conn_free(c);
        return 0;
}

int control_server_new(sd_event *e, const char *path, control_handler_t handler, void *userdata,
                       struct control_server **ret) {
        struct control_server *s;
        int r;

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->event = sd_event_ref(e);
        s->handler = handler;
        s->userdata = userdata;
        s->fd = unix_socket_listen(path, 0600);
        if (s->fd < 0) {
                r = s->fd;
                control_server_free(s);
                return r;
        }
        s->path = strdup(path);
        r = s->path ? sd_event_add_io(e, &s->listener, s->fd, EPOLLIN, control_on_accept, s) : -ENOMEM;
        if (r < 0) {
                control_server_free(s);
                return r;
        }
        *ret = s;
        return 0;
}

void control_server_free(struct control_server *s) {
        if (!s)
                return;
        while (s->conns)
                control_conn_drop(s->conns, "tpmkmsd is stopping");
        sd_event_source_disable_unref(s->listener);
        sd_event_source_disable_unref(s->retry);
        if (s->fd >= 0) {
                close(s->fd);
                if (s->path)
                        (void) unlink(s->path);
        }
        free(s->path);
        sd_event_unref(s->event);
        free(s);
}

int control_call(const char *path, int argc, char **argv, FILE *out, char *err, size_t err_size) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;
        char line[CONTROL_LINE_MAX + 1] = "", head[600];
        size_t pos = 0, hlen = 0;
        bool in_head = true;
        char buf[4096];
        ssize_t n;
        int sent;

        for (int i = 0; i < argc; i++) {
                int w = snprintf(line + pos, sizeof(line) - pos, "%s%s", i ? " " : "", argv[i]);
                if (w < 0 || (size_t) w >= sizeof(line) - pos - 1) {
                        snprintf(err, err_size, "command line too long");
                        return -E2BIG;
                }
                pos += (size_t) w;
        }
        line[pos++] = '\n';

        if (strlen(path) >= sizeof(sa.sun_path)) {
                snprintf(err, err_size, "control socket path too long: %s", path);
                return -ENAMETOOLONG;
        }
        strcpy(sa.sun_path, path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0) {
                int e = errno;
                snprintf(err, err_size, "cannot reach tpmkmsd at %s: %s%s", path, strerror(e),
                         e == ENOENT || e == ECONNREFUSED ? " (is tpmkmsd running?)" :
                         e == EACCES ? " (run as root)" : "");
                return -e;
        }
        (void) setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO,
                          &(struct timeval) { .tv_sec = CONTROL_TIMEOUT_USEC / USEC_PER_SEC },
                          sizeof(struct timeval));
        /* A daemon that refuses the connection (too many) answers ERR and
         * closes before reading: the send may fail, the reply is still there. */
        sent = write_all(fd, line, pos);
        while ((n = read(fd, buf, sizeof(buf))) > 0) {
                size_t off = 0;
                if (in_head) {
                        for (; off < (size_t) n && in_head; off++) {
                                if (buf[off] == '\n')
                                        in_head = false;
                                else if (hlen < sizeof(head) - 1)
                                        head[hlen++] = buf[off];
                        }
                }
                if (!in_head && off < (size_t) n)
                        fwrite(buf + off, 1, (size_t) n - off, out);
        }
        head[hlen] = 0;
        if (in_head && sent < 0) {
                snprintf(err, err_size, "cannot send to tpmkmsd: %s", strerror(-sent));
                return -EIO;
        }
        if (n < 0 || in_head) {
                snprintf(err, err_size, "no complete reply from tpmkmsd%s",
                         n < 0 && errno == EAGAIN ? " (timed out)" : "");
                return -EIO;
        }
        if (strcmp(head, "OK") == 0)
                return 0;
        snprintf(err, err_size, "%s", strncmp(head, "ERR ", 4) == 0 ? head + 4 : head);
        return -EREMOTEIO;
}
