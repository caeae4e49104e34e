/* HTTP/2 transport of the KMS v2 plugin: prior-knowledge h2c on unix sockets,
 * nghttp2 in sans-I/O mode (feed bytes read from the socket with
 * nghttp2_session_mem_recv, drain frames with nghttp2_session_mem_send into a
 * bounded per-connection buffer), driven by sd-event.
 *
 * HTTP/2 itself is RFC 9113; what the headers of a gRPC call mean and say is
 * call.c's, everything about messages is behind service.h.
 *
 * Bounds: each connection is woken level-triggered and does at most one read()
 * of READ_CHUNK bytes and one write() per wakeup, so a busy or hostile peer
 * cannot starve the others; a connection whose output is backed up (peer not
 * reading) is not read from; request bodies are bounded per stream by
 * max_message_size and per connection by the HTTP/2 connection window, which
 * is only replenished once a body has been handed to the service. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>
#include <systemd/sd-event.h>

#include "macro.h"
#include "util.h"
#include "call.h"
#include "plugin.h"
#include "service.h"

#define DEFAULT_MAX_CONNECTIONS 64u
#define DEFAULT_MAX_STREAMS 100u
#define DEFAULT_MAX_MESSAGE KMS_REQUEST_MAX
#define DEFAULT_MAX_HEADER_LIST (16u * 1024u)
#define DEFAULT_IDLE_USEC (5ull * 60ull * 1000000ull)
#define DEFAULT_STREAM_USEC (10ull * 1000000ull)
#define DEFAULT_HANDSHAKE_USEC (5ull * 1000000ull)

#define READ_CHUNK (64u * 1024u)                  /* one read() per wakeup */
#define OUT_HIGH (64u * 1024u)                    /* stop reading above this */
#define ACCEPT_BATCH 32                           /* accept()s per wakeup */
#define ACCEPT_RETRY_USEC (100ull * 1000ull)      /* after EMFILE and friends */
#define TIMER_ACCURACY_USEC (10ull * 1000ull)
/* Slack on the stream window so that a message one byte too long is seen as
 * too long (RESOURCE_EXHAUSTED) instead of stalling on flow control, and so
 * that DATA padding (counted against the window, RFC 9113 §6.1) fits. */
#define WINDOW_SLACK 512u
#define H2_FRAME_HEADER_SIZE 9                    /* RFC 9113 §4.1 */

struct kms_server;
struct conn;

struct stream {
        struct conn *conn;
        struct stream *prev, *next;
        int32_t id;

        uint64_t start;                   /* CLOCK_MONOTONIC, HEADERS began */
        uint64_t deadline;                /* stream timeout or grpc-timeout */
        size_t header_bytes;              /* RFC 9113 §6.5.2 accounting */

        struct grpc_call call;            /* what its request headers said */
        uint8_t *body;
        size_t body_len, body_cap;
        size_t unconsumed;                /* body bytes not yet given back to
                                             the connection window */

        bool headers_done:1;
        bool request_done:1;              /* END_STREAM received */
        bool responded:1;                 /* response queued */
        bool parked:1;                    /* backend deferred it: waiting for
                                             kms_server_retry_parked() with a
                                             done >= park_token */
        bool rst_after_send:1;            /* answered early: RST_STREAM(NO_ERROR)
                                             once the response is out */
        bool cancelled:1;
        bool headers_too_big:1;
        uint64_t park_token;              /* when parked: the event it waits for */

        struct grpc_reply reply;
        size_t reply_off;
};

struct conn {
        struct kms_server *server;
        struct conn *prev, *next;
        int fd;
        struct peer_cred peer;
        sd_event_source *io;
        sd_event_source *timer;
        uint32_t io_events;
        uint64_t timer_at;                /* armed time; UINT64_MAX when off */
        nghttp2_session *h2;

        bool handshake_done;              /* client preface + SETTINGS seen */
        bool closing;                     /* GOAWAY queued by terminate_session:
                                             only getting it out is left */
        uint64_t close_deadline;          /* when closing: give up then */
        uint64_t handshake_deadline;
        uint64_t last_activity;           /* last read with data */
        uint64_t out_blocked_at;          /* pending output since; 0: none */

        uint8_t *out;                     /* [out_off, out_len) not yet written */
        size_t out_off, out_len, out_cap;

        struct stream *streams;
        unsigned n_streams;
};

struct listener {
        struct kms_server *server;
        int fd;
        sd_event_source *io;
        sd_event_source *retry;
};

struct kms_server {
        sd_event *event;
        const struct kms_backend_ops *ops;
        void *userdata;

        uid_t *allowed_uids;
        size_t n_allowed_uids;
        uint32_t max_connections;
        uint32_t max_streams;
        uint32_t max_message;
        uint32_t max_header_list;
        uint64_t idle_usec;
        uint64_t stream_usec;
        uint64_t handshake_usec;
        uint32_t stream_window;
        uint32_t conn_window;

        nghttp2_session_callbacks *callbacks;
        nghttp2_option *h2_option;

        struct listener **listeners;
        size_t n_listeners;
        struct conn *conns;
        unsigned n_conns;

        bool shutting_down;
        bool done_fired;
        void (*done)(void *userdata);
        void *done_userdata;
        sd_event_source *shutdown_timer;
        sd_event_source *done_defer;

        kms_server_log_fn log;
        void *log_userdata;
        kms_server_call_fn call_observer;
        void *call_userdata;
        struct kms_server_stats stats;

        uint8_t rbuf[READ_CHUNK];         /* shared: one connection runs at a time */
};

static void conn_free(struct conn *c);

