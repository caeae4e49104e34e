/* agent/config.c: every key, the defaults, each bad value with its FILE:LINE,
 * whole-config checks and durations. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"

static char tmpdir[] = "/tmp/test-config.XXXXXX";
static char conf_path[256];

static int setup(void **state) {
        if (!mkdtemp(tmpdir))
                return -1;
        snprintf(conf_path, sizeof(conf_path), "%s/tpmkmsd.conf", tmpdir);
        return 0;
}

static int teardown(void **state) {
        unlink(conf_path);
        rmdir(tmpdir);
        return 0;
}

static void write_conf(const char *text, size_t len) {
        FILE *f = fopen(conf_path, "we");

        assert_non_null(f);
        assert_int_equal(fwrite(text, 1, len, f), len);
        assert_int_equal(fclose(f), 0);
}

static int load(const char *text, struct config *c, char *err, size_t err_size) {
        write_conf(text, strlen(text));
        return config_load(conf_path, c, err, err_size);
}

/* Expect -EINVAL and an error "conf_path:line: ...needle...". */
static void expect_error(const char *text, unsigned line, const char *needle) {
        struct config c;
        char err[512], prefix[300];
        int r;

        r = load(text, &c, err, sizeof(err));
        if (r != -EINVAL || !strstr(err, needle))
                print_error("config:\n%s\ngot r=%d err=\"%s\", want \"%s\"\n", text, r, err, needle);
        assert_int_equal(r, -EINVAL);
        if (line > 0)
                snprintf(prefix, sizeof(prefix), "%s:%u: ", conf_path, line);
        else
                snprintf(prefix, sizeof(prefix), "%s: ", conf_path);
        if (strncmp(err, prefix, strlen(prefix)) != 0)
                print_error("err \"%s\" does not start with \"%s\"\n", err, prefix);
        assert_int_equal(strncmp(err, prefix, strlen(prefix)), 0);
        assert_non_null(strstr(err, needle));
}

static void test_config_defaults_values(void **state) {
        struct config c;
        struct tpm_pcr_selection sel;

        config_defaults(&c);
        assert_string_equal(c.kms_socket, "/run/tpmkms/kms.sock");
        assert_int_equal(c.n_allowed_uids, 1);
        assert_int_equal(c.allowed_uids[0], 0);
        assert_string_equal(c.tpm_tcti, "device:/dev/tpmrm0");
        assert_int_equal(tpm_pcr_selection_parse("sha256:7", &sel), 0);
        assert_int_equal(c.pcrs.hash_alg, sel.hash_alg);
        assert_int_equal(c.pcrs.mask, 1u << 7);
        assert_false(c.insecure_no_pcr_policy);
        assert_int_equal(c.counter_index, TPM_COUNTER_INDEX_DEFAULT);
        assert_string_equal(c.owner_auth_file, "");
        assert_string_equal(c.state_dir, "/var/lib/tpmkms");
        assert_int_equal(c.central_type, CENTRAL_NONE);
        assert_int_equal(c.n_endpoints, 0);
        assert_string_equal(c.ca_file, "");
        assert_string_equal(c.cert_file, "");
        assert_string_equal(c.key_file, "");
        assert_string_equal(c.key_group, "");
        assert_int_equal(c.sync_interval_usec, 60 * 1000000ull);
        assert_int_equal(c.central_timeout_usec, 5 * 1000000ull);
        assert_int_equal(c.purge_after_usec, 7 * 24 * 3600 * 1000000ull);
        assert_int_equal(c.max_missing_percent, 50);
        assert_int_equal(c.material_check_usec, 24 * 3600 * 1000000ull);
        assert_string_equal(c.control_socket, "/run/tpmkms/control.sock");
        assert_string_equal(c.metrics_listen, "");   /* no metrics served yet: off */
}

static void test_config_load_empty_gives_defaults(void **state) {
        struct config c, d;
        char err[256] = "x";

        memset(&c, 0xaa, sizeof(c));
        assert_int_equal(load("", &c, err, sizeof(err)), 0);
        assert_string_equal(err, "");
        config_defaults(&d);
        assert_memory_equal(&c, &d, sizeof(c));

        assert_int_equal(load("; only a comment\n# another\n\n[kms]\n", &c, err, sizeof(err)), 0);
        assert_memory_equal(&c, &d, sizeof(c));
}

