/* KMS v2 messages <-> plain C structs (see proto.h). The only file in plugin/
 * that includes protobuf-c. */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kms_v2.pb-c.h"
#include "proto.h"

/* Under AddressSanitizer every allocation goes to the heap, sized exactly, so
 * that an overread in protobuf-c or in our use of it is caught (the fuzz
 * target runs this way); a bump arena would hide it. */
#if defined(__SANITIZE_ADDRESS__)
#define ARENA_ENABLED 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ARENA_ENABLED 0
#endif
#endif
#ifndef ARENA_ENABLED
#define ARENA_ENABLED 1
#endif

/* Arena and heap blocks keep 16-byte alignment; a heap block carries its size
 * in a header of that size, so that free can wipe it. */
#define ALIGN 16u

/* Wire types (protobuf encoding, "Message Structure"). */
enum {
        WIRE_VARINT = 0,
        WIRE_I64 = 1,
        WIRE_LEN = 2,
        WIRE_SGROUP = 3,
        WIRE_EGROUP = 4,
        WIRE_I32 = 5,
};

struct wire {
        const uint8_t *p, *end;
};

struct wire_field {
        uint32_t number;
        unsigned type;
        const uint8_t *data;              /* WIRE_LEN only */
        size_t len;
};

/* ---- allocator ---------------------------------------------------------- */

struct arena_state {
        struct proto_arena *arena;
        bool oom;
};

static void *arena_alloc(void *userdata, size_t size) {
        struct arena_state *st = userdata;
        struct proto_arena *a = st->arena;
        size_t rounded;
        uint8_t *h;

        if (size > SIZE_MAX - 2 * ALIGN) {
                st->oom = true;
                return NULL;
        }
        /* Never hand out zero bytes: a pointer one past the arena would be
         * mistaken for a heap block on free. */
        rounded = size == 0 ? ALIGN : (size + ALIGN - 1) & ~(size_t) (ALIGN - 1);

        if (ARENA_ENABLED && rounded <= sizeof(a->buf) - a->used) {
                uint8_t *p = a->buf + a->used;

                a->used += rounded;
                return p;
        }

        h = malloc(ALIGN + size);
        if (!h) {
                st->oom = true;
                return NULL;
        }
        memcpy(h, &size, sizeof(size));
        return h + ALIGN;
}

static void arena_free(void *userdata, void *p) {
        struct arena_state *st = userdata;
        const uintptr_t u = (uintptr_t) p, b = (uintptr_t) st->arena->buf;
        uint8_t *h;
        size_t size;

        if (!p)
                return;
        /* Arena memory is wiped all at once in proto_request_done(). */
        if (u >= b && u < b + sizeof(st->arena->buf))
                return;

        h = (uint8_t *) p - ALIGN;
        memcpy(&size, h, sizeof(size));
        explicit_bzero(h, ALIGN + size);
        free(h);
}

static ProtobufCAllocator arena_allocator(struct arena_state *st) {
        return (ProtobufCAllocator) {
                .alloc = arena_alloc,
                .free = arena_free,
                .allocator_data = st,
        };
}

/* ---- wire scan ---------------------------------------------------------- */

static int wire_varint(struct wire *w, uint64_t *ret) {
        uint64_t v = 0;

        /* At most 10 bytes encode 64 bits. */
        for (unsigned shift = 0; shift <= 63; shift += 7) {
                uint8_t b;

                if (w->p >= w->end)
                        return -EBADMSG;
                b = *w->p++;
                v |= (uint64_t) (b & 0x7f) << shift;
                if (!(b & 0x80)) {
                        *ret = v;
                        return 0;
                }
        }
        return -EBADMSG;
}

static int wire_next(struct wire *w, struct wire_field *f) {
        uint64_t tag, n;
        int r;

        r = wire_varint(w, &tag);
        if (r < 0)
                return r;
        /* Field numbers are 1 .. 2^29-1. */
        if (tag >> 3 == 0 || tag >> 3 > 0x1fffffff)
                return -EBADMSG;
        f->number = (uint32_t) (tag >> 3);
        f->type = (unsigned) (tag & 7);
        f->data = NULL;
        f->len = 0;

        switch (f->type) {
        case WIRE_VARINT:
                return wire_varint(w, &n);
        case WIRE_I64:
        case WIRE_I32:
                n = f->type == WIRE_I64 ? 8 : 4;
                if ((size_t) (w->end - w->p) < n)
                        return -EBADMSG;
                w->p += n;
                return 0;
        case WIRE_LEN:
                r = wire_varint(w, &n);
                if (r < 0)
                        return r;
                if (n > (size_t) (w->end - w->p))
                        return -EBADMSG;
                f->data = w->p;
                f->len = (size_t) n;
                w->p += n;
                return 0;
        default:
                /* Groups are proto2 only and protobuf-c does not parse them;
                 * 6 and 7 are not wire types. */
                return -EBADMSG;
        }
}

/* A bytes field: must be length-delimited. */
static int field_bytes(const struct wire_field *f, size_t *ret_len) {
        if (f->type != WIRE_LEN)
                return -EBADMSG;
        *ret_len = f->len;
        return 0;
}

