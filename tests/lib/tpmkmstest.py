"""End-to-end harness: a real tpmkmsd on a real swtpm, driven by a real gRPC client.

A World is one host: a temp dir holding the config, the KMS and control sockets,
the state dir and the daemon's log, plus a swtpm (its own, or one handed in to
play "the same TPM" or "another machine"). Tests use it like this:

    w = World(self)              # registers its own cleanup on the TestCase
    w.start()                    # swtpm + tpmkmsd, waits for READY=1
    stub = w.stub()              # KMS v2 client on the KMS socket
    w.ctl("rotate")              # tpmkmsctl --config ... rotate

Locations come from the environment (set by ctest, see tests/e2e/tests.cmake):
TPMKMSD, TPMKMSCTL (binaries), TPMKMS_STUBS (Python stubs generated from
plugin/kms_v2.proto at build time) and TPMKMS_SOURCE_DIR. A missing binary or
module is an error, never a skip.
"""
import concurrent.futures
import ctypes
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpmkmstest_swtpm import Swtpm, free_port_pair  # noqa: E402,F401

import grpc  # noqa: E402  (python3-grpcio; run with /usr/bin/python3)

KEY_ID_RE = re.compile(r"^local:[0-9a-f]{32}\.[0-9a-f]{16}$")
CACHE_MAGIC = b"TPMKMSC\0"
GCM_OVERHEAD = 29
SERVICE = "/v2.KeyManagementService/"
STOP_TIMEOUT = 20        # seconds a SIGTERMed daemon may take to drain and exit
READY_TIMEOUT = 30       # seconds from exec to READY=1 (SRK creation on swtpm)


def daemon_wrapper():
    """TPMKMS_VALGRIND=1 runs the daemon under valgrind memcheck: any error or
    leak makes it exit 99, which the tests' clean-stop checks turn into a
    failure."""
    if os.environ.get("TPMKMS_VALGRIND") != "1":
        return []
    return ["valgrind", "-q", "--error-exitcode=99", "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect", "--child-silent-after-fork=yes"]


def env_path(name, default=None):
    v = os.environ.get(name, default)
    if not v:
        raise RuntimeError("%s not set: run the e2e tests through ctest "
                           "(or export %s)" % (name, name))
    return v


def source_dir():
    return os.environ.get("TPMKMS_SOURCE_DIR") or os.path.abspath(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


# --- stubs ----------------------------------------------------------------

_pb = None


def stubs():
    """(kms_v2_pb2, kms_v2_pb2_grpc): from TPMKMS_STUBS, or generated now into
    a temp dir from the project's proto when that is not set (demo, manual run)."""
    global _pb
    if _pb is not None:
        return _pb
    d = os.environ.get("TPMKMS_STUBS")
    if not d or not os.path.exists(os.path.join(d, "kms_v2_pb2_grpc.py")):
        d = tempfile.mkdtemp(prefix="tpmkms-stubs-")
        proto_dir = os.path.join(source_dir(), "plugin")
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", proto_dir,
                        "--python_out=" + d, "--grpc_python_out=" + d,
                        os.path.join(proto_dir, "kms_v2.proto")], check=True)
    sys.path.insert(0, d)
    import kms_v2_pb2
    import kms_v2_pb2_grpc
    _pb = (kms_v2_pb2, kms_v2_pb2_grpc)
    return _pb


# --- process hygiene -------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """preexec_fn: SIGTERM the child if the test process dies (ctest timeout
    kill), so no daemon or swtpm outlives its test."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# --- notify socket ---------------------------------------------------------

