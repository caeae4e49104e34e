/* Prometheus metrics on libmicrohttpd's own thread (see metrics.h). */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <malloc.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kmip.h"
#include "log.h"
#include "macro.h"
#include "metrics.h"
#include "plugin.h"
#include "socket.h"
#include "sync.h"
#include "util.h"

#define GRPC_CODES 17                   /* OK..UNAUTHENTICATED (grpc/doc/statuscodes.md) */
#define METRICS_DECRYPT_KEYS KEYRING_MAX_KEYS
#define METRICS_CONNECTIONS_MAX 16      /* scrapers at once */
#define METRICS_CONNECTION_TIMEOUT_S 10 /* a scraper that stops reading is closed */

/* Methods by :path; anything else a client sent is "other", so that a peer
 * cannot make up label values. */
#define METHOD_OTHER _KMS_METHOD_MAX   /* a path that names no KMS v2 method */
#define N_METHODS (METHOD_OTHER + 1)

/* Request latency buckets, in usec: the path is served from memory, so most
 * calls fall in the first few; the apiserver gives up at 3 s. */
static const uint64_t buckets_usec[] = {
        100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000, 3000000,
};

struct method_counters {
        _Atomic uint64_t calls[GRPC_CODES + 1];           /* by code; last: not a code */
        _Atomic uint64_t buckets[ARRAY_SIZE(buckets_usec) + 1];   /* not cumulative; last: +Inf */
        _Atomic uint64_t sum_usec;
};

struct decrypt_count {
        char key_id[KEY_ID_MAX];
        uint64_t ok, failed;
};

struct metrics {
        struct metrics_sources src;
        struct MHD_Daemon *httpd;
        char unix_path[sizeof(((struct config *) NULL)->metrics_listen)];   /* ours to unlink; "" TCP */

        struct method_counters method[N_METHODS];

        pthread_mutex_t lock;            /* held for a copy or an update only */
        struct decrypt_count decrypts[METRICS_DECRYPT_KEYS];
        size_t n_decrypts;
        struct decrypt_count decrypts_other;   /* "unknown" ids, and ids past the table */
        struct kms_server_stats server;
        char primary[KEY_ID_MAX];
        uint64_t primary_since_usec;
};

/* The method label: kms_method_name, or "other". */
static const char *method_label(size_t i) {
        return i < METHOD_OTHER ? kms_method_name((enum kms_method) i) : "other";
}

void metrics_observe_call(void *userdata, int method, int grpc_code, uint64_t usec) {
        struct method_counters *mc =
                &((struct metrics *) userdata)->method[method >= 0 && method < METHOD_OTHER ? method : METHOD_OTHER];
        size_t b = 0;

        atomic_fetch_add_explicit(&mc->calls[grpc_code >= 0 && grpc_code < GRPC_CODES ? grpc_code : GRPC_CODES],
                                  1, memory_order_relaxed);
        while (b < ARRAY_SIZE(buckets_usec) && usec > buckets_usec[b])
                b++;
        atomic_fetch_add_explicit(&mc->buckets[b], 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&mc->sum_usec, usec, memory_order_relaxed);
}

void metrics_count_decrypt(struct metrics *m, const char *key_id, bool ok) {
        struct decrypt_count *d;

        if (!m)
                return;
        pthread_mutex_lock(&m->lock);
        d = &m->decrypts_other;
        if (key_id) {
                size_t i = 0;

                while (i < m->n_decrypts && strcmp(m->decrypts[i].key_id, key_id) != 0)
                        i++;
                if (i == m->n_decrypts && i < ARRAY_SIZE(m->decrypts) && strlen(key_id) < KEY_ID_MAX)
                        snprintf(m->decrypts[m->n_decrypts++].key_id, KEY_ID_MAX, "%s", key_id);
                if (i < m->n_decrypts)
                        d = &m->decrypts[i];
        }
        if (ok)
                d->ok++;
        else
                d->failed++;
        pthread_mutex_unlock(&m->lock);
}

void metrics_set_server_stats(struct metrics *m, const struct kms_server_stats *st) {
        if (!m)
                return;
        pthread_mutex_lock(&m->lock);
        m->server = *st;
        pthread_mutex_unlock(&m->lock);
}

