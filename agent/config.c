/* tpmkmsd.conf: one table drives parsing, defaults and duplicate detection.
 *
 * inih (Debian's libinih is built without INI_HANDLER_LINENO) gives the
 * handler no line number, so the file is fed through ini_parse_stream() with
 * our own reader. The reader also closes inih's gaps for a security-relevant
 * file:
 *   - it counts lines, so every error names FILE:LINE;
 *   - it rejects lines longer than inih's buffer (inih would silently split
 *     them and parse the tail as a new line) and lines with NUL bytes;
 *   - it strips leading blanks, which turns off inih's Python-style
 *     continuation lines (an indented line would otherwise be appended to the
 *     previous key and look like a duplicate);
 *   - it checks every [section] header, also of sections with no keys, which
 *     inih never reports to the handler;
 *   - it returns EOF after the first error, so the first error is the one
 *     reported.
 * Comments start with ';' or '#' at the start of a line; inline comments are
 * inih's: ';' after whitespace. */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <ini.h>
#include <inttypes.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "config.h"
#include "fileio.h"
#include "macro.h"
#include "policy.h"
#include "util.h"


#define CENTRAL_DEFAULT_PORT 5696

struct config_item;

/* A parser checks value (and the item's range) and stores it in c. On
 * failure it writes a short reason ("must be an absolute path") into why and
 * returns -EINVAL. */
typedef int (*config_parser_t)(const struct config_item *it, const char *value,
                               struct config *c, char *why, size_t why_size);

struct config_item {
        const char *section;
        const char *key;
        config_parser_t parse;
        size_t offset;       /* of the field in struct config */
        size_t size;         /* of the field (strings: buffer size) */
        uint64_t min, max;   /* range: durations in usec; strings: min 1 = non-empty */
        const char *def;     /* default, fed through the same parser; NULL = zero */
};

static bool has_control_chars(const char *s) {
        for (; *s; s++)
                if ((unsigned char) *s < 0x20 || *s == 0x7f)
                        return true;
        return false;
}

/* Digits only (no sign, no blanks: strtoull would take both), in [0, max]. */
static int parse_uint(const char *s, size_t n, uint64_t max, uint64_t *ret) {
        uint64_t v = 0;

        if (n == 0)
                return -EINVAL;
        for (size_t i = 0; i < n; i++) {
                if (s[i] < '0' || s[i] > '9')
                        return -EINVAL;
                if (v > (UINT64_MAX - (uint64_t) (s[i] - '0')) / 10)
                        return -EINVAL;
                v = v * 10 + (uint64_t) (s[i] - '0');
        }
        if (v > max)
                return -EINVAL;
        *ret = v;
        return 0;
}

int parse_duration(const char *s, uint64_t *ret_usec) {
        static const struct {
                const char *suffix;
                uint64_t usec;
        } units[] = {
                { "ms", USEC_PER_MSEC },
                { "s", USEC_PER_SEC },
                { "min", USEC_PER_MIN },
                { "h", USEC_PER_HOUR },
                { "d", USEC_PER_DAY },
                { "", USEC_PER_SEC },   /* a plain number is seconds */
        };
        size_t n;
        uint64_t v;

        if (!s || !ret_usec)
                return -EINVAL;

        n = strspn(s, "0123456789");
        if (parse_uint(s, n, UINT64_MAX, &v) < 0)
                return -EINVAL;

        for (size_t i = 0; i < ARRAY_SIZE(units); i++) {
                if (strcmp(s + n, units[i].suffix) != 0)
                        continue;
                if (v > UINT64_MAX / units[i].usec)
                        return -EINVAL;
                *ret_usec = v * units[i].usec;
                return 0;
        }
        return -EINVAL;
}

static void format_duration(uint64_t usec, char *buf, size_t size) {
        if (usec % USEC_PER_DAY == 0 && usec > USEC_PER_DAY)   /* "24h" stays */
                snprintf(buf, size, "%" PRIu64 "d", usec / USEC_PER_DAY);
        else if (usec % USEC_PER_HOUR == 0 && usec > 0)
                snprintf(buf, size, "%" PRIu64 "h", usec / USEC_PER_HOUR);
        else if (usec % USEC_PER_MIN == 0 && usec > 0)
                snprintf(buf, size, "%" PRIu64 "min", usec / USEC_PER_MIN);
        else if (usec % USEC_PER_SEC == 0)
                snprintf(buf, size, "%" PRIu64 "s", usec / USEC_PER_SEC);
        else
                snprintf(buf, size, "%" PRIu64 "ms", usec / USEC_PER_MSEC);
}

