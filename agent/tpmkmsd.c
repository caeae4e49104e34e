/* tpmkmsd: Kubernetes KMS v2 plugin serving keys from a TPM-sealed cache. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "config.h"
#include "daemon.h"
#include "log.h"

static void usage(FILE *f) {
        fprintf(f,
                "Usage: tpmkmsd [--config FILE] [--check-config] [--verbose]\n"
                "       tpmkmsd --version\n"
                "Serves the Kubernetes KMS v2 API from a key cache sealed to this host's TPM.\n"
                "  -c, --config FILE   configuration (default " CONFIG_DEFAULT_PATH ")\n"
                "      --check-config  validate the configuration and exit\n"
                "  -v, --verbose       debug logging\n"
                "      --version       print the version and exit\n");
}

int main(int argc, char **argv) {
        static const struct option options[] = {
                { "config", required_argument, NULL, 'c' },
                { "check-config", no_argument, NULL, 'C' },
                { "verbose", no_argument, NULL, 'v' },
                { "version", no_argument, NULL, 'V' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        const char *path = CONFIG_DEFAULT_PATH;
        int check = 0, verbose = 0, opt, r;
        static struct config config;
        char err[1024];

        while ((opt = getopt_long(argc, argv, "c:vh", options, NULL)) >= 0) {
                switch (opt) {
                case 'c': path = optarg; break;
                case 'C': check = 1; break;
                case 'v': verbose = 1; break;
                case 'V': printf("tpmkmsd %s\n", TPMKMS_VERSION); return 0;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return 2;
                }
        }
        if (optind < argc) {
                usage(stderr);
                return 2;
        }

        log_setup(verbose ? LOG_DEBUG : LOG_INFO);
        r = config_load(path, &config, err, sizeof(err));
        if (r < 0) {
                log_error("%s", err);
                log_flush();
                return 1;
        }
        if (check) {
                printf("%s: configuration is valid\n", path);
                return 0;
        }
        return daemon_run(&config);
}
