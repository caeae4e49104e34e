/* plugin/server.c against nghttp2's client side over real unix sockets: a
 * kms_server with a fake backend on an sd-event loop, driven from the test
 * (sd_event_run between client steps, one thread), and the real service. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <nghttp2/nghttp2.h>
#include <systemd/sd-event.h>

#include "macro.h"
#include "plugin.h"

#define PATH_STATUS "/v2.KeyManagementService/Status"
#define PATH_ENCRYPT "/v2.KeyManagementService/Encrypt"
#define PATH_DECRYPT "/v2.KeyManagementService/Decrypt"

/* ---- fake backend ---------------------------------------------------- */

struct fake {
        unsigned calls;
        bool peer_ok;   /* every call saw our own uid/pid as peer */
        bool big_key_id;   /* Status: a KMS_KEY_ID_MAX key id (large answers) */
};

static void fake_status(void *userdata, struct kms_status *st) {
        struct fake *f = userdata;

        snprintf(st->healthz, sizeof(st->healthz), "ok");
        if (f->big_key_id) {
                memset(st->key_id, 'k', KMS_KEY_ID_MAX);
                st->key_id[KMS_KEY_ID_MAX] = '\0';
        } else
                snprintf(st->key_id, sizeof(st->key_id), "k1");
}

static void fake_check_peer(struct fake *f, const struct kms_call *call) {
        f->calls++;
        if (!call->peer || call->peer->uid != getuid() || call->peer->pid != getpid())
                f->peer_ok = false;
}

static int fake_encrypt(void *userdata, struct kms_call *call, const uint8_t *pt, size_t pt_len,
                        uint8_t ct[KMS_CIPHERTEXT_MAX], char key_id[KMS_KEY_ID_MAX + 1]) {
        fake_check_peer(userdata, call);
        memcpy(ct, "ct:", 3);
        for (size_t i = 0; i < pt_len; i++)
                ct[3 + i] = pt[i] ^ 0x5a;
        strcpy(key_id, "k1");
        return (int) pt_len + 3;
}

static int fake_decrypt(void *userdata, struct kms_call *call, const char *key_id,
                        const uint8_t *ct, size_t ct_len, uint8_t pt[KMS_PLAINTEXT_MAX]) {
        fake_check_peer(userdata, call);
        /* "k-later" is a key the backend gets only after a sync: it parks the
         * call the first time and knows the key on the retry. "k-later-N"
         * waits for sync N (park token N); "k-later" for sync 1. */
        bool later = strncmp(key_id, "k-later", 7) == 0;
        if (later && call->may_defer) {
                call->park_token = key_id[7] == '-' ? strtoull(key_id + 8, NULL, 10) : 1;
                return -EAGAIN;
        }
        if (strcmp(key_id, "k1") != 0 && !later)
                return -ENOENT;
        if (ct_len < 4 || memcmp(ct, "ct:", 3) != 0 || ct_len - 3 > KMS_PLAINTEXT_MAX)
                return -EBADMSG;
        for (size_t i = 3; i < ct_len; i++)
                pt[i - 3] = ct[i] ^ 0x5a;
        return (int) ct_len - 3;
}

static const struct kms_backend_ops fake_ops = {
        .status = fake_status,
        .encrypt = fake_encrypt,
        .decrypt = fake_decrypt,
};

/* ---- fixture ---------------------------------------------------------- */

struct fixture {
        sd_event *event;
        struct kms_server *server;
        struct fake fake;
        char dir[64];
        char path[128];
        struct kms_server_options opt;
        uid_t allowed[1];
        unsigned n_log;
        char last_log[256];
        bool done;
        unsigned observed;
        int last_observed_code;
};

static void fixture_log(void *userdata, int level, const struct peer_cred *peer, const char *msg) {
        struct fixture *f = userdata;
        f->n_log++;
        snprintf(f->last_log, sizeof(f->last_log), "%s", msg);
}

static void fixture_observe(void *userdata, int method, int code, uint64_t usec) {
        struct fixture *f = userdata;
        f->observed++;
        f->last_observed_code = code;
}

static void fixture_defaults(struct fixture *f) {
        memset(&f->opt, 0, sizeof(f->opt));
        f->opt.stream_timeout_usec = 300 * 1000;
        f->opt.handshake_timeout_usec = 300 * 1000;
        f->opt.idle_timeout_usec = 2 * 1000 * 1000;
}

static void fixture_start(struct fixture *f) {
        int fd;

        assert_int_equal(kms_server_new(f->event, &f->opt, &fake_ops, &f->fake, &f->server), 0);
        kms_server_set_log(f->server, fixture_log, f);
        kms_server_set_call_observer(f->server, fixture_observe, f);
        fd = unix_socket_listen(f->path, 0600);
        assert_true(fd >= 0);
        assert_int_equal(kms_server_add_listener(f->server, fd), 0);
}

static int setup(void **state) {
        struct fixture *f = calloc(1, sizeof(*f));

        assert_non_null(f);
        snprintf(f->dir, sizeof(f->dir), "/tmp/test-server.XXXXXX");
        assert_non_null(mkdtemp(f->dir));
        snprintf(f->path, sizeof(f->path), "%s/kms.sock", f->dir);
        assert_int_equal(sd_event_new(&f->event), 0);
        f->fake.peer_ok = true;
        fixture_defaults(f);
        *state = f;
        return 0;
}

static int teardown(void **state) {
        struct fixture *f = *state;

        kms_server_free(f->server);
        sd_event_unref(f->event);
        unlink(f->path);
        rmdir(f->dir);
        free(f);
        return 0;
}

static uint64_t now_ms(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}

/* ---- an HTTP/2 client (nghttp2 client side) --------------------------- */

struct call {
        int32_t id;
        uint8_t body[80 * 1024];
        size_t body_len, body_off;
        bool finish;              /* send END_STREAM after the body */
        int http_status;
        int grpc_status;          /* -1: none seen */
        char grpc_message[512];
        bool accept_identity;     /* grpc-accept-encoding: identity seen */
        uint8_t data[4096];
        size_t data_len;
        bool closed;
        uint32_t close_code;
        bool got_rst;
        uint32_t rst_code;
};

