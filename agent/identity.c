/* The host's identity at the central KMS (see identity.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "identity.h"
#include "log.h"
#include "macro.h"
#include "util.h"

#define KEY_FILE_MAX (64u * 1024u)

DEFINE_TRIVIAL_CLEANUP_FUNC(X509 *, X509_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(X509_REQ *, X509_REQ_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(EVP_PKEY *, EVP_PKEY_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(BIO *, BIO_free);

int identity_key_type_from_string(const char *s) {
        if (!s)
                return -EINVAL;
        if (strcmp(s, "ecdsa-p256") == 0 || strcmp(s, "ecdsa") == 0)
                return TPM_KEY_ECC_P256;
        if (strcmp(s, "rsa-2048") == 0 || strcmp(s, "rsa") == 0)
                return TPM_KEY_RSA_2048;
        return -EINVAL;
}

/* The whole (small) file; *ret is NUL-terminated. */
static int read_small_file(const char *path, char **ret, size_t *ret_len) {
        _cleanup_close_ int fd = -1;
        _cleanup_free_ char *buf = NULL;
        struct stat st;
        size_t len = 0;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode) || st.st_size <= 0 || (uint64_t) st.st_size > KEY_FILE_MAX)
                return -EINVAL;
        buf = malloc((size_t) st.st_size + 1);
        if (!buf)
                return -ENOMEM;
        while (len < (size_t) st.st_size) {
                ssize_t n = read(fd, buf + len, (size_t) st.st_size - len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        break;
                len += (size_t) n;
        }
        buf[len] = '\0';
        *ret = TAKE_PTR(buf);
        *ret_len = len;
        return 0;
}

/* The TPM key in path: 0; -ENOMSG for a plain PEM; another errno. */
static int read_tpm_key(const char *path, struct tpm_key *ret) {
        _cleanup_free_ char *buf = NULL;
        size_t len = 0;
        int r;

        r = read_small_file(path, &buf, &len);
        if (r < 0)
                return r;
        r = tpm_key_pem_read(buf, len, ret);
        /* A plain key's text was read into buf: wipe it. */
        explicit_bzero(buf, len);
        return r;
}

static void key_digest(const struct tpm_key *k, uint8_t out[32]) {
        unsigned int n = 32;

        (void) EVP_Digest(k->public_blob, k->public_size, out, &n, EVP_sha256(), NULL);
}

int identity_cert_not_after(const char *cert_file, uint64_t *ret_usec) {
        _cleanup_(X509_freep) X509 *x = NULL;
        struct tm tm = {};
        FILE *f;
        time_t t;

        f = fopen(cert_file, "re");
        if (!f)
                return -errno;
        x = PEM_read_X509(f, NULL, NULL, NULL);
        fclose(f);
        ERR_clear_error();
        if (!x || ASN1_TIME_to_tm(X509_get0_notAfter(x), &tm) != 1)
                return -EINVAL;
        t = timegm(&tm);
        if (t < 0)
                return -EINVAL;
        *ret_usec = (uint64_t) t * USEC_PER_SEC;
        return 0;
}

int64_t identity_days_left(uint64_t not_after_usec, uint64_t now) {
        int64_t d = (int64_t) not_after_usec - (int64_t) now;

        /* Floor: a certificate expiring in 23 hours has 0 days left. */
        return d >= 0 ? d / (int64_t) USEC_PER_DAY : -((-d + (int64_t) USEC_PER_DAY - 1) / (int64_t) USEC_PER_DAY);
}

static void cert_subject(const char *cert_file, char *buf, size_t size) {
        _cleanup_(X509_freep) X509 *x = NULL;
        FILE *f = fopen(cert_file, "re");

        buf[0] = '\0';
        if (!f)
                return;
        x = PEM_read_X509(f, NULL, NULL, NULL);
        fclose(f);
        ERR_clear_error();
        if (x)
                (void) X509_NAME_oneline(X509_get_subject_name(x), buf, (int) size);
}

