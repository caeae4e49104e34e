#!/usr/bin/python3
"""Key lifecycle in standalone mode through tpmkmsctl: rotate and reseal,
checked over the real KMS v2 API and `tpmkmsctl status --json`."""
import datetime
import os
import secrets
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
from grpc import StatusCode  # noqa: E402


def rfc3339(s):
    """Parse an RFC 3339 timestamp (Z or offset); raises ValueError otherwise."""
    if not isinstance(s, str) or "T" not in s:
        raise ValueError("not RFC 3339: %r" % s)
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))


class LifecycleTest(unittest.TestCase):
    def setUp(self):
        self.w = t.World(self)
        self.w.start()
        self.stub = self.w.stub()

    def encrypt_sample(self):
        pt = secrets.token_bytes(32)
        r = t.encrypt(self.stub, pt)
        return pt, r.ciphertext, r.key_id

    def check_status_json(self, primary, retired):
        js = self.w.status_json()
        self.assertEqual(js["state"], "serving")
        self.assertEqual(js["healthz"], "ok")
        self.assertEqual(js["pcrs"], "sha256:7")
        self.assertEqual(js["primary"], primary)
        roles = {k["id"]: k["role"] for k in js["keys"]}
        self.assertEqual(len(roles), len(js["keys"]), "duplicate key ids")
        self.assertEqual([k for k, r in roles.items() if r == "primary"], [primary])
        self.assertEqual(sorted(k for k, r in roles.items() if r == "retired"), sorted(retired))
        for k in js["keys"]:
            self.assertRegex(k["id"], t.KEY_ID_RE)
            self.assertEqual(k["central_id"], "")
            rfc3339(k["created"])
            rfc3339(k["first_seen"])
        return js

    def test_status_json_first_start(self):
        kid = t.status(self.stub).key_id
        js = self.check_status_json(kid, [])
        self.assertEqual(len(js["keys"]), 1)
        now = datetime.datetime.now(datetime.timezone.utc)
        created = rfc3339(js["keys"][0]["created"])
        self.assertLess(abs((now - created).total_seconds()), 600)
        # the plain (human) form exists and names the key
        r = self.w.ctl("status", check=True)
        self.assertIn(kid, r.stdout)

    def test_rotate(self):
        samples = [self.encrypt_sample()]
        ids = [t.status(self.stub).key_id]
        for _ in range(2):
            r = self.w.ctl("rotate")
            self.assertEqual(r.returncode, 0, r.stderr)
            new = t.status(self.stub).key_id
            self.assertRegex(new, t.KEY_ID_RE)
            self.assertNotIn(new, ids, "rotation reused a key id")
            ids.append(new)
            s = self.encrypt_sample()
            self.assertEqual(s[2], new, "Encrypt must use the new primary")
            samples.append(s)
            self.check_status_json(new, ids[:-1])
        # every old ciphertext still decrypts with its own key id
        for pt, ct, kid in samples:
            self.assertEqual(t.decrypt(self.stub, ct, kid), pt)
        # a ciphertext presented under another (known) key id is refused
        (_, ct0, k0), (_, ct1, k1) = samples[0], samples[1]
        self.assertIn(t.rpc_code(t.decrypt, self.stub, ct0, k1),
                      (StatusCode.INVALID_ARGUMENT, StatusCode.NOT_FOUND))
        self.assertIn(t.rpc_code(t.decrypt, self.stub, ct1, k0),
                      (StatusCode.INVALID_ARGUMENT, StatusCode.NOT_FOUND))
        # rotation is persisted: same primary and all keys after a restart
        self.w.restart_daemon()
        self.stub = self.w.stub()
        self.assertEqual(t.status(self.stub).key_id, ids[-1])
        self.check_status_json(ids[-1], ids[:-1])
        for pt, ct, kid in samples:
            self.assertEqual(t.decrypt(self.stub, ct, kid), pt)

    def test_key_id_stable_across_restarts(self):
        kid = t.status(self.stub).key_id
        for _ in range(2):
            self.w.restart_daemon()
            self.assertEqual(t.status(self.w.stub()).key_id, kid)

    def test_reseal_after_pcr_change_serves_after_restart(self):
        pt, ct, kid = self.encrypt_sample()
        with open(self.w.cache_path(), "rb") as f:
            before = f.read()
        self.w.tpm.pcr_extend(7)                 # e.g. a planned firmware update
        r = self.w.ctl("reseal")
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(self.w.cache_path(), "rb") as f:
            after = f.read()
        self.assertNotEqual(before, after, "reseal did not rewrite the cache")
        self.assertEqual(after[:len(t.CACHE_MAGIC)], t.CACHE_MAGIC)
        self.assertEqual(t.status(self.stub).healthz, "ok")
        self.w.restart_daemon()                  # unseals against the new PCRs
        stub = self.w.stub()
        st = t.status(stub)
        self.assertEqual((st.healthz, st.key_id), ("ok", kid))
        self.assertEqual(t.decrypt(stub, ct, kid), pt)
        # and the cache is now bound to the new value: the old boot is refused
        self.w.reboot()                          # PCRs back to the old value
        st = t.status(self.w.stub())
        self.assertTrue(st.healthz.startswith("sealed cache:"), st.healthz)

    def test_planned_update_reseal_to_other_pcrs_and_back(self):
        """The README runbook for a planned change of a bound PCR: re-seal to
        a selection the update leaves alone (tpmkmsctl reseal --pcrs), set the
        configuration to it, update and reboot, then re-seal back to the
        policy and set the configuration back. The daemon never accepts a
        cache sealed to less than its configuration asks for."""
        pt, ct, kid = self.encrypt_sample()
        r = self.w.ctl("reseal", "--pcrs", "sha256:8")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("sha256:8", r.stdout)
        self.assertEqual(self.w.status_json()["pcrs"], "sha256:8")
        self.assertEqual(self.w.status_json()["configured_pcrs"], "sha256:7")
        self.w.pcrs = "sha256:8"
        self.w.tpm.pcr_extend(7)                 # the update changes PCR 7
        self.w.restart_daemon()                  # writes the new config
        self.assertEqual(t.status(self.w.stub()).healthz, "ok")
        self.assertEqual(t.decrypt(self.w.stub(), ct, kid), pt)
        r = self.w.ctl("reseal", "--pcrs", "sha256:7")   # back to the policy, new value
        self.assertEqual(r.returncode, 0, r.stderr)
        self.w.pcrs = "sha256:7"
        self.w.restart_daemon()
        self.assertEqual(self.w.status_json()["pcrs"], "sha256:7")
        self.assertEqual(t.decrypt(self.w.stub(), ct, kid), pt)
        self.w.tpm.pcr_extend(7)                 # bound to PCR 7 again
        self.w.restart_daemon()
        self.assertTrue(t.status(self.w.stub()).healthz.startswith("sealed cache: measured boot"))

    def test_reseal_refused_while_refused(self):
        pt, ct, kid = self.encrypt_sample()
        self.assertEqual(self.w.stop_daemon(), 0)
        self.w.tpm.pcr_extend(7)
        snap = self.w.state_snapshot()
        self.w.start_daemon()
        self.assertTrue(t.status(self.w.stub()).healthz.startswith("sealed cache:"))
        r = self.w.ctl("reseal")
        self.assertEqual(r.returncode, 1, "reseal must fail without keys")
        self.assertTrue(r.stderr.strip(), "reseal failure needs a message")
        self.assertEqual(self.w.state_snapshot(), snap)
        r = self.w.ctl("rotate")
        self.assertEqual(r.returncode, 1, "rotate must fail without keys")
        self.assertEqual(self.w.state_snapshot(), snap)
        st = t.status(self.w.stub())
        self.assertTrue(st.healthz.startswith("sealed cache:"), st.healthz)
        self.assertEqual(t.rpc_code(t.decrypt, self.w.stub(), ct, kid),
                         StatusCode.FAILED_PRECONDITION)

    def test_ctl_without_daemon_fails_cleanly(self):
        self.assertEqual(self.w.stop_daemon(), 0)
        for args in (["status"], ["status", "--json"], ["rotate"], ["reseal"]):
            r = self.w.ctl(*args)
            self.assertEqual(r.returncode, 1, args)
            self.assertTrue(r.stderr.strip(), args)


if __name__ == "__main__":
    unittest.main()
