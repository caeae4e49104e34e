#!/usr/bin/python3
"""agent/kmip.c against a real PyKMIP 0.10 server.

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
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings

warnings.simplefilter("ignore")
from kmip.core import enums                                # noqa: E402
from kmip.core import objects as cobjects                  # noqa: E402
from kmip.core.factories import attributes as attr_factory  # noqa: E402
from kmip.pie.client import ProxyKmipClient                # noqa: E402

GROUP = "cluster-a-kek"
EREMOTEIO = 121
FAILURES = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILURES.append(what)


def sh(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_certs(d):
    """CA, server cert for 127.0.0.1, two client certs with EKU clientAuth."""
    os.makedirs(d)
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
       "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=tpmkms interop CA",
       "-addext", "basicConstraints=critical,CA:TRUE",
       "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    exts = {
        "server": "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                  "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
        "client": "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                  "extendedKeyUsage=clientAuth\n",
    }
    for name, cn, ext in (("server", "127.0.0.1", "server"), ("admin", "kek-admin", "client"),
                          ("node", "node-a", "client")):
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write(exts[ext])
        sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key",
           "-out", name + ".csr", "-subj", "/CN=" + cn, cwd=d)
        sh("openssl", "x509", "-req", "-in", name + ".csr", "-CA", "ca.crt", "-CAkey", "ca.key",
           "-CAcreateserial", "-days", "2", "-sha256", "-extfile", name + ".ext",
           "-out", name + ".crt", cwd=d)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pykmip(d, port):
    certs = os.path.join(d, "certs")
    pol = os.path.join(d, "policies")
    os.makedirs(pol)
    # Hosts other than the creator may locate, read and get the keys.
    with open(os.path.join(pol, "shared.json"), "w") as f:
        json.dump({"shared": {"preset": {"SYMMETRIC_KEY": {
            "LOCATE": "ALLOW_ALL", "GET": "ALLOW_ALL", "GET_ATTRIBUTES": "ALLOW_ALL",
            "GET_ATTRIBUTE_LIST": "ALLOW_ALL", "CHECK": "ALLOW_ALL",
            "ADD_ATTRIBUTE": "ALLOW_OWNER", "MODIFY_ATTRIBUTE": "ALLOW_OWNER",
            "DELETE_ATTRIBUTE": "ALLOW_OWNER", "SET_ATTRIBUTE": "ALLOW_OWNER",
            "ACTIVATE": "ALLOW_OWNER", "REVOKE": "ALLOW_OWNER", "DESTROY": "ALLOW_OWNER"}}}}, f)
    conf = os.path.join(d, "server.conf")
    with open(conf, "w") as f:
        f.write("[server]\nhostname=127.0.0.1\nport=%d\n"
                "certificate_path=%s/server.crt\nkey_path=%s/server.key\nca_path=%s/ca.crt\n"
                "auth_suite=TLS1.2\npolicy_path=%s\nenable_tls_client_auth=True\n"
                "logging_level=DEBUG\ndatabase_path=%s/pykmip.db\n"
                % (port, certs, certs, certs, pol, d))
    log = os.path.join(d, "server.log")
    open(log, "w").close()
    out = open(os.path.join(d, "stdout.log"), "w")
    # Own session and process group: PyKMIP forks helpers; SIGINT stops it.
    proc = subprocess.Popen(["/usr/bin/python3", "/usr/bin/pykmip-server", "-f", conf, "-l", log],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("pykmip exited: " + open(os.path.join(d, "stdout.log")).read()[-2000:])
        text = open(log).read()
        # listening, and the policy monitor has loaded shared.json (~1 s)
        if "Starting connection service" in text and "Loading policies for file" in text:
            return proc
        time.sleep(0.1)
    stop_pykmip(proc)
    raise RuntimeError("pykmip not ready after 30 s")


def stop_pykmip(proc):
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)     # leftovers of the group
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def admin_client(certs, port):
    return ProxyKmipClient(hostname="127.0.0.1", port=port,
                           cert=certs + "/admin.crt", key=certs + "/admin.key", ca=certs + "/ca.crt",
                           ssl_version="PROTOCOL_TLSv1_2", kmip_version=enums.KMIPVersion.KMIP_1_2,
                           config_file="/dev/null")


def create_key(c, name, group):
    af = attr_factory.AttributeFactory()
    attrs = [
        af.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_ALGORITHM,
                            enums.CryptographicAlgorithm.AES),
        af.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_LENGTH, 256),
        af.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_USAGE_MASK,
                            [enums.CryptographicUsageMask.ENCRYPT,
                             enums.CryptographicUsageMask.DECRYPT]),
        af.create_attribute(enums.AttributeType.OPERATION_POLICY_NAME, "shared"),
        af.create_attribute(enums.AttributeType.NAME, name),
    ]
    if group:
        attrs.append(af.create_attribute(enums.AttributeType.OBJECT_GROUP, group))
    r = c.proxy.create(enums.ObjectType.SYMMETRIC_KEY, cobjects.TemplateAttribute(attributes=attrs))
    if r.result_status.value != enums.ResultStatus.SUCCESS:
        raise RuntimeError("create failed: %s %s" % (r.result_reason, r.result_message))
    return r.uuid


class Helper:
    def __init__(self, exe, port, certs, corpus):
        self.exe, self.port, self.certs, self.corpus, self.n = exe, port, certs, corpus, 0

    def __call__(self, op, *args, version=None):
        cmd = [self.exe]
        if version:
            cmd += ["-v", version]
        if self.corpus:
            self.n += 1
            cmd += ["-o", os.path.join(self.corpus, "pykmip-%s-%d" % (op, self.n))]
        cmd += ["127.0.0.1", str(self.port), self.certs + "/ca.crt", self.certs + "/node.crt",
                self.certs + "/node.key", op] + [str(a) for a in args]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
        if p.returncode != 0:
            raise RuntimeError("%s failed (%d): %s %s" % (cmd, p.returncode, p.stdout, p.stderr))
        fields = {}
        for line in p.stdout.splitlines():
            k, _, v = line.partition(" ")
            fields.setdefault(k, []).append(v)
        fields["rc"] = int(fields["rc"][0])
        return fields


def run(exe, d):
    certs = os.path.join(d, "certs")
    make_certs(certs)
    port = free_port()
    proc = start_pykmip(d, port)
    try:
        corpus = os.environ.get("KMIP_INTEROP_CORPUS")
        if corpus:
            os.makedirs(corpus, exist_ok=True)
        helper = Helper(exe, port, certs, corpus)
        t0 = int(time.time())

        # Seed: four versions in the group, one key outside it.
        with admin_client(certs, port) as c:
            k_old = create_key(c, "kek-v1", GROUP)         # will be Deactivated
            k_cur = create_key(c, "kek-v2", GROUP)         # Active
            k_new = create_key(c, "kek-v3", GROUP)         # Pre-Active (staged)
            k_bad = create_key(c, "kek-v0", GROUP)         # Compromised
            k_other = create_key(c, "elsewhere", "other-group")
            for k in (k_old, k_cur, k_bad, k_other):
                c.activate(k)
            c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, k_old, "rotated")
            c.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, k_bad, "leaked")
            values = {k: c.get(k).value.hex() for k in (k_old, k_cur, k_new)}
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

        for op in ("get", "attrs"):
            r = helper(op, "999999")
            check(r["rc"] == -EREMOTEIO and r.get("reason") == ["1"]
                  and r.get("reason_name") == ["Item Not Found"],
                  "%s of a nonexistent uid: -EREMOTEIO, Item Not Found (got %s)" % (op, r))
    finally:
        stop_pykmip(proc)
    check(proc.poll() is not None, "PyKMIP stopped")


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    exe = os.path.abspath(sys.argv[1])
    d = tempfile.mkdtemp(prefix="tpmkms-kmip-interop-")
    try:
        run(exe, d)
    except Exception as e:                  # noqa: BLE001 -- report, then fail
        FAILURES.append(repr(e))
        print("ERROR", repr(e), flush=True)
    if FAILURES:
        for name in ("server.log", "stdout.log"):
            p = os.path.join(d, name)
            if os.path.exists(p):
                print("---- %s (tail)" % name)
                print(open(p, errors="replace").read()[-4000:])
        print("%d check(s) failed" % len(FAILURES))
    if os.environ.get("KMIP_INTEROP_KEEP"):
        print("kept", d)
    else:
        shutil.rmtree(d, ignore_errors=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
