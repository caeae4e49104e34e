/* tpmkmsctl status: what the daemon serves and why, rendered as text for
 * people or as one JSON object (the fields are documented in tpmkmsctl(8)). */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "config.h"
#include "keystore.h"

struct sync;
struct identity_info;

struct status_view {
        const struct config *config;
        const struct keyring *keys;   /* the published snapshot; NULL: none */
        bool refused;                 /* the sealed cache was refused */
        const struct tpm_pcr_selection *sealed_pcrs;   /* what the cache is sealed to; NULL unknown */
        uint64_t tpm_busy_usec;       /* how long a TPM command sequence has been running; 0 idle */
        const char *healthz;          /* what Status answers the apiserver */
        uint64_t started_usec;        /* CLOCK_REALTIME */
        struct sync *sync;            /* fleet mode, serving; else NULL */
        const struct identity_info *identity;   /* fleet mode: the client identity; else NULL */
};

void status_render(const struct status_view *v, bool json, FILE *out);
