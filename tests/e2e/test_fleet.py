#!/usr/bin/python3
"""Fleet mode: tpmkmsd hosts sync their KEK versions from a real central KMS
(PyKMIP 0.10) over KMIP with mutual TLS, and a real gRPC client checks that
the hosts agree (DESIGN.md, "Key lifecycle").

Each test has its own PyKMIP server (own port and database) and its own
hosts (temp dir, swtpm, daemon, client certificate CN=node-a / node-b); the
certificates are made once for the module. The operator is PyKMIP's own
client as CN=kms-admin, creating versions with the "shared" operation policy.

Not tested: key material that changes under the same Unique Identifier (the
daemon must refuse it). PyKMIP cannot provoke it: a Symmetric Key's value is
immutable once created or registered, and identifiers are never reused.
"""
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
import tpmkmstest_kmip as k  # noqa: E402
from grpc import StatusCode  # noqa: E402

GROUP = "cluster-a-kek"
KEY_ID_RE = re.compile(r"^kmip:%s/([A-Za-z0-9._:-]+)\.([0-9a-f]{16})$" % re.escape(GROUP))
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
NO_PRIMARY = "no primary key in the cache"
CONVERGE = 6.0      # seconds: a few sync intervals (1 s) plus a slow PyKMIP round
RECOVER = 30.0      # after an outage: exponential backoff may delay the next try
APISERVER_DEADLINE = 3.0

PKI = None


def setUpModule():
    global PKI
    PKI = k.Pki()


def tearDownModule():
    if PKI is not None:
        PKI.close()


class FleetCase(unittest.TestCase):
    """Helpers shared by the fleet tests."""

    def setUp(self):
        self.kms = k.KmipServer(PKI, self)
        self.kms.start()
        self._kcv = {}

    def host(self, cn="node-a", start=True, **kw):
        w = k.FleetWorld(self, self.kms, cn=cn, group=GROUP, **kw)
        if start:
            w.start()
        return w

    def key_id(self, uid):
        """What every host must call version uid: kmip:<group>/<uid>.<check value>,
        the check value computed here from the key material PyKMIP holds."""
        if uid not in self._kcv:     # key material never changes under a uid
            self._kcv[uid] = k.key_check_value(self.kms.get(uid))
        return "kmip:%s/%s.%s" % (GROUP, uid, self._kcv[uid])

    def wait_roles(self, hosts, want, timeout=CONVERGE):
        """Wait until every host's cache holds exactly want ({uid: role})."""
        for w in hosts:
            k.wait_for(lambda w=w: w.roles() == want, timeout,
                       "%s: cache roles %r" % (w.cn, want))

    def wait_synced(self, w, timeout=CONVERGE):
        """Wait for the host's first successful sync."""
        return k.wait_for(lambda: RFC3339.match(w.central().get("last_sync") or ""), timeout,
                          "%s: a first successful sync" % w.cn)

    def wait_primary(self, hosts, uid, timeout=CONVERGE):
        kid = self.key_id(uid)
        for w in hosts:
            stub = w.stub()
            k.wait_for(lambda: t.status(stub).key_id == kid, timeout,
                       "%s: Status key_id %s" % (w.cn, kid))
        return kid

    def assert_keys(self, w, expected):
        """status --json lists exactly expected ([(uid, role)] in Initial Date
        order) with the fleet-wide key ids."""
        keys = w.status_json()["keys"]
        self.assertEqual([(x["central_id"], x["role"]) for x in keys], expected, w.cn)
        for x in keys:
            self.assertEqual(x["id"], self.key_id(x["central_id"]), w.cn)
            self.assertRegex(x["id"], KEY_ID_RE)

    def assert_serving(self, w, key_id):
        stub = w.stub()
        st = t.status(stub)
        self.assertEqual((st.version, st.healthz, st.key_id), ("v2", "ok", key_id), w.cn)
        pt = secrets.token_bytes(32)
        r = t.encrypt(stub, pt)
        self.assertEqual(r.key_id, key_id, w.cn)
        self.assertEqual(t.decrypt(stub, r.ciphertext, r.key_id), pt, w.cn)
        return r, pt

    def seal(self, w):
        """(ciphertext, key_id, plaintext) made by host w."""
        pt = secrets.token_bytes(32)
        r = t.encrypt(w.stub(), pt)
        return r.ciphertext, r.key_id, pt

    def assert_decrypts(self, w, sealed):
        ct, kid, pt = sealed
        self.assertEqual(t.decrypt(w.stub(), ct, kid), pt, "%s: decrypt under %s" % (w.cn, kid))


