/* The sealed cache file; the byte layout is in cache.h. Parsing is bounded:
 * every read goes through struct rd, which checks the length first, and a
 * file must end exactly where its structure says. */
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cache.h"
#include "fileio.h"
#include "macro.h"
#include "util.h"

static const uint8_t cache_magic[8] = { 'T', 'P', 'M', 'K', 'M', 'S', 'C', '\0' };

#define CACHE_NONCE_SIZE 12
#define CACHE_TAG_SIZE 16
/* per version: role, created, first seen, missing since (format 2 on), id
 * length, central id length, KEK */
#define KEY_RECORD_FIXED_V1 (1 + 8 + 8 + 2 + 2 + AES256_KEY_SIZE)
#define KEY_RECORD_FIXED (KEY_RECORD_FIXED_V1 + 8)

/* ---- bounded reader ---- */

struct rd {
        const uint8_t *p;
        size_t left;
};

static bool rd_bytes(struct rd *r, size_t n, const uint8_t **ret) {
        if (r->left < n)
                return false;
        *ret = r->p;
        r->p += n;
        r->left -= n;
        return true;
}

static bool rd_copy(struct rd *r, void *dst, size_t n) {
        const uint8_t *p;

        if (!rd_bytes(r, n, &p))
                return false;
        memcpy(dst, p, n);
        return true;
}

static bool rd_u8(struct rd *r, uint8_t *v) {
        return rd_copy(r, v, 1);
}

static bool rd_u16(struct rd *r, uint16_t *v) {
        const uint8_t *p;

        if (!rd_bytes(r, 2, &p))
                return false;
        *v = (uint16_t) (p[0] << 8 | p[1]);
        return true;
}

static bool rd_u32(struct rd *r, uint32_t *v) {
        const uint8_t *p;

        if (!rd_bytes(r, 4, &p))
                return false;
        *v = (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8 | p[3];
        return true;
}

static bool rd_u64(struct rd *r, uint64_t *v) {
        uint32_t hi, lo;

        if (!rd_u32(r, &hi) || !rd_u32(r, &lo))
                return false;
        *v = (uint64_t) hi << 32 | lo;
        return true;
}

/* ---- writer into a buffer sized in advance ---- */

static uint8_t *wr_u8(uint8_t *p, uint8_t v) {
        *p = v;
        return p + 1;
}

static uint8_t *wr_u16(uint8_t *p, uint16_t v) {
        p[0] = (uint8_t) (v >> 8);
        p[1] = (uint8_t) v;
        return p + 2;
}

static uint8_t *wr_u32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t) (v >> 24);
        p[1] = (uint8_t) (v >> 16);
        p[2] = (uint8_t) (v >> 8);
        p[3] = (uint8_t) v;
        return p + 4;
}

static uint8_t *wr_u64(uint8_t *p, uint64_t v) {
        return wr_u32(wr_u32(p, (uint32_t) (v >> 32)), (uint32_t) v);
}

static uint8_t *wr_bytes(uint8_t *p, const void *src, size_t n) {
        if (n > 0)
                memcpy(p, src, n);
        return p + n;
}

/* ---- header ---- */

static bool sealed_valid(const struct tpm_sealed *s) {
        return s->kind == TPM_SEALED_HMAC_PCR && s->public_size > 0 && s->public_size <= TPM_BLOB_MAX &&
               s->private_size > 0 && s->private_size <= TPM_BLOB_MAX &&
               s->pcrs.count <= TPM_PCR_MAX && s->pcrs.digest_size <= TPM_DIGEST_MAX &&
               s->policy_digest_size <= TPM_DIGEST_MAX;
}

static size_t header_size(const struct tpm_sealed *s) {
        return sizeof(cache_magic) + 4 + 1 + 2 + 4 + 2 + s->public_size + 2 + s->private_size +
               1 + 1 + s->pcrs.count * s->pcrs.digest_size + 1 + s->policy_digest_size + 8;
}

