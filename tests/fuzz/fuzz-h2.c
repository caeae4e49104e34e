/* libFuzzer: arbitrary bytes from a client into a kms_server connection over
 * a real unix socket, with the real service behind it and a trivial backend.
 * The server must neither crash nor leak, must close or keep serving, and
 * must never block the loop.
 *
 * Input: byte 0 selects how the rest is sent.
 *   bit 0  prepend the client connection preface (RFC 9113 §3.4: magic and
 *          an empty SETTINGS frame), so most inputs get past the handshake
 *   bit 1  send in small pieces (one loop turn between them), which exercises
 *          frames split across reads
 *   bit 2  read nothing back until the end (output backpressure) */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <systemd/sd-event.h>

#include "plugin.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fb_status(void *userdata, struct kms_status *st) {
        snprintf(st->healthz, sizeof(st->healthz), "ok");
        snprintf(st->key_id, sizeof(st->key_id), "fuzz-key");
}

static int fb_encrypt(void *userdata, struct kms_call *call, const uint8_t *pt, size_t pt_len,
                      uint8_t ct[KMS_CIPHERTEXT_MAX], char key_id[KMS_KEY_ID_MAX + 1]) {
        memcpy(ct, pt, pt_len);
        snprintf(key_id, KMS_KEY_ID_MAX + 1, "fuzz-key");
        return (int) pt_len;
}

static int fb_decrypt(void *userdata, struct kms_call *call, const char *key_id,
                      const uint8_t *ct, size_t ct_len, uint8_t pt[KMS_PLAINTEXT_MAX]) {
        if (ct_len > KMS_PLAINTEXT_MAX)
                return -EBADMSG;
        memcpy(pt, ct, ct_len);
        return (int) ct_len;
}

static const struct kms_backend_ops fb_ops = {
        .status = fb_status,
        .encrypt = fb_encrypt,
        .decrypt = fb_decrypt,
};

static sd_event *event;
static struct kms_server *server;
static struct sockaddr_un addr;
static socklen_t addr_len;

static void setup(void) {
        struct kms_server_options opt = {
                .max_message_size = 4096,
                .max_header_list_size = 4096,
                .max_concurrent_streams = 16,
        };
        int fd;

        if (sd_event_new(&event) < 0 || kms_server_new(event, &opt, &fb_ops, NULL, &server) < 0)
                abort();
        /* an abstract socket: nothing to clean up in the file system */
        addr.sun_family = AF_UNIX;
        snprintf(addr.sun_path + 1, sizeof(addr.sun_path) - 1, "tpmkms-fuzz-h2-%d", (int) getpid());
        addr_len = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + 1 +
                                strlen(addr.sun_path + 1));
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *) &addr, addr_len) < 0 || listen(fd, 16) < 0 ||
            kms_server_add_listener(server, fd) < 0)
                abort();
}

static unsigned open_connections(void) {
        struct kms_server_stats st;

        kms_server_get_stats(server, &st);
        return (unsigned) st.connections_open;
}

static void drain(int fd) {
        uint8_t buf[16384];

        while (recv(fd, buf, sizeof(buf), MSG_DONTWAIT) > 0)
                ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static const uint8_t preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                                         "\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        uint8_t mode;
        int fd;

        if (!server)
                setup();
        if (size < 1 || size > 65536)
                return 0;
        mode = data[0];
        data++;
        size--;

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *) &addr, addr_len) < 0)
                abort();
        /* accept it */
        for (int i = 0; i < 4 && open_connections() == 0; i++)
                (void) sd_event_run(event, 0);

        if (mode & 1)
                (void) send(fd, preface, sizeof(preface) - 1, MSG_NOSIGNAL);

        size_t off = 0, piece = (mode & 2) ? 7 : size;
        for (int turns = 0; off < size && turns < 100000; turns++) {
                size_t n = size - off < piece ? size - off : piece;
                ssize_t w = send(fd, data + off, n, MSG_NOSIGNAL);
                if (w > 0)
                        off += (size_t) w;
                else if (w < 0 && errno != EAGAIN)
                        break;   /* the server hung up */
                (void) sd_event_run(event, 0);
                if (!(mode & 4))
                        drain(fd);
        }

        /* The server must finish what it was given within a bounded number of
         * loop turns: it reads at most one chunk per turn. */
        for (int i = 0; i < 64; i++) {
                (void) sd_event_run(event, 0);
                drain(fd);
        }
        close(fd);
        for (int i = 0; i < 16 && open_connections() > 0; i++)
                (void) sd_event_run(event, 0);
        if (open_connections() != 0)
                abort();   /* a hung-up client must be dropped */
        return 0;
}