static int parse_duration_item(const struct config_item *it, const char *value,
                               struct config *c, char *why, size_t why_size) {
        uint64_t usec;
        char lo[32], hi[32];

        format_duration(it->min, lo, sizeof(lo));
        format_duration(it->max, hi, sizeof(hi));
        if (parse_duration(value, &usec) < 0) {
                errorf(why, why_size, "not a duration (e.g. 250ms, 5s, 2min, 1h): \"%s\"", value);
                return -EINVAL;
        }
        if (usec < it->min || usec > it->max) {
                errorf(why, why_size, "must be between %s and %s", lo, hi);
                return -EINVAL;
        }
        *(uint64_t *) ((uint8_t *) c + it->offset) = usec;
        return 0;
}

/* A duration that may be switched off: "" or "off" give 0. */
static int parse_optional_duration_item(const struct config_item *it, const char *value,
                                        struct config *c, char *why, size_t why_size) {
        if (value[0] == '\0' || strcmp(value, "off") == 0) {
                *(uint64_t *) ((uint8_t *) c + it->offset) = 0;
                return 0;
        }
        return parse_duration_item(it, value, c, why, why_size);
}

/* A duration that may be infinite: "never" gives UINT64_MAX. */
static int parse_duration_or_never_item(const struct config_item *it, const char *value,
                                        struct config *c, char *why, size_t why_size) {
        if (strcmp(value, "never") == 0) {
                *(uint64_t *) ((uint8_t *) c + it->offset) = UINT64_MAX;
                return 0;
        }
        return parse_duration_item(it, value, c, why, why_size);
}

/* "50%" or "50", 0..100 (it->max). */
static int parse_percent_item(const struct config_item *it, const char *value,
                              struct config *c, char *why, size_t why_size) {
        size_t n = strlen(value);
        uint64_t v;

        if (n > 0 && value[n - 1] == '%')
                n--;
        if (parse_uint(value, n, it->max, &v) < 0) {
                errorf(why, why_size, "must be a percentage from 0%% to %" PRIu64 "%% (e.g. 50%%)", it->max);
                return -EINVAL;
        }
        *(unsigned *) ((uint8_t *) c + it->offset) = (unsigned) v;
        return 0;
}

static int parse_string_item(const struct config_item *it, const char *value,
                             struct config *c, char *why, size_t why_size) {
        size_t n = strlen(value);

        if (n < it->min) {
                errorf(why, why_size, "must not be empty");
                return -EINVAL;
        }
        if (n >= it->size) {
                errorf(why, why_size, "too long (at most %zu characters)", it->size - 1);
                return -EINVAL;
        }
        if (has_control_chars(value)) {
                errorf(why, why_size, "contains control characters");
                return -EINVAL;
        }
        memcpy((char *) c + it->offset, value, n + 1);
        return 0;
}

/* Absolute: the daemon does not resolve paths against its working directory. */
static int parse_path_item(const struct config_item *it, const char *value,
                           struct config *c, char *why, size_t why_size) {
        if (value[0] != '\0' && value[0] != '/') {
                errorf(why, why_size, "must be an absolute path");
                return -EINVAL;
        }
        return parse_string_item(it, value, c, why, why_size);
}

/* it->size is CONFIG_SOCKET_PATH_MAX = sizeof(sun_path), which needs room for
 * the NUL: parse_string_item's n >= size check is exactly that. */
static int parse_socket_item(const struct config_item *it, const char *value,
                             struct config *c, char *why, size_t why_size) {
        if (value[0] != '/') {
                errorf(why, why_size, "must be an absolute path");
                return -EINVAL;
        }
        if (strlen(value) >= it->size) {
                errorf(why, why_size, "too long for a unix socket (at most %zu characters)",
                        it->size - 1);
                return -EINVAL;
        }
        return parse_string_item(it, value, c, why, why_size);
}

