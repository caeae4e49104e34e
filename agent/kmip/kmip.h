/* kmip/ — the central KMS client: KMIP 1.2 over mutual TLS (OpenSSL 3, TLS
 * 1.2+, forward-secret suites), a list of endpoints tried in order with
 * failover, each with its health recorded, and exponential backoff with
 * jitter for endpoints that failed. This is the library's one public header:
 * it speaks of key versions and their lifecycle state, never of KMIP types
 * (the TTLV codec, messages and transport are internal: ttlv.h, message.h,
 * tls.h).
 *
 * Calls block, bounded by the configured timeout on connect, handshake, read
 * and write: run them off the event loop (the sync thread). Key material is
 * only ever in OpenSSL's secure heap (keystore.h: keyring_secure_heap_init). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "macro.h"

typedef struct evp_pkey_st EVP_PKEY;

#define CENTRAL_ENDPOINTS_MAX 8
#define CENTRAL_ID_MAX 128          /* a key version's identifier at the central KMS */
#define CENTRAL_GROUP_MAX 255       /* the key group's name */
#define CENTRAL_KEYS_MAX 1024       /* versions in one group */

struct central_endpoint {
        char host[256];             /* name, IPv4 or IPv6 literal */
        uint16_t port;
};

struct central_options {
        struct central_endpoint endpoints[CENTRAL_ENDPOINTS_MAX];
        size_t n_endpoints;         /* 1..CENTRAL_ENDPOINTS_MAX */
        const char *ca_file;        /* the only trust anchors: no system store */
        const char *cert_file;      /* our certificate chain */
        const char *key_file;       /* our key: group/other access is refused; unused with key */
        EVP_PKEY *key;              /* our key as an OpenSSL key (e.g. one whose private operations
                                     * run in a TPM); NULL: read key_file. Referenced, not copied */
        const char *group;          /* the key group (KMIP Object Group), 1..CENTRAL_GROUP_MAX bytes */
        uint64_t timeout_usec;      /* per connect, handshake and request; 0: 5 s */
        uint64_t backoff_cap_usec;  /* longest backoff; raised to at least 5 min */
};

/* A key version's lifecycle state at the central KMS (KMIP 1.2 section 3.22). */
enum central_state {
        CENTRAL_STATE_PRE_ACTIVE,
        CENTRAL_STATE_ACTIVE,
        CENTRAL_STATE_DEACTIVATED,
        CENTRAL_STATE_COMPROMISED,  /* also Destroyed Compromised */
        CENTRAL_STATE_DESTROYED,
        _CENTRAL_STATE_MAX,
};
const char *central_state_to_string(enum central_state s);
/* Pre-Active, Active and Deactivated versions have material to fetch (they
 * may still decrypt); Compromised and Destroyed do not. */
bool central_state_has_material(enum central_state s);

/* One key version of the group as the central KMS describes it. */
struct central_key {
        char uid[CENTRAL_ID_MAX];
        enum central_state state;
        uint64_t created_usec;      /* CLOCK_REALTIME (Initial Date); 0 when not given */
        bool is_aes256;             /* a symmetric AES key of 256 bits */
        char kind[64];              /* what it is otherwise ("algorithm 4, 168 bits"), for messages */
        uint8_t *kek;               /* AES256_KEY_SIZE bytes in the secure heap, fetched when
                                     * the state has material and the key is AES-256, unless
                                     * material_held; else NULL */
        bool material_held;         /* the state has material and the key is AES-256, but its
                                     * material was not fetched: the caller said it holds it
                                     * (kek NULL) */
};

struct central_endpoint_health {
        char name[300];                   /* "host:port" */
        uint64_t last_success_usec;       /* CLOCK_REALTIME, 0 never */
        uint64_t last_failure_usec;
        uint64_t last_latency_usec;       /* of the last successful exchange (the whole fetch:
                                           * connect, handshake and every request) */
        uint64_t next_attempt_usec;       /* backoff: not tried before (CLOCK_MONOTONIC) */
        unsigned consecutive_failures;
        uint64_t requests, failures;      /* totals (requests: fetches tried here) */
        uint64_t messages;                /* KMIP request messages sent (total) */
        uint64_t resumed;                 /* connections that resumed a TLS session (total) */
        char last_error[512];             /* "" when the last attempt succeeded */
        /* A failure the server answered (Permission Denied, ...) counts in
         * failures and consecutive_failures, but puts the endpoint in no
         * backoff: it is up and answering. */
};

struct central_client;

/* Load the CA, client certificate and key of opt (refusing a key file that
 * group or others can read) and prepare the endpoints. opt's strings are
 * copied. Returns 0, or a negative errno with a message in err. */
