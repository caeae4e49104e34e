/* plugin/grpc.c: framing, grpc-timeout, grpc-message encoding, the errno
 * table and the method table. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "service.h"

/* ---- grpc_frame_unpack / grpc_frame_header ----------------------------- */

static void test_grpc_frame_unpack_good(void **state) {
        const uint8_t buf[] = { 0, 0, 0, 0, 3, 'a', 'b', 'c' };
        const uint8_t *msg = NULL;
        size_t len = 99;

        assert_int_equal(grpc_frame_unpack(buf, sizeof(buf), 1024, &msg, &len), 0);
        assert_ptr_equal(msg, buf + 5);
        assert_int_equal(len, 3);
}

static void test_grpc_frame_unpack_empty_message(void **state) {
        const uint8_t buf[] = { 0, 0, 0, 0, 0 };
        const uint8_t *msg = NULL;
        size_t len = 99;

        /* A StatusRequest{} is a zero-length message. */
        assert_int_equal(grpc_frame_unpack(buf, sizeof(buf), 1024, &msg, &len), 0);
        assert_int_equal(len, 0);
}

static void test_grpc_frame_unpack_truncated(void **state) {
        const uint8_t buf[] = { 0, 0, 0, 0, 4, 'a', 'b', 'c' };
        const uint8_t *msg;
        size_t len;

        assert_int_equal(grpc_frame_unpack(buf, sizeof(buf), 1024, &msg, &len), -EBADMSG);
        /* header itself cut short */
        assert_int_equal(grpc_frame_unpack(buf, 4, 1024, &msg, &len), -EBADMSG);
        assert_int_equal(grpc_frame_unpack(buf, 0, 1024, &msg, &len), -EBADMSG);
        assert_int_equal(grpc_frame_unpack(NULL, 0, 1024, &msg, &len), -EBADMSG);
}

static void test_grpc_frame_unpack_trailing_bytes(void **state) {
        const uint8_t buf[] = { 0, 0, 0, 0, 2, 'a', 'b', 'c' };
        /* two messages on a unary call */
        const uint8_t two[] = { 0, 0, 0, 0, 1, 'a', 0, 0, 0, 0, 1, 'b' };
        const uint8_t *msg;
        size_t len;

        assert_int_equal(grpc_frame_unpack(buf, sizeof(buf), 1024, &msg, &len), -EBADMSG);
        assert_int_equal(grpc_frame_unpack(two, sizeof(two), 1024, &msg, &len), -EBADMSG);
}

static void test_grpc_frame_unpack_compressed(void **state) {
        const uint8_t buf[] = { 1, 0, 0, 0, 1, 'a' };
        const uint8_t bad_flag[] = { 2, 0, 0, 0, 1, 'a' };
        const uint8_t *msg;
        size_t len;

        assert_int_equal(grpc_frame_unpack(buf, sizeof(buf), 1024, &msg, &len), -EPROTO);
        assert_int_equal(grpc_frame_unpack(bad_flag, sizeof(bad_flag), 1024, &msg, &len), -EBADMSG);
}

static void test_grpc_frame_unpack_oversize(void **state) {
        uint8_t buf[5 + 17] = { 0, 0, 0, 0, 17 };
        const uint8_t huge[] = { 0, 0xff, 0xff, 0xff, 0xff, 'a' };
        const uint8_t *msg;
        size_t len;

        assert_int_equal(grpc_frame_unpack(buf, sizeof(buf), 16, &msg, &len), -EMSGSIZE);
        assert_int_equal(grpc_frame_unpack(buf, sizeof(buf), 17, &msg, &len), 0);
        /* a 4 GiB length must be refused on the length alone */
        assert_int_equal(grpc_frame_unpack(huge, sizeof(huge), 1024, &msg, &len), -EMSGSIZE);
}

static void test_grpc_frame_header_round_trip(void **state) {
        uint8_t buf[GRPC_FRAME_HEADER_SIZE + 300];
        const uint8_t *msg;
        size_t len;

        grpc_frame_header(buf, 300);
        assert_memory_equal(buf, ((const uint8_t[]) { 0, 0, 0, 1, 44 }), 5);
        assert_int_equal(grpc_frame_unpack(buf, sizeof(buf), 1024, &msg, &len), 0);
        assert_int_equal(len, 300);

        grpc_frame_header(buf, 0x01020304);
        assert_memory_equal(buf, ((const uint8_t[]) { 0, 1, 2, 3, 4 }), 5);
}

/* ---- grpc_timeout_parse ------------------------------------------------- */

static void test_grpc_timeout_parse_good(void **state) {
        static const struct {
                const char *s;
                uint64_t usec;
        } t[] = {
                { "1S", 1000000 },
                { "3S", 3000000 },
                { "100m", 100000 },
                { "250000u", 250000 },
                { "2M", 120000000 },
                { "1H", UINT64_C(3600000000) },
                { "0S", 0 },
                { "1000n", 1 },
                { "1n", 1 },              /* rounded up, never to zero */
                { "1001n", 2 },
                { "99999999H", UINT64_C(99999999) * UINT64_C(3600000000) },
                { "00000001m", 1000 },
        };

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
                uint64_t v = 42;

                assert_int_equal(grpc_timeout_parse(t[i].s, &v), 0);
                assert_int_equal(v, t[i].usec);
        }
}