/* Key ids are "kmip:<group>/<uid>.<check value>", percent-encoded
 * (agent/policy.h): bound the group so that the longest plain central
 * identifier still fits in KEY_ID_MAX. */
static int parse_key_group_item(const struct config_item *it, const char *value,
                                struct config *c, char *why, size_t why_size) {
        if (policy_encoded_length(value) > POLICY_GROUP_ENCODED_MAX) {
                errorf(why, why_size, "too long for a key id: at most %d characters, each one other than "
                       "A-Z a-z 0-9 . _ - counting as 3 (it is percent-encoded in every key id)",
                       POLICY_GROUP_ENCODED_MAX);
                return -EINVAL;
        }
        return parse_string_item(it, value, c, why, why_size);
}

static int parse_bool_item(const struct config_item *it, const char *value,
                           struct config *c, char *why, size_t why_size) {
        bool *b = (bool *) ((uint8_t *) c + it->offset);

        if (strcasecmp(value, "yes") == 0 || strcasecmp(value, "true") == 0 ||
            strcmp(value, "1") == 0)
                *b = true;
        else if (strcasecmp(value, "no") == 0 || strcasecmp(value, "false") == 0 ||
                 strcmp(value, "0") == 0)
                *b = false;
        else {
                errorf(why, why_size, "must be yes, no, true, false, 1 or 0");
                return -EINVAL;
        }
        return 0;
}

static int parse_central_type_item(const struct config_item *it, const char *value,
                                   struct config *c, char *why, size_t why_size) {
        if (strcmp(value, "kmip") == 0)
                c->central_type = CENTRAL_KMIP;
        else if (strcmp(value, "none") == 0)
                c->central_type = CENTRAL_NONE;
        else {
                errorf(why, why_size, "must be kmip or none");
                return -EINVAL;
        }
        return 0;
}

static int parse_pcrs_item(const struct config_item *it, const char *value,
                           struct config *c, char *why, size_t why_size) {
        struct tpm_pcr_selection sel;

        memset(&sel, 0, sizeof(sel));   /* zero padding: configs compare with memcmp */
        if (tpm_pcr_selection_parse(value, &sel) < 0) {
                errorf(why, why_size, "not a PCR selection (e.g. sha256:7, sha256:0,2,7, none)");
                return -EINVAL;
        }
        memcpy(&c->pcrs, &sel, sizeof(sel));
        return 0;
}

/* A TPM NV index in the owner range (TCG handle registry: 0x01800000 to
 * 0x01BFFFFF), hexadecimal. */
static int parse_nv_index_item(const struct config_item *it, const char *value,
                               struct config *c, char *why, size_t why_size) {
        char *end;
        unsigned long v;

        errno = 0;
        v = strtoul(value, &end, 16);
        if (strncmp(value, "0x", 2) != 0 || *end || errno || v < it->min || v > it->max) {
                errorf(why, why_size, "must be a hexadecimal TPM NV index from 0x%08" PRIx64 " to 0x%08" PRIx64,
                       it->min, it->max);
                return -EINVAL;
        }
        *(uint32_t *) ((uint8_t *) c + it->offset) = (uint32_t) v;
        return 0;
}

/* Split a comma-separated list; calls fn on each trimmed element. Empty
 * elements ("a,,b", a trailing comma) are errors: they are typos. */
typedef int (*list_fn_t)(const char *elem, size_t n, struct config *c, char *why, size_t why_size);
static int parse_list(const char *value, list_fn_t fn, struct config *c, char *why,
                      size_t why_size) {
        const char *p = value;

        if (*p == '\0')
                return 0;
        for (;;) {
                const char *end = p + strcspn(p, ",");
                const char *b = p, *e = end;
                int r;

                while (b < e && isblank((unsigned char) *b))
                        b++;
                while (e > b && isblank((unsigned char) e[-1]))
                        e--;
                if (b == e) {
                        errorf(why, why_size, "empty list element");
                        return -EINVAL;
                }
                r = fn(b, (size_t) (e - b), c, why, why_size);
                if (r < 0)
                        return r;
                if (*end == '\0')
                        return 0;
                p = end + 1;
        }
}

