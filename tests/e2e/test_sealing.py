#!/usr/bin/python3
"""The sealed cache on a real swtpm: keys survive daemon restarts and reboots,
and a changed boot (PCR), another TPM or a tampered cache is refused without
touching the cache. Each test is its own host (temp dir, swtpm, daemon)."""
import hashlib
import hmac
import os
import re
import secrets
import shutil
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
from grpc import StatusCode  # noqa: E402

HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class SealingTest(unittest.TestCase):
    def setUp(self):
        self.w = t.World(self)
        self.w.start()
        self.stub = self.w.stub()
        self.key_id, self.pt, self.ct = self.w.encrypt_one()

    # helpers

    def assert_serving(self, w=None):
        w = w or self.w
        stub = w.stub()
        st = t.status(stub)
        self.assertEqual((st.version, st.healthz, st.key_id), ("v2", "ok", self.key_id))
        self.assertEqual(t.decrypt(stub, self.ct, self.key_id), self.pt)
        r = t.encrypt(stub, b"after")
        self.assertEqual(t.decrypt(stub, r.ciphertext, r.key_id), b"after")

    def assert_refused(self, w, snapshot):
        """Listening, Status says why, key operations FAILED_PRECONDITION, cache
        byte-for-byte unchanged, tpmkmsctl agrees."""
        self.assertTrue(w.alive(), "a refused daemon must keep running:\n" + w.log())
        stub = w.stub()
        st = t.status(stub)
        self.assertEqual(st.version, "v2")
        self.assertTrue(st.healthz.startswith("sealed cache:"), st.healthz)
        self.assertEqual(t.rpc_code(t.encrypt, stub, self.pt), StatusCode.FAILED_PRECONDITION)
        self.assertEqual(t.rpc_code(t.decrypt, stub, self.ct, self.key_id),
                         StatusCode.FAILED_PRECONDITION)
        js = w.status_json()
        self.assertEqual(js["state"], "refused")
        self.assertEqual(js["healthz"], st.healthz)
        self.assertEqual(w.state_snapshot(), snapshot, "the refused cache was modified")
        return st

    def stop_ok(self, w=None):
        w = w or self.w
        rc = w.stop_daemon()
        self.assertEqual(rc, 0, w.log())

    # tests

    def test_cache_file_is_written(self):
        with open(self.w.cache_path(), "rb") as f:
            self.assertEqual(f.read(len(t.CACHE_MAGIC)), t.CACHE_MAGIC)

    def test_daemon_restart_keeps_keys(self):
        self.w.restart_daemon()
        self.assert_serving()
        self.w.restart_daemon()
        self.assert_serving()

    def test_tpm_reboot_keeps_keys(self):
        self.w.reboot()      # swtpm restarted: PCRs reset to the sealed values
        self.assertEqual(t.tpm_pcr(self.w.tpm), bytes(32))
        self.assert_serving()

    def test_pcr_extend_refuses_with_digests_and_leaves_cache(self):
        self.stop_ok()
        snap = self.w.state_snapshot()
        expected = t.tpm_pcr(self.w.tpm)
        self.w.tpm.pcr_extend(7)
        actual = t.tpm_pcr(self.w.tpm)
        self.assertNotEqual(expected, actual)
        self.w.write_config()
        self.w.start_daemon()
        st = self.assert_refused(self.w, snap)
        self.assertIn("measured boot mismatch", st.healthz)
        self.assertIn("sha256:7", st.healthz)
        # the log names the expected and the actual PCR digest (raw PCR value or
        # the policy digest over the selection: either is a PCR digest)
        log = self.w.log().lower()
        found = set(h.lower() for h in HEX64.findall(log))

        def forms(v):
            return {v.hex(), hashlib.sha256(v).hexdigest()}
        self.assertTrue(found & forms(actual), "actual PCR digest not logged:\n" + log)
        self.assertTrue(found & forms(expected), "expected PCR digest not logged:\n" + log)
        # the refusal is not sticky: after SIGTERM (exit 0) and a reboot into the
        # expected PCRs, the same cache serves again
        self.stop_ok()
        self.assertEqual(self.w.state_snapshot(), snap)
        self.w.reboot()
        self.assert_serving()

    def test_pcr_extend_while_running_keeps_serving_until_restart(self):
        self.w.tpm.pcr_extend(7)
        self.assert_serving()                # keys are in memory, not re-unsealed
        snap = self.w.state_snapshot()
        self.stop_ok()
        self.w.start_daemon()
        self.assert_refused(self.w, snap)

    def test_another_machine_refuses(self):
        """The state dir copied to a host with another TPM (fresh swtpm state)."""
        self.stop_ok()
        other = t.World(self)
        shutil.rmtree(other.state_dir)
        shutil.copytree(self.w.state_dir, other.state_dir)
        snap = other.state_snapshot()
        other.start()
        self.assert_refused(other, snap)
        # the original host still serves its cache
        self.w.start_daemon()
        self.assert_serving()

    def tamper_and_check(self, mutate, what):
        self.stop_ok()
        path = self.w.cache_path()
        with open(path, "rb") as f:
            good = f.read()
        bad = mutate(good)
        self.assertNotEqual(bad, good)
        with open(path, "wb") as f:
            f.write(bad)
        snap = self.w.state_snapshot()
        self.w.start_daemon()
        try:
            self.assert_refused(self.w, snap)
        except AssertionError as e:
            raise AssertionError("%s: %s" % (what, e)) from None
        with open(path, "rb") as f:
            self.assertEqual(f.read(), bad, what)
        self.stop_ok()
        with open(path, "wb") as f:
            f.write(good)
        self.w.start_daemon()
        self.assert_serving()

    def test_cache_tampered_payload_refused(self):
        for off in (-1, -17, -40):          # GCM tag, ciphertext tail, deeper in
            def flip(b, off=off):
                a = bytearray(b)
                a[off] ^= 0x01
                return bytes(a)
            self.tamper_and_check(flip, "byte %d flipped" % off)

    def test_cache_tampered_header_and_blob_refused(self):
        for off in (0, len(t.CACHE_MAGIC) + 4, 64):
            def flip(b, off=off):
                a = bytearray(b)
                a[off] ^= 0x01
                return bytes(a)
            self.tamper_and_check(flip, "byte %d flipped" % off)

    def test_cache_truncated_refused(self):
        for keep in (lambda n: n - 1, lambda n: n // 2, lambda n: len(t.CACHE_MAGIC),
                     lambda n: 0):
            self.tamper_and_check(lambda b, keep=keep: b[:keep(len(b))],
                                  "truncated")

    def test_state_dir_holds_no_plaintext_kek(self):
        # several key versions so the payload is large enough to measure
        for _ in range(8):
            self.w.ctl("rotate", check=True)
        ids = [k["id"] for k in self.w.status_json()["keys"]]
        self.assertEqual(len(ids), 9)
        self.stop_ok()
        with open(self.w.cache_path(), "rb") as f:
            blob = f.read()
        self.assertEqual(blob[:len(t.CACHE_MAGIC)], t.CACHE_MAGIC)
        # 9 AES-256 keys are at least 288 bytes of payload: its tail must look random
        tail = blob[-288:]
        self.assertGreater(t.shannon_entropy(tail), 7.0)
        kcv_scan(self, self.w.state_dir, self.w.log(all_runs=True), ids)
        # the file only opens with this TPM: another TPM refuses it
        other = t.World(self)
        shutil.rmtree(other.state_dir)
        shutil.copytree(self.w.state_dir, other.state_dir)
        snap = other.state_snapshot()
        other.start()
        self.assert_refused(other, snap)


