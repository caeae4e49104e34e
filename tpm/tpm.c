/* tpm/ — the cache key (TPM2_HMAC of a TPM-generated key), the legacy sealed
 * cache key, and an NV rollback counter, with tpm2-tss ESAPI.
 *
 * Spec references are to the TCG TPM 2.0 Library Specification (Part 1
 * Architecture, Part 2 Structures, Part 3 Commands), rev. 1.59, and to the
 * TCG TPM v2.0 Provisioning Guidance for the SRK.
 *
 * There is no resource manager behind every TCTI (swtpm on a socket has
 * none, and only three transient object slots): every transient object and
 * session this file creates lives in a struct tpm_handle that flushes it when
 * it goes out of scope, on every path. */

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>

#include <openssl/evp.h>
#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_sys.h>
#include <tss2/tss2_tctildr.h>

#include "macro.h"
#include "util.h"
#include "tpm.h"

/* Bounded retries for warnings that mean "try again" (Part 2, TPM_RC:
 * TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING) and for TPM_RC_PCR_CHANGED
 * between PolicyPCR and Unseal (Part 3, TPM2_PolicyPCR). */
#define TPM_RETRY_MAX 5
#define TPM_RETRY_SLEEP_MS 20

/* Three octets select PCR 0..23, the PC Client minimum (Part 2,
 * TPMS_PCR_SELECT). The same encoding is used for computing the policy and
 * for sending PolicyPCR, so the two digests agree byte for byte. */
#define TPM_PCR_SELECT_SIZE 3

struct tpm {
        TSS2_TCTI_CONTEXT *tcti;
        ESYS_CONTEXT *esys;
        ESYS_TR srk;                    /* persistent: closed, never flushed */
        bool locked;                    /* holds tpm_lock (see tpm_open) */
};

/* One TPM connection at a time in this process, whichever thread asks: the
 * sync thread (the client key signs during a TLS handshake; cache writes
 * advance the NV counter) and the event loop (start, reseal, enroll) each
 * open the TPM per operation. swtpm's socket serves one connection at a
 * time and queues the next, /dev/tpm0 refuses a second open: without this
 * lock, a second context would wait on the TPM instead of on a mutex, or
 * fail. A thread that opens the same TPM twice would wait for itself:
 * -EDEADLK instead of a hang. A thread holding the lock may open another
 * TPM (another tcti: a test comparing two TPMs) without taking it again. */
static pthread_mutex_t tpm_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread bool tpm_lock_held;
static __thread char tpm_lock_tcti[256];

/* ---- logging ------------------------------------------------------------ */

static void (*log_fn)(int prio, const char *msg);

void tpm_set_log(void (*fn)(int prio, const char *msg)) {
        log_fn = fn;
}

static void log_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void log_debug(const char *fmt, ...) {
        char msg[512];
        va_list ap;

        if (!log_fn && !secure_getenv("TPMKMS_DEBUG"))
                return;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);

        if (log_fn)
                log_fn(LOG_DEBUG, msg);
        else
                fprintf(stderr, "tpm: %s\n", msg);
}

/* ---- TSS2_RC translation: the only place a TSS2_RC becomes an errno ------ */

/* The TPM's own response code with the handle/session/parameter number
 * stripped (Part 2, TPM_RC: format-one codes carry the number in bits 8-11
 * and bit 6), so it can be compared with the TPM2_RC_* constants. Returns 0
 * for codes that do not come from a TPM. */
static TSS2_RC tpm_rc_code(TSS2_RC rc) {
        TSS2_RC layer = rc & TSS2_RC_LAYER_MASK;

        if (layer != TSS2_TPM_RC_LAYER && layer != TSS2_RESMGR_TPM_RC_LAYER)
                return 0;
        rc &= ~TSS2_RC_LAYER_MASK;
        if (rc & TPM2_RC_FMT1)
                return rc & (TPM2_RC_FMT1 | 0x3f);
        return rc & 0xfff;
}

static bool tpm_rc_is_retryable(TSS2_RC rc) {
        switch (tpm_rc_code(rc)) {
        case TPM2_RC_RETRY:
        case TPM2_RC_YIELDED:
        case TPM2_RC_TESTING:
        case TPM2_RC_PCR_CHANGED:
                return true;
        default:
                return false;
        }
}

/* Translate rc once, log it decoded at debug level. fallback is what a TPM
 * error (not a warning) means in the caller's context: -EIO in general,
 * -EXDEV for Load, where the TPM rejecting the blobs means they were made by
 * another TPM or altered. */
static int tpm_rc_to_errno(TSS2_RC rc, int fallback, const char *what) {
        TSS2_RC layer = rc & TSS2_RC_LAYER_MASK, code = tpm_rc_code(rc);
        int r;

        if (rc == TSS2_RC_SUCCESS)
                return 0;

        if (layer == TSS2_TPM_RC_LAYER || layer == TSS2_RESMGR_TPM_RC_LAYER) {
                if (code == TPM2_RC_LOCKOUT)
                        r = -ENOLCK;
                else if (code == TPM2_RC_POLICY_FAIL)
                        r = -EPERM;
                else if ((code & TPM2_RC_WARN) == TPM2_RC_WARN && !(code & TPM2_RC_FMT1))
                        r = -EIO;       /* resources, retries exhausted: not the blob's fault */
                else
                        r = fallback;
        } else if (layer == TSS2_TCTI_RC_LAYER)
                r = -ENODEV;
        else {
                switch (rc & ~TSS2_RC_LAYER_MASK) {
                case TSS2_BASE_RC_NO_CONNECTION:
                case TSS2_BASE_RC_IO_ERROR:
                        r = -ENODEV;
                        break;
                case TSS2_BASE_RC_MEMORY:
                        r = -ENOMEM;
                        break;
                default:
                        r = -EIO;
                }
        }

        log_debug("%s failed: 0x%x %s -> %s", what, rc, Tss2_RC_Decode(rc), strerror(-r));
        return r;
}

static void retry_sleep(unsigned attempt) {
        struct timespec ts = {
                .tv_nsec = (long) (attempt + 1) * TPM_RETRY_SLEEP_MS * 1000000L,
        };
        nanosleep(&ts, NULL);
}

/* Run expr (which assigns a TSS2_RC to rc) again while the TPM says "retry",
 * a bounded number of times. */