class RotationTest(FleetCase):
    def test_no_key_in_group_is_unavailable(self):
        a = self.host("node-a")
        self.wait_synced(a)
        stub = a.stub()
        st = t.status(stub)
        self.assertEqual(st.version, "v2")
        self.assertEqual(st.healthz, NO_PRIMARY)
        self.assertEqual(t.rpc_code(t.encrypt, stub, secrets.token_bytes(32)),
                         StatusCode.UNAVAILABLE)
        js = a.status_json()
        self.assertEqual((js["state"], js["mode"], js["keys"]), ("serving", "kmip", []))
        ep = a.endpoint_health(self.kms.endpoint)
        self.assertEqual(ep["last_error"], "", ep)
        self.assertRegex(ep["last_success"], RFC3339)
        self.assertEqual(ep["consecutive_failures"], 0)

    def test_two_hosts_rotate_together(self):
        a = self.host("node-a")
        b = self.host("node-b")
        hosts = (a, b)

        # 1. Pre-Active: staged everywhere, decrypt-only, not the Status key_id
        v1 = self.kms.create_version(GROUP)
        self.wait_roles(hosts, {v1: "staged"})
        for w in hosts:
            self.assert_keys(w, [(v1, "staged")])
            stub = w.stub()
            st = t.status(stub)
            self.assertEqual(st.healthz, NO_PRIMARY, w.cn)
            self.assertNotEqual(st.key_id, self.key_id(v1), w.cn)
            self.assertEqual(t.rpc_code(t.encrypt, stub, b"x" * 32), StatusCode.UNAVAILABLE, w.cn)

        # 2. Activate: primary on both, the same key_id on both
        self.kms.activate(v1)
        kid1 = self.wait_primary(hosts, v1)
        self.assertRegex(kid1, KEY_ID_RE)
        self.assertEqual(KEY_ID_RE.match(kid1).group(1), v1)
        for w in hosts:
            self.assert_keys(w, [(v1, "primary")])
            self.assert_serving(w, kid1)
        s1a, s1b = self.seal(a), self.seal(b)
        self.assertEqual((s1a[1], s1b[1]), (kid1, kid1))
        self.assert_decrypts(b, s1a)
        self.assert_decrypts(a, s1b)

        # 3. The next version Pre-Active: staged, the primary does not change
        v2 = self.kms.create_version(GROUP)
        self.wait_roles(hosts, {v1: "primary", v2: "staged"})
        for w in hosts:
            self.assert_keys(w, [(v1, "primary"), (v2, "staged")])
            self.assertEqual(t.status(w.stub()).key_id, kid1, w.cn)

        # 4. Activate it: the newest Active is primary, the older Active retired
        self.kms.activate(v2)
        kid2 = self.wait_primary(hosts, v2)
        self.assertNotEqual(kid2, kid1)
        self.wait_roles(hosts, {v1: "retired", v2: "primary"})
        for w in hosts:
            self.assert_keys(w, [(v1, "retired"), (v2, "primary")])
            self.assert_serving(w, kid2)
            self.assert_decrypts(w, s1a)      # old ciphertexts still decrypt
            self.assert_decrypts(w, s1b)
        s2a, s2b = self.seal(a), self.seal(b)
        self.assertEqual((s2a[1], s2b[1]), (kid2, kid2))
        self.assert_decrypts(b, s2a)
        self.assert_decrypts(a, s2b)

        # 5. Deactivated (revoked, cessation of operation): still retired
        self.kms.deactivate(v1)
        self.assertEqual(self.kms.state(v1), "DEACTIVATED")
        time.sleep(2.5)                        # two sync intervals: nothing may change
        for w in hosts:
            self.assert_keys(w, [(v1, "retired"), (v2, "primary")])
            self.assert_decrypts(w, s1a)

        # 6. Compromised: purged on both; its ciphertexts are NOT_FOUND
        self.kms.compromise(v1)
        self.wait_roles(hosts, {v2: "primary"})
        for w in hosts:
            self.assert_keys(w, [(v2, "primary")])
            for ct, kid, _ in (s1a, s1b):
                self.assertEqual(t.rpc_code(t.decrypt, w.stub(), ct, kid), StatusCode.NOT_FOUND,
                                 "%s: decrypt under the compromised %s" % (w.cn, kid))
            self.assert_serving(w, kid2)
            self.assert_decrypts(w, s2a)

        # 7. Destroyed (a staged version withdrawn): missing, kept decrypt-only
        #    until purge_after (docs/key-lifecycle.md; it used to be purged at once)
        v3 = self.kms.create_version(GROUP)
        self.wait_roles(hosts, {v2: "primary", v3: "staged"})
        self.kms.destroy(v3)
        self.wait_roles(hosts, {v2: "primary", v3: "missing"})
        for w in hosts:
            self.assert_serving(w, kid2)
            self.assertTrue(w.alive(), w.log())

    def test_ctl_sync_syncs_now(self):
        a = self.host("node-a", sync_interval="1h")
        self.wait_synced(a)
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        r = a.ctl("sync")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.strip(), "sync printed nothing")
        self.assertNotIn("no change", r.stdout.lower())
        # synced when the command returns: no waiting for the next interval
        self.assert_keys(a, [(v1, "primary")])
        self.assert_serving(a, self.key_id(v1))
        r = a.ctl("sync")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("no change", r.stdout.lower())
        v2 = self.kms.create_version(GROUP)
        r = a.ctl("sync")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("no change", r.stdout.lower())
        self.assert_keys(a, [(v1, "primary"), (v2, "staged")])

    def test_staged_version_decrypts(self):
        """A host that synced a version while it was Pre-Active decrypts what a
        host that already promoted it encrypted (rotation's first phase)."""
        a = self.host("node-a")
        b = self.host("node-b", sync_interval="1h")
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        self.wait_primary((a,), v1)
        b.ctl("sync", check=True)
        v2 = self.kms.create_version(GROUP)
        b.ctl("sync", check=True)
        self.assert_keys(b, [(v1, "primary"), (v2, "staged")])
        self.kms.activate(v2)
        kid2 = self.wait_primary((a,), v2)
        sealed = self.seal(a)
        self.assertEqual(sealed[1], kid2)
        self.assert_decrypts(b, sealed)
        self.assert_keys(b, [(v1, "primary"), (v2, "staged")])    # b has not synced since
        self.assertEqual(t.status(b.stub()).key_id, self.key_id(v1))

    def test_key_material_changed_under_same_uid(self):
        self.skipTest("PyKMIP cannot change a key's material under the same Unique "
                      "Identifier (values are immutable, identifiers never reused)")


