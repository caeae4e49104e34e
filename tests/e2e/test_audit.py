#!/usr/bin/python3
"""The audit trail on a real journal: a real systemd-journald, started in a
private mount namespace (tmpfs over /run/systemd, /run/log and /var/log, so
the host's journal is never touched; this machine's systemd is not PID 1),
with tpmkmsd's stderr a journal stream as under systemd (JOURNAL_STREAM).

A known sequence (an Encrypt, a burst of Decrypts, failures, a rotation) is
then found with the README's command, `journalctl -t tpmkmsd TPMKMS_AUDIT=1`:
one record for the first call of the burst and one summary for the rest,
every failure a record of its own, and the key lifecycle events with their
MESSAGE_IDs.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
from grpc import StatusCode  # noqa: E402

JOURNALD = "/lib/systemd/systemd-journald"
BURST = 500
AUDIT = "e1a93c47d2b84f0e9a5c6b7d8e9f0a12"
AUDIT_SUMMARY = "4b7e2d90c1a34f58b6e7d8c9a0b1c2d3"
KEY_CREATED = "5c1a2f8e0b9d4f51a6d3e2c47b18f901"
KEY_ROLE = "9e47d0c3a1b24d6c8f05e7a9b2c31d44"


def journal_stream(identifier):
    """A stream to journald as systemd gives a service's stderr (the header
    of journald's stdout protocol: identifier, unit, priority, level prefix,
    forward to syslog, kmsg, console)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/run/systemd/journal/stdout")
    s.sendall(("%s\n\n6\n0\n0\n0\n0\n" % identifier).encode())
    return s


def child(out):
    """In the private mount namespace: journald, tpmkmsd, the sequence."""
    for d in ("/run/systemd", "/run/log", "/var/log"):
        os.makedirs(d, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", d], check=True)
    jd = subprocess.Popen([JOURNALD], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists("/run/systemd/journal/stdout"):
                break
            time.sleep(0.05)
        stream = journal_stream("tpmkmsd")
        st = os.fstat(stream.fileno())
        os.environ["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
        w = t.World()
        try:
            open(w.log_path, "wb").close()
            w._log_file = stream.makefile("wb")
            w.start()
            stub = w.stub()
            enc = t.encrypt(stub, b"a" * 32, uid="enc-1")
            for i in range(BURST):
                t.decrypt(stub, enc.ciphertext, enc.key_id, uid="burst-%d" % i)
            bad = bytearray(enc.ciphertext)
            bad[-1] ^= 1
            codes = [t.rpc_code(t.decrypt, stub, bytes(bad), enc.key_id, uid="bad-%d" % i) for i in range(2)]
            codes.append(t.rpc_code(t.decrypt, stub, enc.ciphertext, "local:gone.00", uid="unknown-1"))
            assert codes == [StatusCode.INVALID_ARGUMENT] * 2 + [StatusCode.NOT_FOUND], codes
            time.sleep(2.5)              # the burst's window ends; the daemon's tick writes its summary
            new = w.ctl("rotate", check=True).stdout.strip()
            rc = w.stop_daemon()
            assert rc == 0, rc
        finally:
            w.close()
        time.sleep(0.5)
        r = subprocess.run(["journalctl", "-t", "tpmkmsd", "TPMKMS_AUDIT=1", "-o", "json", "--no-pager"],
                           capture_output=True, text=True, check=True)
        ev = subprocess.run(["journalctl", "-t", "tpmkmsd", "MESSAGE_ID=" + KEY_CREATED, "+",
                             "MESSAGE_ID=" + KEY_ROLE, "-o", "json", "--no-pager"],
                            capture_output=True, text=True, check=True)
        short = subprocess.run(["journalctl", "-t", "tpmkmsd", "TPMKMS_AUDIT=1", "-o", "short-iso",
                                "--no-pager"], capture_output=True, text=True, check=True)
        with open(out, "w") as f:
            json.dump({"audit": [json.loads(x) for x in r.stdout.splitlines()],
                       "events": [json.loads(x) for x in ev.stdout.splitlines()],
                       "short": short.stdout, "key_id": enc.key_id, "new": new,
                       "pid": os.getpid()}, f)
    finally:
        jd.terminate()
        jd.wait(10)


class AuditJournal(unittest.TestCase):
    def test_sequence_on_a_real_journal(self):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "out.json")
            r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable,
                                os.path.abspath(__file__), "--child", out],
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            with open(out) as f:
                got = json.load(f)
        audit, kid, pid = got["audit"], got["key_id"], str(got["pid"])
        fields = [(a["MESSAGE_ID"], a["TPMKMS_OPERATION"], a["TPMKMS_KEY_ID"], a["TPMKMS_RESULT"],
                   a["TPMKMS_COUNT"], a["TPMKMS_REQUEST_UID"], a["TPMKMS_PEER_UID"], a["TPMKMS_PEER_PID"])
                  for a in audit]
        self.assertEqual(fields, [
            (AUDIT, "encrypt", kid, "ok", "1", "enc-1", "0", pid),
            (AUDIT, "decrypt", kid, "ok", "1", "burst-0", "0", pid),
            (AUDIT, "decrypt", kid, "EBADMSG", "1", "bad-0", "0", pid),
            (AUDIT, "decrypt", kid, "EBADMSG", "1", "bad-1", "0", pid),
            (AUDIT, "decrypt", "local:gone.00", "ENOENT", "1", "unknown-1", "0", pid),
            (AUDIT_SUMMARY, "decrypt", kid, "ok", str(BURST - 1), "burst-%d" % (BURST - 1), "0", pid),
        ])
        summary = audit[-1]
        self.assertLessEqual(int(summary["TPMKMS_FIRST_USEC"]), int(summary["TPMKMS_LAST_USEC"]))
        self.assertIn("%d more call(s)" % (BURST - 1), summary["MESSAGE"])
        self.assertIn("audit decrypt key_id=%s uid=bad-0 peer_uid=0 peer_pid=%s result=EBADMSG" % (kid, pid),
                      got["short"])
        self.assertEqual([(e["MESSAGE_ID"], e["TPMKMS_KEY_ID"], e["TPMKMS_KEY_ROLE"]) for e in got["events"]],
                         [(KEY_CREATED, kid, "primary"), (KEY_ROLE, kid, "retired"),
                          (KEY_CREATED, got["new"], "primary")])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        unittest.main()
