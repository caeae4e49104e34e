#!/usr/bin/python3
"""Real servers for tests/unit/test-central.c, on 127.0.0.1 with free ports.

Usage: central-harness.py TEST_BINARY

Makes a throwaway PKI with openssl (CA, server and client certificates, a
client certificate without clientAuth, a server certificate for another name,
a second unrelated CA), starts PyKMIP 0.10 (the central KMS), seeds it with
PyKMIP's own client, starts `openssl s_server` variants and a TCP listener
that never speaks TLS, then runs the test binary with their ports and paths in
CENTRAL_* environment variables. Everything it started is stopped and its
temporary directory removed on every path. A missing dependency fails the
test: it never skips.
"""
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

GROUP = "cluster-a-kek"
OTHER_GROUP = "cluster-b-kek"
CLIENT_CN = "tpmkms-node-a"
CLIENT2_CN = "tpmkms-node-b"

# Operation policy that lets every authenticated client read the KEKs: in
# PyKMIP the owner is the certificate's CN, and every host has its own.
SHARED_POLICY = """{
  "shared": {"preset": {"SYMMETRIC_KEY": {
    "LOCATE": "ALLOW_ALL", "CHECK": "ALLOW_ALL", "GET": "ALLOW_ALL",
    "GET_ATTRIBUTES": "ALLOW_ALL", "GET_ATTRIBUTE_LIST": "ALLOW_ALL",
    "ADD_ATTRIBUTE": "ALLOW_OWNER", "MODIFY_ATTRIBUTE": "ALLOW_OWNER",
    "DELETE_ATTRIBUTE": "ALLOW_OWNER", "SET_ATTRIBUTE": "ALLOW_OWNER",
    "ACTIVATE": "ALLOW_OWNER", "REVOKE": "ALLOW_OWNER", "DESTROY": "ALLOW_OWNER"}}}
}
"""


def log(msg):
    print("central-harness: " + msg, file=sys.stderr, flush=True)


def run(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(d):
    """CA, server (IP:127.0.0.1, DNS:localhost), two clients with clientAuth,
    one with serverAuth only, one without EKU, a server cert for another name,
    and a server cert from a second CA the client does not trust."""
    def ca(name, cn):
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
            "-keyout", name + ".key", "-out", name + ".crt", "-subj", "/CN=" + cn,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)

    def leaf(name, cn, ext, signer="ca"):
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write("basicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n" + ext + "\n")
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key",
            "-out", name + ".csr", "-subj", "/CN=" + cn, cwd=d)
        run("openssl", "x509", "-req", "-in", name + ".csr", "-CA", signer + ".crt",
            "-CAkey", signer + ".key", "-CAcreateserial", "-days", "2", "-sha256",
            "-extfile", name + ".ext", "-out", name + ".crt", cwd=d)

    ca("ca", "tpmkms test CA")
    ca("ca2", "unrelated test CA")
    leaf("server", "127.0.0.1", "extendedKeyUsage=serverAuth\n"
         "subjectAltName=IP:127.0.0.1,DNS:localhost")
    leaf("client", CLIENT_CN, "extendedKeyUsage=clientAuth")
    leaf("client2", CLIENT2_CN, "extendedKeyUsage=clientAuth")
    # serverAuth only: OpenSSL servers refuse it for the client purpose
    # during the handshake, PyKMIP after it (it wants clientAuth).
    leaf("noclientauth", CLIENT_CN, "extendedKeyUsage=serverAuth")
    # No EKU at all: TLS accepts it for any purpose, PyKMIP then refuses it
    # in a KMIP answer (Authentication Not Successful).
    leaf("noeku", CLIENT_CN, "")
    leaf("othername", "kms.other.example", "extendedKeyUsage=serverAuth\n"
         "subjectAltName=DNS:kms.other.example")
    leaf("rogue", "127.0.0.1", "extendedKeyUsage=serverAuth\n"
         "subjectAltName=IP:127.0.0.1,DNS:localhost", signer="ca2")
    for f in os.listdir(d):
        if f.endswith(".key"):
            os.chmod(os.path.join(d, f), 0o600)
    shutil.copyfile(os.path.join(d, "client.key"), os.path.join(d, "client-0644.key"))
    os.chmod(os.path.join(d, "client-0644.key"), 0o644)


