"""A real central KMS for the fleet tests: PyKMIP 0.10's server on 127.0.0.1.

    pki = Pki()                       # test CAs and certificates (openssl), once
    kms = KmipServer(pki)             # free port, own sqlite database, own log
    kms.start()                       # waits until the operation policy is loaded
    uid = kms.create_version("cluster-a-kek")   # as CN=kms-admin: Pre-Active
    kms.activate(uid)
    w = FleetWorld(self, kms, cn="node-a")      # a tpmkmsd with [central] type = kmip
    w.start()
    kms.stop(); kms.start()           # an outage on the same port and database

PyKMIP runs as /usr/bin/python3 (Debian's python3-pykmip) in its own session
(setsid: it forks a policy monitor and a manager), is stopped with SIGINT
(SIGTERM waits for a 10 s accept timeout) and then its process group is
killed. It gets SIGINT when the test process dies (PR_SET_PDEATHSIG) and is
stopped at interpreter exit, so no server outlives its test.

Every key the admin creates uses the operation policy "shared" (Get,
GetAttributes, Locate allowed to every authenticated client): that is how
several hosts, each with its own client certificate, read the same KEK
versions. The owner of an object is the CN of the client certificate that
created it.
"""
import atexit
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpmkmstest as t  # noqa: E402

PYKMIP_PYTHON = "/usr/bin/python3"     # the python that has Debian's kmip module
PYKMIP_SERVER = "/usr/bin/pykmip-server"
START_TIMEOUT = 20
STOP_TIMEOUT = 15
KCV_LABEL = b"tpmkms key check value v1"    # agent/keystore/keystore.h, key_id_make

SHARED_POLICY = """{
  "shared": {
    "preset": {
      "SYMMETRIC_KEY": {
        "LOCATE": "ALLOW_ALL",
        "CHECK": "ALLOW_ALL",
        "GET": "ALLOW_ALL",
        "GET_ATTRIBUTES": "ALLOW_ALL",
        "GET_ATTRIBUTE_LIST": "ALLOW_ALL",
        "ADD_ATTRIBUTE": "ALLOW_OWNER",
        "MODIFY_ATTRIBUTE": "ALLOW_OWNER",
        "DELETE_ATTRIBUTE": "ALLOW_OWNER",
        "SET_ATTRIBUTE": "ALLOW_OWNER",
        "ACTIVATE": "ALLOW_OWNER",
        "REVOKE": "ALLOW_OWNER",
        "DESTROY": "ALLOW_OWNER"
      }
    }
  }
}
"""


def _kmip():
    """PyKMIP's modules (imported late: only the fleet tests need them)."""
    warnings.simplefilter("ignore")     # PyKMIP 0.10 warns about ssl.wrap_socket
    try:
        from kmip.pie.client import ProxyKmipClient
        from kmip.core import enums
        from kmip.core import objects as cobjects
        from kmip.core.factories import attributes as attr_factory
    except ImportError as e:
        raise RuntimeError("PyKMIP missing (%s): install python3-pykmip and run the "
                           "tests with /usr/bin/python3" % e)
    return ProxyKmipClient, enums, cobjects, attr_factory


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_port():
    """A loopback port nothing listens on (connect is refused)."""
    return free_port()


# --- certificates ---------------------------------------------------------