static void test_config_load_uid_names(void **state) {
        struct config c;
        char err[256];

        assert_int_equal(load("[kms]\nallowed_uids = 998,1000 , root\n", &c, err, sizeof(err)), 0);
        assert_int_equal(c.n_allowed_uids, 3);
        assert_int_equal(c.allowed_uids[0], 998);
        assert_int_equal(c.allowed_uids[1], 1000);
        assert_int_equal(c.allowed_uids[2], 0);
        /* root is uid 0: the same uid twice */
        expect_error("[kms]\n\n; comment\nallowed_uids = 0, root\n", 4, "uid 0 listed twice");
}

static void test_config_load_every_key_values(void **state) {
        static const char text[] =
                "[kms]\n"
                "socket = /run/test/kms.sock      ; inline comment\n"
                "allowed_uids = 0, 998,1000\n"
                "[tpm]\n"
                "tcti = swtpm:host=127.0.0.1,port=2321\n"
                "pcrs = sha256:0,2,7\n"
                "insecure_no_pcr_policy = true\n"
                "counter_index = 0x01800123\n"
                "owner_auth_file = /etc/tpmkms/owner-auth\n"
                "[state]\n"
                "dir = /var/lib/test\n"
                "[central]\n"
                "type = kmip\n"
                "endpoints = kms1.example:5697, kms2.example, 192.0.2.1:1, [2001:db8::1]:443, [::1]\n"
                "ca_file = /etc/tpmkms/ca.pem\n"
                "cert_file = /etc/tpmkms/node.pem\n"
                "key_file = /etc/tpmkms/node.key\n"
                "key_group = cluster-a-kek\n"
                "sync_interval = 2min\n"
                "timeout = 250ms\n"
                "purge_after = 3s\n"
                "max_missing_share = 25%\n"
                "[control]\n"
                "socket = /run/test/control.sock\n"
                "[metrics]\n"
                "listen = [::1]:9999\n";
        struct config c;
        struct tpm_pcr_selection sel;
        char err[256];

        assert_int_equal(load(text, &c, err, sizeof(err)), 0);
        assert_string_equal(c.kms_socket, "/run/test/kms.sock");
        assert_int_equal(c.n_allowed_uids, 3);
        assert_int_equal(c.allowed_uids[0], 0);
        assert_int_equal(c.allowed_uids[1], 998);
        assert_int_equal(c.allowed_uids[2], 1000);
        assert_string_equal(c.tpm_tcti, "swtpm:host=127.0.0.1,port=2321");
        assert_int_equal(tpm_pcr_selection_parse("sha256:0,2,7", &sel), 0);
        assert_int_equal(c.pcrs.hash_alg, sel.hash_alg);
        assert_int_equal(c.pcrs.mask, (1u << 0) | (1u << 2) | (1u << 7));
        assert_true(c.insecure_no_pcr_policy);
        assert_int_equal(c.counter_index, 0x01800123);
        assert_string_equal(c.owner_auth_file, "/etc/tpmkms/owner-auth");
        assert_string_equal(c.state_dir, "/var/lib/test");
        assert_int_equal(c.central_type, CENTRAL_KMIP);
        assert_int_equal(c.n_endpoints, 5);
        assert_string_equal(c.endpoints[0].host, "kms1.example");
        assert_int_equal(c.endpoints[0].port, 5697);
        assert_string_equal(c.endpoints[1].host, "kms2.example");
        assert_int_equal(c.endpoints[1].port, 5696);
        assert_string_equal(c.endpoints[2].host, "192.0.2.1");
        assert_int_equal(c.endpoints[2].port, 1);
        assert_string_equal(c.endpoints[3].host, "2001:db8::1");
        assert_int_equal(c.endpoints[3].port, 443);
        assert_string_equal(c.endpoints[4].host, "::1");
        assert_int_equal(c.endpoints[4].port, 5696);
        assert_string_equal(c.ca_file, "/etc/tpmkms/ca.pem");
        assert_string_equal(c.cert_file, "/etc/tpmkms/node.pem");
        assert_string_equal(c.key_file, "/etc/tpmkms/node.key");
        assert_string_equal(c.key_group, "cluster-a-kek");
        assert_int_equal(c.sync_interval_usec, 120 * 1000000ull);
        assert_int_equal(c.central_timeout_usec, 250 * 1000ull);
        assert_int_equal(c.purge_after_usec, 3 * 1000000ull);
        assert_int_equal(c.max_missing_percent, 25);
        assert_string_equal(c.control_socket, "/run/test/control.sock");
        assert_string_equal(c.metrics_listen, "[::1]:9999");
}

