#!/usr/bin/python3
"""The tpmkms benchmark: a real tpmkmsd on a real swtpm, loaded by kmsbench.

usage: run-bench.py [--quick] [--keep] BUILD_DIR

Measures exec -> READY=1 (NOTIFY_SOCKET pointed at a datagram socket bound
here), then runs kmsbench for the raw unix-socket ping-pong floor and for
Status, Encrypt and Decrypt at 1 in flight and at 32 in flight over 4
connections, then a long Decrypt run sampling the daemon's VmRSS. Prints a
summary with the ratio Decrypt p50 / floor p50 and PASS/MISS per target.

Exit status: non-zero if anything failed to run or any request failed (wrong
gRPC status, wrong plaintext, dropped connection); never because of speed:
the machine is shared and noisy, the figures are for people to judge.
--quick runs a few thousand requests per scenario (the ctest smoke test).
"""
import argparse
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from tpmkmstest_swtpm import Swtpm  # noqa: E402

READY_TIMEOUT = 30        # seconds: the first start creates the SRK on swtpm
STOP_TIMEOUT = 20
KMSBENCH_TIMEOUT = 600

# Targets from the issue (2-core machine, client on the same machine).
TARGET_P50_RATIO = 4.0            # Decrypt p50 at 1 in flight <= 4x floor p50
TARGET_DECRYPT_OPS = 50000        # Decrypts/s at 32 in flight, client included
TARGET_RSS_KIB = 12 * 1024        # VmRSS at most 12 MiB ...
RSS_FLAT_KIB = 256                # ... and flat: growth after the first sample
TARGET_READY_MS = 50.0            # exec -> READY=1, plus the TPM's unseal time

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    """preexec_fn: SIGTERM the child if we die (e.g. a ctest timeout kill)."""
    _libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class BenchError(Exception):
    pass


class Daemon:
    """tpmkmsd in a temp dir on a given swtpm, with its own NOTIFY_SOCKET."""

    def __init__(self, binary, workdir, tpm):
        self.binary = binary
        self.dir = workdir
        self.tpm = tpm
        self.kms_sock = os.path.join(workdir, "kms.sock")
        self.config = os.path.join(workdir, "tpmkmsd.conf")
        self.log_path = os.path.join(workdir, "tpmkmsd.log")
        self.notify_path = os.path.join(workdir, "notify.sock")
        self.proc = None
        self.notify = None
        os.makedirs(os.path.join(workdir, "state"), 0o700, exist_ok=True)
        with open(self.config, "w") as f:
            f.write("[kms]\nsocket = %s\nallowed_uids = %d\n"
                    "[tpm]\ntcti = %s\npcrs = sha256:7\n"
                    "[state]\ndir = %s\n"
                    "[central]\ntype = none\n"
                    "[control]\nsocket = %s\n"
                    "[metrics]\nlisten =\n"
                    % (self.kms_sock, os.getuid(), tpm.tcti,
                       os.path.join(workdir, "state"),
                       os.path.join(workdir, "control.sock")))

    def start(self):
        """Exec the daemon; return milliseconds from exec to READY=1."""
        assert self.proc is None
        if self.notify is None:
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(self.notify_path)
        # drop anything a previous run left queued
        self.notify.setblocking(False)
        try:
            while True:
                self.notify.recv(4096)
        except BlockingIOError:
            pass
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path)
        self.log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        log = open(self.log_path, "ab")
        t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen([self.binary, "--config", self.config],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env, preexec_fn=_die_with_parent)
        finally:
            log.close()
        deadline = t0 + READY_TIMEOUT
        self.notify.settimeout(0.02)
        while True:
            try:
                msg = self.notify.recv(4096).decode(errors="replace")
            except socket.timeout:
                msg = ""
            t = time.monotonic()
            if "READY=1" in msg.split("\n"):
                if not os.path.exists(self.kms_sock):
                    raise BenchError("READY=1 before the KMS socket exists")
                return (t - t0) * 1000.0
            if self.proc.poll() is not None:
                raise BenchError("tpmkmsd exited with %d before READY=1:\n%s"
                                 % (self.proc.returncode, self.log()))
            if t > deadline:
                raise BenchError("no READY=1 within %ds:\n%s" % (READY_TIMEOUT, self.log()))

    def stop(self):
        if self.proc is None:
            return None
        p, self.proc = self.proc, None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise BenchError("tpmkmsd ignored SIGTERM for %ds" % STOP_TIMEOUT)
        return p.returncode

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self):
        try:
            self.stop()
        finally:
            if self.notify is not None:
                self.notify.close()
                self.notify = None


