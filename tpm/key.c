/* tpm/key.c: the client key's file format and the key as OpenSSL sees it
 * (see tpm.h, "the client key").
 *
 * Why not the tpm2-openssl provider: it opens its TPM connection when the
 * provider is loaded and keeps it until it is unloaded (OSSL_provider_init
 * calls Esys_Initialize), and it authorizes keys with a password session,
 * which sends the authValue over the bus in clear. On a TPM without a
 * resource manager (swtpm's socket serves one connection at a time and
 * queues the next; /dev/tpm0 refuses a second open) the daemon's own TPM
 * use (cache writes advance the NV counter) would wait behind it, and the
 * authValue is the one secret that binds the key to the measured state.
 * So the private operation is an OpenSSL key method that calls tpm.c per
 * signature (TPM opened, key loaded, signed through a salted session,
 * flushed, closed) and the file stays the TSS2 PRIVATE KEY format those
 * tools read.
 *
 * The EC_KEY_METHOD and RSA_METHOD interfaces are deprecated in OpenSSL 3
 * but supported throughout 3.x: a key with a non-default method is
 * "foreign" and every EVP operation on it (TLS CertificateVerify,
 * X509_REQ_sign) goes through the method. Writing a provider for two
 * private operations would be several times this file. */
#define OPENSSL_SUPPRESS_DEPRECATED 1

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/asn1t.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>

#include "macro.h"
#include "tpm.h"

#define TSS2_PEM_NAME "TSS2 PRIVATE KEY"
#define TSS2_LOADABLE_KEY_OID "2.23.133.10.1.3"   /* draft-bottomley-tpm2-keys, 3.1 */

/* ---- TSS2 PRIVATE KEY (ASN.1) ------------------------------------------- */

typedef struct {
        ASN1_OBJECT *type;
        ASN1_BOOLEAN empty_auth;
        ASN1_INTEGER *parent;
        ASN1_OCTET_STRING *pubkey;
        ASN1_OCTET_STRING *privkey;
} TSSPRIVKEY;

ASN1_SEQUENCE(TSSPRIVKEY) = {
        ASN1_SIMPLE(TSSPRIVKEY, type, ASN1_OBJECT),
        ASN1_EXP_OPT(TSSPRIVKEY, empty_auth, ASN1_FBOOLEAN, 0),
        ASN1_SIMPLE(TSSPRIVKEY, parent, ASN1_INTEGER),
        ASN1_SIMPLE(TSSPRIVKEY, pubkey, ASN1_OCTET_STRING),
        ASN1_SIMPLE(TSSPRIVKEY, privkey, ASN1_OCTET_STRING),
} static_ASN1_SEQUENCE_END(TSSPRIVKEY)