static int uid_add(const char *s, size_t n, struct config *c, char *why, size_t why_size) {
        uint64_t v;
        uid_t uid;

        if (parse_uint(s, n, UINT32_MAX - 1, &v) == 0)   /* (uid_t) -1 is "no uid" */
                uid = (uid_t) v;
        else {
                char name[256];
                struct passwd *pw;

                if (n >= sizeof(name) || s[0] == '-' || (s[0] >= '0' && s[0] <= '9')) {
                        errorf(why, why_size, "not a uid or user name: \"%.*s\"", (int) n, s);
                        return -EINVAL;
                }
                memcpy(name, s, n);
                name[n] = '\0';
                errno = 0;
                pw = getpwnam(name);
                if (!pw) {
                        errorf(why, why_size, "no such user: \"%s\"", name);
                        return -EINVAL;
                }
                uid = pw->pw_uid;
        }

        for (size_t i = 0; i < c->n_allowed_uids; i++)
                if (c->allowed_uids[i] == uid) {
                        errorf(why, why_size, "uid %u listed twice", (unsigned) uid);
                        return -EINVAL;
                }
        if (c->n_allowed_uids >= CONFIG_MAX_UIDS) {
                errorf(why, why_size, "more than %d uids", CONFIG_MAX_UIDS);
                return -EINVAL;
        }
        c->allowed_uids[c->n_allowed_uids++] = uid;
        return 0;
}

static int parse_uids_item(const struct config_item *it, const char *value,
                           struct config *c, char *why, size_t why_size) {
        c->n_allowed_uids = 0;
        if (parse_list(value, uid_add, c, why, why_size) < 0)
                return -EINVAL;
        if (c->n_allowed_uids == 0) {
                /* Nobody could connect: surely not what was meant. */
                errorf(why, why_size, "must list at least one uid");
                return -EINVAL;
        }
        return 0;
}

/* DNS name or IPv4 literal: letters, digits, '-', '.', '_' (service names). */
static bool hostname_valid(const char *s, size_t n) {
        if (n == 0 || n > 253)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!isalnum((unsigned char) s[i]) && !strchr("-._", s[i]))
                        return false;
        return true;
}

/* "host", "host:port", "[v6]", "[v6]:port". port_required for listen
 * addresses, where no default port makes sense. */
static int hostport_parse(const char *s, size_t n, bool port_required, struct central_endpoint *ret,
                          char *why, size_t why_size) {
        const char *host, *port = NULL;
        size_t host_n, port_n = 0;
        uint64_t p = CENTRAL_DEFAULT_PORT;

        if (s[0] == '[') {
                const char *close = memchr(s, ']', n);
                char addr[INET6_ADDRSTRLEN];
                struct in6_addr a6;

                if (!close) {
                        errorf(why, why_size, "missing ']' in \"%.*s\"", (int) n, s);
                        return -EINVAL;
                }
                host = s + 1;
                host_n = (size_t) (close - host);
                if (host_n >= sizeof(addr)) {
                        errorf(why, why_size, "bad IPv6 address in \"%.*s\"", (int) n, s);
                        return -EINVAL;
                }
                memcpy(addr, host, host_n);
                addr[host_n] = '\0';
                if (inet_pton(AF_INET6, addr, &a6) != 1) {
                        errorf(why, why_size, "bad IPv6 address in \"%.*s\"", (int) n, s);
                        return -EINVAL;
                }
                if (close + 1 < s + n) {
                        if (close[1] != ':') {
                                errorf(why, why_size, "junk after ']' in \"%.*s\"", (int) n, s);
                                return -EINVAL;
                        }
                        port = close + 2;
                        port_n = (size_t) (s + n - port);
                }
        } else {
                const char *colon = memchr(s, ':', n);

                if (colon && memchr(colon + 1, ':', (size_t) (s + n - colon - 1))) {
                        errorf(why, why_size, "IPv6 addresses need brackets: \"[addr]:port\"");
                        return -EINVAL;
                }
                host = s;
                host_n = colon ? (size_t) (colon - s) : n;
                if (!hostname_valid(host, host_n)) {
                        errorf(why, why_size, "bad host name in \"%.*s\"", (int) n, s);
                        return -EINVAL;
                }
                if (colon) {
                        port = colon + 1;
                        port_n = (size_t) (s + n - port);
                }
        }

        if (port) {
                if (parse_uint(port, port_n, 65535, &p) < 0 || p == 0) {
                        errorf(why, why_size, "bad port in \"%.*s\"", (int) n, s);
                        return -EINVAL;
                }
        } else if (port_required) {
                errorf(why, why_size, "missing port in \"%.*s\"", (int) n, s);
                return -EINVAL;
        }

        if (ret) {
                memcpy(ret->host, host, host_n);   /* host_n <= 253 < sizeof(host) */
                ret->host[host_n] = '\0';
                ret->port = (uint16_t) p;
        }
        return 0;
}

