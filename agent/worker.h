/* The worker: one thread that runs the daemon's slow work (TPM commands,
 * cache writes) off the event loop, one job at a time in the order given, so
 * that Encrypt, Decrypt, Status and tpmkmsctl status never wait behind a seal
 * or a hung TPM. Each job's done callback runs on the event loop.
 *
 * A job that never returns (a TPM that stopped answering: the vault reports
 * that, vault_tpm_busy) is abandoned at shutdown: worker_free waits a bounded
 * time, then leaves the thread to die with the process. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

typedef struct sd_event sd_event;

#define WORKER_QUEUE_MAX 8

struct worker;

/* fn runs on the worker thread and returns >= 0 or a negative errno;
 * done(userdata, r) then runs on the event loop with fn's result. */
typedef int (*worker_fn)(void *userdata);
typedef void (*worker_done_fn)(void *userdata, int r);

/* Returns 0 or a negative errno (logged). */
int worker_new(sd_event *e, struct worker **ret);
/* Stop after the running job, waiting for it at most wait_usec; the done of
 * every job the loop has not seen yet runs here (-ECANCELED for those never
 * started). Returns false when the running
 * job did not end in time: the thread is abandoned and may still use what
 * its job uses, so the caller must not free that. Accepts NULL (true). */
bool worker_free(struct worker *w, uint64_t wait_usec);

/* Queue a job. Returns 0, or -EBUSY when WORKER_QUEUE_MAX jobs wait already. */
int worker_submit(struct worker *w, worker_fn fn, worker_done_fn done, void *userdata);