static void tssprivkey_free(TSSPRIVKEY *k) {
        ASN1_item_free((ASN1_VALUE *) k, ASN1_ITEM_rptr(TSSPRIVKEY));
}
DEFINE_TRIVIAL_CLEANUP_FUNC(TSSPRIVKEY *, tssprivkey_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(BIO *, BIO_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(ASN1_OBJECT *, ASN1_OBJECT_free);

int tpm_key_pem_write(const struct tpm_key *k, char **ret, size_t *ret_len) {
        _cleanup_(tssprivkey_freep) TSSPRIVKEY *tk = NULL;
        _cleanup_(BIO_freep) BIO *bio = NULL;
        unsigned char *der = NULL;
        char *data, *out;
        long n;
        int len;

        if (!k || !ret || !ret_len || tpm_key_check(k, NULL) < 0)
                return -EINVAL;
        tk = (TSSPRIVKEY *) ASN1_item_new(ASN1_ITEM_rptr(TSSPRIVKEY));
        if (!tk)
                return -ENOMEM;
        ASN1_OBJECT_free(tk->type);
        tk->type = OBJ_txt2obj(TSS2_LOADABLE_KEY_OID, 1);
        tk->empty_auth = 0;   /* the key has an authValue: absent on the wire */
        if (!tk->type || ASN1_INTEGER_set_uint64(tk->parent, k->parent) != 1 ||
            ASN1_OCTET_STRING_set(tk->pubkey, k->public_blob, (int) k->public_size) != 1 ||
            ASN1_OCTET_STRING_set(tk->privkey, k->private_blob, (int) k->private_size) != 1)
                return -ENOMEM;
        len = ASN1_item_i2d((ASN1_VALUE *) tk, &der, ASN1_ITEM_rptr(TSSPRIVKEY));
        if (len <= 0)
                return -ENOMEM;
        bio = BIO_new(BIO_s_mem());
        if (!bio || PEM_write_bio(bio, TSS2_PEM_NAME, "", der, len) <= 0) {
                OPENSSL_free(der);
                return -ENOMEM;
        }
        OPENSSL_free(der);
        n = BIO_get_mem_data(bio, &data);
        if (n <= 0)
                return -ENOMEM;
        out = malloc((size_t) n + 1);
        if (!out)
                return -ENOMEM;
        memcpy(out, data, (size_t) n);
        out[n] = '\0';
        *ret = out;
        *ret_len = (size_t) n;
        return 0;
}

int tpm_key_pem_read(const void *buf, size_t len, struct tpm_key *ret) {
        _cleanup_(tssprivkey_freep) TSSPRIVKEY *tk = NULL;
        _cleanup_(ASN1_OBJECT_freep) ASN1_OBJECT *oid = NULL;
        _cleanup_(BIO_freep) BIO *bio = NULL;
        char *name = NULL, *header = NULL;
        unsigned char *der = NULL;
        const unsigned char *p;
        struct tpm_key k = {};
        uint64_t parent;
        long der_len = 0;
        int r = -EINVAL;

        if (!buf || !ret || len > INT32_MAX)
                return -EINVAL;
        bio = BIO_new_mem_buf(buf, (int) len);
        if (!bio)
                return -ENOMEM;
        if (PEM_read_bio(bio, &name, &header, &der, &der_len) != 1) {
                ERR_clear_error();
                return -ENOMSG;
        }
        if (strcmp(name, TSS2_PEM_NAME) != 0) {
                r = -ENOMSG;
                goto out;
        }
        p = der;
        tk = (TSSPRIVKEY *) ASN1_item_d2i(NULL, &p, der_len, ASN1_ITEM_rptr(TSSPRIVKEY));
        oid = OBJ_txt2obj(TSS2_LOADABLE_KEY_OID, 1);
        if (!tk || !oid || p != der + der_len || OBJ_cmp(tk->type, oid) != 0 || tk->empty_auth ||
            ASN1_INTEGER_get_uint64(&parent, tk->parent) != 1 || parent > UINT32_MAX ||
            tk->pubkey->length <= 0 || tk->pubkey->length > TPM_BLOB_MAX ||
            tk->privkey->length <= 0 || tk->privkey->length > TPM_BLOB_MAX)
                goto out;
        k.parent = (uint32_t) parent;
        memcpy(k.public_blob, tk->pubkey->data, (size_t) tk->pubkey->length);
        k.public_size = (size_t) tk->pubkey->length;
        memcpy(k.private_blob, tk->privkey->data, (size_t) tk->privkey->length);
        k.private_size = (size_t) tk->privkey->length;
        if (tpm_key_check(&k, NULL) < 0)
                goto out;
        *ret = k;
        r = 0;
out:
        ERR_clear_error();
        OPENSSL_free(name);
        OPENSSL_free(header);
        OPENSSL_free(der);
        return r;
}

/* ---- the key behind an OpenSSL key method ------------------------------- */

struct key_ref {
        char tcti[256];
        struct tpm_key key;
        uint8_t *auth;   /* TPM_KEY_AUTH_SIZE bytes, secure heap */
};

static void key_ref_free(struct key_ref *kr) {
        if (!kr)
                return;
        OPENSSL_secure_clear_free(kr->auth, TPM_KEY_AUTH_SIZE);
        free(kr);
}

static void ex_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp) {
        key_ref_free(ptr);
}

static pthread_once_t methods_once = PTHREAD_ONCE_INIT;
static int ec_index = -1, rsa_index = -1;
static EC_KEY_METHOD *ec_method;
static RSA_METHOD *rsa_method;

/* Why a private operation failed, as an OpenSSL error with text: the TLS
 * layer reports the queue's oldest error (agent/kmip/tls.c). */
static void key_error(int r) {
        const char *why;

        switch (r) {
        case -EACCES:
                why = "the TPM refused the client key's authorization value (the key file and the sealed "
                      "cache are not a pair: re-enroll)";
                break;
        case -EXDEV:
                why = "the client key does not load in this TPM (made by another TPM, or the TPM was cleared)";
                break;
        case -ENODEV:
                why = "no TPM answers for the client key";
                break;
        case -ENOLCK:
                why = "the TPM is in dictionary-attack lockout";
                break;
        case -EDEADLK:
                why = "the TPM is already open in this thread";
                break;
        default:
                why = "the TPM failed to sign with the client key";
        }
        ERR_raise_data(ERR_LIB_USER, ERR_R_OPERATION_FAIL, "%s (%s)", why, strerror(-r));
}

static int key_run(const struct key_ref *kr, bool rsa, const uint8_t *in, size_t in_size, uint8_t *out_a,
                   uint8_t *out_b) {
        _cleanup_(tpm_closep) struct tpm *t = NULL;
        int r;

        r = tpm_open(kr->tcti, NULL, &t);
        if (r >= 0)
                r = rsa ? tpm_key_rsa_private(t, &kr->key, kr->auth, in, in_size, out_a)
                        : tpm_key_sign_ecdsa(t, &kr->key, kr->auth, in, in_size, out_a, out_b);
        if (r < 0)
                key_error(r);
        return r;
}

static ECDSA_SIG *ec_sign_sig(const unsigned char *dgst, int dgst_len, const BIGNUM *kinv, const BIGNUM *rp,
                              EC_KEY *eckey) {
        const struct key_ref *kr = EC_KEY_get_ex_data(eckey, ec_index);
        uint8_t rb[32], sb[32];
        BIGNUM *r = NULL, *s = NULL;
        ECDSA_SIG *sig;

        if (!kr || dgst_len <= 0 || key_run(kr, false, dgst, (size_t) dgst_len, rb, sb) < 0)
                return NULL;
        sig = ECDSA_SIG_new();
        r = BN_bin2bn(rb, sizeof(rb), NULL);
        s = BN_bin2bn(sb, sizeof(sb), NULL);
        if (!sig || !r || !s || ECDSA_SIG_set0(sig, r, s) != 1) {
                ECDSA_SIG_free(sig);
                BN_free(r);
                BN_free(s);
                return NULL;
        }
        return sig;
}

static int ec_sign(int type, const unsigned char *dgst, int dlen, unsigned char *sig, unsigned int *siglen,
                   const BIGNUM *kinv, const BIGNUM *r, EC_KEY *eckey) {
        ECDSA_SIG *s = ec_sign_sig(dgst, dlen, kinv, r, eckey);
        int n;

        if (!s)
                return 0;
        n = i2d_ECDSA_SIG(s, &sig);
        ECDSA_SIG_free(s);
        if (n <= 0)
                return 0;
        *siglen = (unsigned int) n;
        return 1;
}

/* RSA_private_encrypt through the TPM: OpenSSL pads (PSS: RSA_NO_PADDING
 * here; PKCS#1 v1.5 signatures: RSA_PKCS1_PADDING, padded below). */
static int rsa_priv_enc(int flen, const unsigned char *from, unsigned char *to, RSA *rsa, int padding) {
        const struct key_ref *kr = RSA_get_ex_data(rsa, rsa_index);
        uint8_t block[256];

        if (!kr || RSA_size(rsa) != (int) sizeof(block))
                return -1;
        if (padding == RSA_PKCS1_PADDING) {
                if (RSA_padding_add_PKCS1_type_1(block, sizeof(block), from, flen) != 1)
                        return -1;
        } else if (padding == RSA_NO_PADDING && flen == (int) sizeof(block))
                memcpy(block, from, sizeof(block));
        else
                return -1;
        if (key_run(kr, true, block, sizeof(block), to, NULL) < 0)
                return -1;
        return (int) sizeof(block);
}

/* The key never decrypts anything for us: refuse. */
static int rsa_priv_dec(int flen, const unsigned char *from, unsigned char *to, RSA *rsa, int padding) {
        return -1;
}

static void methods_init(void) {
        int (*sign_setup)(EC_KEY *, BN_CTX *, BIGNUM **, BIGNUM **) = NULL;

        ec_index = CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_EC_KEY, 0, NULL, NULL, NULL, ex_free);
        rsa_index = CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_RSA, 0, NULL, NULL, NULL, ex_free);
        ec_method = EC_KEY_METHOD_new(EC_KEY_OpenSSL());
        if (ec_method) {
                EC_KEY_METHOD_get_sign(EC_KEY_OpenSSL(), NULL, &sign_setup, NULL);
                EC_KEY_METHOD_set_sign(ec_method, ec_sign, sign_setup, ec_sign_sig);
        }
        rsa_method = RSA_meth_dup(RSA_PKCS1_OpenSSL());
        if (rsa_method && (RSA_meth_set1_name(rsa_method, "tpmkms TPM client key") != 1 ||
                           RSA_meth_set_priv_enc(rsa_method, rsa_priv_enc) != 1 ||
                           RSA_meth_set_priv_dec(rsa_method, rsa_priv_dec) != 1)) {
                RSA_meth_free(rsa_method);
                rsa_method = NULL;
        }
}