class OutageTest(FleetCase):
    def test_central_down_keeps_serving_then_resumes(self):
        a = self.host("node-a")
        b = self.host("node-b")
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        kid1 = self.wait_primary((a, b), v1)
        sealed = self.seal(a)

        self.kms.stop()
        t_stop = time.monotonic()
        for w in (a, b):
            self.assert_serving(w, kid1)
        for w in (a, b):
            ep = k.wait_for(lambda w=w: (lambda e: e if e["last_error"] else None)(
                w.endpoint_health(self.kms.endpoint)), CONVERGE,
                "%s: the endpoint's failure in status --json" % w.cn)
            self.assertGreaterEqual(ep["consecutive_failures"], 1, ep)
            self.assertRegex(ep["last_success"], RFC3339, ep)
            # the backoff is visible: in --json, and in words
            self.assertIn("backoff_seconds", ep)
            k.wait_for(lambda w=w: "(backoff)" in w.ctl("status", check=True).stdout, CONVERGE,
                       "%s: status names the endpoint's backoff" % w.cn)
        for w in (a, b):
            c = w.central()
            self.assertRegex(c["last_sync"], RFC3339, c)
            s0 = c["staleness_seconds"]
            self.assertIsInstance(s0, (int, float))
            self.assertGreaterEqual(s0, 0)
            k.wait_for(lambda w=w, s0=s0: w.central()["staleness_seconds"] > s0, 4.0,
                       "%s: staleness growing past %r" % (w.cn, s0))
            # still fully serving, cross-host too, Status healthy
            self.assert_serving(w, kid1)
            self.assert_decrypts(w, sealed)
            self.assertTrue(w.alive(), w.log())
        # and still after more than a second of outage
        while time.monotonic() - t_stop <= 1.0:
            time.sleep(0.05)
        for w in (a, b):
            self.assert_serving(w, kid1)

        self.kms.start()
        v2 = self.kms.create_version(GROUP)
        for w in (a, b):
            k.wait_for(lambda w=w: w.endpoint_health(self.kms.endpoint)["last_error"] == "",
                       RECOVER, "%s: sync resumed (last_error empty)" % w.cn)
        self.wait_roles((a, b), {v1: "primary", v2: "staged"}, RECOVER)
        for w in (a, b):
            ep = w.endpoint_health(self.kms.endpoint)
            self.assertEqual(ep["consecutive_failures"], 0, ep)
            self.assertLess(w.central()["staleness_seconds"], 5, w.central())
            self.assert_serving(w, kid1)

    def test_max_staleness_stops_encrypt_until_recovery(self):
        a = self.host("node-a", max_staleness="3s")
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        kid1 = self.wait_primary((a,), v1)
        sealed = self.seal(a)
        stub = a.stub()

        self.kms.stop()
        t_stop = time.monotonic()
        self.assertEqual(t.status(stub).healthz, "ok")      # not stale yet
        st = k.wait_for(lambda: (lambda s: s if s.healthz != "ok" else None)(t.status(stub)),
                        15, "healthz no longer ok with max_staleness = 3s")
        self.assertGreater(time.monotonic() - t_stop, 1.5,
                           "unhealthy before max_staleness could have passed")
        self.assertTrue(st.healthz.startswith("central KMS unreachable"), st.healthz)
        self.assertEqual(t.rpc_code(t.encrypt, stub, secrets.token_bytes(32)),
                         StatusCode.UNAVAILABLE)
        self.assertTrue(a.alive(), a.log())

        self.kms.start()
        k.wait_for(lambda: t.status(stub).healthz == "ok", RECOVER,
                   "healthz ok again after the central KMS is back")
        self.assert_serving(a, kid1)
        self.assert_decrypts(a, sealed)

    def test_failover_to_second_endpoint(self):
        dead = "127.0.0.1:%d" % k.dead_port()
        a = self.host("node-a", endpoints=[dead, self.kms.endpoint])
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        kid1 = self.wait_primary((a,), v1)
        self.assert_serving(a, kid1)
        eps = a.central()["endpoints"]
        self.assertEqual([e["name"] for e in eps], [dead, self.kms.endpoint])
        bad, good = eps
        self.assertNotEqual(bad["last_error"], "", bad)
        self.assertGreaterEqual(bad["consecutive_failures"], 1, bad)
        self.assertEqual(bad["last_success"], "", bad)
        self.assertEqual(good["last_error"], "", good)
        self.assertRegex(good["last_success"], RFC3339, good)