class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET. Like
    systemd it reads all the time (a thread): a datagram socket nobody reads
    fills up, and the daemon's next sd_notify would then block."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self.messages = []      # every datagram received, in order, decoded
        self._taken = 0         # how many drain() has returned
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append(data.decode(errors="replace"))
                self._cond.notify_all()

    def drain(self, timeout=0.0):
        """What arrived since the last drain (waiting up to timeout for one)."""
        with self._cond:
            if len(self.messages) == self._taken and timeout > 0:
                self._cond.wait(timeout)
            got = self.messages[self._taken:]
            self._taken = len(self.messages)
        return got

    def seen(self, line):
        return any(line in m.split("\n") for m in self.messages)

    def close(self):
        self._closed = True
        self._thread.join(1)
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# --- the world -------------------------------------------------------------

class DaemonError(AssertionError):
    pass


class World:
    """One host: temp dir + swtpm + config + tpmkmsd."""

    def __init__(self, testcase=None, tpm=None, pcrs="sha256:7", extra_config=""):
        self.tpmkmsd = env_path("TPMKMSD")
        self.tpmkmsctl = env_path("TPMKMSCTL")
        self.dir = tempfile.mkdtemp(prefix="tpmkms-e2e-")
        self.kms_sock = os.path.join(self.dir, "kms.sock")
        self.ctl_sock = os.path.join(self.dir, "control.sock")
        self.state_dir = os.path.join(self.dir, "state")
        os.mkdir(self.state_dir, 0o700)
        self.config = os.path.join(self.dir, "tpmkmsd.conf")
        self.log_path = os.path.join(self.dir, "tpmkmsd.log")
        self.pcrs = pcrs
        self.tpm_config = ""      # more lines for [tpm]
        self.daemon_args = []     # e.g. ["--verbose"]
        self.daemon_prefix = []   # a command the daemon runs under (e.g. unshare)
        self.extra_config = extra_config
        self.metrics_listen = ""  # [metrics] listen: a unix socket path or ADDR:PORT
        self.own_tpm = tpm is None
        self.tpm = tpm if tpm is not None else Swtpm()
        self.proc = None
        self.notify = None
        self._log_file = None
        self._log_offset = 0    # log() returns what the current run wrote
        self.channels = []
        if testcase is not None:
            testcase.addCleanup(self.close)

    # config and processes

    def write_config(self, kms_sock=None, tcti=None, ctl_sock=None, state_dir=None):
        with open(self.config, "w") as f:
            f.write("[kms]\nsocket = %s\nallowed_uids = 0\n"
                    "[tpm]\ntcti = %s\npcrs = %s\n%s"
                    "[state]\ndir = %s\n"
                    "[central]\ntype = none\n"
                    "[control]\nsocket = %s\n"
                    "[metrics]\nlisten = %s\n%s"
                    % (kms_sock or self.kms_sock, tcti or self.tpm.tcti, self.pcrs,
                       self.tpm_config, state_dir or self.state_dir, ctl_sock or self.ctl_sock,
                       self.metrics_listen,
                       self.extra_config))
        return self.config

    def start_tpm(self):
        if self.tpm.proc is None:
            self.tpm.start()
        return self

    def start(self, wait_ready=True):
        """Start swtpm (if needed) and tpmkmsd; wait for READY=1 on NOTIFY_SOCKET."""
        self.start_tpm()
        self.write_config()
        return self.start_daemon(wait_ready=wait_ready)

    def start_daemon(self, wait_ready=True, config=None):
        assert self.proc is None, "daemon already running"
        if self.notify is not None:
            self.notify.close()
        self.notify = NotifySocket(os.path.join(self.dir, "notify.sock"))
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = self.notify.path
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")
        self._log_file.flush()
        self._log_offset = os.path.getsize(self.log_path)
        # cwd: the test's own dir, where a core file would land (core_pattern "core")
        self.proc = subprocess.Popen(self.daemon_prefix + daemon_wrapper()
                                     + [self.tpmkmsd, "--config", config or self.config] + self.daemon_args,
                                     stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=self._log_file, env=env, cwd=self.dir,
                                     preexec_fn=_die_with_parent)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=READY_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.notify.drain(0.1)
            if self.notify.seen("READY=1"):
                if not os.path.exists(self.kms_sock):
                    raise DaemonError("READY=1 sent before the KMS socket exists")
                return self
            if self.proc.poll() is not None:
                raise DaemonError("tpmkmsd exited with %d before READY=1:\n%s"
                                  % (self.proc.returncode, self.log()))
        raise DaemonError("tpmkmsd sent no READY=1 within %ds:\n%s" % (timeout, self.log()))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop_daemon(self, timeout=STOP_TIMEOUT):
        """SIGTERM and wait; returns the exit code (kills and raises on a hang)."""
        self.close_channels()
        if self.proc is None:
            return None
        p = self.proc
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                self.proc = None
                raise DaemonError("tpmkmsd did not exit within %ds of SIGTERM" % timeout)
        self.proc = None
        if self.notify is not None:
            self.notify.drain(0.1)
        return p.returncode

    def restart_daemon(self):
        rc = self.stop_daemon() if self.proc is not None else 0
        if rc != 0:
            raise DaemonError("tpmkmsd exited %r on SIGTERM:\n%s" % (rc, self.log()))
        self.write_config()
        return self.start_daemon()

    def reboot(self):
        """Stop the daemon, reboot the TPM (PCRs reset, same state), start again."""
        rc = self.stop_daemon() if self.proc is not None else 0
        if rc != 0:
            raise DaemonError("tpmkmsd exited %r on SIGTERM" % rc)
        self.tpm.restart()
        self.write_config()
        return self.start_daemon()

    def log(self, all_runs=False):
        """The daemon's stderr (this run's, or every run's)."""
        if self._log_file:
            self._log_file.flush()
        try:
            with open(self.log_path, "rb") as f:
                if not all_runs:
                    f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    # clients

    def channel(self, fresh=True, path=None):
        """A gRPC channel on the KMS socket, always on its own connection:
        grpc otherwise shares connections between channels with equal args
        (even across daemon restarts, and grpc python notices a dead idle
        connection only when its next call fails with EPIPE)."""
        opts = [("grpc.use_local_subchannel_pool", 1)]
        ch = grpc.insecure_channel("unix://" + (path or self.kms_sock), options=opts)
        self.channels.append(ch)
        return ch

    def stub(self, fresh=True):
        return stubs()[1].KeyManagementServiceStub(self.channel(fresh))

    def encrypt_one(self):
        """(key id, plaintext, ciphertext) of one random 32-byte secret
        encrypted under the primary, which Status names."""
        stub = self.stub()
        key_id = status(stub).key_id
        pt = os.urandom(32)
        r = encrypt(stub, pt)
        if r.key_id != key_id:
            raise AssertionError("Encrypt under %s, Status names %s" % (r.key_id, key_id))
        return key_id, pt, r.ciphertext

    def close_channels(self):
        for ch in self.channels:
            ch.close()
        self.channels = []

    def ctl(self, *args, check=False, timeout=30):
        r = subprocess.run([self.tpmkmsctl, "--config", self.config] + list(args),
                           capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise DaemonError("tpmkmsctl %s: exit %d: %s" % (" ".join(args), r.returncode,
                                                            r.stderr))
        return r

    def ctl_async(self, *args):
        """tpmkmsctl running in the background (a subprocess.Popen)."""
        return subprocess.Popen([self.tpmkmsctl, "--config", self.config] + list(args),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def scrape(self, timeout=5):
        """GET /metrics on [metrics] listen; returns the body (asserts 200)."""
        status, body = http_get(self.metrics_listen, "/metrics", timeout)
        if status != 200:
            raise AssertionError("GET /metrics: HTTP %d: %s" % (status, body))
        return body

    def status_json(self):
        r = self.ctl("status", "--json", check=True)
        return json.loads(r.stdout)

    # state dir

    def cache_path(self):
        return os.path.join(self.state_dir, "kek-cache")

    def state_snapshot(self):
        """{relative path: sha256} of every file under the state dir."""
        out = {}
        for root, _, files in os.walk(self.state_dir):
            for n in files:
                p = os.path.join(root, n)
                with open(p, "rb") as f:
                    out[os.path.relpath(p, self.state_dir)] = hashlib.sha256(f.read()).hexdigest()
        return out

    def close(self):
        try:
            self.close_channels()
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        finally:
            if self.notify is not None:
                self.notify.close()
            if self._log_file is not None:
                self._log_file.close()
            if self.own_tpm:
                self.tpm.close()
            if os.environ.get("TPMKMS_KEEP") and os.path.exists(self.log_path):
                sys.stderr.write("kept %s\n" % self.dir)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)


def http_get(listen, path, timeout=5):
    """One HTTP/1.0 GET to a unix socket path or ADDR:PORT: (status, body)."""
    if listen.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr = listen
    else:
        host, port = listen.rsplit(":", 1)
        s = socket.socket(socket.AF_INET6 if host.startswith("[") else socket.AF_INET)
        addr = (host.strip("[]"), int(port))
    s.settimeout(timeout)
    try:
        s.connect(addr)
        s.sendall(("GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n" % path).encode())
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


def parse_metrics(text):
    """{(name, frozenset(labels.items())): value} of a text-format scrape."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        if not m:
            raise AssertionError("not a sample line: %r" % line)
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), frozenset(labels.items()))] = float(m.group(3))
    return out


def metric(samples, name, **labels):
    """The value of the one sample of name with exactly these labels."""
    return samples[(name, frozenset(labels.items()))]


# --- KMS v2 helpers --------------------------------------------------------

def status(stub, timeout=5):
    pb = stubs()[0]
    return stub.Status(pb.StatusRequest(), timeout=timeout)


def encrypt(stub, plaintext, uid="e2e", timeout=5):
    pb = stubs()[0]
    return stub.Encrypt(pb.EncryptRequest(plaintext=plaintext, uid=uid), timeout=timeout)


def decrypt(stub, ciphertext, key_id, annotations=None, uid="e2e", timeout=5):
    pb = stubs()[0]
    return stub.Decrypt(pb.DecryptRequest(ciphertext=ciphertext, key_id=key_id, uid=uid,
                                          annotations=annotations or {}),
                        timeout=timeout).plaintext


def rpc_code(fn, *args, **kw):
    """Call and return the grpc.StatusCode (OK if it succeeded)."""
    try:
        fn(*args, **kw)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def tpm_pcr(tpm, pcr=7, bank="sha256"):
    """The current value of one PCR as bytes (tpm2_pcrread)."""
    with tempfile.NamedTemporaryFile() as f:
        subprocess.run(["tpm2_pcrread", "%s:%d" % (bank, pcr), "-o", f.name],
                       env=tpm.env(), check=True, capture_output=True)
        return f.read()


def shannon_entropy(data):
    if not data:
        return 0.0
    counts = [0] * 256
    for b in data:
        counts[b] += 1
    n = len(data)
    return -sum(c / n * math.log2(c / n) for c in counts if c)


def parallel(fn, n, workers=64):
    """Run fn(i) for i in range(n) on a pool; returns the results (raises the first error)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, range(n)))