UNSEAL_RE = re.compile(r"unseal\w*\b[^\n]*?(\d+(?:\.\d+)?)\s*(ms|us|µs|s)\b", re.I)


def unseal_ms(log):
    """The unseal time, if the daemon logs one (e.g. 'unsealed cache in 12.3 ms')."""
    m = UNSEAL_RE.search(log)
    if not m:
        return None
    v = float(m.group(1))
    return {"ms": v, "us": v / 1000, "µs": v / 1000, "s": v * 1000}[m.group(2)]


LINE_RE = re.compile(r"^(?P<name>\S+) inflight=(?P<inflight>\d+) conns=(?P<conns>\d+): "
                     r"(?P<ops>[\d.]+) ops/s p50=(?P<p50>[\d.]+)ms p90=(?P<p90>[\d.]+)ms "
                     r"p99=(?P<p99>[\d.]+)ms .*errors=(?P<errors>\d+)")
RSS_RE = re.compile(r"^rss pid=\d+ (?P<when>\w+) requests=(?P<n>\d+): (?P<kib>-?\d+) KiB")


def kmsbench(binary, args, failures):
    """Run kmsbench, echo its output, return (result dict, [rss samples])."""
    cmd = [binary] + args
    print("$ " + " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd)),
          flush=True)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=KMSBENCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        failures.append("kmsbench %s: timed out" % " ".join(args))
        return None, []
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    sys.stdout.flush()
    res, rss = None, []
    for line in r.stdout.splitlines():
        m = LINE_RE.match(line)
        if m:
            res = {k: (float(v) if k not in ("name",) else v) for k, v in m.groupdict().items()}
            for k in ("server_cpu", "client_cpu"):
                c = re.search(r"\b%s=([\d.]+)us/op" % k, line)
                res[k] = float(c.group(1)) if c else None
        m = RSS_RE.match(line)
        if m:
            rss.append((m.group("when"), int(m.group("n")), int(m.group("kib"))))
    if r.returncode != 0 or res is None or res["errors"] > 0:
        failures.append("kmsbench %s: exit %d" % (" ".join(args), r.returncode))
    return res, rss