class TlsTest(FleetCase):
    """A broken TLS setup: the daemon stays up, says what is wrong for the
    endpoint, and keeps serving the keys it cached with a good one."""

    def cached_then_broken(self, breaker, error_re):
        a = self.host("node-a")
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        kid1 = self.wait_primary((a,), v1)
        sealed = self.seal(a)
        self.assertEqual(a.stop_daemon(), 0, a.log())
        breaker(a)
        a.write_config()
        log_off = self.kms.log_offset()
        a.start_daemon()
        v2 = self.kms.create_version(GROUP)     # must not reach this host
        ep = k.wait_for(lambda: (lambda e: e if e["last_error"] else None)(
            a.endpoint_health(self.kms.endpoint)), CONVERGE,
            "an endpoint error in status --json")
        if os.environ.get("TPMKMS_VERBOSE"):
            sys.stderr.write("\n%s: %s\n" % (self.id(), ep["last_error"]))
        self.assertRegex(ep["last_error"], error_re, ep)
        self.assertGreaterEqual(ep["consecutive_failures"], 1, ep)
        time.sleep(1.5)                          # a few more failed rounds
        self.assertTrue(a.alive(), a.log())
        self.assert_keys(a, [(v1, "primary")])
        self.assert_serving(a, kid1)
        self.assert_decrypts(a, sealed)
        self.assertNotIn(v2, a.roles())
        return log_off

    def test_wrong_ca(self):
        def breaker(a):
            a.ca = PKI.crt("ca2")
        self.cached_then_broken(breaker, re.compile(r"verif(y|ication) fail", re.I))

    def test_client_cert_rejected(self):
        def breaker(a):
            a.cert, a.key = PKI.crt("noeku"), PKI.key("noeku")
        self.cached_then_broken(
            breaker, re.compile(r"authenticat|client certificate|handshake", re.I))

    def test_server_cert_for_another_name(self):
        def breaker(a):
            self.kms.restart(server_cert="server-other")
        self.cached_then_broken(breaker, re.compile(r"mismatch", re.I))


