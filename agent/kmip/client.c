/* The central KMS client (see kmip.h). Transport in tls.c, KMIP messages in
 * message.c; this file decides which endpoint to ask, what to ask it, and
 * what its health is, and translates KMIP into the terms of kmip.h. */
#include <errno.h>
#include <inttypes.h>
#include <openssl/crypto.h>
#include <stdatomic.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "kmip.h"
#include "macro.h"
#include "util.h"
#include "log.h"
#include "message.h"
#include "tls.h"

/* Backoff for an endpoint that failed: full jitter over an exponential window
 * (1 s doubling per consecutive failure, capped at max(sync_interval, 5 min))
 * on top of a 1 s floor. The jitter keeps a fleet of hosts from retrying a
 * recovering KMS in step; the floor keeps an endpoint that has just failed
 * out of the very next fetch (a Decrypt for an unknown key id triggers one
 * right away). */
#define BACKOFF_BASE_USEC (UINT64_C(1000000))
#define BACKOFF_CAP_MIN_USEC (UINT64_C(300) * 1000000)
#define DEFAULT_TIMEOUT_USEC (UINT64_C(5) * 1000000)
#define VERSIONS_MAX 32
/* New versions are fetched with GetAttributes and Get in batches of this
 * many: the answer holds their material in the secure heap, bounded by
 * SECRET_RESPONSE_MAX (a version's two answers are under 1 KiB). */
#define NEW_PER_MESSAGE 32

#define KMIP_OBJECT_SYMMETRIC_KEY 2
#define KMIP_ALGORITHM_AES 3

struct central_client {
        struct tls_context *tls;
        char cert_file[PATH_MAX];         /* named when the server refuses it */
        char group[CENTRAL_GROUP_MAX + 1];
        uint64_t timeout_usec;
        uint64_t backoff_cap_usec;
        size_t n_endpoints;
        struct central_endpoint endpoints[CENTRAL_ENDPOINTS_MAX];

        atomic_bool cancelled;            /* central_client_cancel: stop soon */

        /* What a fetch learnt about each endpoint for the next ones (the
         * sync thread only). */
        struct endpoint_state {
                struct kmip_version version;  /* DiscoverVersions' answer, */
                bool version_known;           /* until a failure that is not the server's answer */
                bool no_batch;                /* refused a batch: one operation per message */
                struct tls_session *resume;   /* the last connection's TLS session */
        } ep[CENTRAL_ENDPOINTS_MAX];
        /* The versions the last fetch found without material to fetch
         * (their state has none, or they are no AES-256 keys): checked
         * with the held ones, not fetched as new every time. */
        char (*bare)[CENTRAL_ID_MAX];     /* CENTRAL_KEYS_MAX */
        size_t n_bare;

        /* health is written by the sync thread and read by the main one */
        pthread_mutex_t lock;
        struct central_endpoint_health health[CENTRAL_ENDPOINTS_MAX];
};

/* One connection to one endpoint during one fetch. */
struct session {
        struct central_client *cc;
        struct endpoint_state *ep;
        struct central_endpoint_health *health;
        struct tls_conn *conn;
        struct kmip_version version;
        const char *peer;
};



const char *central_state_to_string(enum central_state s) {
        static const char *const names[_CENTRAL_STATE_MAX] = {
                [CENTRAL_STATE_PRE_ACTIVE] = "Pre-Active",
                [CENTRAL_STATE_ACTIVE] = "Active",
                [CENTRAL_STATE_DEACTIVATED] = "Deactivated",
                [CENTRAL_STATE_COMPROMISED] = "Compromised",
                [CENTRAL_STATE_DESTROYED] = "Destroyed",
        };
        return (unsigned) s < _CENTRAL_STATE_MAX ? names[s] : "unknown";
}

bool central_state_has_material(enum central_state s) {
        return s == CENTRAL_STATE_PRE_ACTIVE || s == CENTRAL_STATE_ACTIVE || s == CENTRAL_STATE_DEACTIVATED;
}

/* KMIP 1.2 section 9.1.3.2.17. A State the server did not send, or one this
 * client does not know, is no answer: -EBADMSG (the fetch fails and the
 * cache is kept, never purged on a guess). */
static int state_from_kmip(int32_t state, enum central_state *ret) {
        switch (state) {
        case KMIP_STATE_PRE_ACTIVE:
                *ret = CENTRAL_STATE_PRE_ACTIVE;
                return 0;
        case KMIP_STATE_ACTIVE:
                *ret = CENTRAL_STATE_ACTIVE;
                return 0;
        case KMIP_STATE_DEACTIVATED:
                *ret = CENTRAL_STATE_DEACTIVATED;
                return 0;
        case KMIP_STATE_COMPROMISED:
        case KMIP_STATE_DESTROYED_COMPROMISED:
                *ret = CENTRAL_STATE_COMPROMISED;
                return 0;
        case KMIP_STATE_DESTROYED:
                *ret = CENTRAL_STATE_DESTROYED;
                return 0;
        default:
                return -EBADMSG;
        }
}

