/* Fleet sync: a thread that keeps the keyring in step with the central KMS
 * (DESIGN.md, "Key lifecycle"). Every sync_interval (with jitter), on request
 * (tpmkmsctl sync) or on demand (a Decrypt for an unknown key id, rate
 * limited), it fetches the key group's versions, computes each one's role:
 *
 *   Pre-Active -> staged; newest Active -> primary; older Active or
 *   Deactivated -> retired; Compromised, Destroyed or gone -> purged
 *
 * (versions ordered by Initial Date, ties by Unique Identifier), persists the
 * sealed cache and only then publishes the new snapshot. A failed fetch
 * changes nothing: keys are dropped only because the server said so. Key
 * material that changes under the same Unique Identifier is refused and
 * alarmed. The request path never waits on any of this. */
#pragma once

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "kmip.h"
#include "util.h"
#include "config.h"
#include "keystore.h"

typedef struct sd_event sd_event;

#define SYNC_ON_DEMAND_INTERVAL_USEC (5u * USEC_PER_SEC)   /* at most one per 5 s */

struct sync_status {
        uint64_t last_success_usec;   /* CLOCK_REALTIME; 0 never */
        uint64_t last_attempt_usec;
        uint64_t syncs_ok, syncs_failed, on_demand;
        bool in_progress;
        char last_error[512];         /* "" when the last sync succeeded */
        char last_change[512];        /* what the last successful sync changed */
};

struct sync;

/* Start the sync thread. state_lock serialises writers of the cache and the
 * keyring slot (sync, rotate, reseal). on_done(userdata) runs on the event
 * loop after every sync attempt. Returns 0 or a negative errno (logged). */
int sync_new(const struct config *c, struct vault *v, pthread_mutex_t *state_lock,
             struct keyring_slot *keys, sd_event *e, void (*on_done)(void *userdata),
             void *userdata, struct sync **ret);
/* Stop the thread (a fetch in progress ends after its current request,
 * i.e. within [central] timeout) and free. A thread still running after
 * wait_usec (stuck in the TPM while it persists) is abandoned: returns false,
 * and the vault and keys it uses must not be freed. Accepts NULL (true). */
bool sync_free(struct sync *s, uint64_t wait_usec);

/* Requests are answered by a sync that STARTS after them: one already
 * running may have read the central state before the change the caller
 * wants to see. Each request returns a token, the number of that sync;
 * sync_done_generation() >= token means it has finished. */

/* The client key or its secret changed (tpmkmsctl enroll): the next sync
 * builds its central KMS client from the files and the vault again. */
void sync_reload_identity(struct sync *s);

/* Sync now. Returns the token. */
uint64_t sync_request(struct sync *s);
/* For a Decrypt with an unknown key id: join a sync that is queued but not
 * started, or queue one unless an on-demand sync was queued within
 * SYNC_ON_DEMAND_INTERVAL_USEC. Returns the token (park the call until it is
 * done), or 0 when rate limited (answer now). */
uint64_t sync_request_on_demand(struct sync *s);
/* The number of the last sync that finished (0: none yet). */
uint64_t sync_done_generation(struct sync *s);

void sync_get_status(struct sync *s, struct sync_status *ret);
size_t sync_endpoint_health(struct sync *s, struct central_endpoint_health *ret, size_t max);
/* Seconds since the last successful sync (or since start when none), and
 * whether that exceeds [central] max_staleness (never when it is off). */
bool sync_too_stale(struct sync *s, uint64_t *ret_age_usec);