def verdict(ok):
    if ok is None:
        return "n/a"
    return "PASS" if ok else "MISS"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build_dir")
    ap.add_argument("--quick", action="store_true", help="a few thousand requests (smoke)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--starts", type=int, default=None, help="daemon starts to time")
    a = ap.parse_args()

    tpmkmsd = os.path.join(a.build_dir, "agent", "tpmkmsd")
    bench = os.path.join(a.build_dir, "tests", "bench", "kmsbench")
    for p in (tpmkmsd, bench):
        if not os.access(p, os.X_OK):
            raise BenchError("%s not built" % p)

    if a.quick:
        n1, n32, nlong, starts = 3000, 5000, 20000, a.starts or 2
    else:
        n1, n32, nlong, starts = 100000, 300000, 1000000, a.starts or 5

    failures = []
    workdir = tempfile.mkdtemp(prefix="tpmkms-bench-")
    tpm = Swtpm(os.path.join(workdir, "swtpm"))
    os.mkdir(tpm.state_dir)
    daemon = None

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_signal)

    try:
        tpm.start()
        daemon = Daemon(tpmkmsd, workdir, tpm)

        # exec -> READY=1. The first start provisions (SRK, new KEK, seal);
        # the later ones unseal the cache, which is what a restart costs.
        ready = []
        for i in range(starts):
            ms = daemon.start()
            u = unseal_ms(daemon.log())
            ready.append((ms, u))
            print("start %d: exec -> READY=1 %.1f ms%s%s" % (
                i + 1, ms, " (first start: provisions and seals)" if i == 0 else "",
                "" if u is None else ", unseal %.1f ms logged" % u), flush=True)
            if i < starts - 1:
                rc = daemon.stop()
                if rc != 0:
                    failures.append("tpmkmsd exited %r on SIGTERM" % rc)

        sock, pid = daemon.kms_sock, str(daemon.pid)
        common = ["--socket", sock, "--pid", pid]
        res = {}
        res["floor1"], _ = kmsbench(bench, common + ["--pingpong", "--requests", str(n1)],
                                    failures)
        res["floor32"], _ = kmsbench(bench, common + ["--pingpong", "--requests", str(n32),
                                                      "--inflight", "32", "--connections", "4"],
                                     failures)
        for m in ("status", "encrypt", "decrypt"):
            res[m + "1"], _ = kmsbench(bench, common + ["--method", m, "--requests", str(n1)],
                                       failures)
            res[m + "32"], _ = kmsbench(bench, common + ["--method", m, "--requests", str(n32),
                                                         "--inflight", "32",
                                                         "--connections", "4"], failures)
        res["long"], rss = kmsbench(bench, common + ["--method", "decrypt", "--requests",
                                                     str(nlong), "--inflight", "32",
                                                     "--connections", "4",
                                                     "--label", "decrypt-long"], failures)
        rss_after = subprocess.run(["grep", "-E", "^(VmRSS|VmHWM)", "/proc/%s/status" % pid],
                                   capture_output=True, text=True).stdout.split()

        # Decrypt p99 at 1 in flight, idle vs while `tpmkmsctl reseal` runs
        # back to back (a TPM seal and a cache write each, on the worker
        # thread): alternating rounds, so noise falls on both alike.
        reseal_rounds = {"idle": [], "reseal": []}
        reseals = [0]
        tpmkmsctl = os.path.join(a.build_dir, "agent", "tpmkmsctl")
        stop_reseal = threading.Event()

        def reseal_loop():
            while not stop_reseal.is_set():
                r = subprocess.run([tpmkmsctl, "--config", daemon.config, "reseal"],
                                   capture_output=True, text=True, timeout=60)
                if r.returncode != 0:
                    failures.append("tpmkmsctl reseal: %s" % r.stderr.strip())
                    return
                reseals[0] += 1

        for rnd in range(2 if a.quick else 4):
            for mode in ("idle", "reseal"):
                t = None
                if mode == "reseal":
                    stop_reseal.clear()
                    t = threading.Thread(target=reseal_loop, daemon=True)
                    t.start()
                    time.sleep(0.2)
                r, _ = kmsbench(bench, common + ["--method", "decrypt", "--requests", str(n1 // 4),
                                                 "--label", "decrypt-%s-%d" % (mode, rnd)], failures)
                if t:
                    stop_reseal.set()
                    t.join(60)
                if r:
                    reseal_rounds[mode].append(r["p99"])
        if daemon.proc.poll() is not None:
            failures.append("tpmkmsd died during the benchmark:\n" + daemon.log())
        else:
            rc = daemon.stop()
            if rc != 0:
                failures.append("tpmkmsd exited %r on SIGTERM after the benchmark" % rc)

        # ---- summary ----
        print("\n==== summary (%s) ====" % ("quick" if a.quick else "full"))
        if reseal_rounds["idle"] and reseal_rounds["reseal"]:
            idle = sorted(reseal_rounds["idle"])[len(reseal_rounds["idle"]) // 2]
            busy = sorted(reseal_rounds["reseal"])[len(reseal_rounds["reseal"]) // 2]
            print("Decrypt p99 @1 during a reseal loop / idle (median of rounds): %.3f / %.3f ms = "
                  "%.2fx (target <= 1.2x), %d reseals  %s" % (busy, idle, busy / idle, reseals[0],
                                                             verdict(busy <= 1.2 * idle)))
        print("%-22s %10s %9s %9s %9s" % ("scenario", "ops/s", "p50 ms", "p90 ms", "p99 ms"))
        for k, name in (("floor1", "pingpong floor  1x1"), ("floor32", "pingpong floor 32x4"),
                        ("status1", "Status   1x1"), ("status32", "Status  32x4"),
                        ("encrypt1", "Encrypt  1x1"), ("encrypt32", "Encrypt 32x4"),
                        ("decrypt1", "Decrypt  1x1"), ("decrypt32", "Decrypt 32x4"),
                        ("long", "Decrypt 32x4 long")):
            r = res.get(k)
            if r:
                print("%-22s %10.0f %9.3f %9.3f %9.3f" % (name, r["ops"], r["p50"], r["p90"],
                                                         r["p99"]))
            else:
                print("%-22s %10s" % (name, "failed"))
        print()

        f1, d1, d32, dl = res.get("floor1"), res.get("decrypt1"), res.get("decrypt32"), res.get("long")
        ratio = d1["p50"] / f1["p50"] if f1 and d1 and f1["p50"] > 0 else None
        print("Decrypt p50 @1 / floor p50 @1: %s (target <= %.0fx)  %s" % (
            "%.2fx" % ratio if ratio else "n/a", TARGET_P50_RATIO,
            verdict(None if ratio is None else ratio <= TARGET_P50_RATIO)))
        best = max((r["ops"] for r in (d32, dl) if r), default=None)
        print("Decrypt ops/s @32x4: %s (target >= %d)  %s" % (
            "%.0f" % best if best else "n/a", TARGET_DECRYPT_OPS,
            verdict(None if best is None else best >= TARGET_DECRYPT_OPS)))
        # The machine is shared: ops/s at 32 in flight drops whenever others
        # run. The CPU the daemon and the client spent per request does not;
        # it bounds what this machine does when quiet: one core for the
        # single-threaded daemon, all cores for daemon + client.
        for r in (d32, dl):
            if r and r.get("server_cpu") and r.get("client_cpu"):
                ncpu = os.cpu_count() or 1
                ceil = min(1e6 / r["server_cpu"],
                           ncpu * 1e6 / (r["server_cpu"] + r["client_cpu"]))
                print("  %s: daemon %.2f us/op + client %.2f us/op CPU -> CPU-bound "
                      "ceiling on %d cores %.0f ops/s (%s)" % (
                          r["name"], r["server_cpu"], r["client_cpu"], ncpu, ceil,
                          "load average now %.1f" % os.getloadavg()[0]))
        samples = [kib for _, _, kib in rss if kib > 0]
        if samples:
            peak = max(samples)
            # flat: after the first 100k (or, quick, after the start) no growth
            base = [kib for when, _, kib in rss if when == "during"]
            base = base[0] if base else samples[0]
            growth = samples[-1] - base
            print("RSS over %d Decrypts: %s KiB; peak %d KiB (target <= %d)  %s; "
                  "growth after first sample %+d KiB (flat: <= %d)  %s" % (
                      nlong,
                      " ".join(str(s) for s in samples), peak, TARGET_RSS_KIB,
                      verdict(peak <= TARGET_RSS_KIB), growth, RSS_FLAT_KIB,
                      verdict(growth <= RSS_FLAT_KIB)))
            if rss_after:
                print("  /proc after the run: " + " ".join(rss_after))
        else:
            print("RSS: no samples  n/a")
        later = [ms for ms, _ in ready[1:]] or [ready[0][0]]
        med = sorted(later)[len(later) // 2]
        unseals = [u for _, u in ready[1:] if u is not None]
        if unseals:
            us = sorted(unseals)[len(unseals) // 2]
            print("exec -> READY=1 (restart, median of %d): %.1f ms, of which unseal %.1f ms; "
                  "without unseal %.1f ms (target < %.0f ms)  %s" % (
                      len(later), med, us, med - us, TARGET_READY_MS,
                      verdict(med - us < TARGET_READY_MS)))
        else:
            print("exec -> READY=1 (restart, median of %d): %.1f ms total, unseal time not "
                  "logged by the daemon (target < %.0f ms + unseal)  %s" % (
                      len(later), med, TARGET_READY_MS,
                      "PASS" if med < TARGET_READY_MS else "see total"))
        print("  every start: " + ", ".join("%.1f" % ms for ms, _ in ready) + " ms "
              "(the first provisions: SRK, KEK, seal)")
    except KeyboardInterrupt as e:
        failures.append("interrupted: %s" % e)
    except BenchError as e:
        failures.append(str(e))
    finally:
        if daemon is not None:
            try:
                daemon.close()
            except BenchError as e:
                failures.append(str(e))
        tpm.stop()
        if a.keep:
            print("kept " + workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("\nno request errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
