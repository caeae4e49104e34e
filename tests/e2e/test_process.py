#!/usr/bin/python3
"""tpmkmsd as a process: --version, --check-config, sd_notify, SIGTERM under
load, a second instance, a stale socket, an unreachable TPM."""
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
from tpmkmstest import DATA, HEADERS, GOAWAY, END_STREAM, END_HEADERS, h2_frame  # noqa: E402
from grpc import RpcError, StatusCode  # noqa: E402


class CommandLineTest(unittest.TestCase):
    def setUp(self):
        self.w = t.World(self)

    def run_d(self, *args):
        return subprocess.run([self.w.tpmkmsd] + list(args), capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)

    def test_version(self):
        r = self.run_d("--version")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout + r.stderr, r"\d+\.\d+\.\d+")

    def run_ctl(self, *args):
        return subprocess.run([self.w.tpmkmsctl, "--config", self.w.config] + list(args),
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)

    def test_encryption_config(self):
        import yaml
        self.w.write_config(tcti="swtpm:host=127.0.0.1,port=1")
        r = self.run_ctl("encryption-config")      # no daemon needed
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("stored unencrypted):\n#   secrets\n", r.stdout)
        doc = yaml.safe_load(r.stdout)
        self.assertEqual(doc["apiVersion"], "apiserver.config.k8s.io/v1")
        self.assertEqual(doc["kind"], "EncryptionConfiguration")
        (entry,) = doc["resources"]
        self.assertEqual(entry["resources"], ["secrets"])
        # fail-closed: the KMS provider alone, no identity fallback
        self.assertEqual(entry["providers"], [{"kms": {
            "apiVersion": "v2", "name": "tpmkms",
            "endpoint": "unix://" + self.w.kms_sock, "timeout": "3s"}}])

        r = self.run_ctl("encryption-config", "--name", "cluster-a", "--timeout", "5s",
                         "secrets", "configmaps")
        self.assertEqual(r.returncode, 0, r.stderr)
        (entry,) = yaml.safe_load(r.stdout)["resources"]
        self.assertEqual(entry["resources"], ["secrets", "configmaps"])
        self.assertEqual(entry["providers"][0]["kms"]["name"], "cluster-a")
        self.assertEqual(entry["providers"][0]["kms"]["timeout"], "5s")

        self.assertIn("# Fail closed while tpmkmsd is down", r.stdout)
        self.assertIn("#   secrets\n#   configmaps\n", r.stdout)

        # --fallback identity: the same kms provider, then identity, and the
        # comments say that this no longer fails closed.
        r = self.run_ctl("encryption-config", "--fallback", "identity", "secrets", "configmaps")
        self.assertEqual(r.returncode, 0, r.stderr)
        (entry,) = yaml.safe_load(r.stdout)["resources"]
        self.assertEqual(entry["resources"], ["secrets", "configmaps"])
        self.assertEqual(entry["providers"], [{"kms": {
            "apiVersion": "v2", "name": "tpmkms",
            "endpoint": "unix://" + self.w.kms_sock, "timeout": "3s"}}, {"identity": {}}])
        self.assertIn("stored unencrypted): none of the resources below", r.stdout)
        self.assertIn("# Fallback: NOT fail-closed.", r.stdout)
        self.assertLess(r.stdout.index("Fallback: NOT fail-closed"), r.stdout.index("- identity: {}"))

        for bad in (["bad name"], ["--timeout", "250ms"], ["--name", "a: b"], ["--fallback", "aescbc"]):
            r = self.run_ctl("encryption-config", *bad)
            self.assertEqual(r.returncode, 1, bad)
            self.assertTrue(r.stderr.startswith("tpmkmsctl: "), r.stderr)
            self.assertEqual(r.stdout, "")

    def test_check_config_good(self):
        self.w.write_config(tcti="swtpm:host=127.0.0.1,port=1")
        r = self.run_d("--check-config", "--config", self.w.config)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_check_config_bad_names_file_and_line(self):
        self.w.write_config(tcti="swtpm:host=127.0.0.1,port=1")
        with open(self.w.config) as f:
            good = f.read().splitlines()
        kms_line = good.index("[kms]")

        def variant(edit):
            lines = list(good)
            line = edit(lines)
            with open(self.w.config, "w") as f:
                f.write("\n".join(lines) + "\n")
            return line

        def replace(key, value):
            def edit(lines):
                i = next(n for n, l in enumerate(lines) if l.split("=")[0].strip() == key)
                lines[i] = "%s = %s" % (key, value)
                return [i + 1]
            return edit

        def insert(after, text):
            def edit(lines):
                i = lines.index(after) + 1
                lines[i:i] = text.split("\n")
                return [i + 1 + k for k in range(len(text.split("\n")))]
            return edit

        cases = {
            "bad uid": replace("allowed_uids", "root-ish"),
            "bad pcr bank": replace("pcrs", "sha999:7"),
            "pcr out of range": replace("pcrs", "sha256:99"),
            "bad central type": replace("type", "carrier-pigeon"),
            "unknown key": insert("[kms]", "frobnicate = yes"),
            # inih reports the section's first key; either line names the fault
            "unknown section": insert("[control]", "[bogus]\nanswer = 42\n[control]"),
        }
        self.assertEqual(kms_line, 0)
        for what, edit in cases.items():
            lines = variant(edit)[:2]
            r = self.run_d("--check-config", "--config", self.w.config)
            self.assertEqual(r.returncode, 1, "%s: exit %d" % (what, r.returncode))
            self.assertTrue(any("%s:%d:" % (self.w.config, n) in r.stderr for n in lines),
                            "%s: want %s:%s: in %r" % (what, self.w.config, lines, r.stderr))
        r = self.run_d("--check-config", "--config", os.path.join(self.w.dir, "missing.conf"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("missing.conf", r.stderr)

    def test_tpm_unreachable_exits_nonzero(self):
        port = t.free_port_pair()
        self.w.write_config(tcti="swtpm:host=127.0.0.1,port=%d" % port)
        self.w.start_daemon(wait_ready=False)
        try:
            rc = self.w.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.fail("tpmkmsd keeps running without a TPM")
        self.assertNotEqual(rc, 0)
        self.assertRegex(self.w.log(), re.compile(r"tpm", re.I))
        self.w.notify.drain(0.1)
        self.assertFalse(self.w.notify.seen("READY=1"))


class LifecycleSignalsTest(unittest.TestCase):
    def setUp(self):
        self.w = t.World(self)
        self.w.start()

    def assert_clean_exit(self, rc):
        self.assertEqual(rc, 0, self.w.log())
        self.assertFalse(os.path.exists(self.w.kms_sock), "KMS socket left behind")
        self.w.notify.drain(0.2)
        self.assertTrue(self.w.notify.seen("STOPPING=1"), self.w.notify.messages)

    def test_ready_then_sigterm_idle(self):
        self.assertTrue(self.w.notify.seen("READY=1"))
        self.assertEqual(t.status(self.w.stub()).healthz, "ok")
        idle = t.RawConn(self.w.kms_sock)
        self.addCleanup(idle.close)
        idle.h2_handshake()
        self.w.signal(signal.SIGTERM)
        fr = idle.frames(10)
        # an idle client is told (GOAWAY, RFC 9113 6.8) and then disconnected
        self.assertTrue(idle.closed, "idle connection kept open after SIGTERM")
        self.assertIn(GOAWAY, [f[0] for f in fr], "no GOAWAY before closing")
        self.assert_clean_exit(self.w.stop_daemon())

    def test_sigterm_during_load(self):
        stop = threading.Event()
        lock = threading.Lock()
        ok = [0]
        bad = []
        codes = []

        def worker(i):
            ch = self.w.channel(fresh=True)
            stub = t.stubs()[1].KeyManagementServiceStub(ch)
            while not stop.is_set():
                pt = secrets.token_bytes(32)
                try:
                    r = t.encrypt(stub, pt, timeout=5)
                    got = t.decrypt(stub, r.ciphertext, r.key_id, timeout=5)
                except RpcError as e:
                    with lock:
                        codes.append(e.code())
                        if e.code() != StatusCode.UNAVAILABLE:
                            bad.append("%s: %s" % (e.code(), e.details()))
                    return
                with lock:
                    if got != pt:
                        bad.append("wrong plaintext")
                    ok[0] += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for th in threads:
            th.start()
        try:
            time.sleep(1.0)
            with lock:
                before = ok[0]
            self.w.signal(signal.SIGTERM)
            try:
                rc = self.w.proc.wait(t.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.fail("tpmkmsd did not exit within %ds of SIGTERM under load"
                          % t.STOP_TIMEOUT)
        finally:
            stop.set()
            for th in threads:
                th.join(30)
        self.assertGreater(before, 0, "no call succeeded before SIGTERM")
        self.assertEqual(bad, [], "calls failed other than UNAVAILABLE after SIGTERM")
        self.assert_clean_exit(rc)

    def test_sigterm_completes_request_in_flight(self):
        """A request whose HEADERS and part of its body arrived before SIGTERM is
        answered after it (graceful drain), and the answer is a real ciphertext."""
        key_id = t.status(self.w.stub()).key_id
        pb = t.stubs()[0]
        pt = secrets.token_bytes(32)
        msg = t.grpc_message(pb.EncryptRequest(plaintext=pt, uid="inflight").SerializeToString())
        c = t.RawConn(self.w.kms_sock)
        self.addCleanup(c.close)
        c.h2_handshake()
        c.send(h2_frame(HEADERS, END_HEADERS, 1, t.grpc_request_headers("Encrypt")))
        c.send(h2_frame(DATA, 0, 1, msg[:10]))
        time.sleep(0.2)
        self.w.signal(signal.SIGTERM)
        time.sleep(0.3)
        self.assertTrue(self.w.alive(), "exited with a request in flight")
        c.try_send(h2_frame(DATA, END_STREAM, 1, msg[10:]))
        fr = c.frames(10, until=lambda fs: any(f[2] == 1 and f[1] & END_STREAM for f in fs))
        body = b"".join(f[3] for f in fr if f[0] == DATA and f[2] == 1)
        self.assertGreater(len(body), 5, "no response to the in-flight request: %r" % fr)
        resp = pb.EncryptResponse.FromString(body[5:])
        self.assertEqual(resp.key_id, key_id)
        c.close()
        try:
            rc = self.w.proc.wait(t.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail("no exit after the in-flight request completed")
        self.assert_clean_exit(rc)
        # the answer was a real ciphertext: it decrypts after a restart
        self.w.proc = None
        self.w.start_daemon()
        self.assertEqual(t.decrypt(self.w.stub(), resp.ciphertext, resp.key_id), pt)

    def test_second_instance_refused(self):
        key_id = t.status(self.w.stub()).key_id
        b = t.World(self)
        b.start_tpm()
        b.write_config(kms_sock=self.w.kms_sock)
        b.start_daemon(wait_ready=False)
        try:
            rc = b.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.fail("a second instance on a live socket keeps running")
        self.assertNotEqual(rc, 0)
        self.assertTrue(b.log().strip(), "the refusal needs a message")
        b.notify.drain(0.1)
        self.assertFalse(b.notify.seen("READY=1"))
        self.assertTrue(self.w.alive())
        self.assertTrue(os.path.exists(self.w.kms_sock), "second instance removed the socket")
        st = t.status(self.w.stub(fresh=True))
        self.assertEqual((st.healthz, st.key_id), ("ok", key_id))
        self.assert_clean_exit(self.w.stop_daemon())

    def test_stale_socket_replaced(self):
        key_id = t.status(self.w.stub()).key_id
        self.assertEqual(self.w.stop_daemon(), 0)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.w.kms_sock)                 # a socket file nobody listens on
        s.close()
        self.assertTrue(os.path.exists(self.w.kms_sock))
        self.w.start_daemon()
        st = t.status(self.w.stub())
        self.assertEqual((st.healthz, st.key_id), ("ok", key_id))
        self.assertEqual(os.stat(self.w.kms_sock).st_mode & 0o777, 0o600)

    def test_sigkill_leaves_stale_socket_next_start_serves(self):
        key_id = t.status(self.w.stub()).key_id
        self.w.close_channels()
        self.w.proc.kill()
        self.w.proc.wait()
        self.w.proc = None
        self.assertTrue(os.path.exists(self.w.kms_sock))
        self.w.start_daemon()
        st = t.status(self.w.stub())
        self.assertEqual((st.healthz, st.key_id), ("ok", key_id))


if __name__ == "__main__":
    unittest.main()