# The key check value in a key id is the first 8 bytes of
# HMAC-SHA256(KEK, "tpmkms key check value v1") (README, agent/keystore/keystore.h). A
# 32-byte window of any file whose HMAC matches a key id's check value IS that
# KEK in plaintext: scan every offset of every file and of the daemon's log.
KCV_LABELS = [b"tpmkms key check value v1"]


def find_kek(data, kcvs):
    """Offset of a 32-byte window whose key check value is in kcvs, or None."""
    for i in range(0, max(0, len(data) - 31)):
        w = data[i:i + 32]
        for lb in KCV_LABELS:
            if hmac.new(w, lb, hashlib.sha256).digest()[:8] in kcvs:
                return i
    return None


def kcv_scan(test, state_dir, log, ids):
    kcvs = {bytes.fromhex(k.split(".")[1]) for k in ids}
    blobs = []
    for root, _, files in os.walk(state_dir):
        for n in files:
            with open(os.path.join(root, n), "rb") as f:
                blobs.append((n, f.read()))
    blobs.append(("daemon log", log.encode()))
    blobs += [("daemon log (hex)", bytes.fromhex(h)) for h in HEX64.findall(log)]
    for name, data in blobs:
        off = find_kek(data, kcvs)
        test.assertIsNone(off, "plaintext KEK at offset %s of %s" % (off, name))


class KekScannerTest(unittest.TestCase):
    """The scanner above finds a planted key (so its silence means something)."""

    def test_find_kek_planted(self):
        kek = secrets.token_bytes(32)
        kcv = hmac.new(kek, KCV_LABELS[0], hashlib.sha256).digest()[:8]
        data = secrets.token_bytes(301) + kek + secrets.token_bytes(77)
        self.assertEqual(find_kek(data, {kcv}), 301)
        self.assertIsNone(find_kek(data[:320] + data[340:], {kcv}))


if __name__ == "__main__":
    unittest.main()
