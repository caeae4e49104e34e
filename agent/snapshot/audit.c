/* The audit: snapshot file -> bbolt -> newest revisions -> report (see
 * snapshot.h). */
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "audit.h"
#include "bbolt.h"
#include "mvcc.h"
#include "snapshot.h"
#include "snapshot.pb-c.h"
#include "util.h"

/* Longest first where one prefix starts another; "k8s:enc:" last. */
const struct value_class_info value_classes[VALUE_CLASS_MAX] = {
        [VALUE_PLAINTEXT] = { NULL, "plaintext" },
        [VALUE_KMS_V2] = { "k8s:enc:kms:v2:", "kms_v2" },
        [VALUE_KMS_V1] = { "k8s:enc:kms:v1:", "kms_v1" },
        [VALUE_AESCBC] = { "k8s:enc:aescbc:v1:", "aescbc" },
        [VALUE_AESGCM] = { "k8s:enc:aesgcm:v1:", "aesgcm" },
        [VALUE_SECRETBOX] = { "k8s:enc:secretbox:v1:", "secretbox" },
        [VALUE_UNKNOWN_PROVIDER] = { "k8s:enc:", "unknown" },
};

#define REGISTRY_PREFIX "/registry/"
/* etcdctl snapshot save appends the SHA-256 of the database; etcd's restore
 * recognises it by the size: the database is whole pages of a multiple of
 * 512 bytes. */
#define SNAPSHOT_SIZE_ALIGN 512

static void resource_done(struct resource *res) {
        free(res->name);
        for (size_t i = 0; i < res->n_key_ids; i++) {
                free(res->key_ids[i].provider);
                free(res->key_ids[i].key_id);
        }
        free(res->key_ids);
        for (size_t i = 0; i < res->n_plaintext_names; i++)
                free(res->plaintext_names[i]);
        free(res->plaintext_names);
}

void snapshot_report_free(struct snapshot_report *r) {
        if (!r)
                return;
        for (size_t i = 0; i < r->n_resources; i++)
                resource_done(&r->resources[i]);
        free(r->resources);
        free(r);
}

uint64_t snapshot_report_unencrypted(const struct snapshot_report *r) {
        return r->unencrypted;
}

/* Room for one more element in an array of *size elements (n used). */
static int reserve(void **array, size_t *size, size_t n, size_t elem_size) {
        size_t want;
        void *p;

        if (n < *size)
                return 0;
        want = *size ? *size * 2 : 8;
        p = reallocarray(*array, want, elem_size);
        if (!p)
                return -ENOMEM;
        *array = p;
        *size = want;
        return 0;
}

/* A scratch buffer for escaped strings, reused for every object. */
struct text {
        char *buf;
        size_t size;
};

/* Append bytes to t at *at as printable ASCII: other bytes (and '\') as
 * \xNN. t stays NUL-terminated. */
static int text_put(struct text *t, size_t *at, const uint8_t *p, size_t n) {
        static const char digits[] = "0123456789abcdef";

        if (n > (SIZE_MAX - 1 - *at) / 4)
                return -E2BIG;
        if (t->size < *at + 4 * n + 1) {
                char *buf = realloc(t->buf, *at + 4 * n + 1);
                if (!buf)
                        return -ENOMEM;
                t->buf = buf;
                t->size = *at + 4 * n + 1;
        }
        for (size_t i = 0; i < n; i++) {
                if (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '\\') {
                        t->buf[(*at)++] = (char) p[i];
                        continue;
                }
                t->buf[(*at)++] = '\\';
                t->buf[(*at)++] = 'x';
                t->buf[(*at)++] = digits[p[i] >> 4];
                t->buf[(*at)++] = digits[p[i] & 15];
        }
        t->buf[*at] = '\0';
        return 0;
}

/* t holds just the bytes, escaped. */
static int text_set(struct text *t, const uint8_t *p, size_t n) {
        size_t at = 0;

        return text_put(t, &at, p, n);
}

struct audit {
        struct snapshot_report *report;
        struct text type, name, provider;
};

/* Find key in the sorted array (*n of *size elements): its index, with
 * *found; or, when it is not there, the index of a new zeroed element made
 * for it in its place (-E2BIG when there are max already, or -ENOMEM). */