static void server_log(struct kms_server *s, int level, const struct peer_cred *peer,
                       const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void server_log(struct kms_server *s, int level, const struct peer_cred *peer,
                       const char *fmt, ...) {
        char msg[256];
        va_list ap;

        if (!s->log)
                return;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        s->log(s->log_userdata, level, peer, msg);
}

static uint64_t server_now(struct kms_server *s) {
        uint64_t now;

        /* The loop's cached timestamp: no syscall on the request path. */
        if (sd_event_now(s->event, CLOCK_MONOTONIC, &now) < 0)
                now = now_usec(CLOCK_MONOTONIC);
        return now;
}

static uint64_t add_usec(uint64_t a, uint64_t b) {
        return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

static uint64_t min_u64(uint64_t a, uint64_t b) {
        return a < b ? a : b;
}

/* ---- connection timer ----
 * One timer per connection, armed lazily: conn->timer_at is never later than
 * the earliest deadline that matters (handshake, idle, stalled output, each
 * open stream). A new deadline only moves the timer if it is earlier; a
 * deadline that went away (a stream finished) is simply found stale when the
 * timer fires, which then recomputes. So the request path costs a compare,
 * not a timerfd update. */

static void conn_timer_require(struct conn *c, uint64_t t) {
        if (t >= c->timer_at)
                return;
        c->timer_at = t;
        (void) sd_event_source_set_time(c->timer, t);
        (void) sd_event_source_set_enabled(c->timer, SD_EVENT_ONESHOT);
}

static void conn_timer_rearm(struct conn *c) {
        struct kms_server *s = c->server;
        uint64_t next = UINT64_MAX;

        if (c->closing) {
                /* Idle and stream deadlines are past and no longer matter:
                 * re-arming for them would fire the timer in a loop while a
                 * peer that does not read keeps the GOAWAY from going out. */
                next = c->close_deadline;
                if (c->out_blocked_at)
                        next = min_u64(next, add_usec(c->out_blocked_at, s->stream_usec));
                c->timer_at = UINT64_MAX;
                conn_timer_require(c, next);
                return;
        }
        if (!c->handshake_done)
                next = c->handshake_deadline;
        if (c->out_blocked_at)
                next = min_u64(next, add_usec(c->out_blocked_at, s->stream_usec));
        if (c->n_streams == 0)
                next = min_u64(next, add_usec(c->last_activity, s->idle_usec));
        for (struct stream *st = c->streams; st; st = st->next)
                if (!st->cancelled)
                        next = min_u64(next, st->deadline);

        c->timer_at = UINT64_MAX;
        if (next != UINT64_MAX)
                conn_timer_require(c, next);
        else
                (void) sd_event_source_set_enabled(c->timer, SD_EVENT_OFF);
}

/* ---- output ---- */

/* Room for n more bytes at c->out + c->out_len. c->out holds Decrypt answers
 * (DEK seeds): no copy is left behind, neither by moving the pending bytes
 * down nor by growing (no realloc, which would free the old block unwiped). */
static int out_reserve(struct conn *c, size_t n) {
        size_t pending = c->out_len - c->out_off;

        if (c->out_off > 0) {
                if (pending > 0)
                        memmove(c->out, c->out + c->out_off, pending);
                /* the old [out_off, out_len) now starts at 0; what lies
                 * beyond pending is a stale copy (or already wiped) */
                explicit_bzero(c->out + pending, c->out_off);
        }
        c->out_off = 0;
        c->out_len = pending;
        if (c->out_cap - c->out_len >= n)
                return 0;

        /* Grows to at most OUT_HIGH plus one frame: we stop draining nghttp2
         * at OUT_HIGH, nghttp2 hands out at most one frame per call, and
         * reply_send() pauses it at OUT_HIGH. */
        size_t cap = c->out_cap ? c->out_cap : 16384;
        while (cap - c->out_len < n)
                cap *= 2;
        uint8_t *p = malloc(cap);
        if (!p)
                return -ENOMEM;
        if (c->out_len > 0)
                memcpy(p, c->out, c->out_len);
        erase_and_free(c->out, c->out_cap);
        c->out = p;
        c->out_cap = cap;
        return 0;
}

static bool conn_want_read(struct conn *c) {
        /* Backpressure: do not take new requests while the peer is not taking
         * our answers. */
        return c->out_len - c->out_off < OUT_HIGH && nghttp2_session_want_read(c->h2);
}

static int conn_update_events(struct conn *c) {
        uint32_t ev = 0;

        if (conn_want_read(c))
                ev |= EPOLLIN;
        if (c->out_len > c->out_off)
                ev |= EPOLLOUT;
        if (ev == c->io_events)
                return 0;
        c->io_events = ev;
        return sd_event_source_set_io_events(c->io, ev);
}

/* Drain nghttp2 into the output buffer (up to OUT_HIGH) and write it with a
 * single send(). Returns 0, or a negative errno: the connection is dead. */
static int conn_flush(struct conn *c) {
        struct kms_server *s = c->server;

        while (c->out_len - c->out_off < OUT_HIGH) {
                const uint8_t *data;
                ssize_t n = nghttp2_session_mem_send(c->h2, &data);
                if (n < 0) {
                        server_log(s, LOG_DEBUG, &c->peer, "HTTP/2 send failed: %s",
                                   nghttp2_strerror((int) n));
                        return -EPROTO;
                }
                if (n == 0)
                        break;
                if (out_reserve(c, (size_t) n) < 0)
                        return -ENOMEM;
                memcpy(c->out + c->out_len, data, (size_t) n);
                c->out_len += (size_t) n;
        }

        size_t pending = c->out_len - c->out_off;
        if (pending > 0) {
                ssize_t w = send(c->fd, c->out + c->out_off, pending, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (w < 0) {
                        if (errno != EAGAIN && errno != EINTR)
                                return -errno;
                        w = 0;
                }
                /* Decrypt answers carry DEK seeds: do not leave them behind. */
                explicit_bzero(c->out + c->out_off, (size_t) w);
                c->out_off += (size_t) w;
                if (c->out_off == c->out_len) {
                        c->out_off = c->out_len = 0;
                        c->out_blocked_at = 0;
                } else if (!c->out_blocked_at) {
                        c->out_blocked_at = server_now(s);
                        conn_timer_require(c, add_usec(c->out_blocked_at, s->stream_usec));
                }
        }

        return conn_update_events(c);
}

static bool conn_finished(struct conn *c) {
        return c->out_len == c->out_off && !nghttp2_session_want_read(c->h2) &&
               !nghttp2_session_want_write(c->h2);
}

/* ---- streams ---- */

static void nv_from_fields(nghttp2_nv *nva, const struct grpc_field *f, size_t n, uint8_t flags) {
        for (size_t i = 0; i < n; i++)
                nva[i] = (nghttp2_nv) { (uint8_t *) f[i].name, (uint8_t *) f[i].value,
                                        strlen(f[i].name), strlen(f[i].value), flags };
}

static void stream_give_back(struct stream *st) {
        /* Return the body's bytes to the connection window (we run with
         * no_auto_window_update, so unprocessed bodies hold the window). */
        if (st->unconsumed > 0) {
                (void) nghttp2_session_consume_connection(st->conn->h2, st->unconsumed);
                st->unconsumed = 0;
        }
}

static void stream_drop_body(struct stream *st) {
        erase_and_free(st->body, st->body_cap);
        st->body = NULL;
        st->body_len = st->body_cap = 0;
}

static void stream_free(struct stream *st) {
        struct conn *c = st->conn;

        if (st->prev)
                st->prev->next = st->next;
        else
                c->streams = st->next;
        if (st->next)
                st->next->prev = st->prev;
        c->n_streams--;

        stream_drop_body(st);
        grpc_reply_done(&st->reply);
        grpc_call_done(&st->call);
        free(st);
}

static void stream_observe(struct stream *st, enum grpc_code code) {
        struct kms_server *s = st->conn->server;

        if (s->call_observer) {
                uint64_t now = now_usec(CLOCK_MONOTONIC);
                s->call_observer(s->call_userdata, st->call.path ? kms_method_from_path(st->call.path) : -1,
                                 (int) code, now > st->start ? now - st->start : 0);
        }
}

static void stream_responded(struct stream *st) {
        struct kms_server *s = st->conn->server;

        st->responded = true;
        /* From now on the deadline is the grace to deliver the answer. */
        st->deadline = add_usec(server_now(s), s->stream_usec);
        stream_give_back(st);
        stream_drop_body(st);
}

/* The response body goes out with NGHTTP2_DATA_FLAG_NO_COPY: nghttp2 would
 * copy it into its own frame buffer, which it reuses and frees without
 * wiping, and a Decrypt's body is the DEK seed. reply_read() only sizes the
 * frame; reply_send() writes it into c->out, which we wipe. */
static ssize_t reply_read(nghttp2_session *h2, int32_t stream_id, uint8_t *buf, size_t length,
                          uint32_t *data_flags, nghttp2_data_source *source, void *user_data) {
        struct stream *st = source->ptr;
        nghttp2_nv trailers[ARRAY_SIZE(grpc_trailers_ok)];
        size_t left = st->reply.body_len - st->reply_off;
        size_t n = left < length ? left : length;

        *data_flags |= NGHTTP2_DATA_FLAG_NO_COPY;
        if (n == left) {
                /* PROTOCOL-HTTP2.md: Response -> Headers *Message Trailers;
                 * the trailers carry END_STREAM, not the last DATA frame. */
                *data_flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
                nv_from_fields(trailers, grpc_trailers_ok, ARRAY_SIZE(trailers),
                               NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE);
                if (nghttp2_submit_trailer(h2, stream_id, trailers, ARRAY_SIZE(trailers)) < 0)
                        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        }
        return (ssize_t) n;
}

/* nghttp2_send_data_callback: the DATA frame reply_read() sized, whole, into
 * c->out (frame header, pad length, payload, padding; we ask for no padding).
 * nghttp2 calls it right after reply_read(), from nghttp2_session_mem_send(). */
static int reply_send(nghttp2_session *h2, nghttp2_frame *frame, const uint8_t *framehd,
                      size_t length, nghttp2_data_source *source, void *user_data) {
        struct conn *c = user_data;
        struct stream *st = source->ptr;
        size_t padlen = frame->data.padlen;

        if (!st->reply.body || length > st->reply.body_len - st->reply_off)
                return NGHTTP2_ERR_CALLBACK_FAILURE;
        if (out_reserve(c, H2_FRAME_HEADER_SIZE + padlen + length) < 0)
                return NGHTTP2_ERR_CALLBACK_FAILURE;

        memcpy(c->out + c->out_len, framehd, H2_FRAME_HEADER_SIZE);
        c->out_len += H2_FRAME_HEADER_SIZE;
        if (padlen > 0)
                c->out[c->out_len++] = (uint8_t) (padlen - 1);
        memcpy(c->out + c->out_len, st->reply.body + st->reply_off, length);
        c->out_len += length;
        if (padlen > 1) {
                memset(c->out + c->out_len, 0, padlen - 1);
                c->out_len += padlen - 1;
        }

        st->reply_off += length;
        if (st->reply_off == st->reply.body_len) {
                grpc_reply_done(&st->reply);   /* wipes a Decrypt's plaintext */
                st->reply_off = 0;
        }
        /* nghttp2_session_mem_send() goes on to the next frame after this
         * one: stop it where conn_flush() would stop draining. */
        return c->out_len - c->out_off >= OUT_HIGH ? NGHTTP2_ERR_PAUSE : 0;
}

/* Queue h: a Trailers-Only answer ends the stream, any other is followed by
 * the reply's message and the trailers (reply_read()). If the client is still
 * sending, the stream is reset with NO_ERROR once the answer is out (RFC 9113
 * §8.1). */
static void stream_respond(struct stream *st, const struct grpc_head *h) {
        struct conn *c = st->conn;
        nghttp2_nv nva[GRPC_HEAD_FIELDS_MAX];
        nghttp2_data_provider prd = {
                .source.ptr = st,
                .read_callback = reply_read,
        };

        /* the values live in h, on our caller's stack: nghttp2 copies them */
        nv_from_fields(nva, h->fields, h->n_fields, NGHTTP2_NV_FLAG_NO_COPY_NAME);
        if (h->trailers_only)
                grpc_reply_done(&st->reply);
        if (nghttp2_submit_response(c->h2, st->id, nva, h->n_fields,
                                    h->trailers_only ? NULL : &prd) < 0) {
                grpc_reply_done(&st->reply);
                (void) nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, st->id,
                                                 NGHTTP2_INTERNAL_ERROR);
        } else if (!st->request_done)
                st->rst_after_send = true;
        stream_responded(st);
        stream_observe(st, h->code);
}

/* Answer with a failure r of the call (GRPC_ORIGIN_CALL, grpc.c's table). */
static void stream_fail(struct stream *st, int r, const char *message) {
        struct grpc_head h;

        grpc_head_from_errno(&h, &st->call, r, message);
        stream_respond(st, &h);
}

static void stream_respond_reply(struct stream *st) {
        struct grpc_head h;

        grpc_head_from_reply(&h, &st->call, &st->reply);
        stream_respond(st, &h);
}

/* Request headers are complete: decide whether the call can proceed. */
static void stream_headers_done(struct stream *st) {
        int r;

        st->headers_done = true;
        /* the header list is HTTP/2's to bound (on_header()), the rest the call's */
        r = st->headers_too_big ? -E2BIG : grpc_call_check(&st->call);
        if (r < 0)
                return stream_fail(st, r, NULL);
        if (st->call.has_timeout) {
                uint64_t d = add_usec(st->start, st->call.timeout_usec);
                if (d < st->deadline) {
                        st->deadline = d;
                        conn_timer_require(st->conn, d);
                }
        }
}

/* END_STREAM seen: the body is complete; answer the call. */
static void stream_request_done(struct stream *st) {
        struct conn *c = st->conn;
        struct kms_server *s = c->server;

        st->request_done = true;
        if (st->responded || !st->headers_done)
                return;

        if (server_now(s) >= st->deadline)
                return stream_fail(st, -ETIMEDOUT, NULL);

        kms_service_call(s->ops, s->userdata, st->call.path, st->body, st->body_len, &c->peer,
                         true, &st->reply);
        if (st->reply.deferred) {
                /* kept with its body until kms_server_retry_parked() reports
                 * its event or its deadline (the connection timer answers
                 * DEADLINE_EXCEEDED) */
                st->parked = true;
                st->park_token = st->reply.park_token;
                return;
        }
        stream_respond_reply(st);
}

/* ---- nghttp2 callbacks (never free the connection from here) ---- */

static int on_begin_headers(nghttp2_session *h2, const nghttp2_frame *frame, void *user_data) {
        struct conn *c = user_data;
        struct kms_server *s = c->server;
        struct stream *st;

        if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
                return 0;

        st = calloc(1, sizeof(*st));
        if (!st)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;   /* RST_STREAM */
        st->conn = c;
        st->id = frame->hd.stream_id;
        st->start = server_now(s);
        st->deadline = add_usec(st->start, s->stream_usec);
        if (nghttp2_session_set_stream_user_data(h2, st->id, st) < 0) {
                free(st);
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        }
        st->next = c->streams;
        if (c->streams)
                c->streams->prev = st;
        c->streams = st;
        c->n_streams++;
        s->stats.streams++;
        conn_timer_require(c, st->deadline);
        return 0;
}

static int on_header(nghttp2_session *h2, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user_data) {
        struct conn *c = user_data;
        struct stream *st = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);

        if (!st || st->responded)
                return 0;

        /* SETTINGS_MAX_HEADER_LIST_SIZE is advisory (RFC 9113 §6.5.2) and
         * nghttp2 does not enforce it on received headers: count here and stop
         * storing once over. */
        st->header_bytes += namelen + valuelen + 32;
        if (st->header_bytes > c->server->max_header_list) {
                st->headers_too_big = true;
                return 0;
        }
        if (frame->headers.cat != NGHTTP2_HCAT_REQUEST)
                return 0;   /* request trailers: nothing in them for us */

        if (grpc_call_header(&st->call, name, namelen, value, valuelen) < 0)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        return 0;
}

static int on_data_chunk_recv(nghttp2_session *h2, uint8_t flags, int32_t stream_id,
                              const uint8_t *data, size_t len, void *user_data) {
        struct conn *c = user_data;
        struct stream *st = nghttp2_session_get_stream_user_data(h2, stream_id);
        size_t max = (size_t) c->server->max_message + GRPC_FRAME_HEADER_SIZE;

        if (!st || st->responded || !st->headers_done) {
                (void) nghttp2_session_consume_connection(h2, len);
                return 0;
        }

        st->unconsumed += len;
        if (len > max - st->body_len) {
                char msg[64];

                snprintf(msg, sizeof(msg), "request message larger than %u bytes",
                         c->server->max_message);
                stream_fail(st, -EMSGSIZE, msg);
                return 0;
        }
        if (st->body_len + len > st->body_cap) {
                /* Grow without realloc so that no copy of a DEK seed is left
                 * behind unwiped. */
                size_t cap = st->body_cap ? st->body_cap : 512;
                while (cap < st->body_len + len)
                        cap *= 2;
                if (cap > max)
                        cap = max;
                uint8_t *b = malloc(cap);
                if (!b)
                        return NGHTTP2_ERR_CALLBACK_FAILURE;
                if (st->body_len)
                        memcpy(b, st->body, st->body_len);
                erase_and_free(st->body, st->body_cap);
                st->body = b;
                st->body_cap = cap;
        }
        memcpy(st->body + st->body_len, data, len);
        st->body_len += len;
        return 0;
}

static int on_frame_recv(nghttp2_session *h2, const nghttp2_frame *frame, void *user_data) {
        struct conn *c = user_data;
        struct stream *st;

        switch (frame->hd.type) {
        case NGHTTP2_SETTINGS:
                /* RFC 9113 §3.4: the client preface is the magic followed by
                 * a SETTINGS frame; nghttp2 checked the magic. */
                if (!(frame->hd.flags & NGHTTP2_FLAG_ACK))
                        c->handshake_done = true;
                break;
        case NGHTTP2_HEADERS:
                st = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);
                if (!st)
                        break;
                if (frame->headers.cat == NGHTTP2_HCAT_REQUEST)
                        stream_headers_done(st);
                if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
                        stream_request_done(st);
                break;
        case NGHTTP2_DATA:
                if (!(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
                        break;
                st = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);
                if (st)
                        stream_request_done(st);
                break;
        default:
                break;
        }
        return 0;
}

static int on_frame_send(nghttp2_session *h2, const nghttp2_frame *frame, void *user_data) {
        struct conn *c = user_data;
        struct stream *st;

        if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR) {
                /* nghttp2 found a connection error (RFC 9113 §5.4.1) */
                c->server->stats.protocol_errors++;
                server_log(c->server, LOG_DEBUG, &c->peer, "HTTP/2 connection error %s",
                           nghttp2_http2_strerror(frame->goaway.error_code));
                return 0;
        }
        if ((frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) ||
            !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
                return 0;
        st = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);
        if (st && st->rst_after_send && !nghttp2_session_get_stream_remote_close(h2, st->id)) {
                /* RFC 9113 §8.1: after a complete response the server MAY ask
                 * the client to stop sending with RST_STREAM(NO_ERROR). Queued
                 * here, not with the response, as nghttp2 would drop HEADERS
                 * for a stream that is already being reset. */
                st->rst_after_send = false;
                (void) nghttp2_submit_rst_stream(h2, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_NO_ERROR);
        }
        return 0;
}

