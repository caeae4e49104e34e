/* tpmkmsctl status: the daemon's state for people and as JSON (see status.h). */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "identity.h"
#include "macro.h"
#include "status.h"
#include "sync.h"
#include "util.h"

#define TPM_SLOW_USEC (5 * USEC_PER_SEC)

/* How long an endpoint in backoff waits before it is tried again (0: not in
 * backoff). next_attempt_usec is CLOCK_MONOTONIC. */
static uint64_t backoff_usec(const struct central_endpoint_health *h) {
        uint64_t now = now_usec(CLOCK_MONOTONIC);

        return h->next_attempt_usec > now ? h->next_attempt_usec - now : 0;
}

static void central_json(const struct status_view *d, FILE *out) {
        struct central_endpoint_health h[CENTRAL_ENDPOINTS_MAX];
        size_t n = sync_endpoint_health(d->sync, h, ARRAY_SIZE(h));
        struct sync_status st;
        char t1[32], t2[32];
        uint64_t age;

        sync_get_status(d->sync, &st);
        (void) sync_too_stale(d->sync, &age);
        format_utc(st.last_success_usec, t1, sizeof(t1));
        format_utc(st.last_attempt_usec, t2, sizeof(t2));
        fprintf(out, ", \"central\": {\"key_group\": ");
        json_string(out, d->config->key_group);
        fprintf(out, ", \"last_sync\": \"%s\", \"last_attempt\": \"%s\", \"staleness_seconds\": %" PRIu64
                ", \"max_staleness_seconds\": %" PRIu64 ", \"syncs_ok\": %" PRIu64 ", \"syncs_failed\": %" PRIu64
                ", \"on_demand\": %" PRIu64 ", \"in_progress\": %s, \"last_error\": ",
                t1, t2, age / USEC_PER_SEC, d->config->max_staleness_usec / USEC_PER_SEC, st.syncs_ok,
                st.syncs_failed, st.on_demand, st.in_progress ? "true" : "false");
        json_string(out, st.last_error);
        fputs(", \"last_change\": ", out);
        json_string(out, st.last_change);
        fputs(", \"endpoints\": [", out);
        for (size_t i = 0; i < n; i++) {
                format_utc(h[i].last_success_usec, t1, sizeof(t1));
                format_utc(h[i].last_failure_usec, t2, sizeof(t2));
                fprintf(out, "%s{\"name\": ", i ? ", " : "");
                json_string(out, h[i].name);
                fprintf(out, ", \"last_success\": \"%s\", \"last_failure\": \"%s\", \"consecutive_failures\": %u"
                        ", \"backoff_seconds\": %.1f, \"latency_ms\": %.1f, \"requests\": %" PRIu64
                        ", \"failures\": %" PRIu64 ", \"messages\": %" PRIu64 ", \"tls_resumed\": %" PRIu64
                        ", \"last_error\": ",
                        t1, t2, h[i].consecutive_failures, backoff_usec(&h[i]) / 1e6,
                        h[i].last_latency_usec / 1000.0, h[i].requests, h[i].failures, h[i].messages,
                        h[i].resumed);
                json_string(out, h[i].last_error);
                fputs("}", out);
        }
        fputs("]}", out);
}