static ssize_t sorted_find_or_insert(void **array, size_t *n, size_t *size, size_t elem_size, size_t max,
                                     const void *key, int (*cmp)(const void *key, const void *elem), bool *found) {
        size_t lo = 0, hi = *n;
        uint8_t *base;

        while (lo < hi) {
                const size_t mid = lo + (hi - lo) / 2;
                const int k = cmp(key, (const uint8_t *) *array + mid * elem_size);

                if (k == 0) {
                        *found = true;
                        return (ssize_t) mid;
                }
                if (k > 0)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        *found = false;
        if (*n >= max)
                return -E2BIG;
        if (reserve(array, size, *n, elem_size) < 0)
                return -ENOMEM;
        base = *array;
        memmove(base + (lo + 1) * elem_size, base + lo * elem_size, (*n - lo) * elem_size);
        memset(base + lo * elem_size, 0, elem_size);
        (*n)++;
        return (ssize_t) lo;
}

static int resource_cmp(const void *key, const void *elem) {
        return strcmp(key, ((const struct resource *) elem)->name);
}

/* The resource called name, made when new. */
static int resource_get(struct snapshot_report *r, const char *name, struct resource **ret) {
        bool found;
        ssize_t i = sorted_find_or_insert((void **) &r->resources, &r->n_resources, &r->resources_size,
                                          sizeof(*r->resources), SNAPSHOT_RESOURCES_MAX, name, resource_cmp, &found);

        if (i < 0)
                return (int) i;
        if (!found) {
                r->resources[i].name = strdup(name);
                if (!r->resources[i].name)
                        return -ENOMEM;
        }
        *ret = &r->resources[i];
        return 0;
}

struct key_id_key {
        const char *provider, *key_id;
};

static int key_id_cmp(const void *key, const void *elem) {
        const struct key_id_key *k = key;
        const struct key_id_count *c = elem;
        const int d = strcmp(k->provider, c->provider);

        return d != 0 ? d : strcmp(k->key_id, c->key_id);
}

static int key_id_count(struct resource *res, const char *provider, const char *key_id) {
        const struct key_id_key key = { provider, key_id };
        struct key_id_count *c;
        bool found;
        ssize_t i = sorted_find_or_insert((void **) &res->key_ids, &res->n_key_ids, &res->key_ids_size,
                                          sizeof(*res->key_ids), SNAPSHOT_KEY_IDS_MAX, &key, key_id_cmp, &found);

        if (i < 0)
                return (int) i;
        c = &res->key_ids[i];
        c->objects++;
        if (found)
                return 0;
        c->provider = strdup(provider);
        c->key_id = strdup(key_id);
        return c->provider && c->key_id ? 0 : -ENOMEM;
}

static enum value_class value_classify(const uint8_t *value, size_t len) {
        for (enum value_class c = VALUE_PLAINTEXT + 1; c < VALUE_CLASS_MAX; c++) {
                const size_t n = strlen(value_classes[c].prefix);

                if (len >= n && memcmp(value, value_classes[c].prefix, n) == 0)
                        return c;
        }
        return VALUE_PLAINTEXT;
}

/* "k8s:enc:kms:v2:" then "<provider name>:" then an EncryptedObject. */
static int kms_v2_count(struct audit *a, struct resource *res, const uint8_t *value, size_t len) {
        const size_t skip = strlen(value_classes[VALUE_KMS_V2].prefix);
        const uint8_t *name = value + skip, *colon = memchr(name, ':', len - skip);
        Snapshot__EncryptedObject *eo;
        int r;

        if (!colon) {
                res->kms_v2_malformed++;
                return 0;
        }
        eo = snapshot__encrypted_object__unpack(NULL, len - (size_t) (colon + 1 - value), colon + 1);
        if (!eo || !*eo->keyid) {
                res->kms_v2_malformed++;
                r = 0;
        } else {
                r = text_set(&a->provider, name, (size_t) (colon - name));
                if (r >= 0)
                        r = text_set(&a->name, (const uint8_t *) eo->keyid, strlen(eo->keyid));
                if (r >= 0)
                        r = key_id_count(res, a->provider.buf, a->name.buf);
        }
        if (eo)
                snapshot__encrypted_object__free_unpacked(eo, NULL);
        return r;
}

/* /registry/<resource>/[<namespace>/]<name>; resources of an API group other
 * than the built-in ones (custom resources, aggregated APIs) are stored as
 * /registry/<group>/<resource>/..., named <resource>.<group> as in an
 * EncryptionConfiguration. */
static int audit_visit(const uint8_t *key, size_t key_len, const uint8_t *value, size_t value_len, void *userdata) {
        struct audit *a = userdata;
        struct snapshot_report *r = a->report;
        const size_t plen = strlen(REGISTRY_PREFIX);
        const uint8_t *type, *slash, *name, *end = key + key_len;
        struct resource *res = NULL;
        enum value_class class;
        int k;

        r->live_keys++;
        if (key_len <= plen || memcmp(key, REGISTRY_PREFIX, plen) != 0) {
                r->outside_registry++;
                return 0;
        }
        type = key + plen;
        slash = memchr(type, '/', (size_t) (end - type));
        name = slash ? slash + 1 : end;
        if (slash && memchr(type, '.', (size_t) (slash - type))) {
                const uint8_t *group = type, *group_end = slash;
                size_t at = 0;

                type = name;
                slash = memchr(type, '/', (size_t) (end - type));
                name = slash ? slash + 1 : end;
                k = text_put(&a->type, &at, type, (size_t) ((slash ? slash : end) - type));
                if (k >= 0)
                        k = text_put(&a->type, &at, (const uint8_t *) ".", 1);
                if (k >= 0)
                        k = text_put(&a->type, &at, group, (size_t) (group_end - group));
        } else
                k = text_set(&a->type, type, (size_t) ((slash ? slash : end) - type));
        if (k < 0)
                return k;
        k = resource_get(r, a->type.buf, &res);
        if (k < 0)
                return k;

        class = value_classify(value, value_len);
        res->objects++;
        res->by_class[class]++;
        if (class == VALUE_KMS_V2)
                return kms_v2_count(a, res, value, value_len);
        if (class != VALUE_PLAINTEXT || !res->required)
                return 0;
        r->unencrypted++;
        k = text_set(&a->name, name, (size_t) (end - name));
        if (k < 0)
                return k;
        if (reserve((void **) &res->plaintext_names, &res->plaintext_names_size, res->n_plaintext_names,
                    sizeof(char *)) < 0)
                return -ENOMEM;
        res->plaintext_names[res->n_plaintext_names] = strdup(a->name.buf);
        if (!res->plaintext_names[res->n_plaintext_names])
                return -ENOMEM;
        res->n_plaintext_names++;
        return 0;
}

static int strcmp_indirect(const void *a, const void *b) {
        return strcmp(*(char *const *) a, *(char *const *) b);
}

/* The trailer of etcdctl snapshot save: *size is then the database's. */
static int hash_check(const uint8_t *data, size_t *size, bool *checked, char *err, size_t err_size) {
        uint8_t md[SHA256_DIGEST_LENGTH];

        *checked = *size % SNAPSHOT_SIZE_ALIGN == SHA256_DIGEST_LENGTH;
        if (!*checked && *size % SNAPSHOT_SIZE_ALIGN != 0) {
                errorf(err, err_size, "truncated or padded: %zu bytes is neither whole %d-byte blocks (a backend "
                       "file) nor that plus a %d-byte SHA-256 (a saved snapshot)", *size, SNAPSHOT_SIZE_ALIGN,
                       SHA256_DIGEST_LENGTH);
                return -EBADMSG;
        }
        if (!*checked)
                return 0;
        *size -= SHA256_DIGEST_LENGTH;
        if (!EVP_Digest(data, *size, md, NULL, EVP_sha256(), NULL))
                return -ENOMEM;
        if (memcmp(md, data + *size, sizeof(md)) != 0) {
                errorf(err, err_size, "corrupt: the snapshot's SHA-256 does not match its contents "
                       "(damaged or altered after etcdctl snapshot save)");
                return -EBADMSG;
        }
        return 0;
}

int snapshot_audit(const uint8_t *data, size_t size, const char *const *required, size_t n_required,
                   struct snapshot_report **ret, char *err, size_t err_size) {
        _cleanup_(snapshot_report_freep) struct snapshot_report *r = calloc(1, sizeof(*r));
        _cleanup_(mvcc_index_freep) struct mvcc_index *idx = NULL;
        struct audit a = { .report = r };
        struct bbolt db;
        int k;

        if (!r)
                return -ENOMEM;
        if (n_required > SNAPSHOT_REQUIRED_MAX) {
                errorf(err, err_size, "more than %d required resource types", SNAPSHOT_REQUIRED_MAX);
                return -E2BIG;
        }
        for (size_t i = 0; i < n_required; i++) {
                struct resource *res = NULL;

                k = resource_get(r, required[i], &res);
                if (k < 0)
                        return k;
                res->required = true;
        }

        k = hash_check(data, &size, &r->hash_checked, err, err_size);
        if (k < 0)
                return k;
        k = bbolt_open(&db, data, size, err, err_size);
        if (k < 0)
                return k;
        r->txid = db.txid;
        k = mvcc_index_build(&db, &idx, err, err_size);
        if (k < 0)
                return k;
        r->revision = mvcc_index_revision(idx);

        k = mvcc_index_foreach_live(idx, audit_visit, &a);
        free(a.type.buf);
        free(a.name.buf);
        free(a.provider.buf);
        if (k == -E2BIG)
                errorf(err, err_size, "more than %d resource types, or %d key ids for one",
                       SNAPSHOT_RESOURCES_MAX, SNAPSHOT_KEY_IDS_MAX);
        if (k < 0)
                return k;
        for (size_t i = 0; i < r->n_resources; i++)
                if (r->resources[i].n_plaintext_names > 0)
                        qsort(r->resources[i].plaintext_names, r->resources[i].n_plaintext_names,
                              sizeof(char *), strcmp_indirect);
        *ret = TAKE_PTR(r);
        return 0;
}

int snapshot_audit_file(const char *path, const char *const *required, size_t n_required,
                        struct snapshot_report **ret, char *err, size_t err_size) {
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        struct stat st;
        void *map;
        int r;

        if (fd < 0 || fstat(fd, &st) < 0) {
                r = -errno;
                errorf(err, err_size, "%s", strerror(-r));
                return r;
        }
        if (!S_ISREG(st.st_mode) || st.st_size == 0) {
                errorf(err, err_size, "%s", S_ISREG(st.st_mode) ? "empty file" : "not a regular file");
                return -EINVAL;
        }
        map = mmap(NULL, (size_t) st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
                r = -errno;
                errorf(err, err_size, "mmap: %s", strerror(-r));
                return r;
        }
        r = snapshot_audit(map, (size_t) st.st_size, required, n_required, ret, err, err_size);
        (void) munmap(map, (size_t) st.st_size);
        return r;
}
