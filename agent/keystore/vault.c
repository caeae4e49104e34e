#include <errno.h>
#include <stdarg.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "macro.h"
#include "util.h"
#include "cache.h"
#include "keystore.h"
#include "log.h"


static const char *tpm_error_hint(int r) {
        switch (r) {
        case -ENODEV:
                return "no TPM answers on the configured tcti; check [tpm] tcti and the device";
        case -ENOLCK:
                return "the TPM is in dictionary-attack lockout; wait for it or clear it with the lockout authorisation";
        default:
                return "TPM failure (tpmkmsd --verbose logs the TPM's response code)";
        }
}

static int open_tpm(const struct vault_options *o, struct tpm **ret) {
        int r = tpm_open(o->tcti, ret);
        if (r < 0)
                return log_error_errno(r, "Cannot open the TPM at '%s': %s (%m)", o->tcti,
                                       tpm_error_hint(r));
        return 0;
}

int vault_new_local_version(struct key_version *ret, uint8_t kek[AES256_KEY_SIZE]) {
        uint8_t rnd[16];
        char identity[6 + 2 * sizeof(rnd) + 1] = "local:";
        int r;

        /* The identity is random and made once per version, so key ids never
         * repeat across hosts or versions (DESIGN.md, KMS v2 contract). */
        if (RAND_bytes(kek, AES256_KEY_SIZE) != 1 || RAND_bytes(rnd, sizeof(rnd)) != 1)
                return -EIO;
        (void) hex_encode(rnd, sizeof(rnd), identity + 6, sizeof(identity) - 6);

        *ret = (struct key_version) {
                .role = KEY_ROLE_PRIMARY,
                .kek = kek,
        };
        ret->created_usec = ret->first_seen_usec = now_usec(CLOCK_REALTIME);
        r = key_id_make(identity, kek, ret->id, sizeof(ret->id));
        if (r < 0)
                return r;
        return 0;
}

