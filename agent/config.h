/* tpmkmsd.conf: INI parsed with inih through one table of
 * {section, key, parser, offset}. Unknown sections or keys and bad values are
 * errors naming file and line. See ../shared/DESIGN.md "Configuration". */
#pragma once

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "kmip.h"
#include "policy.h"
#include "keystore.h"
#include "tpm.h"

#define CONFIG_DEFAULT_PATH "/etc/tpmkms/tpmkmsd.conf"
#define CONFIG_FILE_MAX (1u << 20)   /* a configuration is a few KiB: refuse more */
#define CONFIG_MAX_UIDS 32
#define CONFIG_SOCKET_PATH_MAX 108   /* sizeof(sun_path) */

enum central_type {
        CENTRAL_NONE,   /* standalone: KEKs made on this host */
        CENTRAL_KMIP,
};

struct config {
        /* [kms] */
        char kms_socket[CONFIG_SOCKET_PATH_MAX];
        uid_t allowed_uids[CONFIG_MAX_UIDS];
        size_t n_allowed_uids;
        /* [tpm] */
        char tpm_tcti[256];
        struct tpm_pcr_selection pcrs;
        bool insecure_no_pcr_policy;
        uint32_t counter_index;           /* TPM NV index of the rollback counter */
        uint64_t tpm_timeout_usec;        /* the most a start waits for the TPM */
        char owner_auth_file[PATH_MAX];   /* "" = empty owner authorisation */
        /* [state] */
        char state_dir[PATH_MAX];
        /* [central] */
        enum central_type central_type;
        struct central_endpoint endpoints[CENTRAL_ENDPOINTS_MAX];
        size_t n_endpoints;
        char ca_file[PATH_MAX];
        char cert_file[PATH_MAX];
        char key_file[PATH_MAX];
        char key_group[CENTRAL_GROUP_MAX + 1];
        uint64_t sync_interval_usec;
        uint64_t central_timeout_usec;
        uint64_t max_staleness_usec;  /* 0: off (serve from the cache however old) */
        uint64_t purge_after_usec;    /* UINT64_MAX: never (only tpmkmsctl purge) */
        unsigned max_missing_percent; /* 0..100 */
        uint64_t material_check_usec; /* how often a sync fetches all key material again */
        /* [control] */
        char control_socket[CONFIG_SOCKET_PATH_MAX];
        /* [metrics] */
        char metrics_listen[128];    /* "" = off */
};

/* Fill c with the defaults of DESIGN.md. */
void config_defaults(struct config *c);

/* The parts of c that the libraries take (pointers into c: keep c alive). */
void config_vault_options(const struct config *c, struct vault_options *ret);
void config_central_options(const struct config *c, struct central_options *ret);
void config_policy_options(const struct config *c, struct policy_options *ret);

/* Load path over the defaults and check the result as a whole (e.g. pcrs =
 * none needs insecure_no_pcr_policy = yes; kmip needs endpoints and files).
 * On failure writes one line to err, "FILE:LINE: what is wrong" (or
 * "FILE: ..." for whole-file problems), and returns -ENOENT/-EACCES (cannot
 * read) or -EINVAL (bad content). c is written only on success. Lines are at
 * most 197 characters (libinih's buffer); longer ones are an error, never
 * split. allowed_uids takes numbers or user names (resolved here, with
 * getpwnam). */
int config_load(const char *path, struct config *c, char *err, size_t err_size);

/* "250ms", "5s", "2min", "1h", "7d" (a plain number is seconds). Returns 0 or -EINVAL. */
int parse_duration(const char *s, uint64_t *ret_usec);
