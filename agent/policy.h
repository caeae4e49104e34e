/* The role policy: which key versions a host keeps, and in which role, as a
 * pure function of what the central KMS answered and what the cache holds
 * (docs/key-lifecycle.md). No I/O, no logging, no locks: sync.c calls it,
 * logs what it says and persists the result; tests/unit/test-policy.c proves
 * it case by case.
 *
 *   Pre-Active -> staged; the newest Active -> primary; older Active or
 *   Deactivated -> retired; Compromised -> purged at once; Destroyed or no
 *   longer located -> missing (decrypt only), purged once it has been missing
 *   for purge_after; a missing version seen again in a usable state takes its
 *   role back.
 *
 * A key leaves a cache only when the central KMS clearly says so: an answer
 * that locates none of the cached central versions, or that would make more
 * than max_missing_percent of them go missing at once, changes nothing and
 * fails (a restored or empty central database, a changed access policy, a
 * wrong key group); so does a cached version now described as something
 * other than an AES-256 key.
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
        POLICY_MISSING,       /* went missing this sync (from -> KEY_ROLE_MISSING); `why` says
                               * what the central KMS said */
        POLICY_IGNORED,       /* in the group but not an AES-256 key: never cached */
};

struct policy_change {
        enum policy_event event;
        char id[KEY_ID_MAX];              /* key id ("" for POLICY_IGNORED) */
        char central_id[KEY_ID_MAX];      /* "" for a local version */
        enum key_role from, to;
        char why[128];                    /* POLICY_PURGED, POLICY_MISSING: the central state,
                                           * "no longer located at the central KMS" or how long it
                                           * was missing; POLICY_IGNORED: what it is */
        uint64_t missing_since_usec;      /* POLICY_MISSING, POLICY_PURGED of a missing version */
};

#define POLICY_PURGE_NEVER UINT64_MAX

struct policy_options {
        uint64_t purge_after_usec;        /* how long a version stays missing before it is
                                           * purged; POLICY_PURGE_NEVER: kept until
                                           * tpmkmsctl purge */
        unsigned max_missing_percent;     /* 0..100: a sync that would make more than this
                                           * share of the cached central versions go missing
                                           * at once is refused */
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
 * (CLOCK_REALTIME) stamps versions first seen and gone missing, and decides
 * whether purge_after has passed. Returns 0 with *ret filled (release with
 * policy_result_done), or a negative errno with why in err, and then nothing
 * may change: -EBADMSG the material of a cached central version changed
 * (ret->conflict names it), -EPROTO a cached central version is no longer
 * described as an AES-256 key (ret->conflict names it), -ENODATA the answer
 * locates none of the cached central versions or would make more than
 * opt->max_missing_percent of them go missing at once, -E2BIG more than
 * KEYRING_MAX_KEYS versions to keep, -EINVAL a key id cannot be made,
 * -ENOMEM. */
int policy_apply(const char *group, const struct central_key *keys, size_t n,
                 const struct keyring *old, uint64_t now_usec, const struct policy_options *opt,
                 struct policy_result *ret, char *err, size_t err_size);

/* The operator's purge (tpmkmsctl purge ID): old without the missing version
 * id. Returns 0 with *ret filled as by policy_apply (one POLICY_PURGED
 * change), or a negative errno with why in err: -ENOENT no version has that
 * id, -EPERM it is the primary, or not missing (the central KMS still has it:
 * it would come back at the next sync), -ENOMEM. */
int policy_purge(const struct keyring *old, const char *id, struct policy_result *ret,
                 char *err, size_t err_size);
void policy_result_done(struct policy_result *r);

/* The longest key group, percent-encoded, with which every central
 * identifier of up to CENTRAL_ID_MAX - 1 plain characters still makes a key
 * id: "kmip:" group "/" uid "." 16 hex digits, and the NUL, in KEY_ID_MAX. */
#define POLICY_GROUP_ENCODED_MAX (KEY_ID_MAX - 1 - 7 - 2 * KEY_CHECK_VALUE_SIZE - (CENTRAL_ID_MAX - 1))
_Static_assert(POLICY_GROUP_ENCODED_MAX == 105, "key group bound");

/* strlen(s) once percent-encoded as in policy_central_identity. */
size_t policy_encoded_length(const char *s);

/* "kmip:<group>/<uid>" with bytes outside key_id_make's alphabet
 * percent-encoded, so that distinct central identities stay distinct.
 * Returns 0 or -ENOBUFS. */
int policy_central_identity(const char *group, const char *uid, char *out, size_t size);
