/* tpmkmsctl: operate a running tpmkmsd through its control socket, and audit
 * etcd snapshots (without the daemon or its configuration). */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"
#include "config.h"
#include "control.h"
#include "keystore.h"
#include "log.h"
#include "macro.h"
#include "snapshot.h"

static void usage(FILE *f) {
        fprintf(f,
                "Usage: tpmkmsctl [--config FILE] COMMAND\n"
                "Commands:\n"
                "  status [--json]  keys and their roles, seal state, PCR policy\n"
                "  sync             fleet mode: sync with the central KMS now, print what changed\n"
                "  purge KEY_ID     fleet mode: purge a missing version now, before purge_after\n"
                "                   (refuses the primary, versions not missing and unknown ids)\n"
                "  rotate           standalone mode: make a new primary key (old ones stay readable)\n"
                "  reseal [--pcrs SELECTION]\n"
                "                   re-seal the key cache to the current values of the configured PCRs,\n"
                "                   or of SELECTION (a planned update; then set [tpm] pcrs to it)\n"
                "  accept-restore   with tpmkmsd stopped: accept a key cache restored from an older\n"
                "                   backup of this host (refused otherwise as a rollback)\n"
                "  new-cache        with tpmkmsd stopped, standalone: the key cache is gone; make a new\n"
                "                   one with a new first key (every old ciphertext stays unreadable)\n"
                "  encryption-config [--name NAME] [--timeout DURATION] [RESOURCE...]\n"
                "                   print a kube-apiserver EncryptionConfiguration using this plugin\n"
                "                   (default resource: secrets; fail-closed: no identity provider)\n"
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
                {},
        };
        const char *name = "tpmkms", *timeout = "3s";
        uint64_t usec;
        int opt;

        optind = 0;   /* 0: a full rescan, resetting the "+" mode of the first parse */
        while ((opt = getopt_long(argc, argv, "n:t:", options, NULL)) >= 0) {
                switch (opt) {
                case 'n': name = optarg; break;
                case 't': timeout = optarg; break;
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
               "# Fail-closed: no identity provider follows, so the apiserver neither writes\n"
               "# nor reads these resources unencrypted. Migrating existing data needs\n"
               "# 'identity: {}' as a second provider until every object was rewritten.\n"
               "apiVersion: apiserver.config.k8s.io/v1\n"
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

/* accept-restore and new-cache run here, with the daemon stopped: they open
 * the vault themselves, once, allowing what a start refuses (a cache older
 * than the TPM's rollback counter; a standalone cache that is gone), and
 * write the cache at the counter's next value. */
static int open_vault_offline(const struct config *c, bool accept_restore) {
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        struct vault_options opt;
        struct vault v;
        char err[256];
        FILE *null;
        int r;

        null = fopen("/dev/null", "we");
        r = null ? control_call(c->control_socket, 1, (char *[]) { (char *) "status", NULL }, null, err,
                                sizeof(err))
                 : -errno;
        if (null)
                fclose(null);
        if (r >= 0) {
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
        opt.accept_restore = accept_restore;
        opt.allow_new_cache = !accept_restore;
        r = vault_open(&v, &opt, c->central_type == CENTRAL_NONE, &kr);
        if (r >= 0 && v.refused)
                fprintf(stderr, "tpmkmsctl: the cache is refused: %s\n", v.reason);
        else if (r >= 0)
                printf("%s in %s: %zu key(s); start tpmkmsd\n",
                       v.created ? "made a new key cache" : accept_restore ? "accepted the restored cache"
                                                          : "a key cache exists, kept it",
                       c->state_dir, keyring_size(kr));
        vault_done(&v);
        return r < 0 || v.refused ? 1 : 0;
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
        if (strcmp(argv[optind], "encryption-config") == 0)
                return encryption_config(&config, argc - optind, argv + optind);
        if (strcmp(argv[optind], "accept-restore") == 0 && argc - optind == 1)
                return open_vault_offline(&config, true);
        if (strcmp(argv[optind], "new-cache") == 0 && argc - optind == 1)
                return open_vault_offline(&config, false);
        r = control_call(config.control_socket, argc - optind, argv + optind, stdout, err, sizeof(err));
        if (r < 0) {
                fprintf(stderr, "tpmkmsctl: %s\n", err);
                return 1;
        }
        return 0;
}