# --- raw HTTP/2 over the unix socket -----------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def h2_frame(ftype, flags, stream, payload=b"", length=None):
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + struct.pack(">BBI", ftype, flags, stream & 0x7FFFFFFF) + payload


def _hpack_int(value, prefix_bits, first=0):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(headers):
    """HPACK block: each header as 'literal without indexing, new name' (RFC 7541 6.2.2)."""
    out = b""
    for k, v in headers:
        k, v = k.encode(), v.encode()
        out += b"\x00" + _hpack_int(len(k), 7) + k + _hpack_int(len(v), 7) + v
    return out


def grpc_request_headers(method):
    return hpack_literal([(":method", "POST"), (":scheme", "http"),
                          (":path", SERVICE + method), (":authority", "localhost"),
                          ("content-type", "application/grpc"), ("te", "trailers")])


def grpc_message(body):
    return b"\x00" + struct.pack(">I", len(body)) + body


class RawConn:
    """A plain unix stream socket to the KMS socket, for hostile clients."""

    def __init__(self, path, timeout=5):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.closed = False

    def send(self, data):
        self.sock.sendall(data)

    def try_send(self, data):
        """send that tolerates the peer having closed already."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            return False
        except socket.timeout:      # the peer stopped reading: backpressure
            return False

    def _recv(self, timeout):
        self.sock.settimeout(timeout)
        try:
            d = self.sock.recv(65536)
        except socket.timeout:
            return None
        except ConnectionResetError:
            d = b""
        if not d:
            self.closed = True
        self.buf += d
        return d

    def wait_closed(self, timeout=5):
        """True if the peer closes the connection within timeout."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._recv(max(0.01, deadline - time.monotonic()))
        return self.closed

    def frames(self, timeout=5, until=None):
        """Read server frames until until(frames) is true, the peer closes or
        timeout; returns [(type, flags, stream, payload)]."""
        deadline = time.monotonic() + timeout
        out = []
        while True:
            while len(self.buf) >= 9:
                n = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + n:
                    break
                t, fl, sid = struct.unpack(">BBI", self.buf[3:9])
                out.append((t, fl, sid & 0x7FFFFFFF, self.buf[9:9 + n]))
                self.buf = self.buf[9 + n:]
            if until is not None and until(out):
                return out
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return out
            self._recv(left)

    def h2_handshake(self):
        """Client preface + empty SETTINGS; read the server's SETTINGS and ACK it."""
        self.send(H2_PREFACE + h2_frame(SETTINGS, 0, 0))
        fr = self.frames(5, until=lambda fs: any(f[0] == SETTINGS and not f[1] & ACK
                                                  for f in fs))
        if not any(f[0] == SETTINGS and not f[1] & ACK for f in fr):
            raise AssertionError("no server SETTINGS after the preface: %r" % fr)
        self.send(h2_frame(SETTINGS, ACK, 0))
        self.server_settings = {}
        for f in fr:
            if f[0] == SETTINGS and not f[1] & ACK:
                for i in range(0, len(f[3]) - 5, 6):
                    k, v = struct.unpack(">HI", f[3][i:i + 6])
                    self.server_settings[k] = v
        return fr

    def max_frame_size(self):
        return self.server_settings.get(5, 16384)   # SETTINGS_MAX_FRAME_SIZE

    def close(self):
        self.sock.close()