struct client {
        int fd;
        nghttp2_session *h2;
        bool no_read;             /* stop reading: let the server's output back up */
        bool closed;              /* the server closed (EOF/reset) */
        size_t bytes_in;
        bool goaway;
        uint8_t pending[256 * 1024];
        size_t pending_len;
};

static void call_init(struct call *c) {
        memset(c, 0, sizeof(*c));
        c->grpc_status = -1;
        c->finish = true;
}

static int cl_on_header(nghttp2_session *h2, const nghttp2_frame *frame, const uint8_t *name,
                        size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                        void *user_data) {
        struct call *c = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);

        if (!c)
                return 0;
        if (strcmp((const char *) name, ":status") == 0)
                c->http_status = atoi((const char *) value);
        else if (strcmp((const char *) name, "grpc-status") == 0)
                c->grpc_status = atoi((const char *) value);
        else if (strcmp((const char *) name, "grpc-message") == 0)
                snprintf(c->grpc_message, sizeof(c->grpc_message), "%s", (const char *) value);
        else if (strcmp((const char *) name, "grpc-accept-encoding") == 0)
                c->accept_identity = strcmp((const char *) value, "identity") == 0;
        return 0;
}

static int cl_on_data(nghttp2_session *h2, uint8_t flags, int32_t stream_id, const uint8_t *data,
                      size_t len, void *user_data) {
        struct call *c = nghttp2_session_get_stream_user_data(h2, stream_id);

        if (c && c->data_len + len <= sizeof(c->data)) {
                memcpy(c->data + c->data_len, data, len);
                c->data_len += len;
        }
        return 0;
}

static int cl_on_frame_recv(nghttp2_session *h2, const nghttp2_frame *frame, void *user_data) {
        struct client *cl = user_data;
        struct call *c;

        if (frame->hd.type == NGHTTP2_GOAWAY)
                cl->goaway = true;
        if (frame->hd.type == NGHTTP2_RST_STREAM) {
                c = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);
                if (c) {
                        c->got_rst = true;
                        c->rst_code = frame->rst_stream.error_code;
                }
        }
        return 0;
}

static int cl_on_close(nghttp2_session *h2, int32_t stream_id, uint32_t error_code,
                       void *user_data) {
        struct call *c = nghttp2_session_get_stream_user_data(h2, stream_id);

        if (c) {
                c->closed = true;
                c->close_code = error_code;
        }
        return 0;
}

static ssize_t cl_read_body(nghttp2_session *h2, int32_t stream_id, uint8_t *buf, size_t length,
                            uint32_t *data_flags, nghttp2_data_source *source, void *user_data) {
        struct call *c = source->ptr;
        size_t n = c->body_len - c->body_off;

        if (n > length)
                n = length;
        memcpy(buf, c->body + c->body_off, n);
        c->body_off += n;
        if (c->body_off == c->body_len) {
                if (!c->finish)
                        return n > 0 ? (ssize_t) n : NGHTTP2_ERR_DEFERRED;
                *data_flags |= NGHTTP2_DATA_FLAG_EOF;
        }
        return (ssize_t) n;
}

static int connect_raw(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);

        assert_true(fd >= 0);
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0) {
                int r = -errno;
                close(fd);
                return r;
        }
        return fd;
}

static struct client *client_new(struct fixture *f) {
        struct client *cl = calloc(1, sizeof(*cl));
        nghttp2_session_callbacks *cbs;

        assert_non_null(cl);
        cl->fd = connect_raw(f->path);
        assert_true(cl->fd >= 0);
        assert_int_equal(nghttp2_session_callbacks_new(&cbs), 0);
        nghttp2_session_callbacks_set_on_header_callback(cbs, cl_on_header);
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, cl_on_data);
        nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, cl_on_frame_recv);
        nghttp2_session_callbacks_set_on_stream_close_callback(cbs, cl_on_close);
        assert_int_equal(nghttp2_session_client_new(&cl->h2, cbs, cl), 0);
        nghttp2_session_callbacks_del(cbs);
        assert_int_equal(nghttp2_submit_settings(cl->h2, NGHTTP2_FLAG_NONE, NULL, 0), 0);
        return cl;
}

static void client_free(struct client *cl) {
        if (!cl)
                return;
        nghttp2_session_del(cl->h2);
        if (cl->fd >= 0)
                close(cl->fd);
        free(cl);
}

/* Raw bytes, written as they can be (the loop runs in this thread). */
static void client_write_raw(struct client *cl, const void *p, size_t n) {
        assert_true(cl->pending_len + n <= sizeof(cl->pending));
        memcpy(cl->pending + cl->pending_len, p, n);
        cl->pending_len += n;
}

static void client_io(struct client *cl) {
        uint8_t buf[16384];

        if (cl->closed)
                return;
        if (cl->h2) {
                const uint8_t *data;
                ssize_t n;
                while (cl->pending_len < sizeof(cl->pending) - 16384 &&
                       (n = nghttp2_session_mem_send(cl->h2, &data)) > 0)
                        client_write_raw(cl, data, (size_t) n);
        }
        if (cl->pending_len > 0) {
                ssize_t w = send(cl->fd, cl->pending, cl->pending_len, MSG_NOSIGNAL);
                if (w > 0) {
                        memmove(cl->pending, cl->pending + w, cl->pending_len - (size_t) w);
                        cl->pending_len -= (size_t) w;
                } else if (w < 0 && errno != EAGAIN) {
                        cl->closed = true;
                        return;
                }
        }
        while (!cl->no_read) {
                ssize_t n = recv(cl->fd, buf, sizeof(buf), 0);
                if (n == 0 || (n < 0 && errno != EAGAIN)) {
                        cl->closed = true;
                        return;
                }
                if (n < 0)
                        break;
                cl->bytes_in += (size_t) n;
                if (cl->h2)
                        assert_int_equal(nghttp2_session_mem_recv(cl->h2, buf, (size_t) n), n);
        }
}

/* Run server and clients until pred(arg) or timeout_ms; returns pred. */
static bool pump(struct fixture *f, struct client **cls, size_t n, bool (*pred)(void *), void *arg,
                 unsigned timeout_ms) {
        uint64_t end = now_ms() + timeout_ms;

        for (;;) {
                for (size_t i = 0; i < n; i++)
                        if (cls[i])
                                client_io(cls[i]);
                if (pred && pred(arg))
                        return true;
                if (now_ms() >= end)
                        return pred ? pred(arg) : true;
                assert_true(sd_event_run(f->event, 1000) >= 0);
        }
}