void metrics_set_primary(struct metrics *m, const char *key_id) {
        if (!m)
                return;
        pthread_mutex_lock(&m->lock);
        if (strcmp(m->primary, key_id) != 0) {
                snprintf(m->primary, sizeof(m->primary), "%s", key_id);
                m->primary_since_usec = now_usec(CLOCK_REALTIME);
        }
        pthread_mutex_unlock(&m->lock);
}

/* ---- exposition ---- */

/* A label value: backslash, double quote and newline escaped (Prometheus
 * text format 0.0.4). */
static void label(FILE *f, const char *name, const char *value, bool first) {
        fprintf(f, "%s%s=\"", first ? "" : ",", name);
        for (; *value; value++) {
                if (*value == '\\' || *value == '"')
                        fputc('\\', f);
                if (*value == '\n')
                        fputs("\\n", f);
                else
                        fputc(*value, f);
        }
        fputc('"', f);
}

static void family(FILE *f, const char *name, const char *type, const char *help) {
        fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static double seconds(uint64_t usec) {
        return (double) usec / USEC_PER_SEC;
}

static void render_requests(struct metrics *m, FILE *f) {
        family(f, "tpmkms_requests_total", "counter", "KMS v2 calls answered, by method and gRPC status code.");
        for (size_t i = 0; i < N_METHODS; i++)
                for (int c = 0; c <= GRPC_CODES; c++) {
                        uint64_t n = atomic_load_explicit(&m->method[i].calls[c], memory_order_relaxed);
                        const char *code = kms_grpc_code_to_string(c);

                        /* OK always, so that rates start at zero; others once seen. */
                        if (n == 0 && (c != 0 || i == METHOD_OTHER))
                                continue;
                        fputs("tpmkms_requests_total{", f);
                        label(f, "method", method_label(i), true);
                        label(f, "code", code ? code : "UNKNOWN_CODE", false);
                        fprintf(f, "} %" PRIu64 "\n", n);
                }
        family(f, "tpmkms_request_duration_seconds", "histogram",
               "Time from a call's request headers to its response being queued, by method.");
        for (size_t i = 0; i < N_METHODS; i++) {
                struct method_counters *mc = &m->method[i];
                uint64_t cum = 0;

                for (size_t b = 0; b <= ARRAY_SIZE(buckets_usec); b++) {
                        char le[32];

                        cum += atomic_load_explicit(&mc->buckets[b], memory_order_relaxed);
                        if (b < ARRAY_SIZE(buckets_usec))
                                snprintf(le, sizeof(le), "%g", seconds(buckets_usec[b]));
                        else
                                snprintf(le, sizeof(le), "+Inf");
                        fputs("tpmkms_request_duration_seconds_bucket{", f);
                        label(f, "method", method_label(i), true);
                        label(f, "le", le, false);
                        fprintf(f, "} %" PRIu64 "\n", cum);
                }
                fputs("tpmkms_request_duration_seconds_sum{", f);
                label(f, "method", method_label(i), true);
                fprintf(f, "} %.6f\ntpmkms_request_duration_seconds_count{", seconds(atomic_load_explicit(
                                &mc->sum_usec, memory_order_relaxed)));
                label(f, "method", method_label(i), true);
                fprintf(f, "} %" PRIu64 "\n", cum);
        }
}

/* The KMS server's counters (plugin/plugin.h, struct kms_server_stats). */
static const struct server_series {
        const char *name, *type, *help;
        size_t offset;
} server_series[] = {
        { "tpmkms_connections_accepted_total", "counter", "KMS socket connections admitted after the peer check.",
          offsetof(struct kms_server_stats, connections_accepted) },
        { "tpmkms_connections_refused_total", "counter",
          "KMS socket connections refused: peer uid not in [kms] allowed_uids.",
          offsetof(struct kms_server_stats, connections_refused) },
        { "tpmkms_connections_over_limit_total", "counter",
          "KMS socket connections closed at the connection limit with none idle.",
          offsetof(struct kms_server_stats, connections_over_limit) },
        { "tpmkms_connections_evicted_total", "counter", "Idle KMS socket connections closed to admit a new one.",
          offsetof(struct kms_server_stats, connections_evicted) },
        { "tpmkms_connections_open", "gauge", "KMS socket connections open.",
          offsetof(struct kms_server_stats, connections_open) },
        { "tpmkms_protocol_errors_total", "counter", "KMS socket connections dropped for broken HTTP/2.",
          offsetof(struct kms_server_stats, protocol_errors) },
        { "tpmkms_timeouts_total", "counter", "KMS socket handshake, idle, stream and stalled-output timeouts.",
          offsetof(struct kms_server_stats, timeouts) },
};

/* The allocator's own figures tell a leak (in use keeps growing) from a
 * fragmented heap (obtained grows, in use does not), which RSS cannot. A
 * replaced allocator (the sanitizers') leaves glibc's at zero: no series
 * then, rather than a false 0. */
static void render_heap(FILE *f) {
        struct mallinfo2 mi = mallinfo2();

        if (mi.arena == 0 && mi.hblkhd == 0)
                return;
        family(f, "tpmkms_heap_in_use_bytes", "gauge", "malloc heap in use (all arenas and mmapped blocks).");
        fprintf(f, "tpmkms_heap_in_use_bytes %zu\n", mi.uordblks + mi.hblkhd);
        family(f, "tpmkms_heap_obtained_bytes", "gauge",
               "malloc heap obtained from the kernel (all arenas and mmapped blocks).");
        fprintf(f, "tpmkms_heap_obtained_bytes %zu\n", mi.arena + mi.hblkhd);
}

static void decrypt_line(FILE *f, const char *key_id, const char *result, uint64_t n) {
        fputs("tpmkms_decrypts_total{", f);
        label(f, "key_id", key_id, true);
        label(f, "result", result, false);
        fprintf(f, "} %" PRIu64 "\n", n);
}

/* Everything behind the lock, copied out first so that the lock is never
 * held while formatting. */
static int render_locked_state(struct metrics *m, FILE *f) {
        _cleanup_free_ struct decrypt_count *d = NULL;
        struct decrypt_count other;
        struct kms_server_stats st;
        char primary[KEY_ID_MAX];
        uint64_t since;
        size_t n;

        d = malloc(sizeof(m->decrypts));
        if (!d)
                return -ENOMEM;
        pthread_mutex_lock(&m->lock);
        n = m->n_decrypts;
        memcpy(d, m->decrypts, n * sizeof(*d));
        other = m->decrypts_other;
        st = m->server;
        memcpy(primary, m->primary, sizeof(primary));
        since = m->primary_since_usec;
        pthread_mutex_unlock(&m->lock);

        family(f, "tpmkms_decrypts_total", "counter",
               "Decrypt calls by the key version used (\"unknown\": none this host holds) and result.");
        for (size_t i = 0; i < n; i++) {
                decrypt_line(f, d[i].key_id, "ok", d[i].ok);
                decrypt_line(f, d[i].key_id, "error", d[i].failed);
        }
        if (other.ok || other.failed) {
                decrypt_line(f, "unknown", "ok", other.ok);
                decrypt_line(f, "unknown", "error", other.failed);
        }
        family(f, "tpmkms_primary_key_info", "gauge",
               "The key version Encrypt uses and Status names; the hosts of a key group should agree.");
        if (*primary) {
                fputs("tpmkms_primary_key_info{", f);
                label(f, "key_id", primary, true);
                label(f, "key_group", m->src.config->key_group, false);   /* "" standalone */
                fputs("} 1\n", f);
        }
        family(f, "tpmkms_primary_key_since_timestamp_seconds", "gauge",
               "When this daemon began to serve the current primary (Unix time).");
        if (*primary)
                fprintf(f, "tpmkms_primary_key_since_timestamp_seconds %.3f\n", seconds(since));

        for (size_t i = 0; i < ARRAY_SIZE(server_series); i++) {
                const struct server_series *ss = &server_series[i];

                family(f, ss->name, ss->type, ss->help);
                fprintf(f, "%s %" PRIu64 "\n", ss->name, *(const uint64_t *) ((const char *) &st + ss->offset));
        }
        return 0;
}

static void render_keys(struct metrics *m, FILE *f) {
        _cleanup_(keyring_unrefp) struct keyring *kr = keyring_slot_get(m->src.keys);
        char path[PATH_MAX + sizeof("/" CACHE_FILE_NAME)];
        struct stat st;

        family(f, "tpmkms_key_info", "gauge", "Key versions in the cache, by key id, role and central id.");
        for (size_t i = 0; kr && i < keyring_size(kr); i++) {
                const struct key_version *k = keyring_get(kr, i);

                fputs("tpmkms_key_info{", f);
                label(f, "key_id", k->id, true);
                label(f, "role", key_role_to_string(k->role), false);
                label(f, "central_id", k->central_id, false);
                fputs("} 1\n", f);
        }
        family(f, "tpmkms_unseal_refusals_total", "counter",
               "Sealed cache refused at start, by cause: nothing is served while this is non-zero.");
        if (m->src.refusal_cause) {
                fputs("tpmkms_unseal_refusals_total{", f);
                label(f, "cause", m->src.refusal_cause, true);
                fputs("} 1\n", f);
        }
        family(f, "tpmkms_cache_write_timestamp_seconds", "gauge",
               "When the sealed cache file was last written (Unix time).");
        snprintf(path, sizeof(path), "%s/%s", m->src.config->state_dir, CACHE_FILE_NAME);
        if (stat(path, &st) == 0)
                fprintf(f, "tpmkms_cache_write_timestamp_seconds %ld.%03ld\n", (long) st.st_mtim.tv_sec,
                        st.st_mtim.tv_nsec / 1000000);
}

static void endpoint_line(FILE *f, const char *metric, const char *endpoint, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));
static void endpoint_line(FILE *f, const char *metric, const char *endpoint, const char *fmt, ...) {
        va_list ap;

        fprintf(f, "%s{", metric);
        label(f, "endpoint", endpoint, true);
        fputs("} ", f);
        va_start(ap, fmt);
        vfprintf(f, fmt, ap);
        va_end(ap);
        fputc('\n', f);
}

