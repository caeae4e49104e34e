/* tpmkmsctl: operate a running tpmkmsd through its control socket, and audit
 * etcd snapshots (without the daemon or its configuration). */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"
#include "config.h"
#include "control.h"
#include "doctor.h"
#include "identity.h"
#include "keystore.h"
#include "log.h"
#include "macro.h"
#include "snapshot.h"

static void usage(FILE *f) {
        fprintf(f,
                "Usage: tpmkmsctl [--config FILE] COMMAND\n"
                "Commands:\n"
                "  status [--json]  keys and their roles, seal state, PCR policy\n"
                "  doctor [--json]  check the daemon, the KMS socket, the TPM and measured boot, the\n"
                "                   central KMS endpoints and the client certificate; say what to do.\n"
                "                   Exit 0 healthy, 1 warnings, 2 failures (works with tpmkmsd stopped)\n"
                "  sync             fleet mode: sync with the central KMS now, print what changed\n"
                "  purge KEY_ID     fleet mode: purge a missing version now, before purge_after\n"
                "                   (refuses the primary, versions not missing and unknown ids)\n"
                "  rotate           standalone mode: make a new primary key (old ones stay readable)\n"
                "  reseal [--pcrs SELECTION]\n"
                "                   re-seal the key cache to the current values of the configured PCRs,\n"
                "                   or of SELECTION (a planned update; then set [tpm] pcrs to it)\n"
                "  accept-restore   with tpmkmsd stopped: accept a key cache restored from an older\n"
                "                   backup of this host (refused otherwise as a rollback)\n"
                "  migrate          with tpmkmsd stopped, once after upgrading from format 1: re-seal the\n"
                "                   key cache in the current format (a start refuses format 1)\n"
                "  new-cache        with tpmkmsd stopped, standalone: the key cache is gone; make a new\n"
                "                   one with a new first key (every old ciphertext stays unreadable)\n"
                "  enroll --subject SUBJECT --csr FILE [--san SAN]... [--key-type ecdsa-p256|rsa-2048] [--force]\n"
                "                   fleet mode: make this host's client key for the central KMS in the TPM\n"
                "                   (written to [central] key_file, usable only by this TPM in the measured\n"
                "                   state the cache is sealed to) and a CSR for the fleet CA (FILE)\n"
                "  encryption-config [--name NAME] [--timeout DURATION] [--fallback identity] [RESOURCE...]\n"
                "                   print a kube-apiserver EncryptionConfiguration using this plugin\n"
                "                   (default resource: secrets; fail-closed: no identity provider;\n"
                "                   --fallback identity adds one after it, for a migration)\n"
                "  audit-snapshot FILE [--require-encrypted RESOURCE[,RESOURCE...]] [--json]\n"
                "                   count what an etcd v3 snapshot stores per resource type: plaintext,\n"
                "                   KMS v2 (by key id) or another provider; needs no daemon and no config.\n"
                "                   Exit 0 ok, 1 a required type has plaintext objects, 2 unreadable file\n"
                "Options:\n"
                "  -c, --config FILE  find the control socket from FILE (default " CONFIG_DEFAULT_PATH ")\n");
}

/* Resource names as the apiserver takes them: "secrets", "configmaps",
 * "deployments.apps", "*.", "*.*"; anything else would break the YAML. */
static bool resource_valid(const char *r) {
        if (!*r || strlen(r) > 253)
                return false;
        for (const char *c = r; *c; c++)
                if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || strchr(".-*", *c)))
                        return false;
        return true;
}

