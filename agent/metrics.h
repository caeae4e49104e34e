/* Metrics in the Prometheus text exposition format (version 0.0.4) on
 * [metrics] listen: a numeric IP address with a port, or a unix socket path.
 * libmicrohttpd serves them on its own thread, so a slow or stalled scraper
 * never delays the KMS socket. The event loop only ever updates counters
 * (atomics, or the short lock of the per-key table); a scrape reads the
 * keyring snapshot, the sync thread's status and the endpoints' health,
 * each of which is behind a lock held only for a copy, never across a
 * network or TPM operation (agent/sync.c, agent/kmip/client.c). The series
 * are listed in tpmkmsd(8). */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "keystore.h"

struct sync;
struct kms_server_stats;

/* What a scrape reads besides the counters; pointers must outlive the
 * metrics, and every one of them is safe to read from another thread. */
struct metrics_sources {
        const struct config *config;
        struct keyring_slot *keys;
        struct sync *sync;                /* fleet mode and serving; else NULL */
        const char *refusal_cause;        /* the sealed cache was refused: why; else NULL */
        uint64_t started_usec;            /* CLOCK_REALTIME */
};

struct metrics;

/* Listen on config->metrics_listen and start serving. Returns 0, or a
 * negative errno (logged): -EINVAL for an address that is not a numeric IP,
 * the socket's errors otherwise. */
int metrics_new(const struct metrics_sources *src, struct metrics **ret);
/* Stop the server thread and free. Accepts NULL. */
void metrics_free(struct metrics *m);

/* A kms_server_call_fn (plugin/plugin.h): count one answered call.
 * userdata is the struct metrics. */
void metrics_observe_call(void *userdata, int method, int grpc_code, uint64_t usec);
/* One Decrypt: key_id is the version that was used, NULL when the request
 * named none that this host holds. Accepts m NULL (metrics off). */
void metrics_count_decrypt(struct metrics *m, const char *key_id, bool ok);
/* The KMS server's connection counters, copied from the event loop (the
 * server's own counters are not thread-safe). Accepts m NULL. */
void metrics_set_server_stats(struct metrics *m, const struct kms_server_stats *st);
/* The primary served now ("" none): remembers since when. Accepts m NULL. */
void metrics_set_primary(struct metrics *m, const char *key_id);