static void test_config_load_booleans(void **state) {
        static const struct {
                const char *v;
                bool want;
        } t[] = {
                { "yes", true }, { "no", false }, { "true", true }, { "false", false },
                { "1", true }, { "0", false }, { "YES", true }, { "False", false },
        };
        char text[128], err[256];
        struct config c;

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
                snprintf(text, sizeof(text), "[tpm]\ninsecure_no_pcr_policy = %s\n", t[i].v);
                assert_int_equal(load(text, &c, err, sizeof(err)), 0);
                assert_int_equal(c.insecure_no_pcr_policy, t[i].want);
        }
        expect_error("[tpm]\ninsecure_no_pcr_policy = maybe\n", 2, "must be yes, no");
        expect_error("[tpm]\ninsecure_no_pcr_policy =\n", 2, "must be yes, no");
        expect_error("[tpm]\ninsecure_no_pcr_policy = 2\n", 2, "must be yes, no");
}

static void test_config_load_metrics_listen(void **state) {
        struct config c;
        char err[256];

        assert_int_equal(load("[metrics]\nlisten =\n", &c, err, sizeof(err)), 0);
        assert_string_equal(c.metrics_listen, "");
        assert_int_equal(load("[metrics]\nlisten = /run/tpmkms/metrics.sock\n", &c, err, sizeof(err)), 0);
        assert_string_equal(c.metrics_listen, "/run/tpmkms/metrics.sock");
        assert_int_equal(load("[metrics]\nlisten = localhost:9740\n", &c, err, sizeof(err)), 0);
        assert_string_equal(c.metrics_listen, "localhost:9740");
        expect_error("[metrics]\nlisten = 127.0.0.1\n", 2, "missing port");
        expect_error("[metrics]\nlisten = 127.0.0.1:0\n", 2, "bad port");
        expect_error("[metrics]\nlisten = ::1:9740\n", 2, "brackets");
        expect_error("[metrics]\nlisten = /run/tpmkms/kms.sock\n", 0, "another socket");
}

static void test_config_load_purge_rules(void **state) {
        struct config c;
        struct policy_options opt;
        char err[256];

        assert_int_equal(load("[central]\npurge_after = never\n", &c, err, sizeof(err)), 0);
        assert_int_equal(c.purge_after_usec, UINT64_MAX);
        config_policy_options(&c, &opt);
        assert_int_equal(opt.purge_after_usec, POLICY_PURGE_NEVER);
        assert_int_equal(load("[central]\npurge_after = 30d\nmax_missing_share = 100\n", &c, err, sizeof(err)), 0);
        assert_int_equal(c.purge_after_usec, 30 * 24 * 3600 * 1000000ull);
        assert_int_equal(c.max_missing_percent, 100);
        config_policy_options(&c, &opt);
        assert_int_equal(opt.max_missing_percent, 100);
        assert_int_equal(load("[central]\nmax_missing_share = 0%\n", &c, err, sizeof(err)), 0);
        assert_int_equal(c.max_missing_percent, 0);
}

/* Key ids are "kmip:<group>/<uid>.<16 hex>" in KEY_ID_MAX (agent/policy.h):
 * a group that would not leave room for a 127-byte uid is refused here. */