static int endpoint_add(const char *s, size_t n, struct config *c, char *why, size_t why_size) {
        struct central_endpoint ep;

        if (hostport_parse(s, n, false, &ep, why, why_size) < 0)
                return -EINVAL;
        if (c->n_endpoints >= CENTRAL_ENDPOINTS_MAX) {
                errorf(why, why_size, "more than %d endpoints", CENTRAL_ENDPOINTS_MAX);
                return -EINVAL;
        }
        c->endpoints[c->n_endpoints++] = ep;
        return 0;
}

static int parse_endpoints_item(const struct config_item *it, const char *value,
                                struct config *c, char *why, size_t why_size) {
        c->n_endpoints = 0;
        return parse_list(value, endpoint_add, c, why, why_size);
}

/* "" (off), "host:port", "[v6]:port" or an absolute unix socket path. Kept as
 * the string; checked here so that a typo fails at --check-config. */
static int parse_listen_item(const struct config_item *it, const char *value,
                             struct config *c, char *why, size_t why_size) {
        if (value[0] == '/') {
                if (strlen(value) >= CONFIG_SOCKET_PATH_MAX) {
                        errorf(why, why_size, "too long for a unix socket (at most %d characters)",
                                CONFIG_SOCKET_PATH_MAX - 1);
                        return -EINVAL;
                }
        } else if (value[0] != '\0' &&
                   hostport_parse(value, strlen(value), true, NULL, why, why_size) < 0)
                return -EINVAL;
        return parse_string_item(it, value, c, why, why_size);
}

#define FIELD(f) offsetof(struct config, f), sizeof(((struct config *) NULL)->f)

static const struct config_item config_table[] = {
        { "kms", "socket", parse_socket_item, FIELD(kms_socket), 1, 0, "/run/tpmkms/kms.sock" },
        { "kms", "allowed_uids", parse_uids_item, FIELD(allowed_uids), 0, 0, "0" },
        { "tpm", "tcti", parse_string_item, FIELD(tpm_tcti), 1, 0, "device:/dev/tpmrm0" },
        { "tpm", "pcrs", parse_pcrs_item, FIELD(pcrs), 0, 0, "sha256:7" },
        { "tpm", "insecure_no_pcr_policy", parse_bool_item, FIELD(insecure_no_pcr_policy), 0, 0, "no" },
        { "tpm", "counter_index", parse_nv_index_item, FIELD(counter_index), 0x01800000, 0x01bfffff,
          "0x01a71c00" /* TPM_COUNTER_INDEX_DEFAULT (test-config checks) */ },
        { "tpm", "owner_auth_file", parse_path_item, FIELD(owner_auth_file), 0, 0, "" },
        /* A start that cannot finish with the TPM in this time exits (and
         * systemd restarts it) rather than hang; a real TPM takes well
         * under a second per command. */
        { "tpm", "timeout", parse_duration_item, FIELD(tpm_timeout_usec), USEC_PER_SEC, 10 * USEC_PER_MIN, "30s" },
        { "state", "dir", parse_path_item, FIELD(state_dir), 1, 0, "/var/lib/tpmkms" },
        { "central", "type", parse_central_type_item, FIELD(central_type), 0, 0, "none" },
        { "central", "endpoints", parse_endpoints_item, FIELD(endpoints), 0, 0, "" },
        { "central", "ca_file", parse_path_item, FIELD(ca_file), 0, 0, "" },
        { "central", "cert_file", parse_path_item, FIELD(cert_file), 0, 0, "" },
        { "central", "key_file", parse_path_item, FIELD(key_file), 0, 0, "" },
        { "central", "key_group", parse_key_group_item, FIELD(key_group), 0, 0, "" },
        /* At least 1s: a tighter poll only loads the central KMS. */
        { "central", "sync_interval", parse_duration_item, FIELD(sync_interval_usec),
          USEC_PER_SEC, 24 * USEC_PER_HOUR, "60s" },
        /* The apiserver never waits on sync; the bounds only keep it sane. */
        { "central", "timeout", parse_duration_item, FIELD(central_timeout_usec),
          10 * USEC_PER_MSEC, 10 * USEC_PER_MIN, "5s" },
        /* Off by default: serving from the cache while the central KMS is
         * down is the point; this is for those who want fail-closed. */
        { "central", "max_staleness", parse_optional_duration_item, FIELD(max_staleness_usec),
          USEC_PER_SEC, 30 * 24 * USEC_PER_HOUR, "off" },
        /* How long a Destroyed or no longer located version stays
         * decrypt-only before it is purged (docs/key-lifecycle.md). */
        { "central", "purge_after", parse_duration_or_never_item, FIELD(purge_after_usec),
          USEC_PER_SEC, 3650 * USEC_PER_DAY, "7d" },
        /* A sync that would make more of the cached versions go missing at
         * once changes nothing and fails. */
        { "central", "max_missing_share", parse_percent_item, FIELD(max_missing_percent),
          0, 100, "50%" },
        /* Between syncs that fetch every version's material again and
         * compare it with the cache; the others fetch only what can change
         * (README, "Fleet sync load"). */
        { "central", "material_check", parse_duration_item, FIELD(material_check_usec),
          USEC_PER_SEC, 30 * 24 * USEC_PER_HOUR, "24h" },
        { "control", "socket", parse_socket_item, FIELD(control_socket), 1, 0, "/run/tpmkms/control.sock" },
        { "metrics", "listen", parse_listen_item, FIELD(metrics_listen), 0, 0, "" },
};