void identity_inspect(const struct config *c, const struct vault_identity *secret, struct identity_info *ret) {
        struct tpm_key k;
        struct tpm_key_public kp;
        uint8_t digest[32];
        int r;

        *ret = (struct identity_info) {};
        (void) identity_cert_not_after(c->cert_file, &ret->not_after_usec);
        cert_subject(c->cert_file, ret->subject, sizeof(ret->subject));

        r = read_tpm_key(c->key_file, &k);
        if (r == -ENOMSG) {
                snprintf(ret->key_type, sizeof(ret->key_type), "plain");
                errorf(ret->problem, sizeof(ret->problem),
                         "the client key %s is a plain PEM file, not bound to the TPM: anyone with a copy "
                         "of it can fetch every KEK (tpmkmsctl enroll; README, enrolment)", c->key_file);
                return;
        }
        if (r < 0) {
                errorf(ret->problem, sizeof(ret->problem), "the client key %s cannot be read: %s",
                         c->key_file, r == -EINVAL ? "not a key tpmkmsctl enroll makes" : strerror(-r));
                return;
        }
        ret->tpm_bound = true;
        (void) tpm_key_check(&k, &kp);
        snprintf(ret->key_type, sizeof(ret->key_type), "%s", kp.type == TPM_KEY_RSA_2048 ? "rsa-2048" : "ecdsa-p256");
        key_digest(&k, digest);
        if (!secret)
                errorf(ret->problem, sizeof(ret->problem),
                         "the client key %s is TPM-bound, but this host's sealed cache holds no secret for it: "
                         "it was enrolled on another host or with another state dir; re-enroll (README, "
                         "enrolment)", c->key_file);
        else if (memcmp(digest, secret->key_digest, sizeof(digest)) != 0)
                errorf(ret->problem, sizeof(ret->problem),
                         "the client key %s is not the key enrolled in this host's sealed cache; re-enroll "
                         "(README, enrolment)", c->key_file);
        else
                ret->enrolled = true;
}

int identity_load_key(const struct config *c, const struct vault_identity *secret, EVP_PKEY **ret,
                      char *err, size_t err_size) {
        struct tpm_key k;
        uint8_t digest[32];
        int r;

        *ret = NULL;
        r = read_tpm_key(c->key_file, &k);
        if (r == -ENOMSG) {
                log_warning("The client key %s is a plain PEM file, not bound to the TPM: a copy of /etc "
                            "fetches every KEK from the central KMS. Run tpmkmsctl enroll (README, enrolment).",
                            c->key_file);
                return 0;
        }
        if (r < 0) {
                errorf(err, err_size, "key file %s: %s", c->key_file,
                       r == -EINVAL ? "a TSS2 key that tpmkmsctl enroll does not make" : strerror(-r));
                return r;
        }
        if (!secret) {
                errorf(err, err_size, "the client key %s is TPM-bound, but this host's sealed cache holds no "
                       "secret for it (enrolled on another host, or the state dir was replaced): no TLS "
                       "session with the central KMS; re-enroll (README, enrolment)", c->key_file);
                return -ENOKEY;
        }
        key_digest(&k, digest);
        if (memcmp(digest, secret->key_digest, sizeof(digest)) != 0) {
                errorf(err, err_size, "the client key %s is not the key enrolled in this host's sealed cache: "
                       "no TLS session with the central KMS; re-enroll (README, enrolment)", c->key_file);
                return -EKEYREJECTED;
        }
        r = tpm_key_evp_pkey(c->tpm_tcti, &k, secret->auth, ret);
        if (r < 0)
                errorf(err, err_size, "cannot set up the TPM client key: %s", strerror(-r));
        return r;
}