static void render_central(struct metrics *m, FILE *f) {
        struct central_endpoint_health h[CENTRAL_ENDPOINTS_MAX];
        const struct config *c = m->src.config;
        struct sync_status st;
        uint64_t age, not_after;
        size_t n;

        if (!m->src.sync)
                return;
        sync_get_status(m->src.sync, &st);
        (void) sync_too_stale(m->src.sync, &age);
        n = sync_endpoint_health(m->src.sync, h, ARRAY_SIZE(h));
        n = n < ARRAY_SIZE(h) ? n : ARRAY_SIZE(h);

        family(f, "tpmkms_sync_last_success_timestamp_seconds", "gauge",
               "When a sync with the central KMS last succeeded (Unix time; 0 never).");
        fprintf(f, "tpmkms_sync_last_success_timestamp_seconds %.3f\n", seconds(st.last_success_usec));
        family(f, "tpmkms_syncs_total", "counter", "Syncs with the central KMS, by result.");
        fprintf(f, "tpmkms_syncs_total{result=\"ok\"} %" PRIu64 "\ntpmkms_syncs_total{result=\"error\"} %" PRIu64
                "\n", st.syncs_ok, st.syncs_failed);
        family(f, "tpmkms_central_staleness_seconds", "gauge",
               "Time since the last successful sync (since start when none).");
        fprintf(f, "tpmkms_central_staleness_seconds %.3f\n", seconds(age));
        family(f, "tpmkms_central_max_staleness_seconds", "gauge",
               "[central] max_staleness: staleness at which the daemon stops serving (0: off).");
        fprintf(f, "tpmkms_central_max_staleness_seconds %.3f\n", seconds(c->max_staleness_usec));

        family(f, "tpmkms_central_endpoint_up", "gauge",
               "1 when the last exchange with this central KMS endpoint succeeded.");
        for (size_t i = 0; i < n; i++)
                endpoint_line(f, "tpmkms_central_endpoint_up", h[i].name, "%d",
                              h[i].last_success_usec != 0 && h[i].consecutive_failures == 0);
        family(f, "tpmkms_central_endpoint_last_success_timestamp_seconds", "gauge",
               "When a fetch from this endpoint last succeeded (Unix time; 0 never).");
        for (size_t i = 0; i < n; i++)
                endpoint_line(f, "tpmkms_central_endpoint_last_success_timestamp_seconds", h[i].name, "%.3f",
                              seconds(h[i].last_success_usec));
        family(f, "tpmkms_central_endpoint_requests_total", "counter", "Fetches tried at this endpoint.");
        for (size_t i = 0; i < n; i++)
                endpoint_line(f, "tpmkms_central_endpoint_requests_total", h[i].name, "%" PRIu64, h[i].requests);
        family(f, "tpmkms_central_endpoint_errors_total", "counter", "Fetches from this endpoint that failed.");
        for (size_t i = 0; i < n; i++)
                endpoint_line(f, "tpmkms_central_endpoint_errors_total", h[i].name, "%" PRIu64, h[i].failures);
        family(f, "tpmkms_central_endpoint_latency_seconds", "gauge",
               "Duration of the last successful fetch from this endpoint (connect, TLS, every request).");
        for (size_t i = 0; i < n; i++)
                if (h[i].last_success_usec)
                        endpoint_line(f, "tpmkms_central_endpoint_latency_seconds", h[i].name, "%.6f",
                                      seconds(h[i].last_latency_usec));

        /* Read from the file at each scrape: a renewed certificate shows
         * without a restart. */
        family(f, "tpmkms_client_certificate_expiry_timestamp_seconds", "gauge",
               "notAfter of the client certificate for the central KMS ([central] cert_file; Unix time).");
        if (central_certificate_not_after(c->cert_file, &not_after) >= 0)
                fprintf(f, "tpmkms_client_certificate_expiry_timestamp_seconds %.0f\n", seconds(not_after));
}