#define TPM_RETRY(rc, expr)                                                     \
        do {                                                                    \
                for (unsigned _attempt = 0;; _attempt++) {                      \
                        (rc) = (expr);                                          \
                        if (!tpm_rc_is_retryable(rc) || _attempt + 1 >= TPM_RETRY_MAX) \
                                break;                                          \
                        log_debug("%s: 0x%x, retrying", #expr, (rc));           \
                        retry_sleep(_attempt);                                  \
                }                                                               \
        } while (0)

/* ---- handles and buffers that clean themselves up ----------------------- */

/* A transient object or session: flushed (Part 3, TPM2_FlushContext) when the
 * variable goes out of scope. */
struct tpm_handle {
        ESYS_CONTEXT *esys;
        ESYS_TR tr;
};

#define TPM_HANDLE_NULL(t) ((struct tpm_handle) { .esys = (t)->esys, .tr = ESYS_TR_NONE })

static void tpm_handle_flush(struct tpm_handle *h) {
        TSS2_RC rc;

        if (h->tr == ESYS_TR_NONE)
                return;
        rc = Esys_FlushContext(h->esys, h->tr);
        if (rc != TSS2_RC_SUCCESS) {
                (void) tpm_rc_to_errno(rc, -EIO, "FlushContext");
                /* Forget it in ESYS at least; the TPM side is lost with the connection. */
                (void) Esys_TR_Close(h->esys, &h->tr);
        }
        h->tr = ESYS_TR_NONE;
}
#define _cleanup_flush_ _cleanup_(tpm_handle_flush)

static void esys_freep(void *p) {
        Esys_Free(*(void **) p);
}
#define _cleanup_esys_free_ _cleanup_(esys_freep)

/* Unsealed data: wiped before it goes back to the allocator. */
static void sensitive_data_erase_and_freep(TPM2B_SENSITIVE_DATA **p) {
        if (!*p)
                return;
        explicit_bzero(*p, sizeof(**p));
        Esys_Free(*p);
}

/* A derived key (HMAC output): the same. */
static void digest_erase_and_freep(TPM2B_DIGEST **p) {
        if (!*p)
                return;
        explicit_bzero(*p, sizeof(**p));
        Esys_Free(*p);
}

static void sensitive_create_erasep(TPM2B_SENSITIVE_CREATE *p) {
        explicit_bzero(p, sizeof(*p));
}

/* ---- PCR selections ----------------------------------------------------- */

static const struct {
        const char *name;
        uint16_t alg;
        size_t size;
} pcr_banks[] = {
        { "sha1",   TPM2_ALG_SHA1,   TPM2_SHA1_DIGEST_SIZE },
        { "sha256", TPM2_ALG_SHA256, TPM2_SHA256_DIGEST_SIZE },
        { "sha384", TPM2_ALG_SHA384, TPM2_SHA384_DIGEST_SIZE },
        { "sha512", TPM2_ALG_SHA512, TPM2_SHA512_DIGEST_SIZE },
};

static int pcr_bank_find(uint16_t alg) {
        for (size_t i = 0; i < ARRAY_SIZE(pcr_banks); i++)
                if (pcr_banks[i].alg == alg)
                        return (int) i;
        return -EINVAL;
}

#define PCR_MASK_ALL ((UINT32_C(1) << TPM_PCR_MAX) - 1)

static bool pcr_selection_is_valid(const struct tpm_pcr_selection *sel) {
        if (sel->mask == 0)
                return true;
        return (sel->mask & ~PCR_MASK_ALL) == 0 && pcr_bank_find(sel->hash_alg) >= 0;
}

bool tpm_pcr_selection_is_empty(const struct tpm_pcr_selection *sel) {
        return !sel || sel->mask == 0;
}

int tpm_pcr_selection_parse(const char *s, struct tpm_pcr_selection *ret) {
        struct tpm_pcr_selection sel = {};
        const char *colon, *p;
        int bank = -1;

        if (!s || !ret)
                return -EINVAL;

        if (strcmp(s, "none") == 0) {
                *ret = sel;
                return 0;
        }

        colon = strchr(s, ':');
        if (!colon)
                return -EINVAL;
        for (size_t i = 0; i < ARRAY_SIZE(pcr_banks); i++)
                if (strlen(pcr_banks[i].name) == (size_t) (colon - s) &&
                    strncmp(pcr_banks[i].name, s, colon - s) == 0)
                        bank = (int) i;
        if (bank < 0)
                return -EINVAL;
        sel.hash_alg = pcr_banks[bank].alg;

        /* A comma-separated list of decimal PCR numbers, no blanks, no
         * leading zeros, no empty items, no duplicates. */
        p = colon + 1;
        for (;;) {
                unsigned n;

                if (p[0] < '0' || p[0] > '9')
                        return -EINVAL;
                if (p[0] == '0' && p[1] >= '0' && p[1] <= '9')
                        return -EINVAL;
                n = (unsigned) (*p++ - '0');
                if (*p >= '0' && *p <= '9')
                        n = n * 10 + (unsigned) (*p++ - '0');
                if (n >= TPM_PCR_MAX)
                        return -EINVAL;
                if (sel.mask & (UINT32_C(1) << n))
                        return -EINVAL;
                sel.mask |= UINT32_C(1) << n;

                if (*p == '\0')
                        break;
                if (*p != ',')
                        return -EINVAL;
                p++;
        }

        *ret = sel;
        return 0;
}

int tpm_pcr_selection_format(const struct tpm_pcr_selection *sel, char *buf, size_t size) {
        bool first = true;
        int bank, r;

        if (!sel || !buf)
                return -EINVAL;
        if (size == 0)
                return -ENOBUFS;
        buf[0] = '\0';

        if (tpm_pcr_selection_is_empty(sel))
                return strappendf(buf, size, "none");
        if (!pcr_selection_is_valid(sel))
                return -EINVAL;
        bank = pcr_bank_find(sel->hash_alg);

        r = strappendf(buf, size, "%s:", pcr_banks[bank].name);
        for (unsigned i = 0; r >= 0 && i < TPM_PCR_MAX; i++) {
                if (!(sel->mask & (UINT32_C(1) << i)))
                        continue;
                r = strappendf(buf, size, "%s%u", first ? "" : ",", i);
                first = false;
        }
        if (r < 0)
                buf[0] = '\0';
        return r;
}

/* count and digest_size agree with the selection. */
static int pcr_values_check(const struct tpm_pcr_values *v) {
        if (!pcr_selection_is_valid(&v->sel))
                return -EINVAL;
        if (tpm_pcr_selection_is_empty(&v->sel))
                return v->count == 0 ? 0 : -EINVAL;
        if (v->count != (size_t) __builtin_popcount(v->sel.mask) ||
            v->digest_size != pcr_banks[pcr_bank_find(v->sel.hash_alg)].size)
                return -EINVAL;
        return 0;
}

int tpm_pcr_values_format(const struct tpm_pcr_values *v, char *buf, size_t size) {
        char sel[128], hex[2 * TPM_DIGEST_MAX + 1];
        size_t k = 0;
        int r;

        if (!v || !buf)
                return -EINVAL;
        if (size == 0)
                return -ENOBUFS;
        buf[0] = '\0';

        if (tpm_pcr_selection_is_empty(&v->sel))
                return strappendf(buf, size, "none");
        if (pcr_values_check(v) < 0)
                return -EINVAL;

        r = tpm_pcr_selection_format(&v->sel, sel, sizeof(sel));
        if (r < 0)
                return r;
        /* "sha256:7" -> "sha256:" then "7=<hex>,..." */
        *strchr(sel, ':') = '\0';
        r = strappendf(buf, size, "%s:", sel);

        for (unsigned i = 0; r >= 0 && i < TPM_PCR_MAX; i++) {
                if (!(v->sel.mask & (UINT32_C(1) << i)))
                        continue;
                (void) hex_encode(v->digest[k], v->digest_size, hex, sizeof(hex));
                r = strappendf(buf, size, "%s%u=%s", k == 0 ? "" : ",", i, hex);
                k++;
        }
        if (r < 0)
                buf[0] = '\0';
        return r;
}

static TPML_PCR_SELECTION pcr_selection_to_tpml(const struct tpm_pcr_selection *sel) {
        TPML_PCR_SELECTION l = {};

        if (tpm_pcr_selection_is_empty(sel))
                return l;
        l.count = 1;
        l.pcrSelections[0].hash = sel->hash_alg;
        l.pcrSelections[0].sizeofSelect = TPM_PCR_SELECT_SIZE;
        for (unsigned i = 0; i < TPM_PCR_SELECT_SIZE; i++)
                l.pcrSelections[0].pcrSelect[i] = (sel->mask >> (8 * i)) & 0xff;
        return l;
}

int tpm_pcr_read(struct tpm *t, const struct tpm_pcr_selection *sel, struct tpm_pcr_values *ret) {
        struct tpm_pcr_values v = {};
        uint32_t todo;
        int bank;

        if (!t || !sel || !ret || !pcr_selection_is_valid(sel))
                return -EINVAL;

        v.sel = *sel;
        if (tpm_pcr_selection_is_empty(sel)) {
                v.sel.hash_alg = 0;
                *ret = v;
                return 0;
        }
        bank = pcr_bank_find(sel->hash_alg);
        v.digest_size = pcr_banks[bank].size;

        /* A response carries at most 8 digests (Part 2, TPML_DIGEST), and the
         * TPM says which PCRs it answered for (Part 3, TPM2_PCR_Read): ask
         * again for the rest until every selected PCR is read. Values come
         * back in ascending PCR order. */
        todo = sel->mask;
        while (todo != 0) {
                _cleanup_esys_free_ TPML_PCR_SELECTION *sel_out = NULL;
                _cleanup_esys_free_ TPML_DIGEST *values = NULL;
                struct tpm_pcr_selection want = { .hash_alg = sel->hash_alg, .mask = todo };
                TPML_PCR_SELECTION in = pcr_selection_to_tpml(&want);
                uint32_t got = 0;
                size_t k = 0;
                TSS2_RC rc;
                int r;

                TPM_RETRY(rc, Esys_PCR_Read(t->esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                            &in, NULL, &sel_out, &values));
                r = tpm_rc_to_errno(rc, -EIO, "PCR_Read");
                if (r < 0)
                        return r;

                for (uint32_t i = 0; i < sel_out->count; i++) {
                        const TPMS_PCR_SELECTION *s = &sel_out->pcrSelections[i];
                        if (s->hash != sel->hash_alg)
                                continue;
                        for (unsigned b = 0; b < s->sizeofSelect && b < 4; b++)
                                got |= (uint32_t) s->pcrSelect[b] << (8 * b);
                }
                got &= todo;
                if (got == 0) {
                        log_debug("PCR_Read: bank 0x%x not allocated or PCRs 0x%x not available",
                                  sel->hash_alg, todo);
                        return -EIO;
                }
                if ((size_t) __builtin_popcount(got) != values->count) {
                        log_debug("PCR_Read: %u digests for %d PCRs", values->count,
                                  __builtin_popcount(got));
                        return -EIO;
                }

                for (unsigned i = 0; i < TPM_PCR_MAX; i++) {
                        size_t idx;

                        if (!(got & (UINT32_C(1) << i)))
                                continue;
                        if (values->digests[k].size != v.digest_size) {
                                log_debug("PCR_Read: PCR %u digest has %u bytes", i,
                                          values->digests[k].size);
                                return -EIO;
                        }
                        /* Index of PCR i among all selected PCRs. */
                        idx = (size_t) __builtin_popcount(sel->mask & ((UINT32_C(1) << i) - 1));
                        memcpy(v.digest[idx], values->digests[k].buffer, v.digest_size);
                        k++;
                }
                todo &= ~got;
        }

        v.count = (size_t) __builtin_popcount(sel->mask);
        *ret = v;
        return 0;
}

/* ---- policy digests, computed in software ------------------------------- */

/* The nameAlg of the objects this file creates, and so the hash of their
 * policy sessions. tpm_sealed_check computes with whatever nameAlg an
 * object has. */
#define POLICY_ALG TPM2_ALG_SHA256
#define POLICY_SIZE TPM2_SHA256_DIGEST_SIZE

static const EVP_MD *tpm_alg_md(uint16_t alg) {
        switch (alg) {
        case TPM2_ALG_SHA1:
                return EVP_sha1();
        case TPM2_ALG_SHA256:
                return EVP_sha256();
        case TPM2_ALG_SHA384:
                return EVP_sha384();
        case TPM2_ALG_SHA512:
                return EVP_sha512();
        default:
                return NULL;
        }
}

/* out holds EVP_MD_get_size(md) <= TPM_DIGEST_MAX bytes. */
static int digest_parts(const EVP_MD *md, const void *const *parts, const size_t *sizes, size_t n,
                        uint8_t *out) {
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        unsigned int len = 0;
        int ok;

        if (!ctx)
                return -ENOMEM;
        ok = EVP_DigestInit_ex(ctx, md, NULL);
        for (size_t i = 0; ok && i < n; i++)
                ok = EVP_DigestUpdate(ctx, parts[i], sizes[i]);
        ok = ok && EVP_DigestFinal_ex(ctx, out, &len) && len == (unsigned) EVP_MD_get_size(md);
        EVP_MD_CTX_free(ctx);
        return ok ? 0 : -EIO;
}

static void be32(uint8_t out[4], uint32_t v) {
        out[0] = v >> 24;
        out[1] = v >> 16;
        out[2] = v >> 8;
        out[3] = v;
}

/* The policy a fresh policy session with hash alg reaches with one
 * assertion, starting from the all-zero digest (Part 3, TPM2_StartAuthSession):
 *   PolicyPCR (Part 3, 23.7):
 *     H(0...0 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || H(PCR values)),
 *     the PCR values concatenated in selection order and hashed with the
 *     session's hash, whatever the bank;
 *   PolicyCommandCode (Part 3, 23.11), used when the selection is empty:
 *     H(0...0 || TPM_CC_PolicyCommandCode || empty_cc).
 * empty_cc is TPM2_CC_Unseal for kind 1, TPM2_CC_HMAC for kind 2. out holds
 * the digest size of alg; returns it, or -EINVAL for an unknown alg. */
static int policy_digest(uint16_t alg, const struct tpm_pcr_values *v, TPM2_CC empty_cc, uint8_t *out) {
        static const uint8_t zero[TPM_DIGEST_MAX];
        const EVP_MD *md = tpm_alg_md(alg);
        uint8_t cc[4], arg[4];
        size_t size;
        int r;

        if (!md)
                return -EINVAL;
        size = (size_t) EVP_MD_get_size(md);

        if (tpm_pcr_selection_is_empty(&v->sel)) {
                be32(cc, TPM2_CC_PolicyCommandCode);
                be32(arg, empty_cc);
                r = digest_parts(md, (const void *[]) { zero, cc, arg },
                                 (const size_t[]) { size, sizeof(cc), sizeof(arg) }, 3, out);
        } else {
                TPML_PCR_SELECTION l = pcr_selection_to_tpml(&v->sel);
                uint8_t pcrs[sizeof(TPML_PCR_SELECTION)], pcr_digest[TPM_DIGEST_MAX];
                const void *parts[TPM_PCR_MAX];
                size_t sizes[TPM_PCR_MAX], off = 0;
                TSS2_RC rc;

                if (v->count > TPM_PCR_MAX)
                        return -EINVAL;
                for (size_t i = 0; i < v->count; i++) {
                        parts[i] = v->digest[i];
                        sizes[i] = v->digest_size;
                }
                r = digest_parts(md, parts, sizes, v->count, pcr_digest);
                if (r < 0)
                        return r;

                rc = Tss2_MU_TPML_PCR_SELECTION_Marshal(&l, pcrs, sizeof(pcrs), &off);
                r = tpm_rc_to_errno(rc, -EIO, "Tss2_MU_TPML_PCR_SELECTION_Marshal");
                if (r < 0)
                        return r;

                be32(cc, TPM2_CC_PolicyPCR);
                r = digest_parts(md, (const void *[]) { zero, cc, pcrs, pcr_digest },
                                 (const size_t[]) { size, sizeof(cc), off, size }, 4, out);
        }
        return r < 0 ? r : (int) size;
}

/* Kind 1's policy, as tpm_seal has always computed it. */
static int policy_compute(const struct tpm_pcr_values *v, uint8_t out[POLICY_SIZE]) {
        int r = policy_digest(POLICY_ALG, v, TPM2_CC_Unseal, out);
        return r < 0 ? r : 0;
}

/* ---- sessions ----------------------------------------------------------- */

/* A session salted to the SRK (Part 3, 11.1 TPM2_StartAuthSession: tpmKey
 * encrypts the salt; Part 1, "Salted Session"), so its session key is unknown
 * to anyone on the bus, with AES-128-CFB parameter encryption (Part 1,
 * "Session-based encryption"): attrs carries TPMA_SESSION_DECRYPT for a
 * command whose first parameter is secret, TPMA_SESSION_ENCRYPT for a
 * response whose first parameter is. The session stays open
 * (continueSession) so that its owner flushes it, on every path.
 * The SRK public used for the salt is read from the TPM (TR_FromTPMPublic),
 * not pinned: this protects against a passive observer of the bus, not an
 * active interposer that substitutes its own key. */
static int start_session_hash(struct tpm *t, TPM2_SE type, TPMA_SESSION attrs, TPMI_ALG_HASH hash,
                              struct tpm_handle *ret) {
        static const TPMT_SYM_DEF sym = {
                .algorithm = TPM2_ALG_AES,
                .keyBits.aes = 128,
                .mode.aes = TPM2_ALG_CFB,
        };
        TSS2_RC rc;
        int r;

        TPM_RETRY(rc, Esys_StartAuthSession(t->esys, t->srk, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                            ESYS_TR_NONE, NULL, type, &sym, hash, &ret->tr));
        r = tpm_rc_to_errno(rc, -EIO, "StartAuthSession");
        if (r < 0) {
                ret->tr = ESYS_TR_NONE;
                return r;
        }

        rc = Esys_TRSess_SetAttributes(t->esys, ret->tr, attrs | TPMA_SESSION_CONTINUESESSION, 0xff);
        return tpm_rc_to_errno(rc, -EIO, "TRSess_SetAttributes");
}

static int start_session(struct tpm *t, TPM2_SE type, TPMA_SESSION attrs, struct tpm_handle *ret) {
        return start_session_hash(t, type, attrs, POLICY_ALG, ret);
}

/* ---- secrets left behind in tpm2-tss ------------------------------------
 *
 * Where a secret that came out of the TPM (Unseal's outData, HMAC's outHMAC)
 * or went into it (tpm_seal's inSensitive) can linger in this process after
 * the call, found by reading tpm2-tss 3.2 (src/tss2-esys/esys_iutil.c,
 * src/tss2-sys/api/Tss2_Sys_GetRpBuffer.c, CommandUtil.c):
 *  - the SYS context's command/response buffer (cmdBuffer, 4 KiB, allocated
 *    once by Esys_Initialize and freed unwiped by Esys_Finalize): ESYS
 *    decrypts the encrypted response parameter in place there
 *    (iesys_decrypt_param -> Tss2_Sys_SetEncryptParam), and it stays until
 *    a later response happens to overwrite those bytes. Wiped here: the
 *    response parameter area, through Tss2_Sys_GetRpBuffer, right after the
 *    command, on every path.
 *  - the stack: iesys_decrypt_param decrypts into a VLA (plaintext[]) and
 *    derives the CFB key into another (symKey[]), neither wiped; the
 *    unmarshalling into the output and deeper frames (OpenSSL) leave
 *    copies too, some at the very top of ESYS's frames. Overwritten here:
 *    the 32 KiB of stack below the frame of each public function that
 *    handles a secret, on its way out (scrubbing right below the function
 *    that called ESYS would miss the top of ESYS's frames, where the
 *    scrubber's own return address, saved registers and canary sit).
 *  - ESYS's own output (TPM2B_SENSITIVE_DATA, TPM2B_DIGEST): wiped by the
 *    callers before Esys_Free.
 *  - the TCTI (swtpm/mssim sockets, /dev/tpmrm0) and the kernel only ever
 *    see the parameter in its encrypted form: decryption happens above
 *    them in ESYS, so there is nothing in clear to wipe there. The inbound
 *    secret of tpm_seal is marshalled into cmdBuffer and encrypted in place
 *    (iesys_encrypt_param -> Tss2_Sys_SetDecryptParam) before it is sent.
 * Not covered: the session keys in ESYS's resource list (freed unwiped on
 * flush; with a recording of the bus they would decrypt that session's
 * parameters, but reading this process's heap gives the key itself
 * anyway); an output ESYS frees itself on an unmarshalling error after
 * decryption (Esys_*_Finish error paths, SAFE_FREE); ESYS debug logging
 * (TSS2_LOG=esys+debug prints decrypted parameters: never in production);
 * swap and core dumps, which the agent disables for the process. */

/* The largest response parameter area that fits in cmdBuffer after the
 * response header and parameterSize, with no response handles (Unseal,
 * HMAC, Create). Bounds the wipe even if a response lied about its size. */
#define RP_WIPE_MAX (TPM2_MAX_COMMAND_SIZE - 10 - 4)
#define STACK_SCRUB_SIZE (32 * 1024)

static __attribute__((noinline)) void stack_scrub(void) {
        uint8_t buf[STACK_SCRUB_SIZE];

        explicit_bzero(buf, sizeof(buf));
        __asm__ __volatile__("" : : "r"(buf) : "memory");
}

/* Call right after an ESYS command whose parameters were secret, on every
 * path; and stack_scrub() on the way out of the public function. */
static void esys_secrets_wipe(struct tpm *t) {
        TSS2_SYS_CONTEXT *sys = NULL;
        const uint8_t *rp = NULL;
        size_t size = 0;

        if (Esys_GetSysContext(t->esys, &sys) == TSS2_RC_SUCCESS && sys &&
            Tss2_Sys_GetRpBuffer(sys, &size, &rp) == TSS2_RC_SUCCESS && rp)
                /* The buffer is ESYS's, writable; the API hands it out const. */
                explicit_bzero((uint8_t *) rp, size < RP_WIPE_MAX ? size : RP_WIPE_MAX);
}

/* ---- SRK ---------------------------------------------------------------- */

/* The SRK templates of the TCG TPM v2.0 Provisioning Guidance, 7.5.1: the EK
 * Credential Profile templates L-1 (RSA 2048) and L-2 (ECC NIST P-256), with
 * userWithAuth and noDA set and adminWithPolicy clear, an empty authPolicy,
 * and unique zero-filled to the key size. A restricted decryption key with
 * AES-128-CFB is a storage parent (Part 1, "Storage Keys"). */
static void srk_template(TPMI_ALG_PUBLIC type, TPM2B_PUBLIC *ret) {
        static const TPMT_SYM_DEF_OBJECT sym = {
                .algorithm = TPM2_ALG_AES,
                .keyBits.aes = 128,
                .mode.aes = TPM2_ALG_CFB,
        };
        TPMT_PUBLIC *p = &ret->publicArea;

        *ret = (TPM2B_PUBLIC) {};
        p->type = type;
        p->nameAlg = TPM2_ALG_SHA256;
        p->objectAttributes = TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT | TPMA_OBJECT_FIXEDTPM |
                TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_SENSITIVEDATAORIGIN |
                TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA;
        if (type == TPM2_ALG_ECC) {
                p->parameters.eccDetail.symmetric = sym;
                p->parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
                p->parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
                p->parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
                p->unique.ecc.x.size = 32;
                p->unique.ecc.y.size = 32;
        } else {
                p->parameters.rsaDetail.symmetric = sym;
                p->parameters.rsaDetail.scheme.scheme = TPM2_ALG_NULL;
                p->parameters.rsaDetail.keyBits = 2048;
                p->parameters.rsaDetail.exponent = 0;
                p->unique.rsa.size = 256;
        }
}

/* Whether a persistent object is fit to be our SRK: a restricted decryption
 * key (a storage parent, Part 1, "Storage Keys"; Part 2, 8.3 TPMA_OBJECT)
 * that is fixedTPM (a fixedTPM child needs a fixedTPM parent) and usable with
 * an empty authValue. Someone else's key at 0x81000001 (systemd uses the same
 * handle and templates) is fine as long as it is one. */
static int srk_check(const TPM2B_PUBLIC *pub) {
        const TPMT_PUBLIC *p = &pub->publicArea;
        TPMA_OBJECT need = TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT | TPMA_OBJECT_FIXEDTPM |
                TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_USERWITHAUTH;
        const TPMT_SYM_DEF_OBJECT *sym;

        if (p->type == TPM2_ALG_ECC)
                sym = &p->parameters.eccDetail.symmetric;
        else if (p->type == TPM2_ALG_RSA)
                sym = &p->parameters.rsaDetail.symmetric;
        else {
                log_debug("SRK 0x%x: type 0x%x is neither RSA nor ECC", TPM_SRK_HANDLE, p->type);
                return -EIO;
        }
        if ((p->objectAttributes & need) != need || (p->objectAttributes & TPMA_OBJECT_SIGN_ENCRYPT)) {
                log_debug("SRK 0x%x: attributes 0x%x are not those of a restricted decrypt "
                          "storage key (need 0x%x, sign clear)",
                          TPM_SRK_HANDLE, p->objectAttributes, need);
                return -EIO;
        }
        if (sym->algorithm != TPM2_ALG_AES) {
                log_debug("SRK 0x%x: symmetric algorithm 0x%x, not AES", TPM_SRK_HANDLE, sym->algorithm);
                return -EIO;
        }
        return 0;
}

/* One TPM2_GetCapability for a single property (TCG Part 3, 30.2). */
static int get_capability(struct tpm *t, TPM2_CAP cap, uint32_t property, const char *what,
                          TPMS_CAPABILITY_DATA **ret) {
        TPMI_YES_NO more;
        TSS2_RC rc;

        TPM_RETRY(rc, Esys_GetCapability(t->esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                         cap, property, 1, &more, ret));
        return tpm_rc_to_errno(rc, -EIO, what);
}

static int srk_have_ecc_p256(struct tpm *t) {
        _cleanup_esys_free_ TPMS_CAPABILITY_DATA *cap = NULL;
        int r;

        r = get_capability(t, TPM2_CAP_ECC_CURVES, TPM2_ECC_NIST_P256, "GetCapability(ECC_CURVES)", &cap);
        if (r < 0)
                return r;
        for (uint32_t i = 0; i < cap->data.eccCurves.count; i++)
                if (cap->data.eccCurves.eccCurves[i] == TPM2_ECC_NIST_P256)
                        return 1;
        return 0;
}

static int srk_exists(struct tpm *t) {
        _cleanup_esys_free_ TPMS_CAPABILITY_DATA *cap = NULL;
        int r;

        r = get_capability(t, TPM2_CAP_HANDLES, TPM_SRK_HANDLE, "GetCapability(HANDLES)", &cap);
        if (r < 0)
                return r;
        return cap->data.handles.count > 0 && cap->data.handles.handle[0] == TPM_SRK_HANDLE;
}

static int srk_use_existing(struct tpm *t) {
        _cleanup_esys_free_ TPM2B_PUBLIC *pub = NULL;
        TSS2_RC rc;
        int r;

        TPM_RETRY(rc, Esys_TR_FromTPMPublic(t->esys, TPM_SRK_HANDLE, ESYS_TR_NONE, ESYS_TR_NONE,
                                            ESYS_TR_NONE, &t->srk));
        r = tpm_rc_to_errno(rc, -EIO, "TR_FromTPMPublic(SRK)");
        if (r < 0) {
                t->srk = ESYS_TR_NONE;
                return r;
        }

        TPM_RETRY(rc, Esys_ReadPublic(t->esys, t->srk, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                      &pub, NULL, NULL));
        r = tpm_rc_to_errno(rc, -EIO, "ReadPublic(SRK)");
        if (r < 0)
                return r;
        return srk_check(pub);
}

/* An owner authorisation failure is -EACCES, like the counter's. */
static int owner_rc_to_errno(TSS2_RC rc, const char *what) {
        if (rc != TSS2_RC_SUCCESS &&
            (tpm_rc_code(rc) == TPM2_RC_BAD_AUTH || tpm_rc_code(rc) == TPM2_RC_AUTH_FAIL)) {
                log_debug("%s: owner authorization failed", what);
                return -EACCES;
        }
        return tpm_rc_to_errno(rc, -EIO, what);
}

static int srk_create(struct tpm *t, const char *owner_auth) {
        static const TPM2B_SENSITIVE_CREATE sensitive = {};
        static const TPM2B_DATA outside = {};
        static const TPML_PCR_SELECTION creation_pcr = {};
        static const TPMT_SYM_DEF no_sym = { .algorithm = TPM2_ALG_NULL };
        static const TPM2B_AUTH empty = {};
        struct tpm_handle primary _cleanup_flush_ = TPM_HANDLE_NULL(t);
        struct tpm_handle session _cleanup_flush_ = TPM_HANDLE_NULL(t);
        TPM2B_AUTH auth = {};
        TPM2B_PUBLIC template;
        size_t len = owner_auth ? strlen(owner_auth) : 0;
        TSS2_RC rc;
        int r;

        if (len > sizeof(auth.buffer))
                return -EINVAL;
        r = srk_have_ecc_p256(t);
        if (r < 0)
                return r;
        srk_template(r > 0 ? TPM2_ALG_ECC : TPM2_ALG_RSA, &template);
        log_debug("creating SRK (%s) at 0x%x", r > 0 ? "ECC P-256" : "RSA 2048", TPM_SRK_HANDLE);

        /* There is no SRK to salt a session to yet: an unsalted HMAC session
         * still keeps the owner's authValue off the bus (it only keys the
         * HMAC; Part 1, "HMAC Computation"). */
        TPM_RETRY(rc, Esys_StartAuthSession(t->esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                            ESYS_TR_NONE, NULL, TPM2_SE_HMAC, &no_sym, TPM2_ALG_SHA256,
                                            &session.tr));
        r = tpm_rc_to_errno(rc, -EIO, "StartAuthSession(owner)");
        if (r < 0) {
                session.tr = ESYS_TR_NONE;
                return r;
        }
        (void) Esys_TRSess_SetAttributes(t->esys, session.tr, TPMA_SESSION_CONTINUESESSION, 0xff);
        auth.size = (UINT16) len;
        if (len > 0)
                memcpy(auth.buffer, owner_auth, len);
        rc = Esys_TR_SetAuth(t->esys, ESYS_TR_RH_OWNER, &auth);
        explicit_bzero(&auth, sizeof(auth));
        r = tpm_rc_to_errno(rc, -EIO, "TR_SetAuth(owner)");
        if (r < 0)
                return r;

        /* Part 3, 24.1 TPM2_CreatePrimary, under the owner hierarchy. */
        TPM_RETRY(rc, Esys_CreatePrimary(t->esys, ESYS_TR_RH_OWNER, session.tr, ESYS_TR_NONE,
                                         ESYS_TR_NONE, &sensitive, &template, &outside, &creation_pcr,
                                         &primary.tr, NULL, NULL, NULL, NULL));
        r = owner_rc_to_errno(rc, "CreatePrimary(SRK)");
        if (r < 0) {
                (void) Esys_TR_SetAuth(t->esys, ESYS_TR_RH_OWNER, &empty);
                primary.tr = ESYS_TR_NONE;
                return r;
        }

        /* Part 3, 28.5 TPM2_EvictControl: the transient copy is still ours
         * to flush afterwards. */
        TPM_RETRY(rc, Esys_EvictControl(t->esys, ESYS_TR_RH_OWNER, primary.tr, session.tr,
                                        ESYS_TR_NONE, ESYS_TR_NONE, TPM_SRK_HANDLE, &t->srk));
        /* Forget the owner auth in ESYS (overwrites its copy). */
        (void) Esys_TR_SetAuth(t->esys, ESYS_TR_RH_OWNER, &empty);
        if (tpm_rc_code(rc) == TPM2_RC_NV_DEFINED) {
                /* Someone persisted one in the meantime: use theirs. */
                t->srk = ESYS_TR_NONE;
                return srk_use_existing(t);
        }
        r = owner_rc_to_errno(rc, "EvictControl(SRK)");
        if (r < 0)
                t->srk = ESYS_TR_NONE;
        return r;
}

/* ---- open / close ------------------------------------------------------- */

void tpm_close(struct tpm *t) {
        if (!t)
                return;
        if (t->srk != ESYS_TR_NONE)
                (void) Esys_TR_Close(t->esys, &t->srk);
        if (t->esys)
                Esys_Finalize(&t->esys);
        if (t->tcti)
                Tss2_TctiLdr_Finalize(&t->tcti);
        if (t->locked) {
                tpm_lock_held = false;
                pthread_mutex_unlock(&tpm_lock);
        }
        free(t);
}

/* Without a resource manager (swtpm's socket, /dev/tpm0) a run killed in the
 * middle of a command sequence leaves its transient objects and sessions
 * loaded, and a TPM has room for only a few: every later run would fail.
 * Such a TPM is ours alone (the configuration says device:/dev/tpmrm0 where
 * it is shared), so flush whatever the handle lists show. Through
 * /dev/tpmrm0 they list only this connection's handles, none yet. Best
 * effort: a failure here shows up as the real failure later. */
static void flush_leftovers(struct tpm *t) {
        static const TPM2_HANDLE ranges[] = {
                TPM2_TRANSIENT_FIRST, TPM2_LOADED_SESSION_FIRST, TPM2_ACTIVE_SESSION_FIRST,
        };
        TSS2_SYS_CONTEXT *sys = NULL;

        if (Esys_GetSysContext(t->esys, &sys) != TSS2_RC_SUCCESS || !sys)
                return;
        for (size_t i = 0; i < ARRAY_SIZE(ranges); i++) {
                _cleanup_esys_free_ TPMS_CAPABILITY_DATA *cap = NULL;
                TPMI_YES_NO more = TPM2_NO;
                TSS2_RC rc;

                rc = Esys_GetCapability(t->esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                        TPM2_CAP_HANDLES, ranges[i], TPM2_MAX_CAP_HANDLES, &more, &cap);
                if (rc != TSS2_RC_SUCCESS || !cap)
                        continue;
                for (uint32_t k = 0; k < cap->data.handles.count; k++) {
                        rc = Tss2_Sys_FlushContext(sys, cap->data.handles.handle[k]);
                        log_debug("Flushed handle 0x%08x left by an earlier run: %s",
                                  cap->data.handles.handle[k], rc == TSS2_RC_SUCCESS ? "ok" : Tss2_RC_Decode(rc));
                }
        }
}

int tpm_open(const char *tcti, const char *owner_auth, struct tpm **ret) {
        _cleanup_(tpm_closep) struct tpm *t = NULL;
        TSS2_RC rc;
        int r;

        if (!tcti || !ret)
                return -EINVAL;
        if (tpm_lock_held && strncmp(tpm_lock_tcti, tcti, sizeof(tpm_lock_tcti)) == 0)
                return -EDEADLK;

        t = calloc(1, sizeof(*t));
        if (!t)
                return -ENOMEM;
        t->srk = ESYS_TR_NONE;
        if (!tpm_lock_held) {
                pthread_mutex_lock(&tpm_lock);
                tpm_lock_held = t->locked = true;
                snprintf(tpm_lock_tcti, sizeof(tpm_lock_tcti), "%s", tcti);
        }

        /* The TCTI connects (or opens the device) here: any failure means no
         * TPM at that address. */
        rc = Tss2_TctiLdr_Initialize(tcti, &t->tcti);
        if (rc != TSS2_RC_SUCCESS) {
                t->tcti = NULL;
                (void) tpm_rc_to_errno(rc, -ENODEV, "Tss2_TctiLdr_Initialize");
                return -ENODEV;
        }

        rc = Esys_Initialize(&t->esys, t->tcti, NULL);
        if (rc != TSS2_RC_SUCCESS) {
                t->esys = NULL;
                return tpm_rc_to_errno(rc, -EIO, "Esys_Initialize");
        }

        /* Part 3, 9.3 TPM2_Startup: TPM_RC_INITIALIZE means it already ran
         * (firmware, kernel, swtpm's startup-clear), which is what we want. */
        TPM_RETRY(rc, Esys_Startup(t->esys, TPM2_SU_CLEAR));
        if (tpm_rc_code(rc) != TPM2_RC_INITIALIZE) {
                r = tpm_rc_to_errno(rc, -EIO, "Startup");
                if (r < 0)
                        return r;
        }

        flush_leftovers(t);
        r = srk_exists(t);
        if (r < 0)
                return r;
        r = r > 0 ? srk_use_existing(t) : srk_create(t, owner_auth);
        if (r < 0)
                return r;

        *ret = TAKE_PTR(t);
        return 0;
}

/* A created object's areas as blobs of TPM_BLOB_MAX bytes (Tss2_MU). */
static int marshal_created(const TPM2B_PUBLIC *pub, const TPM2B_PRIVATE *priv, uint8_t *pub_blob,
                           size_t *pub_size, uint8_t *priv_blob, size_t *priv_size) {
        TSS2_RC rc;
        int r;

        *pub_size = *priv_size = 0;
        rc = Tss2_MU_TPM2B_PUBLIC_Marshal(pub, pub_blob, TPM_BLOB_MAX, pub_size);
        r = tpm_rc_to_errno(rc, -EIO, "Tss2_MU_TPM2B_PUBLIC_Marshal");
        if (r < 0)
                return r;
        rc = Tss2_MU_TPM2B_PRIVATE_Marshal(priv, priv_blob, TPM_BLOB_MAX, priv_size);
        return tpm_rc_to_errno(rc, -EIO, "Tss2_MU_TPM2B_PRIVATE_Marshal");
}

/* ---- seal --------------------------------------------------------------- */

static __attribute__((noinline)) int seal_impl(struct tpm *t, const struct tpm_pcr_selection *sel,
                                                const uint8_t secret[AES256_KEY_SIZE], struct tpm_sealed *ret) {
        static const TPM2B_DATA outside = {};
        static const TPML_PCR_SELECTION creation_pcr = {};
        _cleanup_(sensitive_create_erasep) TPM2B_SENSITIVE_CREATE sensitive = {};
        _cleanup_esys_free_ TPM2B_PRIVATE *out_private = NULL;
        _cleanup_esys_free_ TPM2B_PUBLIC *out_public = NULL;
        struct tpm_handle session _cleanup_flush_ = TPM_HANDLE_NULL(t);
        struct tpm_sealed s = {};
        TPM2B_PUBLIC template = {};
        TSS2_RC rc;
        int r;

        if (!t || !sel || !secret || !ret || !pcr_selection_is_valid(sel))
                return -EINVAL;

        r = tpm_pcr_read(t, sel, &s.pcrs);
        if (r < 0)
                return r;
        r = policy_compute(&s.pcrs, s.policy_digest);
        if (r < 0)
                return r;
        s.policy_digest_size = POLICY_SIZE;
        s.kind = TPM_SEALED_DATA_PCR;

        /* A sealed data object (Part 1, "Sealed Data Objects"; Part 2, 8.3
         * TPMA_OBJECT; Part 3, 12.1 TPM2_Create):
         *  - fixedTPM|fixedParent: it cannot be duplicated off this TPM;
         *  - userWithAuth clear: the USER role (Unseal) needs a policy
         *    session, never the authValue alone; adminWithPolicy is not
         *    needed: the ADMIN role (ObjectChangeAuth) cannot unseal;
         *  - sensitiveDataOrigin clear: we supply the data (TPM_RC_ATTRIBUTES
         *    otherwise); sign/decrypt/restricted clear: it is not a key;
         *  - noDA: a policy failure (PCRs differ after an update) must not
         *    count towards dictionary-attack lockout, which would then lock
         *    out every other DA-protected object on the host too; the object
         *    has no secret authValue to guess anyway. */
        template.publicArea.type = TPM2_ALG_KEYEDHASH;
        template.publicArea.nameAlg = POLICY_ALG;
        template.publicArea.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                TPMA_OBJECT_NODA;
        template.publicArea.authPolicy.size = POLICY_SIZE;
        memcpy(template.publicArea.authPolicy.buffer, s.policy_digest, POLICY_SIZE);
        template.publicArea.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG_NULL;

        sensitive.sensitive.data.size = AES256_KEY_SIZE;
        memcpy(sensitive.sensitive.data.buffer, secret, AES256_KEY_SIZE);

        /* inSensitive is the first parameter: TPMA_SESSION_DECRYPT keeps the
         * secret off the bus. The HMAC session also authorizes the SRK. */
        r = start_session(t, TPM2_SE_HMAC, TPMA_SESSION_DECRYPT, &session);
        if (r < 0)
                return r;

        TPM_RETRY(rc, Esys_Create(t->esys, t->srk, session.tr, ESYS_TR_NONE, ESYS_TR_NONE, &sensitive,
                                  &template, &outside, &creation_pcr, &out_private, &out_public, NULL,
                                  NULL, NULL));
        esys_secrets_wipe(t);
        r = tpm_rc_to_errno(rc, -EIO, "Create");
        if (r < 0)
                return r;

        if (out_public->publicArea.authPolicy.size != POLICY_SIZE ||
            memcmp(out_public->publicArea.authPolicy.buffer, s.policy_digest, POLICY_SIZE) != 0) {
                log_debug("Create: the object's authPolicy is not the one requested");
                return -EIO;
        }

        r = marshal_created(out_public, out_private, s.public_blob, &s.public_size, s.private_blob,
                            &s.private_size);
        if (r < 0)
                return r;

        *ret = s;
        return 0;
}

int tpm_seal(struct tpm *t, const struct tpm_pcr_selection *sel,
             const uint8_t secret[AES256_KEY_SIZE], struct tpm_sealed *ret) {
        int r = seal_impl(t, sel, secret, ret);

        /* The secret went into ESYS's frames (parameter encryption). */
        stack_scrub();
        return r;
}

/* ---- policy sessions -------------------------------------------------- */

/* Start a salted policy session whose response is encrypted (the secret the
 * command returns is its first response parameter), satisfy sel's policy
 * (PolicyPCR over the PCRs as they are now, Part 3, 23.7; or, with no PCRs,
 * PolicyCommandCode(cc)), and compare its digest with the object's
 * authPolicy before the command (Part 3, 23.19 TPM2_PolicyGetDigest), so a
 * mismatch is reported as one: -EPERM, with the current PCR values in
 * current (may be NULL). */
static int policy_session_satisfy(struct tpm *t, const struct tpm_pcr_selection *sel, TPM2_CC cc,
                                  TPMI_ALG_HASH name_alg, const TPM2B_DIGEST *auth_policy,
                                  struct tpm_pcr_values *current, struct tpm_handle *session) {
        _cleanup_esys_free_ TPM2B_DIGEST *digest = NULL;
        TSS2_RC rc;
        int r;

        r = start_session_hash(t, TPM2_SE_POLICY, TPMA_SESSION_ENCRYPT, name_alg, session);
        if (r < 0)
                return r;
        if (tpm_pcr_selection_is_empty(sel)) {
                TPM_RETRY(rc, Esys_PolicyCommandCode(t->esys, session->tr, ESYS_TR_NONE, ESYS_TR_NONE,
                                                     ESYS_TR_NONE, cc));
                r = tpm_rc_to_errno(rc, -EIO, "PolicyCommandCode");
        } else {
                static const TPM2B_DIGEST empty = {};
                TPML_PCR_SELECTION l = pcr_selection_to_tpml(sel);

                TPM_RETRY(rc, Esys_PolicyPCR(t->esys, session->tr, ESYS_TR_NONE, ESYS_TR_NONE,
                                             ESYS_TR_NONE, &empty, &l));
                r = tpm_rc_to_errno(rc, -EIO, "PolicyPCR");
        }
        if (r < 0)
                return r;
        TPM_RETRY(rc, Esys_PolicyGetDigest(t->esys, session->tr, ESYS_TR_NONE, ESYS_TR_NONE,
                                           ESYS_TR_NONE, &digest));
        r = tpm_rc_to_errno(rc, -EIO, "PolicyGetDigest");
        if (r < 0)
                return r;
        if (digest->size != auth_policy->size || memcmp(digest->buffer, auth_policy->buffer, digest->size) != 0) {
                log_debug("policy digest differs from the object's authPolicy: the PCRs changed since it "
                          "was made");
                if (current)
                        (void) tpm_pcr_read(t, sel, current);
                return -EPERM;
        }
        return 0;
}

/* ---- unseal ------------------------------------------------------------- */

/* The answer of the one policy-gated command an attempt makes (Unseal or
 * HMAC, rc from it): -EAGAIN with *ret_rc when the TPM said "retry" (the
 * session is spent: a PCR moved between PolicyPCR and the command); -EPERM
 * for a policy failure, with the PCRs as they are now in *current; else the
 * 32 bytes the command returned (buf, size) copied to out. */
static int policy_command_result(struct tpm *t, TSS2_RC rc, const char *command,
                                 const struct tpm_pcr_selection *sel, struct tpm_pcr_values *current,
                                 const uint8_t *buf, uint16_t size, uint8_t out[AES256_KEY_SIZE],
                                 TSS2_RC *ret_rc) {
        int r;

        if (tpm_rc_is_retryable(rc)) {
                *ret_rc = rc;
                return -EAGAIN;
        }
        r = tpm_rc_to_errno(rc, -EIO, command);
        if (r == -EPERM) {
                if (current)
                        (void) tpm_pcr_read(t, sel, current);
                return r;
        }
        if (r < 0)
                return r;
        if (size != AES256_KEY_SIZE) {
                log_debug("%s: %u bytes, expected %d", command, size, AES256_KEY_SIZE);
                return -EIO;
        }
        memcpy(out, buf, AES256_KEY_SIZE);
        return 0;
}

/* One attempt: a fresh policy session, the policy, the digest check, Unseal.
 * Returns a TSS2_RC through *ret_rc when the TPM said "retry". */
static int unseal_once(struct tpm *t, ESYS_TR object, const struct tpm_pcr_selection *sel,
                       const TPM2B_DIGEST *auth_policy, uint8_t secret[AES256_KEY_SIZE],
                       struct tpm_pcr_values *current, TSS2_RC *ret_rc) {
        struct tpm_handle session _cleanup_flush_ = TPM_HANDLE_NULL(t);
        _cleanup_(sensitive_data_erase_and_freep) TPM2B_SENSITIVE_DATA *out = NULL;
        TSS2_RC rc;
        int r;

        *ret_rc = TSS2_RC_SUCCESS;
        r = policy_session_satisfy(t, sel, TPM2_CC_Unseal, POLICY_ALG, auth_policy, current, &session);
        if (r < 0)
                return r;

        rc = Esys_Unseal(t->esys, object, session.tr, ESYS_TR_NONE, ESYS_TR_NONE, &out);
        esys_secrets_wipe(t);
        return policy_command_result(t, rc, "Unseal", sel, current, out ? out->buffer : NULL,
                                     out ? out->size : 0, secret, ret_rc);
}

static __attribute__((noinline)) int unseal_impl(struct tpm *t, const struct tpm_sealed *sealed,
                                                  uint8_t secret[AES256_KEY_SIZE],
                                                  struct tpm_pcr_values *current) {
        struct tpm_handle object _cleanup_flush_ = TPM_HANDLE_NULL(t);
        uint8_t policy[POLICY_SIZE];
        TPM2B_PUBLIC pub = {};
        TPM2B_PRIVATE priv = {};
        const struct tpm_pcr_selection *sel;
        size_t off;
        TSS2_RC rc;
        int r;

        if (secret)
                explicit_bzero(secret, AES256_KEY_SIZE);
        if (current)
                *current = (struct tpm_pcr_values) {};
        if (!t || !sealed || !secret)
                return -EINVAL;
        if (sealed->kind != 0 && sealed->kind != TPM_SEALED_DATA_PCR)
                return -EINVAL;
        sel = &sealed->pcrs.sel;
        if (!pcr_selection_is_valid(sel) ||
            sealed->public_size == 0 || sealed->public_size > sizeof(sealed->public_blob) ||
            sealed->private_size == 0 || sealed->private_size > sizeof(sealed->private_blob))
                return -EINVAL;

        /* Blobs that do not even unmarshal were altered. */
        off = 0;
        rc = Tss2_MU_TPM2B_PUBLIC_Unmarshal(sealed->public_blob, sealed->public_size, &off, &pub);
        if (rc != TSS2_RC_SUCCESS || off != sealed->public_size) {
                log_debug("sealed public area does not unmarshal: 0x%x %s", rc, Tss2_RC_Decode(rc));
                return -EXDEV;
        }
        off = 0;
        rc = Tss2_MU_TPM2B_PRIVATE_Unmarshal(sealed->private_blob, sealed->private_size, &off, &priv);
        if (rc != TSS2_RC_SUCCESS || off != sealed->private_size) {
                log_debug("sealed private area does not unmarshal: 0x%x %s", rc, Tss2_RC_Decode(rc));
                return -EXDEV;
        }
        if (pub.publicArea.type != TPM2_ALG_KEYEDHASH || pub.publicArea.nameAlg != POLICY_ALG ||
            pub.publicArea.authPolicy.size != POLICY_SIZE ||
            (pub.publicArea.objectAttributes & TPMA_OBJECT_USERWITHAUTH)) {
                log_debug("sealed public area is not a policy-bound sealed data object");
                return -EXDEV;
        }

        /* The PCR values stored beside the blobs are what the agent reports
         * as "expected": they must hash to the object's authPolicy (which
         * Load then proves genuine), or they were altered. */
        r = pcr_values_check(&sealed->pcrs);
        if (r < 0) {
                log_debug("sealed PCR values are inconsistent");
                return -EXDEV;
        }
        r = policy_compute(&sealed->pcrs, policy);
        if (r < 0)
                return r;
        if (memcmp(policy, pub.publicArea.authPolicy.buffer, POLICY_SIZE) != 0 ||
            sealed->policy_digest_size != POLICY_SIZE ||
            memcmp(policy, sealed->policy_digest, POLICY_SIZE) != 0) {
                log_debug("sealed PCR selection/values do not match the object's authPolicy");
                return -EXDEV;
        }

        /* Part 3, 12.2 TPM2_Load: the TPM checks the private area's
         * integrity HMAC, keyed from the parent's seed and covering the
         * public area's Name (Part 1, "Protected Storage"). Any TPM error
         * here means the blobs are not this TPM's SRK's child as made. */
        TPM_RETRY(rc, Esys_Load(t->esys, t->srk, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &priv,
                                &pub, &object.tr));
        r = tpm_rc_to_errno(rc, -EXDEV, "Load");
        if (r < 0) {
                object.tr = ESYS_TR_NONE;
                return r;
        }

        for (unsigned attempt = 0;; attempt++) {
                r = unseal_once(t, object.tr, sel, &pub.publicArea.authPolicy, secret, current, &rc);
                if (r != -EAGAIN)
                        break;
                if (attempt + 1 >= TPM_RETRY_MAX) {
                        r = tpm_rc_to_errno(rc, -EIO, "Unseal (retries exhausted)");
                        break;
                }
                log_debug("Unseal: 0x%x %s, retrying", rc, Tss2_RC_Decode(rc));
                retry_sleep(attempt);
        }

        if (r < 0)
                explicit_bzero(secret, AES256_KEY_SIZE);
        return r;
}

int tpm_unseal(struct tpm *t, const struct tpm_sealed *sealed,
               uint8_t secret[AES256_KEY_SIZE], struct tpm_pcr_values *current) {
        int r = unseal_impl(t, sealed, secret, current);

        stack_scrub();
        return r;
}

/* ---- the cache key: checking a sealed object ---------------------------- */

#define CACHE_KEY_LABEL "tpmkms cache key v2"

static int why_set(char *why, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int why_set(char *why, size_t size, const char *fmt, ...) {
        va_list ap;

        if (why && size > 0) {
                va_start(ap, fmt);
                vsnprintf(why, size, fmt, ap);
                va_end(ap);
        }
        return -EPERM;
}

/* The part of tpm_sealed_check that does not depend on the configuration:
 * sizes, unmarshalling, the object's type and attributes, and the recorded
 * selection and values against its authPolicy. Fills pub and priv (may be
 * NULL). Returns 0, -EINVAL, -EXDEV or -EPERM (with why, which ends in
 * "sealed to <selection>" for the caller to complete). */
static int sealed_object_check(const struct tpm_sealed *s, TPM2B_PUBLIC *ret_pub, TPM2B_PRIVATE *ret_priv,
                               char *why, size_t why_size) {
        TPM2B_PUBLIC pub = {};
        TPM2B_PRIVATE priv = {};
        const TPMT_PUBLIC *p = &pub.publicArea;
        uint8_t policy[TPM_DIGEST_MAX];
        char sealed_to[128];
        TPMA_OBJECT need, forbid;
        size_t off;
        TSS2_RC rc;
        int r;

        if (s->kind != TPM_SEALED_DATA_PCR && s->kind != TPM_SEALED_HMAC_PCR)
                return -EINVAL;
        if (!pcr_selection_is_valid(&s->pcrs.sel) ||
            s->public_size == 0 || s->public_size > sizeof(s->public_blob) ||
            s->private_size == 0 || s->private_size > sizeof(s->private_blob) ||
            s->policy_digest_size > sizeof(s->policy_digest))
                return -EINVAL;
        if (tpm_pcr_selection_format(&s->pcrs.sel, sealed_to, sizeof(sealed_to)) < 0)
                return -EINVAL;

        off = 0;
        rc = Tss2_MU_TPM2B_PUBLIC_Unmarshal(s->public_blob, s->public_size, &off, &pub);
        if (rc != TSS2_RC_SUCCESS || off != s->public_size) {
                log_debug("sealed public area does not unmarshal: 0x%x %s", rc, Tss2_RC_Decode(rc));
                return -EXDEV;
        }
        off = 0;
        rc = Tss2_MU_TPM2B_PRIVATE_Unmarshal(s->private_blob, s->private_size, &off, &priv);
        if (rc != TSS2_RC_SUCCESS || off != s->private_size) {
                log_debug("sealed private area does not unmarshal: 0x%x %s", rc, Tss2_RC_Decode(rc));
                return -EXDEV;
        }

        /* Part 2, 8.3 TPMA_OBJECT. fixedTPM: only TPM2_Create/CreatePrimary
         * in this TPM can make such an object (TPM2_Import refuses it,
         * Part 3, 13.3), so its sensitive part really was generated
         * (sensitiveDataOrigin) or supplied as the attributes say. */
        if (s->kind == TPM_SEALED_HMAC_PCR) {
                need = TPMA_OBJECT_SIGN_ENCRYPT | TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_FIXEDTPM |
                        TPMA_OBJECT_FIXEDPARENT;
                forbid = TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_DECRYPT | TPMA_OBJECT_RESTRICTED;
                /* HMAC-SHA256: the derived key is the 32-byte AES-256 key. */
                if (p->type != TPM2_ALG_KEYEDHASH ||
                    p->parameters.keyedHashDetail.scheme.scheme != TPM2_ALG_HMAC ||
                    p->parameters.keyedHashDetail.scheme.details.hmac.hashAlg != TPM2_ALG_SHA256)
                        return why_set(why, why_size, "object is not a keyedHash HMAC-SHA256 key: sealed to %s",
                                       sealed_to);
        } else {
                /* What tpm_seal has always made (Part 1, "Sealed Data Objects"). */
                need = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_NODA;
                forbid = TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_SIGN_ENCRYPT | TPMA_OBJECT_DECRYPT |
                        TPMA_OBJECT_RESTRICTED;
                if (p->type != TPM2_ALG_KEYEDHASH ||
                    p->parameters.keyedHashDetail.scheme.scheme != TPM2_ALG_NULL)
                        return why_set(why, why_size, "object is not a sealed data object: sealed to %s",
                                       sealed_to);
        }
        if ((p->objectAttributes & need) != need || (p->objectAttributes & forbid))
                return why_set(why, why_size,
                               "object attributes 0x%x (need 0x%x, forbid 0x%x%s): sealed to %s",
                               p->objectAttributes, need, forbid,
                               (p->objectAttributes & TPMA_OBJECT_USERWITHAUTH) ? ", userWithAuth set" : "",
                               sealed_to);

        /* The policy of the recorded selection and values, with the
         * object's own nameAlg: what a policy session must reach. */
        if (pcr_values_check(&s->pcrs) < 0)
                return why_set(why, why_size, "recorded PCR values do not fit their selection: sealed to %s",
                               sealed_to);
        r = policy_digest(p->nameAlg, &s->pcrs,
                          s->kind == TPM_SEALED_HMAC_PCR ? TPM2_CC_HMAC : TPM2_CC_Unseal, policy);
        if (r == -EINVAL)
                return why_set(why, why_size, "object nameAlg 0x%x unsupported: sealed to %s", p->nameAlg,
                               sealed_to);
        if (r < 0)
                return r;
        if (p->authPolicy.size != (size_t) r || memcmp(p->authPolicy.buffer, policy, (size_t) r) != 0)
                return why_set(why, why_size,
                               "recorded PCR values do not match the object's authPolicy: sealed to %s",
                               sealed_to);
        if (s->policy_digest_size != (size_t) r || memcmp(s->policy_digest, policy, (size_t) r) != 0)
                return why_set(why, why_size,
                               "recorded policy digest is not the object's authPolicy: sealed to %s",
                               sealed_to);

        if (ret_pub)
                *ret_pub = pub;
        if (ret_priv)
                *ret_priv = priv;
        return 0;
}

/* Every configured PCR in the same bank (Part 3, 23.7: PolicyPCR over more
 * PCRs only binds more). */
static bool selection_covers(const struct tpm_pcr_selection *sealed, const struct tpm_pcr_selection *configured) {
        if (tpm_pcr_selection_is_empty(configured))
                return true;
        return sealed->hash_alg == configured->hash_alg &&
               (sealed->mask & configured->mask) == configured->mask;
}

int tpm_sealed_check(const struct tpm_sealed *s, const struct tpm_pcr_selection *configured, char *why,
                     size_t why_size) {
        char sealed_to[128], conf[128];
        size_t n;
        int r;

        if (why && why_size > 0)
                why[0] = '\0';
        if (!s || !configured || (!why && why_size > 0) || !pcr_selection_is_valid(configured))
                return -EINVAL;
        if (tpm_pcr_selection_format(configured, conf, sizeof(conf)) < 0)
                return -EINVAL;

        r = sealed_object_check(s, NULL, NULL, why, why_size);
        if (r == -EPERM) {
                n = strlen(why ? why : "");
                if (why && n + 1 < why_size)
                        snprintf(why + n, why_size - n, ", configured %s", conf);
                return r;
        }
        if (r < 0)
                return r;

        if (!selection_covers(&s->pcrs.sel, configured)) {
                (void) tpm_pcr_selection_format(&s->pcrs.sel, sealed_to, sizeof(sealed_to));
                return why_set(why, why_size, "sealed to %s, configured %s", sealed_to, conf);
        }
        return 0;
}

/* ---- the cache key: derivation ------------------------------------------ */

/* One attempt: a fresh policy session (salted, response encryption, with
 * the object's nameAlg), the policy, the digest check, TPM2_HMAC (Part 3,
 * 15.5) of the label. Returns -EAGAIN with *ret_rc when the TPM said
 * "retry" for the HMAC. */
static int hmac_once(struct tpm *t, ESYS_TR object, const TPMT_PUBLIC *pub, const struct tpm_pcr_selection *sel,
                     uint8_t key[AES256_KEY_SIZE], struct tpm_pcr_values *current, TSS2_RC *ret_rc) {
        struct tpm_handle session _cleanup_flush_ = TPM_HANDLE_NULL(t);
        _cleanup_(digest_erase_and_freep) TPM2B_DIGEST *out = NULL;
        TPM2B_MAX_BUFFER label = { .size = sizeof(CACHE_KEY_LABEL) - 1 };
        TSS2_RC rc;
        int r;

        *ret_rc = TSS2_RC_SUCCESS;
        memcpy(label.buffer, CACHE_KEY_LABEL, label.size);
        r = policy_session_satisfy(t, sel, TPM2_CC_HMAC, pub->nameAlg, &pub->authPolicy, current, &session);
        if (r < 0)
                return r;

        rc = Esys_HMAC(t->esys, object, session.tr, ESYS_TR_NONE, ESYS_TR_NONE, &label, TPM2_ALG_SHA256, &out);
        esys_secrets_wipe(t);
        return policy_command_result(t, rc, "HMAC", sel, current, out ? out->buffer : NULL,
                                     out ? out->size : 0, key, ret_rc);
}

static int cache_key_derive_hmac(struct tpm *t, const struct tpm_sealed *s, uint8_t key[AES256_KEY_SIZE],
                                 struct tpm_pcr_values *current) {
        struct tpm_handle object _cleanup_flush_ = TPM_HANDLE_NULL(t);
        TPM2B_PUBLIC pub = {};
        TPM2B_PRIVATE priv = {};
        TSS2_RC rc;
        int r;

        r = sealed_object_check(s, &pub, &priv, NULL, 0);
        if (r == -EPERM) {
                log_debug("cache key object is not one tpm_cache_key_create makes, or its recorded "
                          "PCR values were altered");
                return -EXDEV;
        }
        if (r < 0)
                return r;

        /* Part 3, 12.2 TPM2_Load: proves the blobs are this SRK's child as
         * made (integrity HMAC from the parent's seed over the Name). */
        TPM_RETRY(rc, Esys_Load(t->esys, t->srk, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &priv,
                                &pub, &object.tr));
        r = tpm_rc_to_errno(rc, -EXDEV, "Load");
        if (r < 0) {
                object.tr = ESYS_TR_NONE;
                return r;
        }

        for (unsigned attempt = 0;; attempt++) {
                r = hmac_once(t, object.tr, &pub.publicArea, &s->pcrs.sel, key, current, &rc);
                if (r != -EAGAIN)
                        break;
                if (attempt + 1 >= TPM_RETRY_MAX) {
                        r = tpm_rc_to_errno(rc, -EIO, "HMAC (retries exhausted)");
                        break;
                }
                log_debug("HMAC: 0x%x %s, retrying", rc, Tss2_RC_Decode(rc));
                retry_sleep(attempt);
        }
        return r;
}

static __attribute__((noinline)) int cache_key_derive_impl(struct tpm *t, const struct tpm_sealed *s,
                                                            uint8_t key[AES256_KEY_SIZE],
                                                            struct tpm_pcr_values *current) {
        int r;

        if (key)
                explicit_bzero(key, AES256_KEY_SIZE);
        if (current)
                *current = (struct tpm_pcr_values) {};
        if (!t || !s || !key)
                return -EINVAL;

        switch (s->kind) {
        case TPM_SEALED_DATA_PCR:
                /* What tpm_sealed_check requires of kind 1 (tpm_unseal checks
                 * less: an HMAC key recorded as kind 1 would reach Unseal). */
                r = sealed_object_check(s, NULL, NULL, NULL, 0);
                if (r == -EPERM) {
                        log_debug("kind 1 object is not a sealed data object as tpm_seal makes them");
                        return -EXDEV;
                }
                if (r < 0)
                        return r;
                return tpm_unseal(t, s, key, current);
        case TPM_SEALED_HMAC_PCR:
                r = cache_key_derive_hmac(t, s, key, current);
                break;
        default:
                return -EINVAL;
        }
        if (r < 0)
                explicit_bzero(key, AES256_KEY_SIZE);
        return r;
}

int tpm_cache_key_derive(struct tpm *t, const struct tpm_sealed *s, uint8_t key[AES256_KEY_SIZE],
                         struct tpm_pcr_values *current) {
        int r = cache_key_derive_impl(t, s, key, current);

        stack_scrub();
        return r;
}

static __attribute__((noinline)) int cache_key_create_impl(struct tpm *t, const struct tpm_pcr_selection *sel,
                                                            struct tpm_sealed *ret,
                                                            uint8_t key[AES256_KEY_SIZE]) {
        static const TPM2B_SENSITIVE_CREATE sensitive = {};
        static const TPM2B_DATA outside = {};
        static const TPML_PCR_SELECTION creation_pcr = {};
        _cleanup_esys_free_ TPM2B_PRIVATE *out_private = NULL;
        _cleanup_esys_free_ TPM2B_PUBLIC *out_public = NULL;
        struct tpm_handle session _cleanup_flush_ = TPM_HANDLE_NULL(t);
        struct tpm_sealed s = { .kind = TPM_SEALED_HMAC_PCR };
        TPM2B_PUBLIC template = {};
        TPMT_PUBLIC *p = &template.publicArea;
        TSS2_RC rc;
        int r;

        if (key)
                explicit_bzero(key, AES256_KEY_SIZE);
        if (!t || !sel || !ret || !key || !pcr_selection_is_valid(sel))
                return -EINVAL;

        r = tpm_pcr_read(t, sel, &s.pcrs);
        if (r < 0)
                return r;
        r = policy_digest(POLICY_ALG, &s.pcrs, TPM2_CC_HMAC, s.policy_digest);
        if (r < 0)
                return r;
        s.policy_digest_size = POLICY_SIZE;

        /* An HMAC key (Part 1, "Keyed Hash Objects"; Part 2, 8.3 TPMA_OBJECT,
         * 12.2.3.3 TPMS_KEYEDHASH_PARMS; Part 3, 12.1 TPM2_Create):
         *  - sensitiveDataOrigin: the TPM generates the HMAC secret, and
         *    with an empty inSensitive.data nobody outside ever knows it;
         *  - fixedTPM|fixedParent: never duplicated off this TPM;
         *  - userWithAuth clear: HMAC (USER role) needs the policy session;
         *  - adminWithPolicy: the ADMIN role (ObjectChangeAuth, Certify)
         *    needs a policy with PolicyCommandCode for that command, which
         *    the authPolicy never contains: no ADMIN use at all;
         *  - noDA: a PCR mismatch must not count towards lockout;
         *  - sign, HMAC-SHA256 scheme: what TPM2_HMAC needs. */
        p->type = TPM2_ALG_KEYEDHASH;
        p->nameAlg = POLICY_ALG;
        p->objectAttributes = TPMA_OBJECT_SIGN_ENCRYPT | TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_ADMINWITHPOLICY | TPMA_OBJECT_NODA;
        p->authPolicy.size = POLICY_SIZE;
        memcpy(p->authPolicy.buffer, s.policy_digest, POLICY_SIZE);
        p->parameters.keyedHashDetail.scheme.scheme = TPM2_ALG_HMAC;
        p->parameters.keyedHashDetail.scheme.details.hmac.hashAlg = TPM2_ALG_SHA256;

        /* Nothing secret goes in or comes out in clear (outPrivate is
         * wrapped by the SRK); the salted HMAC session authorizes the SRK
         * and protects the template (authPolicy) from change on the bus. */
        r = start_session(t, TPM2_SE_HMAC, 0, &session);
        if (r < 0)
                return r;
        TPM_RETRY(rc, Esys_Create(t->esys, t->srk, session.tr, ESYS_TR_NONE, ESYS_TR_NONE, &sensitive,
                                  &template, &outside, &creation_pcr, &out_private, &out_public, NULL,
                                  NULL, NULL));
        r = tpm_rc_to_errno(rc, -EIO, "Create(cache key)");
        if (r < 0)
                return r;
        tpm_handle_flush(&session);

        if (out_public->publicArea.objectAttributes != p->objectAttributes ||
            out_public->publicArea.authPolicy.size != POLICY_SIZE ||
            memcmp(out_public->publicArea.authPolicy.buffer, s.policy_digest, POLICY_SIZE) != 0) {
                log_debug("Create: the object is not the one requested");
                return -EIO;
        }

        r = marshal_created(out_public, out_private, s.public_blob, &s.public_size, s.private_blob,
                            &s.private_size);
        if (r < 0)
                return r;

        r = cache_key_derive_hmac(t, &s, key, NULL);
        if (r == -EPERM) {
                log_debug("a selected PCR changed while the cache key was created");
                r = -EAGAIN;
        }
        if (r < 0) {
                explicit_bzero(key, AES256_KEY_SIZE);
                return r;
        }
        *ret = s;
        return 0;
}

int tpm_cache_key_create(struct tpm *t, const struct tpm_pcr_selection *sel, struct tpm_sealed *ret,
                         uint8_t key[AES256_KEY_SIZE]) {
        int r = cache_key_create_impl(t, sel, ret, key);

        stack_scrub();
        return r;
}

/* ---- rollback counter --------------------------------------------------- */

/* Part 2, 13.4 TPMA_NV: authorized by the index's own (empty) authValue for
 * read and write, not subject to dictionary-attack logic, a counter. */
#define COUNTER_ATTRS (TPMA_NV_AUTHREAD | TPMA_NV_AUTHWRITE | TPMA_NV_NO_DA | \
                       ((TPMA_NV) TPM2_NT_COUNTER << TPMA_NV_TPM2_NT_SHIFT))
#define COUNTER_SIZE 8

/* An NV index's ESYS_TR is closed, never flushed (it is not transient). */
struct tpm_tr {
        ESYS_CONTEXT *esys;
        ESYS_TR tr;
};

static void tpm_tr_close(struct tpm_tr *h) {
        if (h->tr != ESYS_TR_NONE)
                (void) Esys_TR_Close(h->esys, &h->tr);
        h->tr = ESYS_TR_NONE;
}
#define _cleanup_tr_close_ _cleanup_(tpm_tr_close)

static bool nv_index_valid(uint32_t index) {
        return (index >> 24) == TPM2_HT_NV_INDEX;
}

static void counter_template(uint32_t index, bool written, TPM2B_NV_PUBLIC *ret) {
        *ret = (TPM2B_NV_PUBLIC) {
                .nvPublic = {
                        .nvIndex = index,
                        .nameAlg = TPM2_ALG_SHA256,
                        .attributes = COUNTER_ATTRS | (written ? TPMA_NV_WRITTEN : 0),
                        .dataSize = COUNTER_SIZE,
                },
        };
}

/* Part 1, 16 "Names": nameAlg || H_nameAlg(TPMS_NV_PUBLIC), and the public
 * area includes TPMA_NV_WRITTEN, so the Name changes at the first write. */
static int counter_name(uint32_t index, bool written, TPM2B_NAME *ret) {
        TPM2B_NV_PUBLIC pub;
        uint8_t buf[sizeof(TPMS_NV_PUBLIC)];
        size_t off = 0;
        TSS2_RC rc;
        int r;

        counter_template(index, written, &pub);
        rc = Tss2_MU_TPMS_NV_PUBLIC_Marshal(&pub.nvPublic, buf, sizeof(buf), &off);
        r = tpm_rc_to_errno(rc, -EIO, "Tss2_MU_TPMS_NV_PUBLIC_Marshal");
        if (r < 0)
                return r;
        *ret = (TPM2B_NAME) { .size = 2 + TPM2_SHA256_DIGEST_SIZE };
        ret->name[0] = TPM2_ALG_SHA256 >> 8;
        ret->name[1] = TPM2_ALG_SHA256 & 0xff;
        return digest_parts(EVP_sha256(), (const void *[]) { buf }, (const size_t[]) { off }, 1, ret->name + 2);
}

static bool name_equal(const TPM2B_NAME *a, const TPM2B_NAME *b) {
        return a->size == b->size && memcmp(a->name, b->name, a->size) == 0;
}

/* Open the index and check it is ours by its Name (TPM2_NV_ReadPublic,
 * Part 3, 31.6). Returns 1 when written, 0 when ours but never written,
 * -ENOENT, -ENOTUNIQ, or a TPM error. */
static int counter_open(struct tpm *t, uint32_t index, struct tpm_tr *ret) {
        _cleanup_esys_free_ TPM2B_NV_PUBLIC *pub = NULL;
        _cleanup_esys_free_ TPM2B_NAME *name = NULL;
        TPM2B_NAME written, unwritten;
        TSS2_RC rc;
        int r;

        TPM_RETRY(rc, Esys_TR_FromTPMPublic(t->esys, index, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                            &ret->tr));
        if (tpm_rc_code(rc) == TPM2_RC_HANDLE) {
                ret->tr = ESYS_TR_NONE;
                log_debug("NV index 0x%x is not defined", index);
                return -ENOENT;
        }
        r = tpm_rc_to_errno(rc, -EIO, "TR_FromTPMPublic(NV)");
        if (r < 0) {
                ret->tr = ESYS_TR_NONE;
                return r;
        }

        TPM_RETRY(rc, Esys_NV_ReadPublic(t->esys, ret->tr, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &pub,
                                         &name));
        r = tpm_rc_to_errno(rc, -EIO, "NV_ReadPublic");
        if (r < 0)
                return r;

        r = counter_name(index, true, &written);
        if (r < 0)
                return r;
        r = counter_name(index, false, &unwritten);
        if (r < 0)
                return r;
        if (name_equal(name, &written))
                return 1;
        if (name_equal(name, &unwritten))
                return 0;
        log_debug("NV index 0x%x: attributes 0x%x, nameAlg 0x%x, size %u: not our counter's template "
                  "(0x%x, sha256, 8)", index, pub->nvPublic.attributes, pub->nvPublic.nameAlg,
                  pub->nvPublic.dataSize, (unsigned) (COUNTER_ATTRS | TPMA_NV_WRITTEN));
        return -ENOTUNIQ;
}

/* Read and increment go through a salted HMAC session, so that a value
 * altered on the bus fails the response HMAC. */
static int counter_read_tr(struct tpm *t, ESYS_TR tr, uint64_t *ret) {
        struct tpm_handle session _cleanup_flush_ = TPM_HANDLE_NULL(t);
        _cleanup_esys_free_ TPM2B_MAX_NV_BUFFER *data = NULL;
        uint64_t v = 0;
        TSS2_RC rc;
        int r;

        r = start_session(t, TPM2_SE_HMAC, 0, &session);
        if (r < 0)
                return r;
        TPM_RETRY(rc, Esys_NV_Read(t->esys, tr, tr, session.tr, ESYS_TR_NONE, ESYS_TR_NONE, COUNTER_SIZE, 0,
                                   &data));
        r = tpm_rc_to_errno(rc, -EIO, "NV_Read");
        if (r < 0)
                return r;
        if (data->size != COUNTER_SIZE) {
                log_debug("NV_Read: %u bytes, expected %d", data->size, COUNTER_SIZE);
                return -EIO;
        }
        for (unsigned i = 0; i < COUNTER_SIZE; i++)
                v = v << 8 | data->buffer[i];
        if (ret)
                *ret = v;
        return 0;
}

static int counter_increment_tr(struct tpm *t, ESYS_TR tr) {
        struct tpm_handle session _cleanup_flush_ = TPM_HANDLE_NULL(t);
        TSS2_RC rc;
        int r;

        r = start_session(t, TPM2_SE_HMAC, 0, &session);
        if (r < 0)
                return r;
        /* Part 3, 31.8 TPM2_NV_Increment. Not retried on RETRY: ESYS
         * resubmits those itself, and a second submission of ours could
         * count twice. */
        rc = Esys_NV_Increment(t->esys, tr, tr, session.tr, ESYS_TR_NONE, ESYS_TR_NONE);
        return tpm_rc_to_errno(rc, -EIO, "NV_Increment");
}

int tpm_counter_read(struct tpm *t, uint32_t index, uint64_t *ret) {
        struct tpm_tr nv _cleanup_tr_close_ = { .esys = t ? t->esys : NULL, .tr = ESYS_TR_NONE };
        int r;

        if (!t || !ret || !nv_index_valid(index))
                return -EINVAL;
        r = counter_open(t, index, &nv);
        if (r == 0) {
                log_debug("NV index 0x%x: our counter, never incremented", index);
                return -ENOENT;
        }
        if (r < 0)
                return r;
        return counter_read_tr(t, nv.tr, ret);
}

int tpm_counter_increment(struct tpm *t, uint32_t index, uint64_t *ret) {
        struct tpm_tr nv _cleanup_tr_close_ = { .esys = t ? t->esys : NULL, .tr = ESYS_TR_NONE };
        int r;

        if (!t || !nv_index_valid(index))
                return -EINVAL;
        r = counter_open(t, index, &nv);
        if (r < 0)
                return r;
        r = counter_increment_tr(t, nv.tr);
        if (r < 0)
                return r;
        return ret ? counter_read_tr(t, nv.tr, ret) : 0;
}

int tpm_counter_define(struct tpm *t, uint32_t index, const char *owner_auth, uint64_t *ret) {
        static const TPM2B_AUTH empty = {};
        struct tpm_tr nv _cleanup_tr_close_ = { .esys = t ? t->esys : NULL, .tr = ESYS_TR_NONE };
        struct tpm_handle session _cleanup_flush_ = TPM_HANDLE_NULL(t);
        TPM2B_AUTH auth = {};
        TPM2B_NV_PUBLIC template;
        size_t len;
        TSS2_RC rc;
        int r;

        if (!t || !nv_index_valid(index))
                return -EINVAL;
        len = owner_auth ? strlen(owner_auth) : 0;
        if (len > sizeof(auth.buffer))
                return -EINVAL;
        auth.size = (UINT16) len;
        if (len > 0)
                memcpy(auth.buffer, owner_auth, len);

        /* The owner's authValue goes into the session HMAC only, never on
         * the bus (salted session, Part 1, "HMAC Computation"). */
        r = start_session(t, TPM2_SE_HMAC, 0, &session);
        if (r < 0) {
                explicit_bzero(&auth, sizeof(auth));
                return r;
        }
        rc = Esys_TR_SetAuth(t->esys, ESYS_TR_RH_OWNER, &auth);
        explicit_bzero(&auth, sizeof(auth));
        r = tpm_rc_to_errno(rc, -EIO, "TR_SetAuth(owner)");
        if (r < 0)
                return r;

        counter_template(index, false, &template);
        /* Part 3, 31.3 TPM2_NV_DefineSpace. */
        TPM_RETRY(rc, Esys_NV_DefineSpace(t->esys, ESYS_TR_RH_OWNER, session.tr, ESYS_TR_NONE, ESYS_TR_NONE,
                                          &empty, &template, &nv.tr));
        /* Forget the owner auth in ESYS (overwrites its copy). */
        (void) Esys_TR_SetAuth(t->esys, ESYS_TR_RH_OWNER, &empty);
        tpm_handle_flush(&session);

        switch (rc == TSS2_RC_SUCCESS ? TPM2_RC_SUCCESS : tpm_rc_code(rc) ? tpm_rc_code(rc) : TPM2_RC_FAILURE) {
        case TPM2_RC_SUCCESS:
                break;
        case TPM2_RC_BAD_AUTH:
        case TPM2_RC_AUTH_FAIL:
                nv.tr = ESYS_TR_NONE;
                log_debug("NV_DefineSpace: owner authorization failed");
                return -EACCES;
        case TPM2_RC_NV_DEFINED:
                nv.tr = ESYS_TR_NONE;
                r = counter_open(t, index, &nv);
                if (r > 0)
                        return -EEXIST;
                if (r < 0)
                        return r;
                /* Ours, never incremented: finish what was interrupted. */
                break;
        case TPM2_RC_NV_SPACE:
                nv.tr = ESYS_TR_NONE;
                return -ENOSPC;
        default:
                nv.tr = ESYS_TR_NONE;
                r = tpm_rc_to_errno(rc, -EIO, "NV_DefineSpace");
                if (r < 0)
                        return r;
        }

        /* A counter is unreadable until its first increment, which also
         * sets it to at least the highest value any counter had here. */
        r = counter_increment_tr(t, nv.tr);
        if (r < 0)
                return r;
        tpm_tr_close(&nv);

        /* Read back through the checks every reader does. */
        r = counter_open(t, index, &nv);
        if (r == 0)
                return -EIO;
        if (r < 0)
                return r;
        return counter_read_tr(t, nv.tr, ret);
}

/* ---- the client key (the host's identity at the central KMS) ------------ */

#define KEY_ATTRS_COMMON (TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_SENSITIVEDATAORIGIN | \
                          TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA | TPMA_OBJECT_SIGN_ENCRYPT)