class Servers:
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []       # (name, Popen), stopped in reverse order
        self.sockets = []

    def start_pykmip(self, certs):
        d = os.path.join(self.tmp, "pykmip")
        os.makedirs(os.path.join(d, "policies"))
        with open(os.path.join(d, "policies", "shared.json"), "w") as f:
            f.write(SHARED_POLICY)
        port = free_port()
        conf = os.path.join(d, "server.conf")
        with open(conf, "w") as f:
            f.write("[server]\nhostname=127.0.0.1\nport=%d\n"
                    "certificate_path=%s/server.crt\nkey_path=%s/server.key\nca_path=%s/ca.crt\n"
                    "auth_suite=TLS1.2\npolicy_path=%s/policies\nenable_tls_client_auth=True\n"
                    "logging_level=INFO\ndatabase_path=%s/pykmip.db\n"
                    % (port, certs, certs, certs, d, d))
        logf = os.path.join(d, "server.log")
        open(logf, "w").close()
        out = open(os.path.join(d, "stdout.log"), "w")
        # Own session (setsid): PyKMIP forks helpers that must die with it.
        p = subprocess.Popen(["/usr/bin/python3", "/usr/bin/pykmip-server", "-f", conf, "-l", logf],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        out.close()
        self.procs.append(("pykmip", p))
        # Ready: listening and the policy file loaded (it is polled ~1 s);
        # no TCP probes, they would log handshake failures.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise RuntimeError("pykmip exited: " + open(logf).read()[-2000:])
            text = open(logf).read()
            if "Starting connection service" in text and "Loading policies for file" in text:
                return port
            time.sleep(0.1)
        raise RuntimeError("pykmip not ready after 30 s: " + open(logf).read()[-2000:])

    def start_s_server(self, name, certs, cert, extra=()):
        port = free_port()
        # No -www: after the handshake it waits for stdin (a pipe we never
        # write), so it also serves as a TLS server that never answers.
        p = subprocess.Popen(["openssl", "s_server", "-accept", "127.0.0.1:%d" % port,
                              "-cert", os.path.join(certs, cert + ".crt"),
                              "-key", os.path.join(certs, cert + ".key"), *extra],
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
            if p.poll() is not None:
                continue
            try:
                # SIGINT stops PyKMIP in 1-2 s (SIGTERM waits for its
                # accept timeout), then the whole group goes.
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    log("%s: SIGKILL" % name)
            finally:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for s in self.sockets:
            s.close()


def seed(certs, port):
    """Four versions in GROUP (Pre-Active, Active, Deactivated, Compromised)
    and one in OTHER_GROUP, made and read back with PyKMIP's own client."""
    from kmip.core import enums
    from kmip.core import objects as cobjects
    from kmip.core.factories import attributes as attr_factory
    from kmip.pie.client import ProxyKmipClient

    af = attr_factory.AttributeFactory()
    client = ProxyKmipClient(hostname="127.0.0.1", port=port,
                             cert=os.path.join(certs, "client.crt"),
                             key=os.path.join(certs, "client.key"),
                             ca=os.path.join(certs, "ca.crt"), ssl_version="PROTOCOL_TLSv1_2",
                             kmip_version=enums.KMIPVersion.KMIP_1_2, config_file="/dev/null")

    def create(c, group, name):
        attrs = [
            af.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_ALGORITHM,
                                enums.CryptographicAlgorithm.AES),
            af.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_LENGTH, 256),
            af.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_USAGE_MASK,
                                [enums.CryptographicUsageMask.ENCRYPT,
                                 enums.CryptographicUsageMask.DECRYPT]),
            af.create_attribute(enums.AttributeType.OPERATION_POLICY_NAME, "shared"),
            af.create_attribute(enums.AttributeType.OBJECT_GROUP, group),
            af.create_attribute(enums.AttributeType.NAME, name),
        ]
        result = c.proxy.create(enums.ObjectType.SYMMETRIC_KEY,
                                cobjects.TemplateAttribute(attributes=attrs))
        if result.result_status.value != enums.ResultStatus.SUCCESS:
            raise RuntimeError("create: %s" % result.result_message)
        return result.uuid

    keys = []
    with client as c:
        pre = create(c, GROUP, "kek-pre")
        act = create(c, GROUP, "kek-active")
        c.activate(act)
        deact = create(c, GROUP, "kek-deactivated")
        c.activate(deact)
        c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, deact, "rotated")
        comp = create(c, GROUP, "kek-compromised")
        c.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, comp, "leaked")
        other = create(c, OTHER_GROUP, "kek-other-group")
        c.activate(other)
        for uid, state in ((pre, 1), (act, 2), (deact, 3), (comp, 4)):
            st = c.get_attributes(uid, ["State"])[1][0].attribute_value.value   # enums.State
            if st.value != state:
                raise RuntimeError("seeded %s in state %s, wanted %d" % (uid, st, state))
            value = c.get(uid).value.hex() if state != 4 else "-"
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
    servers = Servers(tmp)
    try:
        certs = os.path.join(tmp, "certs")
        os.makedirs(certs)
        make_certs(certs)
        env = dict(os.environ)
        env["CENTRAL_CERTS"] = certs
        env["CENTRAL_GROUP"] = GROUP
        kmip_port = servers.start_pykmip(certs)
        env["CENTRAL_KMIP_PORT"] = str(kmip_port)
        env["CENTRAL_KEYS"], env["CENTRAL_OTHER_UID"] = seed(certs, kmip_port)
        env["CENTRAL_ROGUE_PORT"] = str(servers.start_s_server("rogue", certs, "rogue"))
        env["CENTRAL_OTHERNAME_PORT"] = str(servers.start_s_server("othername", certs, "othername"))
        # Wants a client certificate for the TLS client purpose (clientAuth).
        env["CENTRAL_STRICT_PORT"] = str(servers.start_s_server(
            "strict", certs, "server",
            ("-CAfile", os.path.join(certs, "ca.crt"), "-Verify", "1", "-verify_return_error")))
        env["CENTRAL_SILENT_TLS_PORT"] = str(servers.start_s_server("silent", certs, "server"))
        env["CENTRAL_SILENT_TCP_PORT"] = str(servers.silent_listener())
        env["CENTRAL_DEAD_PORT"] = str(free_port())
        log("pykmip on port %d, seeded %s" % (kmip_port, " ".join(k.split(":")[0] for k in env["CENTRAL_KEYS"].split(","))))
        return subprocess.run([binary], env=env, timeout=240).returncode
    finally:
        servers.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
