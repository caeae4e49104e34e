/* The vault: the sealed cache and the TPM that unlocks it (see keystore.h). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"
#include "fileio.h"
#include "keystore.h"
#include "log.h"
#include "macro.h"
#include "util.h"

static const char *tpm_error_hint(int r) {
        switch (r) {
        case -ENODEV:
                return "no TPM answers on the configured tcti; check [tpm] tcti and the device";
        case -ENOLCK:
                return "the TPM is in dictionary-attack lockout; wait for it or clear it with the lockout authorisation";
        case -EACCES:
                return "the owner authorisation was refused; check [tpm] owner_auth_file";
        default:
                return "TPM failure (tpmkmsd --verbose logs the TPM's response code)";
        }
}


/* Log a failure and keep its message in v->error, so that a caller that
 * answers someone (tpmkmsctl) can pass the cause on, not only an errno. */
static int vault_fail(struct vault *v, int error, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int vault_fail(struct vault *v, int error, const char *fmt, ...) {
        va_list ap;

        errno = abs(error);   /* for %m */
        va_start(ap, fmt);
        vsnprintf(v->error, sizeof(v->error), fmt, ap);
        va_end(ap);
        return log_error_errno(error, "%s", v->error);
}

/* The owner authorisation from its file (one line; "" when no file is
 * configured): needed only to create the SRK and to define the counter, so
 * read only then. */
static int read_owner_auth(struct vault *v, const char *path, char *buf, size_t size) {
        uint8_t *data = NULL;
        size_t len = 0, n;
        int r;

        buf[0] = '\0';
        if (!*path)
                return 0;
        r = read_secret_file_bounded(AT_FDCWD, path, size - 2, &data, &len);
        if (r < 0)
                return vault_fail(v, r, "Cannot read the owner authorisation file %s (a regular file of at "
                                  "most %zu bytes): %m", path, size - 2);
        n = strcspn((const char *) data, "\n");
        memcpy(buf, data, n);
        buf[n] = '\0';
        erase_and_free(data, size - 1);
        return 0;
}

/* The TPM as the vault uses it: opened for one sequence of commands and
 * closed again; while open, v->tpm_since_usec says since when (a TPM that
 * stops answering shows in vault_tpm_busy). */
struct vault_tpm {
        struct vault *v;
        struct tpm *t;
};

static void vault_tpm_release(struct vault_tpm *vt) {
        tpm_close(vt->t);
        vt->t = NULL;
        atomic_store(&vt->v->tpm_since_usec, 0);
}
#define _cleanup_vault_tpm_ _cleanup_(vault_tpm_release)

/* The owner authorisation is needed only to create the SRK on a TPM that has
 * none yet (tpm_open) and to define the counter: read it only then. */
static int vault_tpm_open(struct vault *v, struct vault_tpm *ret) {
        const struct vault_options *o = &v->options;
        char auth[130];
        int r;

        atomic_store(&v->tpm_since_usec, now_usec(CLOCK_MONOTONIC));
        r = tpm_open(o->tcti, NULL, &ret->t);
        if (r == -EACCES && *o->owner_auth_file) {
                r = read_owner_auth(v, o->owner_auth_file, auth, sizeof(auth));
                if (r >= 0) {
                        r = tpm_open(o->tcti, auth, &ret->t);
                        explicit_bzero(auth, sizeof(auth));
                }
        }
        if (r < 0) {
                atomic_store(&v->tpm_since_usec, 0);
                return vault_fail(v, r, "Cannot open the TPM at '%s': %s (%m)", o->tcti, tpm_error_hint(r));
        }
        return 0;
}

uint64_t vault_tpm_busy(const struct vault *v) {
        uint64_t since = atomic_load(&v->tpm_since_usec), now = now_usec(CLOCK_MONOTONIC);

        return since && now > since ? now - since : 0;
}

int vault_new_local_version(struct key_version *ret, uint8_t kek[AES256_KEY_SIZE]) {
        uint8_t rnd[16];
        char identity[6 + 2 * sizeof(rnd) + 1] = "local:";
        int r;

        /* The identity is random and made once per version, so key ids never
         * repeat across hosts or versions (docs/kms-v2-contract.md). */
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

static int vault_refuse(struct vault *v, const char *cause, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));
static int vault_refuse(struct vault *v, const char *cause, const char *fmt, ...) {
        va_list ap;

        v->refusal_cause = cause;

        va_start(ap, fmt);
        vsnprintf(v->reason, sizeof(v->reason), fmt, ap);
        va_end(ap);
        v->refused = true;
        /* Nothing is unsealed for a refused cache; what may be is wiped. */
        OPENSSL_secure_clear_free(v->cache_key, AES256_KEY_SIZE);
        v->cache_key = NULL;
        if (v->identity) {
                OPENSSL_secure_clear_free(v->identity, sizeof(*v->identity));
                v->identity = NULL;
        }
        log_key_event(LOG_MESSAGE_CACHE_REFUSED, NULL, NULL,
                      "Refusing the sealed cache in %s: %s. The file is left untouched; "
                      "nothing is served until this is resolved (see README, recovery runbook).",
                      v->options.state_dir, v->reason);
        return 0;
}

/* ---- the rollback counter ---- */

/* The counter's value, defining it on first use. */
static int counter_get(struct vault *v, struct tpm *t, uint64_t *ret) {
        uint32_t index = v->options.counter_index;
        int r;

        r = tpm_counter_read(t, index, ret);
        if (r == -ENOENT) {
                char auth[130];

                r = read_owner_auth(v, v->options.owner_auth_file, auth, sizeof(auth));
                if (r < 0)
                        return r;
                r = tpm_counter_define(t, index, auth, ret);
                explicit_bzero(auth, sizeof(auth));
                if (r >= 0)
                        log_info("Defined the rollback counter at TPM NV index 0x%08" PRIx32
                                 " (value %" PRIu64 ")", index, *ret);
        }
        if (r == -ENOTUNIQ)
                return vault_fail(v, r, "TPM NV index 0x%08" PRIx32 " holds an object that is not "
                                       "tpmkms's rollback counter; choose another [tpm] counter_index", index);
        if (r < 0)
                return vault_fail(v, r, "Cannot read the rollback counter at TPM NV index 0x%08" PRIx32
                                       ": %s (%m)", index, tpm_error_hint(r));
        return 0;
}

/* Write kr under (sealed, cache_key) as the next counter value, then advance
 * the counter (see keystore.h for the order). On success *ret_header is the
 * header written. */
static int write_cache(struct vault *v, const struct tpm_sealed *sealed, const uint8_t *cache_key,
                       const struct keyring *kr, const struct vault_identity *identity,
                       struct cache_header *ret_header) {
        _cleanup_vault_tpm_ struct vault_tpm t = { .v = v };
        _cleanup_free_ uint8_t *buf = NULL;
        struct cache_header h = { .version = CACHE_FORMAT_VERSION, .sealed = *sealed };
        uint64_t value, after;
        size_t len;
        int r;

        r = vault_tpm_open(v, &t);
        if (r < 0)
                return r;
        r = counter_get(v, t.t, &value);
        if (r < 0)
                return r;
        /* A previous write whose increment failed left the file one ahead:
         * catch the counter up first, so that this file is again exactly one
         * ahead of it. */
        if (v->header && v->header->counter == value + 1) {
                r = tpm_counter_increment(t.t, v->options.counter_index, &value);
                if (r < 0)
                        return vault_fail(v, r, "Cannot advance the rollback counter: %s (%m)",
                                               tpm_error_hint(r));
        }
        h.counter = value + 1;

        r = cache_encode_identity(&h, cache_key, kr, identity, &buf, &len);
        if (r < 0)
                return vault_fail(v, r, "Cannot encode the key cache: %m");
        r = cache_write_file(v->options.state_dir, buf, len);
        if (r < 0)
                return vault_fail(v, r, "Cannot write the key cache to %s/%s: %m",
                                       v->options.state_dir, CACHE_FILE_NAME);
        *ret_header = h;
        r = tpm_counter_increment(t.t, v->options.counter_index, &after);
        if (r < 0)
                /* The file is in force and one ahead of the TPM: accepted at
                 * the next start, caught up at the next write. */
                log_warning("Cannot advance the rollback counter after writing the cache (%s); "
                            "it is caught up at the next write or start", strerror(-r));
        return 0;
}

/* A new cache key bound to sel, and kr persisted under it. On success the
 * vault holds the new key and header. */
static int vault_rekey(struct vault *v, const struct tpm_pcr_selection *sel, const struct keyring *kr) {
        struct tpm_sealed sealed;
        struct cache_header h;
        uint8_t *key;
        int r;

        key = OPENSSL_secure_zalloc(AES256_KEY_SIZE);
        if (!key)
                return vault_fail(v, ENOMEM, "Cannot allocate locked memory for the cache key");
        {
                _cleanup_vault_tpm_ struct vault_tpm t = { .v = v };

                r = vault_tpm_open(v, &t);
                /* -EAGAIN: a selected PCR changed while it was being read. */
                for (int attempt = 0; r >= 0 && attempt < 3; attempt++) {
                        r = tpm_cache_key_create(t.t, sel, &sealed, key);
                        if (r != -EAGAIN)
                                break;
                }
                if (r < 0)
                        vault_fail(v, r, "Cannot make the cache key in the TPM: %s (%m)", tpm_error_hint(r));
        }
        if (r >= 0)
                r = write_cache(v, &sealed, key, kr, v->identity, &h);
        if (r < 0) {
                OPENSSL_secure_clear_free(key, AES256_KEY_SIZE);
                return r;
        }
        OPENSSL_secure_clear_free(v->cache_key, AES256_KEY_SIZE);
        v->cache_key = key;
        *v->header = h;
        return 0;
}

static int vault_create(struct vault *v, bool make_first_key, struct keyring **ret_keys) {
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        _cleanup_erase_key_ uint8_t kek[AES256_KEY_SIZE];
        struct key_version first;
        char pcrs[64];
        int r;

        if (make_first_key) {
                r = vault_new_local_version(&first, kek);
                if (r < 0)
                        return vault_fail(v, r, "Cannot make the first key: %m");
                r = keyring_new(&first, 1, &kr);
        } else
                r = keyring_new(NULL, 0, &kr);
        if (r < 0)
                return vault_fail(v, r, "Cannot build the keyring: %m");
        r = vault_rekey(v, &v->options.pcrs, kr);
        if (r < 0)
                return r;
        if (make_first_key)
                log_key_event(LOG_MESSAGE_KEY_CREATED, first.id, "primary",
                              "Created key %s (primary) on first start", first.id);
        (void) tpm_pcr_selection_format(&v->options.pcrs, pcrs, sizeof(pcrs));
        log_info("Created the sealed cache in %s (PCR policy %s)", v->options.state_dir, pcrs);
        v->created = true;
        *ret_keys = TAKE_PTR(kr);
        return 0;
}

/* Compare the file's counter value with the TPM's (see keystore.h).
 * Returns 0 (v->refused tells whether it was accepted) or a negative errno. */
static int vault_check_counter(struct vault *v, const struct keyring *kr) {
        _cleanup_vault_tpm_ struct vault_tpm t = { .v = v };
        uint64_t value, file = v->header->counter;
        int r;

        r = vault_tpm_open(v, &t);
        if (r < 0)
                return r;
        r = counter_get(v, t.t, &value);
        if (r < 0)
                return r;
        if (file == value)
                return 0;
        if (file == value + 1) {
                /* Written, then stopped before the increment: complete it. */
                r = tpm_counter_increment(t.t, v->options.counter_index, &value);
                if (r < 0)
                        return vault_fail(v, r, "Cannot advance the rollback counter: %s (%m)",
                                               tpm_error_hint(r));
                log_info("Completed an interrupted cache write (rollback counter now %" PRIu64 ")", value);
                return 0;
        }
        if (file < value && v->options.accept_restore) {
                vault_tpm_release(&t);
                log_key_event(LOG_MESSAGE_CACHE_RESTORED, NULL, NULL,
                              "Accepting a restored cache written at counter value %" PRIu64
                              " (the TPM is at %" PRIu64 "), as the operator asked", file, value);
                return write_cache(v, &v->header->sealed, v->cache_key, kr, v->identity, v->header);
        }
        if (file < value)
                return vault_refuse(v, "rollback", "sealed cache: an older copy (counter %" PRIu64 ", the TPM is at %" PRIu64
                                    "): a restored backup or a rollback; if you restored it on purpose, "
                                    "stop tpmkmsd and run tpmkmsctl accept-restore", file, value);
        return vault_refuse(v, "rollback", "sealed cache: counter %" PRIu64 " is ahead of the TPM's %" PRIu64
                            " by more than one write: not this TPM's cache", file, value);
}

static int vault_unseal(struct vault *v, const uint8_t *buf, size_t len, struct keyring **ret_keys) {
        _cleanup_(keyring_unrefp) struct keyring *kr = NULL;
        struct tpm_pcr_values current = {};
        char sel[64], expected[1024], actual[1024], why[256] = "";
        int r;

        r = cache_decode_header(buf, len, v->header);
        if (r == -EPROTONOSUPPORT)
                return vault_refuse(v, "format", "sealed cache: unsupported format version (written by a newer tpmkms?)");
        if (r < 0)
                return vault_refuse(v, "tampered", "sealed cache: malformed or truncated file");

        /* The policy sealed to is checked against the configuration before
         * the TPM is asked anything: a cache sealed by other software to a
         * weaker policy (or none) must never be accepted. */
        r = tpm_sealed_check(&v->header->sealed, &v->options.pcrs, why, sizeof(why));
        if (r < 0) {
                log_error("The cache's sealed object does not meet the configured PCR policy: %s. If the "
                          "cache was not re-sealed on purpose, treat the host as compromised; if it was "
                          "(a planned update), set [tpm] pcrs to the selection it was sealed to.", why);
                return vault_refuse(v, "policy", "sealed cache: sealed object fails the policy check (%s)", why);
        }

        {
                _cleanup_vault_tpm_ struct vault_tpm t = { .v = v };
                uint64_t value;

                r = vault_tpm_open(v, &t);
                if (r < 0)
                        return r;
                /* A format-1 cache is read only when the operator asks (after
                 * the upgrade), and only on a host that never had format 2 (no
                 * counter yet): its data object may hold a secret the writer
                 * chose, and other software can remove the counter, so
                 * neither check alone would do (docs/threat-model.md). */
                if (v->header->version < 2 && !v->options.migrate)
                        return vault_refuse(v, "format", "sealed cache: format 1, written by an earlier tpmkms: "
                                            "stop tpmkmsd and run tpmkmsctl migrate, once");
                if (v->header->version < 2) {
                        r = tpm_counter_read(t.t, v->options.counter_index, &value);
                        if (r != -ENOENT)
                                return r < 0 && r != -ENOTUNIQ
                                               ? vault_fail(v, r, "Cannot read the rollback counter: %s (%m)",
                                                                 tpm_error_hint(r))
                                               : vault_refuse(v, "policy", "sealed cache: a format-1 cache on a host that "
                                                              "already uses format 2: an old copy put back; "
                                                              "restore a current backup instead");
                }
                r = tpm_cache_key_derive(t.t, &v->header->sealed, v->cache_key, &current);
        }
        switch (r) {
        case 0:
                break;
        case -EPERM:
                (void) tpm_pcr_selection_format(&v->header->sealed.pcrs.sel, sel, sizeof(sel));
                (void) tpm_pcr_values_format(&v->header->sealed.pcrs, expected, sizeof(expected));
                (void) tpm_pcr_values_format(&current, actual, sizeof(actual));
                log_error("Measured boot mismatch: the cache was sealed to PCRs %s, the TPM now has %s. "
                          "If this boot was not planned, treat the host as compromised. If it was, boot "
                          "the previous software and follow the README's planned-update runbook; a fleet "
                          "host can instead be re-provisioned from the central KMS (README, recovery).",
                          expected, actual);
                return vault_refuse(v, "measured_boot", "sealed cache: measured boot mismatch, PCRs %s differ from those sealed to", sel);
        case -EXDEV:
                return vault_refuse(v, "wrong_tpm", "sealed cache: sealed object does not load: from another TPM, or altered");
        default:
                /* -ENODEV, -ENOLCK, -EIO, -ENOMEM: the TPM, not the cache;
                 * exit and let systemd restart us rather than refuse for
                 * the whole run. */
                return vault_fail(v, r, "Cannot derive the cache key: %s (%m)", tpm_error_hint(r));
        }

        r = cache_decode_identity(buf, len, v->cache_key, &kr, &v->identity);
        if (r == -ENOMEM)
                return vault_fail(v, r, "Cannot load the keyring: %m");
        if (r < 0)
                return vault_refuse(v, "tampered", "sealed cache: contents fail authentication (tampered or truncated)");

        if (v->header->version < CACHE_FORMAT_VERSION) {
                /* Passed the policy check: re-seal in the current format now,
                 * which also starts its rollback protection. */
                r = vault_rekey(v, &v->header->sealed.pcrs.sel, kr);
                if (r < 0)
                        return r;
                log_key_event(LOG_MESSAGE_CACHE_RESEALED, NULL, NULL,
                              "Migrated the key cache to format %d (TPM-derived cache key, rollback counter)",
                              CACHE_FORMAT_VERSION);
        } else {
                r = vault_check_counter(v, kr);
                if (r < 0 || v->refused)
                        return r;
        }
        *ret_keys = TAKE_PTR(kr);
        return 0;
}

/* Like OpenSSH's StrictModes: a state dir that others may write to, or that
 * belongs to someone else, could have its cache swapped or removed at will. */
static int check_state_dir(struct vault *v) {
        struct stat st;

        if (lstat(v->options.state_dir, &st) < 0)
                return vault_fail(v, errno, "Cannot inspect the state dir %s: %m", v->options.state_dir);
        if (!S_ISDIR(st.st_mode))
                return vault_refuse(v, "state_dir", "state dir: %s is not a directory (a symlink?)", v->options.state_dir);
        if (st.st_uid != geteuid())
                return vault_refuse(v, "state_dir", "state dir: %s belongs to uid %u, not to tpmkmsd (uid %u): chown it",
                                    v->options.state_dir, (unsigned) st.st_uid, (unsigned) geteuid());
        if (st.st_mode & 022)
                return vault_refuse(v, "state_dir", "state dir: %s has mode %04o: others may replace the cache; chmod 0700 it",
                                    v->options.state_dir, (unsigned) (st.st_mode & 07777));
        return 0;
}

/* No cache file. In standalone mode the keys exist nowhere else: if this
 * TPM's counter shows that a cache was written here before, making a new
 * first key would silently lose every ciphertext made under the old ones.
 * A fleet host gets its keys back from the central KMS. */
static int check_vanished(struct vault *v, bool standalone) {
        _cleanup_vault_tpm_ struct vault_tpm t = { .v = v };
        uint64_t value;
        int r;

        if (!standalone || v->options.allow_new_cache)
                return 0;
        r = vault_tpm_open(v, &t);
        if (r < 0)
                return r;
        r = tpm_counter_read(t.t, v->options.counter_index, &value);
        if (r == -ENOENT)
                return 0;   /* a first start on this TPM */
        if (r < 0 && r != -ENOTUNIQ)
                return vault_fail(v, r, "Cannot read the rollback counter: %s (%m)", tpm_error_hint(r));
        if (r == -ENOTUNIQ)
                return 0;   /* not ours: counter_get says so when it is used */
        log_error("The key cache in %s is gone, but this TPM's rollback counter (value %" PRIu64 ") shows one "
                  "was written here. Restore it from a backup and run tpmkmsctl accept-restore; or, to start "
                  "over with new keys and lose every old one, stop tpmkmsd and run tpmkmsctl new-cache.",
                  v->options.state_dir, value);
        return vault_refuse(v, "vanished", "state dir: the key cache is gone (the TPM's counter is at %" PRIu64 "): restore "
                            "it and run tpmkmsctl accept-restore, or start over: tpmkmsctl new-cache", value);
}

int vault_open(struct vault *v, const struct vault_options *opt, bool make_first_key,
               struct keyring **ret_keys) {
        _cleanup_free_ uint8_t *buf = NULL;
        unsigned n_stray = 0;
        size_t len = 0;
        int r;

        *v = (struct vault) { .options = *opt };
        *ret_keys = NULL;

        if (mkdir(v->options.state_dir, 0700) < 0 && errno != EEXIST)
                return vault_fail(v, errno, "Cannot create the state dir %s: %m", v->options.state_dir);
        r = check_state_dir(v);
        if (r < 0 || v->refused)
                return r;
        /* One writer of the state dir at a time: a daemon, or tpmkmsctl's
         * offline steps; the lock goes with the process. */
        v->lock_fd = open(v->options.state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (v->lock_fd < 0)
                return vault_fail(v, -errno, "Cannot open the state dir %s: %m", v->options.state_dir);
        v->locked = true;
        if (flock(v->lock_fd, LOCK_EX | LOCK_NB) < 0)
                return vault_fail(v, errno == EWOULDBLOCK ? -EBUSY : -errno,
                                  "The state dir %s is in use by another tpmkmsd or tpmkmsctl: stop it first (%m)",
                                  v->options.state_dir);

        v->header = calloc(1, sizeof(*v->header));
        v->cache_key = OPENSSL_secure_zalloc(AES256_KEY_SIZE);
        if (!v->header || !v->cache_key)
                return vault_fail(v, ENOMEM, "Cannot allocate locked memory for the cache key");

        r = cache_remove_stray(v->options.state_dir, &n_stray);
        if (n_stray > 0)
                log_info("Wiped and removed %u temp file(s) an interrupted cache write left in %s",
                         n_stray, v->options.state_dir);
        if (r < 0)
                log_warning("Cannot remove every stale temp file in %s: %s", v->options.state_dir, strerror(-r));

        r = cache_read_file(v->options.state_dir, &buf, &len);
        if (r == -ENOENT && v->options.accept_restore)
                return vault_fail(v, r, "No key cache in %s to accept: put the restored %s back first",
                                       v->options.state_dir, CACHE_FILE_NAME);
        if (r == -ENOENT) {
                r = check_vanished(v, make_first_key);
                if (r < 0 || v->refused)
                        return r;
                return vault_create(v, make_first_key, ret_keys);
        }
        if (r == -EFBIG)
                return vault_refuse(v, "tampered", "sealed cache: file too large to be ours");
        if (r == -ELOOP || r == -EINVAL)
                return vault_refuse(v, "tampered", "sealed cache: %s is a symlink or not a regular file; "
                                    "move it away (keep it for forensics)", CACHE_FILE_NAME);
        if (r < 0)
                return vault_fail(v, r, "Cannot read the key cache %s/%s: %m", v->options.state_dir,
                                       CACHE_FILE_NAME);
        return vault_unseal(v, buf, len, ret_keys);
}

int vault_store(struct vault *v, const struct keyring *kr) {
        v->error[0] = '\0';
        if (v->refused)
                return -EPERM;
        return write_cache(v, &v->header->sealed, v->cache_key, kr, v->identity, v->header);
}

int vault_set_identity(struct vault *v, const struct keyring *kr, const struct vault_identity *identity) {
        v->error[0] = '\0';
        struct vault_identity *copy = NULL;
        int r;

        if (v->refused)
                return -EPERM;
        if (identity) {
                copy = OPENSSL_secure_malloc(sizeof(*copy));
                if (!copy)
                        return vault_fail(v, ENOMEM, "Cannot allocate locked memory for the client key's secret");
                memcpy(copy, identity, sizeof(*copy));
        }
        r = write_cache(v, &v->header->sealed, v->cache_key, kr, copy, v->header);
        if (r < 0) {
                OPENSSL_secure_clear_free(copy, sizeof(*copy));
                return r;
        }
        OPENSSL_secure_clear_free(v->identity, sizeof(*v->identity));
        v->identity = copy;
        return 0;
}

int vault_reseal(struct vault *v, const struct keyring *kr, const struct tpm_pcr_selection *sel) {
        v->error[0] = '\0';
        char pcrs[64];
        int r;

        if (v->refused)
                return -EPERM;
        r = vault_rekey(v, sel ? sel : &v->options.pcrs, kr);
        if (r < 0)
                return r;
        (void) tpm_pcr_selection_format(&v->header->sealed.pcrs.sel, pcrs, sizeof(pcrs));
        log_key_event(LOG_MESSAGE_CACHE_RESEALED, NULL, NULL,
                      "Re-sealed the key cache to the current values of PCRs %s", pcrs);
        return 0;
}

const struct tpm_pcr_selection *vault_sealed_pcrs(const struct vault *v) {
        return v->header && v->header->sealed.kind ? &v->header->sealed.pcrs.sel : NULL;
}

void vault_done(struct vault *v) {
        if (v->locked)
                close(v->lock_fd);   /* releases the flock */
        v->locked = false;
        OPENSSL_secure_clear_free(v->cache_key, AES256_KEY_SIZE);
        v->cache_key = NULL;
        OPENSSL_secure_clear_free(v->identity, sizeof(*v->identity));
        v->identity = NULL;
        free(v->header);
        v->header = NULL;
}

int vault_sealed_values(const char *state_dir, struct tpm_pcr_values *ret) {
        _cleanup_free_ uint8_t *buf = NULL;
        struct cache_header h;
        size_t len;
        int r;

        r = cache_read_file(state_dir, &buf, &len);
        if (r < 0)
                return r;
        r = cache_decode_header(buf, len, &h);
        if (r < 0)
                return r;
        *ret = h.sealed.pcrs;
        return 0;
}