class Pki:
    """Throwaway certificates made with openssl in a temp dir:

    ca            the test CA (signs everything below except ca2's)
    ca2           a second, unrelated CA (a daemon trusting only it must refuse
                  the server)
    server        KMIP server cert, SAN IP:127.0.0.1, DNS:localhost, EKU serverAuth
    server-other  a server cert of the same CA for another name (kms.other.example,
                  IP 192.0.2.7): a client dialing 127.0.0.1 must refuse it
    node-a/b/c    host client certs (CN=node-a, ...), EKU clientAuth
    kms-admin     the operator's client cert that creates the KEK versions
    noeku         a client cert of the test CA without the clientAuth EKU
                  (no EKU extension at all): PyKMIP refuses it

    minimal=True makes only ca, ca2 and server; add others with make_client,
    make_server, make_leaf (and make_ca, copy_key). A certificate is named
    by its file name (NAME.crt, NAME.key in dir), not by its CN.
    Keys are mode 0600 (the daemon refuses a key file others can read)."""

    CLIENTS = ("node-a", "node-b", "node-c", "kms-admin")

    def __init__(self, directory=None, minimal=False, days=30):
        self.owns_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix="tpmkms-pki-")
        os.makedirs(self.dir, exist_ok=True)
        self.days = days
        self._make(minimal)

    def crt(self, name):
        return os.path.join(self.dir, name + ".crt")

    def key(self, name):
        return os.path.join(self.dir, name + ".key")

    def _openssl(self, *args):
        r = subprocess.run(["openssl"] + list(args), cwd=self.dir, capture_output=True,
                           text=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError("openssl %s: %s" % (" ".join(args), r.stderr))
        return r.stdout

    def make_ca(self, name, cn):
        """A self-signed CA certificate NAME.crt with its key."""
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                      "-days", str(self.days), "-keyout", self.key(name), "-out", self.crt(name),
                      "-subj", "/CN=" + cn,
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        os.chmod(self.key(name), 0o600)
        return self

    def make_leaf(self, name, cn, ext_lines=(), ca="ca"):
        """An end-entity certificate signed by ca: CA:FALSE, digitalSignature and
        keyEncipherment, plus ext_lines (openssl extension config lines)."""
        ext = os.path.join(self.dir, name + ".ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n")
            f.write("".join(line + "\n" for line in ext_lines))
        csr = os.path.join(self.dir, name + ".csr")
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key(name),
                      "-out", csr, "-subj", "/CN=" + cn)
        self._openssl("x509", "-req", "-in", csr, "-CA", self.crt(ca), "-CAkey", self.key(ca),
                      "-CAcreateserial", "-days", str(self.days), "-sha256", "-extfile", ext,
                      "-out", self.crt(name))
        os.chmod(self.key(name), 0o600)
        return self

    def make_server(self, name, cn, san, ca="ca"):
        """EKU serverAuth, subjectAltName san (e.g. "IP:127.0.0.1,DNS:localhost")."""
        return self.make_leaf(name, cn, ["extendedKeyUsage=serverAuth", "subjectAltName=" + san],
                              ca=ca)

    def make_client(self, name, cn=None, ca="ca"):
        """EKU clientAuth, CN cn (default: name)."""
        return self.make_leaf(name, cn or name, ["extendedKeyUsage=clientAuth"], ca=ca)

    def copy_key(self, name, new, mode):
        """NEW.key: a copy of NAME.key with the given file mode."""
        shutil.copyfile(self.key(name), self.key(new))
        os.chmod(self.key(new), mode)
        return self

    def verify(self, *names, ca="ca"):
        self._openssl("verify", "-CAfile", self.crt(ca), *[self.crt(n) for n in names])

    def _make(self, minimal):
        self.make_ca("ca", "tpmkms test KMIP CA")
        self.make_ca("ca2", "tpmkms unrelated CA")
        self.make_server("server", "127.0.0.1", "IP:127.0.0.1,DNS:localhost")
        if minimal:
            self.verify("server")
            return
        self.make_server("server-other", "kms.other.example",
                         "DNS:kms.other.example,IP:192.0.2.7")
        for cn in self.CLIENTS:
            self.make_client(cn)
        self.make_leaf("noeku", "node-noeku", [])
        self.verify("server", "server-other", "node-a", "noeku")

    def close(self):
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


# --- the server -------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_running = set()


def _sigint_with_parent():
    """preexec_fn (after setsid): SIGINT the server if the test process dies."""
    _libc.prctl(1, signal.SIGINT, 0, 0, 0)    # PR_SET_PDEATHSIG


def stop_group(proc, timeout=STOP_TIMEOUT):
    """Stop a process started with start_new_session=True: SIGINT (PyKMIP stops
    in 1-2 s; SIGTERM would wait for its 10 s accept timeout), SIGKILL after
    timeout, then SIGKILL whatever is left of its process group (PyKMIP's
    policy monitor and manager). Returns True if it had stopped on SIGINT."""
    if proc is None:
        return True
    clean = True
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            clean = False
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    return clean


@atexit.register
def _stop_all():
    for s in list(_running):
        try:
            s.stop()
        except Exception:   # noqa: BLE001  best effort at exit
            pass


