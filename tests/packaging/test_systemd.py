#!/usr/bin/python3
"""tpmkmsd (this build) under systemd's protocols, without systemd as PID 1:
  - socket activation: systemd-socket-activate passes the KMS socket
    (LISTEN_FDS, name "kms") and starts the daemon on the first connection;
  - sd_notify: READY=1 and STOPPING=1 on a test NOTIFY_SOCKET;
  - watchdog: WATCHDOG=1 pings when WATCHDOG_USEC is set, none otherwise;
  - journal: with JOURNAL_STREAM naming its stderr, records go to the journal
    socket with structured fields (checked on a stand-in journal socket in a
    private mount namespace, so the host's journal is never touched).
Everything is on a swtpm on 127.0.0.1 and in a temp dir.
"""
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as T  # noqa: E402

MSG_KEY_CREATED = "5c1a2f8e0b9d4f51a6d3e2c47b18f901"


class Run:
    """One daemon process with its temp dir, config, swtpm and notify socket."""

    def __init__(self, tc, tpm):
        self.tc = tc
        self.dir = tempfile.mkdtemp(prefix="tpmkms-sd-")
        tc.addCleanup(subprocess.run, ["rm", "-rf", self.dir])
        self.kms = os.path.join(self.dir, "kms.sock")
        self.config = os.path.join(self.dir, "tpmkmsd.conf")
        with open(self.config, "w") as f:
            f.write("[kms]\nsocket = %s/own-kms.sock\nallowed_uids = 0\n"
                    "[tpm]\ntcti = %s\n[state]\ndir = %s/state\n[central]\ntype = none\n"
                    "[control]\nsocket = %s/control.sock\n[metrics]\nlisten =\n"
                    % (self.dir, tpm.tcti, self.dir, self.dir))
        self.notify = T.NotifySocket(os.path.join(self.dir, "notify.sock"))
        tc.addCleanup(self.notify.close)
        self.log = os.path.join(self.dir, "log")
        self.proc = None

    def start(self, argv, env=None):
        e = dict(os.environ, NOTIFY_SOCKET=self.notify.path)
        e.pop("JOURNAL_STREAM", None)
        e.update(env or {})
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=e, preexec_fn=T._die_with_parent)
        self.tc.addCleanup(self.kill)

    def wait_for(self, line, timeout=T.READY_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.notify.drain(0.1)
            if self.seen(line):
                return
            if self.proc.poll() is not None:
                break
        self.tc.fail("no %s on NOTIFY_SOCKET; got %r; log:\n%s" % (line, self.notify.messages, self.text()))

    def seen(self, line):
        return any(line in m.split("\n") for m in self.notify.messages)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(T.STOP_TIMEOUT)
        self.notify.drain(0.2)
        return rc

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def stub(self, path):
        import grpc
        ch = grpc.insecure_channel("unix://" + path, options=[("grpc.use_local_subchannel_pool", 1)])
        self.tc.addCleanup(ch.close)
        return T.stubs()[1].KeyManagementServiceStub(ch)


class SystemdTest(unittest.TestCase):
    def setUp(self):
        self.tpmkmsd = T.env_path("TPMKMSD")
        self.tpm = T.Swtpm().start()
        self.addCleanup(self.tpm.close)

    def test_socket_activation_notify(self):
        r = Run(self, self.tpm)
        r.start(["systemd-socket-activate", "-l", r.kms, "--fdname=kms",
                 "-E", "NOTIFY_SOCKET", self.tpmkmsd, "--config", r.config])
        deadline = time.monotonic() + 10
        while not os.path.exists(r.kms) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        self.assertEqual(r.notify.drain(0.0), [], "not started before the first connection")
        # The first connection starts it; the call is served once it is up.
        st = T.status(r.stub(r.kms), timeout=T.READY_TIMEOUT)
        self.assertEqual(st.healthz, "ok")
        r.wait_for("READY=1")
        self.assertIn("Serving KMS v2 on the socket passed by systemd", r.text())
        self.assertFalse(os.path.exists(os.path.join(r.dir, "own-kms.sock")))
        resp = T.encrypt(r.stub(r.kms), b"s" * 32)
        self.assertTrue(resp.key_id)
        self.assertEqual(r.stop(), 0, r.text())
        self.assertTrue(r.seen("STOPPING=1"), r.notify.messages)

    def test_watchdog_pings(self):
        r = Run(self, self.tpm)
        # WATCHDOG_PID must be the daemon's own pid: set it from the shell
        # that execs it, as systemd does for the main process.
        r.start(["sh", "-c", 'WATCHDOG_PID=$$ WATCHDOG_USEC=400000 exec "$0" --config "$1"',
                 self.tpmkmsd, r.config])
        r.wait_for("READY=1")
        time.sleep(1.5)
        r.notify.drain(0.1)
        pings = sum(m.split("\n").count("WATCHDOG=1") for m in r.notify.messages)
        # 400 ms with pings every half of it: about 7 in 1.5 s.
        self.assertGreaterEqual(pings, 3, r.notify.messages)
        self.assertEqual(r.stop(), 0, r.text())
        self.assertTrue(r.seen("STOPPING=1"))

    def test_no_watchdog_without_usec(self):
        r = Run(self, self.tpm)
        r.start([self.tpmkmsd, "--config", r.config])
        r.wait_for("READY=1")
        time.sleep(1.0)
        r.notify.drain(0.1)
        self.assertFalse(any("WATCHDOG=1" in m for m in r.notify.messages))
        self.assertEqual(r.stop(), 0, r.text())
        self.assertTrue(r.seen("STOPPING=1"))
        self.assertTrue(r.seen("READY=1"))

    def test_journal_fields(self):
        self.assertEqual(os.geteuid(), 0, "needs root (a private mount namespace)")
        r = Run(self, self.tpm)
        out = os.path.join(r.dir, "journal.txt")
        # The child half of this file, in its own mount namespace: see journal_child.
        p = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                            os.path.abspath(__file__), "--journal-child", self.tpmkmsd,
                            r.config, r.dir, out],
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        records = []
        with open(out) as f:
            for block in f.read().split("\x1e"):
                if block.strip():
                    records.append(dict(l.split("=", 1) for l in block.strip("\n").split("\n")))
        created = [x for x in records if x.get("MESSAGE_ID") == MSG_KEY_CREATED]
        self.assertTrue(created, records)
        self.assertEqual(created[0]["PRIORITY"], "5")
        self.assertEqual(created[0]["TPMKMS_KEY_ROLE"], "primary")
        key_id = created[0]["TPMKMS_KEY_ID"]
        audit = [x for x in records if x.get("TPMKMS_AUDIT") == "1"]
        self.assertEqual(len(audit), 1, records)
        a = audit[0]
        self.assertEqual((a["TPMKMS_OPERATION"].lower(), a["TPMKMS_KEY_ID"], a["TPMKMS_REQUEST_UID"],
                          a["TPMKMS_PEER_UID"], a["PRIORITY"], a["TPMKMS_RESULT"]),
                         ("encrypt", key_id, "journal-test-uid", "0", "6", "ok"))
        self.assertEqual(int(a["TPMKMS_PEER_PID"]), int(p.stdout.strip().split()[-1]))
        for x in records:
            self.assertEqual(x.get("SYSLOG_IDENTIFIER"), "tpmkmsd")
            self.assertIn("PRIORITY", x)
        with open(os.path.join(r.dir, "stderr")) as f:
            self.assertEqual(f.read(), "", "nothing on stderr when it is the journal's")


