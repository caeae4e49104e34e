/* The audit report for people and as JSON (see snapshot.h; the fields are
 * documented in packaging/man/tpmkmsctl.8). */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "audit.h"
#include "snapshot.h"
#include "util.h"

static void print_summary(const struct snapshot_report *r, FILE *out) {
        fprintf(out, "bbolt txid %" PRIu64 ", etcd revision %" PRIu64 ", %" PRIu64 " live keys (%" PRIu64
                " outside " "/registry/), %s\n", r->txid, r->revision, r->live_keys, r->outside_registry,
                r->hash_checked ? "SHA-256 checked" : "no SHA-256 to check (a backend file, not a saved snapshot)");
}

void snapshot_report_print(const struct snapshot_report *r, FILE *out) {
        int width = (int) strlen("RESOURCE");
        bool any_key_ids = false, any_required = false;

        for (size_t i = 0; i < r->n_resources; i++) {
                const int n = (int) strlen(r->resources[i].name) + (r->resources[i].required ? 1 : 0);

                width = n > width ? n : width;
                any_key_ids |= r->resources[i].n_key_ids > 0 || r->resources[i].kms_v2_malformed > 0;
                any_required |= r->resources[i].required;
        }
        print_summary(r, out);

        fprintf(out, "\n%-*s %10s", width, "RESOURCE", "OBJECTS");
        for (enum value_class c = 0; c < VALUE_CLASS_MAX; c++)
                fprintf(out, " %10s", value_classes[c].name);
        fputc('\n', out);
        for (size_t i = 0; i < r->n_resources; i++) {
                const struct resource *res = &r->resources[i];

                fprintf(out, "%s%-*s %10" PRIu64, res->name, width - (int) strlen(res->name),
                        res->required ? "*" : "", res->objects);
                for (enum value_class c = 0; c < VALUE_CLASS_MAX; c++)
                        fprintf(out, " %10" PRIu64, res->by_class[c]);
                fputc('\n', out);
        }
        if (any_required)
                fputs("(* required to be encrypted)\n", out);

        if (any_key_ids) {
                fputs("\nKMS v2 objects by provider and key id:\n", out);
                for (size_t i = 0; i < r->n_resources; i++) {
                        const struct resource *res = &r->resources[i];

                        for (size_t j = 0; j < res->n_key_ids; j++)
                                fprintf(out, "  %-*s %10" PRIu64 "  %s  %s\n", width, res->name,
                                        res->key_ids[j].objects, res->key_ids[j].provider, res->key_ids[j].key_id);
                        if (res->kms_v2_malformed > 0)
                                fprintf(out, "  %-*s %10" PRIu64 "  (malformed: no EncryptedObject with a key id)\n",
                                        width, res->name, res->kms_v2_malformed);
                }
        }

        if (!any_required)
                return;
        if (r->unencrypted == 0) {
                fputs("\nOK: every object of the required resource types is encrypted\n", out);
                return;
        }
        fputs("\nPlaintext objects of required resource types:\n", out);
        for (size_t i = 0; i < r->n_resources; i++)
                for (size_t j = 0; j < r->resources[i].n_plaintext_names; j++)
                        fprintf(out, "  %s %s\n", r->resources[i].name, r->resources[i].plaintext_names[j]);
        fprintf(out, "\nFAIL: %" PRIu64 " object(s) of required resource types stored unencrypted\n",
                r->unencrypted);
}

static void resource_json(const struct resource *res, FILE *out) {
        fputs("{\"resource\": ", out);
        json_string(out, res->name);
        fprintf(out, ", \"required\": %s, \"objects\": %" PRIu64, res->required ? "true" : "false", res->objects);
        for (enum value_class c = 0; c < VALUE_CLASS_MAX; c++)
                fprintf(out, ", \"%s\": %" PRIu64, value_classes[c].name, res->by_class[c]);
        fprintf(out, ", \"kms_v2_malformed\": %" PRIu64 ", \"kms_v2_key_ids\": [", res->kms_v2_malformed);
        for (size_t j = 0; j < res->n_key_ids; j++) {
                fprintf(out, "%s{\"provider\": ", j ? ", " : "");
                json_string(out, res->key_ids[j].provider);
                fputs(", \"key_id\": ", out);
                json_string(out, res->key_ids[j].key_id);
                fprintf(out, ", \"objects\": %" PRIu64 "}", res->key_ids[j].objects);
        }
        fputc(']', out);
        if (res->required) {
                fputs(", \"plaintext_names\": [", out);
                for (size_t j = 0; j < res->n_plaintext_names; j++) {
                        fputs(j ? ", " : "", out);
                        json_string(out, res->plaintext_names[j]);
                }
                fputc(']', out);
        }
        fputc('}', out);
}

void snapshot_report_print_json(const struct snapshot_report *r, FILE *out) {
        fprintf(out, "{\"hash_checked\": %s, \"txid\": %" PRIu64 ", \"revision\": %" PRIu64 ", \"live_keys\": %" PRIu64
                ", \"outside_registry\": %" PRIu64 ", \"unencrypted_required\": %" PRIu64 ", \"resources\": [",
                r->hash_checked ? "true" : "false", r->txid, r->revision, r->live_keys, r->outside_registry,
                r->unencrypted);
        for (size_t i = 0; i < r->n_resources; i++) {
                fputs(i ? ", " : "", out);
                resource_json(&r->resources[i], out);
        }
        fputs("]}\n", out);
}
