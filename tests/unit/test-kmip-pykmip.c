/* Interop helper for kmip-interop.py: sends one request built by agent/kmip/message.c
 * to a real KMIP server (PyKMIP) over mutual TLS 1.2 and prints what the
 * matching kmip_response_* parser made of the answer, one "field value" per
 * line, ending with "rc N". A plain blocking OpenSSL client: the daemon's
 * transport is agent/kmip/tls.c, not this.
 *
 *   test-kmip-pykmip [-v MAJOR.MINOR] [-o RESPONSE_FILE] HOST PORT CA CERT KEY OP [ARG [STATE]]
 *   OP: discover | locate GROUP [STATE] | get UID | attrs UID
 *       | batch GROUP UID... (one message: Locate GROUP, then GetAttributes
 *         and Get of each UID; one line per item: "locate_uid U", "attrs U
 *         STATE", "key U HEX", "failed INDEX REASON")
 *
 * Exit status 0 when the exchange happened (whatever rc says), 1 otherwise. */
#include <errno.h>
#include <netdb.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "message.h"
#include "macro.h"

static int die(const char *what) {
        fprintf(stderr, "test-kmip-pykmip: %s\n", what);
        ERR_print_errors_fp(stderr);
        return 1;
}

static int tcp_connect(const char *host, const char *port) {
        struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *ai, *p;
        int fd = -1;

        if (getaddrinfo(host, port, &hints, &ai) != 0)
                return -1;
        for (p = ai; p; p = p->ai_next) {
                fd = socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol);
                if (fd < 0)
                        continue;
                if (connect(fd, p->ai_addr, p->ai_addrlen) == 0)
                        break;
                close(fd);
                fd = -1;
        }
        freeaddrinfo(ai);
        return fd;
}

static bool ssl_read_all(SSL *ssl, uint8_t *buf, size_t len) {
        size_t got = 0;

        while (got < len) {
                size_t n = 0;
                if (SSL_read_ex(ssl, buf + got, len - got, &n) != 1)
                        return false;
                got += n;
        }
        return true;
}

static void print_hex(const char *field, const uint8_t *p, size_t n) {
        printf("%s ", field);
        for (size_t i = 0; i < n; i++)
                printf("%02x", p[i]);
        printf("\n");
}

static void print_error(int r, const struct kmip_error *err) {
        if (r == -EREMOTEIO)
                printf("status %d\nreason %d\nreason_name %s\nmessage %s\n", err->result_status,
                       err->result_reason, kmip_result_reason_to_string(err->result_reason),
                       err->message);
        printf("rc %d\n", r);
}

