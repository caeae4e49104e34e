/* Tests for tpm/ against a real swtpm (tests/lib/with-swtpm exports
 * TPMKMS_TEST_TCTI). The test also talks ESAPI itself, to extend a PCR, to
 * plant a foreign key at the SRK handle and to count what is left loaded in
 * the TPM. swtpm serves one connection at a time and has no resource
 * manager: the test's own connection is only opened while no struct tpm is. */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_tctildr.h>

#include "macro.h"
#include "tpm.h"

static const char *tcti;

/* ---- helpers ------------------------------------------------------------ */

static char log_buf[8192];

static void log_capture(int prio, const char *msg) {
        size_t n = strlen(log_buf);

        if (getenv("TPMKMS_DEBUG"))
                fprintf(stderr, "tpm: %s\n", msg);
        if (n + strlen(msg) + 2 < sizeof(log_buf)) {
                strcat(log_buf, msg);
                strcat(log_buf, "\n");
        }
}

static void log_reset(void) {
        log_buf[0] = '\0';
}

static void random_secret(uint8_t s[AES256_KEY_SIZE]) {
        assert_int_equal(getrandom(s, AES256_KEY_SIZE, 0), AES256_KEY_SIZE);
}

static struct tpm *open_tpm(const char *t) {
        struct tpm *tpm = NULL;

        assert_int_equal(tpm_open(t, NULL, &tpm), 0);
        assert_non_null(tpm);
        return tpm;
}

static struct tpm_pcr_selection sel_of(const char *s) {
        struct tpm_pcr_selection sel;

        assert_int_equal(tpm_pcr_selection_parse(s, &sel), 0);
        return sel;
}

/* The test's own ESAPI connection; only while no struct tpm is open on t. */
static ESYS_CONTEXT *esys_open(const char *t, TSS2_TCTI_CONTEXT **ret_tcti) {
        ESYS_CONTEXT *esys = NULL;

        assert_int_equal(Tss2_TctiLdr_Initialize(t, ret_tcti), TSS2_RC_SUCCESS);
        assert_int_equal(Esys_Initialize(&esys, *ret_tcti, NULL), TSS2_RC_SUCCESS);
        return esys;
}

static void esys_close(ESYS_CONTEXT *esys, TSS2_TCTI_CONTEXT *tc) {
        Esys_Finalize(&esys);
        Tss2_TctiLdr_Finalize(&tc);
}

static uint32_t esys_count_handles(ESYS_CONTEXT *esys, TPM2_HANDLE first) {
        TPMS_CAPABILITY_DATA *cap = NULL;
        TPMI_YES_NO more;
        uint32_t n = 0;

        assert_int_equal(Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                            TPM2_CAP_HANDLES, first, TPM2_MAX_CAP_HANDLES, &more, &cap),
                         TSS2_RC_SUCCESS);
        /* The list starts at first and runs on into later ranges: count ours. */
        for (uint32_t i = 0; i < cap->data.handles.count; i++)
                if ((cap->data.handles.handle[i] >> 24) == (first >> 24))
                        n++;
        Esys_Free(cap);
        return n;
}

static bool esys_srk_present(ESYS_CONTEXT *esys) {
        TPMS_CAPABILITY_DATA *cap = NULL;
        TPMI_YES_NO more;
        bool present;

        assert_int_equal(Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                            TPM2_CAP_HANDLES, TPM_SRK_HANDLE, 1, &more, &cap),
                         TSS2_RC_SUCCESS);
        present = cap->data.handles.count > 0 && cap->data.handles.handle[0] == TPM_SRK_HANDLE;
        Esys_Free(cap);
        return present;
}

static void esys_srk_evict(ESYS_CONTEXT *esys) {
        ESYS_TR srk = ESYS_TR_NONE, out = ESYS_TR_NONE;

        if (!esys_srk_present(esys))
                return;
        assert_int_equal(Esys_TR_FromTPMPublic(esys, TPM_SRK_HANDLE, ESYS_TR_NONE, ESYS_TR_NONE,
                                               ESYS_TR_NONE, &srk),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_EvictControl(esys, ESYS_TR_RH_OWNER, srk, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                           ESYS_TR_NONE, TPM_SRK_HANDLE, &out),
                         TSS2_RC_SUCCESS);
        assert_false(esys_srk_present(esys));
}

/* Nothing transient left behind: no loaded objects, no loaded or saved
 * sessions (Part 2, TPM_HT_TRANSIENT, TPM_HT_LOADED_SESSION,
 * TPM_HT_SAVED_SESSION). */
static void assert_tpm_clean(const char *t) {
        TSS2_TCTI_CONTEXT *tc = NULL;
        ESYS_CONTEXT *esys = esys_open(t, &tc);

        /* Literal handles: TPM2_TRANSIENT_FIRST shifts 0x80 into an int's
         * sign bit, which UBSan rightly rejects. */
        assert_int_equal(esys_count_handles(esys, UINT32_C(0x80000000)), 0);
        assert_int_equal(esys_count_handles(esys, UINT32_C(0x02000000)), 0);
        assert_int_equal(esys_count_handles(esys, UINT32_C(0x03000000)), 0);
        esys_close(esys, tc);
}

/* What booting other software does to a bound PCR. */
static void pcr_extend(const char *t, unsigned pcr) {
        TSS2_TCTI_CONTEXT *tc = NULL;
        ESYS_CONTEXT *esys = esys_open(t, &tc);
        TPML_DIGEST_VALUES d = {
                .count = 1,
                .digests[0].hashAlg = TPM2_ALG_SHA256,
        };

        memset(d.digests[0].digest.sha256, 0xab, TPM2_SHA256_DIGEST_SIZE);
        assert_int_equal(Esys_PCR_Extend(esys, ESYS_TR_PCR0 + pcr, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                         ESYS_TR_NONE, &d),
                         TSS2_RC_SUCCESS);
        esys_close(esys, tc);
}

static bool is_zero(const void *p, size_t n) {
        const uint8_t *b = p;

        for (size_t i = 0; i < n; i++)
                if (b[i])
                        return false;
        return true;
}

static void assert_secret_not_in_blobs(const struct tpm_sealed *s, const uint8_t secret[AES256_KEY_SIZE]) {
        /* Any 8-byte window of the secret would be a leak too. */
        for (size_t i = 0; i + 8 <= AES256_KEY_SIZE; i++) {
                assert_null(memmem(s->public_blob, s->public_size, secret + i, 8));
                assert_null(memmem(s->private_blob, s->private_size, secret + i, 8));
        }
}

static void seal_unseal_ok(struct tpm *tpm, const char *selection) {
        struct tpm_pcr_selection sel = sel_of(selection);
        uint8_t secret[AES256_KEY_SIZE], out[AES256_KEY_SIZE];
        struct tpm_sealed sealed;
        struct tpm_pcr_values cur;

        random_secret(secret);
        assert_int_equal(tpm_seal(tpm, &sel, secret, &sealed), 0);
        assert_int_equal(tpm_unseal(tpm, &sealed, out, &cur), 0);
        assert_memory_equal(out, secret, AES256_KEY_SIZE);
}

/* ---- a second swtpm: another machine ------------------------------------ */

static pid_t other_pid = -1;
static char other_dir[64];
static char other_tcti[96];

static int free_port_pair(void) {
        for (int tries = 0; tries < 200; tries++) {
                struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
                socklen_t len = sizeof(a);
                int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), fd2, port, ok;

                assert_true(fd >= 0);
                assert_int_equal(bind(fd, (struct sockaddr *) &a, sizeof(a)), 0);
                assert_int_equal(getsockname(fd, (struct sockaddr *) &a, &len), 0);
                port = ntohs(a.sin_port);
                if (port >= 65535) {
                        close(fd);
                        continue;
                }
                fd2 = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
                a.sin_port = htons(port + 1);
                ok = bind(fd2, (struct sockaddr *) &a, sizeof(a)) == 0;
                close(fd2);
                close(fd);
                if (ok)
                        return port;
        }
        fail_msg("no free pair of loopback ports");
        return -1;
}

static bool port_listens(int port) {
        struct sockaddr_in a = {
                .sin_family = AF_INET,
                .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                .sin_port = htons(port),
        };
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        bool ok = connect(fd, (struct sockaddr *) &a, sizeof(a)) == 0;

        close(fd);
        return ok;
}