static bool section_known(const char *s, size_t n) {
        for (size_t i = 0; i < ARRAY_SIZE(config_table); i++)
                if (strlen(config_table[i].section) == n &&
                    memcmp(config_table[i].section, s, n) == 0)
                        return true;
        return false;
}

void config_defaults(struct config *c) {
        memset(c, 0, sizeof(*c));
        for (size_t i = 0; i < ARRAY_SIZE(config_table); i++) {
                const struct config_item *it = &config_table[i];
                char why[128];

                if (!it->def)
                        continue;
                /* Constants, covered by the unit tests: failing is a bug. */
                if (it->parse(it, it->def, c, why, sizeof(why)) < 0) {
                        fprintf(stderr, "tpmkms: bad built-in default for [%s] %s: %s\n",
                                it->section, it->key, why);
                        abort();
                }
        }
}

struct parse_state {
        FILE *f;
        const char *path;
        struct config *c;
        unsigned line;
        bool seen[ARRAY_SIZE(config_table)];
        char *buf;
        size_t buf_size;
        /* first error: reported as path:err_line (0 = whole file) */
        int r;
        unsigned err_line;
        char *err;
        size_t err_size;
};

static void fail(struct parse_state *st, int r, unsigned line, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));
static void fail(struct parse_state *st, int r, unsigned line, const char *fmt, ...) {
        char msg[512];
        va_list ap;

        if (st->r < 0)
                return;   /* keep the first */
        st->r = r;
        st->err_line = line;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        if (st->err && st->err_size > 0) {
                if (line > 0)
                        snprintf(st->err, st->err_size, "%s:%u: %s", st->path, line, msg);
                else
                        snprintf(st->err, st->err_size, "%s: %s", st->path, msg);
        }
}

/* Validate a "[section]" line: a known name, then only blanks or a comment. */
static void check_section_line(struct parse_state *st, const char *s) {
        const char *close = strchr(s, ']');
        const char *rest;

        if (!close)
                return;   /* inih reports the syntax error */
        if (!section_known(s + 1, (size_t) (close - s - 1))) {
                fail(st, -EINVAL, st->line, "unknown section [%.*s]", (int) (close - s - 1), s + 1);
                return;
        }
        rest = close + 1 + strspn(close + 1, " \t");
        if (*rest != '\0' && *rest != ';' && *rest != '#')
                fail(st, -EINVAL, st->line, "junk after [%.*s]", (int) (close - s - 1), s + 1);
}