static int on_stream_close(nghttp2_session *h2, int32_t stream_id, uint32_t error_code,
                           void *user_data) {
        struct conn *c = user_data;
        struct stream *st = nghttp2_session_get_stream_user_data(h2, stream_id);

        if (!st)
                return 0;
        stream_give_back(st);
        stream_free(st);
        if (c->n_streams == 0)
                conn_timer_require(c, add_usec(c->last_activity, c->server->idle_usec));
        return 0;
}

/* ---- connections ---- */

/* GOAWAY and close once it is out (nghttp2_session_terminate_session). From
 * here on only the GOAWAY matters: if the peer does not read, the stalled
 * output rule (or close_deadline) ends the connection. */
static void conn_terminate(struct conn *c, uint32_t error_code) {
        struct kms_server *s = c->server;

        (void) nghttp2_session_terminate_session(c->h2, error_code);
        if (!c->closing) {
                c->closing = true;
                c->close_deadline = add_usec(server_now(s), s->stream_usec);
        }
}

static void conn_free(struct conn *c) {
        struct kms_server *s;

        if (!c)
                return;
        s = c->server;

        while (c->streams) {
                struct stream *st = c->streams;
                /* the session goes away with it: no window to give back */
                st->unconsumed = 0;
                stream_free(st);
        }
        nghttp2_session_del(c->h2);
        sd_event_source_disable_unref(c->io);
        sd_event_source_disable_unref(c->timer);
        if (c->fd >= 0)
                close(c->fd);
        erase_and_free(c->out, c->out_cap);

        if (c->prev)
                c->prev->next = c->next;
        else
                s->conns = c->next;
        if (c->next)
                c->next->prev = c->prev;
        s->n_conns--;
        free(c);

        if (s->shutting_down && s->n_conns == 0 && s->done_defer && !s->done_fired)
                (void) sd_event_source_set_enabled(s->done_defer, SD_EVENT_ONESHOT);
}