/* A string field: length-delimited UTF-8 (proto3 "string"), and no NUL, since
 * protobuf-c hands it over NUL-terminated and a NUL would silently cut a key
 * id short. */
static int field_string(const struct wire_field *f, size_t *ret_len) {
        if (f->type != WIRE_LEN)
                return -EBADMSG;
        if (memchr(f->data, 0, f->len))
                return -EBADMSG;
        if (!proto_utf8_valid((const char *) f->data, f->len))
                return -EBADMSG;
        *ret_len = f->len;
        return 0;
}

/* One map<string, bytes> entry: message { string key = 1; bytes value = 2; }
 * (protobuf "Maps", backwards compatibility). Returns key + value lengths,
 * summed over repeated occurrences, which bounds what protobuf-c keeps. */
static int scan_map_entry(const struct wire_field *f, size_t *ret_size) {
        struct wire w;
        size_t size = 0, n;
        unsigned fields = 0;
        int r;

        if (f->type != WIRE_LEN)
                return -EBADMSG;

        w = (struct wire) { f->data, f->data + f->len };
        while (w.p < w.end) {
                struct wire_field e;

                r = wire_next(&w, &e);
                if (r < 0)
                        return r;
                if (++fields > PROTO_FIELDS_MAX)
                        return -E2BIG;
                if (e.number == 1)
                        r = field_string(&e, &n);
                else if (e.number == 2)
                        r = field_bytes(&e, &n);
                else
                        continue;
                if (r < 0)
                        return r;
                size += n;        /* cannot overflow: bounded by the message */
        }

        *ret_size = size;
        return 0;
}

void proto_request_init(struct proto_request *req) {
        req->method = _KMS_METHOD_MAX;
        memset(&req->decrypt, 0, sizeof(req->decrypt));
        memset(&req->encrypt, 0, sizeof(req->encrypt));
        req->wire = NULL;
        req->wire_len = 0;
        req->msg = NULL;
        req->arena.used = 0;
}

int proto_request_scan(struct proto_request *req, enum kms_method m,
                       const uint8_t *buf, size_t len) {
        struct wire w = { buf, buf + len };
        unsigned fields = 0;
        int r;

        if ((unsigned) m >= _KMS_METHOD_MAX || req->msg || (!buf && len > 0))
                return -EINVAL;

        req->method = m;
        memset(&req->decrypt, 0, sizeof(req->decrypt));
        memset(&req->encrypt, 0, sizeof(req->encrypt));

        while (w.p < w.end) {
                struct wire_field f;
                size_t n;

                r = wire_next(&w, &f);
                if (r < 0)
                        return r;
                if (++fields > PROTO_FIELDS_MAX)
                        return -E2BIG;

                /* Field numbers as in plugin/kms_v2.proto; others are unknown
                 * fields, which proto3 parsers skip. */
                r = 0;
                switch (m) {
                case KMS_METHOD_STATUS:
                        break;
                case KMS_METHOD_ENCRYPT:
                        if (f.number == 1)
                                r = field_bytes(&f, &req->encrypt.plaintext_len);
                        else if (f.number == 2)
                                r = field_string(&f, &req->encrypt.uid_len);
                        break;
                case KMS_METHOD_DECRYPT:
                        if (f.number == 1)
                                r = field_bytes(&f, &req->decrypt.ciphertext_len);
                        else if (f.number == 2)
                                r = field_string(&f, &req->decrypt.uid_len);
                        else if (f.number == 3)
                                r = field_string(&f, &req->decrypt.key_id_len);
                        else if (f.number == 4) {
                                r = scan_map_entry(&f, &n);
                                if (r >= 0) {
                                        req->decrypt.n_annotations++;
                                        req->decrypt.annotations_size += n;
                                }
                        }
                        break;
                default:
                        assert(false);
                }
                if (r < 0)
                        return r;
        }

        req->wire = buf;
        req->wire_len = len;
        return 0;
}

int proto_request_unpack(struct proto_request *req) {
        struct arena_state st = { .arena = &req->arena };
        ProtobufCAllocator a = arena_allocator(&st);

        if (req->msg || (unsigned) req->method >= _KMS_METHOD_MAX)
                return -EINVAL;

        switch (req->method) {
        case KMS_METHOD_STATUS: {
                V2__StatusRequest *m;

                m = v2__status_request__unpack(&a, req->wire_len, req->wire);
                if (!m)
                        return st.oom ? -ENOMEM : -EBADMSG;
                req->msg = m;
                return 0;
        }
        case KMS_METHOD_ENCRYPT: {
                V2__EncryptRequest *m;

                m = v2__encrypt_request__unpack(&a, req->wire_len, req->wire);
                if (!m)
                        return st.oom ? -ENOMEM : -EBADMSG;
                req->msg = m;
                /* The scan and protobuf-c read the same bytes; anything else
                 * would be a bug in one of them, so refuse rather than trust. */
                if (m->plaintext.len != req->encrypt.plaintext_len ||
                    strlen(m->uid) != req->encrypt.uid_len)
                        return -EBADMSG;
                req->encrypt.plaintext = m->plaintext.data;
                req->encrypt.uid = m->uid;
                return 0;
        }
        case KMS_METHOD_DECRYPT: {
                V2__DecryptRequest *m;

                m = v2__decrypt_request__unpack(&a, req->wire_len, req->wire);
                if (!m)
                        return st.oom ? -ENOMEM : -EBADMSG;
                req->msg = m;
                if (m->ciphertext.len != req->decrypt.ciphertext_len ||
                    strlen(m->uid) != req->decrypt.uid_len ||
                    strlen(m->key_id) != req->decrypt.key_id_len ||
                    m->n_annotations != req->decrypt.n_annotations)
                        return -EBADMSG;
                req->decrypt.ciphertext = m->ciphertext.data;
                req->decrypt.uid = m->uid;
                req->decrypt.key_id = m->key_id;
                return 0;
        }
        default:
                return -EINVAL;
        }
}