def call_as_uid(sock_path, uid=65534):
    """Run a Status call and a raw HTTP/2 preface as another uid (setpriv);
    returns the dict the child printed."""
    code = r'''
import json, socket, sys, grpc
out = {}
ch = grpc.insecure_channel("unix://" + sys.argv[1],
                           options=[("grpc.use_local_subchannel_pool", 1)])
call = ch.unary_unary("/v2.KeyManagementService/Status")
try:
    call(b"", timeout=5)
    out["grpc"] = "OK"
except grpc.RpcError as e:
    out["grpc"] = e.code().name
ch.close()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
    out["connect"] = True
    try:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    except OSError:
        pass
    try:
        d = s.recv(4096)
        out["raw_reply"] = d.hex()
    except socket.timeout:
        out["raw_reply"] = "timeout"
    except OSError as e:
        out["raw_reply"] = "error:" + e.__class__.__name__
except OSError as e:
    out["connect"] = "error:" + str(e)
print(json.dumps(out))
'''
    r = subprocess.run(["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups",
                        "/usr/bin/python3", "-c", code, sock_path],
                       capture_output=True, text=True, timeout=30, cwd="/")
    if r.returncode != 0:
        raise AssertionError("client as uid %d failed: %s" % (uid, r.stderr))
    return json.loads(r.stdout)