static void central_text(const struct status_view *d, FILE *out) {
        struct central_endpoint_health h[CENTRAL_ENDPOINTS_MAX];
        size_t n = sync_endpoint_health(d->sync, h, ARRAY_SIZE(h));
        struct sync_status st;
        char t1[32];
        uint64_t age;
        bool stale;

        sync_get_status(d->sync, &st);
        stale = sync_too_stale(d->sync, &age);
        format_utc(st.last_success_usec, t1, sizeof(t1));
        fprintf(out, "central:       KMIP, key group %s\n", d->config->key_group);
        fprintf(out, "last sync:     %s (%" PRIu64 " s ago%s)%s\n", *t1 ? t1 : "never", age / USEC_PER_SEC,
                stale ? ", over max_staleness" : "", st.in_progress ? ", sync running" : "");
        fprintf(out, "last change:   %s\n", *st.last_change ? st.last_change : "-");
        fprintf(out, "sync error:    %s\n", *st.last_error ? st.last_error : "-");
        fprintf(out, "syncs:         %" PRIu64 " ok, %" PRIu64 " failed, %" PRIu64 " on demand\n",
                st.syncs_ok, st.syncs_failed, st.on_demand);
        for (size_t i = 0; i < n; i++) {
                uint64_t wait = backoff_usec(&h[i]);
                char backoff[48] = "";

                if (wait)
                        snprintf(backoff, sizeof(backoff), ", not tried again for %.0f s (backoff)", wait / 1e6);
                format_utc(h[i].last_success_usec, t1, sizeof(t1));
                fprintf(out, "  endpoint %s: %s, last success %s, %.1f ms%s%s%s\n", h[i].name,
                        h[i].consecutive_failures ? "FAILING" : "ok", *t1 ? t1 : "never",
                        h[i].last_latency_usec / 1000.0, backoff, *h[i].last_error ? ", error: " : "",
                        h[i].last_error);
        }
}

/* The client identity: what the central KMS sees of this host. days_left
 * and not_after are for people and for alerting (warn from
 * IDENTITY_EXPIRY_WARN_DAYS before). */
static void identity_render(const struct status_view *d, bool json, FILE *out) {
        const struct identity_info *id = d->identity;
        int64_t days = identity_days_left(id->not_after_usec, now_usec(CLOCK_REALTIME));
        char t[32];

        format_utc(id->not_after_usec, t, sizeof(t));
        if (json) {
                fputs(", \"identity\": {\"key_file\": ", out);
                json_string(out, d->config->key_file);
                fputs(", \"cert_file\": ", out);
                json_string(out, d->config->cert_file);
                fprintf(out, ", \"tpm_bound\": %s, \"enrolled\": %s, \"key_type\": \"%s\", \"subject\": ",
                        id->tpm_bound ? "true" : "false", id->enrolled ? "true" : "false", id->key_type);
                json_string(out, id->subject);
                if (id->not_after_usec)
                        fprintf(out, ", \"not_after\": \"%s\", \"days_left\": %" PRId64 ", \"expiry_warning\": %s",
                                t, days, days < IDENTITY_EXPIRY_WARN_DAYS ? "true" : "false");
                else
                        fputs(", \"not_after\": \"\", \"days_left\": null, \"expiry_warning\": true", out);
                fputs(", \"problem\": ", out);
                json_string(out, id->problem);
                fputs("}", out);
                return;
        }
        fprintf(out, "identity:      %s%s, %s\n", id->tpm_bound ? "TPM-bound " : "NOT TPM-bound ",
                *id->key_type ? id->key_type : "unreadable key", d->config->key_file);
        if (id->not_after_usec)
                fprintf(out, "certificate:   %s, expires %s (%" PRId64 " days left%s)\n", id->subject, t, days,
                        days < 0 ? ", EXPIRED" : days < IDENTITY_EXPIRY_WARN_DAYS ? ", RENEW SOON" : "");
        else
                fprintf(out, "certificate:   unreadable (%s)\n", d->config->cert_file);
        if (*id->problem)
                fprintf(out, "identity warning: %s\n", id->problem);
}

