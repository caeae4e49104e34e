#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "backend.h"
#include "macro.h"
#include "util.h"
#include "keystore.h"
#include "log.h"
#include "metrics.h"
#include "sync.h"

/* [central] max_staleness exceeded: fail closed, as configured. */
static bool backend_too_stale(struct backend *b, char *msg, size_t size) {
        uint64_t age;

        if (!b->sync || !sync_too_stale(b->sync, &age))
                return false;
        snprintf(msg, size, "central KMS unreachable: keys last synced %llu s ago, over max_staleness",
                 (unsigned long long) (age / USEC_PER_SEC));
        return true;
}

static void backend_status(void *userdata, struct kms_status *st) {
        struct backend *b = userdata;
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        const struct key_version *primary;

        if (b->refusal) {
                snprintf(st->healthz, sizeof(st->healthz), "%s", b->refusal);
                return;
        }
        if (backend_too_stale(b, st->healthz, sizeof(st->healthz)))
                return;
        kr = keyring_slot_get(b->keys);
        primary = kr ? keyring_primary(kr) : NULL;
        if (!primary) {
                snprintf(st->healthz, sizeof(st->healthz), "no primary key in the cache");
                return;
        }
        snprintf(st->healthz, sizeof(st->healthz), "ok");
        snprintf(st->key_id, sizeof(st->key_id), "%s", primary->id);
}

/* Shared preamble: a refused cache answers FAILED_PRECONDITION with the
 * reason; an empty slot UNAVAILABLE. */
static int backend_snapshot(struct backend *b, struct kms_call *call, struct keyring **ret) {
        if (b->refusal) {
                snprintf(call->error, sizeof(call->error), "%s", b->refusal);
                return -EPERM;
        }
        if (backend_too_stale(b, call->error, sizeof(call->error)))
                return -ENOKEY;
        *ret = keyring_slot_get(b->keys);
        if (!*ret) {
                snprintf(call->error, sizeof(call->error), "no keys unsealed");
                return -ENOKEY;
        }
        return 0;
}

static int backend_encrypt(void *userdata, struct kms_call *call, const uint8_t *pt, size_t pt_len,
                           uint8_t ct[KMS_CIPHERTEXT_MAX], char key_id[KMS_KEY_ID_MAX + 1]) {
        struct backend *b = userdata;
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        const struct key_version *primary = NULL;
        int r;

        r = backend_snapshot(b, call, &kr);
        if (r >= 0) {
                primary = keyring_primary(kr);
                if (!primary) {
                        snprintf(call->error, sizeof(call->error), "no primary key to encrypt with");
                        r = -ENOKEY;
                }
        }
        if (r >= 0)
                r = envelope_seal(primary->kek, primary->id, pt, pt_len, ct, KMS_CIPHERTEXT_MAX);
        if (r >= 0)
                memcpy(key_id, primary->id, strlen(primary->id) + 1);
        log_audit("encrypt", primary ? primary->id : NULL, call->request_uid, call->peer, r);
        return r;
}

static int backend_decrypt(void *userdata, struct kms_call *call, const char *key_id,
                           const uint8_t *ct, size_t ct_len, uint8_t pt[KMS_PLAINTEXT_MAX]) {
        struct backend *b = userdata;
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        const struct key_version *k = NULL;
        int r;

        r = backend_snapshot(b, call, &kr);
        if (r >= 0) {
                k = keyring_find(kr, key_id);
                /* A version the fleet staged before this host synced it:
                 * park the call for one rate-limited sync (answered when it
                 * ends, see kms_server_retry_parked). Not audited yet. */
                if (!k && call->may_defer && b->sync) {
                        call->park_token = sync_request_on_demand(b->sync);
                        if (call->park_token > 0)
                                return -EAGAIN;
                }
                if (!k) {
                        snprintf(call->error, sizeof(call->error), "unknown key id");
                        r = -ENOENT;
                } else {
                        r = envelope_open(k->kek, k->id, ct, ct_len, pt, KMS_PLAINTEXT_MAX);
                        /* Longer than anything Encrypt makes: not ours. */
                        if (r == -ENOBUFS)
                                r = -EBADMSG;
                        if (r == -EBADMSG)
                                snprintf(call->error, sizeof(call->error),
                                         "ciphertext fails authentication under this key id");
                }
        }
        metrics_count_decrypt(b->metrics, k ? k->id : NULL, r >= 0);
        log_audit("decrypt", key_id, call->request_uid, call->peer, r);
        return r;
}

const struct kms_backend_ops backend_ops = {
        .status = backend_status,
        .encrypt = backend_encrypt,
        .decrypt = backend_decrypt,
};