static int render(struct metrics *m, char **ret, size_t *ret_size) {
        _cleanup_free_ char *buf = NULL;
        size_t size = 0;
        FILE *f;
        int r;

        f = open_memstream(&buf, &size);
        if (!f)
                return -ENOMEM;
        family(f, "tpmkms_build_info", "gauge", "The running tpmkmsd: version and mode.");
        fputs("tpmkms_build_info{", f);
        label(f, "version", TPMKMS_VERSION, true);
        label(f, "mode", m->src.config->central_type == CENTRAL_KMIP ? "kmip" : "standalone", false);
        fputs("} 1\n", f);
        family(f, "tpmkms_start_time_seconds", "gauge", "When tpmkmsd started (Unix time).");
        fprintf(f, "tpmkms_start_time_seconds %.3f\n", seconds(m->src.started_usec));
        render_heap(f);
        render_requests(m, f);
        r = render_locked_state(m, f);
        render_keys(m, f);
        render_central(m, f);
        if (fclose(f) != 0 || r < 0)
                return r < 0 ? r : -ENOMEM;
        *ret = TAKE_PTR(buf);
        *ret_size = size;
        return 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **con_cls) {
        static const char not_found[] = "only GET /metrics is served here\n";
        struct metrics *m = cls;
        struct MHD_Response *resp;
        enum MHD_Result ret;
        unsigned status = MHD_HTTP_OK;
        char *body = NULL;
        size_t size = 0;

        if (strcmp(method, "GET") != 0 || strcmp(url, "/metrics") != 0) {
                status = MHD_HTTP_NOT_FOUND;
                resp = MHD_create_response_from_buffer(sizeof(not_found) - 1, (void *) not_found,
                                                       MHD_RESPMEM_PERSISTENT);
        } else if (render(m, &body, &size) < 0) {
                status = MHD_HTTP_INTERNAL_SERVER_ERROR;
                resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
        } else
                resp = MHD_create_response_from_buffer(size, body, MHD_RESPMEM_MUST_FREE);
        if (!resp) {
                free(body);
                return MHD_NO;
        }
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                                       status == MHD_HTTP_OK ? "text/plain; version=0.0.4; charset=utf-8"
                                                             : "text/plain; charset=utf-8");
        ret = MHD_queue_response(conn, status, resp);
        MHD_destroy_response(resp);
        return ret;
}