static void other_swtpm_start(void) {
        char state[128], server[96], ctrl[96];
        int port;

        strcpy(other_dir, "/tmp/tpmkms-test-swtpm-XXXXXX");
        assert_non_null(mkdtemp(other_dir));
        port = free_port_pair();
        snprintf(state, sizeof(state), "dir=%s", other_dir);
        snprintf(server, sizeof(server), "type=tcp,port=%d,bindaddr=127.0.0.1", port);
        snprintf(ctrl, sizeof(ctrl), "type=tcp,port=%d,bindaddr=127.0.0.1", port + 1);
        snprintf(other_tcti, sizeof(other_tcti), "swtpm:host=127.0.0.1,port=%d", port);

        other_pid = fork();
        assert_true(other_pid >= 0);
        if (other_pid == 0) {
                int null = open("/dev/null", O_RDWR);

                /* Dies with us, even when a ctest timeout kills the test. */
                (void) prctl(PR_SET_PDEATHSIG, SIGTERM);
                if (null >= 0) {
                        dup2(null, STDIN_FILENO);
                        dup2(null, STDOUT_FILENO);
                }
                execlp("swtpm", "swtpm", "socket", "--tpm2", "--tpmstate", state, "--server", server,
                       "--ctrl", ctrl, "--flags", "not-need-init,startup-clear", (char *) NULL);
                _exit(127);
        }

        for (int i = 0; i < 200; i++) {
                int status;

                if (port_listens(port))
                        return;
                if (waitpid(other_pid, &status, WNOHANG) == other_pid) {
                        other_pid = -1;
                        fail_msg("second swtpm exited (status 0x%x): is swtpm installed?", status);
                }
                nanosleep(&(struct timespec) { .tv_nsec = 50 * 1000000L }, NULL);
        }
        fail_msg("second swtpm did not listen on port %d", port);
}

static void other_swtpm_stop(void) {
        DIR *d;

        if (other_pid > 0) {
                /* SIGTERM, never SIGKILL: swtpm saves its state on the way out. */
                kill(other_pid, SIGTERM);
                waitpid(other_pid, NULL, 0);
                other_pid = -1;
        }
        if (!other_dir[0])
                return;
        d = opendir(other_dir);
        if (d) {
                struct dirent *e;
                while ((e = readdir(d)))
                        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
                                (void) unlinkat(dirfd(d), e->d_name, 0);
                closedir(d);
        }
        (void) rmdir(other_dir);
        other_dir[0] = '\0';
}

/* ---- selection strings -------------------------------------------------- */

static void test_tpm_pcr_selection_parse_good(void **state) {
        static const struct {
                const char *s;
                uint16_t alg;
                uint32_t mask;
        } good[] = {
                { "sha256:7",        TPM2_ALG_SHA256, 1u << 7 },
                { "sha256:0,2,7",    TPM2_ALG_SHA256, 1u << 0 | 1u << 2 | 1u << 7 },
                { "sha1:7",          TPM2_ALG_SHA1,   1u << 7 },
                { "sha384:23",       TPM2_ALG_SHA384, 1u << 23 },
                { "sha512:0",        TPM2_ALG_SHA512, 1u << 0 },
                { "sha256:14,7,0",   TPM2_ALG_SHA256, 1u << 0 | 1u << 7 | 1u << 14 },
                { "none",            0,               0 },
        };

        for (size_t i = 0; i < ARRAY_SIZE(good); i++) {
                struct tpm_pcr_selection sel = { .hash_alg = 0xffff, .mask = 0xffffffff };

                assert_int_equal(tpm_pcr_selection_parse(good[i].s, &sel), 0);
                assert_int_equal(sel.hash_alg, good[i].alg);
                assert_int_equal(sel.mask, good[i].mask);
                assert_int_equal(tpm_pcr_selection_is_empty(&sel), good[i].mask == 0);
        }
}

static void test_tpm_pcr_selection_parse_bad(void **state) {
        static const char *const bad[] = {
                "", "sha256", "sha256:", "md5:7", "sha3:7", "SHA256:7", "sha256:24", "sha256:99",
                "sha256:100", "sha256:7,7", "sha256:0,2,0", "sha256:7,", "sha256:,7", "sha256:1,,2",
                "sha256: 7", "sha256:7 ", " sha256:7", "sha256:7x", "sha256:-1", "sha256:+7",
                "sha256:07", "sha256:0x7", "none ", "NONE", "none:7", ":7", "sha256:7:8",
                "sha256;7",
        };

        for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
                struct tpm_pcr_selection sel = { .hash_alg = 0x1234, .mask = 0x42 };

                if (tpm_pcr_selection_parse(bad[i], &sel) != -EINVAL)
                        fail_msg("accepted \"%s\"", bad[i]);
                /* Untouched on failure. */
                assert_int_equal(sel.hash_alg, 0x1234);
                assert_int_equal(sel.mask, 0x42);
        }
        assert_int_equal(tpm_pcr_selection_parse(NULL, &(struct tpm_pcr_selection) {}), -EINVAL);
}

static void test_tpm_pcr_selection_format_good(void **state) {
        static const struct {
                const char *in, *out;
        } cases[] = {
                { "sha256:7", "sha256:7" },
                { "sha256:7,2,0", "sha256:0,2,7" },
                { "sha1:23", "sha1:23" },
                { "sha512:0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23",
                  "sha512:0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23" },
                { "none", "none" },
        };
        char buf[128];

        for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
                struct tpm_pcr_selection sel = sel_of(cases[i].in);

                assert_int_equal(tpm_pcr_selection_format(&sel, buf, sizeof(buf)), 0);
                assert_string_equal(buf, cases[i].out);
                /* Exactly fits. */
                assert_int_equal(tpm_pcr_selection_format(&sel, buf, strlen(cases[i].out) + 1), 0);
                assert_string_equal(buf, cases[i].out);
        }
}

static void test_tpm_pcr_selection_format_bad(void **state) {
        struct tpm_pcr_selection sel = sel_of("sha256:0,2,7");
        char buf[64];

        assert_int_equal(tpm_pcr_selection_format(&sel, buf, strlen("sha256:0,2,7")), -ENOBUFS);
        assert_string_equal(buf, "");
        assert_int_equal(tpm_pcr_selection_format(&sel, buf, 0), -ENOBUFS);
        sel = sel_of("none");
        assert_int_equal(tpm_pcr_selection_format(&sel, buf, 4), -ENOBUFS);
        assert_int_equal(tpm_pcr_selection_format(&sel, buf, 5), 0);

        sel = (struct tpm_pcr_selection) { .hash_alg = 0x0099, .mask = 1u << 7 };
        assert_int_equal(tpm_pcr_selection_format(&sel, buf, sizeof(buf)), -EINVAL);
        sel = (struct tpm_pcr_selection) { .hash_alg = TPM2_ALG_SHA256, .mask = 1u << 24 };
        assert_int_equal(tpm_pcr_selection_format(&sel, buf, sizeof(buf)), -EINVAL);
}

static void test_tpm_pcr_values_format_good(void **state) {
        struct tpm_pcr_values v = {
                .sel = sel_of("sha1:0,7"),
                .count = 2,
                .digest_size = 20,
        };
        char buf[256];

        memset(v.digest[0], 0x00, 20);
        memset(v.digest[1], 0xab, 20);
        assert_int_equal(tpm_pcr_values_format(&v, buf, sizeof(buf)), 0);
        assert_string_equal(buf, "sha1:0=0000000000000000000000000000000000000000,"
                                 "7=abababababababababababababababababababab");
        assert_int_equal(tpm_pcr_values_format(&v, buf, strlen(buf) + 1), 0);
        assert_int_equal(tpm_pcr_values_format(&v, buf, strlen(buf)), -ENOBUFS);
        assert_string_equal(buf, "");

        v = (struct tpm_pcr_values) { .sel = sel_of("none") };
        assert_int_equal(tpm_pcr_values_format(&v, buf, sizeof(buf)), 0);
        assert_string_equal(buf, "none");

        /* count that does not match the selection */
        v = (struct tpm_pcr_values) { .sel = sel_of("sha256:7"), .count = 2, .digest_size = 32 };
        assert_int_equal(tpm_pcr_values_format(&v, buf, sizeof(buf)), -EINVAL);
}

/* ---- open --------------------------------------------------------------- */

static void test_tpm_open_srk_created_then_reused(void **state) {
        TSS2_TCTI_CONTEXT *tc = NULL;
        ESYS_CONTEXT *esys;
        struct tpm *tpm;

        /* Start from a TPM without an SRK, whatever ran before. */
        esys = esys_open(tcti, &tc);
        esys_srk_evict(esys);
        esys_close(esys, tc);

        log_reset();
        tpm = open_tpm(tcti);
        tpm_close(tpm);
        assert_non_null(strstr(log_buf, "creating SRK"));

        esys = esys_open(tcti, &tc);
        assert_true(esys_srk_present(esys));
        esys_close(esys, tc);

        /* Second open finds it persistent and does not create another. */
        log_reset();
        tpm = open_tpm(tcti);
        seal_unseal_ok(tpm, "sha256:7");
        tpm_close(tpm);
        assert_null(strstr(log_buf, "creating SRK"));

        assert_tpm_clean(tcti);
}