int central_client_new(const struct central_options *c, struct central_client **ret, char *err, size_t err_size) {
        struct central_client *cc;
        int r;

        if (c->n_endpoints == 0 || c->n_endpoints > CENTRAL_ENDPOINTS_MAX) {
                errorf(err, err_size, "[central] needs 1 to %d endpoints, got %zu",
                       CENTRAL_ENDPOINTS_MAX, c->n_endpoints);
                return -EINVAL;
        }
        if (!c->group || c->group[0] == '\0' || strlen(c->group) > CENTRAL_GROUP_MAX) {
                errorf(err, err_size, "[central] key_group must be 1 to %d bytes", CENTRAL_GROUP_MAX);
                return -EINVAL;
        }

        cc = calloc(1, sizeof(*cc));
        if (!cc) {
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        cc->bare = calloc(CENTRAL_KEYS_MAX, sizeof(*cc->bare));
        if (!cc->bare) {
                free(cc);
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        r = tls_context_new(c->ca_file, c->cert_file, c->key_file, c->key, &cc->tls, err, err_size);
        if (r < 0) {
                free(cc->bare);
                free(cc);
                return r;
        }
        r = pthread_mutex_init(&cc->lock, NULL);
        if (r != 0) {
                tls_context_free(cc->tls);
                free(cc->bare);
                free(cc);
                errorf(err, err_size, "pthread_mutex_init: %s", strerror(r));
                return -r;
        }

        snprintf(cc->cert_file, sizeof(cc->cert_file), "%s", c->cert_file ? c->cert_file : "(none)");
        snprintf(cc->group, sizeof(cc->group), "%s", c->group);
        cc->timeout_usec = c->timeout_usec > 0 ? c->timeout_usec : DEFAULT_TIMEOUT_USEC;
        cc->backoff_cap_usec = c->backoff_cap_usec > BACKOFF_CAP_MIN_USEC ? c->backoff_cap_usec
                                                                          : BACKOFF_CAP_MIN_USEC;
        cc->n_endpoints = c->n_endpoints;
        for (size_t i = 0; i < c->n_endpoints; i++) {
                const struct central_endpoint *e = &c->endpoints[i];

                cc->endpoints[i] = *e;
                /* IPv6 literals in brackets, as in the config file */
                snprintf(cc->health[i].name, sizeof(cc->health[i].name),
                         strchr(e->host, ':') ? "[%s]:%u" : "%s:%u", e->host, (unsigned) e->port);
        }

        *ret = cc;
        return 0;
}

void central_client_free(struct central_client *cc) {
        if (!cc)
                return;
        for (size_t i = 0; i < CENTRAL_ENDPOINTS_MAX; i++)
                tls_session_free(cc->ep[i].resume);
        tls_context_free(cc->tls);
        pthread_mutex_destroy(&cc->lock);
        free(cc->bare);
        free(cc);
}

void central_keys_free(struct central_key *keys, size_t n) {
        if (!keys)
                return;
        for (size_t i = 0; i < n; i++)
                OPENSSL_secure_clear_free(keys[i].kek, AES256_KEY_SIZE);
        free(keys);
}

size_t central_client_health(struct central_client *cc, struct central_endpoint_health *ret, size_t max) {
        pthread_mutex_lock(&cc->lock);
        for (size_t i = 0; i < cc->n_endpoints && i < max; i++)
                ret[i] = cc->health[i];
        pthread_mutex_unlock(&cc->lock);
        return cc->n_endpoints;
}

static int kmip_failure(const struct session *s, const char *op, int r, const struct kmip_error *ke,
                        char *err, size_t err_size) {
        if (r == -EREMOTEIO && ke->result_status == KMIP_STATUS_OPERATION_FAILED &&
            ke->result_reason == KMIP_REASON_AUTHENTICATION_NOT_SUCCESSFUL)
                /* PyKMIP answers so, after the handshake, to a client
                 * certificate without the clientAuth extended key usage. */
                errorf(err, err_size, "%s: %s failed: %s%s%s (the server did not accept our client "
                       "certificate %.200s: it needs extendedKeyUsage clientAuth and a CN the KMS knows)",
                       s->peer, op, kmip_result_reason_to_string(ke->result_reason),
                       ke->message[0] ? ": " : "", ke->message, s->cc->cert_file);
        else if (r == -EREMOTEIO && ke->result_status == KMIP_STATUS_OPERATION_FAILED)
                errorf(err, err_size, "%s: %s failed: %s%s%s", s->peer, op,
                       kmip_result_reason_to_string(ke->result_reason),
                       ke->message[0] ? ": " : "", ke->message);
        else if (r == -EREMOTEIO)
                /* Pending (2) or Undone (3): we never ask for asynchronous
                 * operations or batches, so neither is an answer we can use. */
                errorf(err, err_size, "%s: %s: unexpected Result Status %d", s->peer, op,
                       (int) ke->result_status);
        else if (r == -EBADMSG)
                errorf(err, err_size, "%s: %s: malformed or unexpected response", s->peer, op);
        else
                errorf(err, err_size, "%s: %s: %s", s->peer, op, strerror(-r));
        return r;
}

/* Send one request and read one response (header, then the length it
 * announces, bounded by KMIP_MESSAGE_MAX in kmip_message_length), both
 * within one timeout. A response that holds key material (secret) is read
 * into the secure heap, bounded by SECRET_RESPONSE_MAX, and freed by the
 * caller with response_free(); on failure a partial one is wiped here. */
#define SECRET_RESPONSE_MAX (64u * 1024)    /* NEW_PER_MESSAGE GetAttributes and Get answers */

static void response_free(uint8_t *buf, size_t len, bool secret) {
        if (secret)
                OPENSSL_secure_clear_free(buf, len);
        else
                free(buf);
}

static int exchange(const struct session *s, const char *op, bool secret, const uint8_t *req,
                    size_t req_len, uint8_t **ret, size_t *ret_len, char *err, size_t err_size) {
        uint64_t deadline = now_usec(CLOCK_MONOTONIC) + s->cc->timeout_usec;
        uint8_t hdr[KMIP_HEADER_SIZE];
        uint8_t *buf;
        char e[256];
        int len, r;

        pthread_mutex_lock(&s->cc->lock);
        s->health->messages++;
        pthread_mutex_unlock(&s->cc->lock);
        r = tls_write(s->conn, req, req_len, deadline, e, sizeof(e));
        if (r < 0)
                goto fail;
        r = tls_read(s->conn, hdr, sizeof(hdr), deadline, e, sizeof(e));
        if (r < 0)
                goto fail;
        len = kmip_message_length(hdr);
        if (len < KMIP_HEADER_SIZE || (secret && (size_t) len > SECRET_RESPONSE_MAX)) {
                errorf(err, err_size, "%s: %s: the response is not a KMIP message "
                       "(or longer than %u bytes)", s->peer, op, secret ? SECRET_RESPONSE_MAX : KMIP_MESSAGE_MAX);
                return -EBADMSG;
        }

        buf = secret ? OPENSSL_secure_malloc((size_t) len) : malloc((size_t) len);
        if (!buf) {
                errorf(err, err_size, "%s: %s: out of memory%s", s->peer, op,
                       secret ? " (secure heap)" : "");
                return -ENOMEM;
        }
        memcpy(buf, hdr, sizeof(hdr));
        r = tls_read(s->conn, buf + sizeof(hdr), (size_t) len - sizeof(hdr), deadline, e, sizeof(e));
        if (r < 0) {
                if (secret)
                        OPENSSL_secure_clear_free(buf, (size_t) len);
                else
                        erase_and_free(buf, (size_t) len);
                goto fail;
        }

        *ret = buf;
        *ret_len = (size_t) len;
        return 0;
fail:
        errorf(err, err_size, "%s (%s)", e, op);
        return r;
}

/* KMIP 1.2 if the server speaks it (the version kmip.c knows best), else
 * the highest 1.x it offers: 1.x messages for our four operations are
 * compatible. 2.0 changed the attribute encoding: not ours. */
static int choose_version(const struct session *s, const struct kmip_version *v, size_t n,
                          struct kmip_version *ret, char *err, size_t err_size) {
        int best = -1;
        size_t off = 0;
        char offered[128] = "";

        for (size_t i = 0; i < n; i++)
                if (v[i].major == 1 && v[i].minor == 2) {
                        *ret = v[i];
                        return 0;
                }
        for (size_t i = 0; i < n; i++)
                if (v[i].major == 1 && v[i].minor > best) {
                        best = v[i].minor;
                        *ret = v[i];
                }
        if (best >= 0)
                return 0;

        for (size_t i = 0; i < n && off < sizeof(offered); i++) {
                int w = snprintf(offered + off, sizeof(offered) - off, "%s%d.%d", i ? ", " : "",
                                 (int) v[i].major, (int) v[i].minor);
                if (w < 0)
                        break;
                off += (size_t) w;
        }
        errorf(err, err_size, "%s: the server offers no KMIP 1.x protocol version (offered: %s)",
               s->peer, n ? offered : "none");
        return -EPROTONOSUPPORT;
}

/* ret_time (may be NULL): the server's Time Stamp, 0 when it sent none. */
static int discover_versions(struct session *s, int64_t *ret_time, char *err, size_t err_size) {
        _cleanup_free_ uint8_t *req = NULL, *resp = NULL;
        struct kmip_version v[VERSIONS_MAX];
        struct kmip_error ke = {};
        size_t req_len, resp_len, n = 0;
        int r;

        r = kmip_request_discover_versions(&req, &req_len);
        if (r < 0)
                return kmip_failure(s, "DiscoverVersions", r, &ke, err, err_size);
        r = exchange(s, "DiscoverVersions", false, req, req_len, &resp, &resp_len, err, err_size);
        if (r < 0)
                return r;
        r = kmip_response_discover_versions(resp, resp_len, v, VERSIONS_MAX, &n, &ke);
        if (r < 0)
                return kmip_failure(s, "DiscoverVersions", r, &ke, err, err_size);
        if (ret_time && kmip_response_time_stamp(resp, resp_len, ret_time) < 0)
                *ret_time = 0;
        return choose_version(s, v, n, &s->version, err, err_size);
}

/* A server that answers a batch of several items with one failed item for
 * none of them (kmip_response_batch: -EREMOTEIO) and one of these reasons
 * does not take batches: it gets one operation per message from then on.
 * Any other reason (Authentication Not Successful, Permission Denied, ...)
 * is its answer to us, not to the batch. */
static bool refuses_batches(const struct kmip_error *ke) {
        return ke->result_status == KMIP_STATUS_OPERATION_FAILED &&
               (ke->result_reason == 0 || ke->result_reason == KMIP_REASON_INVALID_MESSAGE ||
                ke->result_reason == KMIP_REASON_OPERATION_NOT_SUPPORTED ||
                ke->result_reason == KMIP_REASON_FEATURE_NOT_SUPPORTED);
}

/* The answers to n operations: one response buffer when they went as one
 * batch, one per operation otherwise; res[k] describes bytes in them. */
struct batch {
        const struct kmip_batch_op *ops;
        size_t n;
        bool secret;                    /* answers hold key material (Get) */
        struct kmip_batch_result *res;
        uint8_t **bufs;
        size_t *lens;
        size_t n_bufs;
};

static void batch_done(struct batch *b) {
        for (size_t k = 0; k < b->n_bufs; k++)
                response_free(b->bufs[k], b->lens[k], b->secret);
        free(b->bufs);
        free(b->lens);
        free(b->res);
        *b = (struct batch) {};
}

static const char *op_name(int32_t op) {
        switch (op) {
        case KMIP_OP_LOCATE:
                return "Locate";
        case KMIP_OP_GET:
                return "Get";
        case KMIP_OP_GET_ATTRIBUTES:
                return "GetAttributes";
        default:
                return "DiscoverVersions";
        }
}

/* Send ops[0..n-1] as one message and parse its answer into res. */
static int send_message(struct session *s, const char *what, const struct kmip_batch_op *ops, size_t n,
                        bool secret, uint8_t **buf, size_t *len, struct kmip_batch_result *res,
                        struct kmip_error *ke, char *err, size_t err_size) {
        _cleanup_free_ uint8_t *req = NULL;
        size_t req_len;
        int r;

        r = kmip_request_batch(&s->version, ops, n, &req, &req_len);
        if (r < 0)
                return kmip_failure(s, what, r, ke, err, err_size);
        r = exchange(s, what, secret, req, req_len, buf, len, err, err_size);
        if (r < 0)
                return r;
        return kmip_response_batch(*buf, *len, ops, n, res, ke);
}

/* Run b->ops: one message for all of them, or one per operation for a
 * server that refuses batches (learnt here once, kept for the endpoint).
 * Returns 0 with each item's answer in b->res (failed items included), or
 * a negative errno with err filled. */
static int run_batch(struct session *s, const char *what, struct batch *b, char *err, size_t err_size) {
        struct kmip_error ke = {};
        bool refused = false;
        int r;

        b->res = calloc(b->n, sizeof(*b->res));
        b->bufs = calloc(b->n, sizeof(*b->bufs));
        b->lens = calloc(b->n, sizeof(*b->lens));
        if (!b->res || !b->bufs || !b->lens) {
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        if (atomic_load(&s->cc->cancelled)) {
                errorf(err, err_size, "%s: fetch cancelled (stopping)", s->peer);
                return -ECANCELED;
        }
        if (b->n > 1 && !s->ep->no_batch) {
                r = send_message(s, what, b->ops, b->n, b->secret, &b->bufs[0], &b->lens[0], b->res,
                                 &ke, err, err_size);
                if (b->bufs[0])
                        b->n_bufs = 1;
                if (r == -EREMOTEIO && refuses_batches(&ke)) {
                        log_debug("central: %s: batch of %zu refused (%s): one operation per message",
                                  s->peer, b->n, kmip_result_reason_to_string(ke.result_reason));
                        refused = true;
                        response_free(b->bufs[0], b->lens[0], b->secret);
                        b->bufs[0] = NULL;
                        b->n_bufs = 0;
                } else if (r < 0)
                        return r == -EREMOTEIO || r == -EBADMSG ? kmip_failure(s, what, r, &ke, err, err_size) : r;
                else
                        return 0;
        }

        for (size_t k = 0; k < b->n; k++) {
                const char *op = op_name(b->ops[k].operation);

                /* Between requests: a stopping daemon waits for at most
                 * one request's timeout, not for the whole group. */
                if (atomic_load(&s->cc->cancelled)) {
                        errorf(err, err_size, "%s: fetch cancelled (stopping)", s->peer);
                        return -ECANCELED;
                }
                r = send_message(s, op, &b->ops[k], 1, b->secret, &b->bufs[b->n_bufs], &b->lens[b->n_bufs],
                                 &b->res[k], &ke, err, err_size);
                if (b->bufs[b->n_bufs])
                        b->n_bufs++;
                if (r < 0)
                        return r == -EREMOTEIO || r == -EBADMSG ? kmip_failure(s, op, r, &ke, err, err_size) : r;
                if (refused) {
                        s->ep->no_batch = true;   /* it answers single operations */
                        refused = false;
                }
        }
        return 0;
}

/* An item's failure: Item Not Found is 1 (the object is gone), anything else
 * fails the fetch (nothing is purged on a partial answer). */
static int item_failure(const struct session *s, const char *uid, const struct kmip_batch_op *op,
                        const struct kmip_batch_result *res, char *err, size_t err_size) {
        char what[KMIP_ID_MAX + 32];

        snprintf(what, sizeof(what), "%s of %.*s", op_name(op->operation), KMIP_ID_MAX - 1, uid);
        if (!res->answered) {
                errorf(err, err_size, "%s: %s: not answered (the server stopped the batch)", s->peer, what);
                return -EBADMSG;
        }
        if (res->error.result_status == KMIP_STATUS_OPERATION_FAILED &&
            res->error.result_reason == KMIP_REASON_ITEM_NOT_FOUND)
                return 1;
        return kmip_failure(s, what, -EREMOTEIO, &res->error, err, err_size);
}

static bool item_ok(const struct kmip_batch_result *res) {
        return res->answered && res->error.result_status == KMIP_STATUS_SUCCESS;
}

/* A KEK version is a symmetric AES-256 key. Cryptographic Algorithm and
 * Length are required attributes of a symmetric key (KMIP 1.2, 3.4 and 3.5):
 * a key that does not show them is not taken for one. Anything else in the
 * group is reported without material (the caller decides what to do with
 * it), rather than failing the Get and with it the whole fetch. */
static int key_from_attributes(const struct session *s, const struct kmip_key_attributes *a,
                               struct central_key *ret, char *err, size_t err_size) {
        if (state_from_kmip(a->state, &ret->state) < 0) {
                errorf(err, err_size, "%s: GetAttributes of %s: %s State (%d)", s->peer, a->uid,
                       a->state == 0 ? "no" : "unknown", (int) a->state);
                return -EBADMSG;
        }
        snprintf(ret->uid, sizeof(ret->uid), "%s", a->uid);
        ret->created_usec = a->initial_date > 0 ? (uint64_t) a->initial_date * USEC_PER_SEC : 0;
        ret->is_aes256 = (a->object_type == 0 || a->object_type == KMIP_OBJECT_SYMMETRIC_KEY) &&
                         a->algorithm == KMIP_ALGORITHM_AES && a->length == AES256_KEY_SIZE * 8;
        snprintf(ret->kind, sizeof(ret->kind), "object type %d, algorithm %d, %d bits",
                 (int) a->object_type, (int) a->algorithm, (int) a->length);
        return 0;
}

/* The answer to GetAttributes of uid as a key (without material). Returns
 * 0, 1 if the object is gone (Item Not Found), or a negative errno. */
static int key_from_result(const struct session *s, const char *uid, const struct kmip_batch_op *op,
                           const struct kmip_batch_result *res, struct central_key *ret,
                           char *err, size_t err_size) {
        struct kmip_key_attributes attr;
        int r;

        if (!item_ok(res))
                return item_failure(s, uid, op, res, err, err_size);
        r = kmip_result_get_attributes(res, &attr);
        if (r < 0)
                return kmip_failure(s, "GetAttributes", r, NULL, err, err_size);
        if (strcmp(attr.uid, uid) != 0) {
                errorf(err, err_size, "%s: GetAttributes of %s answered for %s", s->peer, uid, attr.uid);
                return -EBADMSG;
        }
        return key_from_attributes(s, &attr, ret, err, err_size);
}

/* The material of a new version from its Get answer, into the secure heap. */
static int key_material(const struct session *s, const char *uid, const struct kmip_batch_op *op,
                        const struct kmip_batch_result *res, struct central_key *key,
                        char *err, size_t err_size) {
        char got[KMIP_ID_MAX] = "";
        int r;

        if (!item_ok(res))
                return item_failure(s, uid, op, res, err, err_size);
        key->kek = OPENSSL_secure_malloc(AES256_KEY_SIZE);
        if (!key->kek) {
                errorf(err, err_size, "out of locked memory for key material");
                return -ENOMEM;
        }
        r = kmip_result_get_symmetric_key(res, got, key->kek);
        if (r < 0)
                return kmip_failure(s, "Get", r, NULL, err, err_size);
        if (got[0] != '\0' && strcmp(got, uid) != 0) {
                errorf(err, err_size, "%s: Get of %s answered for %s", s->peer, uid, got);
                return -EBADMSG;
        }
        return 0;
}

static ssize_t find_uid(const char (*uids)[CENTRAL_ID_MAX], size_t n, const char *uid) {
        for (size_t k = 0; k < n; k++)
                if (strcmp(uids[k], uid) == 0)
                        return (ssize_t) k;
        return -1;
}

/* New versions, NEW_PER_MESSAGE at a time: GetAttributes and Get of each in
 * one batch (a Get for a version that turns out to have no material, or not
 * to be an AES-256 key, fails or is ignored). Appends to keys[*n]. */
static int fetch_new(struct session *s, char (*uids)[KMIP_ID_MAX], size_t n_uids,
                     struct central_key *keys, size_t *n, char *err, size_t err_size) {
        struct kmip_batch_op ops[2 * NEW_PER_MESSAGE];
        int r = 0;

        for (size_t start = 0; start < n_uids; start += NEW_PER_MESSAGE) {
                size_t m = n_uids - start < NEW_PER_MESSAGE ? n_uids - start : NEW_PER_MESSAGE;
                struct batch b = { .ops = ops, .n = 2 * m, .secret = true };

                for (size_t k = 0; k < m; k++) {
                        ops[2 * k] = (struct kmip_batch_op) { .operation = KMIP_OP_GET_ATTRIBUTES, .arg = uids[start + k] };
                        ops[2 * k + 1] = (struct kmip_batch_op) { .operation = KMIP_OP_GET, .arg = uids[start + k] };
                }
                r = run_batch(s, "GetAttributes and Get", &b, err, err_size);
                for (size_t k = 0; r >= 0 && k < m; k++) {
                        struct central_key *key = &keys[*n];
                        const char *uid = uids[start + k];

                        r = key_from_result(s, uid, &ops[2 * k], &b.res[2 * k], key, err, err_size);
                        if (r == 0 && central_state_has_material(key->state) && key->is_aes256)
                                r = key_material(s, uid, &ops[2 * k + 1], &b.res[2 * k + 1], key, err, err_size);
                        if (r > 0) {
                                /* Destroyed between Locate and GetAttributes: gone. */
                                log_debug("central: %s: %s vanished after Locate", s->peer, uid);
                                OPENSSL_secure_clear_free(key->kek, AES256_KEY_SIZE);
                                *key = (struct central_key) {};
                                r = 0;
                                continue;
                        }
                        if (r >= 0)
                                (*n)++;
                }
                batch_done(&b);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* The whole fetch over one connection to endpoint i: DiscoverVersions when
 * the endpoint's version is not known yet; one message with Locate and a
 * GetAttributes of every held uid (what can change: State, dates; their
 * material is not fetched again); one more per NEW_PER_MESSAGE versions new
 * to the caller, with their GetAttributes and Get. */
static int fetch_from(struct central_client *cc, size_t i, const char (*held)[CENTRAL_ID_MAX], size_t n_held,
                      struct central_key **ret, size_t *ret_n, char *err, size_t err_size) {
        _cleanup_(tls_conn_freep) struct tls_conn *conn = NULL;
        _cleanup_free_ char (*uids)[KMIP_ID_MAX] = NULL;
        _cleanup_free_ struct kmip_batch_op *ops = NULL;
        _cleanup_free_ bool *located = NULL;
        _cleanup_free_ const char **checked = NULL;
        struct central_key *keys = NULL;
        struct endpoint_state *ep = &cc->ep[i];
        struct session s = { .cc = cc, .ep = ep, .health = &cc->health[i], .peer = cc->health[i].name };
        struct batch b = {};
        size_t n_uids = 0, n = 0, n_new = 0, n_checked;
        int r;

        r = tls_connect_resume(cc->tls, cc->endpoints[i].host, cc->endpoints[i].port, cc->timeout_usec,
                               &ep->resume, NULL, &conn, err, err_size);
        if (r < 0)
                return r;
        s.conn = conn;
        if (tls_conn_resumed(conn)) {
                pthread_mutex_lock(&cc->lock);
                cc->health[i].resumed++;
                pthread_mutex_unlock(&cc->lock);
        }

        if (!ep->version_known) {
                r = discover_versions(&s, NULL, err, err_size);
                if (r < 0)
                        return r;
                ep->version = s.version;
                ep->version_known = true;
                log_debug("central: %s: %s %s, KMIP %d.%d", s.peer, tls_conn_version(conn),
                          tls_conn_cipher(conn), (int) s.version.major, (int) s.version.minor);
        }
        s.version = ep->version;

        /* Checked in the first message: the versions held, and those the
         * last fetch found without material (Compromised, Destroyed, not
         * AES-256 keys): neither needs a Get unless that changed. */
        n_checked = n_held;
        uids = calloc(KMIP_LOCATE_MAX, sizeof(*uids));
        checked = calloc(n_held + cc->n_bare + 1, sizeof(*checked));
        ops = calloc(n_held + cc->n_bare + 1, sizeof(*ops));
        located = calloc(n_held + cc->n_bare + 1, sizeof(*located));
        if (!uids || !checked || !ops || !located) {
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        for (size_t k = 0; k < n_held; k++)
                checked[k] = held[k];
        for (size_t k = 0; k < cc->n_bare; k++)
                if (find_uid(held, n_held, cc->bare[k]) < 0)
                        checked[n_checked++] = cc->bare[k];
        /* State 0: every state, so that Compromised and Destroyed versions
         * are seen (and purged) rather than silently missing. */
        ops[0] = (struct kmip_batch_op) { .operation = KMIP_OP_LOCATE, .arg = cc->group };
        for (size_t k = 0; k < n_checked; k++)
                ops[k + 1] = (struct kmip_batch_op) { .operation = KMIP_OP_GET_ATTRIBUTES, .arg = checked[k] };
        b = (struct batch) { .ops = ops, .n = n_checked + 1 };
        r = run_batch(&s, n_checked > 0 ? "Locate and GetAttributes" : "Locate", &b, err, err_size);
        if (r < 0)
                goto fail;
        if (!item_ok(&b.res[0])) {
                r = item_failure(&s, cc->group, &ops[0], &b.res[0], err, err_size);
                if (r > 0)
                        r = kmip_failure(&s, "Locate", -EREMOTEIO, &b.res[0].error, err, err_size);
                goto fail;
        }
        r = kmip_result_locate(&b.res[0], uids, KMIP_LOCATE_MAX, &n_uids);
        if (r == -ENOBUFS) {
                errorf(err, err_size, "%s: Locate: more than %d objects in group %s; "
                       "destroy versions no longer needed", s.peer, KMIP_LOCATE_MAX, cc->group);
                r = -E2BIG;
                goto fail;
        }
        if (r < 0) {
                r = kmip_failure(&s, "Locate", r, NULL, err, err_size);
                goto fail;
        }

        keys = calloc(n_uids > 0 ? n_uids : 1, sizeof(*keys));
        if (!keys) {
                errorf(err, err_size, "out of memory");
                r = -ENOMEM;
                goto fail;
        }
        /* Checked and located: what the GetAttributes said; the others
         * (and a checked one that now has material to fetch) are moved to
         * the front of uids for fetch_new. */
        for (size_t k = 0; k < n_uids; k++) {
                ssize_t h = -1;
                struct central_key *key = &keys[n];

                for (size_t j = 0; j < n_checked && h < 0; j++)
                        if (strcmp(checked[j], uids[k]) == 0)
                                h = (ssize_t) j;
                if (h >= 0) {
                        located[h] = true;
                        r = key_from_result(&s, uids[k], &ops[h + 1], &b.res[h + 1], key, err, err_size);
                        if (r < 0)
                                goto fail;
                        if (r > 0) {
                                log_debug("central: %s: %s vanished after Locate", s.peer, uids[k]);
                                *key = (struct central_key) {};
                                continue;
                        }
                        if (!central_state_has_material(key->state) || !key->is_aes256) {
                                n++;            /* nothing to fetch */
                                continue;
                        }
                        if ((size_t) h < n_held) {
                                key->material_held = true;
                                n++;
                                continue;
                        }
                        *key = (struct central_key) {};
                }
                if (n_new != k)
                        memcpy(uids[n_new], uids[k], sizeof(uids[k]));
                n_new++;
        }
        /* Checked but no longer located: the caller finds them missing. Their
         * GetAttributes may say Item Not Found or answer (moved out of the
         * group); any other failure is a partial answer and fails. */
        for (size_t k = 0; k < n_checked; k++)
                if (!located[k] && !item_ok(&b.res[k + 1])) {
                        r = item_failure(&s, checked[k], &ops[k + 1], &b.res[k + 1], err, err_size);
                        if (r < 0)
                                goto fail;
                }
        batch_done(&b);

        r = fetch_new(&s, uids, n_new, keys, &n, err, err_size);
        if (r < 0)
                goto fail;

        /* For the next fetch: the versions without material, to check. */
        cc->n_bare = 0;
        for (size_t k = 0; k < n; k++)
                if (!keys[k].kek && !keys[k].material_held)
                        snprintf(cc->bare[cc->n_bare++], CENTRAL_ID_MAX, "%s", keys[k].uid);

        tls_conn_save_session(conn, &ep->resume);
        *ret = keys;
        *ret_n = n;
        return 0;
fail:
        batch_done(&b);
        central_keys_free(keys, n_uids);
        return r;
}

static uint64_t backoff_usec(const struct central_client *cc, unsigned failures) {
        uint64_t window = BACKOFF_BASE_USEC, rnd = 0, delay;

        for (unsigned k = 1; k < failures && window < cc->backoff_cap_usec; k++)
                window *= 2;
        if (window > cc->backoff_cap_usec)
                window = cc->backoff_cap_usec;
        /* Jitter needs no cryptographic quality; if getrandom fails the
         * floor alone still spaces the attempts. */
        if (getrandom(&rnd, sizeof(rnd), GRND_NONBLOCK) != (ssize_t) sizeof(rnd))
                rnd = 0;
        delay = BACKOFF_BASE_USEC + rnd % (window + 1);
        return delay < cc->backoff_cap_usec ? delay : cc->backoff_cap_usec;
}

/* Record the outcome of one attempt at endpoint i. A failure the server
 * itself answered (-EREMOTEIO: Permission Denied, ...) counts as a failure
 * (the endpoint is failing us) but puts it in no backoff: it is up and
 * speaking KMIP, and retrying it is cheap and will show when it is fixed. */
static void record_attempt(struct central_client *cc, size_t i, int r, uint64_t start_usec, const char *err) {
        struct central_endpoint_health *h = &cc->health[i];
        uint64_t now = now_usec(CLOCK_MONOTONIC), real = now_usec(CLOCK_REALTIME);
        size_t l;

        pthread_mutex_lock(&cc->lock);
        h->requests++;
        if (r >= 0) {
                h->last_success_usec = real;
                h->last_latency_usec = now - start_usec;
                h->consecutive_failures = 0;
                h->next_attempt_usec = 0;
                h->last_error[0] = '\0';
        } else {
                h->failures++;
                h->last_failure_usec = real;
                h->consecutive_failures++;
                h->next_attempt_usec = r == -EREMOTEIO ? 0 : now + backoff_usec(cc, h->consecutive_failures);
                /* The entry is named already: drop "host:port: " from err. */
                l = strlen(h->name);
                if (strncmp(err, h->name, l) == 0 && err[l] == ':' && err[l + 1] == ' ')
                        err += l + 2;
                snprintf(h->last_error, sizeof(h->last_error), "%s", err);
        }
        pthread_mutex_unlock(&cc->lock);
}

void central_client_cancel(struct central_client *cc) {
        atomic_store(&cc->cancelled, true);
}

int central_fetch(struct central_client *cc, const char (*held)[CENTRAL_ID_MAX], size_t n_held,
                  struct central_key **ret, size_t *ret_n, char *err, size_t err_size) {
        size_t order[CENTRAL_ENDPOINTS_MAX], n_order = 0, n_tried = 0, off = 0;
        char all[1024] = "", e[512] = "";
        uint64_t now = now_usec(CLOCK_MONOTONIC);
        int r = -EHOSTUNREACH;

        *ret = NULL;
        *ret_n = 0;
        if (n_held > CENTRAL_KEYS_MAX || (n_held > 0 && !held)) {
                errorf(err, err_size, "central_fetch: %zu held versions (at most %d)", n_held, CENTRAL_KEYS_MAX);
                return -EINVAL;
        }

        /* Endpoints out of backoff first, in the configured order; those in
         * backoff only when none of the others answered (or all are in
         * backoff): a KMS that is down should cost no time while another
         * works, but never make a fetch fail that one could have served. */
        pthread_mutex_lock(&cc->lock);
        for (size_t i = 0; i < cc->n_endpoints; i++)
                if (cc->health[i].next_attempt_usec <= now)
                        order[n_order++] = i;
        for (size_t i = 0; i < cc->n_endpoints; i++)
                if (cc->health[i].next_attempt_usec > now)
                        order[n_order++] = i;
        pthread_mutex_unlock(&cc->lock);

        for (size_t k = 0; k < n_order && !atomic_load(&cc->cancelled); k++) {
                size_t i = order[k];
                uint64_t start = now_usec(CLOCK_MONOTONIC);
                int w;

                e[0] = '\0';
                r = fetch_from(cc, i, held, n_held, ret, ret_n, e, sizeof(e));
                if (r < 0 && r != -EREMOTEIO) {
                        /* Not the server's answer: the next connection
                         * starts afresh, with a full handshake and
                         * DiscoverVersions. */
                        cc->ep[i].version_known = false;
                        tls_session_free(cc->ep[i].resume);
                        cc->ep[i].resume = NULL;
                }
                record_attempt(cc, i, r, start, e);
                n_tried++;
                if (r >= 0)
                        return 0;
                if (r == -EREMOTEIO) {
                        /* A well-formed refusal (Permission Denied, ...):
                         * the other endpoints serve the same data and
                         * would answer the same. Report it as it is. */
                        errorf(err, err_size, "%s", e);
                        return r;
                }
                log_debug("central: %s", e);
                if (off < sizeof(all)) {
                        w = snprintf(all + off, sizeof(all) - off, "%s%s", off ? "; " : "", e);
                        if (w > 0)
                                off += (size_t) w;
                }
        }

        if (n_tried > 1)
                errorf(err, err_size, "all %zu central endpoints failed: %s", n_tried, all);
        else
                errorf(err, err_size, "%s", all);
        return r;
}

const char *central_probe_step_to_string(enum central_probe_step s) {
        static const char *const names[] = {
                [CENTRAL_PROBE_SETUP] = "setup",
                [CENTRAL_PROBE_RESOLVE] = "resolve",
                [CENTRAL_PROBE_CONNECT] = "connect",
                [CENTRAL_PROBE_HANDSHAKE] = "handshake",
                [CENTRAL_PROBE_REQUEST] = "request",
                [CENTRAL_PROBE_DONE] = "done",
        };
        return (unsigned) s < ARRAY_SIZE(names) ? names[s] : "unknown";
}

int central_probe(const struct central_options *opt, size_t i, struct central_probe_result *ret,
                  char *err, size_t err_size) {
        _cleanup_(central_client_freep) struct central_client *cc = NULL;
        _cleanup_(tls_conn_freep) struct tls_conn *conn = NULL;
        struct session s = {};
        int64_t stamp = 0;
        uint64_t start;
        int r;

        *ret = (struct central_probe_result) { .failed = CENTRAL_PROBE_SETUP };
        if (i >= opt->n_endpoints) {
                errorf(err, err_size, "no endpoint %zu", i);
                return -EINVAL;
        }
        r = central_client_new(opt, &cc, err, err_size);
        if (r < 0)
                return r;
        s = (struct session) { .cc = cc, .ep = &cc->ep[i], .health = &cc->health[i], .peer = cc->health[i].name };
        r = tls_connect(cc->tls, cc->endpoints[i].host, cc->endpoints[i].port, cc->timeout_usec,
                        ret, &conn, err, err_size);
        if (r < 0)
                return r;
        s.conn = conn;

        start = now_usec(CLOCK_MONOTONIC);
        r = discover_versions(&s, &stamp, err, err_size);
        ret->request_usec = now_usec(CLOCK_MONOTONIC) - start;
        ret->local_time_usec = now_usec(CLOCK_REALTIME) - ret->request_usec / 2;
        if (r < 0)
                return r;
        ret->server_time_usec = stamp > 0 ? (uint64_t) stamp * USEC_PER_SEC : 0;
        snprintf(ret->protocol, sizeof(ret->protocol), "%s, protocol %d.%d", tls_conn_version(conn),
                 (int) s.version.major, (int) s.version.minor);
        ret->failed = CENTRAL_PROBE_DONE;
        return 0;
}