static uint8_t *header_write(uint8_t *p, const struct cache_header *h) {
        const struct tpm_sealed *s = &h->sealed;

        p = wr_bytes(p, cache_magic, sizeof(cache_magic));
        p = wr_u32(p, CACHE_FORMAT_VERSION);
        p = wr_u8(p, s->kind);
        p = wr_u16(p, s->pcrs.sel.hash_alg);
        p = wr_u32(p, s->pcrs.sel.mask);
        p = wr_u16(p, (uint16_t) s->public_size);
        p = wr_bytes(p, s->public_blob, s->public_size);
        p = wr_u16(p, (uint16_t) s->private_size);
        p = wr_bytes(p, s->private_blob, s->private_size);
        p = wr_u8(p, (uint8_t) s->pcrs.count);
        p = wr_u8(p, (uint8_t) s->pcrs.digest_size);
        for (size_t i = 0; i < s->pcrs.count; i++)
                p = wr_bytes(p, s->pcrs.digest[i], s->pcrs.digest_size);
        p = wr_u8(p, (uint8_t) s->policy_digest_size);
        p = wr_bytes(p, s->policy_digest, s->policy_digest_size);
        return wr_u64(p, h->counter);
}

/* Where the parts of a file are; filled by file_parse. */
struct layout {
        uint32_t version;          /* format version: decides the record layout */
        size_t header_len;         /* = the AAD */
        const uint8_t *nonce;
        const uint8_t *ct;
        size_t ct_len;
        const uint8_t *tag;
};

/* Parse the header into ret (may be NULL) and check the framing of the
 * payload up to the last byte. Returns 0, -EBADMSG or -EPROTONOSUPPORT. */
static int file_parse(const uint8_t *buf, size_t len, struct cache_header *ret,
                      struct layout *lay) {
        struct cache_header h = {};
        struct tpm_sealed *s = &h.sealed;
        struct rd r = { .p = buf, .left = len };
        const uint8_t *magic;
        uint32_t version, ct_len;
        uint16_t u16;
        uint8_t u8;

        if (!buf || len > CACHE_FILE_MAX)
                return -EBADMSG;
        if (!rd_bytes(&r, sizeof(cache_magic), &magic) ||
            memcmp(magic, cache_magic, sizeof(cache_magic)) != 0)
                return -EBADMSG;
        if (!rd_u32(&r, &version))
                return -EBADMSG;
        if (version < CACHE_FORMAT_OLDEST || version > CACHE_FORMAT_VERSION)
                return -EPROTONOSUPPORT;
        h.version = lay->version = version;
        /* Format 1 knew one kind of sealed object: data under PolicyPCR. */
        s->kind = TPM_SEALED_DATA_PCR;
        /* Format 2 holds only TPM-generated keys: a sealed data object's
         * secret is whoever made it's choice (docs/threat-model.md), and is
         * read from format 1 alone, to migrate. A later kind is one more
         * value allowed here. */
        if (version >= 2 && (!rd_u8(&r, &s->kind) || s->kind != TPM_SEALED_HMAC_PCR))
                return -EBADMSG;

        if (!rd_u16(&r, &s->pcrs.sel.hash_alg) || !rd_u32(&r, &s->pcrs.sel.mask))
                return -EBADMSG;
        if ((s->pcrs.sel.mask >> TPM_PCR_MAX) != 0)   /* PCRs 0..23 only */
                return -EBADMSG;

        if (!rd_u16(&r, &u16) || u16 == 0 || u16 > TPM_BLOB_MAX ||
            !rd_copy(&r, s->public_blob, u16))
                return -EBADMSG;
        s->public_size = u16;
        if (!rd_u16(&r, &u16) || u16 == 0 || u16 > TPM_BLOB_MAX ||
            !rd_copy(&r, s->private_blob, u16))
                return -EBADMSG;
        s->private_size = u16;

        if (!rd_u8(&r, &u8) || u8 > TPM_PCR_MAX)
                return -EBADMSG;
        s->pcrs.count = u8;
        if (!rd_u8(&r, &u8) || u8 > TPM_DIGEST_MAX)
                return -EBADMSG;
        s->pcrs.digest_size = u8;
        for (size_t i = 0; i < s->pcrs.count; i++)
                if (!rd_copy(&r, s->pcrs.digest[i], s->pcrs.digest_size))
                        return -EBADMSG;

        if (!rd_u8(&r, &u8) || u8 > TPM_DIGEST_MAX || !rd_copy(&r, s->policy_digest, u8))
                return -EBADMSG;
        s->policy_digest_size = u8;
        if (version >= 2 && !rd_u64(&r, &h.counter))
                return -EBADMSG;

        lay->header_len = len - r.left;
        if (!rd_bytes(&r, CACHE_NONCE_SIZE, &lay->nonce) || !rd_u32(&r, &ct_len) ||
            ct_len < 4 || !rd_bytes(&r, ct_len, &lay->ct) ||
            !rd_bytes(&r, CACHE_TAG_SIZE, &lay->tag) || r.left != 0)
                return -EBADMSG;
        lay->ct_len = ct_len;

        if (ret)
                *ret = h;
        return 0;
}