int main(int argc, char **argv) {
        struct kmip_version version = { 1, 2 };
        const char *dump = NULL;
        _cleanup_free_ uint8_t *req = NULL;
        uint8_t *resp = NULL;
        size_t req_len = 0, resp_len = 0;
        uint8_t hdr[KMIP_HEADER_SIZE];
        struct kmip_error err;
        SSL_CTX *ctx = NULL;
        SSL *ssl = NULL;
        int opt, r, fd = -1, ret = 1;

        while ((opt = getopt(argc, argv, "v:o:")) != -1) {
                switch (opt) {
                case 'v':
                        if (sscanf(optarg, "%d.%d", &version.major, &version.minor) != 2)
                                return die("bad -v");
                        break;
                case 'o':
                        dump = optarg;
                        break;
                default:
                        return die("usage");
                }
        }
        argv += optind;
        argc -= optind;
        if (argc < 6)
                return die("usage: [-v M.m] [-o FILE] HOST PORT CA CERT KEY OP [ARG [STATE]]");
        const char *host = argv[0], *port = argv[1], *ca = argv[2], *cert = argv[3], *key = argv[4];
        const char *op = argv[5], *arg = argc > 6 ? argv[6] : NULL;
        int32_t state = argc > 7 ? atoi(argv[7]) : 0;
        struct kmip_batch_op ops[1 + 2 * 16];
        size_t n_ops = 0;

        if (strcmp(op, "discover") == 0)
                r = kmip_request_discover_versions(&req, &req_len);
        else if (strcmp(op, "locate") == 0)
                r = kmip_request_locate(&version, arg, state, &req, &req_len);
        else if (strcmp(op, "get") == 0)
                r = kmip_request_get(&version, arg, &req, &req_len);
        else if (strcmp(op, "attrs") == 0)
                r = kmip_request_get_attributes(&version, arg, &req, &req_len);
        else if (strcmp(op, "batch") == 0 && arg && argc - 7 <= 16) {
                ops[n_ops++] = (struct kmip_batch_op) { .operation = KMIP_OP_LOCATE, .arg = arg };
                for (int i = 7; i < argc; i++) {
                        ops[n_ops++] = (struct kmip_batch_op) { .operation = KMIP_OP_GET_ATTRIBUTES, .arg = argv[i] };
                        ops[n_ops++] = (struct kmip_batch_op) { .operation = KMIP_OP_GET, .arg = argv[i] };
                }
                r = kmip_request_batch(&version, ops, n_ops, &req, &req_len);
        } else
                return die("unknown operation");
        if (r < 0) {
                printf("rc %d\n", r);
                return 1;
        }

        /* PyKMIP 0.10 speaks TLS 1.2 only (testkit README). */
        ctx = SSL_CTX_new(TLS_client_method());
        if (!ctx || SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
            SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION) != 1 ||
            SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1 ||
            SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
            SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
                ret = die("TLS setup");
                goto out;
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        fd = tcp_connect(host, port);
        if (fd < 0) {
                ret = die("connect");
                goto out;
        }
        ssl = SSL_new(ctx);
        if (!ssl || SSL_set_fd(ssl, fd) != 1 ||
            X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host) != 1 ||
            SSL_connect(ssl) != 1) {
                ret = die("TLS handshake");
                goto out;
        }

        size_t written;
        if (SSL_write_ex(ssl, req, req_len, &written) != 1 || written != req_len) {
                ret = die("write");
                goto out;
        }
        if (!ssl_read_all(ssl, hdr, sizeof(hdr))) {
                ret = die("read header");
                goto out;
        }
        r = kmip_message_length(hdr);
        if (r < 0) {
                printf("rc %d\n", r);
                ret = die("response header");
                goto out;
        }
        resp_len = (size_t) r;
        resp = malloc(resp_len);
        if (!resp) {
                ret = die("malloc");
                goto out;
        }
        memcpy(resp, hdr, sizeof(hdr));
        if (!ssl_read_all(ssl, resp + sizeof(hdr), resp_len - sizeof(hdr))) {
                ret = die("read body");
                goto out;
        }
        if (dump) {
                FILE *f = fopen(dump, "we");
                if (f) {
                        fwrite(resp, 1, resp_len, f);
                        fclose(f);
                }
        }

        if (strcmp(op, "batch") == 0) {
                struct kmip_batch_result res[ARRAY_SIZE(ops)];
                char (*ids)[KMIP_ID_MAX] = calloc(KMIP_LOCATE_MAX, KMIP_ID_MAX);
                size_t n = 0;
                if (!ids) {
                        ret = die("malloc");
                        goto out;
                }
                r = kmip_response_batch(resp, resp_len, ops, n_ops, res, &err);
                for (size_t i = 0; r >= 0 && i < n_ops; i++) {
                        struct kmip_key_attributes a;
                        _cleanup_erase_key_ uint8_t k[AES256_KEY_SIZE];
                        char uid[KMIP_ID_MAX];

                        if (!res[i].answered || res[i].error.result_status != 0) {
                                printf("failed %zu %d\n", i, res[i].answered ? res[i].error.result_reason : -1);
                                continue;
                        }
                        if (ops[i].operation == KMIP_OP_LOCATE) {
                                r = kmip_result_locate(&res[i], ids, KMIP_LOCATE_MAX, &n);
                                for (size_t j = 0; r >= 0 && j < n; j++)
                                        printf("locate_uid %s\n", ids[j]);
                        } else if (ops[i].operation == KMIP_OP_GET_ATTRIBUTES) {
                                r = kmip_result_get_attributes(&res[i], &a);
                                if (r >= 0)
                                        printf("attrs %s %d\n", a.uid, a.state);
                        } else {
                                r = kmip_result_get_symmetric_key(&res[i], uid, k);
                                if (r >= 0) {
                                        printf("key %s ", uid);
                                        for (size_t j = 0; j < sizeof(k); j++)
                                                printf("%02x", k[j]);       /* a test key */
                                        printf("\n");
                                }
                        }
                }
                free(ids);
        } else if (strcmp(op, "discover") == 0) {
                struct kmip_version v[8];
                size_t n = 0;
                r = kmip_response_discover_versions(resp, resp_len, v, ARRAY_SIZE(v), &n, &err);
                for (size_t i = 0; r >= 0 && i < n; i++)
                        printf("version %d.%d\n", v[i].major, v[i].minor);
        } else if (strcmp(op, "locate") == 0) {
                char (*ids)[KMIP_ID_MAX] = calloc(KMIP_LOCATE_MAX, KMIP_ID_MAX);
                size_t n = 0;
                if (!ids) {
                        ret = die("malloc");
                        goto out;
                }
                r = kmip_response_locate(resp, resp_len, ids, KMIP_LOCATE_MAX, &n, &err);
                for (size_t i = 0; r >= 0 && i < n; i++)
                        printf("uid %s\n", ids[i]);
                free(ids);
        } else if (strcmp(op, "get") == 0) {
                _cleanup_erase_key_ uint8_t k[AES256_KEY_SIZE];
                char uid[KMIP_ID_MAX];
                r = kmip_response_get_symmetric_key(resp, resp_len, uid, k, &err);
                if (r >= 0) {
                        printf("uid %s\n", uid);
                        print_hex("key", k, sizeof(k));     /* a test key */
                }
        } else {
                struct kmip_key_attributes a;
                r = kmip_response_get_attributes(resp, resp_len, &a, &err);
                if (r >= 0)
                        printf("uid %s\nobject_type %d\nstate %d\nstate_name %s\ninitial_date %lld\n"
                               "algorithm %d\nlength %d\nname %s\n",
                               a.uid, a.object_type, a.state, kmip_state_to_string(a.state),
                               (long long) a.initial_date, a.algorithm, a.length, a.name);
        }
        print_error(r, &err);
        ret = 0;
out:
        erase_and_free(resp, resp_len);     /* a Get response holds key material */
        if (ssl) {
                SSL_shutdown(ssl);
                SSL_free(ssl);
        }
        if (fd >= 0)
                close(fd);
        SSL_CTX_free(ctx);
        fflush(stdout);
        return ret;
}
