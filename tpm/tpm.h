/* tpm/ — TPM 2.0 through tpm2-tss ESAPI: seal and unseal a 32-byte secret under
 * a PCR policy. The only folder that includes <tss2/...>; TSS2_RC values are
 * translated here into negative errno values:
 *   -ENODEV   no TPM reachable through the TCTI
 *   -EPERM    policy mismatch: the PCRs differ from those sealed to
 *   -ENOLCK   TPM in dictionary-attack lockout
 *   -EXDEV    the sealed object does not load: another TPM, or altered blobs
 *   -EINVAL   bad argument (selection string, blob sizes)
 *   -ENOMEM   out of memory
 *   -EIO      any other TPM failure (logged at debug level with the decoded RC)
 * Nothing is logged unless a log function is set with tpm_set_log() (or, for
 * debugging without one, the environment has TPMKMS_DEBUG set: then stderr).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "macro.h"

#define TPM_PCR_MAX 24
#define TPM_DIGEST_MAX 64        /* sha512 */
#define TPM_BLOB_MAX 1024         /* marshalled TPM2B_PUBLIC / TPM2B_PRIVATE */
#define TPM_SRK_HANDLE 0x81000001u

struct tpm;

/* Route this module's debug messages (decoded TPM response codes, why an SRK
 * was refused, ...) to fn; prio is a syslog priority (LOG_DEBUG). NULL, the
 * default, is silent. Call before using the module; not thread-safe. */
void tpm_set_log(void (*fn)(int prio, const char *msg));

/* A PCR selection in one bank, e.g. "sha256:7" or "sha256:0,2,7".
 * "none" gives an empty selection (mask 0): no PCR policy at all. */
struct tpm_pcr_selection {
        uint16_t hash_alg;  /* TPM2_ALG_SHA1/SHA256/SHA384/SHA512; 0 when empty */
        uint32_t mask;      /* bit n = PCR n */
};

/* The values of the selected PCRs, in ascending PCR order. */
struct tpm_pcr_values {
        struct tpm_pcr_selection sel;
        size_t count;
        size_t digest_size;
        uint8_t digest[TPM_PCR_MAX][TPM_DIGEST_MAX];
};

/* What seal produced: the sealed object's public and private areas,
 * marshalled (Tss2_MU) so they survive TPM restarts, plus the PCR values and
 * policy digest it was sealed to (for diagnostics: they are not secret). */
struct tpm_sealed {
        uint8_t public_blob[TPM_BLOB_MAX];
        size_t public_size;
        uint8_t private_blob[TPM_BLOB_MAX];
        size_t private_size;
        struct tpm_pcr_values pcrs;      /* PCR values at seal time */
        uint8_t policy_digest[TPM_DIGEST_MAX];
        size_t policy_digest_size;
};

/* "sha256:7", "sha1:0,7", "none". Banks sha1, sha256, sha384, sha512; PCRs
 * 0..23, decimal, comma-separated, no blanks, no duplicates. Returns 0, or
 * -EINVAL. */
int tpm_pcr_selection_parse(const char *s, struct tpm_pcr_selection *ret);
/* Writes e.g. "sha256:0,2,7" or "none" into buf. Returns 0, -EINVAL (unknown
 * hash_alg, PCR > 23), or -ENOBUFS. */
int tpm_pcr_selection_format(const struct tpm_pcr_selection *sel, char *buf, size_t size);
bool tpm_pcr_selection_is_empty(const struct tpm_pcr_selection *sel);

/* Open the TPM through a TCTI config string ("device:/dev/tpmrm0",
 * "swtpm:host=127.0.0.1,port=2321"), run Startup if needed, and make sure the
 * SRK exists at TPM_SRK_HANDLE (ECC P-256 TCG template, RSA-2048 fallback),
 * creating and persisting it on first use. Returns 0, -ENODEV, -ENOLCK, -EIO. */
int tpm_open(const char *tcti, struct tpm **ret);
/* Accepts NULL. Flushes everything transient this module created. */
void tpm_close(struct tpm *t);
static inline void tpm_closep(struct tpm **t) {
        tpm_close(*t);
}

/* Read the current values of the selected PCRs (an empty selection gives
 * count 0). Returns 0, -EINVAL, -ENODEV or -EIO (e.g. bank not allocated). */
int tpm_pcr_read(struct tpm *t, const struct tpm_pcr_selection *sel, struct tpm_pcr_values *ret);

/* Seal secret under PolicyPCR over sel's current values, read once and
 * reported in ret->pcrs. When sel is empty there is no PCR policy: the
 * object's policy is then PolicyCommandCode(TPM2_CC_Unseal), so that
 * userWithAuth stays clear either way and Unseal always needs a policy
 * session. The object is fixedTPM|fixedParent|noDA. The session is salted
 * to the SRK and uses AES-128-CFB parameter encryption. Returns 0, -EINVAL,
 * -ENODEV, -ENOLCK, -EIO (also when a selected bank is not allocated). */
int tpm_seal(struct tpm *t, const struct tpm_pcr_selection *sel,
             const uint8_t secret[AES256_KEY_SIZE], struct tpm_sealed *ret);

/* Load and unseal. Compares the policy digest of the current PCRs with the
 * sealed object's authPolicy first, so a mismatch is reported as -EPERM with
 * the current values in current (may be NULL; zeroed unless filled). Retries
 * TPM2_RC_RETRY, YIELDED, TESTING and PCR_CHANGED a bounded number of times.
 * The output is wiped on failure. Blobs that do not unmarshal or that the TPM
 * refuses to Load give -EXDEV; sizes out of range or a bad selection -EINVAL.
 * Returns 0, -EINVAL, -EPERM, -EXDEV, -ENOLCK, -ENODEV, -EIO. */
int tpm_unseal(struct tpm *t, const struct tpm_sealed *sealed,
               uint8_t secret[AES256_KEY_SIZE], struct tpm_pcr_values *current);

/* The PCR values for logs: "sha256:7=ab12..,8=cd34..", or "none" for an
 * empty selection. Returns 0, -EINVAL (inconsistent v) or -ENOBUFS; buf holds
 * "" on failure. */
int tpm_pcr_values_format(const struct tpm_pcr_values *v, char *buf, size_t size);
