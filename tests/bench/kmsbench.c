/* kmsbench — a load client for the KMS v2 unix socket.
 *
 * Speaks gRPC over prior-knowledge h2c (nghttp2 client side, sans-I/O) on
 * plain non-blocking unix sockets driven by epoll, keeps --inflight requests
 * outstanding spread over --connections connections, and prints one line per
 * scenario: ops/s and p50/p90/p99 from a sorted array of per-request
 * CLOCK_MONOTONIC latencies, plus wire bytes and CPU per request.
 *
 * --pingpong replaces the daemon by a forked echo peer over socketpairs that
 * answers each request of the same size as a gRPC Decrypt on the wire with a
 * response of the same size: the floor that the daemon is measured against.
 * Both modes share the client's event loop (level-triggered epoll, one read
 * per wake-up), so the difference between them is the server.
 *
 * Exit status: 0 when every request succeeded (grpc-status 0, and Decrypt
 * returned the plaintext that was encrypted), 1 on any error, 2 on bad usage. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>

#include "macro.h"
#include "kms_v2.pb-c.h"

#define PLAINTEXT_SIZE 32         /* the apiserver's DEK seed */
#define RESP_MAX 4096             /* a response body larger than this is an error */
#define READ_CHUNK 65536
#define RSS_EVERY 100000
#define STALL_USEC (10ULL * 1000000ULL)   /* no completion for this long: give up */
/* apiserver request uids are UUIDs: same size on the wire */
#define REQUEST_UID "6f1c2a34-9b7e-4d21-8c55-0e3a9d4b7f10"

enum method { M_STATUS, M_ENCRYPT, M_DECRYPT, M_PINGPONG };

static const char *const method_name[] = {
        [M_STATUS] = "status", [M_ENCRYPT] = "encrypt",
        [M_DECRYPT] = "decrypt", [M_PINGPONG] = "pingpong",
};
static const char *const method_path[] = {
        [M_STATUS] = "/v2.KeyManagementService/Status",
        [M_ENCRYPT] = "/v2.KeyManagementService/Encrypt",
        [M_DECRYPT] = "/v2.KeyManagementService/Decrypt",
};

struct opts {
        const char *socket;
        enum method method;
        unsigned inflight;
        unsigned connections;
        uint64_t requests;        /* 0: use duration */
        double duration;          /* seconds */
        uint64_t warmup;
        pid_t pid;                /* daemon to sample VmRSS / CPU of; 0: none */
        size_t req_bytes, resp_bytes;     /* pingpong sizes; 0: calibrate */
        bool quiet;
        const char *label;
};

struct bench;
struct conn;

/* One request slot; it is reused for the next request when one completes. */
struct req {
        struct conn *c;
        uint64_t t_start;
        int32_t stream_id;
        int http_status;
        int grpc_status;          /* -1: no grpc-status seen */
        bool overflow;
        size_t resp_len;
        uint8_t resp[RESP_MAX];
};

struct conn {
        struct bench *b;
        int fd;
        nghttp2_session *h2;
        uint8_t *out;
        size_t out_len, out_off, out_cap;
        bool epollout;
        bool dead;
        /* slots idle and ready to be submitted on this connection */
        struct req **ready;
        size_t n_ready;
        size_t n_slots;
        /* pingpong: FIFO of start times of outstanding requests */
        uint64_t *ring;
        size_t ring_head, ring_n;
        size_t accum;
};

struct bench {
        const struct opts *o;
        enum method method;
        int epfd;
        struct conn *conns;
        struct req *slots;
        /* request body (gRPC frame) and what Decrypt must return */
        uint8_t *body;
        size_t body_len;
        uint8_t plaintext[PLAINTEXT_SIZE];
        size_t req_bytes, resp_bytes;     /* pingpong */
        uint8_t *pp_req;
        pid_t peer;

        uint64_t to_issue;        /* requests mode: total (warmup + measured) */
        uint64_t deadline;        /* duration mode: stop issuing after this */
        uint64_t issued, completed, outstanding;
        uint64_t errors;
        unsigned errors_printed;
        bool measuring;
        uint64_t t0, t_end, last_progress;
        uint64_t *lat;
        size_t n_lat, cap_lat;
        uint64_t bytes_out, bytes_in;
        uint64_t bytes_out0, bytes_in0;
        uint64_t next_rss;
        /* Encrypt result, kept for Decrypt and checks */
        V2__EncryptResponse *enc;
};

static uint64_t now_usec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000ULL + (uint64_t) ts.tv_nsec / 1000ULL;
}

static uint64_t now_nsec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000ULL + (uint64_t) ts.tv_nsec;
}