/* RSA: the raw private operation (TPM2_RSA_Decrypt, scheme NULL) is how
 * OpenSSL's PSS and PKCS#1 v1.5 paddings reach the TPM (tpm/key.c). */
#define KEY_ATTRS_RSA (KEY_ATTRS_COMMON | TPMA_OBJECT_DECRYPT)

static int key_unmarshal(const struct tpm_key *k, TPM2B_PUBLIC *pub, TPM2B_PRIVATE *priv) {
        size_t off = 0;

        if (!k || k->public_size == 0 || k->public_size > TPM_BLOB_MAX || k->private_size == 0 ||
            k->private_size > TPM_BLOB_MAX)
                return -EINVAL;
        *pub = (TPM2B_PUBLIC) {};
        if (Tss2_MU_TPM2B_PUBLIC_Unmarshal(k->public_blob, k->public_size, &off, pub) != TSS2_RC_SUCCESS ||
            off != k->public_size)
                return -EINVAL;
        if (priv) {
                off = 0;
                *priv = (TPM2B_PRIVATE) {};
                if (Tss2_MU_TPM2B_PRIVATE_Unmarshal(k->private_blob, k->private_size, &off, priv) !=
                            TSS2_RC_SUCCESS ||
                    off != k->private_size)
                        return -EINVAL;
        }
        return 0;
}