/* After any work on c: push output, then close c if it is done or broken.
 * Returns true if c was freed. */
static bool conn_settle(struct conn *c, int r) {
        if (r >= 0)
                r = conn_flush(c);
        if (r < 0 || conn_finished(c)) {
                conn_free(c);
                return true;
        }
        return false;
}

static int conn_read(struct conn *c) {
        struct kms_server *s = c->server;
        ssize_t n, rv;

        n = read(c->fd, s->rbuf, sizeof(s->rbuf));
        if (n < 0)
                return errno == EAGAIN || errno == EINTR ? 0 : -errno;
        if (n == 0)
                return -ECONNRESET;   /* gRPC clients never half-close */

        c->last_activity = server_now(s);
        rv = nghttp2_session_mem_recv(c->h2, s->rbuf, (size_t) n);
        /* Encrypt requests carry DEK seeds. */
        explicit_bzero(s->rbuf, (size_t) n);
        if (rv < 0) {
                /* Bad client magic (HTTP/1.1, garbage: RFC 9113 §3.4), flood
                 * detection, or an allocation failure. */
                s->stats.protocol_errors++;
                server_log(s, LOG_DEBUG, &c->peer, "HTTP/2: %s", nghttp2_strerror((int) rv));
                return -EPROTO;
        }
        return 0;
}