int cache_decode_header(const uint8_t *buf, size_t len, struct cache_header *ret) {
        struct layout lay;

        if (ret)
                memset(ret, 0, sizeof(*ret));
        return file_parse(buf, len, ret, &lay);
}

/* ---- keys: the plaintext serialisation ---- */

#define IDENTITY_SECTION_SIZE (1 + 32 + TPM_KEY_AUTH_SIZE)

static size_t keys_size(const struct keyring *kr, const struct vault_identity *identity) {
        size_t n = 4 + (identity ? IDENTITY_SECTION_SIZE : 0);

        for (size_t i = 0; i < keyring_size(kr); i++) {
                const struct key_version *v = keyring_get(kr, i);

                n += KEY_RECORD_FIXED + strlen(v->id) + strlen(v->central_id);
        }
        return n;
}

static void keys_write(uint8_t *p, const struct keyring *kr, const struct vault_identity *identity) {
        p = wr_u32(p, (uint32_t) keyring_size(kr));
        for (size_t i = 0; i < keyring_size(kr); i++) {
                const struct key_version *v = keyring_get(kr, i);
                size_t id_len = strlen(v->id), cid_len = strlen(v->central_id);

                p = wr_u8(p, (uint8_t) v->role);
                p = wr_u64(p, v->created_usec);
                p = wr_u64(p, v->first_seen_usec);
                p = wr_u64(p, v->missing_since_usec);
                p = wr_u16(p, (uint16_t) id_len);
                p = wr_bytes(p, v->id, id_len);
                p = wr_u16(p, (uint16_t) cid_len);
                p = wr_bytes(p, v->central_id, cid_len);
                p = wr_bytes(p, v->kek, AES256_KEY_SIZE);
        }
        if (identity) {
                p = wr_u8(p, CACHE_SECTION_IDENTITY);
                p = wr_bytes(p, identity->key_digest, sizeof(identity->key_digest));
                (void) wr_bytes(p, identity->auth, sizeof(identity->auth));
        }
}

/* A string field: no NUL inside, and room for one after it. */
static bool rd_string(struct rd *r, size_t min, char *dst, size_t size) {
        const uint8_t *p;
        uint16_t n;

        if (!rd_u16(r, &n) || n < min || n >= size || !rd_bytes(r, n, &p) || memchr(p, 0, n))
                return false;
        memcpy(dst, p, n);
        dst[n] = '\0';
        return true;
}

/* Builds the keyring from pt, whose records are of format version. The
 * key_version array points into pt for the KEKs and holds no secret of its
 * own. */