static bool call_done(void *arg) {
        return ((struct call *) arg)->closed;
}

static bool client_closed(void *arg) {
        return ((struct client *) arg)->closed;
}

static bool flag_set(void *arg) {
        return *(bool *) arg;
}

struct hdr {
        const char *name, *value;
};

static void client_submit(struct client *cl, struct call *c, const char *method, const char *path,
                          const char *content_type, const struct hdr *extra, size_t n_extra) {
        nghttp2_nv nva[16];
        size_t n = 0;
        nghttp2_data_provider prd = { .source.ptr = c, .read_callback = cl_read_body };

#define NV(nm, v) (nghttp2_nv) { (uint8_t *) (nm), (uint8_t *) (v), strlen(nm), strlen(v), 0 }
        nva[n++] = NV(":method", method);
        nva[n++] = NV(":scheme", "http");
        nva[n++] = NV(":path", path);
        nva[n++] = NV(":authority", "localhost");
        if (content_type)
                nva[n++] = NV("content-type", content_type);
        nva[n++] = NV("te", "trailers");
        for (size_t i = 0; i < n_extra; i++)
                nva[n++] = NV(extra[i].name, extra[i].value);
#undef NV
        c->id = nghttp2_submit_request(cl->h2, NULL, nva, n,
                                       (c->body_len || !c->finish) ? &prd : NULL, c);
        assert_true(c->id > 0);
}

/* gRPC framing and a little protobuf, written by hand so the test does not
 * share code with what it tests. */
static void frame_msg(struct call *c, const uint8_t *msg, size_t len) {
        c->body[0] = 0;
        c->body[1] = (uint8_t) (len >> 24);
        c->body[2] = (uint8_t) (len >> 16);
        c->body[3] = (uint8_t) (len >> 8);
        c->body[4] = (uint8_t) len;
        if (len > 0)
                memcpy(c->body + 5, msg, len);
        c->body_len = 5 + len;
}

static size_t pb_bytes(uint8_t *out, unsigned field, const void *p, size_t len) {
        assert_true(len < 128);
        out[0] = (uint8_t) (field << 3 | 2);
        out[1] = (uint8_t) len;
        memcpy(out + 2, p, len);
        return 2 + len;
}

/* Field `field` (length-delimited, short) of the response message in c->data. */
static bool pb_find(const struct call *c, unsigned field, const uint8_t **ret, size_t *ret_len) {
        size_t i = 5;

        /* Set even when the field is missing: callers go on after
         * assert_true(pb_find(...)), which cmocka does not declare noreturn,
         * so gcc -O3 would see them use the outputs uninitialized. */
        *ret = NULL;
        *ret_len = 0;
        if (c->data_len < 5)
                return false;
        while (i + 2 <= c->data_len) {
                unsigned f = c->data[i] >> 3;
                size_t l = c->data[i + 1];
                assert_true(l < 128 && (c->data[i] & 7) == 2);
                if (i + 2 + l > c->data_len)
                        return false;
                if (f == field) {
                        *ret = c->data + i + 2;
                        *ret_len = l;
                        return true;
                }
                i += 2 + l;
        }
        return false;
}