static void test_config_load_key_group_bound(void **state) {
        char text[300], group[POLICY_GROUP_ENCODED_MAX + 2], err[256];
        struct config c;

        memset(group, 'g', sizeof(group));
        group[POLICY_GROUP_ENCODED_MAX] = 0;
        snprintf(text, sizeof(text), "[central]\nkey_group = %s\n", group);
        assert_int_equal(load(text, &c, err, sizeof(err)), 0);
        assert_string_equal(c.key_group, group);
        group[POLICY_GROUP_ENCODED_MAX] = 'g';
        group[POLICY_GROUP_ENCODED_MAX + 1] = 0;
        snprintf(text, sizeof(text), "[central]\nkey_group = %s\n", group);
        expect_error(text, 2, "[central] key_group: too long for a key id: at most 105 characters");
        /* an encoded character counts three times: 35 '+' are 105, 36 too many */
        memset(group, '+', 35);
        group[35] = 0;
        snprintf(text, sizeof(text), "[central]\nkey_group = %s\n", group);
        assert_int_equal(load(text, &c, err, sizeof(err)), 0);
        memset(group, '+', 36);
        group[36] = 0;
        snprintf(text, sizeof(text), "[central]\nkey_group = %s\n", group);
        expect_error(text, 2, "at most 105 characters");
}

static void test_config_load_bad_values(void **state) {
        static const struct {
                const char *text;
                unsigned line;
                const char *needle;
        } t[] = {
                { "[kms]\nsocket = run/kms.sock\n", 2, "[kms] socket: must be an absolute path" },
                { "[kms]\nsocket =\n", 2, "[kms] socket: must be an absolute path" },
                { "[kms]\n\n\nsocket = /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                  "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n",
                  4, "too long for a unix socket" },
                { "[kms]\nallowed_uids =\n", 2, "at least one uid" },
                { "[kms]\nallowed_uids = -1\n", 2, "not a uid or user name" },
                { "[kms]\nallowed_uids = 4294967295\n", 2, "not a uid or user name" },
                { "[kms]\nallowed_uids = 99999999999999999999999\n", 2, "not a uid or user name" },
                { "[kms]\nallowed_uids = 0,,1\n", 2, "empty list element" },
                { "[kms]\nallowed_uids = 0,\n", 2, "empty list element" },
                { "[kms]\nallowed_uids = 1,1\n", 2, "listed twice" },
                { "[kms]\nallowed_uids = no-such-user-tpmkms\n", 2, "no such user" },
                { "[kms]\nallowed_uids = 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,"
                  "21,22,23,24,25,26,27,28,29,30,31,32\n", 2, "more than 32 uids" },
                { "[tpm]\ntcti =\n", 2, "[tpm] tcti: must not be empty" },
                { "[tpm]\ntcti = device:\x01\n", 2, "control characters" },
                { "[tpm]\npcrs = sha256:99\n", 2, "[tpm] pcrs: not a PCR selection" },
                { "[tpm]\npcrs = md5:1\n", 2, "[tpm] pcrs: not a PCR selection" },
                { "[tpm]\npcrs =\n", 2, "[tpm] pcrs: not a PCR selection" },
                { "[tpm]\ncounter_index = 0x01000000\n", 2, "[tpm] counter_index: must be a hexadecimal TPM NV index" },
                { "[tpm]\ncounter_index = 0x01c00000\n", 2, "from 0x01800000 to 0x01bfffff" },
                { "[tpm]\ncounter_index = 25296896\n", 2, "must be a hexadecimal" },
                { "[tpm]\ncounter_index = 0x0180000g\n", 2, "must be a hexadecimal" },
                { "[tpm]\nowner_auth_file = relative\n", 2, "[tpm] owner_auth_file: must be an absolute path" },
                { "[state]\ndir = relative/dir\n", 2, "[state] dir: must be an absolute path" },
                { "[state]\ndir =\n", 2, "[state] dir: must not be empty" },
                { "[central]\ntype = vault\n", 2, "[central] type: must be kmip or none" },
                { "[central]\nendpoints = host:0\n", 2, "bad port" },
                { "[central]\nendpoints = host:65536\n", 2, "bad port" },
                { "[central]\nendpoints = host:\n", 2, "bad port" },
                { "[central]\nendpoints = host:-1\n", 2, "bad port" },
                { "[central]\nendpoints = 2001:db8::1\n", 2, "brackets" },
                { "[central]\nendpoints = [2001:db8::1\n", 2, "missing ']'" },
                { "[central]\nendpoints = [not-v6]:1\n", 2, "bad IPv6 address" },
                { "[central]\nendpoints = [::1]x\n", 2, "junk after ']'" },
                { "[central]\nendpoints = host name:1\n", 2, "bad host name" },
                { "[central]\nendpoints = a,b,c,d,e,f,g,h,i\n", 2, "more than 8 endpoints" },
                { "[central]\npurge_after = 0\n", 2, "[central] purge_after: must be between 1s and 3650d" },
                { "[central]\npurge_after = 3651d\n", 2, "must be between 1s and 3650d" },
                { "[central]\npurge_after = off\n", 2, "not a duration" },
                { "[central]\npurge_after = Never\n", 2, "not a duration" },
                { "[central]\nmax_missing_share = 101%\n", 2, "[central] max_missing_share: must be a percentage" },
                { "[central]\nmax_missing_share = 50%%\n", 2, "must be a percentage" },
                { "[central]\nmax_missing_share = -1\n", 2, "must be a percentage" },
                { "[central]\nmax_missing_share = %\n", 2, "must be a percentage" },
                { "[central]\nmax_missing_share =\n", 2, "must be a percentage" },
                { "[central]\nca_file = ca.pem\n", 2, "[central] ca_file: must be an absolute path" },
                { "[central]\ncert_file = node.pem\n", 2, "[central] cert_file: must be an absolute path" },
                { "[central]\nkey_file = node.key\n", 2, "[central] key_file: must be an absolute path" },
                { "[central]\nsync_interval = 0\n", 2, "must be between 1s and 24h" },
                { "[central]\nsync_interval = 500ms\n", 2, "must be between 1s and 24h" },
                { "[central]\nsync_interval = 25h\n", 2, "must be between 1s and 24h" },
                { "[central]\nsync_interval = soon\n", 2, "not a duration" },
                { "[central]\nmaterial_check = 0\n", 2, "must be between 1s and 30d" },
                { "[central]\nmaterial_check = 31d\n", 2, "must be between 1s and 30d" },
                { "[central]\ntimeout = 0s\n", 2, "must be between 10ms and 10min" },
                { "[central]\ntimeout = -5s\n", 2, "not a duration" },
                { "[central]\ntimeout = 5 s\n", 2, "not a duration" },
                { "[control]\nsocket = control.sock\n", 2, "[control] socket: must be an absolute path" },
                { "[metrics]\nlisten = nowhere\n", 2, "missing port" },
        };

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++)
                expect_error(t[i].text, t[i].line, t[i].needle);
}