static int conn_io(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        struct conn *c = userdata;
        int r = 0;

        if (revents & (EPOLLERR | EPOLLHUP)) {
                conn_free(c);
                return 0;
        }
        if ((revents & EPOLLIN) && conn_want_read(c))
                r = conn_read(c);
        (void) conn_settle(c, r);
        return 0;
}

static int conn_timer(sd_event_source *src, uint64_t usec, void *userdata) {
        struct conn *c = userdata;
        struct kms_server *s = c->server;
        uint64_t now = server_now(s);

        c->timer_at = UINT64_MAX;

        if (!c->handshake_done && now >= c->handshake_deadline) {
                s->stats.timeouts++;
                server_log(s, LOG_DEBUG, &c->peer, "HTTP/2 handshake timed out");
                conn_free(c);
                return 0;
        }
        if (c->out_blocked_at && now >= add_usec(c->out_blocked_at, s->stream_usec)) {
                if (!c->closing)
                        s->stats.timeouts++;   /* else counted as why it is closing */
                server_log(s, LOG_DEBUG, &c->peer, "peer stopped reading, closing");
                conn_free(c);
                return 0;
        }
        if (c->closing) {
                if (now >= c->close_deadline) {
                        server_log(s, LOG_DEBUG, &c->peer, "GOAWAY not delivered in time, closing");
                        conn_free(c);
                } else
                        conn_timer_rearm(c);
                return 0;
        }

        for (struct stream *st = c->streams; st; st = st->next) {
                if (st->cancelled || now < st->deadline)
                        continue;
                s->stats.timeouts++;
                if (!st->headers_done) {
                        /* Stuck inside a header block: RFC 9113 §6.10 allows
                         * no other frame on the connection until it ends. */
                        server_log(s, LOG_DEBUG, &c->peer, "header block timed out");
                        conn_terminate(c, NGHTTP2_PROTOCOL_ERROR);
                        break;
                }
                if (!st->responded) {
                        stream_fail(st, -ETIMEDOUT, NULL);
                        continue;
                }
                /* answered, but the answer is not getting out */
                st->cancelled = true;
                (void) nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_CANCEL);
        }

        if (c->n_streams == 0 && now >= add_usec(c->last_activity, s->idle_usec)) {
                /* RFC 9113 §9.1: close idle connections after a GOAWAY */
                s->stats.timeouts++;
                server_log(s, LOG_DEBUG, &c->peer, "idle, closing");
                conn_terminate(c, NGHTTP2_NO_ERROR);
        }

        if (conn_settle(c, 0))
                return 0;
        conn_timer_rearm(c);
        return 0;
}