static int vault_refuse(struct vault *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int vault_refuse(struct vault *v, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(v->reason, sizeof(v->reason), fmt, ap);
        va_end(ap);
        v->refused = true;
        /* Nothing is unsealed for a refused cache; what may be is wiped. */
        OPENSSL_secure_clear_free(v->cache_key, AES256_KEY_SIZE);
        v->cache_key = NULL;
        log_key_event(LOG_MESSAGE_CACHE_REFUSED, NULL, NULL,
                      "Refusing the sealed cache in %s: %s. The file is left untouched; "
                      "nothing is served until this is resolved (see README, recovery runbook).",
                      v->options.state_dir, v->reason);
        return 1;
}

static int write_cache(struct vault *v, const struct tpm_sealed *sealed,
                       const uint8_t *cache_key, const struct keyring *kr) {
        _cleanup_free_ uint8_t *buf = NULL;
        size_t len;
        int r;

        r = cache_encode(sealed, cache_key, kr, &buf, &len);
        if (r < 0)
                return log_error_errno(r, "Cannot encode the key cache: %m");
        r = cache_write_file(v->options.state_dir, buf, len);
        if (r < 0)
                return log_error_errno(r, "Cannot write the key cache to %s/%s: %m",
                                       v->options.state_dir, CACHE_FILE_NAME);
        return 0;
}

static int seal_new_cache_key(struct vault *v, struct tpm_sealed *sealed, uint8_t *cache_key) {
        _cleanup_(tpm_closep) struct tpm *t = NULL;
        int r;

        if (RAND_bytes(cache_key, AES256_KEY_SIZE) != 1)
                return log_error_errno(EIO, "Cannot draw a random cache key");
        r = open_tpm(&v->options, &t);
        if (r < 0)
                return r;
        r = tpm_seal(t, &v->options.pcrs, cache_key, sealed);
        if (r < 0)
                return log_error_errno(r, "Cannot seal the cache key in the TPM: %s (%m)",
                                       tpm_error_hint(r));
        return 0;
}

static int vault_create(struct vault *v, bool make_first_key, struct keyring **ret_keys) {
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        _cleanup_erase_key_ uint8_t kek[AES256_KEY_SIZE];
        struct key_version first;
        int r;

        r = seal_new_cache_key(v, &v->sealed, v->cache_key);
        if (r < 0)
                return r;
        if (make_first_key) {
                r = vault_new_local_version(&first, kek);
                if (r < 0)
                        return log_error_errno(r, "Cannot make the first key: %m");
                r = keyring_new(&first, 1, &kr);
        } else
                r = keyring_new(NULL, 0, &kr);
        if (r < 0)
                return log_error_errno(r, "Cannot build the keyring: %m");
        r = write_cache(v, &v->sealed, v->cache_key, kr);
        if (r < 0)
                return r;
        if (make_first_key)
                log_key_event(LOG_MESSAGE_KEY_CREATED, first.id, "primary",
                              "Created key %s (primary) on first start", first.id);
        log_info("Created the sealed cache in %s (PCR policy %s)", v->options.state_dir,
                 tpm_pcr_selection_is_empty(&v->options.pcrs) ? "none" : "bound");
        *ret_keys = TAKE_PTR(kr);
        return 0;
}

static int vault_unseal(struct vault *v, const uint8_t *buf, size_t len, struct keyring **ret_keys) {
        _cleanup_(tpm_closep) struct tpm *t = NULL;
        struct tpm_pcr_values current = {};
        char sel[64], expected[1024], actual[1024];
        int r;

        r = cache_decode_header(buf, len, &v->sealed);
        if (r == -EPROTONOSUPPORT)
                return vault_refuse(v, "sealed cache: unsupported format version (written by a newer tpmkms?)");
        if (r < 0)
                return vault_refuse(v, "sealed cache: malformed or truncated file");

        r = open_tpm(&v->options, &t);
        if (r < 0)
                return r;
        r = tpm_unseal(t, &v->sealed, v->cache_key, &current);
        switch (r) {
        case 0:
                break;
        case -EPERM:
                (void) tpm_pcr_selection_format(&v->sealed.pcrs.sel, sel, sizeof(sel));
                (void) tpm_pcr_values_format(&v->sealed.pcrs, expected, sizeof(expected));
                (void) tpm_pcr_values_format(&current, actual, sizeof(actual));
                log_error("Measured boot mismatch: the cache was sealed to PCRs %s, the TPM now has %s. "
                          "If this boot was not planned, treat the host as compromised. If it was, boot "
                          "the previous software and follow the README's planned-update runbook; a fleet "
                          "host can instead be re-provisioned from the central KMS (README, recovery).",
                          expected, actual);
                return vault_refuse(v, "sealed cache: measured boot mismatch, PCRs %s differ from those sealed to", sel);
        case -EXDEV:
                return vault_refuse(v, "sealed cache: sealed object does not load: from another TPM, or altered");
        case -ENOLCK:
        case -ENODEV:
                return log_error_errno(r, "Cannot unseal the cache key: %s (%m)", tpm_error_hint(r));
        default:
                return vault_refuse(v, "sealed cache: TPM unseal failed (%s)", strerror(-r));
        }

        r = cache_decode_keys(buf, len, v->cache_key, ret_keys);
        if (r == -ENOMEM)
                return log_error_errno(r, "Cannot load the keyring: %m");
        if (r < 0)
                return vault_refuse(v, "sealed cache: contents fail authentication (tampered or truncated)");
        return 0;
}

int vault_open(struct vault *v, const struct vault_options *opt, bool make_first_key,
               struct keyring **ret_keys) {
        _cleanup_free_ uint8_t *buf = NULL;
        size_t len = 0;
        int r;

        *v = (struct vault) { .options = *opt };
        *ret_keys = NULL;

        if (mkdir(v->options.state_dir, 0700) < 0 && errno != EEXIST)
                return log_error_errno(errno, "Cannot create the state dir %s: %m", v->options.state_dir);

        v->cache_key = OPENSSL_secure_zalloc(AES256_KEY_SIZE);
        if (!v->cache_key)
                return log_error_errno(ENOMEM, "Cannot allocate locked memory for the cache key");

        r = cache_read_file(v->options.state_dir, &buf, &len);
        if (r == -ENOENT)
                return vault_create(v, make_first_key, ret_keys);
        if (r == -EFBIG)
                return vault_refuse(v, "sealed cache: file too large to be ours");
        if (r == -ELOOP || r == -EINVAL)
                return vault_refuse(v, "sealed cache: %s is a symlink or not a regular file; "
                                    "move it away (keep it for forensics)", CACHE_FILE_NAME);
        if (r < 0)
                return log_error_errno(r, "Cannot read the key cache %s/%s: %m", v->options.state_dir, CACHE_FILE_NAME);
        return vault_unseal(v, buf, len, ret_keys);
}

int vault_store(struct vault *v, const struct keyring *kr) {
        if (v->refused)
                return -EPERM;
        return write_cache(v, &v->sealed, v->cache_key, kr);
}

int vault_reseal(struct vault *v, const struct keyring *kr) {
        struct tpm_sealed sealed;
        uint8_t *key;
        int r;

        if (v->refused)
                return -EPERM;
        key = OPENSSL_secure_zalloc(AES256_KEY_SIZE);
        if (!key)
                return log_error_errno(ENOMEM, "Cannot allocate locked memory for the cache key");
        r = seal_new_cache_key(v, &sealed, key);
        if (r >= 0)
                r = write_cache(v, &sealed, key, kr);
        if (r < 0) {
                OPENSSL_secure_clear_free(key, AES256_KEY_SIZE);
                return r;
        }
        OPENSSL_secure_clear_free(v->cache_key, AES256_KEY_SIZE);
        v->cache_key = key;
        v->sealed = sealed;
        log_key_event(LOG_MESSAGE_CACHE_RESEALED, NULL, NULL,
                      "Re-sealed the key cache to the current PCRs");
        return 0;
}

void vault_done(struct vault *v) {
        if (v->cache_key)
                OPENSSL_secure_clear_free(v->cache_key, AES256_KEY_SIZE);
        v->cache_key = NULL;
}