static void test_config_load_socket_length(void **state) {
        char path[CONFIG_SOCKET_PATH_MAX + 1], text[256], err[512];
        struct config c;

        /* sun_path holds 107 characters and the NUL */
        memset(path, 'a', sizeof(path));
        path[0] = '/';
        path[CONFIG_SOCKET_PATH_MAX - 1] = '\0';
        snprintf(text, sizeof(text), "[control]\nsocket = %s\n", path);
        assert_int_equal(load(text, &c, err, sizeof(err)), 0);
        assert_string_equal(c.control_socket, path);

        path[CONFIG_SOCKET_PATH_MAX - 1] = 'a';
        path[CONFIG_SOCKET_PATH_MAX] = '\0';
        snprintf(text, sizeof(text), "[control]\nsocket = %s\n", path);
        expect_error(text, 2, "too long for a unix socket (at most 107 characters)");
}

static void test_config_load_unknown(void **state) {
        expect_error("[kms]\nsocket = /run/a.sock\n[bogus]\nkey = 1\n", 3, "unknown section [bogus]");
        /* a section without keys is never shown to inih's handler */
        expect_error("[kms]\n[nokeys]\n", 2, "unknown section [nokeys]");
        expect_error("[kms]\nsockte = /run/a.sock\n", 2, "[kms] unknown key \"sockte\"");
        expect_error("[tpm]\nsocket = /run/a.sock\n", 2, "[tpm] unknown key \"socket\"");
        expect_error("socket = /run/a.sock\n", 1, "outside of any section");
        expect_error("[kms] trailing\n", 1, "junk after [kms]");
        expect_error("[KMS]\n", 1, "unknown section [KMS]");
        expect_error("\xef\xbb\xbf[bogus]\n", 1, "unknown section [bogus]");
}

