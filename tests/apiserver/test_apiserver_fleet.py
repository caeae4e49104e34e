"""A two-phase fleet rotation behind real kube-apiservers: two hosts, each a
kube-apiserver with its own tpmkmsd (own swtpm) in fleet mode, both syncing
from one PyKMIP server and sharing one etcd (docs/key-lifecycle.md).

Phase 1 stages the new version on every host (Pre-Active); phase 2 activates
it, and each apiserver moves its writes to it at its next Status call while
the other host already decrypts what it writes.
"""
import base64
import json
import os
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
import tpmkmstest_apiserver as a  # noqa: E402
import tpmkmstest_kmip as k  # noqa: E402

NAME = "tpmkms"
GROUP = "cluster-a-kek"
CONVERGE = 10.0          # seconds: a few 1 s sync intervals
ROTATE = 90              # an apiserver's next Status call (health check or minute poll)


class FleetRotation(unittest.TestCase):
    def setUp(self):
        self.kpki = k.Pki()
        self.addCleanup(self.kpki.close)
        self.kms = k.KmipServer(self.kpki, self)
        self.kms.start()
        self.pki = a.ClusterPki(self)
        self.etcd = a.Etcd(self).start()

    def key_id(self, uid):
        return "kmip:%s/%s.%s" % (GROUP, uid, k.key_check_value(self.kms.get(uid)))

    def host(self, cn):
        w = k.FleetWorld(self, self.kms, cn=cn, group=GROUP)
        w.start()
        enc = a.encryption_config(w, os.path.join(w.dir, "encryption.yaml"), "--name", NAME)
        return w, a.Apiserver(self, self.etcd, self.pki, enc, name=cn)

    def stored_key_id(self, name):
        return a.kms_envelope(self.etcd.get("/registry/secrets/default/" + name), NAME)["key_id"]

    def create(self, api, name, value):
        api.kubectl("create", "secret", "generic", name, "--from-literal=value=" + value)

    def read(self, api, name):
        r = api.kubectl("get", "secret", name, "-o", "json")
        return base64.b64decode(json.loads(r.stdout)["data"]["value"]).decode()

    def wait_writes_under(self, api, kid, tag, other):
        """Probe writes through api until one is stored under kid; each probe
        is read back through the other host at once. Returns the seconds taken."""
        t0 = time.monotonic()
        n = [0]

        def probe():
            api.get("/readyz/kms-providers")       # a Status call once 20 s passed
            n[0] += 1
            name = "probe-%s-%d" % (tag, n[0])
            self.create(api, name, name)
            self.assertEqual(self.read(other, name), name)
            return self.stored_key_id(name) == kid
        a.wait_for(probe, ROTATE, "%s: a write under %s" % (tag, kid), interval=2)
        return time.monotonic() - t0

    def test_two_phase_rotation_two_apiservers_one_etcd(self):
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        wa, api_a = self.host("node-a")
        wb, api_b = self.host("node-b")
        kid1 = self.key_id(v1)
        for w in (wa, wb):
            k.wait_for(lambda w=w: t.status(w.stub()).key_id == kid1, CONVERGE,
                       "%s: primary %s" % (w.cn, kid1))
        api_a.start()
        api_b.start()

        # one fleet key id: each apiserver reads what the other wrote
        self.create(api_a, "from-a", "written by a")
        self.create(api_b, "from-b", "written by b")
        self.assertEqual(self.stored_key_id("from-a"), kid1)
        self.assertEqual(self.stored_key_id("from-b"), kid1)
        self.assertEqual(self.read(api_b, "from-a"), "written by a")
        self.assertEqual(self.read(api_a, "from-b"), "written by b")

        # phase 1: v2 Pre-Active is staged on both hosts; writes stay on v1
        v2 = self.kms.create_version(GROUP)
        kid2 = self.key_id(v2)
        for w in (wa, wb):
            k.wait_for(lambda w=w: w.roles() == {v1: "primary", v2: "staged"}, CONVERGE,
                       "%s: v2 staged" % w.cn)
            self.assertEqual(t.status(w.stub()).key_id, kid1)
        self.create(api_a, "staged-a", "still v1")
        self.assertEqual(self.stored_key_id("staged-a"), kid1)

        # phase 2: activate; both hosts' primary moves, then each apiserver's writes
        self.kms.activate(v2)
        for w in (wa, wb):
            k.wait_for(lambda w=w: t.status(w.stub()).key_id == kid2, CONVERGE,
                       "%s: primary %s" % (w.cn, kid2))
            self.assertEqual(w.roles(), {v1: "retired", v2: "primary"})
        took_a = self.wait_writes_under(api_a, kid2, "a", api_b)
        took_b = self.wait_writes_under(api_b, kid2, "b", api_a)
        a.figure("fleet rotation: apiserver a writes under v2 %.0f s after the hosts "
               "switched, apiserver b %.0f s after a" % (took_a, took_b))

        # old objects still read on both; a migration through one apiserver
        # leaves nothing under v1, and the other reads it all
        for api in (api_a, api_b):
            self.assertEqual(self.read(api, "from-a"), "written by a")
            self.assertEqual(self.read(api, "staged-a"), "still v1")
        listing = api_a.kubectl("get", "secrets", "-A", "-o", "json").stdout
        api_a.kubectl("replace", "-f", "-", input=listing)
        stored = self.etcd.get_prefix("/registry/secrets/")
        self.assertEqual(len(stored), len(json.loads(listing)["items"]))
        ids = {kk: a.kms_envelope(v, NAME)["key_id"] for kk, v in stored.items()}
        self.assertEqual([kk for kk, v in ids.items() if v != kid2], [])
        for name in ("from-a", "from-b", "staged-a"):
            self.assertEqual(self.read(api_b, name), self.read(api_a, name))
        # both apiservers Decrypted seeds the other host wrote, through their own tpmkmsd
        self.assertGreaterEqual(a.decrypt_calls(wa.log()), 1)
        self.assertGreaterEqual(a.decrypt_calls(wb.log()), 1)


if __name__ == "__main__":
    unittest.main()
