/* agent/policy.c: the role policy, one table row per central state and
 * ordering case, the missing role and its purge rules, the refusals (an
 * answer that locates nothing or too little, changed material or
 * attributes, too many versions), and the operator's purge. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "macro.h"
#include "policy.h"

#define GROUP "cluster-a-kek"
#define NOW UINT64_C(1800000000000000)
#define MAX_ROWS 6
#define HOUR (3600 * UINT64_C(1000000))
#define DAY (24 * HOUR)
#define WEEK (7 * DAY)

/* A cached version: central uid ("" for a local one, then local_id names it). */
struct cached {
        const char *uid;
        enum key_role role;
        uint8_t fill;            /* KEK = 32 times this byte */
        const char *local_id;
        uint64_t since;          /* missing_since_usec of a missing version */
};

/* What the central KMS answered. */
struct answer {
        const char *uid;
        enum central_state state;
        uint64_t created;
        bool not_aes;            /* a key of another kind: no material fetched */
        uint8_t fill;
};

/* A version expected in the result, in order (uid, or the local id). */
struct want {
        const char *name;
        enum key_role role;
        uint64_t since;          /* missing_since_usec wanted */
};

struct policy_case {
        const char *name;
        struct cached cached[MAX_ROWS];
        struct answer central[MAX_ROWS];
        struct want want[MAX_ROWS];     /* usable and Destroyed versions in Initial Date
                                         * order, then those no longer located and local
                                         * ones in cache order */
        const char *purged[MAX_ROWS];   /* names purged, in order */
        const char *missing[MAX_ROWS];  /* names gone missing this sync, in order */
        const char *ignored;            /* uid reported as not AES-256 */
        bool changed;
        uint64_t purge_after;           /* 0: a week */
        int share;                      /* max_missing_percent; 0: 50, -1: 0 */
        int error;                      /* policy_apply's result; then nothing changes */
        const char *err;                /* in the message */
};

/* M: a cached missing version (missing since `since`); MISSING: a missing
 * version wanted in the result. */
#define M(u, f, since) { u, KEY_ROLE_MISSING, f, NULL, since }
#define MISSING(u, since) { u, KEY_ROLE_MISSING, since }

#define S(u, t, f) { .uid = u, .state = CENTRAL_STATE_PRE_ACTIVE, .created = t, .fill = f }
#define A(u, t, f) { .uid = u, .state = CENTRAL_STATE_ACTIVE, .created = t, .fill = f }
#define D(u, t, f) { .uid = u, .state = CENTRAL_STATE_DEACTIVATED, .created = t, .fill = f }
#define C(u, t) { .uid = u, .state = CENTRAL_STATE_COMPROMISED, .created = t }
#define X(u, t) { .uid = u, .state = CENTRAL_STATE_DESTROYED, .created = t }

