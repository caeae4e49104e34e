/* The KMS v2 backend that the agent gives to plugin/: Encrypt and Decrypt
 * against the published keyring snapshot, Status from the daemon's state,
 * and an audit record per call. Never touches the TPM or the network. */
#pragma once

#include "keystore.h"
#include "plugin.h"

struct sync;
struct metrics;

struct backend {
        struct keyring_slot *keys;
        const char *refusal;      /* non-NULL: the sealed cache was refused; why */
        struct sync *sync;        /* fleet mode: staleness and on-demand sync */
        struct metrics *metrics;  /* decrypts by key id; NULL: metrics off */
};

extern const struct kms_backend_ops backend_ops;