static void test_grpc_timeout_parse_bad(void **state) {
        static const char *const t[] = {
                "",
                "S",
                "1",                      /* no unit */
                "123456789S",             /* 9 digits */
                "1s",                     /* units are case-sensitive */
                "1h",
                "1x",
                "1SS",
                "1S ",
                " 1S",
                "-1S",
                "+1S",
                "1.5S",
                "0x10S",
        };
        uint64_t v = 42;

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++)
                assert_int_equal(grpc_timeout_parse(t[i], &v), -EINVAL);
        assert_int_equal(v, 42);
        assert_int_equal(grpc_timeout_parse(NULL, &v), -EINVAL);
}

/* ---- grpc_percent_encode ------------------------------------------------ */

static void test_grpc_percent_encode_ascii(void **state) {
        char out[64];

        assert_int_equal(grpc_percent_encode("unknown key id", out, sizeof(out)), 14);
        assert_string_equal(out, "unknown key id");
        assert_int_equal(grpc_percent_encode("", out, sizeof(out)), 0);
        assert_string_equal(out, "");
        /* every printable byte except '%' passes through */
        assert_int_equal(grpc_percent_encode(" ~", out, sizeof(out)), 2);
        assert_string_equal(out, " ~");
}

static void test_grpc_percent_encode_percent(void **state) {
        char out[64];

        assert_int_equal(grpc_percent_encode("100% sure", out, sizeof(out)), 11);
        assert_string_equal(out, "100%25 sure");
}

static void test_grpc_percent_encode_control(void **state) {
        char out[64];

        assert_int_equal(grpc_percent_encode("a\nb\x7f", out, sizeof(out)), 8);
        assert_string_equal(out, "a%0Ab%7F");
}

static void test_grpc_percent_encode_non_ascii(void **state) {
        char out[64];

        /* U+00E9 and U+20AC in UTF-8: each byte escaped, hex upper-case */
        assert_int_equal(grpc_percent_encode("caf\xc3\xa9 \xe2\x82\xac", out, sizeof(out)), 19);
        assert_string_equal(out, "caf%C3%A9 %E2%82%AC");
}

static void test_grpc_percent_encode_truncated(void **state) {
        char out[8];

        /* "abcdefg" fits exactly (7 + NUL), one more does not */
        assert_int_equal(grpc_percent_encode("abcdefg", out, sizeof(out)), 7);
        assert_int_equal(grpc_percent_encode("abcdefgh", out, sizeof(out)), -ENOBUFS);
        assert_string_equal(out, "abcdefg");

        /* never half an escape */
        assert_int_equal(grpc_percent_encode("abcde%", out, sizeof(out)), -ENOBUFS);
        assert_string_equal(out, "abcde");

        /* never half a UTF-8 character: "ab" + U+00E9 needs 2 + 6 bytes */
        assert_int_equal(grpc_percent_encode("ab\xc3\xa9", out, sizeof(out)), -ENOBUFS);
        assert_string_equal(out, "ab");

        /* a stray continuation byte is not a character to protect */
        assert_int_equal(grpc_percent_encode("abcd\x80\x80", out, sizeof(out)), -ENOBUFS);
        assert_string_equal(out, "abcd%80");

        assert_int_equal(grpc_percent_encode("a", out, 0), -ENOBUFS);
        assert_int_equal(grpc_percent_encode("a", out, 1), -ENOBUFS);
        assert_string_equal(out, "");
}

/* ---- grpc_status_from_errno: the codes ----------------------------------------------- */

static void test_grpc_status_from_errno_service_codes(void **state) {
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, -EINVAL).code, GRPC_INVALID_ARGUMENT);
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, -EBADMSG).code, GRPC_INVALID_ARGUMENT);
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, -ENOENT).code, GRPC_NOT_FOUND);
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, -ENOKEY).code, GRPC_UNAVAILABLE);
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, -EPERM).code, GRPC_FAILED_PRECONDITION);
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, -ENOMEM).code, GRPC_INTERNAL);
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, -EIO).code, GRPC_INTERNAL);
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, -ENOLCK).code, GRPC_INTERNAL);
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, EINVAL).code, GRPC_INTERNAL);  /* positive: not an errno return */
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, INT32_MIN).code, GRPC_INTERNAL);
}

static void test_grpc_status_from_errno_frame_codes(void **state) {
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_CALL, -EMSGSIZE).code, GRPC_RESOURCE_EXHAUSTED);
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_CALL, -EPROTO).code, GRPC_UNIMPLEMENTED);
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_CALL, -EBADMSG).code, GRPC_INTERNAL);
}