int tpm_key_check(const struct tpm_key *k, struct tpm_key_public *ret) {
        TPM2B_PUBLIC pub;
        const TPMT_PUBLIC *p = &pub.publicArea;
        struct tpm_key_public kp = {};
        int r;

        r = key_unmarshal(k, &pub, NULL);
        if (r < 0)
                return r;
        if (k->parent != TPM_SRK_HANDLE || p->nameAlg != TPM2_ALG_SHA256 || p->authPolicy.size != 0)
                return -EINVAL;
        if (p->type == TPM2_ALG_ECC) {
                const TPMS_ECC_PARMS *e = &p->parameters.eccDetail;

                if (p->objectAttributes != KEY_ATTRS_COMMON || e->curveID != TPM2_ECC_NIST_P256 ||
                    e->scheme.scheme != TPM2_ALG_NULL || e->symmetric.algorithm != TPM2_ALG_NULL ||
                    p->unique.ecc.x.size == 0 || p->unique.ecc.x.size > sizeof(kp.x) ||
                    p->unique.ecc.y.size == 0 || p->unique.ecc.y.size > sizeof(kp.y))
                        return -EINVAL;
                kp.type = TPM_KEY_ECC_P256;
                /* Left-padded to the field size: MU keeps what the TPM sent. */
                memcpy(kp.x + sizeof(kp.x) - p->unique.ecc.x.size, p->unique.ecc.x.buffer, p->unique.ecc.x.size);
                memcpy(kp.y + sizeof(kp.y) - p->unique.ecc.y.size, p->unique.ecc.y.buffer, p->unique.ecc.y.size);
        } else if (p->type == TPM2_ALG_RSA) {
                const TPMS_RSA_PARMS *rp = &p->parameters.rsaDetail;

                if (p->objectAttributes != KEY_ATTRS_RSA || rp->keyBits != 2048 ||
                    rp->scheme.scheme != TPM2_ALG_NULL || rp->symmetric.algorithm != TPM2_ALG_NULL ||
                    p->unique.rsa.size != 256)
                        return -EINVAL;
                kp.type = TPM_KEY_RSA_2048;
                memcpy(kp.n, p->unique.rsa.buffer, 256);
                kp.n_size = 256;
                kp.exponent = rp->exponent ? rp->exponent : 65537;   /* Part 2, 12.2.3.5: 0 = 2^16+1 */
        } else
                return -EINVAL;
        if (ret)
                *ret = kp;
        return 0;
}