static int keys_parse(const uint8_t *pt, size_t len, uint32_t version, struct keyring **ret,
                      struct vault_identity **ret_identity) {
        _cleanup_free_ struct key_version *keys = NULL;
        struct rd r = { .p = pt, .left = len };
        size_t fixed = version == 1 ? KEY_RECORD_FIXED_V1 : KEY_RECORD_FIXED;
        uint32_t n;
        int k;

        if (!rd_u32(&r, &n) || n > KEYRING_MAX_KEYS || n > r.left / fixed)
                return -EBADMSG;
        keys = calloc(n ? n : 1, sizeof(*keys));
        if (!keys)
                return -ENOMEM;

        for (uint32_t i = 0; i < n; i++) {
                struct key_version *v = &keys[i];
                const uint8_t *kek;
                uint8_t role;

                if (!rd_u8(&r, &role) || role >= _KEY_ROLE_MAX ||
                    !rd_u64(&r, &v->created_usec) || !rd_u64(&r, &v->first_seen_usec) ||
                    (version >= 2 && !rd_u64(&r, &v->missing_since_usec)) ||
                    !rd_string(&r, 1, v->id, sizeof(v->id)) ||
                    !rd_string(&r, 0, v->central_id, sizeof(v->central_id)) ||
                    !rd_bytes(&r, AES256_KEY_SIZE, &kek))
                        return -EBADMSG;
                /* Format 1 had no missing role; a missing version always
                 * says since when, and only a missing one does. */
                if ((version == 1 && role == KEY_ROLE_MISSING) ||
                    (role == KEY_ROLE_MISSING) != (v->missing_since_usec != 0))
                        return -EBADMSG;
                v->role = role;
                v->kek = (uint8_t *) kek;
        }
        /* After the records: nothing, or (format 2 on) the identity section. */
        if (r.left != 0) {
                const uint8_t *sec;
                uint8_t tag;

                if (version < 2 || r.left != IDENTITY_SECTION_SIZE || !rd_u8(&r, &tag) ||
                    tag != CACHE_SECTION_IDENTITY || !rd_bytes(&r, r.left, &sec))
                        return -EBADMSG;
                if (ret_identity) {
                        *ret_identity = OPENSSL_secure_malloc(sizeof(**ret_identity));
                        if (!*ret_identity)
                                return -ENOMEM;
                        memcpy((*ret_identity)->key_digest, sec, 32);
                        memcpy((*ret_identity)->auth, sec + 32, TPM_KEY_AUTH_SIZE);
                }
        }

        /* Authenticated yet inconsistent (two primaries, duplicate ids): we
         * never write that, so it is as bad as a failed tag. */
        k = keyring_new(keys, n, ret);
        if (k == 0)
                return 0;
        if (ret_identity) {
                OPENSSL_secure_clear_free(*ret_identity, sizeof(**ret_identity));
                *ret_identity = NULL;
        }
        return k == -ENOMEM ? -ENOMEM : -EBADMSG;
}

int cache_encode(const struct cache_header *h, const uint8_t cache_key[AES256_KEY_SIZE],
                 const struct keyring *kr, uint8_t **ret, size_t *ret_len) {
        return cache_encode_identity(h, cache_key, kr, NULL, ret, ret_len);
}