static void test_grpc_status_from_errno_call(void **state) {
        static const struct {
                int r;
                unsigned http_status;
                enum grpc_code code;
        } t[] = {
                { -E2BIG, 431, GRPC_RESOURCE_EXHAUSTED },
                { -EOPNOTSUPP, 405, GRPC_INTERNAL },
                { -EMEDIUMTYPE, 415, GRPC_INTERNAL },
                { -EINVAL, 400, GRPC_INTERNAL },
                { -ENOENT, 200, GRPC_UNIMPLEMENTED },
                { -ETIMEDOUT, 200, GRPC_DEADLINE_EXCEEDED },
                { -EMSGSIZE, 200, GRPC_RESOURCE_EXHAUSTED },
                { -EPROTO, 200, GRPC_UNIMPLEMENTED },
                { -EBADMSG, 200, GRPC_INTERNAL },
                { -ENOMEM, 200, GRPC_INTERNAL },
        };

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
                struct grpc_status st = grpc_status_from_errno(GRPC_ORIGIN_CALL, t[i].r);

                assert_int_equal(st.http_status, t[i].http_status);
                assert_int_equal(st.code, t[i].code);
                assert_non_null(st.message);
                assert_string_not_equal(st.message, "");
        }
}

static void test_grpc_status_from_errno_messages(void **state) {
        /* the service's rows answer with HTTP 200 and their own text; an
         * errno the table does not know says what strerror says */
        struct grpc_status st = grpc_status_from_errno(GRPC_ORIGIN_SERVICE, -ENOKEY);

        assert_int_equal(st.http_status, 200);
        assert_string_equal(st.message, "no keys unsealed");
        /* the same errno means something else from the call around it */
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, -ENOENT).code, GRPC_NOT_FOUND);
        assert_int_equal(grpc_status_from_errno(GRPC_ORIGIN_CALL, -ENOENT).code, GRPC_UNIMPLEMENTED);
        assert_string_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, -EIO).message,
                            "Input/output error");
        assert_string_equal(grpc_status_from_errno(GRPC_ORIGIN_CALL, -99999).message,
                            "internal error");
        assert_string_equal(grpc_status_from_errno(GRPC_ORIGIN_SERVICE, EINVAL).message,
                            "internal error");
}

/* ---- method table ------------------------------------------------------- */

static void test_kms_method_from_path_table(void **state) {
        assert_int_equal(kms_method_from_path("/v2.KeyManagementService/Status"), KMS_METHOD_STATUS);
        assert_int_equal(kms_method_from_path("/v2.KeyManagementService/Encrypt"), KMS_METHOD_ENCRYPT);
        assert_int_equal(kms_method_from_path("/v2.KeyManagementService/Decrypt"), KMS_METHOD_DECRYPT);
        assert_true(kms_service_has_method("/v2.KeyManagementService/Decrypt"));

        assert_int_equal(kms_method_from_path("/v2.KeyManagementService/decrypt"), -ENOENT);
        assert_int_equal(kms_method_from_path("/v2.KeyManagementService/Decrypt/"), -ENOENT);
        assert_int_equal(kms_method_from_path("/v2.KeyManagementService/"), -ENOENT);
        assert_int_equal(kms_method_from_path("/v1beta1.KeyManagementService/Decrypt"), -ENOENT);
        assert_int_equal(kms_method_from_path("v2.KeyManagementService/Decrypt"), -ENOENT);
        assert_int_equal(kms_method_from_path(""), -ENOENT);
        assert_int_equal(kms_method_from_path(NULL), -ENOENT);
        assert_false(kms_service_has_method("/grpc.health.v1.Health/Check"));

        assert_string_equal(kms_method_name(KMS_METHOD_DECRYPT), "Decrypt");
        assert_null(kms_method_name(_KMS_METHOD_MAX));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_grpc_frame_unpack_good),
                cmocka_unit_test(test_grpc_frame_unpack_empty_message),
                cmocka_unit_test(test_grpc_frame_unpack_truncated),
                cmocka_unit_test(test_grpc_frame_unpack_trailing_bytes),
                cmocka_unit_test(test_grpc_frame_unpack_compressed),
                cmocka_unit_test(test_grpc_frame_unpack_oversize),
                cmocka_unit_test(test_grpc_frame_header_round_trip),
                cmocka_unit_test(test_grpc_timeout_parse_good),
                cmocka_unit_test(test_grpc_timeout_parse_bad),
                cmocka_unit_test(test_grpc_percent_encode_ascii),
                cmocka_unit_test(test_grpc_percent_encode_percent),
                cmocka_unit_test(test_grpc_percent_encode_control),
                cmocka_unit_test(test_grpc_percent_encode_non_ascii),
                cmocka_unit_test(test_grpc_percent_encode_truncated),
                cmocka_unit_test(test_grpc_status_from_errno_service_codes),
                cmocka_unit_test(test_grpc_status_from_errno_frame_codes),
                cmocka_unit_test(test_grpc_status_from_errno_call),
                cmocka_unit_test(test_grpc_status_from_errno_messages),
                cmocka_unit_test(test_kms_method_from_path_table),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