static __attribute__((noinline)) int key_create_impl(struct tpm *t, int type, const uint8_t auth[TPM_KEY_AUTH_SIZE],
                                                      struct tpm_key *ret) {
        static const TPM2B_DATA outside = {};
        static const TPML_PCR_SELECTION creation_pcr = {};
        _cleanup_(sensitive_create_erasep) TPM2B_SENSITIVE_CREATE sensitive = {};
        _cleanup_esys_free_ TPM2B_PRIVATE *out_private = NULL;
        _cleanup_esys_free_ TPM2B_PUBLIC *out_public = NULL;
        struct tpm_handle session _cleanup_flush_ = TPM_HANDLE_NULL(t);
        struct tpm_key k = { .parent = TPM_SRK_HANDLE };
        TPM2B_PUBLIC template = {};
        TPMT_PUBLIC *p = &template.publicArea;
        TSS2_RC rc;
        int r;

        if (!t || !auth || !ret || (type != TPM_KEY_ECC_P256 && type != TPM_KEY_RSA_2048))
                return -EINVAL;

        /* A signing key (Part 2, 8.3 TPMA_OBJECT; Part 3, 12.1 TPM2_Create):
         *  - sensitiveDataOrigin: the TPM generates the private key; nobody
         *    outside ever knows it;
         *  - fixedTPM|fixedParent: never duplicated off this TPM, so the
         *    key file is useless on any other TPM;
         *  - userWithAuth with a random 32-byte authValue kept only in the
         *    sealed cache (agent/keystore/cache.h): using the key needs
         *    what only this TPM in the measured state can decrypt;
         *  - noDA: our own tries never count towards lockout; a 256-bit
         *    authValue cannot be guessed anyway;
         *  - scheme NULL: the caller names the scheme per signature. */
        p->nameAlg = TPM2_ALG_SHA256;
        if (type == TPM_KEY_ECC_P256) {
                p->type = TPM2_ALG_ECC;
                p->objectAttributes = KEY_ATTRS_COMMON;
                p->parameters.eccDetail.symmetric.algorithm = TPM2_ALG_NULL;
                p->parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
                p->parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
                p->parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
        } else {
                p->type = TPM2_ALG_RSA;
                p->objectAttributes = KEY_ATTRS_RSA;
                p->parameters.rsaDetail.symmetric.algorithm = TPM2_ALG_NULL;
                p->parameters.rsaDetail.scheme.scheme = TPM2_ALG_NULL;
                p->parameters.rsaDetail.keyBits = 2048;
                p->parameters.rsaDetail.exponent = 0;
        }
        sensitive.sensitive.userAuth.size = TPM_KEY_AUTH_SIZE;
        memcpy(sensitive.sensitive.userAuth.buffer, auth, TPM_KEY_AUTH_SIZE);

        /* inSensitive (the authValue) is the first parameter:
         * TPMA_SESSION_DECRYPT keeps it off the bus. */
        r = start_session(t, TPM2_SE_HMAC, TPMA_SESSION_DECRYPT, &session);
        if (r < 0)
                return r;
        TPM_RETRY(rc, Esys_Create(t->esys, t->srk, session.tr, ESYS_TR_NONE, ESYS_TR_NONE, &sensitive,
                                  &template, &outside, &creation_pcr, &out_private, &out_public, NULL,
                                  NULL, NULL));
        esys_secrets_wipe(t);
        r = tpm_rc_to_errno(rc, -EIO, "Create(client key)");
        if (r < 0)
                return r;
        if (out_public->publicArea.objectAttributes != p->objectAttributes) {
                log_debug("Create: the client key is not the one requested");
                return -EIO;
        }
        r = marshal_created(out_public, out_private, k.public_blob, &k.public_size, k.private_blob,
                            &k.private_size);
        if (r < 0)
                return r;
        r = tpm_key_check(&k, NULL);
        if (r < 0) {
                log_debug("Create: the client key fails tpm_key_check");
                return -EIO;
        }
        *ret = k;
        return 0;
}

