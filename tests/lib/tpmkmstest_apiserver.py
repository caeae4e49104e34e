"""A real kube-apiserver and etcd on 127.0.0.1 for the apiserver tests.

    pki = ClusterPki()                     # throwaway CA, serving and client certs, SA keys
    etcd = Etcd(self)                      # embedded etcd 3.5 (tests/apiserver/etcd)
    etcd.start()
    api = Apiserver(self, etcd, pki, encryption_config=FILE)
    api.start()                            # waits for /readyz (or livez with wait="livez")
    api.kubectl("get", "secrets", "-A")    # kubectl with the admin kubeconfig
    api.get("/readyz?verbose")             # (HTTP status, body) over mTLS
    etcd.get("/registry/secrets/default/s1")   # the raw stored value

The binaries come from TPMKMS_APISERVER_BIN (set by tests/apiserver/tests.cmake:
the kube-apiserver, kubectl and etcd that tests/apiserver/build.sh built); a
missing one is an error, never a skip. Every process listens on 127.0.0.1 only,
on ports bind(0) picked, gets SIGTERM when the test process dies
(PR_SET_PDEATHSIG) and is stopped by the test's cleanup.
"""
import base64
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpmkmstest as t  # noqa: E402
from tpmkmstest_kmip import Pki, free_port  # noqa: E402,F401  (free_port: any parity)

START_TIMEOUT = 180      # seconds for an apiserver to become ready (2 shared cores)
STOP_TIMEOUT = 30
KMS_PREFIX = b"k8s:enc:kms:v2:"
PLAIN_PREFIX = b"k8s\x00"                # protobuf storage media type, unencrypted


def bin_path(name):
    d = t.env_path("TPMKMS_APISERVER_BIN")
    p = os.path.join(d, name)
    if not os.access(p, os.X_OK):
        raise RuntimeError("%s missing: build it with tests/apiserver/build.sh (cmake does)" % p)
    return p


def _popen(argv, log_path, **kw):
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=kw.pop("stdout", log),
                                stderr=log, preexec_fn=t._die_with_parent, **kw)
    finally:
        log.close()


def _stop(proc, timeout=STOP_TIMEOUT):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- PKI --------------------------------------------------------------------

class ClusterPki(Pki):
    """ca, server (SAN IP:127.0.0.1, DNS:localhost), admin (CN=tpmkms-admin,
    O=system:masters, EKU clientAuth) and the service-account key pair sa.key/sa.pub."""

    def __init__(self, testcase=None):
        super().__init__(minimal=True)
        self.make_group_client("admin", "tpmkms-admin", "system:masters")
        self._openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                      "-out", self.key("sa"))
        self._openssl("pkey", "-in", self.key("sa"), "-pubout", "-out",
                      os.path.join(self.dir, "sa.pub"))
        os.chmod(self.key("sa"), 0o600)
        if testcase is not None:
            testcase.addCleanup(self.close)

    def make_group_client(self, name, cn, group, ca="ca"):
        """A client certificate with CN=cn, O=group: the apiserver's user and group."""
        ext = os.path.join(self.dir, name + ".ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,"
                    "keyEncipherment\nextendedKeyUsage=clientAuth\n")
        csr = os.path.join(self.dir, name + ".csr")
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key(name),
                      "-out", csr, "-subj", "/O=%s/CN=%s" % (group, cn))
        self._openssl("x509", "-req", "-in", csr, "-CA", self.crt(ca), "-CAkey", self.key(ca),
                      "-CAcreateserial", "-days", str(self.days), "-sha256", "-extfile", ext,
                      "-out", self.crt(name))
        os.chmod(self.key(name), 0o600)
        return self

    @property
    def sa_pub(self):
        return os.path.join(self.dir, "sa.pub")


# --- etcd ---------------------------------------------------------------------