static EVP_PKEY *ec_pkey(const struct tpm_key_public *kp, struct key_ref **kr) {
        EC_KEY *ec = EC_KEY_new_by_curve_name(NID_X9_62_prime256v1);
        BIGNUM *x = BN_bin2bn(kp->x, sizeof(kp->x), NULL), *y = BN_bin2bn(kp->y, sizeof(kp->y), NULL);
        EVP_PKEY *pkey = NULL;

        if (!ec || !x || !y || EC_KEY_set_public_key_affine_coordinates(ec, x, y) != 1 ||
            EC_KEY_set_method(ec, ec_method) != 1 || EC_KEY_set_ex_data(ec, ec_index, *kr) != 1)
                goto out;
        *kr = NULL;   /* the EC_KEY owns it now */
        pkey = EVP_PKEY_new();
        if (pkey && EVP_PKEY_assign_EC_KEY(pkey, ec) == 1)
                ec = NULL;
        else {
                EVP_PKEY_free(pkey);
                pkey = NULL;
        }
out:
        EC_KEY_free(ec);
        BN_free(x);
        BN_free(y);
        return pkey;
}

static EVP_PKEY *rsa_pkey(const struct tpm_key_public *kp, struct key_ref **kr) {
        RSA *rsa = RSA_new_method(NULL);
        BIGNUM *n = BN_bin2bn(kp->n, (int) kp->n_size, NULL), *e = BN_new();
        EVP_PKEY *pkey = NULL;

        if (!rsa || !n || !e || BN_set_word(e, kp->exponent) != 1 || RSA_set_method(rsa, rsa_method) != 1 ||
            RSA_set0_key(rsa, n, e, NULL) != 1)
                goto out;
        n = e = NULL;
        if (RSA_set_ex_data(rsa, rsa_index, *kr) != 1)
                goto out;
        *kr = NULL;
        pkey = EVP_PKEY_new();
        if (pkey && EVP_PKEY_assign_RSA(pkey, rsa) == 1)
                rsa = NULL;
        else {
                EVP_PKEY_free(pkey);
                pkey = NULL;
        }
out:
        RSA_free(rsa);
        BN_free(n);
        BN_free(e);
        return pkey;
}

