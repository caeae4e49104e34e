#!/usr/bin/python3
"""The KMS v2 contract as kube-apiserver checks it, against the real tpmkmsd on
a real swtpm through a real gRPC client (one daemon shared by the class: these
tests only read keys)."""
import os
import re
import secrets
import sys
import threading
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
from grpc import StatusCode  # noqa: E402

FQDN_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                     r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$")


class ContractTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.w = t.World()
        cls.addClassCleanup(cls.w.close)
        cls.w.start()
        cls.stub = cls.w.stub()
        cls.key_id = t.status(cls.stub).key_id

    def test_status_reports_v2_ok_and_primary_key_id(self):
        st = t.status(self.stub)
        self.assertEqual(st.version, "v2")
        self.assertEqual(st.healthz, "ok")
        self.assertRegex(st.key_id, t.KEY_ID_RE)
        self.assertLessEqual(len(st.key_id.encode()), 1024)
        self.assertEqual(self.w.status_json()["primary"], st.key_id)

    def test_socket_and_cache_modes_0600(self):
        self.assertEqual(os.stat(self.w.kms_sock).st_mode & 0o7777, 0o600)
        self.assertEqual(os.stat(self.w.ctl_sock).st_mode & 0o077, 0, "control socket")
        self.assertEqual(os.stat(self.w.cache_path()).st_mode & 0o077, 0, "cache file")

    def test_encrypt_key_id_equals_status_key_id(self):
        for _ in range(3):
            r = t.encrypt(self.stub, secrets.token_bytes(32))
            self.assertEqual(r.key_id, t.status(self.stub).key_id)

    def test_encrypt_decrypt_roundtrip_sizes(self):
        for n in (1, 16, 32, 100, 511, 512):
            pt = secrets.token_bytes(n)
            r = t.encrypt(self.stub, pt)
            self.assertTrue(r.ciphertext)
            self.assertLessEqual(len(r.ciphertext), 1024)
            self.assertEqual(len(r.ciphertext), n + t.GCM_OVERHEAD, "size %d" % n)
            if n >= 16:
                self.assertNotIn(pt, r.ciphertext)
            self.assertEqual(t.decrypt(self.stub, r.ciphertext, r.key_id, r.annotations), pt)

    def test_encrypt_is_randomized(self):
        pt = b"\x42" * 32
        a, b = t.encrypt(self.stub, pt), t.encrypt(self.stub, pt)
        self.assertNotEqual(a.ciphertext, b.ciphertext)

    def test_encrypt_plaintext_size_limits(self):
        self.assertEqual(t.rpc_code(t.encrypt, self.stub, b""), StatusCode.INVALID_ARGUMENT)
        self.assertEqual(t.rpc_code(t.encrypt, self.stub, b"x" * 513),
                         StatusCode.INVALID_ARGUMENT)
        self.assertEqual(t.rpc_code(t.encrypt, self.stub, b"x" * 512), StatusCode.OK)

    def test_encrypt_annotations_are_fqdn_within_32k(self):
        r = t.encrypt(self.stub, secrets.token_bytes(32))
        total = 0
        for k, v in r.annotations.items():
            self.assertRegex(k, FQDN_RE, "annotation key must be a lowercase FQDN")
            total += len(k.encode()) + len(v)
        self.assertLessEqual(total, 32 * 1024)

    def test_decrypt_with_annotations_passed_back(self):
        pt = secrets.token_bytes(32)
        r = t.encrypt(self.stub, pt)
        self.assertEqual(t.decrypt(self.stub, r.ciphertext, r.key_id, dict(r.annotations)), pt)

    def test_decrypt_detects_every_flipped_byte(self):
        pt = secrets.token_bytes(32)
        r = t.encrypt(self.stub, pt)
        ct = r.ciphertext
        for i in range(len(ct)):
            for bit in (0x01, 0x80):
                bad = bytearray(ct)
                bad[i] ^= bit
                self.assertEqual(
                    t.rpc_code(t.decrypt, self.stub, bytes(bad), r.key_id, r.annotations),
                    StatusCode.INVALID_ARGUMENT, "flipped bit %#x of byte %d" % (bit, i))
        # the daemon is not confused afterwards
        self.assertEqual(t.decrypt(self.stub, ct, r.key_id, r.annotations), pt)

    def test_decrypt_rejects_truncated_and_extended_ciphertext(self):
        r = t.encrypt(self.stub, secrets.token_bytes(32))
        ct = r.ciphertext
        for n in list(range(0, len(ct))):
            self.assertEqual(t.rpc_code(t.decrypt, self.stub, ct[:n], r.key_id),
                             StatusCode.INVALID_ARGUMENT, "truncated to %d" % n)
        for extra in (b"\x00", secrets.token_bytes(16)):
            self.assertEqual(t.rpc_code(t.decrypt, self.stub, ct + extra, r.key_id),
                             StatusCode.INVALID_ARGUMENT)
        self.assertEqual(t.rpc_code(t.decrypt, self.stub, secrets.token_bytes(2000), r.key_id),
                         StatusCode.INVALID_ARGUMENT)

    def test_decrypt_unknown_key_ids_not_found(self):
        r = t.encrypt(self.stub, secrets.token_bytes(32))
        ident, kcv = r.key_id[len("local:"):].split(".")
        other_kcv = "%016x" % (int(kcv, 16) ^ 1)
        unknown = ["local:%s.%s" % (secrets.token_hex(16), secrets.token_hex(8)),
                   "local:%s.%s" % (ident, other_kcv),          # same identity, other key
                   "local:%s.%s" % (secrets.token_hex(16), kcv)]
        for kid in unknown:
            self.assertEqual(t.rpc_code(t.decrypt, self.stub, r.ciphertext, kid),
                             StatusCode.NOT_FOUND, kid)

    def test_decrypt_malformed_key_ids_rejected(self):
        pt = secrets.token_bytes(32)
        r = t.encrypt(self.stub, pt)
        for kid in ("", "x", r.key_id.upper(), r.key_id + " ", "local:", "kmip:1",
                    "local:" + "a" * 2000, r.key_id + "\x00"):
            self.assertIn(t.rpc_code(t.decrypt, self.stub, r.ciphertext, kid),
                          (StatusCode.NOT_FOUND, StatusCode.INVALID_ARGUMENT), repr(kid))
        self.assertEqual(t.decrypt(self.stub, r.ciphertext, r.key_id), pt)

    def test_64_concurrent_calls_shared_channel(self):
        ch = self.w.channel(fresh=True)
        self.addCleanup(ch.close)
        stub = t.stubs()[1].KeyManagementServiceStub(ch)

        def one(i):
            pt = i.to_bytes(2, "big") + secrets.token_bytes(30)
            r = t.encrypt(stub, pt, uid="c%d" % i, timeout=10)
            self.assertEqual(r.key_id, self.key_id)
            return t.decrypt(stub, r.ciphertext, r.key_id, uid="c%d" % i, timeout=10) == pt

        self.assertTrue(all(t.parallel(one, 256, workers=64)))

    def test_48_concurrent_connections(self):
        """Many clients at once, each on its own connection (below the daemon's
        cap of 64 connections, with room for the class's shared channel)."""
        barrier = threading.Barrier(48, timeout=20)
        chans = [self.w.channel(fresh=True) for _ in range(48)]
        for ch in chans:
            self.addCleanup(ch.close)

        def one(i):
            stub = t.stubs()[1].KeyManagementServiceStub(chans[i])
            pt = secrets.token_bytes(32)
            barrier.wait()
            r = t.encrypt(stub, pt, timeout=10)
            return (t.status(stub, timeout=10).key_id == r.key_id and
                    t.decrypt(stub, r.ciphertext, r.key_id, timeout=10) == pt)

        self.assertTrue(all(t.parallel(one, 48, workers=48)))

    def test_fresh_connection_per_call(self):
        fd_dir = "/proc/%d/fd" % self.w.proc.pid
        t.status(self.stub)
        before = len(os.listdir(fd_dir))
        pt = secrets.token_bytes(32)
        r = t.encrypt(self.stub, pt)
        for i in range(100):
            ch = self.w.channel(fresh=True)
            stub = t.stubs()[1].KeyManagementServiceStub(ch)
            if i % 2:
                self.assertEqual(t.status(stub).healthz, "ok")
            else:
                self.assertEqual(t.decrypt(stub, r.ciphertext, r.key_id), pt)
            ch.close()
        # closed connections are released (allow a little slack for timing)
        deadline = t.time.monotonic() + 5
        while len(os.listdir(fd_dir)) > before + 2 and t.time.monotonic() < deadline:
            t.time.sleep(0.1)
        self.assertLessEqual(len(os.listdir(fd_dir)), before + 2, "daemon leaks fds")

    def test_each_channel_is_its_own_connection(self):
        """Harness check: the fresh channels above really are new connections."""
        fd_dir = "/proc/%d/fd" % self.w.proc.pid
        before = len(os.listdir(fd_dir))
        chans = [self.w.channel(fresh=True) for _ in range(5)]
        for ch in chans:
            self.addCleanup(ch.close)
            t.status(t.stubs()[1].KeyManagementServiceStub(ch))
        self.assertGreaterEqual(len(os.listdir(fd_dir)), before + 5)

    def test_unknown_method_unimplemented(self):
        ch = self.w.channel(fresh=True)
        self.addCleanup(ch.close)
        call = ch.unary_unary("/v2.KeyManagementService/Nope")
        with self.assertRaises(t.grpc.RpcError) as cm:
            call(b"", timeout=5)
        self.assertEqual(cm.exception.code(), StatusCode.UNIMPLEMENTED)
        self.assertEqual(t.status(self.stub).healthz, "ok")

    def test_malformed_protobuf_invalid_argument(self):
        ch = self.w.channel(fresh=True)
        self.addCleanup(ch.close)
        call = ch.unary_unary("/v2.KeyManagementService/Encrypt")
        for body in (b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\xff"):
            with self.assertRaises(t.grpc.RpcError) as cm:
                call(body, timeout=5)
            self.assertEqual(cm.exception.code(), StatusCode.INVALID_ARGUMENT, body.hex())

    def test_oversized_request_rejected(self):
        code = t.rpc_code(t.encrypt, self.stub, b"x" * (4 << 20), timeout=10)
        self.assertIn(code, (StatusCode.INVALID_ARGUMENT, StatusCode.RESOURCE_EXHAUSTED))
        self.assertTrue(self.w.alive())
        self.assertEqual(t.status(self.stub).healthz, "ok")


if __name__ == "__main__":
    unittest.main()