/* A key at 0x81000001 that is not a storage parent is refused, not used. */
static void test_tpm_open_foreign_srk(void **state) {
        static const TPM2B_SENSITIVE_CREATE sensitive = {};
        static const TPM2B_DATA outside = {};
        static const TPML_PCR_SELECTION creation_pcr = {};
        TPM2B_PUBLIC signing = {
                .publicArea = {
                        .type = TPM2_ALG_ECC,
                        .nameAlg = TPM2_ALG_SHA256,
                        .objectAttributes = TPMA_OBJECT_SIGN_ENCRYPT | TPMA_OBJECT_FIXEDTPM |
                                TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_SENSITIVEDATAORIGIN |
                                TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA,
                        .parameters.eccDetail = {
                                .symmetric.algorithm = TPM2_ALG_NULL,
                                .scheme.scheme = TPM2_ALG_NULL,
                                .curveID = TPM2_ECC_NIST_P256,
                                .kdf.scheme = TPM2_ALG_NULL,
                        },
                },
        };
        TSS2_TCTI_CONTEXT *tc = NULL;
        ESYS_CONTEXT *esys;
        ESYS_TR primary = ESYS_TR_NONE, persistent = ESYS_TR_NONE;
        struct tpm *tpm = (struct tpm *) 0x1;

        esys = esys_open(tcti, &tc);
        esys_srk_evict(esys);
        assert_int_equal(Esys_CreatePrimary(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                            ESYS_TR_NONE, &sensitive, &signing, &outside, &creation_pcr,
                                            &primary, NULL, NULL, NULL, NULL),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_EvictControl(esys, ESYS_TR_RH_OWNER, primary, ESYS_TR_PASSWORD,
                                           ESYS_TR_NONE, ESYS_TR_NONE, TPM_SRK_HANDLE, &persistent),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_FlushContext(esys, primary), TSS2_RC_SUCCESS);
        esys_close(esys, tc);

        log_reset();
        assert_int_equal(tpm_open(tcti, NULL, &tpm), -EIO);
        assert_ptr_equal(tpm, (struct tpm *) 0x1);
        assert_non_null(strstr(log_buf, "restricted decrypt"));

        /* Put a proper one back for the tests that follow. */
        esys = esys_open(tcti, &tc);
        esys_srk_evict(esys);
        esys_close(esys, tc);
        tpm_close(open_tpm(tcti));
        assert_tpm_clean(tcti);
}

static void test_tpm_open_dead_port(void **state) {
        char dead[96];
        struct tpm *tpm = NULL;

        /* A port nobody listens on. */
        snprintf(dead, sizeof(dead), "swtpm:host=127.0.0.1,port=%d", free_port_pair());
        assert_int_equal(tpm_open(dead, NULL, &tpm), -ENODEV);
        assert_null(tpm);

        tpm_close(NULL);
}

/* ---- seal / unseal ------------------------------------------------------ */