static char *config_reader(char *str, int num, void *stream) {
        struct parse_state *st = stream;
        ssize_t n;
        char *s;
        size_t len;

        if (st->r < 0)
                return NULL;   /* stop at the first error */

        errno = 0;
        n = getline(&st->buf, &st->buf_size, st->f);
        if (n < 0) {
                if (ferror(st->f))
                        fail(st, errno > 0 ? -errno : -EIO, 0, "cannot read: %s",
                             strerror(errno > 0 ? errno : EIO));
                return NULL;
        }
        st->line++;
        if (strlen(st->buf) != (size_t) n) {
                fail(st, -EINVAL, st->line, "NUL byte in line");
                return NULL;
        }
        /* Values reach the journal, JSON and KMIP text strings: UTF-8 only. */
        if (!utf8_valid(st->buf)) {
                fail(st, -EINVAL, st->line, "not valid UTF-8");
                return NULL;
        }

        s = st->buf;
        /* A UTF-8 BOM on line 1 is inih's to skip, but it must not hide a
         * section header from check_section_line. */
        if (st->line == 1 && strncmp(s, "\xef\xbb\xbf", 3) == 0)
                s += 3;
        s += strspn(s, " \t");
        len = strcspn(s, "\r\n");
        s[len] = '\0';
        /* inih's documented bound: 3 below the buffer ('\r', '\n', NUL). */
        if (num < 3 || len > (size_t) num - 3) {
                fail(st, -EINVAL, st->line, "line too long (at most %d characters)", num - 3);
                return NULL;
        }
        if (s[0] == '[') {
                check_section_line(st, s);
                if (st->r < 0)
                        return NULL;
        }
        memcpy(str, s, len + 1);
        return str;
}

static int config_handler(void *user, const char *section, const char *name, const char *value) {
        struct parse_state *st = user;
        char why[384];

        for (size_t i = 0; i < ARRAY_SIZE(config_table); i++) {
                const struct config_item *it = &config_table[i];

                if (strcmp(it->section, section) != 0 || strcmp(it->key, name) != 0)
                        continue;
                if (st->seen[i]) {
                        fail(st, -EINVAL, st->line, "[%s] %s: duplicate key", section, name);
                        return 0;
                }
                st->seen[i] = true;
                if (it->parse(it, value, st->c, why, sizeof(why)) < 0) {
                        fail(st, -EINVAL, st->line, "[%s] %s: %s", section, name, why);
                        return 0;
                }
                return 1;
        }

        if (section[0] == '\0')
                fail(st, -EINVAL, st->line, "key \"%s\" outside of any section", name);
        else if (section_known(section, strlen(section)))
                fail(st, -EINVAL, st->line, "[%s] unknown key \"%s\"", section, name);
        else
                fail(st, -EINVAL, st->line, "unknown section [%s]", section);
        return 0;
}

/* Checks that need more than one key. Named by the file: the culprit may be a
 * default. */
static void config_check(struct parse_state *st) {
        const struct config *c = st->c;

        if (tpm_pcr_selection_is_empty(&c->pcrs) && !c->insecure_no_pcr_policy)
                fail(st, -EINVAL, 0,
                     "[tpm] pcrs = none seals without any measured-boot policy; "
                     "set insecure_no_pcr_policy = yes to really do that");
        if (c->central_type == CENTRAL_KMIP) {
                if (c->n_endpoints == 0)
                        fail(st, -EINVAL, 0, "[central] type = kmip needs endpoints");
                if (c->ca_file[0] == '\0')
                        fail(st, -EINVAL, 0, "[central] type = kmip needs ca_file");
                if (c->cert_file[0] == '\0')
                        fail(st, -EINVAL, 0, "[central] type = kmip needs cert_file");
                if (c->key_file[0] == '\0')
                        fail(st, -EINVAL, 0, "[central] type = kmip needs key_file");
                if (c->key_group[0] == '\0')
                        fail(st, -EINVAL, 0, "[central] type = kmip needs key_group");
                if (c->max_staleness_usec != 0 && c->max_staleness_usec <= c->sync_interval_usec)
                        fail(st, -EINVAL, 0, "[central] max_staleness must be longer than sync_interval");
        }
        if (strcmp(c->kms_socket, c->control_socket) == 0)
                fail(st, -EINVAL, 0, "[kms] socket and [control] socket are the same path");
        if (strcmp(c->metrics_listen, c->kms_socket) == 0 ||
            strcmp(c->metrics_listen, c->control_socket) == 0)
                fail(st, -EINVAL, 0, "[metrics] listen is the path of another socket");
}