static int conn_new(struct kms_server *s, int fd, const struct peer_cred *peer) {
        _cleanup_close_ int fd_owned = fd;
        struct conn *c;
        uint64_t now = server_now(s);
        int r;

        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->server = s;
        c->fd = TAKE_FD(fd_owned);
        c->peer = *peer;
        c->timer_at = UINT64_MAX;
        c->last_activity = now;
        c->handshake_deadline = add_usec(now, s->handshake_usec);

        c->next = s->conns;
        if (s->conns)
                s->conns->prev = c;
        s->conns = c;
        s->n_conns++;

        if (nghttp2_session_server_new2(&c->h2, s->callbacks, c, s->h2_option) < 0) {
                c->h2 = NULL;
                conn_free(c);
                return -ENOMEM;
        }

        /* RFC 9113 §3.4: the server preface is a SETTINGS frame, sent first. */
        nghttp2_settings_entry settings[] = {
                { NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, s->max_streams },
                { NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, s->max_header_list },
                { NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, s->stream_window },
        };
        if (nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, settings, ARRAY_SIZE(settings)) < 0 ||
            nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0,
                                                  (int32_t) s->conn_window) < 0) {
                conn_free(c);
                return -ENOMEM;
        }

        r = sd_event_add_io(s->event, &c->io, c->fd, EPOLLIN, conn_io, c);
        if (r < 0) {
                conn_free(c);
                return r;
        }
        c->io_events = EPOLLIN;
        r = sd_event_add_time(s->event, &c->timer, CLOCK_MONOTONIC, c->handshake_deadline,
                              TIMER_ACCURACY_USEC, conn_timer, c);
        if (r < 0) {
                conn_free(c);
                return r;
        }
        c->timer_at = c->handshake_deadline;

        s->stats.connections_accepted++;
        (void) conn_settle(c, 0);
        return 0;
}

static bool peer_allowed(struct kms_server *s, const struct peer_cred *peer) {
        for (size_t i = 0; i < s->n_allowed_uids; i++)
                if (s->allowed_uids[i] == peer->uid)
                        return true;
        return false;
}

static int listener_retry(sd_event_source *src, uint64_t usec, void *userdata) {
        struct listener *l = userdata;

        (void) sd_event_source_set_enabled(l->io, SD_EVENT_ON);
        return 0;
}

static void listener_pause(struct listener *l) {
        (void) sd_event_source_set_enabled(l->io, SD_EVENT_OFF);
        if (l->retry) {
                (void) sd_event_source_set_time_relative(l->retry, ACCEPT_RETRY_USEC);
                (void) sd_event_source_set_enabled(l->retry, SD_EVENT_ONESHOT);
        } else if (sd_event_add_time_relative(l->server->event, &l->retry, CLOCK_MONOTONIC,
                                              ACCEPT_RETRY_USEC, 0, listener_retry, l) < 0)
                /* cannot pause: better to spin than to stop serving */
                (void) sd_event_source_set_enabled(l->io, SD_EVENT_ON);
}

/* At the connection limit, idle connections (no open stream) must not lock
 * out a newcomer such as a restarted apiserver: the longest-idle one gets a
 * GOAWAY (RFC 9113 §6.8; gRPC clients reconnect on demand) and is closed.
 * Connections with streams in flight are never evicted; stalled ones end at
 * their stream timeout. Returns true if a slot was freed. */
