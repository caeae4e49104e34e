#!/usr/bin/python3
"""agent/kmip/message.c against a real PyKMIP 0.10 server.

Starts PyKMIP on a free 127.0.0.1 port with a throwaway CA, seeds AES-256 keys
in an Object Group with PyKMIP's own client (as an administrator identity,
shared through an operation policy), then runs test-kmip-pykmip (our request
builders and response parsers over a plain TLS client) as a *different* client
identity, the way a control-plane host reads the fleet's keys, and checks what
it parsed against what PyKMIP's client sees.

Usage: /usr/bin/python3 kmip-interop.py PATH/TO/test-kmip-pykmip
Env:   KMIP_INTEROP_KEEP=1 keeps the temporary directory;
       KMIP_INTEROP_CORPUS=DIR saves the raw responses (fuzz seeds).
A missing dependency fails the test; it never skips.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest_kmip as kt  # noqa: E402

GROUP = "cluster-a-kek"
EREMOTEIO = 121
FAILURES = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILURES.append(what)


class Helper:
    def __init__(self, exe, port, pki, corpus):
        self.exe, self.port, self.pki, self.corpus, self.n = exe, port, pki, corpus, 0

    def __call__(self, op, *args, version=None):
        cmd = [self.exe]
        if version:
            cmd += ["-v", version]
        if self.corpus:
            self.n += 1
            cmd += ["-o", os.path.join(self.corpus, "pykmip-%s-%d" % (op, self.n))]
        cmd += ["127.0.0.1", str(self.port), self.pki.crt("ca"), self.pki.crt("node"),
                self.pki.key("node"), op] + [str(a) for a in args]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
        if p.returncode != 0:
            raise RuntimeError("%s failed (%d): %s %s" % (cmd, p.returncode, p.stdout, p.stderr))
        fields = {}
        for line in p.stdout.splitlines():
            name, _, v = line.partition(" ")
            fields.setdefault(name, []).append(v)
        fields["rc"] = int(fields["rc"][0])
        return fields


def run(exe, d):
    kt._kmip()                  # PyKMIP importable, or fail now
    # CA, server cert for 127.0.0.1, an administrator and a host client cert
    pki = kt.Pki(os.path.join(d, "certs"), minimal=True, days=2)
    pki.make_client("admin", "kek-admin").make_client("node", "node-a")
    # DEBUG: the whole exchange is in server.log, printed on a failure
    kms = kt.KmipServer(pki, directory=d, log_level="DEBUG")
    proc = None
    try:
        kms.start()
        proc = kms.proc
        corpus = os.environ.get("KMIP_INTEROP_CORPUS")
        if corpus:
            os.makedirs(corpus, exist_ok=True)
        helper = Helper(exe, kms.port, pki, corpus)
        t0 = int(time.time())

        # Seed as the administrator, operation policy "shared" (hosts other
        # than the creator may locate, read and get the keys): four versions
        # in the group, one key outside it.
        def create(name, group):
            return kms.create_key(group, name, cn="admin", policy="shared")
        k_old = create("kek-v1", GROUP)         # will be Deactivated
        k_cur = create("kek-v2", GROUP)         # Active
        k_new = create("kek-v3", GROUP)         # Pre-Active (staged)
        k_bad = create("kek-v0", GROUP)         # Compromised
        k_other = create("elsewhere", "other-group")
        for key in (k_old, k_cur, k_bad, k_other):
            kms.activate(key, cn="admin")
        kms.deactivate(k_old, cn="admin", message="rotated")
        kms.compromise(k_bad, cn="admin", message="leaked")
        values = {key: kms.get(key, cn="admin").hex() for key in (k_old, k_cur, k_new)}
        print("seeded old=%s cur=%s new=%s bad=%s other=%s" % (k_old, k_cur, k_new, k_bad, k_other))

        r = helper("discover")
        check(r["rc"] == 0, "DiscoverVersions succeeds")
        check(r.get("version") == ["1.2", "1.1", "1.0"],
              "DiscoverVersions lists 1.2, 1.1, 1.0 (got %s)" % r.get("version"))

        r = helper("locate", GROUP)
        check(r["rc"] == 0 and sorted(r.get("uid", [])) == sorted([k_old, k_cur, k_new, k_bad]),
              "Locate by group finds exactly the group's keys (got %s)" % r.get("uid"))
        for st, want in ((1, [k_new]), (2, [k_cur]), (3, [k_old]), (4, [k_bad])):
            r = helper("locate", GROUP, st)
            check(r["rc"] == 0 and r.get("uid", []) == want,
                  "Locate by group and State %d finds %s (got %s)" % (st, want, r.get("uid")))
        r = helper("locate", "no-such-group")
        check(r["rc"] == 0 and "uid" not in r, "Locate of an unknown group finds nothing")
        for v in ("1.0", "1.1"):
            r = helper("locate", GROUP, 2, version=v)
            check(r["rc"] == 0 and r.get("uid", []) == [k_cur], "Locate as KMIP %s" % v)

        now = int(time.time())
        for k, name, st in ((k_old, "kek-v1", 3), (k_cur, "kek-v2", 2), (k_new, "kek-v3", 1)):
            r = helper("attrs", k)
            check(r["rc"] == 0, "GetAttributes %s succeeds" % k)
            if r["rc"] != 0:
                continue
            check(r["uid"] == [k], "GetAttributes uid")
            check(r["state"] == [str(st)], "GetAttributes State %d (got %s)" % (st, r["state"]))
            ini = int(r["initial_date"][0])
            check(t0 - 5 <= ini <= now + 5, "GetAttributes Initial Date %d in [%d, %d]" % (ini, t0, now))
            check(r["name"] == [name], "GetAttributes Name %s (got %s)" % (name, r["name"]))
            check(r["object_type"] == ["2"] and r["algorithm"] == ["3"] and r["length"] == ["256"],
                  "GetAttributes Symmetric Key, AES, 256")

        for k in (k_cur, k_old, k_new):
            r = helper("get", k)
            check(r["rc"] == 0 and r.get("uid") == [k], "Get %s succeeds" % k)
            check(r.get("key") == [values[k]], "Get %s returns the bytes PyKMIP's client gets" % k)
        r = helper("get", k_cur, version="1.0")
        check(r["rc"] == 0 and r.get("key") == [values[k_cur]], "Get as KMIP 1.0")

        # One batch (KMIP 1.2 section 7.1): Locate, then GetAttributes and Get
        # of each uid; the nonexistent one fails its two items only (Batch
        # Error Continuation Option Continue), the others still answer.
        r = helper("batch", GROUP, k_cur, "999999", k_new)
        check(r["rc"] == 0, "batch: parsed (got %s)" % r)
        check(sorted(r.get("locate_uid", [])) == sorted([k_old, k_cur, k_new, k_bad]),
              "batch: Locate item finds the group (got %s)" % r.get("locate_uid"))
        check(r.get("attrs") == ["%s 2" % k_cur, "%s 1" % k_new],
              "batch: GetAttributes items of the existing uids (got %s)" % r.get("attrs"))
        check(r.get("key") == ["%s %s" % (k_cur, values[k_cur]), "%s %s" % (k_new, values[k_new])],
              "batch: Get items return the bytes PyKMIP's client gets")
        check(r.get("failed") == ["3 1", "4 1"],
              "batch: both items of the nonexistent uid fail with Item Not Found (got %s)" % r.get("failed"))
        r = helper("batch", GROUP, k_old, version="1.0")
        check(r["rc"] == 0 and r.get("attrs") == ["%s 3" % k_old], "batch as KMIP 1.0")

        for op in ("get", "attrs"):
            r = helper(op, "999999")
            check(r["rc"] == -EREMOTEIO and r.get("reason") == ["1"]
                  and r.get("reason_name") == ["Item Not Found"],
                  "%s of a nonexistent uid: -EREMOTEIO, Item Not Found (got %s)" % (op, r))
    finally:
        kms.close()
    check(proc is not None and proc.poll() is not None and not kms.running(), "PyKMIP stopped")


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    exe = os.path.abspath(sys.argv[1])
    # SIGTERM (ctest, CI) unwinds through run()'s finally like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    d = tempfile.mkdtemp(prefix="tpmkms-kmip-interop-")
    try:
        try:
            run(exe, d)
        except Exception as e:              # noqa: BLE001 -- report, then fail
            FAILURES.append(repr(e))
            print("ERROR", repr(e), flush=True)
        if FAILURES:
            for name in ("server.log", "stdout.log"):
                p = os.path.join(d, name)
                if os.path.exists(p):
                    print("---- %s (tail)" % name)
                    print(open(p, errors="replace").read()[-4000:])
            print("%d check(s) failed" % len(FAILURES))
    finally:
        if os.environ.get("KMIP_INTEROP_KEEP"):
            print("kept", d)
        else:
            shutil.rmtree(d, ignore_errors=True)
    return 1 if FAILURES else 0

if __name__ == "__main__":
    sys.exit(main())