int central_client_new(const struct central_options *opt, struct central_client **ret,
                       char *err, size_t err_size);
void central_client_free(struct central_client *cc);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct central_client *, central_client_free);

/* Fetch every version of the key group: the identifiers in the group, the
 * state and attributes of each, and the material of those whose state has
 * material and that are AES-256 keys, except for the n_held identifiers in
 * held (at most CENTRAL_KEYS_MAX): the caller holds their material, they are
 * returned with material_held and no kek. Pass none to fetch all material
 * again (and so compare it with what the caller holds).
 *
 * Tries endpoints in order, skipping those in backoff unless all are; one
 * connection per fetch, resuming the last TLS session with that endpoint;
 * KMIP DiscoverVersions once per endpoint (again after a transport or
 * protocol failure); the operations batched in one request message (KMIP
 * 1.2 section 7.1), a second one for versions new to the caller, one
 * operation per message to a server that refuses batches. A version that
 * vanished (Item Not Found) between its listing and its attributes is left
 * out; any other failed operation fails the fetch.
 *
 * On success *ret is an array of *ret_n keys (free with central_keys_free,
 * which wipes). Returns 0, or a negative errno with what failed in err (the
 * server's reason and message when it answered with a failure): -EREMOTEIO
 * the server refused, -E2BIG more than CENTRAL_KEYS_MAX versions in the
 * group, -ECANCELED cancelled, -EINVAL more than CENTRAL_KEYS_MAX held,
 * another negative errno for a transport or protocol failure. */
int central_fetch(struct central_client *cc, const char (*held)[CENTRAL_ID_MAX], size_t n_held,
                  struct central_key **ret, size_t *ret_n, char *err, size_t err_size);
void central_keys_free(struct central_key *keys, size_t n);

/* From another thread: make a running central_fetch end after its current
 * request (it then fails with -ECANCELED), and every later one at once. */
void central_client_cancel(struct central_client *cc);

/* Copy the endpoints' health (thread-safe). Returns the number of endpoints. */
size_t central_client_health(struct central_client *cc, struct central_endpoint_health *ret, size_t max);

/* ---- diagnostics (tpmkmsctl doctor) ---------------------------------------- */

/* The steps of one probe, in order. */
enum central_probe_step {
        CENTRAL_PROBE_SETUP,      /* loading the CA, certificate and key files */
        CENTRAL_PROBE_RESOLVE,    /* the endpoint's host name */
        CENTRAL_PROBE_CONNECT,    /* TCP */
        CENTRAL_PROBE_HANDSHAKE,  /* TLS, the server's certificate verified */
        CENTRAL_PROBE_REQUEST,    /* one request answered */
        CENTRAL_PROBE_DONE,
};
/* "resolve", "connect", ...: for messages. */
const char *central_probe_step_to_string(enum central_probe_step s);

struct central_probe_result {
        enum central_probe_step failed;   /* the step that failed; CENTRAL_PROBE_DONE: none */
        char address[64];                 /* the address connected to (or last tried); "" before */
        uint64_t connect_usec;            /* name resolution and TCP connect */
        uint64_t handshake_usec;
        uint64_t request_usec;            /* the request, sent and answered */
        char server_verify[128];          /* "ok", or why the server's certificate failed
                                           * verification; "" when none was received */
        uint64_t server_not_after_usec;   /* the server certificate's notAfter; 0 unknown */
        char protocol[64];                /* "TLSv1.3, protocol 1.2" once answered */
        uint64_t server_time_usec;        /* the server's clock in its answer (CLOCK_REALTIME
                                           * usec); 0 when it gave none */
        uint64_t local_time_usec;         /* our clock halfway through that request */
};

/* Probe endpoint i of opt with one connection and the lightest request
 * there is (protocol version discovery: no key group, no key material),
 * each step bounded by opt->timeout_usec. With opt->cert_file NULL no
 * client certificate is presented (a TPM-bound key signs only in
 * tpmkmsd): the server's certificate is still verified, but a server that
 * requires one then fails the handshake. Always fills ret. Returns 0, or a
 * negative errno as central_fetch does, with what failed in err and the
 * step in ret->failed. */
int central_probe(const struct central_options *opt, size_t i, struct central_probe_result *ret,
                  char *err, size_t err_size);

/* The notAfter of the first certificate in the PEM file path (our client
 * certificate, for metrics and tpmkmsctl doctor), as CLOCK_REALTIME usec.
 * Returns 0, -errno when the file cannot be opened, or -EBADMSG when it
 * holds no readable certificate. */
int central_certificate_not_after(const char *path, uint64_t *ret_usec);