/* Runs here, not in the daemon: it needs only the configuration. */
static int encryption_config(const struct config *c, int argc, char **argv) {
        static const struct option options[] = {
                { "name", required_argument, NULL, 'n' },
                { "timeout", required_argument, NULL, 't' },
                { "fallback", required_argument, NULL, 'f' },
                {},
        };
        const char *name = "tpmkms", *timeout = "3s";
        bool identity = false;
        uint64_t usec;
        int opt;

        optind = 0;   /* 0: a full rescan, resetting the "+" mode of the first parse */
        while ((opt = getopt_long(argc, argv, "n:t:f:", options, NULL)) >= 0) {
                switch (opt) {
                case 'n': name = optarg; break;
                case 't': timeout = optarg; break;
                case 'f':
                        if (strcmp(optarg, "identity") != 0) {
                                fprintf(stderr, "tpmkmsctl: --fallback: only 'identity'\n");
                                return 1;
                        }
                        identity = true;
                        break;
                default: return 2;
                }
        }
        if (!resource_valid(name)) {
                fprintf(stderr, "tpmkmsctl: --name: lowercase letters, digits, '.' and '-' only\n");
                return 1;
        }
        if (parse_duration(timeout, &usec) < 0 || usec == 0 || usec % USEC_PER_SEC != 0) {
                fprintf(stderr, "tpmkmsctl: --timeout: whole seconds, e.g. 3s\n");
                return 1;
        }
        /* Written unquoted into YAML: only plain path characters. */
        if (strspn(c->kms_socket, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/._-") !=
            strlen(c->kms_socket)) {
                fprintf(stderr, "tpmkmsctl: [kms] socket '%s' has characters that need quoting in YAML; "
                        "write the file by hand\n", c->kms_socket);
                return 1;
        }
        for (int i = optind; i < argc; i++)
                if (!resource_valid(argv[i])) {
                        fprintf(stderr, "tpmkmsctl: not a resource name: '%s'\n", argv[i]);
                        return 1;
                }

        printf("# kube-apiserver --encryption-provider-config=FILE\n"
               "# Fail closed while tpmkmsd is down (writes and reads fail, nothing is\n"
               "# stored unencrypted):%s\n", identity ? " none of the resources below" : "");
        for (int i = optind; !identity && i < argc; i++)
                printf("#   %s\n", argv[i]);
        if (!identity && optind >= argc)
                printf("#   secrets\n");
        if (identity)
                printf("# The identity fallback after the kms provider keeps unencrypted objects\n"
                       "# readable (see its comment): remove it once every object is rewritten.\n");
        else
                printf("# No identity provider follows, so the apiserver neither writes nor reads\n"
                       "# these resources unencrypted. Migrating existing data needs\n"
                       "# 'identity: {}' as a second provider until every object was rewritten\n"
                       "# (tpmkmsctl encryption-config --fallback identity).\n");
        printf("apiVersion: apiserver.config.k8s.io/v1\n"
               "kind: EncryptionConfiguration\n"
               "resources:\n"
               "  - resources:\n");
        if (optind >= argc)
                printf("      - secrets\n");
        for (int i = optind; i < argc; i++)
                printf("      - %s\n", argv[i]);
        printf("    providers:\n"
               "      - kms:\n"
               "          apiVersion: v2\n"
               "          name: %s\n"
               "          endpoint: unix://%s\n"
               "          timeout: %" PRIu64 "s\n", name, c->kms_socket, usec / USEC_PER_SEC);
        if (identity)
                printf("      # Fallback: NOT fail-closed. The apiserver writes with the first\n"
                       "      # provider (kms) and reads with the first that can: objects stored\n"
                       "      # in plaintext stay readable, while tpmkmsd is down too, and so does\n"
                       "      # anything written to etcd directly in plaintext. That is what a\n"
                       "      # migration needs (every existing object readable until rewritten);\n"
                       "      # remove it afterwards (docs/runbook.md, 'Break-glass').\n"
                       "      - identity: {}\n");
        return 0;
}

/* Runs before the configuration is read: any user who can read the
 * snapshot may audit it. Exit status: 0 ok, 1 objects of a required type are
 * stored in plaintext, 2 the file cannot be read or parsed (or bad usage). */
static int audit_snapshot(int argc, char **argv) {
        static const struct option options[] = {
                { "require-encrypted", required_argument, NULL, 'r' },
                { "json", no_argument, NULL, 'j' },
                {},
        };
        _cleanup_(snapshot_report_freep) struct snapshot_report *report = NULL;
        const char *required[SNAPSHOT_REQUIRED_MAX];
        size_t n_required = 0;
        bool json = false;
        char err[512];
        int opt, r;

        optind = 0;
        while ((opt = getopt_long(argc, argv, "r:j", options, NULL)) >= 0) {
                switch (opt) {
                case 'r':
                        for (char *list = optarg, *name; (name = strsep(&list, ","));) {
                                if (!resource_valid(name)) {
                                        fprintf(stderr, "tpmkmsctl: --require-encrypted: not a resource name: '%s'\n",
                                                name);
                                        return 2;
                                }
                                if (n_required == ARRAY_SIZE(required)) {
                                        fprintf(stderr, "tpmkmsctl: --require-encrypted: at most %zu resource types\n",
                                                ARRAY_SIZE(required));
                                        return 2;
                                }
                                required[n_required++] = name;
                        }
                        break;
                case 'j': json = true; break;
                default: return 2;
                }
        }
        if (argc - optind != 1) {
                fprintf(stderr, "tpmkmsctl: audit-snapshot FILE [--require-encrypted RESOURCE,...] [--json]\n");
                return 2;
        }
        r = snapshot_audit_file(argv[optind], required, n_required, &report, err, sizeof(err));
        if (r < 0) {
                fprintf(stderr, "tpmkmsctl: %s: %s\n", argv[optind], err);
                return 2;
        }
        if (json)
                snapshot_report_print_json(report, stdout);
        else
                snapshot_report_print(report, stdout);
        return snapshot_report_unencrypted(report) > 0 ? 1 : 0;
}

/* Whether tpmkmsd answers on the control socket. */
static bool daemon_running(const struct config *c) {
        char err[256];
        FILE *null = fopen("/dev/null", "we");
        int r;

        if (!null)
                return false;
        r = control_call(c->control_socket, 1, (char *[]) { (char *) "status", NULL }, null, err, sizeof(err));
        fclose(null);
        return r >= 0;
}

/* accept-restore, new-cache and migrate run here, with the daemon stopped:
 * they open the vault themselves, once, allowing what a start refuses (a
 * cache older than the TPM's rollback counter; a standalone cache that is
 * gone; a format-1 cache), and write the cache at the counter's next value. */
enum offline_step {
        OFFLINE_ACCEPT_RESTORE,
        OFFLINE_NEW_CACHE,
        OFFLINE_MIGRATE,
};

static int open_vault_offline(const struct config *c, enum offline_step step) {
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        struct vault_options opt;
        struct vault v;
        int r;

        if (daemon_running(c)) {
                fprintf(stderr, "tpmkmsctl: tpmkmsd is running (%s answers): stop it first "
                        "(systemctl stop tpmkmsd)\n", c->control_socket);
                return 1;
        }
        log_setup(LOG_INFO);
        r = keyring_secure_heap_init();
        if (r < 0) {
                fprintf(stderr, "tpmkmsctl: cannot set up locked memory for keys (ulimit -l): %s\n", strerror(-r));
                return 1;
        }
        config_vault_options(c, &opt);
        opt.accept_restore = step == OFFLINE_ACCEPT_RESTORE;
        opt.allow_new_cache = step == OFFLINE_NEW_CACHE;
        opt.migrate = step == OFFLINE_MIGRATE;
        r = vault_open(&v, &opt, c->central_type == CENTRAL_NONE, &kr);
        if (r >= 0 && v.refused)
                fprintf(stderr, "tpmkmsctl: the cache is refused: %s\n", v.reason);
        else if (r >= 0)
                printf("%s in %s: %zu key(s); start tpmkmsd\n",
                       v.created ? "made a new key cache"
                       : step == OFFLINE_ACCEPT_RESTORE ? "accepted the restored cache"
                       : step == OFFLINE_MIGRATE ? "the key cache is in the current format"
                                                 : "a key cache exists, kept it",
                       c->state_dir, keyring_size(kr));
        vault_done(&v);
        return r < 0 || v.refused ? 1 : 0;
}

/* Write path atomically with mode, refusing to replace it unless force. */
static int write_file(const char *path, const char *data, mode_t mode, bool force) {
        char tmp[PATH_MAX];
        int fd, r = 0;

        if (!force && access(path, F_OK) == 0)
                return -EEXIST;
        if (snprintf(tmp, sizeof(tmp), "%s.tmpXXXXXX", path) >= (int) sizeof(tmp))
                return -ENAMETOOLONG;
        fd = mkostemp(tmp, O_CLOEXEC);
        if (fd < 0)
                return -errno;
        if (fchmod(fd, mode) < 0 || write_all(fd, data, strlen(data)) < 0 || fsync(fd) < 0)
                r = -errno;
        if (close(fd) < 0 && r == 0)
                r = -errno;
        if (r == 0 && rename(tmp, path) < 0)
                r = -errno;
        if (r < 0)
                (void) unlink(tmp);
        return r;
}

/* Percent-encode what a control argument cannot hold (blanks, '%', ','
 * inside one SAN is allowed: the list is comma-separated). */
static void percent_encode(const char *s, char *out, size_t size) {
        size_t n = 0;

        for (; *s && n + 4 < size; s++) {
                if (*s == ' ' || *s == '\t' || *s == '%' || (unsigned char) *s < 0x20)
                        n += (size_t) snprintf(out + n, size - n, "%%%02X", (unsigned char) *s);
                else
                        out[n++] = *s;
        }
        out[n] = '\0';
}

/* enroll: through the daemon when it runs (it owns the TPM and the cache),
 * else here, opening the vault (a host with no cache yet gets one). */
static int enroll(const struct config *c, int argc, char **argv) {
        static const struct option options[] = {
                { "subject", required_argument, NULL, 's' },
                { "csr", required_argument, NULL, 'o' },
                { "san", required_argument, NULL, 'a' },
                { "key-type", required_argument, NULL, 't' },
                { "force", no_argument, NULL, 'f' },
                {},
        };
        struct identity_enroll_options o = { .key_type = TPM_KEY_ECC_P256 };
        _cleanup_free_ char *key_pem = NULL, *csr_pem = NULL, *reply = NULL;
        const char *csr_file = NULL, *type = "ecdsa-p256";
        char err[1024], subj[256], sans[256] = "";
        bool force = false;
        size_t reply_len = 0;
        FILE *f;
        int opt, r;

        optind = 0;
        while ((opt = getopt_long(argc, argv, "s:o:a:t:f", options, NULL)) >= 0) {
                switch (opt) {
                case 's': o.subject = optarg; break;
                case 'o': csr_file = optarg; break;
                case 'a':
                        if (o.n_sans == IDENTITY_SANS_MAX || strchr(optarg, ',')) {
                                fprintf(stderr, "tpmkmsctl: --san: at most %d, one per option\n", IDENTITY_SANS_MAX);
                                return 1;
                        }
                        o.sans[o.n_sans++] = optarg;
                        break;
                case 't': type = optarg; break;
                case 'f': force = true; break;
                default: return 2;
                }
        }
        o.key_type = identity_key_type_from_string(type);
        if (!o.subject || !csr_file || optind != argc || o.key_type < 0) {
                fprintf(stderr, "usage: tpmkmsctl enroll --subject SUBJECT --csr FILE [--san SAN]... "
                        "[--key-type ecdsa-p256|rsa-2048] [--force]\n");
                return 2;
        }
        if (c->central_type != CENTRAL_KMIP) {
                fprintf(stderr, "tpmkmsctl: enroll is for fleet mode ([central] type = kmip)\n");
                return 1;
        }
        if (!force && access(c->key_file, F_OK) == 0) {
                fprintf(stderr, "tpmkmsctl: %s exists: this host has an identity; --force replaces it "
                        "(the old key stops working at once)\n", c->key_file);
                return 1;
        }

        if (daemon_running(c)) {
                char *args[6], *end;

                percent_encode(o.subject, subj, sizeof(subj));
                for (size_t i = 0; i < o.n_sans; i++) {
                        char enc[128];
                        percent_encode(o.sans[i], enc, sizeof(enc));
                        strappendf(sans, sizeof(sans), "%s%s", i ? "," : "", enc);
                }
                args[0] = (char *) "enroll";
                args[1] = subj;
                args[2] = (char *) type;
                args[3] = (char *) (force ? "1" : "0");
                args[4] = *sans ? sans : (char *) "-";
                args[5] = NULL;
                f = open_memstream(&reply, &reply_len);
                if (!f)
                        return 1;
                r = control_call(c->control_socket, 5, args, f, err, sizeof(err));
                fclose(f);
                if (r < 0) {
                        fprintf(stderr, "tpmkmsctl: %s\n", err);
                        return 1;
                }
                end = reply ? strstr(reply, "-----END TSS2 PRIVATE KEY-----\n") : NULL;
                if (!end) {
                        fprintf(stderr, "tpmkmsctl: tpmkmsd answered no key file\n");
                        return 1;
                }
                end += strlen("-----END TSS2 PRIVATE KEY-----\n");
                csr_pem = strdup(end);
                *end = '\0';
                key_pem = strdup(reply);
                if (!csr_pem || !key_pem)
                        return 1;
        } else {
                _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
                struct vault_options vopt;
                struct vault v;
                struct vault_identity *secret;

                log_setup(LOG_INFO);
                r = keyring_secure_heap_init();
                if (r < 0) {
                        fprintf(stderr, "tpmkmsctl: cannot set up locked memory (ulimit -l): %s\n", strerror(-r));
                        return 1;
                }
                config_vault_options(c, &vopt);
                r = vault_open(&v, &vopt, false, &kr);
                if (r >= 0 && v.refused) {
                        fprintf(stderr, "tpmkmsctl: the sealed cache is refused (%s): to re-provision, move %s "
                                "aside and enroll again (README, recovery)\n", v.reason, c->state_dir);
                        vault_done(&v);
                        return 1;
                }
                if (r < 0) {
                        vault_done(&v);
                        return 1;
                }
                if (v.identity && !force) {
                        fprintf(stderr, "tpmkmsctl: the sealed cache already holds an enrolled client key; "
                                "--force replaces it\n");
                        vault_done(&v);
                        return 1;
                }
                secret = OPENSSL_secure_zalloc(sizeof(*secret));
                r = secret ? identity_enroll(c, &o, secret, &key_pem, &csr_pem, err, sizeof(err)) : -ENOMEM;
                if (r >= 0)
                        r = vault_set_identity(&v, kr, secret);
                else
                        fprintf(stderr, "tpmkmsctl: %s\n", err);
                OPENSSL_secure_clear_free(secret, sizeof(*secret));
                vault_done(&v);
                if (r < 0)
                        return 1;
        }

        /* The key file is not secret (useless without this TPM and the
         * sealed cache), but 0600 all the same: the daemon refuses more. */
        r = write_file(c->key_file, key_pem, 0600, true);
        if (r < 0) {
                fprintf(stderr, "tpmkmsctl: cannot write %s: %s; the sealed cache already holds the new "
                        "key's secret: run enroll --force again\n", c->key_file, strerror(-r));
                return 1;
        }
        r = write_file(csr_file, csr_pem, 0644, true);
        if (r < 0) {
                fprintf(stderr, "tpmkmsctl: cannot write %s: %s\n", csr_file, strerror(-r));
                return 1;
        }
        printf("enrolled: TPM-bound %s client key in %s; CSR in %s.\n"
               "Have the fleet CA sign it (clientAuth) into %s; tpmkmsd uses it from its next sync.\n",
               type, c->key_file, csr_file, c->cert_file);
        return 0;
}

int main(int argc, char **argv) {
        static const struct option options[] = {
                { "config", required_argument, NULL, 'c' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        const char *path = CONFIG_DEFAULT_PATH;
        static struct config config;
        char err[1024];
        int opt, r;

        /* A daemon that closes early must give an error message, not a
         * silent death by SIGPIPE. */
        (void) signal(SIGPIPE, SIG_IGN);
        /* "+": stop at the command so its options (status --json) pass through. */
        while ((opt = getopt_long(argc, argv, "+c:h", options, NULL)) >= 0) {
                switch (opt) {
                case 'c': path = optarg; break;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return 2;
                }
        }
        if (optind >= argc) {
                usage(stderr);
                return 2;
        }
        if (strcmp(argv[optind], "audit-snapshot") == 0)
                return audit_snapshot(argc - optind, argv + optind);
        r = config_load(path, &config, err, sizeof(err));
        if (r < 0) {
                fprintf(stderr, "tpmkmsctl: %s\n", err);
                return 1;
        }
        if (strcmp(argv[optind], "doctor") == 0) {
                if (argc - optind > 2 || (argc - optind == 2 && strcmp(argv[optind + 1], "--json") != 0)) {
                        fprintf(stderr, "usage: tpmkmsctl doctor [--json]\n");
                        return 2;
                }
                return doctor_run(&config, argc - optind == 2, stdout);
        }
        if (strcmp(argv[optind], "encryption-config") == 0)
                return encryption_config(&config, argc - optind, argv + optind);
        if (strcmp(argv[optind], "enroll") == 0)
                return enroll(&config, argc - optind, argv + optind);
        if (strcmp(argv[optind], "accept-restore") == 0 && argc - optind == 1)
                return open_vault_offline(&config, OFFLINE_ACCEPT_RESTORE);
        if (strcmp(argv[optind], "new-cache") == 0 && argc - optind == 1)
                return open_vault_offline(&config, OFFLINE_NEW_CACHE);
        if (strcmp(argv[optind], "migrate") == 0 && argc - optind == 1)
                return open_vault_offline(&config, OFFLINE_MIGRATE);
        r = control_call(config.control_socket, argc - optind, argv + optind, stdout, err, sizeof(err));
        if (r < 0) {
                fprintf(stderr, "tpmkmsctl: %s\n", err);
                return 1;
        }
        return 0;
}