# pykmip-server with its engine refusing any request of more than one batch
# item as a whole (Invalid Message, one failed item without an ID), the way a
# KMIP server without batch support answers.
REFUSE_BATCHES = """
import sys
from kmip.core import exceptions
from kmip.services.server import engine, server
_process = engine.KmipEngine.process_request
def process_request(self, request, credential=None):
    if len(request.batch_items) > 1:
        self._logger.warning("Batches are not supported by this test server.")
        raise exceptions.InvalidMessage("Batches are not supported by this test server.")
    return _process(self, request, credential)
engine.KmipEngine.process_request = process_request
sys.exit(server.main())
"""


class KmipServer:
    """PyKMIP 0.10 on 127.0.0.1:port, TLS 1.2, client certificates required.
    refuse_batches: its engine refuses every batch of several items."""

    def __init__(self, pki, testcase=None, port=None, directory=None, log_level="INFO",
                 refuse_batches=False):
        self.refuse_batches = refuse_batches
        self.pki = pki
        self.log_level = log_level
        self.port = port or free_port()
        self.owns_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix="tpmkms-kmip-")
        self.policy_dir = os.path.join(self.dir, "policies")
        os.makedirs(self.policy_dir, exist_ok=True)
        with open(os.path.join(self.policy_dir, "shared.json"), "w") as f:
            f.write(SHARED_POLICY)
        self.db = os.path.join(self.dir, "pykmip.db")
        self.log_path = os.path.join(self.dir, "server.log")
        self.stdout_path = os.path.join(self.dir, "stdout.log")
        self.proc = None
        self.server_cert = "server"
        self._last_create = 0
        if testcase is not None:
            testcase.addCleanup(self.close)

    @property
    def endpoint(self):
        return "127.0.0.1:%d" % self.port

    def _write_conf(self):
        conf = os.path.join(self.dir, "server.conf")
        with open(conf, "w") as f:
            f.write("[server]\nhostname=127.0.0.1\nport=%d\n"
                    "certificate_path=%s\nkey_path=%s\nca_path=%s\n"
                    "auth_suite=TLS1.2\npolicy_path=%s\nenable_tls_client_auth=True\n"
                    "logging_level=%s\ndatabase_path=%s\n"
                    % (self.port, self.pki.crt(self.server_cert), self.pki.key(self.server_cert),
                       self.pki.crt("ca"), self.policy_dir, self.log_level, self.db))
        return conf

    def _log_size(self):
        try:
            return os.path.getsize(self.log_path)
        except FileNotFoundError:
            return 0

    def start(self, server_cert="server"):
        """Start (again: same port, same database) presenting server_cert (a Pki
        name); returns when it accepts connections with the policy loaded."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.server_cert = server_cert
        conf = self._write_conf()
        offset = self._log_size()
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        self._stdout = open(self.stdout_path, "ab")
        for attempt in range(20):
            server = ["-c", REFUSE_BATCHES] if self.refuse_batches else [PYKMIP_SERVER]
            self.proc = subprocess.Popen(
                [PYKMIP_PYTHON] + server + ["-f", conf, "-l", self.log_path],
                stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, preexec_fn=_sigint_with_parent)
            _running.add(self)
            try:
                self._wait_ready(offset)
                return self
            except _BindFailed:
                # the port is still held (a previous run's TIME_WAIT is fine with
                # SO_REUSEADDR, a lingering child is not): wait, try again
                self._kill_group()
                time.sleep(0.25)
                offset = self._log_size()
        raise RuntimeError("PyKMIP could not bind %s:\n%s" % (self.endpoint, self.log(offset)))

    def _wait_ready(self, offset):
        """Ready = "Starting connection service" logged (listen() done) and the
        policy file loaded (~1 s after start): objects with the "shared" policy are
        invisible before that. No TCP probes: they log handshake tracebacks."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            new = self.log(offset)
            if "failed to bind" in new:
                raise _BindFailed()
            if self.proc.poll() is not None:
                raise RuntimeError("PyKMIP exited with %d:\n%s\n%s"
                                   % (self.proc.returncode, new, self._stdout_text()))
            if "Starting connection service" in new and \
                    "Loading policies for file" in new and "shared.json" in new:
                return
            time.sleep(0.05)
        raise RuntimeError("PyKMIP not ready within %ds:\n%s" % (START_TIMEOUT, self.log(offset)))

    def _stdout_text(self):
        try:
            with open(self.stdout_path, "rb") as f:
                return f.read().decode(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def _kill_group(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def stop(self):
        """SIGINT (it stops in 1-2 s), SIGKILL after STOP_TIMEOUT, then kill
        whatever is left of its process group (the policy monitor, the manager)."""
        if self.proc is None:
            return
        stop_group(self.proc)
        self.proc = None
        _running.discard(self)
        if getattr(self, "_stdout", None) is not None:
            self._stdout.close()
            self._stdout = None
        # the port must be free again before anyone (start, a test) relies on it
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    pass
                time.sleep(0.05)
            except OSError:
                break

    def restart_empty(self):
        """Stop, and start again on the same port with an EMPTY database (a
        restored-empty or lost central KMS): every object is gone."""
        self.stop()
        for suffix in ("", "-journal", "-wal", "-shm"):
            try:
                os.unlink(self.db + suffix)
            except FileNotFoundError:
                pass
        return self.start(self.server_cert)

    def restart(self, server_cert="server"):
        self.stop()
        return self.start(server_cert)

    def log(self, offset=0):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_offset(self):
        return self._log_size()

    def requests_from(self, cn, offset=0):
        """How many KMIP requests the client cert CN=cn made since log offset."""
        return len(re.findall(r"Session client identity: %s\b" % re.escape(cn), self.log(offset)))

    def sessions_from(self, cn, offset=0):
        """The KMIP connections (PyKMIP sessions) that authenticated as CN=cn
        since log offset: tpmkmsd opens one connection per sync."""
        return set(re.findall(r"kmip\.server\.session\.(\S+) - INFO - Session client identity: %s\s"
                              % re.escape(cn), self.log(offset)))

    def operations(self, name, offset=0):
        """How many times the engine processed operation `name` since offset."""
        return len(re.findall(r"Processing operation: %s\b" % re.escape(name), self.log(offset)))

    def close(self):
        self.stop()
        if self.owns_dir and not os.environ.get("TPMKMS_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.owns_dir:
            sys.stderr.write("kept %s\n" % self.dir)

    # --- the operator: PyKMIP's own client as CN=kms-admin -----------------
    # cn below is the Pki name of the client certificate (for the standard
    # certificates it is also the CN, the owner of what it creates).

    def client(self, cn="kms-admin"):
        ProxyKmipClient, enums, _, _ = _kmip()
        return ProxyKmipClient(hostname="127.0.0.1", port=self.port,
                               cert=self.pki.crt(cn), key=self.pki.key(cn),
                               ca=self.pki.crt("ca"), ssl_version="PROTOCOL_TLSv1_2",
                               kmip_version=enums.KMIPVersion.KMIP_1_2,
                               config_file="/dev/null")   # no ~/.pykmip or /etc/pykmip

    def create_key(self, group, name=None, cn="kms-admin", policy="shared"):
        """An AES-256 key (Encrypt, Decrypt) in Object Group group (None: in no
        group) with operation policy policy (None: PyKMIP's default) and Name
        name (default: group-milliseconds), state Pre-Active, created as cn.
        Returns its Unique Identifier."""
        _, enums, cobjects, attr_factory = _kmip()
        af = attr_factory.AttributeFactory()
        with self.client(cn) as c:
            attrs = c._build_key_attributes(enums.CryptographicAlgorithm.AES, 256,
                                            [enums.CryptographicUsageMask.ENCRYPT,
                                             enums.CryptographicUsageMask.DECRYPT])
            attrs.extend(c._build_common_attributes(policy))
            if group is not None:
                attrs.append(af.create_attribute(enums.AttributeType.OBJECT_GROUP, group))
            attrs.append(af.create_attribute(enums.AttributeType.NAME, name or
                                             "%s-%d" % (group, int(time.time() * 1000))))
            r = c.proxy.create(enums.ObjectType.SYMMETRIC_KEY,
                               cobjects.TemplateAttribute(attributes=attrs))
            if r.result_status.value != enums.ResultStatus.SUCCESS:
                raise RuntimeError("KMIP Create failed: %s %s"
                                   % (r.result_reason, r.result_message))
            return r.uuid

    def create_version(self, group, distinct_second=True):
        """A new KEK version: create_key(group) as kms-admin, policy "shared",
        state Pre-Active. Returns its Unique Identifier.

        distinct_second: PyKMIP's Initial Date has 1 s resolution and its
        identifiers are decimal ("9" < "10" as strings): wait for a new second so
        that the creation order is the Initial Date order, unambiguously."""
        if distinct_second:
            while int(time.time()) <= self._last_create:
                time.sleep(0.02)
        uid = self.create_key(group)
        self._last_create = int(time.time())
        return uid

    def activate(self, uid, cn="kms-admin"):
        with self.client(cn) as c:
            c.activate(uid)

    def deactivate(self, uid, cn="kms-admin", message="rotated"):
        """Revoke (Cessation of Operation): Deactivated, still readable."""
        _, enums, _, _ = _kmip()
        with self.client(cn) as c:
            c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid, message)

    def compromise(self, uid, cn="kms-admin", message="compromised"):
        """Revoke (Key Compromise): Compromised."""
        _, enums, _, _ = _kmip()
        with self.client(cn) as c:
            c.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, uid, message)

    def destroy(self, uid, cn="kms-admin"):
        with self.client(cn) as c:
            c.destroy(uid)

    def get(self, uid, cn="kms-admin"):
        """The key material (32 bytes)."""
        with self.client(cn) as c:
            return bytes(c.get(uid).value)

    def _state(self, uid, cn):
        with self.client(cn) as c:
            attrs = c.get_attributes(uid, ["State"])[1]
            return attrs[0].attribute_value.value      # enums.State

    def state(self, uid, cn="kms-admin"):
        """The KMIP State's name, e.g. "PRE_ACTIVE"."""
        return self._state(uid, cn).name

    def state_value(self, uid, cn="kms-admin"):
        """The KMIP State's number: 1 Pre-Active, 2 Active, 3 Deactivated,
        4 Compromised, 5 Destroyed, 6 Destroyed Compromised."""
        return self._state(uid, cn).value

    def locate(self, group, cn="kms-admin"):
        _, enums, _, attr_factory = _kmip()
        af = attr_factory.AttributeFactory()
        with self.client(cn) as c:
            return c.locate(attributes=[af.create_attribute(enums.AttributeType.OBJECT_GROUP,
                                                            group)])


class _BindFailed(Exception):
    pass


class HoldingProxy:
    """A TCP forwarder 127.0.0.1:port -> 127.0.0.1:target_port that can stall
    a sync half-way: arm(n) makes it hold, on the next connection, the
    server's n-th TLS application-data record (TLS record headers are in the
    clear) until release(). A KMIP response fits one record: holding record 1
    of a host that knows the protocol version already (it discovers it once)
    stalls a sync whose Locate the server has answered but the host has not
    read yet: the sync is then "in progress" with a view of the key group
    that is already old."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.held = threading.Event()
        self._release = threading.Event()
        self._arm = None
        self._closed = False
        self._socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self):
        return "127.0.0.1:%d" % self.port

    def arm(self, record):
        self.held.clear()
        self._release.clear()
        self._arm = record

    def release(self):
        self._release.set()

    def _accept(self):
        while not self._closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port), 5)
            except OSError:
                c.close()
                continue
            hold, self._arm = self._arm, None
            self._socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, hold), daemon=True).start()

    def _pump(self, src, dst, hold):
        buf, n_app = b"", 0
        try:
            while True:
                d = src.recv(65536)
                if not d:
                    break
                if hold is None:
                    dst.sendall(d)
                    continue
                buf += d
                while len(buf) >= 5 and len(buf) >= 5 + int.from_bytes(buf[3:5], "big"):
                    n = 5 + int.from_bytes(buf[3:5], "big")
                    rec, buf = buf[:n], buf[n:]
                    if rec[0] == 0x17:               # application data
                        n_app += 1
                        if n_app == hold:
                            self.held.set()
                            self._release.wait(30)
                    dst.sendall(rec)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self._closed = True
        self._release.set()
        self.lsock.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass


def key_check_value(kek):
    """The 16 hex digits a key id ends with (agent/keystore/keystore.h)."""
    import hashlib
    import hmac
    return hmac.new(kek, KCV_LABEL, hashlib.sha256).hexdigest()[:16]


# --- a host in fleet mode ----------------------------------------------------

class FleetWorld(t.World):
    """A tpmkmsd whose [central] section points at KMIP endpoints.

    tpmkmstest.World writes "[central] type = none" itself; this subclass writes
    the whole config instead (same [kms], [tpm], [state], [control], [metrics]).
    Attributes may be changed between restarts (restart_daemon rewrites the
    config): endpoints, ca, cert, key, group, sync_interval, timeout,
    max_staleness, purge_after, max_missing_share, material_check (None: not
    written, the daemon's default)."""

    def __init__(self, testcase, kms, cn="node-a", group="cluster-a-kek",
                 sync_interval="1s", timeout="2s", max_staleness=None,
                 endpoints=None, ca="ca", tpm=None, pcrs="sha256:7",
                 purge_after=None, max_missing_share=None, material_check=None):
        super().__init__(testcase, tpm=tpm, pcrs=pcrs)
        self.kms = kms
        self.cn = cn
        self.endpoints = endpoints or [kms.endpoint]
        self.ca = kms.pki.crt(ca)
        self.cert = kms.pki.crt(cn)
        self.key = kms.pki.key(cn)
        self.group = group
        self.sync_interval = sync_interval
        self.timeout = timeout
        self.max_staleness = max_staleness
        self.purge_after = purge_after
        self.max_missing_share = max_missing_share
        self.material_check = material_check

    def write_config(self, kms_sock=None, tcti=None, ctl_sock=None, state_dir=None):
        central = ("[central]\ntype = kmip\nendpoints = %s\nca_file = %s\ncert_file = %s\n"
                   "key_file = %s\nkey_group = %s\nsync_interval = %s\ntimeout = %s\n"
                   % (", ".join(self.endpoints), self.ca, self.cert, self.key, self.group,
                      self.sync_interval, self.timeout))
        if self.max_staleness is not None:
            central += "max_staleness = %s\n" % self.max_staleness
        if self.purge_after is not None:
            central += "purge_after = %s\n" % self.purge_after
        if self.max_missing_share is not None:
            central += "max_missing_share = %s\n" % self.max_missing_share
        if self.material_check is not None:
            central += "material_check = %s\n" % self.material_check
        with open(self.config, "w") as f:
            f.write("[kms]\nsocket = %s\nallowed_uids = 0\n"
                    "[tpm]\ntcti = %s\npcrs = %s\n"
                    "[state]\ndir = %s\n"
                    "%s"
                    "[control]\nsocket = %s\n"
                    "[metrics]\nlisten = %s\n%s"
                    % (kms_sock or self.kms_sock, tcti or self.tpm.tcti, self.pcrs,
                       state_dir or self.state_dir, central, ctl_sock or self.ctl_sock,
                       self.metrics_listen,
                       self.extra_config))
        return self.config

    # NOTIFY_SOCKET: in fleet mode tpmkmsd sends STATUS= after syncs. systemd
    # reads its notify socket all the time; a test socket nobody reads fills up
    # and sd_notify() then blocks the daemon's event loop in sendmsg(). Drain
    # it in the background while the daemon runs, like PID 1 would.

    def wait_ready(self, timeout=t.READY_TIMEOUT):
        super().wait_ready(timeout)
        self._stop_drain()
        self._drain_stop = threading.Event()
        notify, stop = self.notify, self._drain_stop

        def drain():
            while not stop.is_set():
                try:
                    notify.drain(0.2)
                except OSError:
                    return
        self._drainer = threading.Thread(target=drain, daemon=True)
        self._drainer.start()
        return self

    def _stop_drain(self):
        if getattr(self, "_drainer", None) is not None:
            self._drain_stop.set()
            self._drainer.join()
            self._drainer = None

    def stop_daemon(self, timeout=t.STOP_TIMEOUT):
        self._stop_drain()
        return super().stop_daemon(timeout)

    def close(self):
        self._stop_drain()
        super().close()

    # views of `tpmkmsctl status --json`

    def keys(self):
        """{central_id: key dict} of the cached versions."""
        return {k["central_id"]: k for k in self.status_json()["keys"]}

    def roles(self):
        """{central_id: role}."""
        return {cid: k["role"] for cid, k in self.keys().items()}

    def central(self):
        return self.status_json()["central"]

    def endpoint_health(self, name):
        for e in self.central()["endpoints"]:
            if e["name"] == name:
                return e
        raise AssertionError("endpoint %s not in status --json: %r" % (name, self.central()))

    def sync_lines(self):
        return [ln for ln in self.log().splitlines() if re.search(r"sync", ln, re.I)]


def wait_for(pred, timeout, what, interval=0.1):
    """Poll pred() until it returns something true; returns that value. On the
    deadline raise AssertionError naming what and the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = pred()
            if last:
                return last
        except (AssertionError, KeyError, ValueError) as e:
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError("%s: not within %.1fs (last: %r)" % (what, timeout, last))
        time.sleep(interval)