static void status_call(struct fixture *f, struct client *cl, struct call *c) {
        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(cl, c, "POST", PATH_STATUS, "application/grpc", NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
}

/* ---- tests ------------------------------------------------------------ */

static void test_server_status_ok(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *c = malloc(sizeof(*c));
        const uint8_t *v;
        size_t l;

        fixture_start(f);
        cl = client_new(f);
        status_call(f, cl, c);
        assert_int_equal(c->http_status, 200);
        assert_int_equal(c->grpc_status, 0);
        assert_int_equal(c->close_code, NGHTTP2_NO_ERROR);
        /* StatusResponse{version "v2", healthz "ok", key_id "k1"} */
        assert_int_equal(c->data[0], 0);
        assert_int_equal(((size_t) c->data[3] << 8 | c->data[4]), c->data_len - 5);
        assert_true(pb_find(c, 1, &v, &l));
        assert_memory_equal(v, "v2", 2);
        assert_true(pb_find(c, 2, &v, &l));
        assert_memory_equal(v, "ok", 2);
        assert_true(pb_find(c, 3, &v, &l));
        assert_memory_equal(v, "k1", 2);
        assert_int_equal(f->observed, 1);
        assert_int_equal(f->last_observed_code, 0);
        client_free(cl);
        free(c);
}

static void encrypt_call(struct fixture *f, struct client *cl, struct call *c, const char *pt) {
        uint8_t m[128];
        size_t n = 0;

        call_init(c);
        n += pb_bytes(m + n, 1, pt, strlen(pt));
        n += pb_bytes(m + n, 2, "uid-1", 5);
        frame_msg(c, m, n);
        client_submit(cl, c, "POST", PATH_ENCRYPT, "application/grpc+proto", NULL, 0);
}

static void decrypt_call(struct fixture *f, struct client *cl, struct call *c, const uint8_t *ct,
                         size_t ct_len, const char *key_id) {
        uint8_t m[256];
        size_t n = 0;

        call_init(c);
        n += pb_bytes(m + n, 1, ct, ct_len);
        n += pb_bytes(m + n, 2, "uid-2", 5);
        n += pb_bytes(m + n, 3, key_id, strlen(key_id));
        frame_msg(c, m, n);
        client_submit(cl, c, "POST", PATH_DECRYPT, "application/grpc", NULL, 0);
}

static void test_server_encrypt_decrypt_roundtrip(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *e = malloc(sizeof(*e)), *d = malloc(sizeof(*d));
        const uint8_t *ct, *pt, *kid;
        size_t ct_len, pt_len, kid_len;

        fixture_start(f);
        cl = client_new(f);
        encrypt_call(f, cl, e, "0123456789abcdef0123456789abcdef");
        assert_true(pump(f, &cl, 1, call_done, e, 3000));
        assert_int_equal(e->grpc_status, 0);
        assert_true(pb_find(e, 1, &ct, &ct_len));
        assert_true(pb_find(e, 2, &kid, &kid_len));
        assert_int_equal(kid_len, 2);

        decrypt_call(f, cl, d, ct, ct_len, "k1");
        assert_true(pump(f, &cl, 1, call_done, d, 3000));
        assert_int_equal(d->grpc_status, 0);
        assert_true(pb_find(d, 1, &pt, &pt_len));
        assert_int_equal(pt_len, 32);
        assert_memory_equal(pt, "0123456789abcdef0123456789abcdef", 32);

        /* a backend error travels as a gRPC status with a message */
        decrypt_call(f, cl, d, ct, ct_len, "k-unknown");
        assert_true(pump(f, &cl, 1, call_done, d, 3000));
        assert_int_equal(d->grpc_status, 5);   /* NOT_FOUND */
        assert_true(strlen(d->grpc_message) > 0);
        assert_int_equal(d->data_len, 0);

        assert_int_equal(f->fake.calls, 3);
        assert_true(f->fake.peer_ok);
        client_free(cl);
        free(e);
        free(d);
}

static void test_server_parked_call(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *e = malloc(sizeof(*e)), *d = malloc(sizeof(*d));
        const uint8_t *ct, *pt;
        size_t ct_len, pt_len;

        /* The first parked call must outlive a loaded machine's scheduling
         * delays (the fixture's 300 ms did not, in a parallel ctest); the
         * second one still reaches its deadline within the 3 s pump. */
        f->opt.stream_timeout_usec = 1000 * 1000;
        fixture_start(f);
        cl = client_new(f);
        encrypt_call(f, cl, e, "0123456789abcdef0123456789abcdef");
        assert_true(pump(f, &cl, 1, call_done, e, 3000));
        assert_true(pb_find(e, 1, &ct, &ct_len));

        /* parked: no answer until the retry */
        decrypt_call(f, cl, d, ct, ct_len, "k-later");
        assert_true(pump(f, &cl, 1, NULL, NULL, 100));
        assert_false(d->closed);
        kms_server_retry_parked(f->server, UINT64_MAX);
        assert_true(pump(f, &cl, 1, call_done, d, 3000));
        assert_int_equal(d->grpc_status, 0);
        assert_true(pb_find(d, 1, &pt, &pt_len));
        assert_int_equal(pt_len, 32);
        assert_memory_equal(pt, "0123456789abcdef0123456789abcdef", 32);

        /* parked and never retried: the stream deadline answers it */
        decrypt_call(f, cl, d, ct, ct_len, "k-later");
        assert_true(pump(f, &cl, 1, call_done, d, 3000));
        assert_int_equal(d->grpc_status, 4);   /* DEADLINE_EXCEEDED */
        /* a retry after that finds nothing left to answer */
        kms_server_retry_parked(f->server, UINT64_MAX);

        client_free(cl);
        free(e);
        free(d);
}

/* Each parked call waits for its own event: retry_parked(done) answers the
 * calls whose token is <= done and leaves the later ones parked. */
static void test_server_parked_call_tokens(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *e = malloc(sizeof(*e)), *d1 = malloc(sizeof(*d1)), *d2 = malloc(sizeof(*d2));
        const uint8_t *ct, *pt;
        size_t ct_len, pt_len;

        f->opt.stream_timeout_usec = 5 * 1000 * 1000;
        fixture_start(f);
        cl = client_new(f);
        encrypt_call(f, cl, e, "0123456789abcdef0123456789abcdef");
        assert_true(pump(f, &cl, 1, call_done, e, 3000));
        assert_true(pb_find(e, 1, &ct, &ct_len));

        /* the later sync's call first: the order of arrival does not matter */
        decrypt_call(f, cl, d2, ct, ct_len, "k-later-2");
        decrypt_call(f, cl, d1, ct, ct_len, "k-later-1");
        assert_true(pump(f, &cl, 1, NULL, NULL, 100));
        assert_false(d1->closed);
        assert_false(d2->closed);

        /* an event before both: nothing */
        kms_server_retry_parked(f->server, 0);
        assert_true(pump(f, &cl, 1, NULL, NULL, 100));
        assert_false(d1->closed);
        assert_false(d2->closed);

        kms_server_retry_parked(f->server, 1);
        assert_true(pump(f, &cl, 1, call_done, d1, 3000));
        assert_int_equal(d1->grpc_status, 0);
        assert_true(pb_find(d1, 1, &pt, &pt_len));
        assert_int_equal(pt_len, 32);
        assert_memory_equal(pt, "0123456789abcdef0123456789abcdef", 32);
        assert_true(pump(f, &cl, 1, NULL, NULL, 100));
        assert_false(d2->closed);

        kms_server_retry_parked(f->server, 2);
        assert_true(pump(f, &cl, 1, call_done, d2, 3000));
        assert_int_equal(d2->grpc_status, 0);
        assert_true(pb_find(d2, 1, &pt, &pt_len));
        assert_memory_equal(pt, "0123456789abcdef0123456789abcdef", 32);

        /* a retry for an earlier event leaves it parked, backend not re-run */
        f->fake.calls = 0;
        decrypt_call(f, cl, d1, ct, ct_len, "k-later-7");
        assert_true(pump(f, &cl, 1, NULL, NULL, 100));
        kms_server_retry_parked(f->server, 6);
        assert_true(pump(f, &cl, 1, NULL, NULL, 100));
        assert_false(d1->closed);
        assert_int_equal(f->fake.calls, 1);   /* not run again */
        kms_server_retry_parked(f->server, UINT64_MAX);
        assert_true(pump(f, &cl, 1, call_done, d1, 3000));
        assert_int_equal(d1->grpc_status, 0);
        assert_int_equal(f->fake.calls, 2);

        client_free(cl);
        free(e);
        free(d1);
        free(d2);
}

static void test_server_unknown_method(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *c = malloc(sizeof(*c)), *h = malloc(sizeof(*h));

        fixture_start(f);
        cl = client_new(f);
        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(cl, c, "POST", "/v2.KeyManagementService/Nope", "application/grpc", NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->http_status, 200);
        assert_int_equal(c->grpc_status, 12);
        assert_string_equal(c->grpc_message, "unknown method /v2.KeyManagementService/Nope");

        /* a long :path is quoted, bounded */
        char long_path[2048];
        memset(long_path, 'p', sizeof(long_path) - 1);
        long_path[0] = '/';
        long_path[sizeof(long_path) - 1] = '\0';
        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(cl, c, "POST", long_path, "application/grpc", NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 12);
        assert_true(strncmp(c->grpc_message, "unknown method /ppp", 19) == 0);
        assert_true(strlen(c->grpc_message) < 256);

        /* answered while the client is still sending: Trailers-Only, then
         * RST_STREAM(NO_ERROR) (RFC 9113 §8.1) */
        call_init(h);
        h->finish = false;
        frame_msg(h, (const uint8_t *) "xx", 2);
        client_submit(cl, h, "POST", "/other.Service/Method", "application/grpc", NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, h, 3000));
        assert_int_equal(h->grpc_status, 12);
        assert_true(h->got_rst);
        assert_int_equal(h->rst_code, NGHTTP2_NO_ERROR);

        /* connection still good */
        status_call(f, cl, c);
        assert_int_equal(c->grpc_status, 0);
        client_free(cl);
        free(c);
        free(h);
}

