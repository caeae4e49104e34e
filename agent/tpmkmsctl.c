/* tpmkmsctl: operate a running tpmkmsd through its control socket. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "control.h"

static void usage(FILE *f) {
        fprintf(f,
                "Usage: tpmkmsctl [--config FILE] COMMAND\n"
                "Commands:\n"
                "  status [--json]  keys and their roles, seal state, PCR policy\n"
                "  sync             fleet mode: sync with the central KMS now, print what changed\n"
                "  rotate           standalone mode: make a new primary key (old ones stay readable)\n"
                "  reseal           re-seal the key cache to the current PCRs (after a verified update)\n"
                "Options:\n"
                "  -c, --config FILE  find the control socket from FILE (default " CONFIG_DEFAULT_PATH ")\n");
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
        r = config_load(path, &config, err, sizeof(err));
        if (r < 0) {
                fprintf(stderr, "tpmkmsctl: %s\n", err);
                return 1;
        }
        r = control_call(config.control_socket, argc - optind, argv + optind, stdout, err, sizeof(err));
        if (r < 0) {
                fprintf(stderr, "tpmkmsctl: %s\n", err);
                return 1;
        }
        return 0;
}
