#!/usr/bin/python3
"""tpmkmsctl audit-snapshot on real etcd snapshots.

A real etcd (tests/lib/tpmkmstest_etcd.py) holds keys written as
kube-apiserver stores them: plaintext Secrets (JSON and the k8s protobuf
envelope), Secrets under KMS v2 whose EncryptedObjects carry real Encrypt
answers of a running tpmkmsd on swtpm (two key ids, across a rotate),
ConfigMaps, other providers' prefixes, overwritten, deleted and re-created
keys and a compaction; `etcdctl snapshot save` writes the file. The audit must
report exactly what was written, exit 0/1/2 as documented, need neither the
daemon nor a config, run as another user, never write the file, and refuse
truncated and bit-flipped files with a clear message.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
from tpmkmstest_etcd import Etcd  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

PROVIDER = "tpmkms"
SECRET_VALUE = b"s3cr3t-value-never-printed"
HKDF_SHA256_XNONCE_AES_GCM_SEED = 1


def _varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def _field(number, wire, payload):
    if wire == 2:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload
    return _varint(number << 3) + _varint(payload)


def encrypted_object(data, key_id, dek_source):
    """The apiserver's EncryptedObject (docs/kms-v2-contract.md), encoded here
    independently of the C side's proto."""
    return (_field(1, 2, data) + _field(2, 2, key_id.encode()) + _field(3, 2, dek_source)
            + _field(5, 0, HKDF_SHA256_XNONCE_AES_GCM_SEED))


def secret_json(name, ns):
    return json.dumps({"kind": "Secret", "apiVersion": "v1",
                       "metadata": {"name": name, "namespace": ns},
                       "data": {"password": SECRET_VALUE.decode()}}).encode()


def secret_protobuf(name):
    """What the apiserver writes with its default protobuf storage: the
    "k8s\\0" magic, then runtime.Unknown (fields abbreviated)."""
    return b"k8s\x00" + _field(1, 2, _field(1, 2, b"v1") + _field(2, 2, b"Secret")) \
        + _field(2, 2, name.encode() + SECRET_VALUE)


class Kms:
    """Encrypt answers of a real tpmkmsd: one seed per key id."""

    def __init__(self, world):
        self.stub = world.stub()
        self.seeds = {}

    def new_seed(self):
        seed = os.urandom(32)
        r = t.encrypt(self.stub, seed)
        self.seeds[r.key_id] = (seed, r.ciphertext)
        return r.key_id

    def value(self, key_id, plaintext):
        seed, dek_source = self.seeds[key_id]
        nonce = os.urandom(12)
        data = nonce + AESGCM(seed).encrypt(nonce, plaintext, None)
        return ("k8s:enc:kms:v2:%s:" % PROVIDER).encode() + encrypted_object(data, key_id, dek_source)


class AuditSnapshotTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tpmkmsctl = t.env_path("TPMKMSCTL")
        cls.dir = t.tempfile.mkdtemp(prefix="tpmkms-snap-")
        os.chmod(cls.dir, 0o755)
        cls.etcd = Etcd()
        try:
            cls._populate()
        except BaseException:
            cls.etcd.close()
            shutil.rmtree(cls.dir, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.etcd.close()
        if not os.environ.get("TPMKMS_KEEP"):
            shutil.rmtree(cls.dir, ignore_errors=True)

    @classmethod
    def _populate(cls):
        class Holder(unittest.TestCase):
            def runTest(self):
                pass
        holder = Holder()
        world = t.World(holder)
        try:
            world.start()
            kms = Kms(world)
            cls.key1 = kms.new_seed()
            world.ctl("rotate", check=True)
            cls.key2 = kms.new_seed()
        finally:
            world.close()
        assert cls.key1 != cls.key2, (cls.key1, cls.key2)

        e = cls.etcd.start()
        sec = b"/registry/secrets/"
        e.put(sec + b"default/plain-1", secret_json("plain-1", "default"))
        e.put(sec + b"kube-system/plain-2", secret_protobuf("plain-2"))
        for n in (1, 2, 3):
            e.put(sec + b"default/enc-%d" % n, kms.value(cls.key1, secret_json("enc", "default")))
        e.put(sec + b"default/was-plain", secret_json("was-plain", "default"))
        e.put(sec + b"default/was-enc", kms.value(cls.key1, secret_json("was-enc", "default")))
        e.put(sec + b"default/deleted", secret_json("deleted", "default"))
        e.put(sec + b"default/recreated", secret_json("recreated", "default"))
        e.delete(sec + b"default/recreated")
        # Compaction drops the history up to here; what follows stays as history.
        e.compact(e.put(b"/registry/configmaps/kube-system/cm-1", b'{"kind":"ConfigMap"}'))
        e.put(sec + b"default/enc-4", kms.value(cls.key2, secret_json("enc-4", "default")))
        e.put(sec + b"default/was-plain", kms.value(cls.key2, secret_json("was-plain", "default")))
        e.put(sec + b"default/was-enc", secret_json("was-enc", "default"))
        e.delete(sec + b"default/deleted")
        e.put(sec + b"default/recreated", kms.value(cls.key2, secret_json("recreated", "default")))
        e.put(b"/registry/configmaps/default/cm-2", b'{"kind":"ConfigMap"}')
        e.put(b"/registry/configmaps/default/cm-3", b"k8s:enc:aescbc:v1:key1:" + os.urandom(48))
        e.put(b"/registry/cert-manager.io/certificates/default/c1",
              b"k8s:enc:secretbox:v1:key1:" + os.urandom(48))
        e.put(b"/registry/pods/default/p1", b"k8s:enc:kms:v1:old:" + os.urandom(48))
        e.put(b"/registry/events/default/ev1", b"k8s:enc:aesgcm:v1:key1:" + os.urandom(48))
        e.put(b"/other/key", b"outside")
        cls.snapshot = e.snapshot_save(os.path.join(cls.dir, "snapshot.db"))
        os.chmod(cls.snapshot, 0o644)

    def audit(self, *args, path=None, user=None):
        cmd = [self.tpmkmsctl, "audit-snapshot", path or self.snapshot] + list(args)
        if user is not None:
            cmd = ["setpriv", "--reuid=%d" % user, "--regid=%d" % user, "--clear-groups"] + cmd
        r = subprocess.run(cmd, capture_output=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/")
        self.assertGreaterEqual(r.returncode, 0, "killed by a signal: %r" % r)
        self.assertNotIn(SECRET_VALUE, r.stdout + r.stderr)
        return r

    def audit_json(self, *args, path=None, expect=0):
        r = self.audit("--json", *args, path=path)
        self.assertEqual(r.returncode, expect, r.stderr)
        doc = json.loads(r.stdout)
        return doc, {res["resource"]: res for res in doc["resources"]}

    def test_counts_key_ids_and_names(self):
        doc, res = self.audit_json("--require-encrypted", "secrets", expect=1)
        self.assertTrue(doc["hash_checked"])
        self.assertEqual(doc["unencrypted_required"], 3)
        self.assertEqual(doc["outside_registry"], 1)
        self.assertEqual(doc["live_keys"], 9 + 3 + 1 + 1 + 1 + 1)
        s = res["secrets"]
        self.assertTrue(s["required"])
        self.assertEqual((s["objects"], s["plaintext"], s["kms_v2"]), (9, 3, 6))
        self.assertEqual(s["kms_v2_malformed"], 0)
        self.assertEqual(s["kms_v2_key_ids"], sorted([
            {"provider": PROVIDER, "key_id": self.key1, "objects": 3},
            {"provider": PROVIDER, "key_id": self.key2, "objects": 3}], key=lambda k: k["key_id"]))
        self.assertEqual(s["plaintext_names"],
                         ["default/plain-1", "default/was-enc", "kube-system/plain-2"])
        cm = res["configmaps"]
        self.assertEqual((cm["objects"], cm["plaintext"], cm["aescbc"]), (3, 2, 1))
        self.assertFalse(cm["required"])
        self.assertNotIn("plaintext_names", cm)
        self.assertEqual(res["certificates.cert-manager.io"]["secretbox"], 1)
        self.assertEqual(res["pods"]["kms_v1"], 1)
        self.assertEqual(res["events"]["aesgcm"], 1)
        self.assertEqual(sorted(res), ["certificates.cert-manager.io", "configmaps", "events",
                                       "pods", "secrets"])

    def test_exit_codes(self):
        self.assertEqual(self.audit().returncode, 0)
        self.assertEqual(self.audit("--require-encrypted", "certificates.cert-manager.io,pods").returncode, 0)
        self.assertEqual(self.audit("--require-encrypted", "nothing-stored").returncode, 0)
        doc, res = self.audit_json("--require-encrypted", "secrets,configmaps", expect=1)
        self.assertEqual(doc["unencrypted_required"], 5)
        self.assertEqual(res["configmaps"]["plaintext_names"], ["default/cm-2", "kube-system/cm-1"])
        doc, _ = self.audit_json("--require-encrypted", "configmaps", "--require-encrypted", "secrets",
                                 expect=1)
        self.assertEqual(doc["unencrypted_required"], 5)
        self.assertEqual(self.audit("--require-encrypted", "Secrets").returncode, 2)
        self.assertEqual(self.audit("extra-argument").returncode, 2)
        r = self.audit(path=os.path.join(self.dir, "missing.db"))
        self.assertEqual(r.returncode, 2)
        self.assertIn(b"No such file", r.stderr)

    def test_table(self):
        r = self.audit("--require-encrypted", "secrets")
        self.assertEqual(r.returncode, 1, r.stderr)
        out = r.stdout.decode()
        self.assertRegex(out, r"\nsecrets\* +9 +3 +6 ")
        self.assertRegex(out, r"\nconfigmaps +3 +2 +0 +0 +1 ")
        for key_id in (self.key1, self.key2):
            self.assertRegex(out, r"secrets +3  %s  %s\n" % (PROVIDER, key_id))
        for name in ("default/plain-1", "default/was-enc", "kube-system/plain-2"):
            self.assertIn("  secrets %s\n" % name, out)
        self.assertNotIn("deleted", out)
        self.assertIn("FAIL: 3 object(s)", out)
        self.assertIn("OK: every object", self.audit("--require-encrypted", "pods").stdout.decode())

    def test_no_config_no_daemon_other_user_read_only(self):
        with open(self.snapshot, "rb") as f:
            before = hashlib.sha256(f.read()).hexdigest()
        mtime = os.stat(self.snapshot).st_mtime_ns
        r = subprocess.run([self.tpmkmsctl, "--config", "/nonexistent/tpmkmsd.conf", "audit-snapshot",
                            self.snapshot], capture_output=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.audit("--require-encrypted", "secrets", user=65534)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn(b"default/was-enc", r.stdout)
        os.chmod(self.snapshot, 0o600)
        try:
            r = self.audit(user=65534)
            self.assertEqual(r.returncode, 2)
            self.assertIn(b"Permission denied", r.stderr)
        finally:
            os.chmod(self.snapshot, 0o644)
        with open(self.snapshot, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), before)
        self.assertEqual(os.stat(self.snapshot).st_mtime_ns, mtime)

    def variant(self, name, data):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_truncated_and_bit_flipped(self):
        with open(self.snapshot, "rb") as f:
            data = f.read()
        self.assertEqual(len(data) % 512, 32)      # the SHA-256 trailer of snapshot save
        for n in (0, 100, 4096, len(data) // 2, len(data) - 4096, len(data) - 1):
            r = self.audit(path=self.variant("truncated.db", data[:n]))
            self.assertEqual(r.returncode, 2, (n, r))
            self.assertRegex(r.stderr.decode(), r"^tpmkmsctl: .*truncated.db: (empty file|not a valid bbolt"
                             r"|truncated or corrupt|truncated or padded|corrupt: the snapshot's SHA-256)")
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x08
        r = self.audit(path=self.variant("flipped.db", bytes(flipped)))
        self.assertEqual(r.returncode, 2)
        self.assertIn(b"SHA-256 does not match", r.stderr)

        # Without the trailer (a backend file): the reader's own checks.
        db = data[:-32]
        _, res = self.audit_json(path=self.variant("backend.db", db))
        self.assertEqual(res["secrets"]["objects"], 9)
        meta0 = bytearray(db)
        meta0[16 + 20] ^= 0x01                      # page 0's meta: page 1's still holds
        doc, res = self.audit_json(path=self.variant("meta0.db", bytes(meta0)))
        self.assertFalse(doc["hash_checked"])
        self.assertEqual(res["secrets"]["kms_v2"], 6)
        page_size = int.from_bytes(db[16 + 8:16 + 12], "little")
        meta0[page_size + 16 + 20] ^= 0x01          # and page 1's
        r = self.audit(path=self.variant("meta01.db", bytes(meta0)))
        self.assertEqual(r.returncode, 2)
        self.assertIn(b"meta page 0: checksum mismatch; meta page 1: checksum mismatch", r.stderr)
        for at in range(2 * page_size, len(db), page_size):   # every page header's id
            hostile = bytearray(db)
            hostile[at] ^= 0x40
            r = self.audit(path=self.variant("hostile.db", bytes(hostile)))
            self.assertIn(r.returncode, (0, 2), r)

    def test_backend_file_of_stopped_etcd(self):
        self.etcd.stop()
        try:
            doc, res = self.audit_json("--require-encrypted", "secrets", path=self.etcd.backend_path(),
                                       expect=1)
            self.assertFalse(doc["hash_checked"])
            self.assertEqual(res["secrets"]["plaintext_names"],
                             ["default/plain-1", "default/was-enc", "kube-system/plain-2"])
        finally:
            self.etcd.start()


if __name__ == "__main__":
    unittest.main()