/* libmicrohttpd's own messages: fmt is its format string. */
static void on_httpd_log(void *cls, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
static void on_httpd_log(void *cls, const char *fmt, va_list ap) {
        char msg[512];

        vsnprintf(msg, sizeof(msg), fmt, ap);
        msg[strcspn(msg, "\n")] = 0;
        log_debug("Metrics server: %s", msg);
}

/* A listening socket for "ADDR:PORT" or "[ADDR6]:PORT" (numeric: the
 * metrics belong on localhost or a management address, never a name that
 * resolves elsewhere), or a unix socket path (mode 0660: a scraper in the
 * daemon's group may read). Returns the fd or a negative errno. */
static int metrics_listen(struct metrics *m, const char *listen_on) {
        struct sockaddr_storage ss = {};
        socklen_t len;
        char host[64];
        const char *colon = strrchr(listen_on, ':');
        unsigned long port;
        char *end;
        int fd, r;

        if (listen_on[0] == '/') {
                fd = unix_socket_listen(listen_on, 0660);
                if (fd >= 0)
                        snprintf(m->unix_path, sizeof(m->unix_path), "%s", listen_on);
                return fd;
        }
        if (!colon || (size_t) (colon - listen_on) >= sizeof(host))
                return -EINVAL;
        port = strtoul(colon + 1, &end, 10);
        if (*end || port == 0 || port > 65535)
                return -EINVAL;
        memcpy(host, listen_on, (size_t) (colon - listen_on));
        host[colon - listen_on] = 0;
        if (host[0] == '[' && host[strlen(host) - 1] == ']') {
                struct sockaddr_in6 *a6 = (struct sockaddr_in6 *) &ss;

                host[strlen(host) - 1] = 0;
                if (inet_pton(AF_INET6, host + 1, &a6->sin6_addr) != 1)
                        return -EINVAL;
                a6->sin6_family = AF_INET6;
                a6->sin6_port = htons((uint16_t) port);
                len = sizeof(*a6);
        } else {
                struct sockaddr_in *a4 = (struct sockaddr_in *) &ss;

                if (inet_pton(AF_INET, host, &a4->sin_addr) != 1)
                        return -EINVAL;
                a4->sin_family = AF_INET;
                a4->sin_port = htons((uint16_t) port);
                len = sizeof(*a4);
        }
        fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return -errno;
        (void) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &(int) { 1 }, sizeof(int));
        if (bind(fd, (struct sockaddr *) &ss, len) < 0 || listen(fd, 16) < 0) {
                r = -errno;
                close(fd);
                return r;
        }
        return fd;
}