int tpm_key_create(struct tpm *t, int type, const uint8_t auth[TPM_KEY_AUTH_SIZE], struct tpm_key *ret) {
        int r = key_create_impl(t, type, auth, ret);

        stack_scrub();
        return r;
}

/* Load k under the SRK and give ESYS its authValue, for a salted HMAC
 * session: the authValue keys the session's HMAC and never crosses the bus
 * (a password session would send it in clear). */
static int key_load(struct tpm *t, const struct tpm_key *k, const uint8_t auth[TPM_KEY_AUTH_SIZE],
                    TPMT_PUBLIC *ret_pub, struct tpm_handle *object, struct tpm_handle *session) {
        TPM2B_PUBLIC pub;
        TPM2B_PRIVATE priv;
        TPM2B_AUTH a = { .size = TPM_KEY_AUTH_SIZE };
        TSS2_RC rc;
        int r;

        r = tpm_key_check(k, NULL);
        if (r < 0)
                return r;
        r = key_unmarshal(k, &pub, &priv);
        if (r < 0)
                return r;
        TPM_RETRY(rc, Esys_Load(t->esys, t->srk, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &priv, &pub,
                                &object->tr));
        r = tpm_rc_to_errno(rc, -EXDEV, "Load(client key)");
        if (r < 0) {
                object->tr = ESYS_TR_NONE;
                return r;
        }
        memcpy(a.buffer, auth, TPM_KEY_AUTH_SIZE);
        rc = Esys_TR_SetAuth(t->esys, object->tr, &a);
        explicit_bzero(&a, sizeof(a));
        r = tpm_rc_to_errno(rc, -EIO, "TR_SetAuth");
        if (r < 0)
                return r;
        *ret_pub = pub.publicArea;
        return start_session(t, TPM2_SE_HMAC, 0, session);
}