static void bench_error(struct bench *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bench_error(struct bench *b, const char *fmt, ...) {
        b->errors++;
        if (b->errors_printed >= 5)
                return;
        b->errors_printed++;
        va_list ap;
        va_start(ap, fmt);
        fputs("kmsbench: error: ", stderr);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
}

/* ---- /proc sampling ---- */

/* VmRSS of pid in KiB, or -1. */
static long proc_rss_kib(pid_t pid) {
        char path[64], line[256];
        long kib = -1;
        snprintf(path, sizeof(path), "/proc/%d/status", (int) pid);
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        if (!f)
                return -1;
        while (fgets(line, sizeof(line), f))
                if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
                        break;
        return kib;
}

/* utime + stime of pid in microseconds, or -1. */
static int64_t proc_cpu_usec(pid_t pid) {
        char path[64], buf[1024];
        snprintf(path, sizeof(path), "/proc/%d/stat", (int) pid);
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return -1;
        ssize_t n = read(fd, buf, sizeof(buf) - 1);
        if (n <= 0)
                return -1;
        buf[n] = 0;
        /* comm may hold spaces: fields start after the last ')' */
        char *p = strrchr(buf, ')');
        if (!p)
                return -1;
        unsigned long ut, st;
        /* state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime */
        if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
                return -1;
        long hz = sysconf(_SC_CLK_TCK);
        return (int64_t) (ut + st) * 1000000 / hz;
}

static int64_t self_cpu_usec(void) {
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        return (int64_t) (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 +
               ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
}

static void rss_sample(struct bench *b, const char *when) {
        /* in pingpong mode the daemon is idle: its RSS says nothing */
        if (b->o->pid <= 0 || b->o->quiet || b->method == M_PINGPONG)
                return;
        long kib = proc_rss_kib(b->o->pid);
        printf("rss pid=%d %s requests=%" PRIu64 ": %ld KiB\n", (int) b->o->pid, when,
               b->n_lat, kib);
        fflush(stdout);
}

/* ---- output buffer shared by both modes ---- */

static int conn_append(struct conn *c, const uint8_t *data, size_t len) {
        if (c->out_off == c->out_len)
                c->out_off = c->out_len = 0;
        if (c->out_len + len > c->out_cap) {
                if (c->out_off > 0) {
                        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
                        c->out_len -= c->out_off;
                        c->out_off = 0;
                }
                if (c->out_len + len > c->out_cap) {
                        size_t cap = c->out_cap ? c->out_cap : 16384;
                        while (cap < c->out_len + len)
                                cap *= 2;
                        uint8_t *p = realloc(c->out, cap);
                        if (!p)
                                return -ENOMEM;
                        c->out = p;
                        c->out_cap = cap;
                }
        }
        memcpy(c->out + c->out_len, data, len);
        c->out_len += len;
        return 0;
}

static int conn_set_epollout(struct conn *c, bool on) {
        if (c->epollout == on)
                return 0;
        struct epoll_event ev = {
                .events = EPOLLIN | (on ? EPOLLOUT : 0),
                .data.ptr = c,
        };
        if (epoll_ctl(c->b->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
                return -errno;
        c->epollout = on;
        return 0;
}

/* Pull everything nghttp2 wants to send into the buffer, then write what the
 * socket takes. Returns 0 or a negative errno. */
static int conn_flush(struct conn *c) {
        if (c->h2) {
                for (;;) {
                        const uint8_t *data;
                        ssize_t n = nghttp2_session_mem_send(c->h2, &data);
                        if (n < 0)
                                return -EPROTO;
                        if (n == 0)
                                break;
                        int r = conn_append(c, data, (size_t) n);
                        if (r < 0)
                                return r;
                }
        }
        while (c->out_off < c->out_len) {
                ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                break;
                        return -errno;
                }
                c->b->bytes_out += (uint64_t) n;
                c->out_off += (size_t) n;
        }
        return conn_set_epollout(c, c->out_off < c->out_len);
}

/* ---- issuing and completing ---- */

static bool bench_may_issue(struct bench *b) {
        if (b->o->requests)
                return b->issued < b->to_issue;
        return now_usec() < b->deadline;
}

static void bench_start_measuring(struct bench *b) {
        b->measuring = true;
        b->t0 = now_usec();
        b->bytes_out0 = b->bytes_out;
        b->bytes_in0 = b->bytes_in;
        if (b->o->requests)
                b->deadline = 0;
        else
                b->deadline = b->t0 + (uint64_t) (b->o->duration * 1e6);
        b->next_rss = RSS_EVERY;
}

/* Record the completion of a request that started at t_start (ns). */
static void bench_complete(struct bench *b, uint64_t t_start, bool ok) {
        uint64_t t = now_nsec();
        b->completed++;
        b->outstanding--;
        b->last_progress = t / 1000;
        if (!b->measuring) {
                if (b->completed >= b->o->warmup)
                        bench_start_measuring(b);
                return;
        }
        if (!ok)
                return;
        if (b->n_lat == b->cap_lat) {
                size_t cap = b->cap_lat ? b->cap_lat * 2 : 65536;
                uint64_t *p = realloc(b->lat, cap * sizeof(*p));
                if (!p) {
                        bench_error(b, "out of memory");
                        return;
                }
                b->lat = p;
                b->cap_lat = cap;
        }
        b->lat[b->n_lat++] = t - t_start;
        if (b->n_lat >= b->next_rss) {
                b->next_rss += RSS_EVERY;
                rss_sample(b, "during");
        }
}

static ssize_t body_read_cb(nghttp2_session *session, int32_t stream_id, uint8_t *buf,
                            size_t length, uint32_t *data_flags,
                            nghttp2_data_source *source, void *user_data) {
        struct conn *c = user_data;
        /* the body is a few hundred bytes: one DATA frame */
        if (c->b->body_len > length)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        memcpy(buf, c->b->body, c->b->body_len);
        *data_flags |= NGHTTP2_DATA_FLAG_EOF;
        return (ssize_t) c->b->body_len;
}

#define NV(n, v)                                                               \
        { (uint8_t *) (n), (uint8_t *) (v), sizeof(n) - 1, sizeof(v) - 1,      \
          NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE }

static int req_submit(struct req *q) {
        struct conn *c = q->c;
        struct bench *b = c->b;
        nghttp2_nv nva[] = {
                NV(":method", "POST"),
                NV(":scheme", "http"),
                NV(":authority", "localhost"),
                { (uint8_t *) ":path", (uint8_t *) method_path[b->method], 5,
                  strlen(method_path[b->method]),
                  NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE },
                NV("content-type", "application/grpc"),
                NV("te", "trailers"),
        };
        nghttp2_data_provider dp = { .read_callback = body_read_cb };

        q->http_status = 0;
        q->grpc_status = -1;
        q->overflow = false;
        q->resp_len = 0;
        q->t_start = now_nsec();
        int32_t id = nghttp2_submit_request(c->h2, NULL, nva, ARRAY_SIZE(nva), &dp, q);
        if (id < 0)
                return -EPROTO;
        q->stream_id = id;
        b->issued++;
        b->outstanding++;
        return 0;
}

static int on_header_cb(nghttp2_session *session, const nghttp2_frame *frame,
                        const uint8_t *name, size_t namelen, const uint8_t *value,
                        size_t valuelen, uint8_t flags, void *user_data) {
        if (frame->hd.type != NGHTTP2_HEADERS)
                return 0;
        struct req *q = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
        if (!q)
                return 0;
        if (namelen == 7 && memcmp(name, ":status", 7) == 0)
                q->http_status = atoi((const char *) value);
        else if (namelen == 11 && memcmp(name, "grpc-status", 11) == 0)
                q->grpc_status = (valuelen > 0 && valuelen < 4) ? atoi((const char *) value) : 99;
        else if (namelen == 12 && memcmp(name, "grpc-message", 12) == 0 &&
                 q->c->b->errors_printed < 5)
                fprintf(stderr, "kmsbench: grpc-message: %.*s\n", (int) valuelen,
                        (const char *) value);
        return 0;
}

static int on_data_chunk_cb(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                            const uint8_t *data, size_t len, void *user_data) {
        struct req *q = nghttp2_session_get_stream_user_data(session, stream_id);
        if (!q)
                return 0;
        if (q->resp_len + len > sizeof(q->resp)) {
                q->overflow = true;
                return 0;
        }
        memcpy(q->resp + q->resp_len, data, len);
        q->resp_len += len;
        return 0;
}

/* Check one completed response. Returns true if it is what we expected. */
static bool req_check(struct bench *b, struct req *q, uint32_t error_code) {
        if (error_code != NGHTTP2_NO_ERROR) {
                bench_error(b, "stream %d reset: %s", q->stream_id,
                            nghttp2_http2_strerror(error_code));
                return false;
        }
        if (q->http_status != 200) {
                bench_error(b, "stream %d: :status %d", q->stream_id, q->http_status);
                return false;
        }
        if (q->grpc_status != 0) {
                bench_error(b, "stream %d: grpc-status %d", q->stream_id, q->grpc_status);
                return false;
        }
        if (q->overflow || q->resp_len < 5 || q->resp[0] != 0) {
                bench_error(b, "stream %d: bad gRPC frame (%zu bytes)", q->stream_id,
                            q->resp_len);
                return false;
        }
        uint32_t mlen = (uint32_t) q->resp[1] << 24 | (uint32_t) q->resp[2] << 16 |
                        (uint32_t) q->resp[3] << 8 | q->resp[4];
        if (mlen != q->resp_len - 5) {
                bench_error(b, "stream %d: gRPC length %u, body %zu", q->stream_id, mlen,
                            q->resp_len - 5);
                return false;
        }
        const uint8_t *m = q->resp + 5;
        bool ok = false;
        switch (b->method) {
        case M_STATUS: {
                V2__StatusResponse *r = v2__status_response__unpack(NULL, mlen, m);
                ok = r && strcmp(r->version, "v2") == 0 && strcmp(r->healthz, "ok") == 0 &&
                     r->key_id[0];
                if (!ok)
                        bench_error(b, "Status: version=%s healthz=%s key_id=%s",
                                    r ? r->version : "?", r ? r->healthz : "?",
                                    r ? r->key_id : "?");
                if (r)
                        v2__status_response__free_unpacked(r, NULL);
                break;
        }
        case M_ENCRYPT: {
                V2__EncryptResponse *r = v2__encrypt_response__unpack(NULL, mlen, m);
                ok = r && r->ciphertext.len > 0 && r->ciphertext.len <= 1024 &&
                     r->key_id[0] && strlen(r->key_id) <= 1024;
                if (!ok)
                        bench_error(b, "Encrypt: bad response");
                if (r)
                        v2__encrypt_response__free_unpacked(r, NULL);
                break;
        }
        case M_DECRYPT: {
                V2__DecryptResponse *r = v2__decrypt_response__unpack(NULL, mlen, m);
                ok = r && r->plaintext.len == PLAINTEXT_SIZE &&
                     memcmp(r->plaintext.data, b->plaintext, PLAINTEXT_SIZE) == 0;
                if (!ok)
                        bench_error(b, "Decrypt: plaintext differs from what was encrypted");
                if (r)
                        v2__decrypt_response__free_unpacked(r, NULL);
                break;
        }
        case M_PINGPONG:
                break;
        }
        return ok;
}

static int on_stream_close_cb(nghttp2_session *session, int32_t stream_id,
                              uint32_t error_code, void *user_data) {
        struct conn *c = user_data;
        struct req *q = nghttp2_session_get_stream_user_data(session, stream_id);
        if (!q)
                return 0;
        bool ok = req_check(c->b, q, error_code);
        bench_complete(c->b, q->t_start, ok);
        /* resubmitted after mem_recv returns, not from inside it */
        c->ready[c->n_ready++] = q;
        return 0;
}

static int conn_submit_ready(struct conn *c) {
        while (c->n_ready > 0 && bench_may_issue(c->b)) {
                int r = req_submit(c->ready[--c->n_ready]);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* ---- pingpong: the echo peer and the client side ---- */

/* The forked peer: for every req_bytes read on a socket, write resp_bytes. */
static _Noreturn void echo_peer(int *fds, unsigned n, size_t req_bytes, size_t resp_bytes) {
        int ep = epoll_create1(EPOLL_CLOEXEC);
        size_t *accum = calloc(n, sizeof(*accum));
        uint8_t *resp = calloc(1, resp_bytes);
        uint8_t *buf = malloc(READ_CHUNK);
        unsigned open_fds = n;
        if (ep < 0 || !accum || !resp || !buf)
                _exit(3);
        for (unsigned i = 0; i < n; i++) {
                struct epoll_event ev = { .events = EPOLLIN, .data.u32 = i };
                if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0)
                        _exit(3);
        }
        while (open_fds > 0) {
                struct epoll_event evs[64];
                int k = epoll_wait(ep, evs, 64, -1);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        _exit(3);
                }
                for (int e = 0; e < k; e++) {
                        unsigned i = evs[e].data.u32;
                        ssize_t r = read(fds[i], buf, READ_CHUNK);
                        if (r < 0 && (errno == EINTR || errno == EAGAIN))
                                continue;
                        if (r <= 0) {
                                epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
                                close(fds[i]);
                                open_fds--;
                                continue;
                        }
                        accum[i] += (size_t) r;
                        size_t replies = accum[i] / req_bytes;
                        accum[i] %= req_bytes;
                        /* one write for all complete requests, like a server
                         * that drains its output once per wake-up */
                        for (; replies > 0; replies--) {
                                for (size_t off = 0; off < resp_bytes;) {
                                        ssize_t w = write(fds[i], resp + off, resp_bytes - off);
                                        if (w < 0 && errno == EINTR)
                                                continue;
                                        if (w <= 0)
                                                _exit(3);
                                        off += (size_t) w;
                                }
                        }
                }
        }
        _exit(0);
}

static int pp_submit(struct conn *c) {
        struct bench *b = c->b;
        c->ring[(c->ring_head + c->ring_n) % c->n_slots] = now_nsec();
        c->ring_n++;
        b->issued++;
        b->outstanding++;
        return conn_append(c, b->pp_req, b->req_bytes);
}

static int pp_on_read(struct conn *c, size_t n) {
        struct bench *b = c->b;
        c->accum += n;
        while (c->accum >= b->resp_bytes && c->ring_n > 0) {
                c->accum -= b->resp_bytes;
                uint64_t t = c->ring[c->ring_head];
                c->ring_head = (c->ring_head + 1) % c->n_slots;
                c->ring_n--;
                bench_complete(b, t, true);
                if (bench_may_issue(b)) {
                        int r = pp_submit(c);
                        if (r < 0)
                                return r;
                }
        }
        return 0;
}

/* ---- the event loop ---- */

static int conn_on_readable(struct conn *c) {
        static uint8_t buf[READ_CHUNK];
        struct bench *b = c->b;
        ssize_t n = read(c->fd, buf, sizeof(buf));
        if (n < 0) {
                if (errno == EINTR || errno == EAGAIN)
                        return 0;
                return -errno;
        }
        if (n == 0)
                return -ECONNRESET;
        b->bytes_in += (uint64_t) n;
        if (b->method == M_PINGPONG)
                return pp_on_read(c, (size_t) n);
        ssize_t r = nghttp2_session_mem_recv(c->h2, buf, (size_t) n);
        if (r < 0) {
                fprintf(stderr, "kmsbench: nghttp2: %s\n", nghttp2_strerror((int) r));
                return -EPROTO;
        }
        return conn_submit_ready(c);
}

static int unix_connect(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        strcpy(sa.sun_path, path);
        _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                return -errno;
        return TAKE_FD(fd);
}

static int conn_setup_h2(struct conn *c) {
        nghttp2_session_callbacks *cbs;
        int r = nghttp2_session_callbacks_new(&cbs);
        if (r != 0)
                return -ENOMEM;
        nghttp2_session_callbacks_set_on_header_callback(cbs, on_header_cb);
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk_cb);
        nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close_cb);
        r = nghttp2_session_client_new(&c->h2, cbs, c);
        nghttp2_session_callbacks_del(cbs);
        if (r != 0)
                return -ENOMEM;
        /* prior knowledge: the client preface goes out with this SETTINGS */
        nghttp2_settings_entry iv[] = {
                { NGHTTP2_SETTINGS_ENABLE_PUSH, 0 },
                { NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100 },
        };
        if (nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, iv, ARRAY_SIZE(iv)) != 0)
                return -EPROTO;
        return 0;
}

