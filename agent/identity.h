/* This host's identity at the central KMS: the client key named by
 * [central] key_file and its certificate, cert_file.
 *
 * A key made by tpmkmsctl enroll is a TSS2 PRIVATE KEY file (tpm.h, "the
 * client key"): the private key never leaves this host's TPM, and its
 * authValue is kept only in the sealed cache (struct vault_identity), so
 * the key signs only where the cache key derives: this TPM, booted into
 * the measured state the cache is sealed to. A plain PEM key still works
 * (test PKIs, migration) but is only as safe as /etc: status and the
 * journal say so. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "keystore.h"

typedef struct evp_pkey_st EVP_PKEY;

#define IDENTITY_EXPIRY_WARN_DAYS 30
#define IDENTITY_SANS_MAX 8

struct identity_info {
        bool tpm_bound;            /* key_file is a TPM key */
        bool enrolled;             /* tpm_bound and the sealed cache holds its secret */
        char key_type[16];         /* "ecdsa-p256", "rsa-2048", "plain", "" unreadable */
        char subject[256];         /* the certificate's subject, "" unreadable */
        uint64_t not_after_usec;   /* the certificate's notAfter (CLOCK_REALTIME); 0 unreadable */
        char problem[320];         /* why the identity cannot be used or is weak; "" none */
};

/* Inspect key_file and cert_file of c against the vault's secret (may be
 * NULL: none); no TPM. Always fills ret. */
void identity_inspect(const struct config *c, const struct vault_identity *secret, struct identity_info *ret);

/* The certificate's notAfter in *ret_usec (CLOCK_REALTIME): the accessor for
 * metrics and status. Returns 0, or -ENOENT/-EACCES/-EINVAL. */
int identity_cert_not_after(const char *cert_file, uint64_t *ret_usec);

/* Whole days from now_usec until not_after_usec (negative once expired). */
int64_t identity_days_left(uint64_t not_after_usec, uint64_t now_usec);

/* The key to give central_options.key: NULL in *ret for a plain PEM
 * key_file (the kmip library reads it, and a warning is logged once per
 * call), else a key whose signatures run in the TPM with secret's
 * authValue. Returns 0, or -ENOKEY (a TPM key but no secret in the sealed
 * cache), -EKEYREJECTED (the secret is for another key), -EINVAL, -ENOENT,
 * -EACCES, -ENOMEM, with a message for status in err. */
int identity_load_key(const struct config *c, const struct vault_identity *secret, EVP_PKEY **ret,
                      char *err, size_t err_size);

struct identity_enroll_options {
        const char *subject;                  /* "CN=host1,O=Example" or "/CN=host1/O=Example" */
        int key_type;                         /* TPM_KEY_* */
        const char *sans[IDENTITY_SANS_MAX];  /* "DNS:name", "IP:addr", "URI:..." */
        size_t n_sans;
};

/* Make a new client key in the TPM at c's tcti with a random authValue,
 * and a CSR for it (signed by the TPM: subject, SANs, clientAuth extended
 * key usage, digitalSignature key usage). *ret_secret is what the sealed
 * cache must keep (vault_set_identity); *ret_key_pem the key file,
 * *ret_csr_pem the CSR (malloc'ed). Returns 0 or a negative errno with a
 * message in err. */
int identity_enroll(const struct config *c, const struct identity_enroll_options *o,
                    struct vault_identity *ret_secret, char **ret_key_pem, char **ret_csr_pem,
                    char *err, size_t err_size);

/* "ecdsa-p256" / "ecdsa", "rsa-2048" / "rsa". Returns TPM_KEY_* or -EINVAL. */
int identity_key_type_from_string(const char *s);