static void test_server_not_post_or_not_grpc(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *c = malloc(sizeof(*c));

        fixture_start(f);
        cl = client_new(f);

        call_init(c);
        client_submit(cl, c, "GET", PATH_STATUS, "application/grpc", NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->http_status, 405);
        assert_int_equal(c->grpc_status, 13);

        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(cl, c, "POST", PATH_STATUS, "application/json", NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->http_status, 415);
        assert_int_equal(c->grpc_status, 13);

        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(cl, c, "POST", PATH_STATUS, NULL, NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->http_status, 415);

        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(cl, c, "POST", PATH_STATUS, "application/grpcx", NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->http_status, 415);

        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(cl, c, "POST", PATH_STATUS, "application/grpc; charset=utf-8", NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 0);

        client_free(cl);
        free(c);
}

/* A non-HTTP/2 peer is dropped; another client is served meanwhile. */
static void bad_preface(struct fixture *f, const void *bytes, size_t n) {
        struct client *bad = calloc(1, sizeof(*bad)), *good;
        struct call *c = malloc(sizeof(*c));
        struct client *both[2];

        fixture_start(f);
        good = client_new(f);
        bad->fd = connect_raw(f->path);
        assert_true(bad->fd >= 0);
        client_write_raw(bad, bytes, n);
        both[0] = bad;
        both[1] = good;

        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(good, c, "POST", PATH_STATUS, "application/grpc", NULL, 0);
        assert_true(pump(f, both, 2, client_closed, bad, 3000));
        assert_true(pump(f, both, 2, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 0);
        assert_false(good->closed);

        struct kms_server_stats st;
        kms_server_get_stats(f->server, &st);
        assert_int_equal(st.protocol_errors, 1);
        assert_int_equal(st.connections_open, 1);
        client_free(bad);
        client_free(good);
        free(c);
}

static void test_server_http1_closed(void **state) {
        static const char req[] = "POST /v2.KeyManagementService/Status HTTP/1.1\r\n"
                                  "Host: localhost\r\nContent-Length: 0\r\n\r\n";
        bad_preface(*state, req, sizeof(req) - 1);
}

static void test_server_garbage_closed(void **state) {
        uint8_t junk[4096];

        srand(42);
        for (size_t i = 0; i < sizeof(junk); i++)
                junk[i] = (uint8_t) rand();
        bad_preface(*state, junk, sizeof(junk));
}

static void test_server_oversized_message(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *c = malloc(sizeof(*c));
        uint8_t *big = calloc(1, 2000);

        f->opt.max_message_size = 1024;
        fixture_start(f);
        cl = client_new(f);

        call_init(c);
        frame_msg(c, NULL, 0);
        memset(c->body + 5, 'x', 2000);
        c->body[3] = 2000 >> 8;
        c->body[4] = 2000 & 0xff;
        c->body_len = 2005;
        client_submit(cl, c, "POST", PATH_ENCRYPT, "application/grpc", NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 8);   /* RESOURCE_EXHAUSTED */
        assert_string_equal(c->grpc_message, "request message larger than 1024 bytes");

        /* a body far larger than the windows: rejected, connection usable */
        call_init(c);
        memset(c->body, 'y', sizeof(c->body));
        c->body[0] = 0;
        c->body_len = sizeof(c->body);
        client_submit(cl, c, "POST", PATH_ENCRYPT, "application/grpc", NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 8);
        status_call(f, cl, c);
        assert_int_equal(c->grpc_status, 0);

        client_free(cl);
        free(c);
        free(big);
}

static void test_server_truncated_frames(void **state) {
        struct fixture *f = *state;
        struct client *cl, *raw;
        struct call *c = malloc(sizeof(*c));

        fixture_start(f);
        cl = client_new(f);

        /* gRPC message prefix says 100 bytes, the stream ends after 10 */
        call_init(c);
        frame_msg(c, (const uint8_t *) "0123456789", 10);
        c->body[4] = 100;
        client_submit(cl, c, "POST", PATH_DECRYPT, "application/grpc", NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_not_equal(c->grpc_status, 0);
        assert_int_not_equal(c->grpc_status, -1);

        /* HTTP/2 frame cut short, then the peer goes away */
        raw = client_new(f);
        assert_true(pump(f, &raw, 1, NULL, NULL, 50));
        static const uint8_t frame[] = { 0x00, 0x03, 0xe8, 0x01, 0x04, 0x00, 0x00, 0x00, 0x01,
                                         0x82, 0x86, 0x84 };
        nghttp2_session_del(raw->h2);
        raw->h2 = NULL;
        client_write_raw(raw, frame, sizeof(frame));
        assert_true(pump(f, &raw, 1, NULL, NULL, 50));
        shutdown(raw->fd, SHUT_WR);
        struct client *both[2] = { raw, cl };
        assert_true(pump(f, both, 2, client_closed, raw, 3000));

        status_call(f, cl, c);
        assert_int_equal(c->grpc_status, 0);
        client_free(raw);
        client_free(cl);
        free(c);
}

static void test_server_stream_timeout(void **state) {
        struct fixture *f = *state;
        struct client *slow, *good;
        struct call *stuck = malloc(sizeof(*stuck)), *c = malloc(sizeof(*c));
        uint64_t t0;

        fixture_start(f);
        slow = client_new(f);
        good = client_new(f);
        struct client *both[2] = { slow, good };

        call_init(stuck);
        stuck->finish = false;
        frame_msg(stuck, (const uint8_t *) "abc", 3);
        client_submit(slow, stuck, "POST", PATH_ENCRYPT, "application/grpc", NULL, 0);
        t0 = now_ms();

        /* the other client is served while the stuck stream waits */
        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(good, c, "POST", PATH_STATUS, "application/grpc", NULL, 0);
        assert_true(pump(f, both, 2, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 0);
        assert_false(stuck->closed);

        assert_true(pump(f, both, 2, call_done, stuck, 3000));
        assert_true(now_ms() - t0 >= 250);
        assert_int_equal(stuck->grpc_status, 4);   /* DEADLINE_EXCEEDED */
        assert_true(stuck->got_rst);
        assert_false(slow->closed);

        client_free(slow);
        client_free(good);
        free(stuck);
        free(c);
}

static void test_server_grpc_timeout(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *c = malloc(sizeof(*c));
        uint64_t t0;

        f->opt.stream_timeout_usec = 5 * 1000 * 1000;
        fixture_start(f);
        cl = client_new(f);

        /* the client's deadline is shorter than ours */
        call_init(c);
        c->finish = false;
        frame_msg(c, (const uint8_t *) "abc", 3);
        client_submit(cl, c, "POST", PATH_ENCRYPT, "application/grpc",
                      (const struct hdr[]) { { "grpc-timeout", "50m" } }, 1);
        t0 = now_ms();
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 4);
        assert_true(now_ms() - t0 < 1000);

        /* already expired on arrival */
        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(cl, c, "POST", PATH_STATUS, "application/grpc",
                      (const struct hdr[]) { { "grpc-timeout", "0S" } }, 1);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 4);

        /* malformed */
        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(cl, c, "POST", PATH_STATUS, "application/grpc",
                      (const struct hdr[]) { { "grpc-timeout", "soon" } }, 1);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 13);

        /* generous: served */
        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(cl, c, "POST", PATH_STATUS, "application/grpc",
                      (const struct hdr[]) { { "grpc-timeout", "3S" } }, 1);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 0);

        client_free(cl);
        free(c);
}