static void test_config_load_duplicates(void **state) {
        expect_error("[kms]\nsocket = /run/a.sock\nsocket = /run/b.sock\n", 3, "[kms] socket: duplicate key");
        expect_error("[kms]\nsocket = /run/a.sock\n[tpm]\n[kms]\nsocket = /run/b.sock\n", 5,
                     "duplicate key");
        /* an indented line is not a continuation of the one before */
        expect_error("[central]\nendpoints = a:1\n   endpoints = b:2\n", 3, "duplicate key");
        expect_error("[central]\nendpoints = a:1\n   b.example\n", 3, "syntax error");
}

static void test_config_load_syntax(void **state) {
        char big[400];

        expect_error("[kms]\n\njust words\n", 3, "syntax error");
        expect_error("[kms\n", 1, "syntax error");
        /* the first error wins, even when inih reports it and we stop later */
        expect_error("[kms]\nnonsense\n[bogus]\n", 2, "syntax error");
        expect_error("[bogus]\nnonsense\n", 1, "unknown section");

        memset(big, 'a', sizeof(big));
        memcpy(big, "[tpm]\ntcti = ", 13);
        big[sizeof(big) - 2] = '\n';
        big[sizeof(big) - 1] = '\0';
        expect_error(big, 2, "line too long");

        {
                static const char nul[] = "[kms]\nsocket = /run/a\0b.sock\n";
                struct config c;
                char err[256], prefix[300];

                write_conf(nul, sizeof(nul) - 1);
                assert_int_equal(config_load(conf_path, &c, err, sizeof(err)), -EINVAL);
                snprintf(prefix, sizeof(prefix), "%s:2: NUL byte in line", conf_path);
                assert_string_equal(err, prefix);
        }
}

static void test_config_load_comments_crlf(void **state) {
        struct config c;
        char err[256];

        assert_int_equal(load("\xef\xbb\xbf; BOM first\r\n"
                              "[kms]\r\n"
                              "# hash comment\r\n"
                              "  ; indented comment\r\n"
                              "socket = /run/x.sock ; comment\r\n"
                              "allowed_uids = 5 # not a comment start\r\n", &c, err, sizeof(err)),
                         -EINVAL);
        assert_non_null(strstr(err, ":6: [kms] allowed_uids"));

        assert_int_equal(load("\xef\xbb\xbf; BOM first\r\n"
                              "[kms]\r\n"
                              "# hash comment\r\n"
                              "  ; indented comment\r\n"
                              "socket = /run/x.sock ; comment\r\n"
                              "allowed_uids = 5\r\n", &c, err, sizeof(err)), 0);
        assert_string_equal(c.kms_socket, "/run/x.sock");
        assert_int_equal(c.allowed_uids[0], 5);
}

static void test_config_load_whole_config_checks(void **state) {
        struct config c;
        char err[256];

        expect_error("[tpm]\npcrs = none\n", 0, "insecure_no_pcr_policy = yes");
        assert_int_equal(load("[tpm]\npcrs = none\ninsecure_no_pcr_policy = yes\n", &c, err, sizeof(err)), 0);
        assert_int_equal(c.pcrs.mask, 0);

        expect_error("[central]\ntype = kmip\n", 0, "needs endpoints");
        expect_error("[central]\ntype = kmip\nendpoints = a\n", 0, "needs ca_file");
        expect_error("[central]\ntype = kmip\nendpoints = a\nca_file = /ca\n", 0, "needs cert_file");
        expect_error("[central]\ntype = kmip\nendpoints = a\nca_file = /ca\ncert_file = /c\n", 0,
                     "needs key_file");
        expect_error("[central]\ntype = kmip\nendpoints = a\nca_file = /ca\ncert_file = /c\n"
                     "key_file = /k\n", 0, "needs key_group");
        assert_int_equal(load("[central]\ntype = kmip\nendpoints = a\nca_file = /ca\ncert_file = /c\n"
                              "key_file = /k\nkey_group = g\n", &c, err, sizeof(err)), 0);
        assert_int_equal(c.central_type, CENTRAL_KMIP);
        assert_int_equal(load("[central]\ntype = none\n", &c, err, sizeof(err)), 0);
        assert_int_equal(c.central_type, CENTRAL_NONE);

        expect_error("[control]\nsocket = /run/tpmkms/kms.sock\n", 0, "same path");
}

