/* The role policy: which key versions a host keeps, and in which role, as a
 * pure function of what the central KMS answered and what the cache holds
 * (docs/key-lifecycle.md). No I/O, no logging, no locks: sync.c calls it,
 * logs what it says and persists the result; tests/unit/test-policy.c proves
 * it case by case.
 *
 *   Pre-Active -> staged; the newest Active -> primary; older Active or
 *   Deactivated -> retired; Compromised, Destroyed or gone -> purged
 *
 * Versions are ordered by creation (Initial Date), ties broken by the central
 * identifier. Keys made on this host before it joined a fleet (no central id)
 * stay, retired. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keystore.h"
#include "kmip.h"

enum policy_event {
        POLICY_ADDED,         /* a version new to this host, in role `to` */
        POLICY_ROLE_CHANGED,  /* from -> to */
        POLICY_PURGED,        /* dropped from the cache; `why` says what the central KMS said */
        POLICY_IGNORED,       /* in the group but not an AES-256 key: never cached */
};

struct policy_change {
        enum policy_event event;
        char id[KEY_ID_MAX];              /* key id ("" for POLICY_IGNORED) */
        char central_id[KEY_ID_MAX];      /* "" for a local version */
        enum key_role from, to;
        char why[96];                     /* POLICY_PURGED: the central state, or "no longer at
                                           * the central KMS"; POLICY_IGNORED: what it is */
};

struct policy_result {
        /* The new key set. KEK pointers point into the old keyring or the
         * central keys given: use it while both live (keyring_new copies). */
        struct key_version *versions;
        size_t n_versions;
        struct policy_change *changes;
        size_t n_changes;
        bool changed;                     /* the key set or a role differs from old */
        const struct key_version *conflict;  /* -EBADMSG: the cached version whose central
                                              * material changed */
};

/* Apply the policy to the central keys of `group` (in any order; not
 * modified) over the cached keyring old (NULL: none yet); now_usec
 * (CLOCK_REALTIME) stamps versions first seen. Returns 0 with *ret filled
 * (release with policy_result_done), or a negative errno with why in err:
 * -EBADMSG the material of a cached central version changed (ret->conflict
 * names it; the sync must be refused), -E2BIG more than KEYRING_MAX_KEYS
 * usable versions, -EINVAL a key id cannot be made, -ENOMEM. */
int policy_apply(const char *group, const struct central_key *keys, size_t n,
                 const struct keyring *old, uint64_t now_usec, struct policy_result *ret,
                 char *err, size_t err_size);
void policy_result_done(struct policy_result *r);

/* "kmip:<group>/<uid>" with bytes outside key_id_make's alphabet
 * percent-encoded, so that distinct central identities stay distinct.
 * Returns 0 or -ENOBUFS. */
int policy_central_identity(const char *group, const char *uid, char *out, size_t size);