int metrics_new(const struct metrics_sources *src, struct metrics **ret) {
        struct metrics *m;
        int fd;

        m = calloc(1, sizeof(*m));
        if (!m)
                return log_error_errno(ENOMEM, "Cannot set up metrics: %m");
        m->src = *src;
        pthread_mutex_init(&m->lock, NULL);
        fd = metrics_listen(m, src->config->metrics_listen);
        if (fd < 0) {
                log_error_errno(fd, "Cannot serve metrics on %s%s: %m", src->config->metrics_listen,
                                fd == -EINVAL ? " (a numeric IP address with a port, or a unix socket path)" : "");
                metrics_free(m);
                return fd;
        }
        /* One thread polls every scraper: a stalled one holds nothing but
         * its own connection, and is closed after the connection timeout. */
        m->httpd = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG, 0,
                                    NULL, NULL, on_request, m,
                                    MHD_OPTION_LISTEN_SOCKET, fd,
                                    MHD_OPTION_CONNECTION_LIMIT, (unsigned) METRICS_CONNECTIONS_MAX,
                                    MHD_OPTION_CONNECTION_TIMEOUT, (unsigned) METRICS_CONNECTION_TIMEOUT_S,
                                    MHD_OPTION_EXTERNAL_LOGGER, on_httpd_log, NULL,
                                    MHD_OPTION_END);
        if (!m->httpd) {
                close(fd);
                metrics_free(m);
                return log_error_errno(EIO, "Cannot start the metrics server on %s (libmicrohttpd; "
                                       "tpmkmsd --verbose tells why)", src->config->metrics_listen);
        }
        log_info("Serving metrics on %s%s", src->config->metrics_listen, src->config->metrics_listen[0] == '/'
                 ? "" : " (http://.../metrics)");
        *ret = m;
        return 0;
}

void metrics_free(struct metrics *m) {
        if (!m)
                return;
        if (m->httpd)
                MHD_stop_daemon(m->httpd);   /* joins the thread, closes the socket */
        if (*m->unix_path)
                (void) unlink(m->unix_path);
        pthread_mutex_destroy(&m->lock);
        free(m);
}