class Etcd:
    """A single-member etcd on two free loopback ports, data in a temp dir."""

    def __init__(self, testcase=None):
        self.bin = bin_path("etcd")
        self.dir = tempfile.mkdtemp(prefix="tpmkms-etcd-")
        self.log_path = os.path.join(self.dir, "etcd.log")
        self.client_port = self.peer_port = None
        self.proc = None
        if testcase is not None:
            testcase.addCleanup(self.close)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.client_port

    def start(self):
        for _ in range(5):
            self.client_port, self.peer_port = free_port(), free_port()
            if self.client_port == self.peer_port:
                continue
            self.proc = _popen([self.bin, "-data-dir", os.path.join(self.dir, "data"),
                                "-listen-client-url", self.url,
                                "-listen-peer-url", "http://127.0.0.1:%d" % self.peer_port],
                               self.log_path, stdout=subprocess.PIPE)
            line = self.proc.stdout.readline()      # "ready", or EOF when it failed
            if line.strip() == b"ready":
                self.proc.stdout.close()
                return self
            self.proc.wait()
            with open(self.log_path, errors="replace") as f:
                log = f.read()
            if "address already in use" not in log:
                raise RuntimeError("etcd failed to start:\n" + log)
        raise RuntimeError("etcd: no free loopback ports")

    def _call(self, path, body):
        """The v3 JSON gateway (etcd serves it on the client URL)."""
        c = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=30)
        try:
            c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            if r.status != 200:
                raise AssertionError("etcd %s: HTTP %d %r" % (path, r.status, data))
            return json.loads(data)
        finally:
            c.close()

    def get(self, key):
        """The raw value stored under key (bytes), or None."""
        kvs = self._call("/v3/kv/range", {"key": base64.b64encode(key.encode()).decode()}
                         ).get("kvs", [])
        return base64.b64decode(kvs[0]["value"]) if kvs else None

    def get_prefix(self, prefix):
        """{key: raw value} of every key under prefix."""
        p = prefix.encode()
        end = p[:-1] + bytes([p[-1] + 1])
        out = {}
        r = self._call("/v3/kv/range", {"key": base64.b64encode(p).decode(),
                                        "range_end": base64.b64encode(end).decode()})
        for kv in r.get("kvs", []):
            out[base64.b64decode(kv["key"]).decode()] = base64.b64decode(kv.get("value", ""))
        return out

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def close(self):
        try:
            _stop(self.proc)
            self.proc = None
        finally:
            if os.environ.get("TPMKMS_KEEP"):
                sys.stderr.write("kept %s\n" % self.dir)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)


# --- the stored value -----------------------------------------------------------

def _varint(b, i):
    v = shift = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return v, i


def protobuf_fields(b):
    """{field number: [values]} of a protobuf message: varints as int,
    length-delimited as bytes (enough for EncryptedObject)."""
    out = {}
    i = 0
    while i < len(b):
        tag, i = _varint(b, i)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 2:
            n, i = _varint(b, i)
            v = b[i:i + n]
            if len(v) != n:
                raise ValueError("truncated protobuf field %d" % num)
            i += n
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError("protobuf wire type %d" % wt)
        out.setdefault(num, []).append(v)
    return out


def kms_envelope(raw, name):
    """The EncryptedObject after "k8s:enc:kms:v2:<name>:" as a dict (keys
    encrypted_data, key_id, encrypted_dek_source, annotations, source_type);
    raises AssertionError if raw does not carry that prefix."""
    prefix = KMS_PREFIX + name.encode() + b":"
    if raw is None or not raw.startswith(prefix):
        raise AssertionError("stored value does not start with %r: %r" % (prefix, (raw or b"")[:64]))
    f = protobuf_fields(raw[len(prefix):])
    return {"encrypted_data": f.get(1, [b""])[0],
            "key_id": f.get(2, [b""])[0].decode(),
            "encrypted_dek_source": f.get(3, [b""])[0],
            "annotations": f.get(4, []),
            "source_type": f.get(5, [0])[0]}


# --- kube-apiserver -----------------------------------------------------------------

class ApiError(AssertionError):
    pass