/* c is written only on success. */
int config_load(const char *path, struct config *c, char *err, size_t err_size) {
        _cleanup_free_ struct config *tmp = NULL;
        _cleanup_free_ uint8_t *text = NULL;   /* declared before f: freed after it */
        _cleanup_fclose_ FILE *f = NULL;
        size_t text_len = 0;
        struct parse_state st = {
                .path = path,
                .err = err,
                .err_size = err_size,
        };
        int r;

        if (err && err_size > 0)
                err[0] = '\0';
        if (!path || !c)
                return -EINVAL;

        /* A FIFO, a device or /dev/zero as the configuration must neither
         * hang nor fill memory; then parse from the copy. */
        r = read_file_bounded(AT_FDCWD, path, CONFIG_FILE_MAX, true, &text, &text_len);
        if (r == -EINVAL || r == -EFBIG) {
                fail(&st, -EINVAL, 0, "%s", r == -EINVAL ? "not a regular file"
                                                         : "larger than 1 MiB: not a configuration file");
                return -EINVAL;
        }
        if (r < 0) {
                /* open's own errors, and what reading a directory says */
                fail(&st, r, 0, "%s: %s", r == -EISDIR ? "cannot read" : "cannot open", strerror(-r));
                return r;
        }
        f = fmemopen(text, text_len, "r");
        if (!f) {
                r = -errno;
                fail(&st, r, 0, "cannot read: %s", strerror(-r));
                return r;
        }
        tmp = malloc(sizeof(*tmp));
        if (!tmp)
                return -ENOMEM;
        config_defaults(tmp);

        st.f = f;
        st.c = tmp;
        r = ini_parse_stream(config_reader, &st, config_handler, &st);
        free(st.buf);
        if (r == -2) {
                fail(&st, -ENOMEM, 0, "out of memory");
                return -ENOMEM;
        }
        /* inih counts the lines our reader returned, so its numbers match
         * ours; it keeps going after a syntax error, so an earlier one of its
         * own beats the error we stopped at. */
        if (r > 0 && (st.r == 0 || (unsigned) r < st.err_line)) {
                st.r = 0;
                fail(&st, -EINVAL, (unsigned) r, "syntax error: expected \"key = value\" or \"[section]\"");
        }
        if (st.r < 0)
                return st.r;

        config_check(&st);
        if (st.r < 0)
                return st.r;

        memcpy(c, tmp, sizeof(*c));   /* padding too: memcmp-able configs */
        return 0;
}

void config_vault_options(const struct config *c, struct vault_options *ret) {
        *ret = (struct vault_options) { .pcrs = c->pcrs, .counter_index = c->counter_index };
        snprintf(ret->state_dir, sizeof(ret->state_dir), "%s", c->state_dir);
        snprintf(ret->tcti, sizeof(ret->tcti), "%s", c->tpm_tcti);
        snprintf(ret->owner_auth_file, sizeof(ret->owner_auth_file), "%s", c->owner_auth_file);
}

void config_central_options(const struct config *c, struct central_options *ret) {
        *ret = (struct central_options) {
                .n_endpoints = c->n_endpoints,
                .ca_file = c->ca_file,
                .cert_file = c->cert_file,
                .key_file = c->key_file,
                .group = c->key_group,
                .timeout_usec = c->central_timeout_usec,
                .backoff_cap_usec = c->sync_interval_usec,
        };
        memcpy(ret->endpoints, c->endpoints, sizeof(ret->endpoints));
}

void config_policy_options(const struct config *c, struct policy_options *ret) {
        *ret = (struct policy_options) {
                .purge_after_usec = c->purge_after_usec,   /* "never" is UINT64_MAX = POLICY_PURGE_NEVER */
                .max_missing_percent = c->max_missing_percent,
        };
}
