/* gRPC pieces that know neither HTTP/2 nor protobuf: message framing, the
 * grpc-timeout and grpc-message header encodings (gRPC over HTTP/2,
 * grpc/doc/PROTOCOL-HTTP2.md), the method table, and the one errno -> gRPC
 * status table (STYLE 3). */
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <string.h>

#include "grpc.h"
#include "plugin.h"
#include "macro.h"
#include "service.h"

#define KMS_SERVICE_PREFIX "/v2.KeyManagementService/"

static const char *const method_names[_KMS_METHOD_MAX] = {
        [KMS_METHOD_STATUS] = "Status",
        [KMS_METHOD_ENCRYPT] = "Encrypt",
        [KMS_METHOD_DECRYPT] = "Decrypt",
};

int kms_method_from_path(const char *path) {
        const size_t n = strlen(KMS_SERVICE_PREFIX);

        /* :path is "/" Service-Name "/" method-name, compared exactly
         * (PROTOCOL-HTTP2.md, "Path"). */
        if (!path || strncmp(path, KMS_SERVICE_PREFIX, n) != 0)
                return -ENOENT;
        for (size_t i = 0; i < _KMS_METHOD_MAX; i++)
                if (strcmp(path + n, method_names[i]) == 0)
                        return (int) i;
        return -ENOENT;
}

bool kms_service_has_method(const char *path) {
        return kms_method_from_path(path) >= 0;
}

const char *kms_method_name(enum kms_method m) {
        if ((unsigned) m >= _KMS_METHOD_MAX)
                return NULL;
        return method_names[m];
}

int grpc_timeout_parse(const char *value, uint64_t *ret_usec) {
        /* Timeout -> "grpc-timeout" TimeoutValue TimeoutUnit
         * TimeoutValue -> {positive integer as ASCII string of at most 8 digits}
         * TimeoutUnit  -> Hour / Minute / Second / Millisecond / Microsecond /
         *                 Nanosecond ("H" "M" "S" "m" "u" "n")
         * 99999999 hours is 3.6e17 us, so nothing below overflows. */
        uint64_t v = 0;
        size_t i;

        if (!value || !ret_usec)
                return -EINVAL;

        for (i = 0; value[i] >= '0' && value[i] <= '9'; i++) {
                if (i >= 8)
                        return -EINVAL;
                v = v * 10 + (uint64_t) (value[i] - '0');
        }
        if (i == 0 || value[i] == '\0' || value[i + 1] != '\0')
                return -EINVAL;

        switch (value[i]) {
        case 'H':
                v *= UINT64_C(3600000000);
                break;
        case 'M':
                v *= UINT64_C(60000000);
                break;
        case 'S':
                v *= UINT64_C(1000000);
                break;
        case 'm':
                v *= UINT64_C(1000);
                break;
        case 'u':
                break;
        case 'n':
                /* Round up: a short but non-zero deadline must not become 0. */
                v = (v + 999) / 1000;
                break;
        default:
                return -EINVAL;
        }

        *ret_usec = v;
        return 0;
}

int grpc_percent_encode(const char *in, char *out, size_t size) {
        /* grpc-message is percent-encoded UTF-8: bytes outside 0x20-0x7E and
         * '%' itself become "%XX" (PROTOCOL-HTTP2.md, "Responses"). */
        static const char hex[] = "0123456789ABCDEF";
        size_t o = 0, char_start = 0;
        bool in_char = false;

        if (!out || size == 0)
                return -ENOBUFS;
        if (size > INT_MAX)
                size = INT_MAX;
        if (!in)
                in = "";

        for (const unsigned char *p = (const unsigned char *) in; *p; p++) {
                const bool escape = *p < 0x20 || *p > 0x7e || *p == '%';
                const size_t need = escape ? 3 : 1;

                /* Remember where a multi-byte UTF-8 character starts, so
                 * that truncation never leaves half of one behind. */
                if ((*p & 0xc0) != 0x80) {
                        char_start = o;
                        in_char = *p >= 0xc0;
                }

                if (size - o <= need) {
                        if ((*p & 0xc0) == 0x80 && in_char)
                                o = char_start;
                        out[o] = '\0';
                        return -ENOBUFS;
                }

                if (escape) {
                        out[o++] = '%';
                        out[o++] = hex[*p >> 4];
                        out[o++] = hex[*p & 0xf];
                } else
                        out[o++] = (char) *p;
        }

        out[o] = '\0';
        return (int) o;
}

/* The one table (STYLE 3). Codes as grpc/doc/statuscodes.md defines them;
 * the SERVICE rows are the backend contract plugin.h documents. */
