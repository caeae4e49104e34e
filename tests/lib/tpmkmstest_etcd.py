"""A real etcd (Debian etcd-server) on 127.0.0.1 for tests, and its client.

    e = Etcd()                  # its own temp dir
    e.start()                   # free client and peer ports, waits until healthy
    e.put(b"/registry/secrets/default/a", b"...")
    e.delete(b"/registry/secrets/default/a")
    e.snapshot_save(path)       # etcdctl snapshot save (Debian etcd-client)
    e.close()                   # SIGTERM, wait, remove the dir

Keys and values go through etcd's JSON gateway (/v3/kv/...: base64, binary
safe, one HTTP connection), so a test can write thousands. Missing etcd or
etcdctl is an error, never a skip. TPMKMS_KEEP=1 keeps the directory.
"""
import base64
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

_libc = ctypes.CDLL(None, use_errno=True)
START_TIMEOUT = 30


def _die_with_parent():
    _libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def free_port():
    """A free TCP port on 127.0.0.1 (any port: nothing here assumes parity)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64(b):
    return base64.b64encode(b).decode()


class Etcd:
    def __init__(self, extra_args=()):
        for tool in ("etcd", "etcdctl"):
            if shutil.which(tool) is None:
                raise RuntimeError("%s not installed: run packaging/build-deps.sh" % tool)
        self.dir = tempfile.mkdtemp(prefix="tpmkms-etcd-")
        self.data_dir = os.path.join(self.dir, "data")
        self.extra_args = list(extra_args)
        self.proc = None
        self.conn = None
        self.client_port = None

    @property
    def endpoint(self):
        return "http://127.0.0.1:%d" % self.client_port

    def backend_path(self):
        """The live bbolt file (read it with etcd stopped)."""
        return os.path.join(self.data_dir, "member", "snap", "db")

    def start(self):
        """Start on free ports; a parallel test can take a port between the
        probe and etcd's bind: then retry on others."""
        for _ in range(5):
            if self._start_once():
                return self
            self.stop()
            shutil.rmtree(self.data_dir, ignore_errors=True)
        raise RuntimeError("etcd did not start:\n" + self.log())

    def _start_once(self):
        self.client_port = free_port()
        peer_port = free_port()
        while peer_port == self.client_port:
            peer_port = free_port()
        peer = "http://127.0.0.1:%d" % peer_port
        self._log = open(os.path.join(self.dir, "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", self.data_dir,
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", "t=" + peer, "--log-outputs", "stderr"] + self.extra_args,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=2)
                c.request("GET", "/health")
                ok = json.loads(c.getresponse().read()).get("health") == "true"
                c.close()
                if ok:
                    return True
            except (OSError, ValueError, http.client.HTTPException):
                pass
            time.sleep(0.1)
        return False

    def log(self):
        try:
            with open(os.path.join(self.dir, "etcd.log"), "rb") as f:
                return f.read().decode(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def _call(self, path, body):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=60)
            try:
                self.conn.request("POST", path, json.dumps(body),
                                  {"Content-Type": "application/json"})
                r = self.conn.getresponse()
                data = r.read()
                break
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        if r.status != 200:
            raise RuntimeError("etcd %s: %d %s" % (path, r.status, data[:300]))
        return json.loads(data)

    def put(self, key, value):
        """Returns the revision of the write."""
        return int(self._call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})["header"]["revision"])

    def put_many(self, items):
        """One transaction of puts ((key, value) pairs; etcd allows 128 per txn)."""
        ops = [{"requestPut": {"key": _b64(k), "value": _b64(v)}} for k, v in items]
        return int(self._call("/v3/kv/txn", {"success": ops})["header"]["revision"])

    def delete(self, key):
        return int(self._call("/v3/kv/deleterange", {"key": _b64(key)})["header"]["revision"])

    def compact(self, revision):
        self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def etcdctl(self, *args):
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run(["etcdctl", "--endpoints=" + self.endpoint] + list(args),
                              capture_output=True, text=True, timeout=600, env=env,
                              stdin=subprocess.DEVNULL, check=True)

    def snapshot_save(self, path):
        self.etcdctl("snapshot", "save", path)
        return path

    def stop(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
            self._log.close()

    def close(self):
        try:
            self.stop()
        finally:
            if os.environ.get("TPMKMS_KEEP"):
                sys.stderr.write("kept %s\n" % self.dir)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