static void test_config_load_failure_leaves_config(void **state) {
        struct config c, before;
        char err[256];

        memset(&c, 0x5a, sizeof(c));
        before = c;
        assert_int_equal(load("[kms]\nsocket = /run/new.sock\nallowed_uids = x y\n", &c, err, sizeof(err)),
                         -EINVAL);
        assert_memory_equal(&c, &before, sizeof(c));
}

static void test_config_load_missing(void **state) {
        struct config c;
        char err[256], want[300];
        int r;

        r = config_load("/nonexistent/tpmkmsd.conf", &c, err, sizeof(err));
        assert_int_equal(r, -ENOENT);
        assert_string_equal(err, "/nonexistent/tpmkmsd.conf: cannot open: No such file or directory");

        /* a directory opens but does not read */
        r = config_load(tmpdir, &c, err, sizeof(err));
        assert_int_equal(r, -EISDIR);
        snprintf(want, sizeof(want), "%s: cannot read", tmpdir);
        assert_int_equal(strncmp(err, want, strlen(want)), 0);

        /* no err buffer is fine */
        assert_int_equal(config_load("/nonexistent/x", &c, NULL, 0), -ENOENT);
}

static void test_config_load_unreadable(void **state) {
        struct config c;
        char err[256];

        if (geteuid() == 0)
                /* root reads through a 0000 mode, so the same check is done
                 * with a path through a file, which no uid can traverse */
                assert_int_equal(config_load("/etc/passwd/x", &c, err, sizeof(err)), -ENOTDIR);
        else {
                write_conf("", 0);
                assert_int_equal(chmod(conf_path, 0), 0);
                assert_int_equal(config_load(conf_path, &c, err, sizeof(err)), -EACCES);
        }
}

static void test_parse_duration_valid(void **state) {
        static const struct {
                const char *s;
                uint64_t usec;
        } t[] = {
                { "250ms", 250000 },
                { "5s", 5000000 },
                { "2min", 120000000 },
                { "1h", 3600000000 },
                { "7", 7000000 },
                { "0", 0 },
                { "0ms", 0 },
                { "18446744073709ms", 18446744073709000ull },
                { "18446744073709s", 18446744073709000000ull },
                { "5124095576h", 5124095576ull * 3600000000ull },
                { "7d", 7 * 24 * 3600000000ull },
        };
        uint64_t u;

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
                assert_int_equal(parse_duration(t[i].s, &u), 0);
                assert_int_equal(u, t[i].usec);
        }
}

static void test_parse_duration_invalid(void **state) {
        static const char *const t[] = {
                "", "s", "-1", "-1s", "+1s", " 1s", "1s ", "1 s", "1.5s", "1m", "1sec",
                "1hh", "0x10", "1e3", "5S", "18446744073710s", "99999999999999999999",
                "18446744073709551616ms", "5124095577h",
        };
        uint64_t u = 42;

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
                if (parse_duration(t[i], &u) != -EINVAL)
                        print_error("accepted \"%s\"\n", t[i]);
                assert_int_equal(parse_duration(t[i], &u), -EINVAL);
        }
        assert_int_equal(u, 42);
        assert_int_equal(parse_duration(NULL, &u), -EINVAL);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_config_defaults_values),
                cmocka_unit_test(test_config_load_empty_gives_defaults),
                cmocka_unit_test(test_config_load_uid_names),
                cmocka_unit_test(test_config_load_every_key_values),
                cmocka_unit_test(test_config_load_booleans),
                cmocka_unit_test(test_config_load_metrics_listen),
                cmocka_unit_test(test_config_load_purge_rules),
                cmocka_unit_test(test_config_load_key_group_bound),
                cmocka_unit_test(test_config_load_bad_values),
                cmocka_unit_test(test_config_load_socket_length),
                cmocka_unit_test(test_config_load_unknown),
                cmocka_unit_test(test_config_load_duplicates),
                cmocka_unit_test(test_config_load_syntax),
                cmocka_unit_test(test_config_load_comments_crlf),
                cmocka_unit_test(test_config_load_whole_config_checks),
                cmocka_unit_test(test_config_load_failure_leaves_config),
                cmocka_unit_test(test_config_load_missing),
                cmocka_unit_test(test_config_load_unreadable),
                cmocka_unit_test(test_parse_duration_valid),
                cmocka_unit_test(test_parse_duration_invalid),
        };

        return cmocka_run_group_tests(tests, setup, teardown);
}