class OnDemandTest(FleetCase):
    def test_unknown_key_id_syncs_on_demand(self):
        a = self.host("node-a")
        b = self.host("node-b", sync_interval="1h")
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        self.wait_primary((a,), v1)
        b.ctl("sync", check=True)
        self.assert_keys(b, [(v1, "primary")])
        v2 = self.kms.create_version(GROUP)
        self.kms.activate(v2)
        kid2 = self.wait_primary((a,), v2)
        self.assertNotIn(v2, b.roles())          # b has not seen v2
        ct, kid, pt = self.seal(a)
        self.assertEqual(kid, kid2)
        t0 = time.monotonic()
        got = t.decrypt(b.stub(), ct, kid, timeout=APISERVER_DEADLINE)
        self.assertLess(time.monotonic() - t0, APISERVER_DEADLINE)
        self.assertEqual(got, pt)
        self.assertEqual(b.roles(), {v1: "retired", v2: "primary"})

    def test_unknown_key_id_not_found_and_rate_limited(self):
        b = self.host("node-b", sync_interval="1h")
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        b.ctl("sync", check=True)
        kid1 = self.key_id(v1)
        self.assert_serving(b, kid1)
        ct, _, _ = self.seal(b)
        time.sleep(0.5)                          # let the last session's lines land
        off = self.kms.log_offset()
        on_demand0 = b.central().get("on_demand")
        daemon_log_off = len(b.log())
        bogus = "kmip:%s/%s.%s" % (GROUP, "999999", "0123456789abcdef")
        stub = b.stub()
        t0 = time.monotonic()
        codes = []
        for _ in range(20):
            s = time.monotonic()
            codes.append(t.rpc_code(t.decrypt, stub, ct, bogus, timeout=APISERVER_DEADLINE))
            self.assertLess(time.monotonic() - s, APISERVER_DEADLINE)
        burst = time.monotonic() - t0
        self.assertEqual(codes, [StatusCode.NOT_FOUND] * 20)
        self.assertLess(burst, 2.5, "20 unknown-id Decrypts took %.1fs" % burst)
        time.sleep(1.0)                          # any sync the burst triggered has run
        syncs = self.kms.sessions_from("node-b", off)
        lines = [ln for ln in b.log()[daemon_log_off:].splitlines() if re.search("sync", ln, re.I)]
        self.assertGreaterEqual(len(syncs), 1,
                                "an unknown key id triggered no sync; daemon log:\n%s"
                                % "\n".join(lines))
        self.assertLessEqual(len(syncs), 2,
                             "%d KMIP connections for 20 unknown-id Decrypts in %.1fs; "
                             "daemon log:\n%s" % (len(syncs), burst, "\n".join(lines)))
        on_demand = [ln for ln in lines if re.search(r"demand", ln, re.I)]
        self.assertLessEqual(len(on_demand), 2, "\n".join(lines))
        if on_demand0 is not None:               # status --json counts them too
            self.assertLessEqual(b.central()["on_demand"] - on_demand0, 2, b.central())
        self.assert_serving(b, kid1)