def parse_native(data):
    """journald's native protocol: KEY=VALUE\\n, or KEY\\n<le64 size><data>\\n."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            k = line
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            v = data[nl + 9:nl + 9 + n]
            i = nl + 9 + n + 1
        fields[k.decode()] = v.decode(errors="replace")
    return fields


def journal_child(tpmkmsd, config, tmp, out):
    """In a private mount namespace: a tmpfs over /run (only here), a
    datagram socket at /run/systemd/journal/socket standing in for journald,
    stderr in a file that JOURNAL_STREAM names. Start, Encrypt once, stop."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"], check=True)
    os.makedirs("/run/systemd/journal")
    j = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    j.bind("/run/systemd/journal/socket")
    j.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    notify = T.NotifySocket(os.path.join(tmp, "notify-j.sock"))
    err = open(os.path.join(tmp, "stderr"), "wb")
    st = os.fstat(err.fileno())
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
    proc = subprocess.Popen([tpmkmsd, "--config", config], stdin=subprocess.DEVNULL,
                            stdout=err, stderr=err, env=env, preexec_fn=T._die_with_parent)
    try:
        deadline = time.monotonic() + T.READY_TIMEOUT
        while not any("READY=1" in m for m in notify.messages):
            notify.drain(0.1)
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("daemon not ready")
        import grpc
        with open(config) as f:
            kms = [l.split("=", 1)[1].strip() for l in f if l.startswith("socket")][0]
        ch = grpc.insecure_channel("unix://" + kms, options=[("grpc.use_local_subchannel_pool", 1)])
        stub = T.stubs()[1].KeyManagementServiceStub(ch)
        T.encrypt(stub, b"j" * 32, uid="journal-test-uid")
        ch.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(T.STOP_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    j.setblocking(False)
    with open(out, "w") as f:
        try:
            while True:
                f.write("\n".join("%s=%s" % kv for kv in parse_native(j.recv(1 << 20)).items()
                                  if "\n" not in kv[1]) + "\n\x1e")
        except BlockingIOError:
            pass
    print("peer pid", os.getpid())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--journal-child":
        journal_child(*sys.argv[2:6])
    else:
        unittest.main()