static void test_server_compressed(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *c = malloc(sizeof(*c));

        fixture_start(f);
        cl = client_new(f);

        call_init(c);
        frame_msg(c, (const uint8_t *) "\x1f\x8b", 2);
        c->body[0] = 1;
        client_submit(cl, c, "POST", PATH_STATUS, "application/grpc",
                      (const struct hdr[]) { { "grpc-encoding", "gzip" } }, 1);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 12);   /* UNIMPLEMENTED */
        assert_true(c->accept_identity);

        call_init(c);
        frame_msg(c, (const uint8_t *) "\x1f\x8b", 2);
        c->body[0] = 1;
        client_submit(cl, c, "POST", PATH_STATUS, "application/grpc", NULL, 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 13);   /* flag without encoding */

        /* grpc-encoding announced but this message not compressed: fine */
        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(cl, c, "POST", PATH_STATUS, "application/grpc",
                      (const struct hdr[]) { { "grpc-encoding", "gzip" } }, 1);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 0);

        client_free(cl);
        free(c);
}

static void test_server_header_list_too_large(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *c = malloc(sizeof(*c));
        char big[2048];

        f->opt.max_header_list_size = 1024;
        fixture_start(f);
        cl = client_new(f);
        assert_true(pump(f, &cl, 1, NULL, NULL, 50));   /* get SETTINGS */

        memset(big, 'a', sizeof(big) - 1);
        big[sizeof(big) - 1] = '\0';
        call_init(c);
        frame_msg(c, NULL, 0);
        client_submit(cl, c, "POST", PATH_STATUS, "application/grpc",
                      (const struct hdr[]) { { "x-big", big } }, 1);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->http_status, 431);
        assert_int_equal(c->grpc_status, 8);

        status_call(f, cl, c);
        assert_int_equal(c->grpc_status, 0);
        client_free(cl);
        free(c);
}

static bool handshaken(void *arg) {
        return ((struct client *) arg)->bytes_in > 0;
}

static void test_server_max_connections(void **state) {
        struct fixture *f = *state;
        struct client *a, *b, *extra, *late;
        struct call *c = malloc(sizeof(*c)), *sa = malloc(sizeof(*sa)), *sb = malloc(sizeof(*sb));
        struct kms_server_stats st;

        f->opt.max_connections = 2;
        fixture_start(f);
        a = client_new(f);
        b = client_new(f);
        struct client *ab[2] = { a, b };
        assert_true(pump(f, ab, 2, handshaken, a, 3000));
        assert_true(pump(f, ab, 2, handshaken, b, 3000));

        /* both connections busy (a stream each, never finished): no room */
        call_init(sa);
        sa->finish = false;
        frame_msg(sa, (const uint8_t *) "abc", 3);
        client_submit(a, sa, "POST", PATH_ENCRYPT, "application/grpc", NULL, 0);
        call_init(sb);
        sb->finish = false;
        frame_msg(sb, (const uint8_t *) "abc", 3);
        client_submit(b, sb, "POST", PATH_ENCRYPT, "application/grpc", NULL, 0);
        assert_true(pump(f, ab, 2, NULL, NULL, 50));

        extra = client_new(f);
        assert_true(pump(f, &extra, 1, client_closed, extra, 3000));
        assert_int_equal(extra->bytes_in, 0);
        kms_server_get_stats(f->server, &st);
        assert_int_equal(st.connections_over_limit, 1);
        assert_int_equal(st.connections_evicted, 0);
        assert_int_equal(st.connections_accepted, 2);
        assert_int_equal(st.connections_open, 2);
        client_free(extra);

        /* once their streams end (stream timeout) both are idle: a newcomer
         * is admitted and exactly one idle connection makes room for it */
        assert_true(pump(f, ab, 2, call_done, sa, 3000));
        assert_true(pump(f, ab, 2, call_done, sb, 3000));
        late = client_new(f);
        status_call(f, late, c);
        assert_int_equal(c->grpc_status, 0);
        assert_true(pump(f, ab, 2, NULL, NULL, 50));
        assert_int_equal((int) a->closed + (int) b->closed, 1);
        kms_server_get_stats(f->server, &st);
        assert_int_equal(st.connections_evicted, 1);
        assert_int_equal(st.connections_over_limit, 1);
        assert_int_equal(st.connections_open, 2);

        client_free(a);
        client_free(b);
        client_free(late);
        free(c);
        free(sa);
        free(sb);
}