class InProgressSyncTest(FleetCase):
    """A sync that started before a request cannot answer it: it may have
    read the key group before the change the request is about. A proxy stalls
    a sync after the server answered its Locate (the answer held on its way
    to the host); meanwhile the central KMS changes."""

    def stalled_host(self, cn, **kw):
        self.proxy = k.HoldingProxy(self.kms.port)
        self.addCleanup(self.proxy.close)
        return self.host(cn, endpoints=[self.proxy.endpoint], sync_interval="1h",
                         timeout="10s", **kw)

    def stall_a_sync(self, w):
        """Start a sync on w (tpmkmsctl sync, in the background) and hold it
        after its Locate was answered. Returns the tpmkmsctl process."""
        off = self.kms.log_offset()
        self.proxy.arm(1)
        p = subprocess.Popen([w.tpmkmsctl, "--config", w.config, "sync"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(p.wait)
        self.addCleanup(self.proxy.release)
        self.assertTrue(self.proxy.held.wait(5), "the proxy never held the sync")
        time.sleep(0.2)
        # the harness's own precondition: the stalled sync has read the group
        self.assertEqual(self.kms.operations("Locate", off), 1, self.kms.log(off))
        return p

    def test_ctl_sync_waits_for_a_sync_that_started_after_it(self):
        a = self.stalled_host("node-a")
        v0 = self.kms.create_version(GROUP)
        self.kms.activate(v0)
        a.ctl("sync", check=True)
        self.assertEqual(a.roles(), {v0: "primary"})
        first = self.stall_a_sync(a)
        v1 = self.kms.create_version(GROUP)         # after the stalled sync's Locate
        second = subprocess.Popen([a.tpmkmsctl, "--config", a.config, "sync"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)                              # the request reaches the daemon
        self.proxy.release()
        out, err = second.communicate(timeout=30)
        roles = a.roles()
        self.assertEqual(second.returncode, 0, err)
        self.assertIn(v1, roles, "`tpmkmsctl sync` returned (%r) before a sync that started "
                      "after it: the version created before the command is missing" % out)
        first.communicate(timeout=30)

    def test_on_demand_decrypt_does_not_settle_for_an_older_sync(self):
        a = self.host("node-a")
        b = self.stalled_host("node-b")
        v0 = self.kms.create_version(GROUP)
        self.kms.activate(v0)
        self.wait_primary((a,), v0)
        b.ctl("sync", check=True)
        self.stall_a_sync(b)
        v1 = self.kms.create_version(GROUP)         # after b's stalled Locate
        self.kms.activate(v1)
        kid1 = self.wait_primary((a,), v1)
        ct, kid, pt = self.seal(a)
        self.assertEqual(kid, kid1)
        result = {}

        def call():
            t0 = time.monotonic()
            try:
                result["pt"] = t.decrypt(b.stub(), ct, kid, timeout=APISERVER_DEADLINE)
            except t.grpc.RpcError as e:
                result["code"] = e.code()
            result["t"] = time.monotonic() - t0
        th = threading.Thread(target=call)
        th.start()
        time.sleep(0.3)                              # parked behind the stalled sync
        self.proxy.release()
        th.join(10)
        self.assertEqual(result.get("pt"), pt,
                         "Decrypt for a version created before it: %r (the on-demand sync "
                         "joined a sync that had read the group before)" % result)


class MissingTest(FleetCase):
    """A key leaves a cache only when the central KMS clearly says so
    (docs/key-lifecycle.md): Destroyed or no longer located -> missing
    (decrypt-only, an alarm), purged after purge_after or tpmkmsctl purge;
    an answer that locates none of the cached versions changes nothing."""

    def missing_line(self, w, kid):
        return [ln for ln in w.log().splitlines() if "ALARM" in ln and kid in ln and "missing" in ln]

    def two_versions_second_sealed(self, w):
        """v1 primary, v2 retired (activated, then deactivated), a ciphertext
        sealed under v2 while it was primary."""
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        v2 = self.kms.create_version(GROUP)
        self.kms.activate(v2)
        self.wait_primary((w,), v2)
        sealed = self.seal(w)
        self.kms.deactivate(v2)
        self.wait_roles((w,), {v1: "primary", v2: "retired"})
        return v1, v2, sealed

    def test_destroyed_goes_missing_then_purged_after_purge_after(self):
        a = self.host("node-a", purge_after="3s")
        v1, v2, sealed = self.two_versions_second_sealed(a)
        kid2 = self.key_id(v2)
        self.kms.destroy(v2)
        self.wait_roles((a,), {v1: "primary", v2: "missing"})
        t_missing = time.monotonic()
        k2 = a.keys()[v2]
        self.assertRegex(k2["missing_since"], RFC3339, k2)
        self.assertEqual(a.keys()[v1]["missing_since"], "")
        self.assert_decrypts(a, sealed)                 # missing still decrypts
        self.assert_serving(a, self.key_id(v1))
        self.assertTrue(self.missing_line(a, kid2), "no missing alarm for %s in:\n%s" % (kid2, a.log()))
        text = a.ctl("status", check=True).stdout
        self.assertRegex(text, r"missing\s+%s .*MISSING since \d{4}-" % re.escape(kid2), text)
        # purged once missing for purge_after (3 s), at a later sync
        self.wait_roles((a,), {v1: "primary"}, CONVERGE)
        self.assertGreaterEqual(time.monotonic() - t_missing, 2.0)
        self.assertEqual(t.rpc_code(t.decrypt, a.stub(), sealed[0], kid2), StatusCode.NOT_FOUND)
        purged = [ln for ln in a.log().splitlines() if kid2 in ln and "purged from the cache" in ln]
        self.assertTrue(purged and "purge_after" in purged[-1], a.log())
        self.assertEqual(len(self.missing_line(a, kid2)), 1, "the alarm is raised once")
        # compromised: purged at the next sync, no grace
        self.kms.compromise(v1)
        a.ctl("sync")
        self.assertEqual(a.roles(), {})
        self.assertTrue(a.alive(), a.log())

    def test_empty_central_database_purges_nothing(self):
        a = self.host("node-a")
        v1, v2, sealed = self.two_versions_second_sealed(a)
        kid1 = self.key_id(v1)
        self.kms.restart_empty()
        self.assertEqual(self.kms.locate(GROUP), [])
        err = k.wait_for(lambda: (lambda e: e if "located none" in e else None)(a.central()["last_error"]),
                         RECOVER, "the sync error after the empty restart")
        self.assertIn("located none of the 2 cached versions of key group %s" % GROUP, err)
        for cause in ("restored or empty central database", "access policy", "key_group"):
            self.assertIn(cause, err)
        time.sleep(2.5)                                 # more syncs: still nothing changes
        self.assertEqual(a.roles(), {v1: "primary", v2: "retired"})
        self.assertTrue(all(x["missing_since"] == "" for x in a.status_json()["keys"]))
        self.assertNotIn("purged from the cache", a.log())
        self.assertFalse(self.missing_line(a, kid1))
        self.assert_serving(a, kid1)
        self.assert_decrypts(a, sealed)
        r = a.ctl("sync")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("located none of the 2 cached versions", r.stderr)
        self.assertIn("ALARM: sync with the central KMS refused", a.log())
        # a restart reads the same cache: still both versions
        a.restart_daemon()
        self.assertEqual(a.roles(), {v1: "primary", v2: "retired"})
        self.assert_decrypts(a, sealed)

    def test_ctl_purge_missing_refuses_primary_and_unknown(self):
        a = self.host("node-a", purge_after="never")
        v1, v2, sealed = self.two_versions_second_sealed(a)
        kid1, kid2 = self.key_id(v1), self.key_id(v2)
        self.kms.destroy(v2)
        self.wait_roles((a,), {v1: "primary", v2: "missing"})
        since = a.keys()[v2]["missing_since"]
        # the role and missing_since survive a restart (cache records)
        a.restart_daemon()
        self.assertEqual(a.roles(), {v1: "primary", v2: "missing"})
        self.assertEqual(a.keys()[v2]["missing_since"], since)
        self.assert_decrypts(a, sealed)
        r = a.ctl("purge", kid1)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("refusing to purge %s: it is the primary key" % kid1, r.stderr)
        r = a.ctl("purge", "kmip:%s/424242.0123456789abcdef" % GROUP)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("no key version kmip:%s/424242.0123456789abcdef in the cache" % GROUP, r.stderr)
        r = a.ctl("purge")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("usage: purge KEY_ID", r.stderr)
        self.assertEqual(a.roles(), {v1: "primary", v2: "missing"})
        r = a.ctl("purge", kid2)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("%s purged" % kid2, r.stdout)
        self.assertEqual(a.roles(), {v1: "primary"})
        self.assertEqual(t.rpc_code(t.decrypt, a.stub(), sealed[0], kid2), StatusCode.NOT_FOUND)
        a.restart_daemon()
        self.assertEqual(a.roles(), {v1: "primary"})
        self.assert_serving(a, kid1)


class CrashTest(FleetCase):
    def test_kill9_during_syncs_loses_no_key(self):
        """kill -9 at random moments of syncs that add a version each: the
        host always comes back serving, and every ciphertext it ever handed
        out still decrypts."""
        rng = random.Random(9)
        a = self.host("node-a")
        v = self.kms.create_version(GROUP)
        self.kms.activate(v)
        self.wait_primary((a,), v)
        sealed = [self.seal(a)]
        for i in range(20):
            nv = self.kms.create_version(GROUP)
            self.kms.activate(nv)
            proc = a.ctl_async("sync")
            time.sleep(rng.uniform(0, 0.05))
            a.signal(9)
            a.proc.wait()
            a.proc = None
            proc.wait(30)
            a.start_daemon()
            st = t.status(a.stub())
            self.assertEqual(st.healthz, "ok", "round %d:\n%s" % (i, a.log()))
            for s in sealed:
                self.assert_decrypts(a, s)
            sealed.append(self.seal(a))
        self.wait_primary((a,), nv)


class RollbackTest(FleetCase):
    def test_state_dir_from_before_a_compromise_refused_while_central_down(self):
        """A copy of the state dir taken before a version was revoked as
        compromised, put back while the central KMS is unreachable, must not
        make the host serve that version again (docs/threat-model.md)."""
        a = self.host("node-a")
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        v2 = self.kms.create_version(GROUP)
        self.kms.activate(v2)
        kid2 = self.wait_primary((a,), v2)
        sealed = self.seal(a)                    # under v2, soon compromised
        backup = os.path.join(a.dir, "backup")
        shutil.copytree(a.state_dir, backup)
        self.kms.compromise(v2)
        self.wait_roles((a,), {v1: "primary"})
        self.assertEqual(a.stop_daemon(), 0, a.log())

        self.kms.stop()                          # the central KMS is down
        shutil.rmtree(a.state_dir)
        shutil.copytree(backup, a.state_dir)
        a.write_config()
        a.start_daemon()
        stub = a.stub()
        st = t.status(stub)
        self.assertTrue(st.healthz.startswith("sealed cache: an older copy"), st.healthz)
        self.assertEqual(t.rpc_code(t.decrypt, stub, sealed[0], kid2), StatusCode.FAILED_PRECONDITION)
        self.assertEqual(t.rpc_code(t.encrypt, stub, b"x"), StatusCode.FAILED_PRECONDITION)

        # Accepted on purpose, the copy serves again until the central KMS
        # is back and the next sync purges the compromised version again.
        self.assertEqual(a.stop_daemon(), 0, a.log())
        r = a.ctl("accept-restore")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.kms.start()
        a.start_daemon()
        self.wait_roles((a,), {v1: "primary"}, timeout=RECOVER)
        self.assertEqual(t.rpc_code(t.decrypt, a.stub(), sealed[0], kid2), StatusCode.NOT_FOUND)


class MeasuredBootTest(FleetCase):
    def test_refused_host_does_not_sync(self):
        a = self.host("node-a")
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        kid1 = self.wait_primary((a,), v1)
        sealed = self.seal(a)
        self.assertEqual(a.stop_daemon(), 0, a.log())
        a.tpm.pcr_extend(7)
        off = self.kms.log_offset()
        a.write_config()
        a.start_daemon()
        stub = a.stub()
        js = a.status_json()
        self.assertEqual(js["state"], "refused", js)
        self.assertTrue(t.status(stub).healthz.startswith("sealed cache:"))
        self.assertEqual(t.rpc_code(t.decrypt, stub, sealed[0], kid1),
                         StatusCode.FAILED_PRECONDITION)
        # an unknown key id must not make it fetch either
        self.assertEqual(t.rpc_code(t.decrypt, stub, sealed[0], "kmip:%s/424242.0123456789abcdef"
                                    % GROUP), StatusCode.FAILED_PRECONDITION)
        a.ctl("sync")                           # whatever it answers, it must not fetch
        time.sleep(3.5)                          # three sync intervals
        self.assertEqual(self.kms.sessions_from("node-a", off), set(),
                         "a host refused for measured boot talked to the central KMS")
        self.assertTrue(a.alive(), a.log())
        self.assertEqual(a.status_json()["state"], "refused")


if __name__ == "__main__":
    unittest.main()