void status_render(const struct status_view *d, bool json, FILE *out) {
        const struct keyring *kr = d->keys;
        const struct key_version *p = kr ? keyring_primary(kr) : NULL;
        char pcrs[64], configured[64], created[32], seen[32], started[32], rotated[32], since[32], tpm[64];

        /* What the cache is sealed to is what protects it; the configuration
         * is only the least the daemon accepts. */
        (void) tpm_pcr_selection_format(&d->config->pcrs, configured, sizeof(configured));
        if (!d->sealed_pcrs || tpm_pcr_selection_format(d->sealed_pcrs, pcrs, sizeof(pcrs)) < 0)
                snprintf(pcrs, sizeof(pcrs), "unknown");
        /* A command sequence takes well under a second on a working TPM;
         * past that, say so (the keys keep serving from memory). */
        if (d->tpm_busy_usec > TPM_SLOW_USEC)
                snprintf(tpm, sizeof(tpm), "not answering for %" PRIu64 " s", d->tpm_busy_usec / USEC_PER_SEC);
        else
                snprintf(tpm, sizeof(tpm), "%s", d->tpm_busy_usec ? "in use" : "idle");
        format_utc(d->started_usec, started, sizeof(started));
        /* The last rotation is when the current primary was made (local
         * creation, or its central Initial Date): known after restarts too. */
        format_utc(p ? p->created_usec : 0, rotated, sizeof(rotated));

        if (json) {
                fprintf(out, "{\"state\": \"%s\", \"healthz\": ", d->refused ? "refused" : "serving");
                json_string(out, d->healthz);
                fprintf(out, ", \"pcrs\": \"%s\", \"configured_pcrs\": \"%s\", \"tpm\": \"%s\", "
                        "\"tpm_busy_seconds\": %" PRIu64 ", \"mode\": \"%s\", \"started\": \"%s\", "
                        "\"last_rotation\": \"%s\", \"primary\": ",
                        pcrs, configured, tpm, d->tpm_busy_usec / USEC_PER_SEC,
                        d->config->central_type == CENTRAL_KMIP ? "kmip" : "standalone", started, rotated);
                json_string(out, p ? p->id : "");
                fputs(", \"keys\": [", out);
                for (size_t i = 0; kr && i < keyring_size(kr); i++) {
                        const struct key_version *k = keyring_get(kr, i);
                        format_utc(k->created_usec, created, sizeof(created));
                        format_utc(k->first_seen_usec, seen, sizeof(seen));
                        format_utc(k->missing_since_usec, since, sizeof(since));
                        fprintf(out, "%s{\"id\": ", i ? ", " : "");
                        json_string(out, k->id);
                        fprintf(out, ", \"role\": \"%s\", \"central_id\": ", key_role_to_string(k->role));
                        json_string(out, k->central_id);
                        fprintf(out, ", \"created\": \"%s\", \"first_seen\": \"%s\", \"missing_since\": \"%s\"}",
                                created, seen, since);
                }
                fputs("]", out);
                if (d->identity)
                        identity_render(d, true, out);
                if (d->sync)
                        central_json(d, out);
                fputs("}\n", out);
                return;
        }

        fprintf(out, "state:         %s\n", d->refused ? "REFUSED" : "serving");
        fprintf(out, "healthz:       %s\n", d->healthz);
        fprintf(out, "mode:          %s\n", d->config->central_type == CENTRAL_KMIP ? "kmip" : "standalone");
        fprintf(out, "PCR policy:    %s (sealed; configured %s)\n", pcrs, configured);
        fprintf(out, "TPM:           %s\n", tpm);
        fprintf(out, "state dir:     %s\n", d->config->state_dir);
        fprintf(out, "started:       %s\n", started);
        fprintf(out, "last rotation: %s\n", *rotated ? rotated : "-");
        fprintf(out, "primary:       %s\n", p ? p->id : "-");
        fprintf(out, "keys:          %zu\n", kr ? keyring_size(kr) : 0);
        for (size_t i = 0; kr && i < keyring_size(kr); i++) {
                const struct key_version *k = keyring_get(kr, i);
                format_utc(k->created_usec, created, sizeof(created));
                format_utc(k->first_seen_usec, seen, sizeof(seen));
                format_utc(k->missing_since_usec, since, sizeof(since));
                fprintf(out, "  %-8s %s  created %s  first seen %s%s%s%s%s\n", key_role_to_string(k->role),
                        k->id, created, seen, *k->central_id ? "  central " : "", k->central_id,
                        *since ? "  MISSING since " : "", since);
        }
        if (d->identity)
                identity_render(d, false, out);
        if (d->sync)
                central_text(d, out);
}