/* "CN=a,O=b" or "/CN=a/O=b" (values without the separator). */
static int subject_parse(const char *s, X509_NAME *name, char *err, size_t err_size) {
        _cleanup_free_ char *copy = NULL;
        char sep = ',', *save = NULL;
        int n = 0;

        if (!s || !*s) {
                errorf(err, err_size, "--subject is empty");
                return -EINVAL;
        }
        if (*s == '/') {
                sep = '/';
                s++;
        }
        copy = strdup(s);
        if (!copy) {
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        for (char *tok = strtok_r(copy, (char[]) { sep, 0 }, &save); tok; tok = strtok_r(NULL, (char[]) { sep, 0 }, &save)) {
                char *eq = strchr(tok, '=');

                while (*tok == ' ')
                        tok++;
                if (!eq || eq == tok || !eq[1]) {
                        errorf(err, err_size, "--subject: '%s' is not KEY=VALUE (e.g. CN=host1,O=Example)", tok);
                        return -EINVAL;
                }
                *eq = '\0';
                if (X509_NAME_add_entry_by_txt(name, tok, MBSTRING_UTF8, (unsigned char *) eq + 1, -1, -1, 0) != 1) {
                        ERR_clear_error();
                        errorf(err, err_size, "--subject: unknown attribute '%s'", tok);
                        return -EINVAL;
                }
                n++;
        }
        if (n == 0) {
                errorf(err, err_size, "--subject names nothing");
                return -EINVAL;
        }
        return 0;
}

static int add_ext(STACK_OF(X509_EXTENSION) *exts, int nid, const char *value) {
        X509_EXTENSION *e = X509V3_EXT_conf_nid(NULL, NULL, nid, value);

        if (!e)
                return -EINVAL;
        if (!sk_X509_EXTENSION_push(exts, e)) {
                X509_EXTENSION_free(e);
                return -ENOMEM;
        }
        return 0;
}

static int make_csr(EVP_PKEY *pkey, const struct identity_enroll_options *o, char **ret, char *err,
                    size_t err_size) {
        _cleanup_(X509_REQ_freep) X509_REQ *req = X509_REQ_new();
        _cleanup_(BIO_freep) BIO *bio = BIO_new(BIO_s_mem());
        STACK_OF(X509_EXTENSION) *exts = sk_X509_EXTENSION_new_null();
        char sans[1024] = "", *data;
        long n;
        int r;

        if (!req || !bio || !exts) {
                sk_X509_EXTENSION_free(exts);
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        r = subject_parse(o->subject, X509_REQ_get_subject_name(req), err, err_size);
        for (size_t i = 0; r >= 0 && i < o->n_sans; i++)
                strappendf(sans, sizeof(sans), "%s%s", i ? "," : "", o->sans[i]);
        /* Part of RFC 5280 4.2.1.12: clientAuth is what a KMIP server checks
         * a client certificate for; the CA copies what it accepts. */
        if (r >= 0 && (add_ext(exts, NID_key_usage, "critical,digitalSignature") < 0 ||
                       add_ext(exts, NID_ext_key_usage, "clientAuth") < 0 ||
                       (o->n_sans > 0 && add_ext(exts, NID_subject_alt_name, sans) < 0))) {
                ERR_clear_error();
                errorf(err, err_size, "--san: not a subjectAltName (DNS:name, IP:address, URI:uri): %s", sans);
                r = -EINVAL;
        }
        if (r >= 0 && (X509_REQ_set_version(req, 0) != 1 || X509_REQ_set_pubkey(req, pkey) != 1 ||
                       X509_REQ_add_extensions(req, exts) != 1)) {
                errorf(err, err_size, "cannot build the CSR");
                r = -ENOMEM;
        }
        sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
        if (r < 0)
                return r;
        /* Signed in the TPM: the CSR proves the key's possession. */
        if (X509_REQ_sign(req, pkey, EVP_sha256()) <= 0) {
                const char *why = NULL;
                int flags = 0;

                (void) ERR_peek_error_data(&why, &flags);
                errorf(err, err_size, "cannot sign the CSR in the TPM: %s",
                       (flags & ERR_TXT_STRING) && why && *why ? why : "signing failed");
                ERR_clear_error();
                return -EIO;
        }
        if (PEM_write_bio_X509_REQ(bio, req) != 1 || (n = BIO_get_mem_data(bio, &data)) <= 0 ||
            !(*ret = strndup(data, (size_t) n))) {
                errorf(err, err_size, "out of memory");
                return -ENOMEM;
        }
        return 0;
}

int identity_enroll(const struct config *c, const struct identity_enroll_options *o,
                    struct vault_identity *ret_secret, char **ret_key_pem, char **ret_csr_pem,
                    char *err, size_t err_size) {
        _cleanup_(EVP_PKEY_freep) EVP_PKEY *pkey = NULL;
        _cleanup_free_ char *key_pem = NULL, *csr_pem = NULL;
        struct vault_identity *secret;
        struct tpm_key k;
        size_t len;
        int r;

        secret = OPENSSL_secure_zalloc(sizeof(*secret));
        if (!secret) {
                errorf(err, err_size, "out of locked memory");
                return -ENOMEM;
        }
        /* The authValue: random, known only to this process and, once
         * stored, to the sealed cache. */
        if (RAND_priv_bytes(secret->auth, sizeof(secret->auth)) != 1) {
                errorf(err, err_size, "no randomness for the client key's secret");
                r = -EIO;
                goto out;
        }
        {
                _cleanup_(tpm_closep) struct tpm *t = NULL;

                r = tpm_open(c->tpm_tcti, NULL, &t);
                if (r >= 0)
                        r = tpm_key_create(t, o->key_type, secret->auth, &k);
                if (r < 0) {
                        errorf(err, err_size, "cannot make the client key in the TPM at '%s': %s", c->tpm_tcti,
                               strerror(-r));
                        goto out;
                }
        }
        key_digest(&k, secret->key_digest);
        r = tpm_key_evp_pkey(c->tpm_tcti, &k, secret->auth, &pkey);
        if (r < 0) {
                errorf(err, err_size, "cannot set up the TPM client key: %s", strerror(-r));
                goto out;
        }
        r = make_csr(pkey, o, &csr_pem, err, err_size);
        if (r < 0)
                goto out;
        r = tpm_key_pem_write(&k, &key_pem, &len);
        if (r < 0) {
                errorf(err, err_size, "cannot encode the key file: %s", strerror(-r));
                goto out;
        }
        *ret_secret = *secret;
        *ret_key_pem = TAKE_PTR(key_pem);
        *ret_csr_pem = TAKE_PTR(csr_pem);
        r = 0;
out:
        OPENSSL_secure_clear_free(secret, sizeof(*secret));
        return r;
}