static const struct policy_case cases[] = {
        { "first sync, one Pre-Active: staged",
          .central = { S("u1", 10, 1) }, .want = { { "u1", KEY_ROLE_STAGED, 0 } }, .changed = true },
        { "first sync, one Active: primary",
          .central = { A("u1", 10, 1) }, .want = { { "u1", KEY_ROLE_PRIMARY, 0 } }, .changed = true },
        { "two Active: the newer is primary, the older retired",
          .central = { A("u2", 20, 2), A("u1", 10, 1) },
          .want = { { "u1", KEY_ROLE_RETIRED, 0 }, { "u2", KEY_ROLE_PRIMARY, 0 } }, .changed = true },
        { "same Initial Date: the greater uid is newer",
          .central = { A("b", 10, 2), A("a", 10, 1) },
          .want = { { "a", KEY_ROLE_RETIRED, 0 }, { "b", KEY_ROLE_PRIMARY, 0 } }, .changed = true },
        { "no Initial Date sorts first",
          .central = { A("late", 5, 2), A("undated", 0, 1) },
          .want = { { "undated", KEY_ROLE_RETIRED, 0 }, { "late", KEY_ROLE_PRIMARY, 0 } }, .changed = true },
        { "a newer Pre-Active does not take over from the Active",
          .central = { A("u1", 10, 1), S("u2", 20, 2) },
          .want = { { "u1", KEY_ROLE_PRIMARY, 0 }, { "u2", KEY_ROLE_STAGED, 0 } }, .changed = true },
        { "Deactivated is retired; a newer Deactivated does not hide the Active",
          .central = { A("u1", 10, 1), D("u2", 20, 2) },
          .want = { { "u1", KEY_ROLE_PRIMARY, 0 }, { "u2", KEY_ROLE_RETIRED, 0 } }, .changed = true },
        { "no Active at all: no primary",
          .central = { D("u1", 10, 1), S("u2", 20, 2) },
          .want = { { "u1", KEY_ROLE_RETIRED, 0 }, { "u2", KEY_ROLE_STAGED, 0 } }, .changed = true },
        { "activation promotes the staged version, retires the old primary",
          .cached = { { "u1", KEY_ROLE_PRIMARY, 1, NULL, 0 }, { "u2", KEY_ROLE_STAGED, 2, NULL, 0 } },
          .central = { A("u1", 10, 1), A("u2", 20, 2) },
          .want = { { "u1", KEY_ROLE_RETIRED, 0 }, { "u2", KEY_ROLE_PRIMARY, 0 } }, .changed = true },
        { "nothing changed",
          .cached = { { "u1", KEY_ROLE_RETIRED, 1, NULL, 0 }, { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { A("u2", 20, 2), D("u1", 10, 1) },
          .want = { { "u1", KEY_ROLE_RETIRED, 0 }, { "u2", KEY_ROLE_PRIMARY, 0 } }, .changed = false },
        { "Compromised: purged at once",
          .cached = { { "u1", KEY_ROLE_RETIRED, 1, NULL, 0 }, { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { C("u1", 10), A("u2", 20, 2) },
          .want = { { "u2", KEY_ROLE_PRIMARY, 0 } }, .purged = { "u1" }, .changed = true },
        { "Compromised primary: purged, no primary left",
          .cached = { { "u1", KEY_ROLE_PRIMARY, 1, NULL, 0 } },
          .central = { C("u1", 10) }, .purged = { "u1" }, .changed = true },
        /* Destroyed and no longer located used to purge; they go missing
         * now (docs/key-lifecycle.md). */
        { "Destroyed: missing, kept decrypt-only",
          .cached = { { "u1", KEY_ROLE_RETIRED, 1, NULL, 0 }, { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { X("u1", 10), A("u2", 20, 2) },
          .want = { MISSING("u1", NOW), { "u2", KEY_ROLE_PRIMARY, 0 } }, .missing = { "u1" },
          .changed = true },
        { "a cached version no longer located: missing, kept decrypt-only",
          .cached = { { "u1", KEY_ROLE_RETIRED, 1, NULL, 0 }, { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { A("u2", 20, 2) },
          .want = { { "u2", KEY_ROLE_PRIMARY, 0 }, MISSING("u1", NOW) }, .missing = { "u1" },
          .changed = true },
        { "the primary no longer located: missing, no primary left",
          .cached = { { "u1", KEY_ROLE_RETIRED, 1, NULL, 0 }, { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { D("u1", 10, 1) },
          .want = { { "u1", KEY_ROLE_RETIRED, 0 }, MISSING("u2", NOW) }, .missing = { "u2" },
          .changed = true },
        { "missing within purge_after: kept, missing_since unchanged",
          .cached = { M("u1", 1, NOW - WEEK + 1), { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { A("u2", 20, 2) },
          .want = { { "u2", KEY_ROLE_PRIMARY, 0 }, MISSING("u1", NOW - WEEK + 1) }, .changed = false },
        { "missing and still Destroyed within purge_after: kept",
          .cached = { M("u1", 1, NOW - HOUR), { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { X("u1", 10), A("u2", 20, 2) },
          .want = { MISSING("u1", NOW - HOUR), { "u2", KEY_ROLE_PRIMARY, 0 } }, .changed = false },
        { "missing for purge_after: purged",
          .cached = { M("u1", 1, NOW - WEEK), { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { A("u2", 20, 2) },
          .want = { { "u2", KEY_ROLE_PRIMARY, 0 } }, .purged = { "u1" }, .changed = true },
        { "Destroyed and missing past a short purge_after: purged",
          .cached = { M("u1", 1, NOW - 4 * UINT64_C(1000000)), { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { X("u1", 10), A("u2", 20, 2) }, .purge_after = 3 * UINT64_C(1000000),
          .want = { { "u2", KEY_ROLE_PRIMARY, 0 } }, .purged = { "u1" }, .changed = true },
        { "purge_after never: kept however long",
          .cached = { M("u1", 1, 1), { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { A("u2", 20, 2) }, .purge_after = POLICY_PURGE_NEVER,
          .want = { { "u2", KEY_ROLE_PRIMARY, 0 }, MISSING("u1", 1) }, .changed = false },
        { "a clock set back: missing, not purged",
          .cached = { M("u1", 1, NOW + DAY), { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { A("u2", 20, 2) },
          .want = { { "u2", KEY_ROLE_PRIMARY, 0 }, MISSING("u1", NOW + DAY) }, .changed = false },
        { "a missing version reappears Deactivated: retired again",
          .cached = { M("u1", 1, NOW - HOUR), { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { D("u1", 10, 1), A("u2", 20, 2) },
          .want = { { "u1", KEY_ROLE_RETIRED, 0 }, { "u2", KEY_ROLE_PRIMARY, 0 } }, .changed = true },
        { "a missing version reappears as the newest Active: primary again",
          .cached = { { "u1", KEY_ROLE_RETIRED, 1, NULL, 0 }, M("u2", 2, NOW - HOUR) },
          .central = { A("u1", 10, 1), A("u2", 20, 2) },
          .want = { { "u1", KEY_ROLE_RETIRED, 0 }, { "u2", KEY_ROLE_PRIMARY, 0 } }, .changed = true },
        { "a missing version Compromised: purged at once",
          .cached = { M("u1", 1, NOW - HOUR), { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { C("u1", 10), A("u2", 20, 2) },
          .want = { { "u2", KEY_ROLE_PRIMARY, 0 } }, .purged = { "u1" }, .changed = true },
        { "a Destroyed version never cached: nothing to do",
          .cached = { { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { X("u1", 10), A("u2", 20, 2) },
          .want = { { "u2", KEY_ROLE_PRIMARY, 0 } }, .changed = false },
        { "an empty answer: refused, nothing purged, nothing missing",
          .cached = { { "u1", KEY_ROLE_RETIRED, 1, NULL, 0 }, { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .error = -ENODATA, .err = "located none of the 2 cached versions" },
        { "an answer that locates none of the cached versions: refused",
          .cached = { { "u1", KEY_ROLE_PRIMARY, 1, NULL, 0 } },
          .central = { A("u9", 90, 9) },
          .error = -ENODATA, .err = "wrong key_group" },
        { "an empty answer while every cached version is missing already: refused",
          .cached = { M("u1", 1, NOW - HOUR) }, .error = -ENODATA, .err = "empty central database" },
        { "more than max_missing_share at once: refused, Compromised not purged either",
          .cached = { { "u1", KEY_ROLE_RETIRED, 1, NULL, 0 }, { "u2", KEY_ROLE_RETIRED, 2, NULL, 0 },
                      { "u3", KEY_ROLE_RETIRED, 3, NULL, 0 }, { "u4", KEY_ROLE_RETIRED, 4, NULL, 0 },
                      { "u5", KEY_ROLE_PRIMARY, 5, NULL, 0 } },
          .central = { X("u1", 10), C("u4", 40), A("u5", 50, 5) },
          .error = -ENODATA, .err = "3 of the 5 cached versions of key group " GROUP " would go missing" },
        { "exactly max_missing_share at once: accepted",
          .cached = { { "u1", KEY_ROLE_RETIRED, 1, NULL, 0 }, { "u2", KEY_ROLE_RETIRED, 2, NULL, 0 },
                      { "u3", KEY_ROLE_RETIRED, 3, NULL, 0 }, { "u4", KEY_ROLE_PRIMARY, 4, NULL, 0 } },
          .central = { X("u1", 10), D("u3", 30, 3), A("u4", 40, 4) },
          .want = { MISSING("u1", NOW), { "u3", KEY_ROLE_RETIRED, 0 }, { "u4", KEY_ROLE_PRIMARY, 0 },
                    MISSING("u2", NOW) },
          .missing = { "u1", "u2" }, .changed = true },
        { "max_missing_share 100%: the last Active may go missing",
          .cached = { { "u1", KEY_ROLE_PRIMARY, 1, NULL, 0 } }, .share = 100,
          .central = { X("u1", 10) },
          .want = { MISSING("u1", NOW) }, .missing = { "u1" }, .changed = true },
        { "max_missing_share 0%: any version going missing refuses the sync",
          .cached = { { "u1", KEY_ROLE_RETIRED, 1, NULL, 0 }, { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { A("u2", 20, 2) }, .share = -1,
          .error = -ENODATA, .err = "max_missing_share = 0%" },
        { "versions missing already do not count toward the share",
          .cached = { M("u1", 1, NOW - HOUR), M("u2", 2, NOW - HOUR), { "u3", KEY_ROLE_PRIMARY, 3, NULL, 0 } },
          .central = { A("u3", 30, 3) },
          .want = { { "u3", KEY_ROLE_PRIMARY, 0 }, MISSING("u1", NOW - HOUR), MISSING("u2", NOW - HOUR) },
          .changed = false },
        { "only local versions cached: an empty answer is no refusal",
          .cached = { { "", KEY_ROLE_PRIMARY, 9, "local:aa.0000000000000000", 0 } },
          .want = { { "local:aa.0000000000000000", KEY_ROLE_RETIRED, 0 } }, .changed = true },
        { "a cached version no longer AES-256: refused, cache kept",
          .cached = { { "u1", KEY_ROLE_PRIMARY, 1, NULL, 0 } },
          .central = { { .uid = "u1", .state = CENTRAL_STATE_ACTIVE, .created = 10, .not_aes = true } },
          .error = -EPROTO, .err = "central key u1 is cached as an AES-256 key" },
        { "a Compromised version never cached: nothing to do",
          .cached = { { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 } },
          .central = { C("u1", 10), A("u2", 20, 2) },
          .want = { { "u2", KEY_ROLE_PRIMARY, 0 } }, .changed = false },
        { "a non-AES-256 key in the group is ignored",
          .central = { A("u1", 10, 1), { .uid = "des", .state = CENTRAL_STATE_ACTIVE, .created = 30, .not_aes = true } },
          .want = { { "u1", KEY_ROLE_PRIMARY, 0 } }, .ignored = "des", .changed = true },
        { "local keys stay, retired, after joining a fleet",
          .cached = { { "", KEY_ROLE_PRIMARY, 9, "local:aa.0000000000000000", 0 } },
          .central = { A("u1", 10, 1) },
          .want = { { "u1", KEY_ROLE_PRIMARY, 0 }, { "local:aa.0000000000000000", KEY_ROLE_RETIRED, 0 } },
          .changed = true },
};

static const struct policy_options default_options = { .purge_after_usec = WEEK, .max_missing_percent = 50 };

static void fill(uint8_t *kek, uint8_t v) {
        memset(kek, v, AES256_KEY_SIZE);
}

static void central_id_of(const char *uid, const uint8_t *kek, char *out, size_t size) {
        char identity[KEY_ID_MAX];

        assert_int_equal(policy_central_identity(GROUP, uid, identity, sizeof(identity)), 0);
        assert_int_equal(key_id_make(identity, kek, out, size), 0);
}

static struct keyring *make_cached(const struct cached *rows, uint8_t (*keks)[AES256_KEY_SIZE]) {
        struct key_version kv[MAX_ROWS];
        struct keyring *kr = NULL;
        size_t n = 0;

        for (; n < MAX_ROWS && rows[n].uid; n++) {
                kv[n] = (struct key_version) { .role = rows[n].role, .created_usec = n + 1,
                                               .first_seen_usec = 1000 + n,
                                               .missing_since_usec = rows[n].since, .kek = keks[n] };
                fill(keks[n], rows[n].fill);
                if (*rows[n].uid) {
                        snprintf(kv[n].central_id, sizeof(kv[n].central_id), "%s", rows[n].uid);
                        central_id_of(rows[n].uid, keks[n], kv[n].id, sizeof(kv[n].id));
                } else
                        snprintf(kv[n].id, sizeof(kv[n].id), "%s", rows[n].local_id);
        }
        if (n == 0)
                return NULL;
        assert_int_equal(keyring_new(kv, n, &kr), 0);
        return kr;
}

static const char *name_of(const struct key_version *k) {
        return *k->central_id ? k->central_id : k->id;
}

static void run_case(const struct policy_case *t) {
        uint8_t cached_keks[MAX_ROWS][AES256_KEY_SIZE], central_keks[MAX_ROWS][AES256_KEY_SIZE];
        struct central_key keys[MAX_ROWS] = {};
        _cleanup_(keyring_unrefp) struct keyring *old = make_cached(t->cached, cached_keks);
        struct policy_options opt = {
                .purge_after_usec = t->purge_after ? t->purge_after : WEEK,
                .max_missing_percent = t->share < 0 ? 0 : t->share ? (unsigned) t->share : 50,
        };
        struct policy_result res;
        size_t n = 0, n_want = 0, n_purged = 0, purged = 0, n_missing = 0, missing = 0, ignored = 0;
        char err[512] = "";

        print_message("case: %s\n", t->name);
        for (; n < MAX_ROWS && t->central[n].uid; n++) {
                const struct answer *a = &t->central[n];

                snprintf(keys[n].uid, sizeof(keys[n].uid), "%s", a->uid);
                keys[n].state = a->state;
                keys[n].created_usec = a->created;
                keys[n].is_aes256 = !a->not_aes;
                if (central_state_has_material(a->state) && !a->not_aes) {
                        fill(central_keks[n], a->fill);
                        keys[n].kek = central_keks[n];
                }
        }
        while (n_want < MAX_ROWS && t->want[n_want].name)
                n_want++;
        while (n_purged < MAX_ROWS && t->purged[n_purged])
                n_purged++;
        while (n_missing < MAX_ROWS && t->missing[n_missing])
                n_missing++;

        if (t->error) {
                assert_int_equal(policy_apply(GROUP, keys, n, old, NOW, &opt, &res, err, sizeof(err)), t->error);
                if (!strstr(err, t->err))
                        print_error("err \"%s\" lacks \"%s\"\n", err, t->err);
                assert_non_null(strstr(err, t->err));
                assert_null(res.versions);
                assert_null(res.changes);
                assert_false(res.changed);
                return;
        }
        assert_int_equal(policy_apply(GROUP, keys, n, old, NOW, &opt, &res, err, sizeof(err)), 0);
        assert_int_equal(res.changed, t->changed);
        assert_int_equal(res.n_versions, n_want);
        for (size_t i = 0; i < n_want; i++) {
                const struct key_version *k = &res.versions[i];
                const struct key_version *prev = old ? keyring_find(old, k->id) : NULL;

                assert_string_equal(name_of(k), t->want[i].name);
                assert_int_equal(k->role, t->want[i].role);
                assert_int_equal(k->missing_since_usec, t->want[i].since);
                /* first seen: kept for a cached version, now for a new one */
                assert_int_equal(k->first_seen_usec, prev ? prev->first_seen_usec : NOW);
                if (*k->central_id) {
                        char id[KEY_ID_MAX];

                        central_id_of(k->central_id, k->kek, id, sizeof(id));
                        assert_string_equal(k->id, id);
                }
        }
        for (size_t i = 0; i < res.n_changes; i++) {
                const struct policy_change *c = &res.changes[i];

                if (c->event == POLICY_PURGED) {
                        assert_true(purged < n_purged);
                        assert_string_equal(*c->central_id ? c->central_id : c->id, t->purged[purged]);
                        purged++;
                } else if (c->event == POLICY_MISSING) {
                        assert_true(missing < n_missing);
                        assert_string_equal(c->central_id, t->missing[missing]);
                        assert_int_equal(c->to, KEY_ROLE_MISSING);
                        assert_int_equal(c->missing_since_usec, NOW);
                        assert_non_null(strstr(c->why, "central KMS"));
                        missing++;
                } else if (c->event == POLICY_IGNORED) {
                        assert_non_null(t->ignored);
                        assert_string_equal(c->central_id, t->ignored);
                        ignored++;
                }
        }
        assert_int_equal(purged, n_purged);
        assert_int_equal(missing, n_missing);
        assert_int_equal(ignored, t->ignored ? 1 : 0);
        policy_result_done(&res);
}

static void test_policy_apply_table(void **state) {
        for (size_t i = 0; i < ARRAY_SIZE(cases); i++)
                run_case(&cases[i]);
}

static void test_policy_apply_change_events(void **state) {
        /* Staged -> primary and primary -> retired are reported as role
         * changes with both roles; a new version as added. */
        static const struct cached cached[MAX_ROWS] = { { "u1", KEY_ROLE_PRIMARY, 1, NULL, 0 }, { "u2", KEY_ROLE_STAGED, 2, NULL, 0 } };
        uint8_t keks[MAX_ROWS][AES256_KEY_SIZE], k1[AES256_KEY_SIZE], k2[AES256_KEY_SIZE], k3[AES256_KEY_SIZE];
        _cleanup_(keyring_unrefp) struct keyring *old = make_cached(cached, keks);
        struct central_key keys[3] = {
                { .uid = "u1", .state = CENTRAL_STATE_ACTIVE, .created_usec = 10, .is_aes256 = true, .kek = k1 },
                { .uid = "u2", .state = CENTRAL_STATE_ACTIVE, .created_usec = 20, .is_aes256 = true, .kek = k2 },
                { .uid = "u3", .state = CENTRAL_STATE_PRE_ACTIVE, .created_usec = 30, .is_aes256 = true, .kek = k3 },
        };
        struct policy_result res;
        bool seen[3] = {};

        fill(k1, 1);
        fill(k2, 2);
        fill(k3, 3);
        assert_int_equal(policy_apply(GROUP, keys, 3, old, NOW, &default_options, &res, NULL, 0), 0);
        assert_int_equal(res.n_changes, 3);
        for (size_t i = 0; i < res.n_changes; i++) {
                const struct policy_change *c = &res.changes[i];

                if (strcmp(c->central_id, "u1") == 0) {
                        assert_int_equal(c->event, POLICY_ROLE_CHANGED);
                        assert_int_equal(c->from, KEY_ROLE_PRIMARY);
                        assert_int_equal(c->to, KEY_ROLE_RETIRED);
                        seen[0] = true;
                } else if (strcmp(c->central_id, "u2") == 0) {
                        assert_int_equal(c->event, POLICY_ROLE_CHANGED);
                        assert_int_equal(c->from, KEY_ROLE_STAGED);
                        assert_int_equal(c->to, KEY_ROLE_PRIMARY);
                        seen[1] = true;
                } else {
                        assert_string_equal(c->central_id, "u3");
                        assert_int_equal(c->event, POLICY_ADDED);
                        assert_int_equal(c->to, KEY_ROLE_STAGED);
                        seen[2] = true;
                }
        }
        assert_true(seen[0] && seen[1] && seen[2]);
        policy_result_done(&res);
}

static void test_policy_apply_material_changed_refused(void **state) {
        static const struct cached cached[MAX_ROWS] = { { "u1", KEY_ROLE_PRIMARY, 1, NULL, 0 } };
        uint8_t keks[MAX_ROWS][AES256_KEY_SIZE], other[AES256_KEY_SIZE];
        _cleanup_(keyring_unrefp) struct keyring *old = make_cached(cached, keks);
        struct central_key key = { .uid = "u1", .state = CENTRAL_STATE_ACTIVE, .created_usec = 10,
                                   .is_aes256 = true, .kek = other };
        struct policy_result res;
        char err[256] = "";

        fill(other, 0x55);
        assert_int_equal(policy_apply(GROUP, &key, 1, old, NOW, &default_options, &res, err, sizeof(err)), -EBADMSG);
        assert_non_null(strstr(err, "key material of central key u1 changed"));
        assert_non_null(res.conflict);
        assert_string_equal(res.conflict->central_id, "u1");
        assert_null(res.versions);
        assert_int_equal(res.n_versions, 0);
}

/* A version whose material the fetch did not ask for again (material_held)
 * keeps the cached material and key id; one not cached cannot be held. */
static void test_policy_apply_material_held(void **state) {
        static const struct cached cached[MAX_ROWS] = { { "u1", KEY_ROLE_STAGED, 1, NULL, 0 } };
        uint8_t keks[MAX_ROWS][AES256_KEY_SIZE];
        _cleanup_(keyring_unrefp) struct keyring *old = make_cached(cached, keks);
        struct central_key key = { .uid = "u1", .state = CENTRAL_STATE_ACTIVE, .created_usec = 10,
                                   .is_aes256 = true, .material_held = true };
        struct policy_result res;
        char err[256] = "";

        assert_int_equal(policy_apply(GROUP, &key, 1, old, NOW, &default_options, &res, err, sizeof(err)), 0);
        assert_int_equal(res.n_versions, 1);
        assert_int_equal(res.versions[0].role, KEY_ROLE_PRIMARY);
        assert_ptr_equal(res.versions[0].kek, keyring_get(old, 0)->kek);
        assert_string_equal(res.versions[0].id, keyring_get(old, 0)->id);
        assert_true(res.changed);
        policy_result_done(&res);

        /* the same answer with the material fetched again and equal: the same */
        uint8_t again[AES256_KEY_SIZE];
        memcpy(again, keyring_get(old, 0)->kek, sizeof(again));
        key.material_held = false;
        key.kek = again;
        assert_int_equal(policy_apply(GROUP, &key, 1, old, NOW, &default_options, &res, err, sizeof(err)), 0);
        assert_string_equal(res.versions[0].id, keyring_get(old, 0)->id);
        policy_result_done(&res);

        key = (struct central_key) { .uid = "u9", .state = CENTRAL_STATE_ACTIVE, .created_usec = 10,
                                     .is_aes256 = true, .material_held = true };
        struct central_key both[2] = { { .uid = "u1", .state = CENTRAL_STATE_ACTIVE, .created_usec = 10,
                                         .is_aes256 = true, .material_held = true }, key };
        assert_int_equal(policy_apply(GROUP, both, 2, old, NOW, &default_options, &res, err, sizeof(err)),
                         -EINVAL);
        assert_non_null(strstr(err, "u9"));
        assert_null(res.versions);
}

static void test_policy_apply_too_many_versions(void **state) {
        size_t n = KEYRING_MAX_KEYS + 1;
        struct central_key *keys = calloc(n, sizeof(*keys));
        uint8_t *keks = calloc(n, AES256_KEY_SIZE);
        struct policy_result res;
        char err[256] = "";

        assert_non_null(keys);
        assert_non_null(keks);
        for (size_t i = 0; i < n; i++) {
                snprintf(keys[i].uid, sizeof(keys[i].uid), "u%zu", i);
                keys[i].state = CENTRAL_STATE_DEACTIVATED;
                keys[i].is_aes256 = true;
                keys[i].kek = keks + i * AES256_KEY_SIZE;
                memset(keys[i].kek, (int) (i & 0xff), AES256_KEY_SIZE);
        }
        assert_int_equal(policy_apply(GROUP, keys, n, NULL, NOW, &default_options, &res, err, sizeof(err)), -E2BIG);
        assert_non_null(strstr(err, "more than 512 usable versions in key group " GROUP));
        free(keks);
        free(keys);
}

static void test_policy_purge_missing(void **state) {
        static const struct cached cached[MAX_ROWS] = {
                M("u1", 1, NOW - HOUR), { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 }, { "u3", KEY_ROLE_RETIRED, 3, NULL, 0 },
        };
        uint8_t keks[MAX_ROWS][AES256_KEY_SIZE];
        _cleanup_(keyring_unrefp) struct keyring *old = make_cached(cached, keks);
        const struct key_version *k = keyring_get(old, 0);
        struct policy_result res;
        char err[256] = "";

        assert_string_equal(k->central_id, "u1");
        assert_int_equal(policy_purge(old, k->id, &res, err, sizeof(err)), 0);
        assert_true(res.changed);
        assert_int_equal(res.n_versions, 2);
        for (size_t i = 0; i < res.n_versions; i++)
                assert_string_not_equal(res.versions[i].id, k->id);
        assert_int_equal(res.n_changes, 1);
        assert_int_equal(res.changes[0].event, POLICY_PURGED);
        assert_string_equal(res.changes[0].id, k->id);
        assert_int_equal(res.changes[0].missing_since_usec, NOW - HOUR);
        assert_non_null(strstr(res.changes[0].why, "tpmkmsctl purge"));
        policy_result_done(&res);
}

static void test_policy_purge_refused(void **state) {
        static const struct cached cached[MAX_ROWS] = {
                { "u1", KEY_ROLE_RETIRED, 1, NULL, 0 }, { "u2", KEY_ROLE_PRIMARY, 2, NULL, 0 },
        };
        uint8_t keks[MAX_ROWS][AES256_KEY_SIZE];
        _cleanup_(keyring_unrefp) struct keyring *old = make_cached(cached, keks);
        struct policy_result res;
        char err[256] = "";

        assert_int_equal(policy_purge(old, keyring_primary(old)->id, &res, err, sizeof(err)), -EPERM);
        assert_non_null(strstr(err, "it is the primary key"));
        assert_null(res.versions);
        assert_int_equal(policy_purge(old, keyring_get(old, 0)->id, &res, err, sizeof(err)), -EPERM);
        assert_non_null(strstr(err, "it is retired, not missing"));
        assert_int_equal(policy_purge(old, "kmip:" GROUP "/nope.0123456789abcdef", &res, err, sizeof(err)),
                         -ENOENT);
        assert_non_null(strstr(err, "no key version kmip:" GROUP "/nope.0123456789abcdef in the cache"));
        assert_int_equal(policy_purge(NULL, "x", &res, err, sizeof(err)), -ENOENT);
        assert_null(res.versions);
}

static void test_policy_group_bound(void **state) {
        char group[POLICY_GROUP_ENCODED_MAX + 1], uid[CENTRAL_ID_MAX], identity[KEY_ID_MAX], id[KEY_ID_MAX];
        uint8_t kek[AES256_KEY_SIZE];

        /* the longest group with the longest plain uid makes a key id of
         * exactly KEY_ID_MAX - 1 characters */
        memset(group, 'g', sizeof(group) - 1);
        group[sizeof(group) - 1] = 0;
        memset(uid, 'u', sizeof(uid) - 1);
        uid[sizeof(uid) - 1] = 0;
        fill(kek, 7);
        assert_int_equal(policy_encoded_length(group), POLICY_GROUP_ENCODED_MAX);
        assert_int_equal(policy_encoded_length("a/b c"), 9);
        assert_int_equal(policy_central_identity(group, uid, identity, sizeof(identity)), 0);
        assert_int_equal(key_id_make(identity, kek, id, sizeof(id)), 0);
        assert_int_equal(strlen(id), KEY_ID_MAX - 1);
}

static void test_policy_central_identity_encoding(void **state) {
        char out[KEY_ID_MAX];

        assert_int_equal(policy_central_identity("g", "1f-a.B_c", out, sizeof(out)), 0);
        assert_string_equal(out, "kmip:g/1f-a.B_c");
        /* '/', ':' and '%' inside a part are encoded, so parts cannot run together */
        assert_int_equal(policy_central_identity("a/b", "c:d%", out, sizeof(out)), 0);
        assert_string_equal(out, "kmip:a%2Fb/c%3Ad%25");
        assert_int_equal(policy_central_identity("g", "u", out, 8), -ENOBUFS);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_policy_apply_table),
                cmocka_unit_test(test_policy_apply_change_events),
                cmocka_unit_test(test_policy_apply_material_changed_refused),
                cmocka_unit_test(test_policy_apply_material_held),
                cmocka_unit_test(test_policy_apply_too_many_versions),
                cmocka_unit_test(test_policy_purge_missing),
                cmocka_unit_test(test_policy_purge_refused),
                cmocka_unit_test(test_policy_group_bound),
                cmocka_unit_test(test_policy_central_identity_encoding),
        };

        if (keyring_secure_heap_init() < 0)
                return 1;
        return cmocka_run_group_tests(tests, NULL, NULL);
}