/* A use of the key that failed authorization is a wrong authValue: the key
 * file and the sealed cache's secret are not a pair. */
static int key_use_errno(TSS2_RC rc, const char *what) {
        TSS2_RC code = tpm_rc_code(rc);
        int r = tpm_rc_to_errno(rc, -EIO, what);

        if (r < 0 && (code == TPM2_RC_AUTH_FAIL || code == TPM2_RC_BAD_AUTH))
                return -EACCES;
        return r;
}

static __attribute__((noinline)) int key_sign_impl(struct tpm *t, const struct tpm_key *k,
                                                    const uint8_t auth[TPM_KEY_AUTH_SIZE], const uint8_t *digest,
                                                    size_t digest_size, uint8_t sig_r[32], uint8_t sig_s[32]) {
        struct tpm_handle object _cleanup_flush_ = TPM_HANDLE_NULL(t);
        struct tpm_handle session _cleanup_flush_ = TPM_HANDLE_NULL(t);
        _cleanup_esys_free_ TPMT_SIGNATURE *sig = NULL;
        TPMT_TK_HASHCHECK validation = { .tag = TPM2_ST_HASHCHECK, .hierarchy = TPM2_RH_NULL };
        TPMT_SIG_SCHEME scheme = { .scheme = TPM2_ALG_ECDSA };
        TPM2B_DIGEST d = {};
        TPMT_PUBLIC pub;
        TSS2_RC rc;
        int r;

        if (!t || !auth || !digest || !sig_r || !sig_s)
                return -EINVAL;
        /* Part 3, 20.2 TPM2_Sign: the digest's size must be the scheme
         * hash's; OpenSSL hands us SHA-256, -384 or -512 digests (TLS
         * signature algorithms, X509_REQ_sign). */
        switch (digest_size) {
        case 32: scheme.details.ecdsa.hashAlg = TPM2_ALG_SHA256; break;
        case 48: scheme.details.ecdsa.hashAlg = TPM2_ALG_SHA384; break;
        case 64: scheme.details.ecdsa.hashAlg = TPM2_ALG_SHA512; break;
        default: return -EINVAL;
        }
        r = key_load(t, k, auth, &pub, &object, &session);
        if (r < 0)
                return r;
        if (pub.type != TPM2_ALG_ECC)
                return -EINVAL;
        d.size = (UINT16) digest_size;
        memcpy(d.buffer, digest, digest_size);
        TPM_RETRY(rc, Esys_Sign(t->esys, object.tr, session.tr, ESYS_TR_NONE, ESYS_TR_NONE, &d, &scheme,
                                &validation, &sig));
        r = key_use_errno(rc, "Sign");
        if (r < 0)
                return r;
        if (sig->sigAlg != TPM2_ALG_ECDSA || sig->signature.ecdsa.signatureR.size > 32 ||
            sig->signature.ecdsa.signatureS.size > 32)
                return -EIO;
        memset(sig_r, 0, 32);
        memset(sig_s, 0, 32);
        memcpy(sig_r + 32 - sig->signature.ecdsa.signatureR.size, sig->signature.ecdsa.signatureR.buffer,
               sig->signature.ecdsa.signatureR.size);
        memcpy(sig_s + 32 - sig->signature.ecdsa.signatureS.size, sig->signature.ecdsa.signatureS.buffer,
               sig->signature.ecdsa.signatureS.size);
        return 0;
}