void proto_request_done(struct proto_request *req) {
        if (req->msg) {
                struct arena_state st = { .arena = &req->arena };
                ProtobufCAllocator a = arena_allocator(&st);

                protobuf_c_message_free_unpacked(req->msg, &a);
                req->msg = NULL;
        }
        explicit_bzero(req->arena.buf, req->arena.used);
        req->arena.used = 0;
        memset(&req->decrypt, 0, sizeof(req->decrypt));
        memset(&req->encrypt, 0, sizeof(req->encrypt));
}

/* ---- responses ---------------------------------------------------------- */

static int pack(const ProtobufCMessage *m, size_t headroom, uint8_t **ret, size_t *ret_len) {
        size_t n, w;
        uint8_t *buf;

        n = protobuf_c_message_get_packed_size(m);
        if (n > SIZE_MAX - headroom)
                return -ENOMEM;
        buf = malloc(headroom + n);
        if (!buf)
                return -ENOMEM;
        w = protobuf_c_message_pack(m, buf + headroom);
        assert(w == n);
        (void) w;

        *ret = buf;
        *ret_len = headroom + n;
        return 0;
}

/* protobuf-c's message structs want non-const pointers; packing only reads. */
#define UNCONST(p) ((void *) (uintptr_t) (const void *) (p))

int proto_status_response_pack(const char *version, const char *healthz, const char *key_id,
                               size_t headroom, uint8_t **ret, size_t *ret_len) {
        V2__StatusResponse m = V2__STATUS_RESPONSE__INIT;

        m.version = UNCONST(version);
        m.healthz = UNCONST(healthz);
        m.key_id = UNCONST(key_id);
        return pack(&m.base, headroom, ret, ret_len);
}

int proto_encrypt_response_pack(const uint8_t *ct, size_t ct_len, const char *key_id,
                                size_t headroom, uint8_t **ret, size_t *ret_len) {
        /* No annotations: see service.c. */
        V2__EncryptResponse m = V2__ENCRYPT_RESPONSE__INIT;

        m.ciphertext = (ProtobufCBinaryData) { .len = ct_len, .data = UNCONST(ct) };
        m.key_id = UNCONST(key_id);
        return pack(&m.base, headroom, ret, ret_len);
}

int proto_decrypt_response_pack(const uint8_t *pt, size_t pt_len,
                                size_t headroom, uint8_t **ret, size_t *ret_len) {
        V2__DecryptResponse m = V2__DECRYPT_RESPONSE__INIT;

        m.plaintext = (ProtobufCBinaryData) { .len = pt_len, .data = UNCONST(pt) };
        return pack(&m.base, headroom, ret, ret_len);
}

/* ---- UTF-8 -------------------------------------------------------------- */

bool proto_utf8_valid(const char *s, size_t len) {
        const unsigned char *p = (const unsigned char *) s, *end = p + len;

        while (p < end) {
                uint32_t cp, min;
                size_t n;

                /* Key ids and uids are ASCII: skip it a word at a time. */
                if ((size_t) (end - p) >= 8) {
                        uint64_t w;

                        memcpy(&w, p, sizeof(w));
                        if (!(w & UINT64_C(0x8080808080808080))) {
                                p += 8;
                                continue;
                        }
                }
                if (*p < 0x80) {
                        p++;
                        continue;
                }
                if ((*p & 0xe0) == 0xc0) {
                        n = 2;
                        cp = *p & 0x1f;
                        min = 0x80;
                } else if ((*p & 0xf0) == 0xe0) {
                        n = 3;
                        cp = *p & 0x0f;
                        min = 0x800;
                } else if ((*p & 0xf8) == 0xf0) {
                        n = 4;
                        cp = *p & 0x07;
                        min = 0x10000;
                } else
                        return false;

                if ((size_t) (end - p) < n)
                        return false;
                for (size_t i = 1; i < n; i++) {
                        if ((p[i] & 0xc0) != 0x80)
                                return false;
                        cp = cp << 6 | (p[i] & 0x3f);
                }
                if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
                        return false;
                p += n;
        }
        return true;
}