int tpm_key_evp_pkey(const char *tcti, const struct tpm_key *k, const uint8_t auth[TPM_KEY_AUTH_SIZE],
                     EVP_PKEY **ret) {
        struct tpm_key_public kp;
        struct key_ref *kr;
        EVP_PKEY *pkey;

        if (!tcti || strlen(tcti) >= sizeof(kr->tcti) || !k || !auth || !ret || tpm_key_check(k, &kp) < 0)
                return -EINVAL;
        (void) pthread_once(&methods_once, methods_init);
        if (!ec_method || !rsa_method || ec_index < 0 || rsa_index < 0)
                return -ENOMEM;

        kr = calloc(1, sizeof(*kr));
        if (!kr)
                return -ENOMEM;
        kr->auth = OPENSSL_secure_malloc(TPM_KEY_AUTH_SIZE);
        if (!kr->auth) {
                free(kr);
                return -ENOMEM;
        }
        memcpy(kr->auth, auth, TPM_KEY_AUTH_SIZE);
        snprintf(kr->tcti, sizeof(kr->tcti), "%s", tcti);
        kr->key = *k;

        pkey = kp.type == TPM_KEY_ECC_P256 ? ec_pkey(&kp, &kr) : rsa_pkey(&kp, &kr);
        key_ref_free(kr);   /* NULL once the key owns it */
        if (!pkey)
                return -ENOMEM;
        *ret = pkey;
        return 0;
}