static bool server_evict_idle(struct kms_server *s) {
        struct conn *victim = NULL;

        for (struct conn *c = s->conns; c; c = c->next)
                if (c->n_streams == 0 && (!victim || c->last_activity < victim->last_activity))
                        victim = c;
        if (!victim)
                return false;
        s->stats.connections_evicted++;
        server_log(s, LOG_DEBUG, &victim->peer, "connection limit reached: closing the longest-idle connection");
        conn_terminate(victim, NGHTTP2_NO_ERROR);
        /* Best effort to deliver the GOAWAY; the slot is freed either way. */
        if (!conn_settle(victim, 0))
                conn_free(victim);
        return true;
}

static int listener_io(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        struct listener *l = userdata;
        struct kms_server *s = l->server;

        for (int i = 0; i < ACCEPT_BATCH; i++) {
                struct peer_cred peer;
                int cfd = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

                if (cfd < 0) {
                        if (errno == EINTR || errno == ECONNABORTED)
                                continue;
                        if (errno == EAGAIN)
                                break;
                        /* EMFILE, ENFILE, ENOBUFS, ENOMEM: the listener stays
                         * readable, so pause it instead of spinning. */
                        server_log(s, LOG_WARNING, NULL, "accept: %s", strerror(errno));
                        listener_pause(l);
                        break;
                }

                /* Decide on the peer before reading a single byte from it. */
                int r = unix_socket_peer(cfd, &peer);
                if (r < 0) {
                        server_log(s, LOG_DEBUG, NULL, "SO_PEERCRED: %s", strerror(-r));
                        close(cfd);
                        continue;
                }
                if (!peer_allowed(s, &peer)) {
                        s->stats.connections_refused++;
                        server_log(s, LOG_NOTICE, &peer, "refused peer uid=%u pid=%d",
                                   (unsigned) peer.uid, (int) peer.pid);
                        close(cfd);
                        continue;
                }
                if (s->n_conns >= s->max_connections && !server_evict_idle(s)) {
                        s->stats.connections_over_limit++;
                        server_log(s, LOG_NOTICE, &peer,
                                   "too many connections (%u), refused pid=%d",
                                   s->n_conns, (int) peer.pid);
                        close(cfd);
                        continue;
                }
                r = conn_new(s, cfd, &peer);
                if (r < 0)
                        server_log(s, LOG_DEBUG, &peer, "could not set up connection: %s",
                                   strerror(-r));
        }
        return 0;
}

static void listener_free(struct listener *l) {
        if (!l)
                return;
        sd_event_source_disable_unref(l->io);
        sd_event_source_disable_unref(l->retry);
        if (l->fd >= 0)
                close(l->fd);
        free(l);
}

/* ---- public ---- */

void kms_server_retry_parked(struct kms_server *s, uint64_t done) {
        struct conn *next;

        if (!s)
                return;
        for (struct conn *c = s->conns; c; c = next) {
                bool any = false;

                next = c->next;
                for (struct stream *st = c->streams; st; st = st->next) {
                        if (!st->parked || st->responded || st->park_token > done)
                                continue;
                        st->parked = false;
                        any = true;
                        kms_service_call(s->ops, s->userdata, st->call.path, st->body, st->body_len,
                                         &c->peer, false, &st->reply);
                        stream_respond_reply(st);
                }
                if (any)
                        (void) conn_settle(c, 0);
        }
}

int kms_server_new(sd_event *e, const struct kms_server_options *opt,
                   const struct kms_backend_ops *ops, void *userdata,
                   struct kms_server **ret) {
        static const struct kms_server_options none = {};
        struct kms_server *s;

        if (!e || !ops || !ret)
                return -EINVAL;
        if (!opt)
                opt = &none;
        /* The service refuses larger requests anyway (KMS_REQUEST_MAX); a
         * larger window would only let a peer make us buffer more. */
        if (opt->max_message_size > KMS_REQUEST_MAX ||
            (opt->n_allowed_uids > 0 && !opt->allowed_uids))
                return -EINVAL;

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->event = sd_event_ref(e);
        s->ops = ops;
        s->userdata = userdata;

        if (opt->n_allowed_uids > 0) {
                s->allowed_uids = calloc(opt->n_allowed_uids, sizeof(uid_t));
                if (!s->allowed_uids)
                        goto oom;
                memcpy(s->allowed_uids, opt->allowed_uids, opt->n_allowed_uids * sizeof(uid_t));
                s->n_allowed_uids = opt->n_allowed_uids;
        } else {
                s->allowed_uids = calloc(1, sizeof(uid_t));
                if (!s->allowed_uids)
                        goto oom;
                s->allowed_uids[0] = geteuid();
                s->n_allowed_uids = 1;
        }

        s->max_connections = opt->max_connections ? opt->max_connections : DEFAULT_MAX_CONNECTIONS;
        s->max_streams = opt->max_concurrent_streams ? opt->max_concurrent_streams
                                                     : DEFAULT_MAX_STREAMS;
        s->max_message = opt->max_message_size ? opt->max_message_size : DEFAULT_MAX_MESSAGE;
        s->max_header_list = opt->max_header_list_size ? opt->max_header_list_size
                                                       : DEFAULT_MAX_HEADER_LIST;
        s->idle_usec = opt->idle_timeout_usec ? opt->idle_timeout_usec : DEFAULT_IDLE_USEC;
        s->stream_usec = opt->stream_timeout_usec ? opt->stream_timeout_usec : DEFAULT_STREAM_USEC;
        s->handshake_usec = opt->handshake_timeout_usec ? opt->handshake_timeout_usec
                                                        : DEFAULT_HANDSHAKE_USEC;

        /* A unary call sends one message per stream, so the stream window
         * never needs replenishing: one message (+ slack) bounds each stream.
         * The connection window, given back only as bodies are processed,
         * bounds what one connection can make us buffer. Neither goes below
         * the RFC 9113 §6.9.2 default of 65535, which clients use until they
         * have our SETTINGS. */
        s->stream_window = s->max_message + GRPC_FRAME_HEADER_SIZE + WINDOW_SLACK;
        if (s->stream_window < NGHTTP2_INITIAL_WINDOW_SIZE)
                s->stream_window = NGHTTP2_INITIAL_WINDOW_SIZE;
        s->conn_window = 2 * s->stream_window;

        if (nghttp2_session_callbacks_new(&s->callbacks) < 0)
                goto oom;
        nghttp2_session_callbacks_set_on_begin_headers_callback(s->callbacks, on_begin_headers);
        nghttp2_session_callbacks_set_on_header_callback(s->callbacks, on_header);
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(s->callbacks, on_data_chunk_recv);
        nghttp2_session_callbacks_set_on_frame_recv_callback(s->callbacks, on_frame_recv);
        nghttp2_session_callbacks_set_on_frame_send_callback(s->callbacks, on_frame_send);
        nghttp2_session_callbacks_set_on_stream_close_callback(s->callbacks, on_stream_close);
        nghttp2_session_callbacks_set_send_data_callback(s->callbacks, reply_send);

        if (nghttp2_option_new(&s->h2_option) < 0)
                goto oom;
        nghttp2_option_set_no_auto_window_update(s->h2_option, 1);
        /* closed streams are kept only for RFC 7540 priorities: not needed */
        nghttp2_option_set_no_closed_streams(s->h2_option, 1);

        *ret = s;
        return 0;
oom:
        kms_server_free(s);
        return -ENOMEM;
}