static void test_tpm_seal_unseal_roundtrip(void **state) {
        struct tpm_pcr_selection sel = sel_of("sha256:7");
        uint8_t secret[AES256_KEY_SIZE], out[AES256_KEY_SIZE];
        struct tpm_pcr_values now, cur;
        struct tpm_sealed sealed;
        struct tpm *tpm = open_tpm(tcti);

        random_secret(secret);
        assert_int_equal(tpm_seal(tpm, &sel, secret, &sealed), 0);
        assert_int_equal(sealed.pcrs.count, 1);
        assert_int_equal(sealed.pcrs.digest_size, 32);
        assert_int_equal(sealed.pcrs.sel.hash_alg, TPM2_ALG_SHA256);
        assert_int_equal(sealed.pcrs.sel.mask, 1u << 7);
        assert_int_equal(sealed.policy_digest_size, 32);
        assert_true(sealed.public_size > 0 && sealed.public_size <= TPM_BLOB_MAX);
        assert_true(sealed.private_size > 0 && sealed.private_size <= TPM_BLOB_MAX);
        /* The policy digest is in the public area (authPolicy). */
        assert_non_null(memmem(sealed.public_blob, sealed.public_size, sealed.policy_digest, 32));
        assert_secret_not_in_blobs(&sealed, secret);

        assert_int_equal(tpm_pcr_read(tpm, &sel, &now), 0);
        assert_memory_equal(now.digest[0], sealed.pcrs.digest[0], 32);

        memset(out, 0x5a, sizeof(out));
        assert_int_equal(tpm_unseal(tpm, &sealed, out, &cur), 0);
        assert_memory_equal(out, secret, AES256_KEY_SIZE);
        /* Again, from the same blobs. */
        assert_int_equal(tpm_unseal(tpm, &sealed, out, NULL), 0);
        assert_memory_equal(out, secret, AES256_KEY_SIZE);

        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

/* More than 8 PCRs need several PCR_Read rounds; the policy must still match. */
static void test_tpm_seal_unseal_many_pcrs(void **state) {
        struct tpm *tpm = open_tpm(tcti);
        struct tpm_pcr_values v;
        struct tpm_pcr_selection sel = sel_of("sha256:0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,23");
        char buf[2048];

        assert_int_equal(tpm_pcr_read(tpm, &sel, &v), 0);
        assert_int_equal(v.count, 18);
        assert_int_equal(tpm_pcr_values_format(&v, buf, sizeof(buf)), 0);
        assert_true(strncmp(buf, "sha256:0=", 9) == 0);
        assert_non_null(strstr(buf, ",23="));
        /* Index 17 is PCR 23, which resets to zeros and nothing extends here. */
        assert_true(is_zero(v.digest[17], 32));

        seal_unseal_ok(tpm, "sha256:0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,23");
        seal_unseal_ok(tpm, "sha256:0,2,7");
        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

static void test_tpm_seal_unseal_sha1_bank(void **state) {
        struct tpm *tpm = open_tpm(tcti);
        struct tpm_pcr_selection sel = sel_of("sha1:7");
        struct tpm_pcr_values v;

        assert_int_equal(tpm_pcr_read(tpm, &sel, &v), 0);
        assert_int_equal(v.digest_size, 20);
        seal_unseal_ok(tpm, "sha1:7");
        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

static void test_tpm_seal_unseal_none(void **state) {
        struct tpm_pcr_selection sel = sel_of("none");
        uint8_t secret[AES256_KEY_SIZE], out[AES256_KEY_SIZE];
        struct tpm_sealed sealed;
        struct tpm *tpm = open_tpm(tcti);

        random_secret(secret);
        assert_int_equal(tpm_seal(tpm, &sel, secret, &sealed), 0);
        assert_int_equal(sealed.pcrs.count, 0);
        assert_true(tpm_pcr_selection_is_empty(&sealed.pcrs.sel));
        assert_int_equal(sealed.policy_digest_size, 32);
        assert_false(is_zero(sealed.policy_digest, 32));
        assert_secret_not_in_blobs(&sealed, secret);
        assert_int_equal(tpm_unseal(tpm, &sealed, out, NULL), 0);
        assert_memory_equal(out, secret, AES256_KEY_SIZE);
        tpm_close(tpm);

        /* PCRs do not matter to it. */
        pcr_extend(tcti, 7);
        tpm = open_tpm(tcti);
        assert_int_equal(tpm_unseal(tpm, &sealed, out, NULL), 0);
        assert_memory_equal(out, secret, AES256_KEY_SIZE);
        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

static void test_tpm_unseal_pcr_changed(void **state) {
        struct tpm_pcr_selection sel7 = sel_of("sha256:7"), sel0 = sel_of("sha256:0");
        uint8_t secret[AES256_KEY_SIZE], out[AES256_KEY_SIZE];
        struct tpm_sealed sealed7, sealed0;
        struct tpm_pcr_values cur;
        char buf[256];
        struct tpm *tpm = open_tpm(tcti);

        random_secret(secret);
        assert_int_equal(tpm_seal(tpm, &sel7, secret, &sealed7), 0);
        assert_int_equal(tpm_seal(tpm, &sel0, secret, &sealed0), 0);
        tpm_close(tpm);

        pcr_extend(tcti, 7);

        tpm = open_tpm(tcti);
        memset(out, 0x5a, sizeof(out));
        log_reset();
        assert_int_equal(tpm_unseal(tpm, &sealed7, out, &cur), -EPERM);
        assert_true(is_zero(out, sizeof(out)));
        assert_int_equal(cur.count, 1);
        assert_int_equal(cur.digest_size, 32);
        assert_int_equal(cur.sel.mask, 1u << 7);
        assert_memory_not_equal(cur.digest[0], sealed7.pcrs.digest[0], 32);
        assert_int_equal(tpm_pcr_values_format(&cur, buf, sizeof(buf)), 0);
        assert_true(strncmp(buf, "sha256:7=", 9) == 0);
        assert_non_null(strstr(log_buf, "policy digest differs"));

        /* Mismatch again (no lockout: the object is noDA), and NULL current. */
        for (int i = 0; i < 5; i++)
                assert_int_equal(tpm_unseal(tpm, &sealed7, out, NULL), -EPERM);

        /* Bound to PCR 0 only: still fine. */
        assert_int_equal(tpm_unseal(tpm, &sealed0, out, NULL), 0);
        assert_memory_equal(out, secret, AES256_KEY_SIZE);

        /* Reseal to the new value works (what tpmkmsctl reseal does). */
        assert_int_equal(tpm_seal(tpm, &sel7, secret, &sealed7), 0);
        assert_int_equal(tpm_unseal(tpm, &sealed7, out, NULL), 0);
        assert_memory_equal(out, secret, AES256_KEY_SIZE);
        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

static void test_tpm_unseal_altered_blobs(void **state) {
        struct tpm_pcr_selection sel = sel_of("sha256:7");
        uint8_t secret[AES256_KEY_SIZE], out[AES256_KEY_SIZE];
        struct tpm_sealed sealed, bad;
        struct tpm *tpm = open_tpm(tcti);

        random_secret(secret);
        assert_int_equal(tpm_seal(tpm, &sel, secret, &sealed), 0);

        /* Private: every region (integrity HMAC, IV, encrypted sensitive). */
        for (size_t off = 2; off < sealed.private_size; off += 7) {
                bad = sealed;
                bad.private_blob[off] ^= 0x01;
                memset(out, 0x5a, sizeof(out));
                assert_int_equal(tpm_unseal(tpm, &bad, out, NULL), -EXDEV);
                assert_true(is_zero(out, sizeof(out)));
        }

        /* Public: the last byte (in unique), then the authPolicy. */
        bad = sealed;
        bad.public_blob[sealed.public_size - 1] ^= 0x01;
        assert_int_equal(tpm_unseal(tpm, &bad, out, NULL), -EXDEV);
        bad = sealed;
        ((uint8_t *) memmem(bad.public_blob, bad.public_size, sealed.policy_digest, 32))[5] ^= 0x80;
        assert_int_equal(tpm_unseal(tpm, &bad, out, NULL), -EXDEV);

        /* Truncated blobs do not unmarshal. */
        bad = sealed;
        bad.public_size--;
        assert_int_equal(tpm_unseal(tpm, &bad, out, NULL), -EXDEV);
        bad = sealed;
        bad.private_size--;
        assert_int_equal(tpm_unseal(tpm, &bad, out, NULL), -EXDEV);

        /* Sizes out of range, a bad selection. */
        bad = sealed;
        bad.private_size = 0;
        assert_int_equal(tpm_unseal(tpm, &bad, out, NULL), -EINVAL);
        bad = sealed;
        bad.public_size = TPM_BLOB_MAX + 1;
        assert_int_equal(tpm_unseal(tpm, &bad, out, NULL), -EINVAL);
        bad = sealed;
        bad.pcrs.sel.mask = 1u << 24;
        assert_int_equal(tpm_unseal(tpm, &bad, out, NULL), -EINVAL);
        assert_int_equal(tpm_seal(tpm, &bad.pcrs.sel, secret, &bad), -EINVAL);

        /* The PCR selection or values stored beside the blobs altered: they
         * no longer hash to the object's authPolicy. */
        bad = sealed;
        bad.pcrs.sel = sel_of("sha256:6");
        assert_int_equal(tpm_unseal(tpm, &bad, out, NULL), -EXDEV);
        bad = sealed;
        bad.pcrs.digest[0][0] ^= 0x01;
        assert_int_equal(tpm_unseal(tpm, &bad, out, NULL), -EXDEV);
        bad = sealed;
        bad.pcrs.count = 2;
        assert_int_equal(tpm_unseal(tpm, &bad, out, NULL), -EXDEV);
        bad = sealed;
        bad.policy_digest[0] ^= 0x01;
        assert_int_equal(tpm_unseal(tpm, &bad, out, NULL), -EXDEV);

        /* Nothing leaked on the failure paths: the originals still work. */
        assert_int_equal(tpm_unseal(tpm, &sealed, out, NULL), 0);
        assert_memory_equal(out, secret, AES256_KEY_SIZE);
        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

static void test_tpm_unseal_other_tpm(void **state) {
        struct tpm_pcr_selection sel = sel_of("sha256:7");
        uint8_t secret[AES256_KEY_SIZE], out[AES256_KEY_SIZE];
        struct tpm_sealed here, there;
        struct tpm *a, *b;

        other_swtpm_start();
        a = open_tpm(tcti);
        b = open_tpm(other_tcti);

        random_secret(secret);
        assert_int_equal(tpm_seal(a, &sel, secret, &here), 0);
        assert_int_equal(tpm_seal(b, &sel, secret, &there), 0);

        /* Same PCR values (both fresh), different storage seeds. */
        memset(out, 0x5a, sizeof(out));
        assert_int_equal(tpm_unseal(a, &there, out, NULL), -EXDEV);
        assert_true(is_zero(out, sizeof(out)));
        assert_int_equal(tpm_unseal(b, &here, out, NULL), -EXDEV);

        assert_int_equal(tpm_unseal(a, &here, out, NULL), 0);
        assert_memory_equal(out, secret, AES256_KEY_SIZE);
        assert_int_equal(tpm_unseal(b, &there, out, NULL), 0);
        assert_memory_equal(out, secret, AES256_KEY_SIZE);

        tpm_close(b);
        tpm_close(a);
        assert_tpm_clean(other_tcti);
        assert_tpm_clean(tcti);
        other_swtpm_stop();
}

/* Parameter encryption, seen from the bus: record every command and
 * response with the pcap TCTI and look for the secret. The policy digest
 * (sent in Load's inPublic) shows the recording works. */
static char pcap_path[64];

static void test_tpm_seal_unseal_secret_not_on_wire(void **state) {
        struct tpm_pcr_selection sel = sel_of("sha256:7");
        uint8_t secret[AES256_KEY_SIZE], out[AES256_KEY_SIZE];
        char pcap_tcti[160];
        static uint8_t wire[1 << 20];
        struct tpm_sealed sealed;
        struct tpm *tpm;
        ssize_t n;
        int fd;

        strcpy(pcap_path, "/tmp/tpmkms-test-pcap-XXXXXX");
        fd = mkstemp(pcap_path);
        assert_true(fd >= 0);
        assert_int_equal(setenv("TCTI_PCAP_FILE", pcap_path, 1), 0);
        snprintf(pcap_tcti, sizeof(pcap_tcti), "pcap:%s", tcti);

        tpm = open_tpm(pcap_tcti);
        random_secret(secret);
        assert_int_equal(tpm_seal(tpm, &sel, secret, &sealed), 0);
        assert_int_equal(tpm_unseal(tpm, &sealed, out, NULL), 0);
        assert_memory_equal(out, secret, AES256_KEY_SIZE);
        tpm_close(tpm);
        unsetenv("TCTI_PCAP_FILE");

        n = read(fd, wire, sizeof(wire));
        close(fd);
        unlink(pcap_path);
        pcap_path[0] = '\0';
        assert_true(n > 0 && (size_t) n < sizeof(wire));
        assert_non_null(memmem(wire, (size_t) n, sealed.policy_digest, 32));
        for (size_t i = 0; i + 8 <= AES256_KEY_SIZE; i++)
                assert_null(memmem(wire, (size_t) n, secret + i, 8));
        assert_tpm_clean(tcti);
}

/* swtpm has 3 object slots and no resource manager: a leaked handle or
 * session would fail within a few rounds with TPM_RC_OBJECT_MEMORY or
 * TPM_RC_SESSION_MEMORY. */
static void test_tpm_seal_unseal_cycles_no_leaks(void **state) {
        struct tpm *tpm = open_tpm(tcti);

        for (int i = 0; i < 20; i++) {
                seal_unseal_ok(tpm, i % 4 == 3 ? "none" : "sha256:7");
        }
        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

/* ---- the cache key ------------------------------------------------------ */

static void cache_key_create_ok(struct tpm *tpm, const char *selection, struct tpm_sealed *s,
                                uint8_t key[AES256_KEY_SIZE]) {
        struct tpm_pcr_selection sel = sel_of(selection);

        assert_int_equal(tpm_cache_key_create(tpm, &sel, s, key), 0);
        assert_int_equal(s->kind, TPM_SEALED_HMAC_PCR);
        assert_false(is_zero(key, AES256_KEY_SIZE));
}

static void test_tpm_cache_key_create_derive_roundtrip(void **state) {
        uint8_t k1[AES256_KEY_SIZE], k2[AES256_KEY_SIZE], k3[AES256_KEY_SIZE], out[AES256_KEY_SIZE];
        struct tpm_sealed s1, s2, s3;
        struct tpm_pcr_values now, cur;
        struct tpm_pcr_selection sel = sel_of("sha256:7");
        struct tpm *tpm = open_tpm(tcti);

        cache_key_create_ok(tpm, "sha256:7", &s1, k1);
        assert_int_equal(s1.pcrs.count, 1);
        assert_int_equal(s1.pcrs.sel.mask, 1u << 7);
        assert_int_equal(s1.policy_digest_size, 32);
        assert_non_null(memmem(s1.public_blob, s1.public_size, s1.policy_digest, 32));
        assert_int_equal(tpm_pcr_read(tpm, &sel, &now), 0);
        assert_memory_equal(now.digest[0], s1.pcrs.digest[0], 32);
        /* The derived key is nowhere in what goes to disk. */
        assert_secret_not_in_blobs(&s1, k1);

        /* The same key every time, from the same blobs. */
        memset(out, 0x5a, sizeof(out));
        assert_int_equal(tpm_cache_key_derive(tpm, &s1, out, &cur), 0);
        assert_memory_equal(out, k1, AES256_KEY_SIZE);
        assert_int_equal(tpm_cache_key_derive(tpm, &s1, out, NULL), 0);
        assert_memory_equal(out, k1, AES256_KEY_SIZE);

        /* Another object for the same policy: another TPM-generated secret. */
        cache_key_create_ok(tpm, "sha256:7", &s2, k2);
        assert_memory_not_equal(k1, k2, AES256_KEY_SIZE);
        assert_int_equal(tpm_cache_key_derive(tpm, &s2, out, NULL), 0);
        assert_memory_equal(out, k2, AES256_KEY_SIZE);

        /* No PCR policy: PolicyCommandCode(HMAC), PCRs do not matter. */
        cache_key_create_ok(tpm, "none", &s3, k3);
        assert_int_equal(s3.pcrs.count, 0);
        assert_false(is_zero(s3.policy_digest, 32));
        tpm_close(tpm);
        pcr_extend(tcti, 7);
        tpm = open_tpm(tcti);
        assert_int_equal(tpm_cache_key_derive(tpm, &s3, out, NULL), 0);
        assert_memory_equal(out, k3, AES256_KEY_SIZE);
        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

static void test_tpm_cache_key_derive_pcr_changed(void **state) {
        uint8_t k7[AES256_KEY_SIZE], k0[AES256_KEY_SIZE], out[AES256_KEY_SIZE];
        struct tpm_sealed s7, s0;
        struct tpm_pcr_values cur;
        struct tpm *tpm = open_tpm(tcti);

        cache_key_create_ok(tpm, "sha256:7", &s7, k7);
        cache_key_create_ok(tpm, "sha256:0", &s0, k0);
        tpm_close(tpm);

        pcr_extend(tcti, 7);

        tpm = open_tpm(tcti);
        memset(out, 0x5a, sizeof(out));
        log_reset();
        assert_int_equal(tpm_cache_key_derive(tpm, &s7, out, &cur), -EPERM);
        assert_true(is_zero(out, sizeof(out)));
        assert_int_equal(cur.count, 1);
        assert_int_equal(cur.digest_size, 32);
        assert_int_equal(cur.sel.hash_alg, TPM2_ALG_SHA256);
        assert_int_equal(cur.sel.mask, 1u << 7);
        assert_memory_not_equal(cur.digest[0], s7.pcrs.digest[0], 32);
        assert_non_null(strstr(log_buf, "policy digest differs"));
        /* noDA: no lockout however often. */
        for (int i = 0; i < 5; i++)
                assert_int_equal(tpm_cache_key_derive(tpm, &s7, out, NULL), -EPERM);

        assert_int_equal(tpm_cache_key_derive(tpm, &s0, out, NULL), 0);
        assert_memory_equal(out, k0, AES256_KEY_SIZE);
        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

static void test_tpm_cache_key_derive_bad_input(void **state) {
        uint8_t key[AES256_KEY_SIZE], out[AES256_KEY_SIZE], secret[AES256_KEY_SIZE];
        struct tpm_sealed s, bad, data;
        struct tpm_pcr_selection sel = sel_of("sha256:7");
        struct tpm *tpm = open_tpm(tcti);

        cache_key_create_ok(tpm, "sha256:7", &s, key);

        bad = s;
        bad.private_blob[bad.private_size / 2] ^= 0x01;
        memset(out, 0x5a, sizeof(out));
        assert_int_equal(tpm_cache_key_derive(tpm, &bad, out, NULL), -EXDEV);
        assert_true(is_zero(out, sizeof(out)));
        bad = s;
        bad.pcrs.digest[0][3] ^= 0x01;
        assert_int_equal(tpm_cache_key_derive(tpm, &bad, out, NULL), -EXDEV);
        bad = s;
        bad.public_size--;
        assert_int_equal(tpm_cache_key_derive(tpm, &bad, out, NULL), -EXDEV);
        bad = s;
        bad.kind = 0;
        assert_int_equal(tpm_cache_key_derive(tpm, &bad, out, NULL), -EINVAL);
        bad.kind = 3;
        assert_int_equal(tpm_cache_key_derive(tpm, &bad, out, NULL), -EINVAL);
        bad = s;
        bad.private_size = 0;
        assert_int_equal(tpm_cache_key_derive(tpm, &bad, out, NULL), -EINVAL);
        /* An HMAC key passed off as sealed data, and the reverse. */
        bad = s;
        bad.kind = TPM_SEALED_DATA_PCR;
        assert_int_equal(tpm_cache_key_derive(tpm, &bad, out, NULL), -EXDEV);
        random_secret(secret);
        assert_int_equal(tpm_seal(tpm, &sel, secret, &data), 0);
        assert_int_equal(data.kind, TPM_SEALED_DATA_PCR);
        bad = data;
        bad.kind = TPM_SEALED_HMAC_PCR;
        assert_int_equal(tpm_cache_key_derive(tpm, &bad, out, NULL), -EXDEV);
        assert_int_equal(tpm_unseal(tpm, &s, out, NULL), -EINVAL);

        /* Kind 1 is migrated: derive is today's unseal. */
        assert_int_equal(tpm_cache_key_derive(tpm, &data, out, NULL), 0);
        assert_memory_equal(out, secret, AES256_KEY_SIZE);
        /* The originals still work. */
        assert_int_equal(tpm_cache_key_derive(tpm, &s, out, NULL), 0);
        assert_memory_equal(out, key, AES256_KEY_SIZE);
        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

/* The derived key never crosses the bus in clear. */
static void test_tpm_cache_key_not_on_wire(void **state) {
        uint8_t key[AES256_KEY_SIZE], out[AES256_KEY_SIZE];
        char pcap_tcti[160];
        static uint8_t wire[1 << 20];
        struct tpm_sealed s;
        struct tpm *tpm;
        ssize_t n;
        int fd;

        strcpy(pcap_path, "/tmp/tpmkms-test-pcap-XXXXXX");
        fd = mkstemp(pcap_path);
        assert_true(fd >= 0);
        assert_int_equal(setenv("TCTI_PCAP_FILE", pcap_path, 1), 0);
        snprintf(pcap_tcti, sizeof(pcap_tcti), "pcap:%s", tcti);

        tpm = open_tpm(pcap_tcti);
        cache_key_create_ok(tpm, "sha256:7", &s, key);
        assert_int_equal(tpm_cache_key_derive(tpm, &s, out, NULL), 0);
        assert_memory_equal(out, key, AES256_KEY_SIZE);
        tpm_close(tpm);
        unsetenv("TCTI_PCAP_FILE");

        n = read(fd, wire, sizeof(wire));
        close(fd);
        unlink(pcap_path);
        pcap_path[0] = '\0';
        assert_true(n > 0 && (size_t) n < sizeof(wire));
        assert_non_null(memmem(wire, (size_t) n, s.policy_digest, 32));
        for (size_t i = 0; i + 8 <= AES256_KEY_SIZE; i++)
                assert_null(memmem(wire, (size_t) n, key + i, 8));
        assert_tpm_clean(tcti);
}

/* Whether any 8 consecutive bytes of the key whose complement is in inv are
 * left in this process's writable memory. The needle is never in memory as
 * such: each byte is complemented as it is compared. Memory is read through
 * /proc/self/mem (a region that went away is an error there, not a crash);
 * regions larger than 256 MiB (sanitizer shadow) are skipped. */
static bool key_in_memory(const uint8_t inv[AES256_KEY_SIZE]) {
        static char maps[1 << 16];
        static uint8_t chunk[1 << 16];
        FILE *f = fopen("/proc/self/maps", "re");
        size_t n;
        bool found = false;
        int fd;

        assert_non_null(f);
        n = fread(maps, 1, sizeof(maps) - 1, f);
        fclose(f);
        assert_true(n > 0 && n < sizeof(maps) - 1);
        maps[n] = '\0';
        fd = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
        assert_true(fd >= 0);

        for (char *line = maps, *next; !found && line && *line; line = next) {
                unsigned long lo, hi;
                char perms[8];

                next = strchr(line, '\n');
                if (next)
                        *next++ = '\0';
                if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3)
                        continue;
                if (perms[0] != 'r' || perms[1] != 'w' || hi - lo > (256ul << 20))
                        continue;
                /* Chunks overlap by 7 bytes so no window is cut in two. */
                for (unsigned long at = lo; !found && at < hi; at += sizeof(chunk) - 7) {
                        size_t want = hi - at < sizeof(chunk) ? hi - at : sizeof(chunk);
                        ssize_t got = pread(fd, chunk, want, (off_t) at);

                        if (got < 8)
                                break;
                        for (size_t p = 0; !found && p + 8 <= (size_t) got; p++)
                                for (size_t i = 0; i + 8 <= AES256_KEY_SIZE; i++) {
                                        size_t k = 0;

                                        while (k < 8 && (uint8_t) (chunk[p + k] ^ inv[i + k]) == 0xff)
                                                k++;
                                        if (k == 8) {
                                                found = true;
                                                fprintf(stderr, "key bytes %zu.. at 0x%lx in %s\n", i,
                                                        at + p, line);
                                                break;
                                        }
                                }
                        if (want < sizeof(chunk))
                                break;
                }
        }
        /* The last chunk read is not a copy of the key (or found is set). */
        explicit_bzero(chunk, sizeof(chunk));
        close(fd);
        return found;
}

/* After derivation, with the ESYS context still alive, the key is only in
 * the caller's buffer: not in ESYS's command/response buffer, on the stack
 * below, or in freed heap. */
static void test_tpm_cache_key_derive_no_copies_left(void **state) {
        static uint8_t key[AES256_KEY_SIZE], inv[AES256_KEY_SIZE];
        struct tpm_sealed s;
        struct tpm *tpm = open_tpm(tcti);

        cache_key_create_ok(tpm, "sha256:7", &s, key);
        for (size_t i = 0; i < AES256_KEY_SIZE; i++)
                inv[i] = (uint8_t) ~key[i];
        explicit_bzero(key, sizeof(key));
        assert_false(key_in_memory(inv));

        assert_int_equal(tpm_cache_key_derive(tpm, &s, key, NULL), 0);
        for (size_t i = 0; i < AES256_KEY_SIZE; i++)
                assert_int_equal(key[i], (uint8_t) ~inv[i]);
        explicit_bzero(key, sizeof(key));
        assert_false(key_in_memory(inv));
        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

static void test_tpm_cache_key_cycles_no_leaks(void **state) {
        uint8_t key[AES256_KEY_SIZE], out[AES256_KEY_SIZE];
        struct tpm_sealed s;
        struct tpm *tpm = open_tpm(tcti);

        for (int i = 0; i < 12; i++) {
                cache_key_create_ok(tpm, i % 4 == 3 ? "none" : "sha256:7", &s, key);
                assert_int_equal(tpm_cache_key_derive(tpm, &s, out, NULL), 0);
                assert_memory_equal(out, key, AES256_KEY_SIZE);
        }
        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

/* ---- tpm_sealed_check --------------------------------------------------- */

static void assert_check_refuses(const struct tpm_sealed *s, const char *configured, const char *why_part) {
        struct tpm_pcr_selection conf = sel_of(configured);
        char why[256];

        assert_int_equal(tpm_sealed_check(s, &conf, why, sizeof(why)), -EPERM);
        if (!strstr(why, why_part))
                fail_msg("why \"%s\" lacks \"%s\"", why, why_part);
}

static void test_tpm_sealed_check_accepts(void **state) {
        uint8_t key[AES256_KEY_SIZE], secret[AES256_KEY_SIZE];
        struct tpm_sealed s, none, data;
        struct tpm_pcr_selection sel7 = sel_of("sha256:7");
        char why[256];
        struct tpm *tpm = open_tpm(tcti);

        cache_key_create_ok(tpm, "sha256:0,7", &s, key);
        cache_key_create_ok(tpm, "none", &none, key);
        random_secret(secret);
        assert_int_equal(tpm_seal(tpm, &sel7, secret, &data), 0);
        tpm_close(tpm);

        /* Its own selection, and weaker configured ones. */
        static const char *const ok[] = { "sha256:0,7", "sha256:7", "sha256:0", "none" };
        for (size_t i = 0; i < ARRAY_SIZE(ok); i++) {
                struct tpm_pcr_selection conf = sel_of(ok[i]);

                strcpy(why, "x");
                assert_int_equal(tpm_sealed_check(&s, &conf, why, sizeof(why)), 0);
                assert_string_equal(why, "");
        }
        assert_int_equal(tpm_sealed_check(&none, &(struct tpm_pcr_selection) {}, NULL, 0), 0);
        /* A well-formed kind-1 object passes its own rules. */
        assert_int_equal(tpm_sealed_check(&data, &sel7, why, sizeof(why)), 0);
        assert_tpm_clean(tcti);
}

static void test_tpm_sealed_check_refuses_weaker(void **state) {
        uint8_t key[AES256_KEY_SIZE];
        struct tpm_sealed none, s0, sha1;
        struct tpm_pcr_selection conf = sel_of("sha256:7");
        char why[256];
        struct tpm *tpm = open_tpm(tcti);

        cache_key_create_ok(tpm, "none", &none, key);
        cache_key_create_ok(tpm, "sha256:0", &s0, key);
        cache_key_create_ok(tpm, "sha1:7", &sha1, key);
        tpm_close(tpm);

        assert_int_equal(tpm_sealed_check(&none, &conf, why, sizeof(why)), -EPERM);
        assert_string_equal(why, "sealed to none, configured sha256:7");
        assert_int_equal(tpm_sealed_check(&s0, &conf, why, sizeof(why)), -EPERM);
        assert_string_equal(why, "sealed to sha256:0, configured sha256:7");
        assert_check_refuses(&sha1, "sha256:7", "sealed to sha1:7, configured sha256:7");
        assert_check_refuses(&s0, "sha256:0,7", "sealed to sha256:0, configured sha256:0,7");
        /* A short why buffer is still terminated, and NULL is fine. */
        assert_int_equal(tpm_sealed_check(&none, &conf, why, 8), -EPERM);
        assert_int_equal(strlen(why), 7);
        assert_int_equal(tpm_sealed_check(&none, &conf, NULL, 0), -EPERM);
        assert_tpm_clean(tcti);
}

static void test_tpm_sealed_check_refuses_other_objects(void **state) {
        uint8_t key[AES256_KEY_SIZE], secret[AES256_KEY_SIZE];
        struct tpm_sealed s, data, bad;
        struct tpm_pcr_selection sel7 = sel_of("sha256:7");
        char why[256];
        struct tpm *tpm = open_tpm(tcti);

        cache_key_create_ok(tpm, "sha256:7", &s, key);
        random_secret(secret);
        assert_int_equal(tpm_seal(tpm, &sel7, secret, &data), 0);
        tpm_close(tpm);

        /* A sealed data object (data its creator chose) recorded as kind 2. */
        bad = data;
        bad.kind = TPM_SEALED_HMAC_PCR;
        assert_check_refuses(&bad, "sha256:7", "not a keyedHash HMAC-SHA256 key");
        /* An HMAC key recorded as kind 1. */
        bad = s;
        bad.kind = TPM_SEALED_DATA_PCR;
        assert_check_refuses(&bad, "sha256:7", "not a sealed data object");

        /* Recorded PCR values, selection or policy digest altered. */
        bad = s;
        bad.pcrs.digest[0][0] ^= 0x01;
        assert_check_refuses(&bad, "sha256:7", "do not match the object's authPolicy: sealed to sha256:7, "
                                               "configured sha256:7");
        bad = s;
        bad.pcrs.sel = sel_of("sha256:6");
        assert_check_refuses(&bad, "none", "do not match");
        bad = s;
        bad.pcrs.count = 2;
        assert_check_refuses(&bad, "sha256:7", "do not fit");
        bad = s;
        bad.policy_digest[0] ^= 0x01;
        assert_check_refuses(&bad, "sha256:7", "recorded policy digest");
        /* The authPolicy in the public area altered (Load would refuse it
         * too; the check already does). */
        bad = s;
        ((uint8_t *) memmem(bad.public_blob, bad.public_size, s.policy_digest, 32))[0] ^= 0x01;
        assert_check_refuses(&bad, "sha256:7", "do not match");

        /* Malformed or out of range. */
        bad = s;
        bad.public_size--;
        assert_int_equal(tpm_sealed_check(&bad, &sel7, why, sizeof(why)), -EXDEV);
        bad = s;
        bad.private_size--;
        assert_int_equal(tpm_sealed_check(&bad, &sel7, why, sizeof(why)), -EXDEV);
        bad = s;
        bad.private_size = 0;
        assert_int_equal(tpm_sealed_check(&bad, &sel7, why, sizeof(why)), -EINVAL);
        bad = s;
        bad.public_size = TPM_BLOB_MAX + 1;
        assert_int_equal(tpm_sealed_check(&bad, &sel7, why, sizeof(why)), -EINVAL);
        bad = s;
        bad.kind = 0;
        assert_int_equal(tpm_sealed_check(&bad, &sel7, why, sizeof(why)), -EINVAL);
        bad = s;
        bad.pcrs.sel.mask = 1u << 24;
        assert_int_equal(tpm_sealed_check(&bad, &sel7, why, sizeof(why)), -EINVAL);
        assert_int_equal(tpm_sealed_check(&s, &(struct tpm_pcr_selection) { .hash_alg = 0x99, .mask = 1 },
                                          why, sizeof(why)), -EINVAL);
        assert_int_equal(tpm_sealed_check(NULL, &sel7, why, sizeof(why)), -EINVAL);
        assert_tpm_clean(tcti);
}

/* An HMAC key with userWithAuth set: its (empty) authValue alone would let
 * anyone use it in any boot, whatever its policy. Made with ESAPI, with the
 * authPolicy and recorded values of a genuine object, so only the attribute
 * differs. */
static void test_tpm_sealed_check_refuses_user_with_auth(void **state) {
        static const TPM2B_SENSITIVE_CREATE sensitive = {};
        static const TPM2B_DATA outside = {};
        static const TPML_PCR_SELECTION creation_pcr = {};
        uint8_t key[AES256_KEY_SIZE], out[AES256_KEY_SIZE];
        TPM2B_PUBLIC template = {
                .publicArea = {
                        .type = TPM2_ALG_KEYEDHASH,
                        .nameAlg = TPM2_ALG_SHA256,
                        .objectAttributes = TPMA_OBJECT_SIGN_ENCRYPT | TPMA_OBJECT_FIXEDTPM |
                                TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_SENSITIVEDATAORIGIN |
                                TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA,
                        .parameters.keyedHashDetail.scheme = {
                                .scheme = TPM2_ALG_HMAC,
                                .details.hmac.hashAlg = TPM2_ALG_SHA256,
                        },
                },
        };
        TPM2B_PRIVATE *priv = NULL;
        TPM2B_PUBLIC *pub = NULL;
        TSS2_TCTI_CONTEXT *tc = NULL;
        ESYS_CONTEXT *esys;
        ESYS_TR srk = ESYS_TR_NONE;
        struct tpm_sealed genuine, bad;
        struct tpm *tpm = open_tpm(tcti);

        cache_key_create_ok(tpm, "sha256:7", &genuine, key);
        tpm_close(tpm);

        template.publicArea.authPolicy.size = 32;
        memcpy(template.publicArea.authPolicy.buffer, genuine.policy_digest, 32);
        esys = esys_open(tcti, &tc);
        assert_int_equal(Esys_TR_FromTPMPublic(esys, TPM_SRK_HANDLE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                               &srk),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_Create(esys, srk, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &sensitive,
                                     &template, &outside, &creation_pcr, &priv, &pub, NULL, NULL, NULL),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_TR_Close(esys, &srk), TSS2_RC_SUCCESS);
        esys_close(esys, tc);

        bad = genuine;
        bad.public_size = bad.private_size = 0;
        assert_int_equal(Tss2_MU_TPM2B_PUBLIC_Marshal(pub, bad.public_blob, sizeof(bad.public_blob),
                                                      &bad.public_size),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Tss2_MU_TPM2B_PRIVATE_Marshal(priv, bad.private_blob, sizeof(bad.private_blob),
                                                       &bad.private_size),
                         TSS2_RC_SUCCESS);
        Esys_Free(pub);
        Esys_Free(priv);

        assert_check_refuses(&bad, "sha256:7", "userWithAuth set");
        assert_check_refuses(&bad, "none", "userWithAuth set");
        tpm = open_tpm(tcti);
        assert_int_equal(tpm_cache_key_derive(tpm, &bad, out, NULL), -EXDEV);
        tpm_close(tpm);
        assert_tpm_clean(tcti);
}

/* ---- rollback counter --------------------------------------------------- */

#define TEST_OWNER_AUTH "owner-s3cret"

static void esys_nv_undefine(const char *t, uint32_t index, const char *owner_auth) {
        TSS2_TCTI_CONTEXT *tc = NULL;
        ESYS_CONTEXT *esys = esys_open(t, &tc);
        ESYS_TR nv = ESYS_TR_NONE;

        if (owner_auth) {
                TPM2B_AUTH a = { .size = (UINT16) strlen(owner_auth) };

                memcpy(a.buffer, owner_auth, a.size);
                assert_int_equal(Esys_TR_SetAuth(esys, ESYS_TR_RH_OWNER, &a), TSS2_RC_SUCCESS);
        }
        if (Esys_TR_FromTPMPublic(esys, index, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &nv) ==
            TSS2_RC_SUCCESS)
                assert_int_equal(Esys_NV_UndefineSpace(esys, ESYS_TR_RH_OWNER, nv, ESYS_TR_PASSWORD,
                                                       ESYS_TR_NONE, ESYS_TR_NONE),
                                 TSS2_RC_SUCCESS);
        esys_close(esys, tc);
}

static void esys_nv_define(const char *t, uint32_t index, TPMA_NV attributes) {
        static const TPM2B_AUTH empty = {};
        TSS2_TCTI_CONTEXT *tc = NULL;
        ESYS_CONTEXT *esys = esys_open(t, &tc);
        TPM2B_NV_PUBLIC pub = {
                .nvPublic = {
                        .nvIndex = index,
                        .nameAlg = TPM2_ALG_SHA256,
                        .attributes = attributes,
                        .dataSize = 8,
                },
        };
        ESYS_TR nv = ESYS_TR_NONE;

        assert_int_equal(Esys_NV_DefineSpace(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                             ESYS_TR_NONE, &empty, &pub, &nv),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_TR_Close(esys, &nv), TSS2_RC_SUCCESS);
        esys_close(esys, tc);
}

static void esys_owner_auth_set(const char *t, const char *old, const char *new) {
        TSS2_TCTI_CONTEXT *tc = NULL;
        ESYS_CONTEXT *esys = esys_open(t, &tc);
        TPM2B_AUTH a = { .size = (UINT16) strlen(old) }, b = { .size = (UINT16) strlen(new) };

        memcpy(a.buffer, old, a.size);
        memcpy(b.buffer, new, b.size);
        assert_int_equal(Esys_TR_SetAuth(esys, ESYS_TR_RH_OWNER, &a), TSS2_RC_SUCCESS);
        assert_int_equal(Esys_HierarchyChangeAuth(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                                  ESYS_TR_NONE, &b),
                         TSS2_RC_SUCCESS);
        esys_close(esys, tc);
}

static void test_tpm_counter_define_read_increment(void **state) {
        const uint32_t idx = TPM_COUNTER_INDEX_DEFAULT;
        uint64_t v = 42, v1, w;
        struct tpm *tpm;

        assert_int_equal(idx >> 22, 0x01800000u >> 22);   /* owner range */
        esys_nv_undefine(tcti, idx, NULL);

        tpm = open_tpm(tcti);
        assert_int_equal(tpm_counter_read(tpm, idx, &v), -ENOENT);
        assert_int_equal(tpm_counter_increment(tpm, idx, &v), -ENOENT);
        assert_int_equal(tpm_counter_read(tpm, 0x81000001u, &v), -EINVAL);

        assert_int_equal(tpm_counter_define(tpm, idx, NULL, &v1), 0);
        assert_int_equal(tpm_counter_read(tpm, idx, &v), 0);
        assert_int_equal(v, v1);
        assert_int_equal(tpm_counter_increment(tpm, idx, &v), 0);
        assert_int_equal(v, v1 + 1);
        assert_int_equal(tpm_counter_increment(tpm, idx, NULL), 0);
        assert_int_equal(tpm_counter_read(tpm, idx, &v), 0);
        assert_int_equal(v, v1 + 2);
        assert_int_equal(tpm_counter_define(tpm, idx, "", &w), -EEXIST);
        tpm_close(tpm);

        /* Undefine and define again: no rollback (Part 1, NV counters). */
        esys_nv_undefine(tcti, idx, NULL);
        tpm = open_tpm(tcti);
        assert_int_equal(tpm_counter_read(tpm, idx, &w), -ENOENT);
        assert_int_equal(tpm_counter_define(tpm, idx, NULL, &w), 0);
        assert_true(w >= v1 + 2);
        tpm_close(tpm);

        esys_nv_undefine(tcti, idx, NULL);
        assert_tpm_clean(tcti);
}

/* Somebody else's index at our handle: another Name. */
static void test_tpm_counter_foreign_index(void **state) {
        const uint32_t idx = TPM_COUNTER_INDEX_DEFAULT;
        const TPMA_NV counter = TPMA_NV_AUTHREAD | TPMA_NV_AUTHWRITE | TPMA_NV_NO_DA |
                ((TPMA_NV) TPM2_NT_COUNTER << TPMA_NV_TPM2_NT_SHIFT);
        static const TPMA_NV others[] = {
                /* An ordinary index: its owner writes any value he likes. */
                TPMA_NV_AUTHREAD | TPMA_NV_AUTHWRITE | TPMA_NV_NO_DA,
                /* A counter, but the owner can read it too. */
                TPMA_NV_AUTHREAD | TPMA_NV_AUTHWRITE | TPMA_NV_NO_DA | TPMA_NV_OWNERREAD |
                        ((TPMA_NV) TPM2_NT_COUNTER << TPMA_NV_TPM2_NT_SHIFT),
        };
        uint64_t v;
        struct tpm *tpm;

        for (size_t i = 0; i < ARRAY_SIZE(others); i++) {
                esys_nv_undefine(tcti, idx, NULL);
                esys_nv_define(tcti, idx, others[i]);
                tpm = open_tpm(tcti);
                log_reset();
                assert_int_equal(tpm_counter_read(tpm, idx, &v), -ENOTUNIQ);
                assert_non_null(strstr(log_buf, "not our counter's template"));
                assert_int_equal(tpm_counter_increment(tpm, idx, &v), -ENOTUNIQ);
                assert_int_equal(tpm_counter_define(tpm, idx, NULL, &v), -ENOTUNIQ);
                tpm_close(tpm);
        }

        /* Our template, defined but never incremented (an interrupted
         * define): not readable yet, and define finishes it. */
        esys_nv_undefine(tcti, idx, NULL);
        esys_nv_define(tcti, idx, counter);
        tpm = open_tpm(tcti);
        assert_int_equal(tpm_counter_read(tpm, idx, &v), -ENOENT);
        assert_int_equal(tpm_counter_define(tpm, idx, NULL, &v), 0);
        assert_int_equal(tpm_counter_read(tpm, idx, &v), 0);
        tpm_close(tpm);

        esys_nv_undefine(tcti, idx, NULL);
        assert_tpm_clean(tcti);
}

static void test_tpm_counter_define_owner_auth(void **state) {
        const uint32_t idx = TPM_COUNTER_INDEX_DEFAULT;
        uint64_t v;
        struct tpm *tpm;

        esys_nv_undefine(tcti, idx, NULL);
        esys_owner_auth_set(tcti, "", TEST_OWNER_AUTH);

        tpm = open_tpm(tcti);
        assert_int_equal(tpm_counter_define(tpm, idx, NULL, &v), -EACCES);
        assert_int_equal(tpm_counter_define(tpm, idx, "", &v), -EACCES);
        assert_int_equal(tpm_counter_define(tpm, idx, "wrong", &v), -EACCES);
        assert_int_equal(tpm_counter_read(tpm, idx, &v), -ENOENT);
        assert_int_equal(tpm_counter_define(tpm, idx, TEST_OWNER_AUTH, &v), 0);
        assert_int_equal(tpm_counter_read(tpm, idx, &v), 0);
        tpm_close(tpm);

        esys_nv_undefine(tcti, idx, TEST_OWNER_AUTH);
        esys_owner_auth_set(tcti, TEST_OWNER_AUTH, "");
        assert_tpm_clean(tcti);
}

/* Restore an empty owner auth if the test above failed half-way. */
static int owner_auth_teardown(void **state) {
        TSS2_TCTI_CONTEXT *tc = NULL;
        ESYS_CONTEXT *esys = esys_open(tcti, &tc);
        TPM2B_AUTH a = { .size = sizeof(TEST_OWNER_AUTH) - 1 }, empty = {};

        memcpy(a.buffer, TEST_OWNER_AUTH, a.size);
        if (Esys_TR_SetAuth(esys, ESYS_TR_RH_OWNER, &a) == TSS2_RC_SUCCESS)
                (void) Esys_HierarchyChangeAuth(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                                ESYS_TR_NONE, &empty);
        esys_close(esys, tc);
        return 0;
}

static int group_teardown(void **state) {
        other_swtpm_stop();
        if (pcap_path[0])
                (void) unlink(pcap_path);
        return 0;
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_tpm_pcr_selection_parse_good),
                cmocka_unit_test(test_tpm_pcr_selection_parse_bad),
                cmocka_unit_test(test_tpm_pcr_selection_format_good),
                cmocka_unit_test(test_tpm_pcr_selection_format_bad),
                cmocka_unit_test(test_tpm_pcr_values_format_good),
                cmocka_unit_test(test_tpm_open_srk_created_then_reused),
                cmocka_unit_test(test_tpm_open_foreign_srk),
                cmocka_unit_test(test_tpm_open_dead_port),
                cmocka_unit_test(test_tpm_seal_unseal_roundtrip),
                cmocka_unit_test(test_tpm_seal_unseal_many_pcrs),
                cmocka_unit_test(test_tpm_seal_unseal_sha1_bank),
                cmocka_unit_test(test_tpm_seal_unseal_none),
                cmocka_unit_test(test_tpm_unseal_pcr_changed),
                cmocka_unit_test(test_tpm_unseal_altered_blobs),
                cmocka_unit_test(test_tpm_unseal_other_tpm),
                cmocka_unit_test(test_tpm_seal_unseal_secret_not_on_wire),
                cmocka_unit_test(test_tpm_seal_unseal_cycles_no_leaks),
                cmocka_unit_test(test_tpm_cache_key_create_derive_roundtrip),
                cmocka_unit_test(test_tpm_cache_key_derive_pcr_changed),
                cmocka_unit_test(test_tpm_cache_key_derive_bad_input),
                cmocka_unit_test(test_tpm_cache_key_not_on_wire),
                cmocka_unit_test(test_tpm_cache_key_derive_no_copies_left),
                cmocka_unit_test(test_tpm_cache_key_cycles_no_leaks),
                cmocka_unit_test(test_tpm_sealed_check_accepts),
                cmocka_unit_test(test_tpm_sealed_check_refuses_weaker),
                cmocka_unit_test(test_tpm_sealed_check_refuses_other_objects),
                cmocka_unit_test(test_tpm_sealed_check_refuses_user_with_auth),
                cmocka_unit_test(test_tpm_counter_define_read_increment),
                cmocka_unit_test(test_tpm_counter_foreign_index),
                cmocka_unit_test_teardown(test_tpm_counter_define_owner_auth, owner_auth_teardown),
        };

        tcti = getenv("TPMKMS_TEST_TCTI");
        if (!tcti) {
                fprintf(stderr, "TPMKMS_TEST_TCTI not set: run under tests/lib/with-swtpm\n");
                return 1;
        }
        /* tpm2-tss prints its own errors to stderr; the expected failures
         * here would drown the output. TSS2_LOG=all+error to see them. */
        setenv("TSS2_LOG", "all+none", 0);
        tpm_set_log(log_capture);

        return cmocka_run_group_tests(tests, NULL, group_teardown);
}
