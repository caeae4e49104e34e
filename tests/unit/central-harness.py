#!/usr/bin/python3
"""Real servers for tests/unit/test-central.c, on 127.0.0.1 with free ports.

Usage: central-harness.py TEST_BINARY

Makes a throwaway PKI (tests/lib/tpmkmstest_kmip.Pki: CA, server and client
certificates, a client certificate without clientAuth, a server certificate
for another name, a second unrelated CA), starts PyKMIP 0.10 (the central KMS,
tpmkmstest_kmip.KmipServer), seeds it with PyKMIP's own client, starts
`openssl s_server` variants and a TCP listener that never speaks TLS, then
runs the test binary with their ports and paths in CENTRAL_* environment
variables. Everything it started is stopped and its temporary directory
removed on every path. A missing dependency fails the test: it never skips.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest_kmip as k  # noqa: E402

GROUP = "cluster-a-kek"
OTHER_GROUP = "cluster-b-kek"
CLIENT_CN = "tpmkms-node-a"
CLIENT2_CN = "tpmkms-node-b"


def log(msg):
    print("central-harness: " + msg, file=sys.stderr, flush=True)


def make_certs(d):
    """CA, server (IP:127.0.0.1, DNS:localhost), two clients with clientAuth,
    one with serverAuth only, one without EKU, a server cert for another name,
    a server cert from a second CA the client does not trust, and a copy of
    the client key others can read. File names are what test-central.c uses."""
    pki = k.Pki(d, minimal=True, days=2)            # ca, ca2, server
    pki.make_client("client", CLIENT_CN)
    pki.make_client("client2", CLIENT2_CN)
    # serverAuth only: OpenSSL servers refuse it for the client purpose
    # during the handshake, PyKMIP after it (it wants clientAuth).
    pki.make_leaf("noclientauth", CLIENT_CN, ["extendedKeyUsage=serverAuth"])
    # No EKU at all: TLS accepts it for any purpose, PyKMIP then refuses it
    # in a KMIP answer (Authentication Not Successful).
    pki.make_leaf("noeku", CLIENT_CN, [])
    pki.make_server("othername", "kms.other.example", "DNS:kms.other.example")
    pki.make_server("rogue", "127.0.0.1", "IP:127.0.0.1,DNS:localhost", ca="ca2")
    pki.copy_key("client", "client-0644", 0o644)
    return pki


class Servers:
    """openssl s_server processes and silent listeners, stopped in reverse order."""

    def __init__(self, pki):
        self.pki = pki
        self.procs = []       # (name, Popen)
        self.sockets = []

    def start_s_server(self, name, cert, extra=()):
        port = k.free_port()
        # No -www: after the handshake it waits for stdin (a pipe we never
        # write), so it also serves as a TLS server that never answers.
        p = subprocess.Popen(["openssl", "s_server", "-accept", "127.0.0.1:%d" % port,
                              "-cert", self.pki.crt(cert), "-key", self.pki.key(cert), *extra],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, p))
        deadline = time.monotonic() + 10
        line = b""
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line or line.startswith(b"ACCEPT"):
                break
        if not line.startswith(b"ACCEPT"):
            raise RuntimeError("openssl s_server %s did not start" % name)
        # Drain its chatter so that it never blocks on a full pipe.
        subprocess.Popen(["cat"], stdin=p.stdout, stdout=subprocess.DEVNULL)
        p.stdout.close()
        return port

    def silent_listener(self):
        """Accepts TCP (the kernel completes it from the backlog) and never
        speaks: a TLS handshake against it can only time out."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        self.sockets.append(s)
        return s.getsockname()[1]

    def stop(self):
        for name, p in reversed(self.procs):
            if not k.stop_group(p):
                log("%s: SIGKILL" % name)
        for s in self.sockets:
            s.close()


def seed(kms):
    """Four versions in GROUP (Pre-Active, Active, Deactivated, Compromised)
    and one in OTHER_GROUP, made and read back as "client" (CN=CLIENT_CN,
    the owner) with PyKMIP's own client, operation policy "shared"."""
    def create(group, name):
        return kms.create_key(group, name, cn="client", policy="shared")

    pre = create(GROUP, "kek-pre")
    act = create(GROUP, "kek-active")
    kms.activate(act, cn="client")
    deact = create(GROUP, "kek-deactivated")
    kms.activate(deact, cn="client")
    kms.deactivate(deact, cn="client", message="rotated")
    comp = create(GROUP, "kek-compromised")
    kms.compromise(comp, cn="client", message="leaked")
    other = create(OTHER_GROUP, "kek-other-group")
    kms.activate(other, cn="client")
    keys = []
    for uid, state in ((pre, 1), (act, 2), (deact, 3), (comp, 4)):
        st = kms.state_value(uid, cn="client")
        if st != state:
            raise RuntimeError("seeded %s in state %s, wanted %d" % (uid, st, state))
        value = kms.get(uid, cn="client").hex() if state != 4 else "-"
        keys.append("%s:%d:%s" % (uid, state, value))
    return ",".join(keys), other


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    binary = os.path.abspath(sys.argv[1])
    # SIGTERM (ctest, CI) unwinds through the finally below like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.mkdtemp(prefix="tpmkms-central.")
    kms = servers = None
    try:
        pki = make_certs(os.path.join(tmp, "certs"))
        servers = Servers(pki)
        env = dict(os.environ)
        env["CENTRAL_CERTS"] = pki.dir
        env["CENTRAL_GROUP"] = GROUP
        kms = k.KmipServer(pki, directory=os.path.join(tmp, "pykmip"))
        kms.start()
        env["CENTRAL_KMIP_PORT"] = str(kms.port)
        env["CENTRAL_KEYS"], env["CENTRAL_OTHER_UID"] = seed(kms)
        env["CENTRAL_ROGUE_PORT"] = str(servers.start_s_server("rogue", "rogue"))
        env["CENTRAL_OTHERNAME_PORT"] = str(servers.start_s_server("othername", "othername"))
        # Wants a client certificate for the TLS client purpose (clientAuth).
        env["CENTRAL_STRICT_PORT"] = str(servers.start_s_server(
            "strict", "server",
            ("-CAfile", pki.crt("ca"), "-Verify", "1", "-verify_return_error")))
        env["CENTRAL_SILENT_TLS_PORT"] = str(servers.start_s_server("silent", "server"))
        env["CENTRAL_SILENT_TCP_PORT"] = str(servers.silent_listener())
        env["CENTRAL_DEAD_PORT"] = str(k.dead_port())
        log("pykmip on port %d, seeded %s" % (kms.port, " ".join(
            key.split(":")[0] for key in env["CENTRAL_KEYS"].split(","))))
        return subprocess.run([binary], env=env, timeout=240).returncode
    finally:
        if servers is not None:
            servers.stop()
        if kms is not None:
            kms.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
