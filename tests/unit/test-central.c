/* agent/kmip/client.c and agent/kmip/tls.c against real servers on 127.0.0.1: PyKMIP
 * (the central KMS), openssl s_server variants and a TCP listener that never
 * speaks. Run by tests/unit/central-harness.py, which starts them, seeds the
 * keys with PyKMIP's own client and passes ports and paths in CENTRAL_*. */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kmip.h"
#include "config.h"
#include "tls.h"
#include "macro.h"
#include "util.h"

#define SEC UINT64_C(1000000)
#define N_SEEDED 4

struct expected_key {
        char uid[CENTRAL_ID_MAX];
        int state;
        bool has_material;
        uint8_t kek[AES256_KEY_SIZE];
};

static struct expected_key expected[N_SEEDED];

/* KMIP 1.2 section 9.1.3.2.17 State, as the harness seeds it, in kmip.h's terms. */
static enum central_state central_state_of_kmip(int state) {
        switch (state) {
        case 1:
                return CENTRAL_STATE_PRE_ACTIVE;
        case 2:
                return CENTRAL_STATE_ACTIVE;
        case 3:
                return CENTRAL_STATE_DEACTIVATED;
        case 4:
        case 6:
                return CENTRAL_STATE_COMPROMISED;
        case 5:
                return CENTRAL_STATE_DESTROYED;
        default:
                fail_msg("unknown KMIP state %d", state);
                return _CENTRAL_STATE_MAX;
        }
}

static const char *env(const char *name) {
        const char *v = getenv(name);

        if (!v || !*v)
                fail_msg("%s is not set: run this test through tests/unit/central-harness.py", name);
        return v;
}

static int hexval(char c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        return -1;
}

/* CENTRAL_KEYS: "uid:state:hex,..." ("-" for no material). */
static int setup(void **state) {
        const char *p = getenv("CENTRAL_KEYS");
        size_t n = 0;

        if (!p) {
                fprintf(stderr, "CENTRAL_KEYS is not set: run this test through "
                        "tests/unit/central-harness.py\n");
                return -1;
        }
        while (*p && n < N_SEEDED) {
                struct expected_key *k = &expected[n++];
                const char *colon = strchr(p, ':'), *hex;
                size_t l;

                if (!colon || (size_t) (colon - p) >= sizeof(k->uid))
                        return -1;
                l = (size_t) (colon - p);
                memcpy(k->uid, p, l);
                k->uid[l] = '\0';
                k->state = atoi(colon + 1);
                hex = strchr(colon + 1, ':');
                if (!hex)
                        return -1;
                hex++;
                if (*hex == '-') {
                        p = hex + 1;
                } else {
                        for (size_t i = 0; i < AES256_KEY_SIZE; i++) {
                                int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
                                if (hi < 0 || lo < 0)
                                        return -1;
                                k->kek[i] = (uint8_t) (hi << 4 | lo);
                        }
                        k->has_material = true;
                        p = hex + 2 * AES256_KEY_SIZE;
                }
                if (*p == ',')
                        p++;
        }
        return n == N_SEEDED ? 0 : -1;
}

static int teardown(void **state) {
        explicit_bzero(expected, sizeof(expected));
        return 0;
}

/* A [central] section with the harness's PKI: cert and key are file stems
 * in CENTRAL_CERTS. */
static void make_config(struct config *c, const char *ca, const char *cert, const char *key,
                        uint64_t timeout_usec) {
        const char *d = env("CENTRAL_CERTS");

        config_defaults(c);
        c->central_type = CENTRAL_KMIP;
        snprintf(c->ca_file, sizeof(c->ca_file), "%s/%s.crt", d, ca);
        snprintf(c->cert_file, sizeof(c->cert_file), "%s/%s.crt", d, cert);
        snprintf(c->key_file, sizeof(c->key_file), "%s/%s.key", d, key);
        snprintf(c->key_group, sizeof(c->key_group), "%s", env("CENTRAL_GROUP"));
        c->central_timeout_usec = timeout_usec;
        c->sync_interval_usec = 60 * SEC;
        c->n_endpoints = 0;
}

static void add_endpoint(struct config *c, const char *host, const char *port_env) {
        struct central_endpoint *e = &c->endpoints[c->n_endpoints++];

        snprintf(e->host, sizeof(e->host), "%s", host);
        e->port = (uint16_t) atoi(env(port_env));
}