static void bench_free(struct bench *b) {
        if (b->conns) {
                for (unsigned i = 0; i < b->o->connections; i++) {
                        struct conn *c = &b->conns[i];
                        if (c->h2)
                                nghttp2_session_del(c->h2);
                        if (c->fd >= 0)
                                close(c->fd);
                        free(c->out);
                        free(c->ready);
                        free(c->ring);
                }
        }
        if (b->peer > 0) {
                int st;
                waitpid(b->peer, &st, 0);
        }
        if (b->epfd >= 0)
                close(b->epfd);
        free(b->conns);
        free(b->slots);
        free(b->body);
        free(b->pp_req);
        free(b->lat);
        if (b->enc)
                v2__encrypt_response__free_unpacked(b->enc, NULL);
}

/* Open connections (or socketpairs to a forked echo peer), register them. */
static int bench_connect(struct bench *b) {
        const struct opts *o = b->o;
        b->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (b->epfd < 0)
                return -errno;
        b->conns = calloc(o->connections, sizeof(*b->conns));
        if (!b->conns)
                return -ENOMEM;
        for (unsigned i = 0; i < o->connections; i++)
                b->conns[i].fd = -1;

        int peer_fds[o->connections];
        for (unsigned i = 0; i < o->connections; i++) {
                struct conn *c = &b->conns[i];
                c->b = b;
                if (b->method == M_PINGPONG) {
                        int sv[2];
                        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                                return -errno;
                        c->fd = sv[0];
                        peer_fds[i] = sv[1];
                } else {
                        c->fd = unix_connect(o->socket);
                        if (c->fd < 0) {
                                fprintf(stderr, "kmsbench: connect %s: %s\n", o->socket,
                                        strerror(-c->fd));
                                return c->fd;
                        }
                        int r = conn_setup_h2(c);
                        if (r < 0)
                                return r;
                }
                if (fcntl(c->fd, F_SETFL, O_NONBLOCK) < 0)
                        return -errno;
                struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
                if (epoll_ctl(b->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
                        return -errno;
        }
        if (b->method == M_PINGPONG) {
                fflush(NULL);
                b->peer = fork();
                if (b->peer < 0)
                        return -errno;
                if (b->peer == 0) {
                        for (unsigned i = 0; i < o->connections; i++)
                                close(b->conns[i].fd);
                        echo_peer(peer_fds, o->connections, b->req_bytes, b->resp_bytes);
                }
                for (unsigned i = 0; i < o->connections; i++)
                        close(peer_fds[i]);
        }
        return 0;
}

/* Run until everything issued has completed. Returns 0 or a negative errno. */
static int bench_loop(struct bench *b) {
        b->last_progress = now_usec();
        for (;;) {
                if (b->outstanding == 0 && !bench_may_issue(b))
                        break;
                if (b->outstanding == 0) {
                        /* nothing in flight and nothing ready: cannot happen
                         * unless every slot failed to submit */
                        bench_error(b, "no request in flight");
                        return -EIO;
                }
                struct epoll_event evs[16];
                int k = epoll_wait(b->epfd, evs, ARRAY_SIZE(evs), 1000);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0 && now_usec() - b->last_progress > STALL_USEC) {
                        bench_error(b, "no response for %llu s with %" PRIu64 " in flight",
                                    STALL_USEC / 1000000ULL, b->outstanding);
                        return -ETIMEDOUT;
                }
                for (int e = 0; e < k; e++) {
                        struct conn *c = evs[e].data.ptr;
                        int r = 0;
                        if (evs[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                                r = conn_on_readable(c);
                        if (r >= 0)
                                r = conn_flush(c);
                        if (r < 0) {
                                bench_error(b, "connection %td: %s", c - b->conns,
                                            strerror(-r));
                                return r;
                        }
                }
        }
        b->t_end = now_usec();
        return 0;
}

/* Start the slots: slot i on connection i % N. */
static int bench_prime(struct bench *b) {
        const struct opts *o = b->o;
        b->slots = calloc(o->inflight, sizeof(*b->slots));
        if (!b->slots)
                return -ENOMEM;
        for (unsigned i = 0; i < o->connections; i++) {
                struct conn *c = &b->conns[i];
                c->n_slots = o->inflight / o->connections + (i < o->inflight % o->connections);
                c->ready = calloc(c->n_slots ? c->n_slots : 1, sizeof(*c->ready));
                c->ring = calloc(c->n_slots ? c->n_slots : 1, sizeof(*c->ring));
                if (!c->ready || !c->ring)
                        return -ENOMEM;
        }
        if (b->o->requests)
                b->to_issue = o->warmup + o->requests;
        else
                b->deadline = UINT64_MAX;       /* set when measuring starts */
        if (o->warmup == 0)
                bench_start_measuring(b);
        rss_sample(b, "start");
        for (unsigned i = 0; i < o->inflight; i++) {
                struct conn *c = &b->conns[i % o->connections];
                struct req *q = &b->slots[i];
                q->c = c;
                if (!bench_may_issue(b))
                        break;
                int r = b->method == M_PINGPONG ? pp_submit(c) : req_submit(q);
                if (r < 0)
                        return r;
        }
        for (unsigned i = 0; i < o->connections; i++) {
                int r = conn_flush(&b->conns[i]);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int u64cmp(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
        return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of a sorted array, in ms. */
static double pct_ms(const uint64_t *v, size_t n, double p) {
        if (n == 0)
                return 0;
        size_t rank = (size_t) (p / 100.0 * (double) n + 0.999999);
        if (rank < 1)
                rank = 1;
        if (rank > n)
                rank = n;
        return (double) v[rank - 1] / 1e6;
}

struct result {
        double ops;
        double p50, p90, p99, max;
        uint64_t n;
        uint64_t errors;
        double wire_out, wire_in;         /* bytes per request */
        double srv_cpu, cli_cpu;          /* us per request */
};

static int bench_run(struct bench *b, struct result *res) {
        const struct opts *o = b->o;
        int64_t srv0 = -1, cli0, srv1 = -1, cli1;
        pid_t srv_pid = b->method == M_PINGPONG ? 0 : o->pid;

        int r = bench_connect(b);
        if (r < 0)
                return r;
        if (b->method == M_PINGPONG)
                srv_pid = b->peer;
        /* CPU is counted over the whole run including warm-up; the warm-up
         * is small next to the measured part */
        if (srv_pid > 0)
                srv0 = proc_cpu_usec(srv_pid);
        cli0 = self_cpu_usec();
        r = bench_prime(b);
        if (r < 0)
                return r;
        r = bench_loop(b);
        if (srv_pid > 0)
                srv1 = proc_cpu_usec(srv_pid);
        cli1 = self_cpu_usec();
        if (r < 0)
                return r;
        if (!b->measuring) {
                bench_error(b, "fewer successful requests than the warm-up");
                return -EIO;
        }
        rss_sample(b, "end");

        qsort(b->lat, b->n_lat, sizeof(*b->lat), u64cmp);
        double secs = (double) (b->t_end - b->t0) / 1e6;
        uint64_t total = b->issued;
        *res = (struct result) {
                .n = b->n_lat,
                .errors = b->errors,
                .ops = secs > 0 ? (double) b->n_lat / secs : 0,
                .p50 = pct_ms(b->lat, b->n_lat, 50),
                .p90 = pct_ms(b->lat, b->n_lat, 90),
                .p99 = pct_ms(b->lat, b->n_lat, 99),
                .max = b->n_lat ? (double) b->lat[b->n_lat - 1] / 1e6 : 0,
                .wire_out = b->n_lat ? (double) (b->bytes_out - b->bytes_out0) / (double) b->n_lat : 0,
                .wire_in = b->n_lat ? (double) (b->bytes_in - b->bytes_in0) / (double) b->n_lat : 0,
                .srv_cpu = srv0 >= 0 && srv1 >= 0 ? (double) (srv1 - srv0) / (double) total : -1,
                .cli_cpu = (double) (cli1 - cli0) / (double) total,
        };
        return 0;
}

/* ---- one-off calls and request bodies ---- */

static int frame(const ProtobufCMessage *m, uint8_t **ret, size_t *ret_len) {
        size_t n = protobuf_c_message_get_packed_size(m);
        uint8_t *p = malloc(n + 5);
        if (!p)
                return -ENOMEM;
        p[0] = 0;
        p[1] = (uint8_t) (n >> 24);
        p[2] = (uint8_t) (n >> 16);
        p[3] = (uint8_t) (n >> 8);
        p[4] = (uint8_t) n;
        protobuf_c_message_pack(m, p + 5);
        *ret = p;
        *ret_len = n + 5;
        return 0;
}

static int body_status(struct bench *b) {
        V2__StatusRequest m = V2__STATUS_REQUEST__INIT;
        return frame(&m.base, &b->body, &b->body_len);
}

static int body_encrypt(struct bench *b) {
        V2__EncryptRequest m = V2__ENCRYPT_REQUEST__INIT;
        m.plaintext.data = b->plaintext;
        m.plaintext.len = PLAINTEXT_SIZE;
        m.uid = (char *) REQUEST_UID;
        return frame(&m.base, &b->body, &b->body_len);
}

static int body_decrypt(struct bench *b) {
        const V2__EncryptResponse *e = b->enc;
        V2__DecryptRequest m = V2__DECRYPT_REQUEST__INIT;
        V2__DecryptRequest__AnnotationsEntry ents[e->n_annotations ? e->n_annotations : 1];
        V2__DecryptRequest__AnnotationsEntry *ptrs[e->n_annotations ? e->n_annotations : 1];
        m.ciphertext = e->ciphertext;
        m.uid = (char *) REQUEST_UID;
        m.key_id = e->key_id;
        for (size_t i = 0; i < e->n_annotations; i++) {
                v2__decrypt_request__annotations_entry__init(&ents[i]);
                ents[i].key = e->annotations[i]->key;
                ents[i].value = e->annotations[i]->value;
                ptrs[i] = &ents[i];
        }
        m.n_annotations = e->n_annotations;
        m.annotations = e->n_annotations ? ptrs : NULL;
        return frame(&m.base, &b->body, &b->body_len);
}

/* Encrypt b->plaintext once (1 request on 1 connection) and keep the
 * response, so Decrypt has something real to decrypt. */
static int setup_encrypt(const struct opts *o, struct bench *out) {
        struct opts eo = *o;
        eo.method = M_ENCRYPT;
        eo.inflight = 1;
        eo.connections = 1;
        eo.requests = 1;
        eo.warmup = 0;
        eo.pid = 0;
        eo.quiet = true;
        _cleanup_(bench_free) struct bench b = { .o = &eo, .method = M_ENCRYPT, .epfd = -1 };
        memcpy(b.plaintext, out->plaintext, PLAINTEXT_SIZE);
        int r = body_encrypt(&b);
        if (r < 0)
                return r;
        r = bench_connect(&b);
        if (r < 0)
                return r;
        struct conn *c = &b.conns[0];
        b.slots = calloc(1, sizeof(*b.slots));
        c->ready = calloc(1, sizeof(*c->ready));
        if (!b.slots || !c->ready)
                return -ENOMEM;
        c->n_slots = 1;
        b.to_issue = 1;
        bench_start_measuring(&b);
        b.slots[0].c = c;
        r = req_submit(&b.slots[0]);
        if (r >= 0)
                r = conn_flush(c);
        if (r >= 0)
                r = bench_loop(&b);
        if (r < 0)
                return r;
        if (b.errors > 0 || b.n_lat != 1)
                return -EIO;
        struct req *q = &b.slots[0];
        out->enc = v2__encrypt_response__unpack(NULL, q->resp_len - 5, q->resp + 5);
        return out->enc ? 0 : -EBADMSG;
}

/* Sizes of one steady-state Decrypt round trip on the wire (HPACK warmed up). */
static int calibrate(const struct opts *o, size_t *ret_req, size_t *ret_resp) {
        struct opts co = *o;
        co.method = M_DECRYPT;
        co.inflight = 1;
        co.connections = 1;
        co.requests = 200;
        co.warmup = 50;
        co.pid = 0;
        co.quiet = true;
        _cleanup_(bench_free) struct bench b = { .o = &co, .method = M_DECRYPT, .epfd = -1 };
        if (getrandom(b.plaintext, PLAINTEXT_SIZE, 0) != PLAINTEXT_SIZE)
                return -EIO;
        int r = setup_encrypt(&co, &b);
        if (r < 0)
                return r;
        r = body_decrypt(&b);
        if (r < 0)
                return r;
        struct result res;
        r = bench_run(&b, &res);
        if (r < 0)
                return r;
        if (res.errors)
                return -EIO;
        *ret_req = (size_t) (res.wire_out + 0.5);
        *ret_resp = (size_t) (res.wire_in + 0.5);
        return 0;
}

static void print_result(const struct opts *o, const struct result *r) {
        printf("%s inflight=%u conns=%u: %.0f ops/s p50=%.3fms p90=%.3fms p99=%.3fms "
               "max=%.3fms n=%" PRIu64 " errors=%" PRIu64 " wire=%.0f/%.0fB",
               o->label ? o->label : method_name[o->method], o->inflight, o->connections,
               r->ops, r->p50, r->p90, r->p99, r->max, r->n, r->errors, r->wire_out,
               r->wire_in);
        if (r->srv_cpu >= 0)
                printf(" server_cpu=%.2fus/op", r->srv_cpu);
        printf(" client_cpu=%.2fus/op\n", r->cli_cpu);
        fflush(stdout);
}

static void usage(FILE *f) {
        fputs("usage: kmsbench --socket PATH [--method status|encrypt|decrypt]\n"
              "                [--requests N | --duration SECS] [--inflight M]\n"
              "                [--connections N] [--warmup N] [--pid PID]\n"
              "       kmsbench --pingpong [--socket PATH | --req-bytes N --resp-bytes N] ...\n"
              "  --pingpong   raw unix-socket ping-pong with a forked echo peer, with the\n"
              "               sizes of a Decrypt round trip measured on --socket (the floor)\n"
              "  --pid PID    sample VmRSS and CPU of the daemon\n", f);
}

static int parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *ret) {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(s, &end, 10);
        if (errno || end == s || *end || v < min || v > max || s[0] == '-')
                return -EINVAL;
        *ret = v;
        return 0;
}

int main(int argc, char **argv) {
        static const struct option longopts[] = {
                { "socket", required_argument, NULL, 's' },
                { "method", required_argument, NULL, 'm' },
                { "requests", required_argument, NULL, 'n' },
                { "duration", required_argument, NULL, 'd' },
                { "inflight", required_argument, NULL, 'i' },
                { "connections", required_argument, NULL, 'c' },
                { "warmup", required_argument, NULL, 'w' },
                { "pid", required_argument, NULL, 'p' },
                { "pingpong", no_argument, NULL, 'P' },
                { "req-bytes", required_argument, NULL, 'q' },
                { "resp-bytes", required_argument, NULL, 'r' },
                { "label", required_argument, NULL, 'l' },
                { "help", no_argument, NULL, 'h' },
                {}
        };
        struct opts o = {
                .method = M_DECRYPT, .inflight = 1, .connections = 1,
                .warmup = 1000, .duration = 0,
        };
        bool warmup_set = false;
        uint64_t v;
        int ch;
        while ((ch = getopt_long(argc, argv, "s:m:n:d:i:c:w:p:Pq:r:l:h", longopts, NULL)) != -1) {
                int r = 0;
                switch (ch) {
                case 's': o.socket = optarg; break;
                case 'm':
                        if (strcmp(optarg, "status") == 0)
                                o.method = M_STATUS;
                        else if (strcmp(optarg, "encrypt") == 0)
                                o.method = M_ENCRYPT;
                        else if (strcmp(optarg, "decrypt") == 0)
                                o.method = M_DECRYPT;
                        else
                                r = -EINVAL;
                        break;
                case 'n': r = parse_u64(optarg, 1, UINT64_C(1) << 40, &o.requests); break;
                case 'd': {
                        char *end;
                        o.duration = strtod(optarg, &end);
                        if (*end || !(o.duration > 0))
                                r = -EINVAL;
                        break;
                }
                case 'i': r = parse_u64(optarg, 1, 4096, &v); o.inflight = (unsigned) v; break;
                case 'c': r = parse_u64(optarg, 1, 256, &v); o.connections = (unsigned) v; break;
                case 'w': r = parse_u64(optarg, 0, UINT64_C(1) << 32, &o.warmup); warmup_set = true; break;
                case 'p': r = parse_u64(optarg, 1, INT32_MAX, &v); o.pid = (pid_t) v; break;
                case 'P': o.method = M_PINGPONG; break;
                case 'q': r = parse_u64(optarg, 1, 1 << 20, &v); o.req_bytes = v; break;
                case 'r': r = parse_u64(optarg, 1, 1 << 20, &v); o.resp_bytes = v; break;
                case 'l': o.label = optarg; break;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return 2;
                }
                if (r < 0) {
                        fprintf(stderr, "kmsbench: bad option value: %s\n", optarg);
                        usage(stderr);
                        return 2;
                }
        }
        if (optind != argc || (o.method != M_PINGPONG && !o.socket) ||
            (o.method == M_PINGPONG && !o.socket && (!o.req_bytes || !o.resp_bytes))) {
                usage(stderr);
                return 2;
        }
        if (o.requests == 0 && o.duration == 0)
                o.duration = 5;
        if (o.connections > o.inflight)
                o.connections = o.inflight;
        if (!warmup_set && o.requests && o.requests < 10 * o.warmup)
                o.warmup = o.requests / 10;
        signal(SIGPIPE, SIG_IGN);

        _cleanup_(bench_free) struct bench b = { .o = &o, .method = o.method, .epfd = -1 };
        int r;
        if (getrandom(b.plaintext, PLAINTEXT_SIZE, 0) != PLAINTEXT_SIZE) {
                perror("kmsbench: getrandom");
                return 1;
        }
        switch (o.method) {
        case M_STATUS:
                r = body_status(&b);
                break;
        case M_ENCRYPT:
                r = body_encrypt(&b);
                break;
        case M_DECRYPT:
                r = setup_encrypt(&o, &b);
                if (r < 0)
                        fprintf(stderr, "kmsbench: setup Encrypt failed: %s\n", strerror(-r));
                else
                        r = body_decrypt(&b);
                break;
        case M_PINGPONG:
                b.req_bytes = o.req_bytes;
                b.resp_bytes = o.resp_bytes;
                r = 0;
                if (!b.req_bytes || !b.resp_bytes) {
                        r = calibrate(&o, &b.req_bytes, &b.resp_bytes);
                        if (r < 0)
                                fprintf(stderr, "kmsbench: calibrating on %s: %s\n",
                                        o.socket, strerror(-r));
                }
                if (r >= 0) {
                        b.pp_req = calloc(1, b.req_bytes);
                        if (!b.pp_req)
                                r = -ENOMEM;
                }
                break;
        default:
                r = -EINVAL;
        }
        if (r < 0)
                return 1;

        struct result res = {};
        r = bench_run(&b, &res);
        if (r < 0) {
                fprintf(stderr, "kmsbench: %s failed after %" PRIu64 " requests: %s\n",
                        method_name[o.method], b.completed, strerror(-r));
                return 1;
        }
        print_result(&o, &res);
        if (res.errors > 0) {
                fprintf(stderr, "kmsbench: %" PRIu64 " errors\n", res.errors);
                return 1;
        }
        return 0;
}
