#!/usr/bin/python3
"""Fleet sync load on the central KMS, counted in PyKMIP's own log (not timed):
a sync with no change is one KMIP request message over one TLS connection
whatever the number of versions; versions new to a host cost one more
message; key material is fetched once per version, and all of it again every
[central] material_check (README, "Fleet sync load").

Each test has its own PyKMIP server and host (CN=node-a, sync_interval 1h so
that only `tpmkmsctl sync` syncs while the log is counted)."""
import os
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpmkmstest_kmip as k  # noqa: E402
import test_fleet as fleet  # noqa: E402   (its PyKMIP per test, certificates per module)

GROUP = fleet.GROUP
CN = "node-a"
CONVERGE = 30.0

setUpModule = fleet.setUpModule
tearDownModule = fleet.tearDownModule


class FleetLoadTest(fleet.FleetCase):
    def versions(self, n):
        """n new versions in the group, the last one Active."""
        uids = [self.kms.create_version(GROUP, distinct_second=False) for _ in range(n)]
        self.kms.activate(uids[-1])
        return uids

    def host_with(self, uids, **kw):
        w = self.host(CN, sync_interval="1h", **kw)
        k.wait_for(lambda: set(w.roles()) == set(uids), CONVERGE, "all %d versions synced" % len(uids))
        return w

    def counted_sync(self, w):
        """tpmkmsctl sync; what the central KMS saw of it."""
        off = self.kms.log_offset()
        r = w.ctl("sync")
        self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
        return {
            "stdout": r.stdout,
            "messages": self.kms.requests_from(CN, off),
            "sessions": len(self.kms.sessions_from(CN, off)),
            "Locate": self.kms.operations("Locate", off),
            "GetAttributes": self.kms.operations("GetAttributes", off),
            "Get": self.kms.operations("Get", off),
            "DiscoverVersions": self.kms.operations("DiscoverVersions", off),
        }

    def assert_no_change_sync(self, w, n):
        c = self.counted_sync(w)
        self.assertIn("no change", c["stdout"].lower())
        self.assertEqual((c["messages"], c["sessions"]), (1, 1), c)
        self.assertEqual((c["Locate"], c["GetAttributes"], c["Get"], c["DiscoverVersions"]),
                         (1, n, 0, 0), c)
        return c

    def no_change_syncs(self, n):
        uids = self.versions(n)
        # a Compromised version in the group: never cached, checked (its
        # GetAttributes) but not fetched again as if it were new
        bad = self.kms.create_version(GROUP, distinct_second=False)
        self.kms.compromise(bad)
        w = self.host_with(uids)
        for _ in range(3):
            self.assert_no_change_sync(w, n + 1)
        ep = w.central()["endpoints"][0]
        # every connection after the first resumed its TLS session
        self.assertGreaterEqual(ep["tls_resumed"], 3, ep)
        # new versions: one more message for all of them, their material fetched once
        new = [self.kms.create_version(GROUP, distinct_second=False) for _ in range(3)]
        c = self.counted_sync(w)
        self.assertEqual((c["messages"], c["sessions"]), (2, 1), c)
        self.assertEqual((c["GetAttributes"], c["Get"]), (n + 1 + 3, 3), c)
        self.assertEqual(set(w.roles()), set(uids + new))
        self.assert_no_change_sync(w, n + 1 + 3)

    def test_no_change_sync_is_one_message_4_versions(self):
        self.no_change_syncs(4)

    def test_no_change_sync_is_one_message_24_versions(self):
        self.no_change_syncs(24)

    def test_destroyed_version_fails_its_item_only(self):
        """The batch's GetAttributes of a destroyed uid fails (Item Not Found) while
        the Locate and the other items succeed: the version goes missing, the sync
        succeeds, nothing else changes."""
        uids = self.versions(4)
        w = self.host_with(uids)
        self.kms.destroy(uids[0])
        c = self.counted_sync(w)
        self.assertEqual((c["messages"], c["sessions"], c["Get"]), (1, 1, 0), c)
        self.assertIn("missing", c["stdout"])
        roles = w.roles()
        self.assertEqual(roles[uids[0]], "missing", roles)
        self.assertEqual(roles[uids[-1]], "primary", roles)
        self.assertEqual(w.central()["last_error"], "")
        self.assert_no_change_sync(w, 4)

    def test_material_check_fetches_all_material_again(self):
        uids = self.versions(4)
        w = self.host_with(uids, material_check="3s")
        self.assert_no_change_sync(w, 4)
        time.sleep(3.2)
        c = self.counted_sync(w)
        self.assertIn("no change", c["stdout"].lower())
        self.assertEqual((c["sessions"], c["Locate"], c["GetAttributes"], c["Get"]), (1, 1, 4, 4), c)
        self.assertEqual(c["messages"], 2, c)     # Locate; then GetAttributes and Get of all
        self.assert_no_change_sync(w, 4)

    def test_restart_discovers_versions_once(self):
        """DiscoverVersions at the first connection to an endpoint, and again
        after it failed (here: the central KMS restarted)."""
        uids = self.versions(2)
        off = self.kms.log_offset()
        w = self.host_with(uids)
        self.assertEqual(self.kms.operations("DiscoverVersions", off), 1)
        self.assert_no_change_sync(w, 2)
        self.kms.restart()
        # the resumed session is unknown to the new server process: a full
        # handshake; the version is kept (the connection did not fail)
        self.assert_no_change_sync(w, 2)


class NoBatchTest(fleet.FleetCase):
    """A central KMS that refuses batches as a whole: the host learns it once
    (one refused message) and sends one operation per message from then on;
    the syncs still need no Get for the versions it holds."""

    def setUp(self):
        self.kms = k.KmipServer(fleet.PKI, self, refuse_batches=True)
        self.kms.start()

    def refusals(self, off):
        return self.kms.log(off).count("Batches are not supported by this test server")

    def test_refused_batches_fall_back_once(self):
        off = self.kms.log_offset()
        uids = [self.kms.create_version(GROUP, distinct_second=False) for _ in range(4)]
        self.kms.activate(uids[-1])
        w = self.host(CN, sync_interval="1h")
        k.wait_for(lambda: set(w.roles()) == set(uids), CONVERGE, "all versions synced")
        self.assertEqual(self.refusals(off), 1, self.kms.log(off)[-3000:])
        for _ in range(2):
            off = self.kms.log_offset()
            r = w.ctl("sync")
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
            self.assertIn("no change", r.stdout.lower())
            # Locate, then GetAttributes of each held version: no batch, no Get
            self.assertEqual(self.kms.requests_from(CN, off), 1 + 4)
            self.assertEqual(len(self.kms.sessions_from(CN, off)), 1)
            self.assertEqual(self.kms.operations("Get", off), 0)
            self.assertEqual(self.refusals(off), 0)


if __name__ == "__main__":
    unittest.main()