/* central_client_new with the options tpmkmsd derives from c. */
static int client_new_from(const struct config *c, struct central_client **ret, char *err, size_t err_size) {
        struct central_options opt;

        config_central_options(c, &opt);
        return central_client_new(&opt, ret, err, err_size);
}

static struct central_client *client_new(const struct config *c) {
        struct central_client *cc = NULL;
        char err[512] = "";
        int r;

        r = client_new_from(c, &cc, err, sizeof(err));
        if (r < 0)
                fail_msg("central_client_new: %d %s", r, err);
        return cc;
}

/* Fetch expecting failure; returns r and leaves the message in err. */
static int fetch_fails(struct central_client *cc, char *err, size_t err_size) {
        struct central_key *keys = NULL;
        size_t n = 0;
        int r;

        r = central_fetch(cc, NULL, 0, &keys, &n, err, err_size);
        assert_true(r < 0);
        assert_null(keys);
        fprintf(stderr, "  -> %d: %s\n", r, err);
        return r;
}

static const struct central_key *find(const struct central_key *keys, size_t n, const char *uid) {
        for (size_t i = 0; i < n; i++)
                if (strcmp(keys[i].uid, uid) == 0)
                        return &keys[i];
        return NULL;
}

static void assert_seeded_keys(const struct central_key *keys, size_t n) {
        static const uint8_t zero[AES256_KEY_SIZE];
        const char *other = env("CENTRAL_OTHER_UID");

        assert_int_equal(n, N_SEEDED);
        assert_null(find(keys, n, other));
        for (size_t i = 0; i < N_SEEDED; i++) {
                const struct central_key *k = find(keys, n, expected[i].uid);

                assert_non_null(k);
                assert_int_equal(k->state, central_state_of_kmip(expected[i].state));
                /* object type 2 (Symmetric Key), algorithm 3 (AES), 256 bits */
                assert_true(k->is_aes256);
                assert_string_equal(k->kind, "object type 2, algorithm 3, 256 bits");
                assert_true(k->created_usec > 1700000000 * SEC);
                assert_int_equal(k->kek != NULL, expected[i].has_material);
                /* the 32 bytes PyKMIP's own client read back */
                assert_memory_equal(k->kek ? k->kek : zero, expected[i].has_material ? expected[i].kek : zero,
                                    AES256_KEY_SIZE);
        }
}