int cache_encode_identity(const struct cache_header *h, const uint8_t cache_key[AES256_KEY_SIZE],
                          const struct keyring *kr, const struct vault_identity *identity,
                          uint8_t **ret, size_t *ret_len) {
        const struct tpm_sealed *sealed = h ? &h->sealed : NULL;
        EVP_CIPHER_CTX *ctx = NULL;
        uint8_t *pt = NULL, *buf = NULL, *p, *ct;
        size_t hlen, pt_len = 0, total;
        int outl, finl, r = -EIO;

        if (!h || !cache_key || !ret || !ret_len || !sealed_valid(sealed) ||
            keyring_size(kr) > KEYRING_MAX_KEYS)
                return -EINVAL;

        hlen = header_size(sealed);
        pt_len = keys_size(kr, identity);
        total = hlen + CACHE_NONCE_SIZE + 4 + pt_len + CACHE_TAG_SIZE;
        if (total > CACHE_FILE_MAX)
                return -EFBIG;   /* we would refuse to read it back */

        /* The plaintext holds every KEK: locked memory only, never a
         * fallback to swappable heap (sized for the largest keyring in
         * keyring.c); -ENOMEM when it is exhausted. */
        pt = OPENSSL_secure_malloc(pt_len);
        buf = malloc(total);
        ctx = EVP_CIPHER_CTX_new();
        if (!pt || !buf || !ctx) {
                r = -ENOMEM;
                goto out;
        }
        keys_write(pt, kr, identity);

        p = header_write(buf, h);
        if (RAND_bytes(p, CACHE_NONCE_SIZE) != 1)
                goto out;
        p = wr_u32(p + CACHE_NONCE_SIZE, (uint32_t) pt_len);
        ct = p;

        /* AAD: the whole header, so the blobs and PCR metadata cannot be
         * swapped for another seal's without failing the tag. */
        if (EVP_EncryptInit_ex2(ctx, EVP_aes_256_gcm(), cache_key, buf + hlen, NULL) != 1 ||
            EVP_EncryptUpdate(ctx, NULL, &outl, buf, (int) hlen) != 1 ||
            EVP_EncryptUpdate(ctx, ct, &outl, pt, (int) pt_len) != 1 ||
            (size_t) outl != pt_len ||
            EVP_EncryptFinal_ex(ctx, ct + outl, &finl) != 1 || finl != 0 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, CACHE_TAG_SIZE, ct + pt_len) != 1)
                goto out;

        *ret = TAKE_PTR(buf);
        *ret_len = total;
        r = 0;
out:
        EVP_CIPHER_CTX_free(ctx);   /* cleanses the key schedule */
        OPENSSL_secure_clear_free(pt, pt_len);
        free(buf);
        return r;
}

int cache_decode_keys(const uint8_t *buf, size_t len, const uint8_t cache_key[AES256_KEY_SIZE],
                      struct keyring **ret) {
        return cache_decode_identity(buf, len, cache_key, ret, NULL);
}

int cache_decode_identity(const uint8_t *buf, size_t len, const uint8_t cache_key[AES256_KEY_SIZE],
                          struct keyring **ret, struct vault_identity **ret_identity) {
        EVP_CIPHER_CTX *ctx = NULL;
        struct layout lay;
        uint8_t tag[CACHE_TAG_SIZE], *pt = NULL;
        int outl, finl, r;

        if (ret_identity)
                *ret_identity = NULL;
        if (!cache_key || !ret)
                return -EINVAL;
        r = file_parse(buf, len, NULL, &lay);
        if (r < 0)
                return r;

        pt = OPENSSL_secure_malloc(lay.ct_len);   /* locked only, as above */
        ctx = EVP_CIPHER_CTX_new();
        if (!pt || !ctx) {
                r = -ENOMEM;
                goto out;
        }
        memcpy(tag, lay.tag, sizeof(tag));
        r = -EBADMSG;
        if (EVP_DecryptInit_ex2(ctx, EVP_aes_256_gcm(), cache_key, lay.nonce, NULL) != 1 ||
            EVP_DecryptUpdate(ctx, NULL, &outl, buf, (int) lay.header_len) != 1 ||
            EVP_DecryptUpdate(ctx, pt, &outl, lay.ct, (int) lay.ct_len) != 1 ||
            (size_t) outl != lay.ct_len ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, sizeof(tag), tag) != 1 ||
            EVP_DecryptFinal_ex(ctx, pt + outl, &finl) != 1)
                goto out;

        r = keys_parse(pt, lay.ct_len, lay.version, ret, ret_identity);
out:
        EVP_CIPHER_CTX_free(ctx);
        OPENSSL_secure_clear_free(pt, lay.ct_len);
        return r;
}

/* ---- files ---- */

#define CACHE_TEMP_PREFIX "." CACHE_FILE_NAME "."
#define CACHE_TEMP_RANDOM 8   /* hex digits after the prefix */

