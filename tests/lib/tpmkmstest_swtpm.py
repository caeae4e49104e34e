"""A real swtpm (TPM 2.0 simulator) on 127.0.0.1 for tests.

Each instance picks two free loopback ports (server, control = server + 1),
keeps its state in its own directory and is stopped with SIGTERM (never
SIGKILL: the dictionary-attack counter). Missing swtpm is an error, never a skip.
"""
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    """preexec_fn: SIGTERM swtpm if the test process dies (e.g. killed by a
    ctest timeout), so no simulator outlives its test."""
    _libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def free_port_pair():
    """Two consecutive free TCP ports on 127.0.0.1 (swtpm needs P and P+1)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of loopback ports")


class Swtpm:
    def __init__(self, state_dir=None):
        if shutil.which("swtpm") is None:
            raise RuntimeError("swtpm not installed: run packaging/build-deps.sh")
        self.owns_dir = state_dir is None
        self.state_dir = state_dir or tempfile.mkdtemp(prefix="swtpm-")
        self.port = None
        self.proc = None

    @property
    def tcti(self):
        return "swtpm:host=127.0.0.1,port=%d" % self.port

    def env(self):
        e = dict(os.environ)
        e["TPM2TOOLS_TCTI"] = self.tcti
        return e

    def start(self):
        """Start on a fresh free port pair. A parallel test can take the pair
        between the probe and swtpm's bind: then retry on another pair."""
        last = None
        for _ in range(5):
            try:
                return self._start_once()
            except RuntimeError as e:
                last = e
                self.stop()
                time.sleep(0.1)
        raise last

    def _start_once(self):
        self.port = free_port_pair()
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2",
             "--tpmstate", "dir=" + self.state_dir,
             "--server", "type=tcp,port=%d,bindaddr=127.0.0.1" % self.port,
             "--ctrl", "type=tcp,port=%d,bindaddr=127.0.0.1" % (self.port + 1),
             "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("swtpm exited: %s" % self.proc.stderr.read().decode())
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("swtpm did not listen on port %d" % self.port)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self):
        """A reboot: the same TPM (state), PCRs reset by startup-clear."""
        self.stop()
        return self.start()

    def pcr_extend(self, pcr=7, bank="sha256"):
        """Change a bound PCR, as booting other software would."""
        subprocess.run(["tpm2_pcrextend", "%d:%s=%s" % (pcr, bank, "ab" * 32)],
                       env=self.env(), check=True, capture_output=True)

    def close(self):
        self.stop()
        if self.owns_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