static const struct {
        enum grpc_origin origin;
        int error;
        struct grpc_status status;
} errno_table[] = {
        { GRPC_ORIGIN_SERVICE, -EINVAL, { 200, GRPC_INVALID_ARGUMENT, "invalid request" } },
        { GRPC_ORIGIN_SERVICE, -EBADMSG,
          { 200, GRPC_INVALID_ARGUMENT, "ciphertext failed authentication" } },
        { GRPC_ORIGIN_SERVICE, -ENOENT, { 200, GRPC_NOT_FOUND, "unknown key id" } },
        { GRPC_ORIGIN_SERVICE, -ENOKEY, { 200, GRPC_UNAVAILABLE, "no keys unsealed" } },
        { GRPC_ORIGIN_SERVICE, -EPERM,
          { 200, GRPC_FAILED_PRECONDITION, "measured boot refused the key cache" } },

        /* RFC 9113 §10.5.1 suggests 431 for a header list over the limit. */
        { GRPC_ORIGIN_CALL, -E2BIG,
          { 431, GRPC_RESOURCE_EXHAUSTED, "request header list too large" } },
        /* PROTOCOL-HTTP2.md: servers SHOULD answer a request that is not
         * gRPC with an HTTP status, so that plain HTTP clients do not take
         * the error for success; the gRPC code is then INTERNAL. */
        { GRPC_ORIGIN_CALL, -EOPNOTSUPP, { 405, GRPC_INTERNAL, "gRPC requires POST" } },
        { GRPC_ORIGIN_CALL, -EMEDIUMTYPE, { 415, GRPC_INTERNAL, "invalid gRPC content-type" } },
        { GRPC_ORIGIN_CALL, -EINVAL, { 400, GRPC_INTERNAL, "malformed grpc-timeout" } },
        { GRPC_ORIGIN_CALL, -ENOENT, { 200, GRPC_UNIMPLEMENTED, "unknown method" } },
        { GRPC_ORIGIN_CALL, -ETIMEDOUT, { 200, GRPC_DEADLINE_EXCEEDED, "deadline exceeded" } },
        /* grpc-go: "received message larger than max" */
        { GRPC_ORIGIN_CALL, -EMSGSIZE, { 200, GRPC_RESOURCE_EXHAUSTED, "request too large" } },
        /* compression.md: a message compressed with an encoding the server
         * does not support is UNIMPLEMENTED; we support none. */
        { GRPC_ORIGIN_CALL, -EPROTO,
          { 200, GRPC_UNIMPLEMENTED, "compressed messages are not supported" } },
        /* grpc-go answers a truncated message or a second message on a
         * unary call with INTERNAL. */
        { GRPC_ORIGIN_CALL, -EBADMSG,
          { 200, GRPC_INTERNAL, "unary request must be exactly one gRPC message" } },
};

struct grpc_status grpc_status_from_errno(enum grpc_origin origin, int r) {
        const char *s;

        for (size_t i = 0; i < ARRAY_SIZE(errno_table); i++)
                if (errno_table[i].origin == origin && errno_table[i].error == r)
                        return errno_table[i].status;
        s = r < 0 && r > -4096 ? strerrordesc_np(-r) : NULL;
        return (struct grpc_status) { 200, GRPC_INTERNAL, s ?: "internal error" };
}

int grpc_frame_unpack(const uint8_t *buf, size_t len, size_t max,
                      const uint8_t **ret_msg, size_t *ret_len) {
        /* Length-Prefixed-Message -> Compressed-Flag Message-Length Message:
         * a 1-byte flag, a 4-byte big-endian length (PROTOCOL-HTTP2.md). */
        uint32_t n;

        if (!buf || len < GRPC_FRAME_HEADER_SIZE)
                return -EBADMSG;
        if (buf[0] > 1)
                return -EBADMSG;        /* flag is 0 or 1; nothing else is defined */
        if (buf[0] == 1)
                return -EPROTO;

        n = (uint32_t) buf[1] << 24 | (uint32_t) buf[2] << 16 | (uint32_t) buf[3] << 8 | buf[4];
        if (n > max)
                return -EMSGSIZE;
        if (n != len - GRPC_FRAME_HEADER_SIZE)
                return -EBADMSG;

        *ret_msg = buf + GRPC_FRAME_HEADER_SIZE;
        *ret_len = n;
        return 0;
}

void grpc_frame_header(uint8_t out[GRPC_FRAME_HEADER_SIZE], size_t len) {
        /* Callers never build messages anywhere near 4 GiB (replies are at
         * most a few KiB); the prefix cannot express more. */
        out[0] = 0;
        out[1] = (uint8_t) (len >> 24);
        out[2] = (uint8_t) (len >> 16);
        out[3] = (uint8_t) (len >> 8);
        out[4] = (uint8_t) len;
}

const char *kms_grpc_code_to_string(int code) {
        static const char *const names[] = {
                [GRPC_OK] = "OK",
                [GRPC_CANCELLED] = "CANCELLED",
                [GRPC_UNKNOWN] = "UNKNOWN",
                [GRPC_INVALID_ARGUMENT] = "INVALID_ARGUMENT",
                [GRPC_DEADLINE_EXCEEDED] = "DEADLINE_EXCEEDED",
                [GRPC_NOT_FOUND] = "NOT_FOUND",
                [GRPC_ALREADY_EXISTS] = "ALREADY_EXISTS",
                [GRPC_PERMISSION_DENIED] = "PERMISSION_DENIED",
                [GRPC_RESOURCE_EXHAUSTED] = "RESOURCE_EXHAUSTED",
                [GRPC_FAILED_PRECONDITION] = "FAILED_PRECONDITION",
                [GRPC_ABORTED] = "ABORTED",
                [GRPC_OUT_OF_RANGE] = "OUT_OF_RANGE",
                [GRPC_UNIMPLEMENTED] = "UNIMPLEMENTED",
                [GRPC_INTERNAL] = "INTERNAL",
                [GRPC_UNAVAILABLE] = "UNAVAILABLE",
                [GRPC_DATA_LOSS] = "DATA_LOSS",
                [GRPC_UNAUTHENTICATED] = "UNAUTHENTICATED",
        };
        return code >= 0 && (size_t) code < ARRAY_SIZE(names) ? names[code] : NULL;
}
