/* tpmkmsctl doctor: the recovery runbook's triage (docs/runbook.md) as one
 * command. Each check gives a finding {check, ok|warning|failure, detail,
 * what to do}; it works with tpmkmsd stopped too (then the daemon's
 * findings are failures and the TPM and central KMS are still checked). */
#pragma once

#include <stdbool.h>
#include <stdio.h>

struct config;

/* Run every check for c and print the findings to out, as text or as one
 * JSON object. Returns the exit status: 0 all ok, 1 warnings, 2 failures. */
int doctor_run(const struct config *c, bool json, FILE *out);
