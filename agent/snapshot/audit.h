/* The audit report, shared by audit.c (which fills it) and report.c (which
 * prints it); internal to agent/snapshot/. Every string in it is printable
 * ASCII: other bytes of the file appear as \xNN. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* How a value is stored, by its prefix (docs/kms-v2-contract.md). The
 * identity provider stores objects unprefixed: they count as plaintext. */
enum value_class {
        VALUE_PLAINTEXT,
        VALUE_KMS_V2,
        VALUE_KMS_V1,
        VALUE_AESCBC,
        VALUE_AESGCM,
        VALUE_SECRETBOX,
        VALUE_UNKNOWN_PROVIDER,         /* k8s:enc: and something else */
        VALUE_CLASS_MAX,
};

struct value_class_info {
        const char *prefix;             /* NULL for plaintext */
        const char *name;               /* JSON member and column */
};
extern const struct value_class_info value_classes[VALUE_CLASS_MAX];

struct key_id_count {
        char *provider;                 /* the KMS v2 provider name of the prefix */
        char *key_id;                   /* the EncryptedObject's keyID */
        uint64_t objects;
};

struct resource {
        char *name;                     /* "secrets", "certificates.cert-manager.io" */
        bool required;
        uint64_t objects;
        uint64_t by_class[VALUE_CLASS_MAX];
        uint64_t kms_v2_malformed;      /* the KMS v2 prefix, but no EncryptedObject with a key id */
        struct key_id_count *key_ids;   /* sorted by provider, then key id */
        size_t n_key_ids, key_ids_size;
        char **plaintext_names;         /* required types only: "namespace/name", sorted */
        size_t n_plaintext_names, plaintext_names_size;
};

struct snapshot_report {
        bool hash_checked;              /* the SHA-256 etcdctl snapshot save appends */
        uint64_t txid;                  /* the bbolt transaction */
        uint64_t revision;              /* the newest etcd revision */
        uint64_t live_keys;
        uint64_t outside_registry;      /* live keys not under /registry/ */
        uint64_t unencrypted;           /* plaintext objects of required types */
        struct resource *resources;     /* sorted by name */
        size_t n_resources, resources_size;
};