class Apiserver:
    """kube-apiserver on a free 127.0.0.1 port against etcd, with its own
    certificates (ClusterPki) and an --encryption-provider-config (a file)."""

    def __init__(self, testcase, etcd, pki, encryption_config, etcd_prefix="/registry",
                 name="api"):
        self.bin = bin_path("kube-apiserver")
        self.kubectl_bin = bin_path("kubectl")
        self.etcd = etcd
        self.pki = pki
        self.encryption_config = encryption_config
        self.etcd_prefix = etcd_prefix
        self.dir = tempfile.mkdtemp(prefix="tpmkms-%s-" % name)
        self.log_path = os.path.join(self.dir, "kube-apiserver.log")
        self.kubeconfig = os.path.join(self.dir, "kubeconfig")
        self.port = None
        self.proc = None
        self.started_at = None
        self._log_offset = 0
        self._ctx = ssl.create_default_context(cafile=pki.crt("ca"))
        self._ctx.load_cert_chain(pki.crt("admin"), pki.key("admin"))
        if testcase is not None:
            testcase.addCleanup(self.close)

    def argv(self):
        sa = "https://127.0.0.1:%d" % self.port
        return [self.bin,
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                "--secure-port=%d" % self.port,
                "--cert-dir=" + self.dir,
                "--tls-cert-file=" + self.pki.crt("server"),
                "--tls-private-key-file=" + self.pki.key("server"),
                "--client-ca-file=" + self.pki.crt("ca"),
                "--etcd-servers=" + self.etcd.url,
                "--etcd-prefix=" + self.etcd_prefix,
                "--encryption-provider-config=" + self.encryption_config,
                "--service-account-issuer=" + sa,
                "--service-account-key-file=" + self.pki.sa_pub,
                "--service-account-signing-key-file=" + self.pki.key("sa"),
                "--service-cluster-ip-range=10.96.0.0/24",
                "--authorization-mode=RBAC",
                "--anonymous-auth=false",
                # 127.0.0.1 is no address for the "kubernetes" Service's endpoints
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=2"]

    def write_kubeconfig(self):
        with open(self.kubeconfig, "w") as f:
            f.write("apiVersion: v1\nkind: Config\n"
                    "clusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:%d\n"
                    "    certificate-authority: %s\n"
                    "users:\n- name: admin\n  user:\n    client-certificate: %s\n"
                    "    client-key: %s\n"
                    "contexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n"
                    "current-context: test\n"
                    % (self.port, self.pki.crt("ca"), self.pki.crt("admin"),
                       self.pki.key("admin")))

    def start(self, wait="readyz", timeout=START_TIMEOUT):
        """Start and wait until GET /<wait> answers 200 ("readyz", "livez", or None
        for no wait). Returns the seconds from exec to that answer."""
        assert self.proc is None, "apiserver already running"
        if self.port is None:
            self.port = free_port()
        self.write_kubeconfig()
        self._log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        self.started_at = time.monotonic()
        self.proc = _popen(self.argv(), self.log_path)
        if wait is None:
            return None
        return self.wait_for_health(wait, timeout)

    def wait_for_health(self, endpoint="readyz", timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ApiError("kube-apiserver exited %d:\n%s"
                               % (self.proc.returncode, self.log()[-6000:]))
            try:
                last = self.get("/" + endpoint)
                if last[0] == 200:
                    return time.monotonic() - self.started_at
            except (OSError, http.client.HTTPException) as e:
                last = e
            time.sleep(0.2)
        raise ApiError("kube-apiserver: /%s not 200 within %ds (last: %r)\n%s"
                       % (endpoint, timeout, last, self.log()[-6000:]))

    def stop(self):
        _stop(self.proc)
        self.proc = None

    def restart(self, wait="readyz"):
        self.stop()
        return self.start(wait=wait)

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    # clients

    def connection(self, timeout=30):
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self._ctx,
                                           timeout=timeout)

    def request(self, method, path, body=None, conn=None):
        """(HTTP status, body text) of one request, JSON body if given."""
        c = conn or self.connection()
        try:
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body)
                headers["Content-Type"] = "application/json"
            c.request(method, path, data, headers)
            r = c.getresponse()
            return r.status, r.read().decode(errors="replace")
        finally:
            if conn is None:
                c.close()

    def get(self, path):
        return self.request("GET", path)

    def kubectl(self, *args, input=None, check=True, timeout=120):
        r = subprocess.run([self.kubectl_bin, "--kubeconfig", self.kubeconfig] + list(args),
                           input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise ApiError("kubectl %s: exit %d: %s" % (" ".join(args), r.returncode, r.stderr))
        return r

    def close(self):
        try:
            self.stop()
        finally:
            if os.environ.get("TPMKMS_KEEP"):
                sys.stderr.write("kept %s\n" % self.dir)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)


def encryption_config(world, path, *args):
    """`tpmkmsctl encryption-config ARGS...` written to path, as an operator would."""
    r = world.ctl("encryption-config", *args, check=True)
    with open(path, "w") as f:
        f.write(r.stdout)
    return path


def figure(text):
    """A measured figure on stderr ("FIGURE ..."; ctest -V shows it)."""
    sys.stderr.write("FIGURE %s\n" % text)
    sys.stderr.flush()


def decrypt_calls(log_text):
    """Decrypt calls tpmkmsd served, from its audit lines (common/log.c): one
    line per call, or a summary line with the count of the calls after the
    first of a burst."""
    n = 0
    for ln in log_text.splitlines():
        m = re.search(r"audit decrypt key_id=\S+ result=\S+: (\d+) more call", ln)
        if m:
            n += int(m.group(1))
        elif re.search(r"audit decrypt key_id=\S+ uid=", ln):
            n += 1
    return n


def wait_for(pred, timeout, what, interval=0.5):
    """pred() until it returns something true (returned); AssertionError naming
    what and the last value on the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = pred()
            if last:
                return last
        except (ApiError, OSError, http.client.HTTPException) as e:
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError("%s: not within %.0fs (last: %r)" % (what, timeout, last))
        time.sleep(interval)