int cache_write_file(const char *dir, const uint8_t *buf, size_t len) {
        _cleanup_close_ int dfd = -1, fd = -1;
        char tmp[sizeof(CACHE_FILE_NAME) + 16];
        int r;

        if (!dir || (!buf && len > 0))
                return -EINVAL;
        if (len > CACHE_FILE_MAX)
                return -EFBIG;

        dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
                return -errno;

        /* O_EXCL under a random name: never follows or reuses anything an
         * attacker (or a crashed earlier run) left in the directory. */
        for (int attempt = 0;; attempt++) {
                uint8_t rnd[4];

                if (RAND_bytes(rnd, sizeof(rnd)) != 1)
                        return -EIO;
                memcpy(tmp, CACHE_TEMP_PREFIX, sizeof(CACHE_TEMP_PREFIX) - 1);
                (void) hex_encode(rnd, sizeof(rnd), tmp + sizeof(CACHE_TEMP_PREFIX) - 1,
                                  sizeof(tmp) - (sizeof(CACHE_TEMP_PREFIX) - 1));
                fd = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
                if (fd >= 0)
                        break;
                if (errno != EEXIST || attempt >= 16)
                        return -errno;
        }

        /* Exactly 0600 whatever the umask. */
        if (fchmod(fd, 0600) < 0) {
                r = -errno;
                goto fail;
        }
        r = write_all(fd, buf, len);
        if (r < 0)
                goto fail;
        if (fsync(fd) < 0) {
                r = -errno;
                goto fail;
        }
        r = close(TAKE_FD(fd));
        if (r < 0) {
                r = -errno;
                goto fail;
        }
        if (renameat(dfd, tmp, dfd, CACHE_FILE_NAME) < 0) {
                r = -errno;
                goto fail;
        }
        /* The rename is durable only once the directory is. */
        if (fsync(dfd) < 0)
                return -errno;
        return 0;
fail:
        (void) unlinkat(dfd, tmp, 0);
        return r;
}

static bool is_temp_name(const char *n) {
        size_t p = sizeof(CACHE_TEMP_PREFIX) - 1;

        return strncmp(n, CACHE_TEMP_PREFIX, p) == 0 && strlen(n + p) == CACHE_TEMP_RANDOM &&
               strspn(n + p, "0123456789abcdef") == CACHE_TEMP_RANDOM;
}

/* Zero the regular file name in dfd, then unlink it. */
static int wipe_file(int dfd, const char *name) {
        static const uint8_t zeros[4096];
        _cleanup_close_ int fd = -1;
        struct stat st;
        int r = 0;

        fd = openat(dfd, name, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
                for (off_t done = 0; r >= 0 && done < st.st_size; done += (off_t) sizeof(zeros))
                        r = write_all(fd, zeros, (size_t) (st.st_size - done) < sizeof(zeros)
                                                         ? (size_t) (st.st_size - done) : sizeof(zeros));
                if (r >= 0 && fsync(fd) < 0)
                        r = -errno;
        }
        if (unlinkat(dfd, name, 0) < 0 && r >= 0)
                r = -errno;
        return r;
}

int cache_remove_stray(const char *dir, unsigned *ret_n) {
        _cleanup_close_ int dfd = -1;
        DIR *d;
        struct dirent *e;
        unsigned n = 0;
        int r = 0;

        dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
                return -errno;
        d = fdopendir(dup(dfd));
        if (!d)
                return -errno;
        while ((e = readdir(d))) {
                int k;

                if (!is_temp_name(e->d_name))
                        continue;
                k = wipe_file(dfd, e->d_name);
                if (k < 0 && r == 0)
                        r = k;
                n++;
        }
        closedir(d);
        if (n > 0 && fsync(dfd) < 0 && r == 0)
                r = -errno;
        *ret_n = n;
        return r;
}

int cache_read_file(const char *dir, uint8_t **ret, size_t *ret_len) {
        _cleanup_close_ int dfd = -1;
        int r;

        if (!dir || !ret || !ret_len)
                return -EINVAL;
        dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
                return -errno;
        /* -ELOOP: a symlink, not followed; -EINVAL: a FIFO, a device, a
         * directory: anything but a regular file. */
        r = read_file_bounded(dfd, CACHE_FILE_NAME, CACHE_FILE_MAX, false, ret, ret_len);
        return r == -EISDIR ? -EINVAL : r;
}