int tpm_key_sign_ecdsa(struct tpm *t, const struct tpm_key *k, const uint8_t auth[TPM_KEY_AUTH_SIZE],
                       const uint8_t *digest, size_t digest_size, uint8_t sig_r[32], uint8_t sig_s[32]) {
        int r = key_sign_impl(t, k, auth, digest, digest_size, sig_r, sig_s);

        stack_scrub();   /* the authValue went through ESYS's frames */
        return r;
}

static __attribute__((noinline)) int key_rsa_impl(struct tpm *t, const struct tpm_key *k,
                                                   const uint8_t auth[TPM_KEY_AUTH_SIZE], const uint8_t *in,
                                                   size_t in_size, uint8_t out[256]) {
        static const TPMT_RSA_DECRYPT scheme = { .scheme = TPM2_ALG_NULL };
        static const TPM2B_DATA label = {};
        struct tpm_handle object _cleanup_flush_ = TPM_HANDLE_NULL(t);
        struct tpm_handle session _cleanup_flush_ = TPM_HANDLE_NULL(t);
        _cleanup_esys_free_ TPM2B_PUBLIC_KEY_RSA *msg = NULL;
        TPM2B_PUBLIC_KEY_RSA c = {};
        TPMT_PUBLIC pub;
        TSS2_RC rc;
        int r;

        if (!t || !auth || !in || !out || in_size != 256)
                return -EINVAL;
        r = key_load(t, k, auth, &pub, &object, &session);
        if (r < 0)
                return r;
        if (pub.type != TPM2_ALG_RSA)
                return -EINVAL;
        c.size = 256;
        memcpy(c.buffer, in, 256);
        /* Part 3, 14.3 TPM2_RSA_Decrypt with scheme NULL: RSADP, the raw
         * private operation on an already padded block (a signature, not
         * a secret: nothing to keep off the bus). */
        TPM_RETRY(rc, Esys_RSA_Decrypt(t->esys, object.tr, session.tr, ESYS_TR_NONE, ESYS_TR_NONE, &c, &scheme,
                                       &label, &msg));
        r = key_use_errno(rc, "RSA_Decrypt");
        if (r < 0)
                return r;
        if (msg->size > 256)
                return -EIO;
        memset(out, 0, 256);
        memcpy(out + 256 - msg->size, msg->buffer, msg->size);
        return 0;
}

int tpm_key_rsa_private(struct tpm *t, const struct tpm_key *k, const uint8_t auth[TPM_KEY_AUTH_SIZE],
                        const uint8_t *in, size_t in_size, uint8_t out[256]) {
        int r = key_rsa_impl(t, k, auth, in, in_size, out);

        stack_scrub();
        return r;
}
