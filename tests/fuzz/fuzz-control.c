/* libFuzzer: arbitrary bytes from a (root) client into the control server
 * (agent/control.c) over a real unix socket, with a handler that answers,
 * fails or defers. The server must neither crash nor leak, must answer or
 * close, and must drop a client that hangs up, deferred or not.
 *
 * Input: byte 0 selects how the rest is sent.
 *   bit 0  send in small pieces (one loop turn between them)
 *   bit 1  close the client before the loop runs again (a hang-up mid-line) */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <systemd/sd-event.h>

#include "control.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static sd_event *event;
static struct control_server *server;
static struct control_conn *deferred;
static char path[108];

static void forget(struct control_conn *conn, void *userdata) {
        if (deferred == conn)
                deferred = NULL;
}

static int handler(void *userdata, struct control_conn *conn, int argc, char **argv, FILE *out,
                   char *err, size_t err_size) {
        if (strcmp(argv[0], "fail") == 0) {
                snprintf(err, err_size, "failed as asked (%d arguments)", argc);
                return -EINVAL;
        }
        if (strcmp(argv[0], "defer") == 0 && !deferred) {
                deferred = conn;
                control_conn_on_drop(conn, forget, NULL);
                return CONTROL_DEFERRED;
        }
        for (int i = 0; i < argc; i++)
                fprintf(out, "%s\n", argv[i]);
        return 0;
}

static void setup(void) {
        (void) signal(SIGPIPE, SIG_IGN);   /* as tpmkmsd does */
        snprintf(path, sizeof(path), "/tmp/tpmkms-fuzz-control-%d.sock", (int) getpid());
        if (sd_event_new(&event) < 0 || control_server_new(event, path, handler, NULL, &server) < 0)
                abort();
}

static void drain(int fd) {
        char buf[4096];

        while (recv(fd, buf, sizeof(buf), MSG_DONTWAIT) > 0)
                ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        uint8_t mode;
        int fd;

        if (!server)
                setup();
        if (size < 1 || size > 4096)
                return 0;
        mode = data[0];
        data++;
        size--;

        memcpy(sa.sun_path, path, strlen(path) + 1);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                abort();
        (void) sd_event_run(event, 0);   /* accept */

        size_t off = 0, piece = (mode & 1) ? 5 : size;
        while (off < size) {
                size_t n = size - off < piece ? size - off : piece;
                ssize_t w = send(fd, data + off, n, MSG_NOSIGNAL);
                if (w <= 0)
                        break;   /* the server hung up */
                off += (size_t) w;
                if (mode & 2)
                        break;
                (void) sd_event_run(event, 0);
                drain(fd);
        }
        /* A deferred command is answered whether its client is still there
         * or not (then the write fails quietly); the reply frees it. */
        if (deferred)
                control_conn_reply(deferred, 0, "done\n", NULL);
        deferred = NULL;
        for (int i = 0; i < 8; i++) {
                (void) sd_event_run(event, 0);
                drain(fd);
        }
        close(fd);
        for (int i = 0; i < 8; i++)
                (void) sd_event_run(event, 0);
        return 0;
}