static void test_central_client_new_key_mode_refused(void **state) {
        struct central_client *cc = NULL;
        struct config c;
        char err[512] = "";

        make_config(&c, "ca", "client", "client-0644", 2 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        assert_int_equal(client_new_from(&c, &cc, err, sizeof(err)), -EPERM);
        assert_null(cc);
        fprintf(stderr, "  -> %s\n", err);
        assert_non_null(strstr(err, c.key_file));
        assert_non_null(strstr(err, "0644"));
}

static void test_central_client_new_key_not_regular(void **state) {
        struct central_client *cc = NULL;
        struct config c;
        char err[512] = "";

        make_config(&c, "ca", "client", "client", 2 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        snprintf(c.key_file, sizeof(c.key_file), "%s", env("CENTRAL_CERTS"));
        assert_int_equal(client_new_from(&c, &cc, err, sizeof(err)), -EINVAL);
        fprintf(stderr, "  -> %s\n", err);
        assert_non_null(strstr(err, "not a regular file"));

        snprintf(c.key_file, sizeof(c.key_file), "/dev/null");
        assert_int_equal(client_new_from(&c, &cc, err, sizeof(err)), -EINVAL);
        assert_non_null(strstr(err, "/dev/null is not a regular file"));
}

static void test_central_client_new_missing_files(void **state) {
        struct central_client *cc = NULL;
        struct config c;
        char err[512] = "";

        make_config(&c, "no-such-ca", "client", "client", 2 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        assert_int_equal(client_new_from(&c, &cc, err, sizeof(err)), -ENOENT);
        fprintf(stderr, "  -> %s\n", err);
        assert_non_null(strstr(err, c.ca_file));

        make_config(&c, "ca", "client", "no-such-key", 2 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        assert_int_equal(client_new_from(&c, &cc, err, sizeof(err)), -ENOENT);
        assert_non_null(strstr(err, c.key_file));

        /* a key that is not the certificate's */
        make_config(&c, "ca", "client", "client2", 2 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        assert_int_equal(client_new_from(&c, &cc, err, sizeof(err)), -EINVAL);
        fprintf(stderr, "  -> %s\n", err);
        assert_non_null(strstr(err, "does not match"));

        make_config(&c, "ca", "client", "client", 2 * SEC);
        assert_int_equal(client_new_from(&c, &cc, err, sizeof(err)), -EINVAL);
}

static void test_central_fetch_wrong_ca(void **state) {
        struct central_client *cc;
        struct config c;
        char err[512] = "";

        make_config(&c, "ca", "client", "client", 2 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_ROGUE_PORT");
        cc = client_new(&c);
        assert_int_equal(fetch_fails(cc, err, sizeof(err)), -EKEYREJECTED);
        assert_non_null(strstr(err, "server certificate verify failed: unable to get local issuer certificate"));
        central_client_free(cc);
}

static void test_central_fetch_hostname_mismatch(void **state) {
        struct central_client *cc;
        struct config c;
        char err[512] = "";

        /* a certificate for kms.other.example, from the right CA */
        make_config(&c, "ca", "client", "client", 2 * SEC);
        add_endpoint(&c, "localhost", "CENTRAL_OTHERNAME_PORT");
        cc = client_new(&c);
        assert_int_equal(fetch_fails(cc, err, sizeof(err)), -EKEYREJECTED);
        assert_non_null(strstr(err, "server certificate verify failed: hostname mismatch"));
        central_client_free(cc);

        /* an IP literal is checked against the IP SANs */
        make_config(&c, "ca", "client", "client", 2 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_OTHERNAME_PORT");
        cc = client_new(&c);
        assert_int_equal(fetch_fails(cc, err, sizeof(err)), -EKEYREJECTED);
        assert_non_null(strstr(err, "server certificate verify failed: IP address mismatch"));
        central_client_free(cc);
}

static void test_central_fetch_client_cert_rejected(void **state) {
        struct central_endpoint_health h[2];
        struct central_client *cc;
        struct config c;
        char err[512] = "";

        /* OpenSSL refuses a certificate without clientAuth in the handshake
         * (after it, in TLS 1.3): an alert, named as such. */
        make_config(&c, "ca", "noclientauth", "noclientauth", 2 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_STRICT_PORT");
        cc = client_new(&c);
        assert_int_equal(fetch_fails(cc, err, sizeof(err)), -EPROTO);
        assert_non_null(strstr(err, "the server rejected our client certificate"));
        assert_non_null(strstr(err, c.cert_file));
        central_client_free(cc);

        /* PyKMIP (Python's ssl) refuses it in the TLS 1.2 handshake */
        make_config(&c, "ca", "noclientauth", "noclientauth", 5 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        cc = client_new(&c);
        assert_int_equal(fetch_fails(cc, err, sizeof(err)), -EPROTO);
        assert_non_null(strstr(err, "TLS handshake: the server rejected our client certificate"));
        central_client_free(cc);

        /* Without any EKU TLS accepts it and PyKMIP refuses it in KMIP: a
         * well-formed answer, reported as it is, with what to check. */
        make_config(&c, "ca", "noeku", "noeku", 5 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        add_endpoint(&c, "127.0.0.1", "CENTRAL_DEAD_PORT");
        cc = client_new(&c);
        assert_int_equal(fetch_fails(cc, err, sizeof(err)), -EREMOTEIO);
        assert_non_null(strstr(err, "DiscoverVersions failed: Authentication Not Successful"));
        assert_non_null(strstr(err, "did not accept our client certificate"));
        /* no failover on a server's answer: the dead one is not tried */
        assert_int_equal(central_client_health(cc, h, 2), 2);
        assert_int_equal(h[0].requests, 1);
        assert_int_equal(h[0].failures, 1);
        assert_int_equal(h[0].consecutive_failures, 1);   /* failing us */
        assert_int_equal(h[0].next_attempt_usec, 0);         /* but no backoff */
        assert_int_equal(h[1].requests, 0);
        central_client_free(cc);
}

static void test_central_fetch_dead_port(void **state) {
        struct central_endpoint_health h[2];
        struct central_client *cc;
        struct config c;
        char err[512] = "";
        uint64_t t0;

        make_config(&c, "ca", "client", "client", 5 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_DEAD_PORT");
        cc = client_new(&c);
        t0 = now_usec(CLOCK_MONOTONIC);
        assert_int_equal(fetch_fails(cc, err, sizeof(err)), -ECONNREFUSED);
        assert_true(now_usec(CLOCK_MONOTONIC) - t0 < SEC);
        assert_non_null(strstr(err, "connect: Connection refused"));

        /* all in backoff: tried anyway */
        assert_int_equal(fetch_fails(cc, err, sizeof(err)), -ECONNREFUSED);
        assert_int_equal(central_client_health(cc, h, 2), 1);
        assert_int_equal(h[0].requests, 2);
        assert_int_equal(h[0].failures, 2);
        assert_int_equal(h[0].consecutive_failures, 2);
        central_client_free(cc);

        /* every endpoint's failure is in the message */
        make_config(&c, "ca", "client", "client", 5 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_DEAD_PORT");
        add_endpoint(&c, "localhost", "CENTRAL_DEAD_PORT");
        cc = client_new(&c);
        assert_int_equal(fetch_fails(cc, err, sizeof(err)), -ECONNREFUSED);
        assert_non_null(strstr(err, "all 2 central endpoints failed"));
        assert_non_null(strstr(err, "127.0.0.1:"));
        assert_non_null(strstr(err, "localhost:"));
        central_client_free(cc);
}

static void test_central_fetch_handshake_timeout(void **state) {
        struct central_client *cc;
        struct config c;
        char err[512] = "";
        uint64_t t0, dt;

        make_config(&c, "ca", "client", "client", 700 * 1000);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_SILENT_TCP_PORT");
        cc = client_new(&c);
        t0 = now_usec(CLOCK_MONOTONIC);
        assert_int_equal(fetch_fails(cc, err, sizeof(err)), -ETIMEDOUT);
        dt = now_usec(CLOCK_MONOTONIC) - t0;
        assert_true(dt >= 650 * 1000);
        assert_true(dt < 1200 * 1000);
        assert_non_null(strstr(err, "TLS handshake timed out"));
        central_client_free(cc);
}

static void test_central_fetch_read_timeout(void **state) {
        struct central_client *cc;
        struct config c;
        char err[512] = "";
        uint64_t t0, dt;

        /* a TLS server that completes the handshake and never answers */
        make_config(&c, "ca", "client", "client", 700 * 1000);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_SILENT_TLS_PORT");
        cc = client_new(&c);
        t0 = now_usec(CLOCK_MONOTONIC);
        assert_int_equal(fetch_fails(cc, err, sizeof(err)), -ETIMEDOUT);
        dt = now_usec(CLOCK_MONOTONIC) - t0;
        /* connect and handshake take a few ms; the read gets its own bound */
        assert_true(dt >= 650 * 1000);
        assert_true(dt < 2 * 700 * 1000 + 300 * 1000);
        assert_non_null(strstr(err, "reading the response timed out"));
        assert_non_null(strstr(err, "DiscoverVersions"));
        central_client_free(cc);
}

static void test_central_fetch_keys(void **state) {
        struct central_endpoint_health h[1];
        struct central_key *keys = NULL;
        struct central_client *cc;
        struct config c;
        char err[512] = "";
        size_t n = 0;
        int r;

        make_config(&c, "ca", "client", "client", 5 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        cc = client_new(&c);
        r = central_fetch(cc, NULL, 0, &keys, &n, err, sizeof(err));
        if (r < 0)
                fail_msg("central_fetch: %d %s", r, err);
        assert_seeded_keys(keys, n);
        central_keys_free(keys, n);

        assert_int_equal(central_client_health(cc, h, 1), 1);
        assert_int_equal(h[0].requests, 1);
        assert_int_equal(h[0].failures, 0);
        assert_true(h[0].last_success_usec > 0);
        assert_true(h[0].last_latency_usec > 0);
        assert_string_equal(h[0].last_error, "");
        central_client_free(cc);
}

/* A fetch naming the versions held: one message (Locate and GetAttributes of
 * those and of the Compromised one seen before), their material not fetched
 * again, the TLS session of the fetch before resumed, no DiscoverVersions. A
 * held uid gone from the server (Item Not Found) or outside the group is not
 * reported. */
static void test_central_fetch_held(void **state) {
        char held[N_SEEDED + 2][CENTRAL_ID_MAX];
        struct central_endpoint_health h[1];
        struct central_key *keys = NULL;
        struct central_client *cc;
        struct config c;
        char err[512] = "";
        size_t n = 0, n_held = 0;
        uint64_t messages;

        make_config(&c, "ca", "client", "client", 5 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        cc = client_new(&c);
        if (central_fetch(cc, NULL, 0, &keys, &n, err, sizeof(err)) < 0)
                fail_msg("central_fetch: %s", err);
        central_keys_free(keys, n);
        assert_int_equal(central_client_health(cc, h, 1), 1);
        /* DiscoverVersions, Locate, one batch for the N_SEEDED new ones */
        assert_int_equal(h[0].messages, 3);
        messages = h[0].messages;

        for (size_t i = 0; i < N_SEEDED; i++)
                if (expected[i].has_material)
                        snprintf(held[n_held++], CENTRAL_ID_MAX, "%.127s", expected[i].uid);
        snprintf(held[n_held++], CENTRAL_ID_MAX, "999999");
        snprintf(held[n_held++], CENTRAL_ID_MAX, "%s", env("CENTRAL_OTHER_UID"));
        for (int round = 0; round < 2; round++) {
                if (central_fetch(cc, (const char (*)[CENTRAL_ID_MAX]) held, n_held, &keys, &n, err,
                                  sizeof(err)) < 0)
                        fail_msg("central_fetch (held): %s", err);
                assert_int_equal(n, N_SEEDED);
                for (size_t i = 0; i < N_SEEDED; i++) {
                        const struct central_key *k = find(keys, n, expected[i].uid);

                        assert_non_null(k);
                        assert_int_equal(k->state, central_state_of_kmip(expected[i].state));
                        assert_null(k->kek);
                        assert_int_equal(k->material_held, expected[i].has_material);
                }
                central_keys_free(keys, n);
                central_client_health(cc, h, 1);
                assert_int_equal(h[0].messages, messages + 1);
                messages = h[0].messages;
                assert_int_equal(h[0].resumed, round + 1);
        }

        n_held = CENTRAL_KEYS_MAX + 1;
        assert_int_equal(central_fetch(cc, (const char (*)[CENTRAL_ID_MAX]) held, n_held, &keys, &n, err,
                                       sizeof(err)), -EINVAL);
        central_client_free(cc);
}

static void test_central_fetch_keys_by_name(void **state) {
        struct central_key *keys = NULL;
        struct central_client *cc;
        struct config c;
        char err[512] = "";
        size_t n = 0;
        int r;

        /* "localhost": SNI and a DNS SAN match, rather than an IP SAN */
        make_config(&c, "ca", "client", "client", 5 * SEC);
        add_endpoint(&c, "localhost", "CENTRAL_KMIP_PORT");
        cc = client_new(&c);
        r = central_fetch(cc, NULL, 0, &keys, &n, err, sizeof(err));
        if (r < 0)
                fail_msg("central_fetch: %d %s", r, err);
        assert_seeded_keys(keys, n);
        central_keys_free(keys, n);
        central_client_free(cc);
}

static void test_central_fetch_shared_with_other_host(void **state) {
        struct central_key *keys = NULL;
        struct central_client *cc;
        struct config c;
        char err[512] = "";
        size_t n = 0;
        int r;

        /* Another CN (another host) reads the same versions through the
         * operation policy the keys were created with. */
        make_config(&c, "ca", "client2", "client2", 5 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        cc = client_new(&c);
        r = central_fetch(cc, NULL, 0, &keys, &n, err, sizeof(err));
        if (r < 0)
                fail_msg("central_fetch: %d %s", r, err);
        assert_seeded_keys(keys, n);
        central_keys_free(keys, n);
        central_client_free(cc);
}

static void test_central_fetch_empty_group(void **state) {
        struct central_key *keys = NULL;
        struct central_client *cc;
        struct config c;
        char err[512] = "";
        size_t n = 99;

        make_config(&c, "ca", "client", "client", 5 * SEC);
        snprintf(c.key_group, sizeof(c.key_group), "no-such-group");
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        cc = client_new(&c);
        assert_int_equal(central_fetch(cc, NULL, 0, &keys, &n, err, sizeof(err)), 0);
        assert_int_equal(n, 0);
        central_keys_free(keys, n);
        central_client_free(cc);
}

static void test_central_fetch_failover_and_backoff(void **state) {
        struct central_endpoint_health h[3];
        struct central_key *keys = NULL;
        struct central_client *cc;
        struct config c;
        char err[512] = "";
        size_t n = 0;
        uint64_t now;
        int r;

        /* dead first, PyKMIP second, the rogue third (never reached) */
        make_config(&c, "ca", "client", "client", 5 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_DEAD_PORT");
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        add_endpoint(&c, "127.0.0.1", "CENTRAL_ROGUE_PORT");
        cc = client_new(&c);
        r = central_fetch(cc, NULL, 0, &keys, &n, err, sizeof(err));
        if (r < 0)
                fail_msg("central_fetch: %d %s", r, err);
        assert_seeded_keys(keys, n);
        central_keys_free(keys, n);

        now = now_usec(CLOCK_MONOTONIC);
        assert_int_equal(central_client_health(cc, h, 3), 3);
        assert_non_null(strstr(h[0].name, "127.0.0.1:"));
        assert_int_equal(h[0].requests, 1);
        assert_int_equal(h[0].failures, 1);
        assert_int_equal(h[0].consecutive_failures, 1);
        assert_true(h[0].last_failure_usec > 0);
        assert_int_equal(h[0].last_success_usec, 0);
        assert_string_equal(h[0].last_error, "connect: Connection refused");
        /* backoff: at least the 1 s floor, at most floor + 1 s window */
        assert_true(h[0].next_attempt_usec > now);
        assert_true(h[0].next_attempt_usec <= now + 2 * SEC);
        assert_int_equal(h[1].requests, 1);
        assert_int_equal(h[1].failures, 0);
        assert_true(h[1].last_success_usec > 0);
        assert_string_equal(h[1].last_error, "");
        assert_int_equal(h[2].requests, 0);

        /* the next fetch skips the endpoint in backoff */
        keys = NULL;
        r = central_fetch(cc, NULL, 0, &keys, &n, err, sizeof(err));
        if (r < 0)
                fail_msg("central_fetch: %d %s", r, err);
        central_keys_free(keys, n);
        assert_int_equal(central_client_health(cc, h, 3), 3);
        assert_int_equal(h[0].requests, 1);
        assert_int_equal(h[1].requests, 2);
        assert_int_equal(h[2].requests, 0);
        central_client_free(cc);
}

static void test_central_fetch_failover_after_tls_failure(void **state) {
        struct central_endpoint_health h[2];
        struct central_key *keys = NULL;
        struct central_client *cc;
        struct config c;
        char err[512] = "";
        size_t n = 0;
        int r;

        /* a server we must not trust is a failure like any other */
        make_config(&c, "ca", "client", "client", 5 * SEC);
        add_endpoint(&c, "127.0.0.1", "CENTRAL_ROGUE_PORT");
        add_endpoint(&c, "127.0.0.1", "CENTRAL_KMIP_PORT");
        cc = client_new(&c);
        r = central_fetch(cc, NULL, 0, &keys, &n, err, sizeof(err));
        if (r < 0)
                fail_msg("central_fetch: %d %s", r, err);
        assert_seeded_keys(keys, n);
        central_keys_free(keys, n);
        assert_int_equal(central_client_health(cc, h, 2), 2);
        assert_string_equal(h[0].last_error,
                            "TLS handshake: server certificate verify failed: unable to get local issuer certificate");
        assert_int_equal(h[1].failures, 0);
        central_client_free(cc);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_central_client_new_key_mode_refused),
                cmocka_unit_test(test_central_client_new_key_not_regular),
                cmocka_unit_test(test_central_client_new_missing_files),
                cmocka_unit_test(test_central_fetch_wrong_ca),
                cmocka_unit_test(test_central_fetch_hostname_mismatch),
                cmocka_unit_test(test_central_fetch_client_cert_rejected),
                cmocka_unit_test(test_central_fetch_dead_port),
                cmocka_unit_test(test_central_fetch_handshake_timeout),
                cmocka_unit_test(test_central_fetch_read_timeout),
                cmocka_unit_test(test_central_fetch_keys),
                cmocka_unit_test(test_central_fetch_held),
                cmocka_unit_test(test_central_fetch_keys_by_name),
                cmocka_unit_test(test_central_fetch_shared_with_other_host),
                cmocka_unit_test(test_central_fetch_empty_group),
                cmocka_unit_test(test_central_fetch_failover_and_backoff),
                cmocka_unit_test(test_central_fetch_failover_after_tls_failure),
        };

        /* tpmkmsd ignores SIGPIPE (tls.h): so does its test */
        (void) signal(SIGPIPE, SIG_IGN);
        return cmocka_run_group_tests(tests, setup, teardown);
}