static void test_server_peer_refused(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct kms_server_stats st;

        f->allowed[0] = getuid() + 1;
        f->opt.allowed_uids = f->allowed;
        f->opt.n_allowed_uids = 1;
        fixture_start(f);
        cl = client_new(f);
        assert_true(pump(f, &cl, 1, client_closed, cl, 3000));
        /* closed before any HTTP/2: not even our SETTINGS went out */
        assert_int_equal(cl->bytes_in, 0);
        kms_server_get_stats(f->server, &st);
        assert_int_equal(st.connections_refused, 1);
        assert_int_equal(st.connections_accepted, 0);
        assert_non_null(strstr(f->last_log, "refused peer uid="));
        client_free(cl);
}

static void test_server_handshake_timeout(void **state) {
        struct fixture *f = *state;
        struct client *cl = calloc(1, sizeof(*cl));
        uint64_t t0 = now_ms();

        fixture_start(f);
        cl->fd = connect_raw(f->path);
        client_write_raw(cl, "PRI * HTTP/2.0\r\n", 16);   /* half a preface, then silence */
        assert_true(pump(f, &cl, 1, client_closed, cl, 3000));
        assert_true(now_ms() - t0 >= 250);
        client_free(cl);
}

static void test_server_idle_timeout(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *c = malloc(sizeof(*c));

        f->opt.idle_timeout_usec = 200 * 1000;
        fixture_start(f);
        cl = client_new(f);
        status_call(f, cl, c);
        assert_int_equal(c->grpc_status, 0);
        assert_true(pump(f, &cl, 1, client_closed, cl, 3000));
        assert_true(cl->goaway);   /* RFC 9113 §9.1: GOAWAY before closing */
        client_free(cl);
        free(c);
}

static void shutdown_done(void *userdata) {
        *(bool *) userdata = true;
}

static void test_server_shutdown_completes_inflight(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *c = malloc(sizeof(*c));
        uint8_t m[64];
        size_t n = 0;

        fixture_start(f);
        cl = client_new(f);

        /* a call whose body is still coming when shutdown starts */
        call_init(c);
        c->finish = false;
        n += pb_bytes(m + n, 1, "0123456789abcdef0123456789abcdef", 32);
        n += pb_bytes(m + n, 2, "u", 1);
        frame_msg(c, m, n);
        size_t full = c->body_len;
        c->body_len = 10;
        client_submit(cl, c, "POST", PATH_ENCRYPT, "application/grpc", NULL, 0);
        assert_true(pump(f, &cl, 1, NULL, NULL, 50));

        kms_server_shutdown(f->server, shutdown_done, &f->done);
        assert_true(pump(f, &cl, 1, NULL, NULL, 50));
        assert_true(cl->goaway);
        assert_false(f->done);
        assert_true(connect_raw(f->path) < 0);   /* no longer accepting */

        c->body_len = full;
        c->finish = true;
        assert_int_equal(nghttp2_session_resume_data(cl->h2, c->id), 0);
        assert_true(pump(f, &cl, 1, call_done, c, 3000));
        assert_int_equal(c->grpc_status, 0);
        assert_true(pump(f, &cl, 1, flag_set, &f->done, 3000));
        assert_true(pump(f, &cl, 1, client_closed, cl, 3000));
        client_free(cl);
        free(c);
}

static void test_server_shutdown_forced(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct call *c = malloc(sizeof(*c));

        fixture_start(f);
        cl = client_new(f);
        call_init(c);
        c->finish = false;
        frame_msg(c, (const uint8_t *) "abc", 3);
        client_submit(cl, c, "POST", PATH_ENCRYPT, "application/grpc", NULL, 0);
        assert_true(pump(f, &cl, 1, NULL, NULL, 50));
        kms_server_shutdown(f->server, shutdown_done, &f->done);
        /* the stuck call times out, the connection closes, done runs */
        assert_true(pump(f, &cl, 1, flag_set, &f->done, 3000));
        assert_true(pump(f, &cl, 1, client_closed, cl, 3000));
        client_free(cl);
        free(c);
}

static void test_server_shutdown_idle(void **state) {
        struct fixture *f = *state;

        fixture_start(f);
        kms_server_shutdown(f->server, shutdown_done, &f->done);
        assert_false(f->done);   /* never from inside the call */
        assert_true(pump(f, NULL, 0, flag_set, &f->done, 1000));
}

/* Many calls, 32 in flight on one connection: flow-control windows must be
 * given back (we run without automatic WINDOW_UPDATE). */
static void test_server_many_calls(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        enum { N = 3000, INFLIGHT = 32 };
        struct call *calls = calloc(INFLIGHT, sizeof(*calls));
        const uint8_t *ct_in;
        size_t ct_len, done = 0, started = 0;
        uint8_t ct[64];

        fixture_start(f);
        cl = client_new(f);
        encrypt_call(f, cl, &calls[0], "0123456789abcdef0123456789abcdef");
        assert_true(pump(f, &cl, 1, call_done, &calls[0], 3000));
        assert_true(pb_find(&calls[0], 1, &ct_in, &ct_len));
        memcpy(ct, ct_in, ct_len);

        for (int i = 0; i < INFLIGHT; i++) {
                decrypt_call(f, cl, &calls[i], ct, ct_len, "k1");
                started++;
        }
        uint64_t end = now_ms() + 20000;
        while (done < N && now_ms() < end) {
                client_io(cl);
                assert_true(sd_event_run(f->event, 1000) >= 0);
                client_io(cl);
                for (int i = 0; i < INFLIGHT; i++) {
                        if (!calls[i].closed)
                                continue;
                        assert_int_equal(calls[i].grpc_status, 0);
                        done++;
                        if (started < N) {
                                decrypt_call(f, cl, &calls[i], ct, ct_len, "k1");
                                started++;
                        } else
                                calls[i].closed = false, calls[i].id = -1;
                }
        }
        assert_int_equal(done, N);
        assert_false(cl->closed);
        client_free(cl);
        free(calls);
}

