/* gRPC over HTTP/2 for one call (grpc/doc/PROTOCOL-HTTP2.md, "the gRPC doc"
 * below): which request headers matter and what they must say, and how an
 * answer is spelled in response headers and trailers. The errno behind every
 * failure becomes a status through the one table in grpc.c. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "call.h"
#include "service.h"

const struct grpc_field grpc_trailers_ok[1] = {
        { "grpc-status", "0" },
};

void grpc_call_done(struct grpc_call *call) {
        free(call->path);
        *call = (struct grpc_call) {};
}

static bool content_type_is_grpc(const uint8_t *v, size_t n) {
        static const char base[] = "application/grpc";
        size_t k = sizeof(base) - 1;

        /* the gRPC doc: "application/grpc" [("+proto" / "+json" / {custom})];
         * media types are case-insensitive (RFC 9110 §8.3.1). */
        if (n < k || strncasecmp((const char *) v, base, k) != 0)
                return false;
        return n == k || v[k] == '+' || v[k] == ';';
}

int grpc_call_header(struct grpc_call *call, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen) {
#define IS(lit) (namelen == sizeof(lit) - 1 && memcmp(name, lit, sizeof(lit) - 1) == 0)
        if (IS(":method"))
                call->post = valuelen == 4 && memcmp(value, "POST", 4) == 0;
        else if (IS(":path")) {
                char *p = strndup((const char *) value, valuelen);
                if (!p)
                        return -ENOMEM;
                free(call->path);
                call->path = p;
        } else if (IS("content-type"))
                call->content_type_ok = content_type_is_grpc(value, valuelen);
        else if (IS("grpc-encoding"))
                call->encoding_compressed = !(valuelen == 8 && memcmp(value, "identity", 8) == 0);
        else if (IS("grpc-timeout")) {
                if (grpc_timeout_parse((const char *) value, &call->timeout_usec) < 0)
                        call->timeout_bad = true;
                else
                        call->has_timeout = true;
        }
#undef IS
        return 0;
}

int grpc_call_check(const struct grpc_call *call) {
        if (!call->post)
                return -EOPNOTSUPP;
        if (!call->content_type_ok)
                return -EMEDIUMTYPE;
        if (call->timeout_bad)
                return -EINVAL;
        /* Refused before any body is buffered. */
        if (!kms_service_has_method(call->path))
                return -ENOENT;
        if (call->has_timeout && call->timeout_usec == 0)
                return -ETIMEDOUT;
        return 0;
}

static void head_add(struct grpc_head *h, const char *name, const char *value) {
        h->fields[h->n_fields++] = (struct grpc_field) { name, value };
}

/* Trailers-Only (the gRPC doc: HEADERS with :status, content-type,
 * grpc-status, grpc-message and END_STREAM). */
static void head_trailers_only(struct grpc_head *h, unsigned http_status, enum grpc_code code,
                               const char *message, bool compression_refused) {
        int r;

        *h = (struct grpc_head) { .code = code, .trailers_only = true };
        snprintf(h->http_status, sizeof(h->http_status), "%u", http_status);
        snprintf(h->grpc_status, sizeof(h->grpc_status), "%d", (int) code);
        head_add(h, ":status", h->http_status);
        head_add(h, "content-type", "application/grpc");
        head_add(h, "grpc-status", h->grpc_status);
        if (message && *message) {
                r = grpc_percent_encode(message, h->grpc_message, sizeof(h->grpc_message));
                if (r > 0 || r == -ENOBUFS)
                        head_add(h, "grpc-message", h->grpc_message);
        }
        if (compression_refused)
                /* the gRPC doc, "Compression": say what we do accept */
                head_add(h, "grpc-accept-encoding", "identity");
}

void grpc_head_from_errno(struct grpc_head *h, const struct grpc_call *call, int r,
                          const char *message) {
        const struct grpc_status st = grpc_status_from_errno(GRPC_ORIGIN_CALL, r);
        char buf[GRPC_MESSAGE_MAX];

        if (!message && r == -ENOENT) {
                /* name the method; :path is bounded only by max_header_list_size */
                snprintf(buf, sizeof(buf), "%s %.*s", st.message, GRPC_PATH_QUOTE_MAX,
                         call->path ?: "");
                message = buf;
        }
        head_trailers_only(h, st.http_status, st.code, message ?: st.message, r == -EPROTO);
}

void grpc_head_from_reply(struct grpc_head *h, const struct grpc_call *call,
                          const struct grpc_reply *reply) {
        if (reply->code == GRPC_OK && reply->body && reply->body_len > 0) {
                *h = (struct grpc_head) { .code = GRPC_OK };
                head_add(h, ":status", "200");
                head_add(h, "content-type", "application/grpc");
                return;
        }
        if (reply->code == GRPC_OK)
                /* the service answers OK only with a message */
                return head_trailers_only(h, 200, GRPC_INTERNAL, "empty reply", false);

        if (reply->origin == GRPC_ORIGIN_CALL && reply->error == -EPROTO &&
            !call->encoding_compressed)
                /* The service saw the compressed flag but cannot see the
                 * headers: without a grpc-encoding the flag is a protocol
                 * error (the gRPC doc, "Compressed-Flag"), not an encoding we
                 * lack. */
                return grpc_head_from_errno(h, call, -EBADMSG,
                                            "compressed flag without grpc-encoding");
        if (reply->origin == GRPC_ORIGIN_CALL)
                return grpc_head_from_errno(h, call, reply->error, reply->message);
        head_trailers_only(h, 200, reply->code, reply->message, false);
}
