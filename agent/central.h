/* The central KMS as the sync loop sees it: a list of KMIP endpoints reached
 * over mutual TLS (OpenSSL 3, TLS 1.2+, forward-secret suites first), tried in
 * order with failover, each with its health recorded; exponential backoff
 * with jitter for endpoints that failed. Calls block, bounded by the
 * configured timeout on connect, handshake, read and write: run them off the
 * event loop (the sync thread). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "kmip.h"

struct central_endpoint_health {
        char name[300];                   /* "host:port" */
        uint64_t last_success_usec;       /* CLOCK_REALTIME, 0 never */
        uint64_t last_failure_usec;
        uint64_t last_latency_usec;       /* of the last successful exchange (the whole fetch:
                                           * connect, handshake and every request) */
        uint64_t next_attempt_usec;       /* backoff: not tried before (CLOCK_MONOTONIC) */
        unsigned consecutive_failures;
        uint64_t requests, failures;      /* totals (requests: fetches tried here) */
        char last_error[512];             /* "" when the last attempt succeeded */
        /* A failure the server answered in KMIP (Permission Denied, ...)
         * counts in failures and consecutive_failures, but puts the
         * endpoint in no backoff: it is up and speaking KMIP. */
};

/* One key version of the group as the central KMS describes it. */
struct central_key {
        struct kmip_key_attributes attr;
        bool has_material;                /* Get succeeded: kek is valid. False for
                                           * Compromised/Destroyed, and for a key whose
                                           * attributes say it is not AES-256 (not
                                           * fetched: the caller reports it) */
        uint8_t kek[KMIP_KEY_SIZE];
};

struct central_client;

/* Load the CA, client certificate and key of c (refusing a key file that group
 * or others can read) and prepare the endpoints. Returns 0, or a negative
 * errno with a message in err. */
int central_client_new(const struct config *c, struct central_client **ret, char *err, size_t err_size);
void central_client_free(struct central_client *cc);

/* Fetch every version of the configured key group: Locate (Object Group,
 * Symmetric Key), GetAttributes of each, and Get of those whose State allows
 * it (Pre-Active, Active, Deactivated). Tries endpoints in order, skipping
 * those in backoff unless all are; one connection per fetch. On success *ret
 * is an array of *ret_n keys (free with central_keys_free, which wipes).
 * Returns 0, or a negative errno with what failed in err (the server's Result
 * Reason and Message when it answered with a failure). */
int central_fetch(struct central_client *cc, struct central_key **ret, size_t *ret_n,
                  char *err, size_t err_size);
void central_keys_free(struct central_key *keys, size_t n);

/* From another thread: make a running central_fetch end after its current
 * request (it then fails with -ECANCELED), and every later one at once. */
void central_client_cancel(struct central_client *cc);

/* Copy the endpoints' health (thread-safe). Returns the number of endpoints. */
size_t central_client_health(struct central_client *cc, struct central_endpoint_health *ret, size_t max);