int kms_server_add_listener(struct kms_server *s, int fd) {
        _cleanup_close_ int fd_owned = fd;
        struct listener *l, **a;
        int r;

        if (!s || fd < 0)
                return -EINVAL;
        if (s->shutting_down)
                return -ESHUTDOWN;

        a = realloc(s->listeners, (s->n_listeners + 1) * sizeof(*a));
        if (!a)
                return -ENOMEM;
        s->listeners = a;

        l = calloc(1, sizeof(*l));
        if (!l)
                return -ENOMEM;
        l->server = s;
        l->fd = -1;

        /* systemd may hand over a blocking socket; accept4() must not block */
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
                r = -errno;
                free(l);
                return r;
        }

        r = sd_event_add_io(s->event, &l->io, fd, EPOLLIN, listener_io, l);
        if (r < 0) {
                free(l);
                return r;
        }
        l->fd = TAKE_FD(fd_owned);
        s->listeners[s->n_listeners++] = l;
        return 0;
}

static void server_close_listeners(struct kms_server *s) {
        for (size_t i = 0; i < s->n_listeners; i++)
                listener_free(s->listeners[i]);
        free(s->listeners);
        s->listeners = NULL;
        s->n_listeners = 0;
}

static int shutdown_force(sd_event_source *src, uint64_t usec, void *userdata) {
        struct kms_server *s = userdata;

        while (s->conns)
                conn_free(s->conns);
        return 0;
}

static int shutdown_done(sd_event_source *src, void *userdata) {
        struct kms_server *s = userdata;

        s->done_fired = true;
        (void) sd_event_source_set_enabled(s->shutdown_timer, SD_EVENT_OFF);
        if (s->done)
                s->done(s->done_userdata);   /* may free s */
        return 0;
}

void kms_server_shutdown(struct kms_server *s, void (*done)(void *userdata), void *userdata) {
        struct conn *c, *next;

        if (!s || s->shutting_down)
                return;
        s->shutting_down = true;
        s->done = done;
        s->done_userdata = userdata;

        server_close_listeners(s);

        /* done runs from its own dispatch, never from inside our callers */
        if (sd_event_add_defer(s->event, &s->done_defer, shutdown_done, s) >= 0)
                (void) sd_event_source_set_enabled(s->done_defer, SD_EVENT_OFF);
        (void) sd_event_add_time_relative(s->event, &s->shutdown_timer, CLOCK_MONOTONIC,
                                          s->stream_usec, TIMER_ACCURACY_USEC, shutdown_force, s);

        for (c = s->conns; c; c = next) {
                next = c->next;
                if (!c->handshake_done) {
                        conn_free(c);
                        continue;
                }
                /* RFC 9113 §6.8: GOAWAY with the last stream we will process;
                 * in-flight streams finish, later ones the client retries. */
                (void) nghttp2_submit_goaway(c->h2, NGHTTP2_FLAG_NONE,
                                             nghttp2_session_get_last_proc_stream_id(c->h2),
                                             NGHTTP2_NO_ERROR, NULL, 0);
                (void) conn_settle(c, 0);
        }

        if (s->n_conns == 0) {
                if (s->done_defer)
                        (void) sd_event_source_set_enabled(s->done_defer, SD_EVENT_ONESHOT);
                else if (done)
                        done(userdata);   /* could not defer: better now than never */
        }
}

void kms_server_free(struct kms_server *s) {
        if (!s)
                return;
        while (s->conns)
                conn_free(s->conns);
        server_close_listeners(s);
        sd_event_source_disable_unref(s->shutdown_timer);
        sd_event_source_disable_unref(s->done_defer);
        nghttp2_session_callbacks_del(s->callbacks);
        nghttp2_option_del(s->h2_option);
        free(s->allowed_uids);
        sd_event_unref(s->event);
        free(s);
}

void kms_server_set_log(struct kms_server *s, kms_server_log_fn fn, void *userdata) {
        s->log = fn;
        s->log_userdata = userdata;
}

void kms_server_set_call_observer(struct kms_server *s, kms_server_call_fn fn, void *userdata) {
        s->call_observer = fn;
        s->call_userdata = userdata;
}

void kms_server_get_stats(const struct kms_server *s, struct kms_server_stats *ret) {
        *ret = s->stats;
        ret->connections_open = s->n_conns;
}