static void test_server_new_options(void **state) {
        struct fixture *f = *state;
        struct kms_server *s = NULL;

        /* the service refuses requests above 64 KiB: a larger transport
         * limit is refused rather than silently useless */
        f->opt.max_message_size = 64 * 1024 + 1;
        assert_int_equal(kms_server_new(f->event, &f->opt, &fake_ops, &f->fake, &s), -EINVAL);
        assert_null(s);
        f->opt.max_message_size = 64 * 1024;
        assert_int_equal(kms_server_new(f->event, &f->opt, &fake_ops, &f->fake, &s), 0);
        kms_server_free(s);
        s = NULL;
        f->opt.max_message_size = 0;
        f->opt.n_allowed_uids = 1;
        assert_int_equal(kms_server_new(f->event, &f->opt, &fake_ops, &f->fake, &s), -EINVAL);
        assert_null(s);
}

static bool no_connections(void *arg) {
        struct kms_server_stats st;

        kms_server_get_stats(arg, &st);
        return st.connections_open == 0;
}

/* A peer that stops reading and then goes idle: the idle timeout queues a
 * GOAWAY that cannot go out. The connection must then wait for the stalled
 * output rule, not fire its timer in a loop at the past idle deadline (which
 * counted a timeout each time). */
static void test_server_idle_while_stalled(void **state) {
        struct fixture *f = *state;
        struct client *cl;
        struct kms_server_stats st;
        unsigned stuck = 0;
        uint64_t end, t_stalled;

        f->opt.idle_timeout_usec = 200 * 1000;
        f->opt.stream_timeout_usec = 1000 * 1000;
        fixture_start(f);
        cl = client_new(f);
        assert_true(pump(f, &cl, 1, handshaken, cl, 3000));
        cl->no_read = true;

        /* PING ACKs (RFC 9113 §6.7) fill the socket, then our output buffer,
         * and we stop reading; no stream stays open. At most 200 PINGs per
         * round so that nghttp2's guard against queued ACKs (1000) holds. */
        end = now_ms() + 10000;
        while (stuck < 20 && now_ms() < end) {
                if (cl->pending_len == 0) {
                        for (int i = 0; i < 200; i++)
                                assert_int_equal(nghttp2_submit_ping(cl->h2, NGHTTP2_FLAG_NONE, NULL), 0);
                        stuck = 0;
                } else
                        stuck++;
                client_io(cl);
                assert_true(sd_event_run(f->event, 1000) >= 0);
        }
        assert_true(stuck >= 20);   /* the server stopped reading */
        t_stalled = now_ms();
        kms_server_get_stats(f->server, &st);
        assert_int_equal(st.connections_open, 1);
        assert_int_equal(st.timeouts, 0);

        /* idle after 200 ms (GOAWAY stuck), closed by the stalled output
         * rule at most 1 s after the output backed up */
        assert_true(pump(f, &cl, 1, no_connections, f->server, 5000));
        assert_true(now_ms() - t_stalled >= 150);
        assert_true(now_ms() - t_stalled < 2000);
        kms_server_get_stats(f->server, &st);
        assert_int_equal(st.timeouts, 1);
        assert_int_equal(st.protocol_errors, 0);
        assert_non_null(strstr(f->last_log, "stopped reading"));
        client_free(cl);
}

/* Answers back up while the client does not read (the socket and then our
 * output buffer fill, nghttp2 is paused at the buffer's high mark); once it
 * reads again every answer arrives whole and in order. */
static void test_server_output_backpressure(void **state) {
        struct fixture *f = *state;
        enum { N = 400 };   /* ~1 KiB answers: more than socket + buffer */
        struct call *calls = calloc(N, sizeof(*calls));
        struct client *cl;

        assert_non_null(calls);
        f->fake.big_key_id = true;
        f->opt.max_concurrent_streams = 1000;
        f->opt.stream_timeout_usec = 5 * 1000 * 1000;
        fixture_start(f);
        cl = client_new(f);
        assert_true(pump(f, &cl, 1, handshaken, cl, 3000));   /* our SETTINGS */

        cl->no_read = true;
        for (int i = 0; i < N; i++) {
                call_init(&calls[i]);
                frame_msg(&calls[i], NULL, 0);
                client_submit(cl, &calls[i], "POST", PATH_STATUS, "application/grpc", NULL, 0);
        }
        assert_true(pump(f, &cl, 1, NULL, NULL, 200));
        assert_false(calls[0].closed);

        cl->no_read = false;
        for (int i = 0; i < N; i++)
                assert_true(pump(f, &cl, 1, call_done, &calls[i], 5000));
        for (int i = 0; i < N; i++) {
                assert_int_equal(calls[i].grpc_status, 0);
                assert_int_equal(calls[i].close_code, NGHTTP2_NO_ERROR);
                /* prefix + version + healthz + 1 KiB key id (3-byte tag+len) */
                assert_int_equal(calls[i].data_len, 5 + 4 + 4 + 3 + KMS_KEY_ID_MAX);
                assert_memory_equal(calls[i].data, calls[0].data, calls[0].data_len);
        }
        assert_false(cl->closed);
        client_free(cl);
        free(calls);
}

int main(void) {
        const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
                T(test_server_status_ok),
                T(test_server_encrypt_decrypt_roundtrip),
                T(test_server_unknown_method),
                T(test_server_not_post_or_not_grpc),
                T(test_server_http1_closed),
                T(test_server_garbage_closed),
                T(test_server_oversized_message),
                T(test_server_truncated_frames),
                T(test_server_stream_timeout),
                T(test_server_grpc_timeout),
                T(test_server_compressed),
                T(test_server_header_list_too_large),
                T(test_server_max_connections),
                T(test_server_parked_call),
                T(test_server_parked_call_tokens),
                T(test_server_new_options),
                T(test_server_idle_while_stalled),
                T(test_server_output_backpressure),
                T(test_server_peer_refused),
                T(test_server_handshake_timeout),
                T(test_server_idle_timeout),
                T(test_server_shutdown_completes_inflight),
                T(test_server_shutdown_forced),
                T(test_server_shutdown_idle),
                T(test_server_many_calls),
#undef T
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
