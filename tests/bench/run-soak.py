#!/usr/bin/python3
"""The soak test: a fleet-mode tpmkmsd under mixed load while the central KMS
rotates, goes down and comes back, and the cache is resealed.

usage: run-soak.py [--seconds N] [--clients N] [--keep] BUILD_DIR

All parts are real: swtpm, PyKMIP over mutual TLS (tests/lib/tpmkmstest_kmip.py),
the daemon built in BUILD_DIR and a grpcio client (tests/lib/tpmkmstest.py).

- The daemon syncs key group "soak-kek" every 1 s.
- Client threads (--clients, default 3), each on its own connection, loop:
  one Status, one Encrypt of a random 32-byte seed, then DECRYPTS_PER_ROUND
  Decrypts walking round and round the list of every ciphertext made so far.
  Every Encrypt's (ciphertext, key_id, plaintext) is kept.
- The central driver rotates every ROTATE_EVERY s (create a Pre-Active
  version, wait until the daemon has it staged, activate it, deactivate the
  previous primary, wait until the daemon's roles say primary / retired)
  and every RESTART_EVERY s stops PyKMIP for DOWN_SECS (same port and
  database) and starts it again: the daemon must keep serving from its cache.
- The reseal driver runs `tpmkmsctl reseal` every RESEAL_EVERY s.
- A sampler reads the daemon's VmRSS, Threads (/proc/PID/status) and open fds
  (/proc/PID/fd) every second.
At the end every ciphertext ever made is decrypted once more (deactivated
versions are retired, none is destroyed: all must read back).

Asserted (exit 1, after printing the figures): zero failed calls of any kind
(gRPC error, wrong plaintext, Status not "ok"), every Encrypt under a version
the driver made, every rotation seen by the daemon within ROLE_TIMEOUT, every
reseal exit 0, at least one rotation and one restart (and one reseal in a
run of 45 s or more), failed syncs in the daemon's own count (the outages
reached it), the daemon alive with the same pid and exiting 0 on SIGTERM, its
cache at the end holding every version, the newest primary and the others
retired; after the warm-up (the first WARMUP_SHARE of the samples' time) the
heap in use (the daemon's tpmkms_heap_in_use_bytes; the median of the last
WINDOW_SHARE of the samples against that of the first) grown by less than
HEAP_GROWTH_MAX plus HEAP_PER_VERSION per version added (not checked with
--no-memory-check, for sanitizer builds), and the last fd count within FD_SLACK of that baseline. RSS and the
heap obtained from the kernel are printed, not asserted: they also count
fragmentation, which a leak check must not (README, "Tests and figures"). Speed is printed, never
asserted. The ctest soak-smoke runs it for 60 s (tests/bench/CMakeLists.txt);
the README's figures come from a 600 s run.
"""
import argparse
import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
import tpmkmstest as t  # noqa: E402  (grpc, PyKMIP: run with /usr/bin/python3)
import tpmkmstest_kmip as k  # noqa: E402

GROUP = "soak-kek"
CN = "node-a"
DECRYPTS_PER_ROUND = 4
ROTATE_EVERY = 5.0           # s from one rotation's start to the next
RESTART_EVERY = 20.0         # s between PyKMIP restarts
DOWN_SECS = 3.0              # PyKMIP down this long (plus its own stop and start)
RESEAL_EVERY = 30.0
ROLE_TIMEOUT = 30.0          # a version staged / promoted by the daemon within this
RPC_TIMEOUT = 5.0
WARMUP_SHARE = 0.10
HEAP_GROWTH_MAX = 256        # KiB of heap in use after the warm-up, plus
HEAP_PER_VERSION = 2         # KiB per version added meanwhile (0.6 measured)
WINDOW_SHARE = 0.10          # the heap compared between the first and last such share
FD_SLACK = 4
MAX_LISTED = 10              # failures printed in full


class SoakError(Exception):
    pass


def pct(xs, p):
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p))]


def series(xs):
    """min / median / max, first / last of a sampled series."""
    return "min %d, median %d, max %d; first %d, last %d" % (
        min(xs), statistics.median(xs), max(xs), xs[0], xs[-1])


class Run:
    """What every thread records; failures are (t, kind, detail)."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.made = []           # (ciphertext, key_id, plaintext), append-only
        self.failures = []
        self.stop = threading.Event()
        self.kms_down = threading.Event()

    def now(self):
        return time.monotonic() - self.t0

    def fail(self, kind, detail):
        with self.lock:
            self.failures.append((self.now(), kind, detail))


class Client(threading.Thread):
    """Status, Encrypt, Decrypts of what was made so far, in a loop."""

    def __init__(self, run, stub, index):
        super().__init__(daemon=True)
        self.run_ = run
        self.stub = stub
        self.cursor = index * 7919
        self.lat = {"status": [], "encrypt": [], "decrypt": []}
        self.during_outage = 0   # Encrypts and Decrypts answered while PyKMIP was down

    def call(self, kind, fn):
        t0 = time.monotonic()
        try:
            r = fn()
        except t.grpc.RpcError as e:
            self.run_.fail(kind, "%s: %s" % (e.code().name, e.details()))
            return None
        self.lat.setdefault(kind, []).append(time.monotonic() - t0)
        return r

    def decrypt(self, rec, kind="decrypt"):
        ct, kid, pt = rec
        got = self.call(kind, lambda: t.decrypt(self.stub, ct, kid, uid="soak",
                                                timeout=RPC_TIMEOUT))
        if got is not None and got != pt:
            self.run_.fail(kind, "wrong plaintext under %s" % kid)
        return got is not None

    def run(self):
        run = self.run_
        try:
            while not run.stop.is_set():
                st = self.call("status", lambda: t.status(self.stub, timeout=RPC_TIMEOUT))
                if st is not None and st.healthz != "ok":
                    run.fail("status", "healthz %r" % st.healthz)
                pt = secrets.token_bytes(32)
                r = self.call("encrypt", lambda: t.encrypt(self.stub, pt, uid="soak",
                                                           timeout=RPC_TIMEOUT))
                ok = 0
                if r is not None:
                    run.made.append((r.ciphertext, sys.intern(r.key_id), pt))
                    ok += 1
                for _ in range(DECRYPTS_PER_ROUND):
                    n = len(run.made)
                    if n:
                        self.cursor = (self.cursor + 1) % n
                        ok += self.decrypt(run.made[self.cursor])
                if run.kms_down.is_set():
                    self.during_outage += ok
        except Exception:   # noqa: BLE001  recorded, the run fails
            run.fail("client", traceback.format_exc())


class Sampler(threading.Thread):
    """(t, VmRSS KiB, Threads, open fds, heap in use KiB, heap obtained KiB,
    versions made) of the daemon every second; the heap figures from its
    /metrics."""

    def __init__(self, run, world, central):
        super().__init__(daemon=True)
        self.run_ = run
        self.world = world
        self.central = central
        self.pid = world.proc.pid
        self.samples = []
        self.done = threading.Event()

    def sample(self):
        rss = threads = None
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        fds = len(os.listdir("/proc/%d/fd" % self.pid))
        m = t.parse_metrics(self.world.scrape())
        in_use = m.get(("tpmkms_heap_in_use_bytes", frozenset()))
        obtained = m.get(("tpmkms_heap_obtained_bytes", frozenset()))
        if in_use is not None:
            in_use, obtained = int(in_use) // 1024, int(obtained) // 1024
        self.samples.append((self.run_.now(), rss, threads, fds, in_use, obtained,
                             len(self.central.versions)))

    def run(self):
        try:
            while not self.done.is_set():
                self.sample()
                self.done.wait(1.0)
        except (OSError, AssertionError) as e:
            self.run_.fail("daemon", "pid %d: sampling failed: %s" % (self.pid, e))


class CentralDriver(threading.Thread):
    """Rotations at the central KMS and PyKMIP restarts, one at a time."""

    def __init__(self, run, kms, world, first_uid):
        super().__init__(daemon=True)
        self.run_ = run
        self.kms = kms
        self.w = world
        self.versions = {first_uid: key_id(kms, first_uid)}   # uid -> key id
        self.order = [first_uid]
        self.primary = first_uid
        self.rotations = []      # (create -> staged, activate -> primary) seconds
        self.downs = []          # seconds PyKMIP did not listen

    def wait_roles(self, want, what):
        deadline = time.monotonic() + ROLE_TIMEOUT
        while True:
            roles = self.w.roles()
            if all(roles.get(u) == r for u, r in want.items()):
                return
            if time.monotonic() > deadline:
                raise SoakError("%s: not within %.0f s (roles %r)" % (what, ROLE_TIMEOUT, roles))
            time.sleep(0.1)

    def rotate(self):
        t0 = time.monotonic()
        uid = self.kms.create_version(GROUP)
        self.versions[uid] = key_id(self.kms, uid)
        self.order.append(uid)
        self.wait_roles({uid: "staged"}, "version %s staged" % uid)
        t1 = time.monotonic()
        self.kms.activate(uid)
        self.kms.deactivate(self.primary)
        self.wait_roles({uid: "primary", self.primary: "retired"},
                        "version %s primary, %s retired" % (uid, self.primary))
        self.rotations.append((t1 - t0, time.monotonic() - t1))
        self.primary = uid

    def restart(self):
        t0 = time.monotonic()
        self.kms.stop()
        self.run_.kms_down.set()
        self.run_.stop.wait(DOWN_SECS)
        self.kms.start()
        self.run_.kms_down.clear()
        self.downs.append(time.monotonic() - t0)

    def run(self):
        run = self.run_
        next_rotate = time.monotonic() + ROTATE_EVERY
        next_restart = time.monotonic() + RESTART_EVERY
        try:
            while not run.stop.is_set():
                due = min(next_rotate, next_restart)
                if run.stop.wait(max(0.0, due - time.monotonic())):
                    break
                if next_restart <= time.monotonic():
                    self.restart()
                    next_restart = time.monotonic() + RESTART_EVERY
                else:
                    self.rotate()
                    next_rotate += ROTATE_EVERY
                    next_rotate = max(next_rotate, time.monotonic())
        except Exception:   # noqa: BLE001  recorded, the run fails
            run.fail("central driver", traceback.format_exc())
            run.kms_down.clear()


class ResealDriver(threading.Thread):
    """`tpmkmsctl reseal` every RESEAL_EVERY s."""

    def __init__(self, run, world):
        super().__init__(daemon=True)
        self.run_ = run
        self.w = world
        self.walls = []

    def run(self):
        run = self.run_
        while not run.stop.wait(RESEAL_EVERY):
            t0 = time.monotonic()
            try:
                r = self.w.ctl("reseal")
            except Exception:   # noqa: BLE001  a timeout: recorded, the run fails
                run.fail("reseal", traceback.format_exc())
                continue
            if r.returncode != 0:
                run.fail("reseal", "exit %d: %s" % (r.returncode, r.stderr.strip()))
            else:
                self.walls.append(time.monotonic() - t0)


def key_id(kms, uid):
    """The fleet-wide key id of version uid (tests/e2e/test_fleet.py, key_id)."""
    return "kmip:%s/%s.%s" % (GROUP, uid, k.key_check_value(kms.get(uid)))


def final_pass(run, clients):
    """Decrypt every ciphertext ever made once more, split over the clients'
    connections; returns (count, seconds)."""
    made = list(run.made)
    t0 = time.monotonic()

    def part(i):
        c = clients[i]
        for rec in made[i::len(clients)]:
            c.decrypt(rec, kind="final decrypt")
    threads = [threading.Thread(target=part, args=(i,)) for i in range(len(clients))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return len(made), time.monotonic() - t0


def report(a, run, clients, central, reseal, sampler, soak_secs, final, sync, checks):
    """Print the figures; returns the list of failed assertions."""
    failed = []
    print("\n==== soak summary: %.0f s of load, %d client threads, %d cpus ====" % (
        soak_secs, a.clients, os.cpu_count() or 0))
    counts = {}
    for kind in ("status", "encrypt", "decrypt"):
        lat = [x for c in clients for x in c.lat[kind]]
        counts[kind] = len(lat)
        print("%-8s %9d ok  %7.0f ops/s  p50 %.2f ms  p99 %.2f ms  max %.1f ms" % (
            kind, len(lat), len(lat) / soak_secs, pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3,
            max(lat, default=float("nan")) * 1e3))
    total = sum(counts.values())
    print("all      %9d ok  %7.0f ops/s" % (total, total / soak_secs))
    n_final, t_final = final
    print("final pass: %d ciphertexts decrypted once more in %.1f s (%.0f/s), under %d key ids"
          % (n_final, t_final, n_final / max(t_final, 1e-9), len({r[1] for r in run.made})))
    rot = central.rotations
    print("rotations: %d (create -> staged median %.2f s, max %.2f; activate -> primary "
          "median %.2f s, max %.2f); %d versions" % (
              len(rot), statistics.median([r[0] for r in rot]) if rot else float("nan"),
              max([r[0] for r in rot], default=float("nan")),
              statistics.median([r[1] for r in rot]) if rot else float("nan"),
              max([r[1] for r in rot], default=float("nan")), len(central.versions)))
    print("PyKMIP restarts: %d (stop, %.0f s, start: %.1f-%.1f s each); Encrypts + Decrypts "
          "answered while it was down: %d" % (
              len(central.downs), DOWN_SECS, min(central.downs, default=0),
              max(central.downs, default=0), sum(c.during_outage for c in clients)))
    print("reseals: %d ok (median %.2f s, max %.2f)" % (
        len(reseal.walls), statistics.median(reseal.walls) if reseal.walls else float("nan"),
        max(reseal.walls, default=float("nan"))))
    print("daemon syncs: %d ok, %d failed, %d on demand" % (
        sync["syncs_ok"], sync["syncs_failed"], sync["on_demand"]))
    by_kind = {}
    for _, kind, _ in run.failures:
        by_kind[kind] = by_kind.get(kind, 0) + 1
    print("failures: %d (%s)" % (len(run.failures), ", ".join(
        "%s %d" % kv for kv in sorted(by_kind.items())) or "none"))
    for when, kind, detail in run.failures[:MAX_LISTED]:
        print("  at %.1f s, %s: %s" % (when, kind, detail.strip()))
    print("  decrypt failures: %d during the load, %d in the final pass" % (
        by_kind.get("decrypt", 0), by_kind.get("final decrypt", 0)))
    print("  encrypt failures: %d" % by_kind.get("encrypt", 0))

    s = sampler.samples
    warm_end = s[0][0] + (s[-1][0] - s[0][0]) * WARMUP_SHARE
    after = [x for x in s if x[0] >= warm_end]
    base = after[0]
    rss = [x[1] for x in after]
    fds = [x[3] for x in after]
    heap = [x[4] for x in after]
    # A leak keeps the heap in use up; requests in flight move it both ways:
    # the medians of the first and the last window after the warm-up.
    window = max(1, int(len(after) * WINDOW_SHARE))
    heap_first = statistics.median(heap[:window]) if heap[0] is not None else None
    heap_last = statistics.median(heap[-window:]) if heap[0] is not None else None
    added = s[-1][6] - base[6]
    heap_max = HEAP_GROWTH_MAX + HEAP_PER_VERSION * added
    print("samples: %d over %.0f s; warm-up until %.0f s" % (len(s), s[-1][0] - s[0][0],
                                                            warm_end - s[0][0]))
    print("RSS KiB, whole run: %s" % series([x[1] for x in s]))
    print("RSS KiB, after the warm-up: %s; over the baseline %d: max %+d, last %+d" % (
        series(rss), base[1], max(rss) - base[1], rss[-1] - base[1]))
    if heap_first is not None:
        print("heap in use KiB, after the warm-up: %s; median of the last %d samples %+.0f "
              "over the first %d (limit %+d: %d versions added)" % (
                  series(heap), window, heap_last - heap_first, window, heap_max, added))
        print("heap obtained KiB, after the warm-up: %s" % series([x[5] for x in after]))
    elif a.no_memory_check:
        print("heap: not reported by this build (a sanitizer's allocator); "
              "memory not checked (--no-memory-check)")
    print("open fds, whole run: %s" % series([x[3] for x in s]))
    print("open fds, after the warm-up: %s; baseline %d, last %+d (limit +-%d)" % (
        series(fds), base[3], fds[-1] - base[3], FD_SLACK))
    print("threads: %s" % series([x[2] for x in s]))

    if run.failures:
        failed.append("%d failed calls or driver errors (listed above)" % len(run.failures))
    if heap_first is None and not a.no_memory_check:
        failed.append("the daemon reports no tpmkms_heap_in_use_bytes (sanitizer build? "
                      "then --no-memory-check)")
    if heap_first is not None and heap_last - heap_first >= heap_max:
        failed.append("heap in use grew %.0f KiB after the warm-up (limit %d)" % (
            heap_last - heap_first, heap_max))
    if abs(fds[-1] - base[3]) > FD_SLACK:
        failed.append("open fds %d at the end, baseline %d (limit +-%d)" % (
            fds[-1], base[3], FD_SLACK))
    if not rot or not central.downs or (soak_secs >= RESEAL_EVERY * 1.5 and not reseal.walls):
        failed.append("the drivers did too little: %d rotations, %d restarts, %d reseals" % (
            len(rot), len(central.downs), len(reseal.walls)))
    return failed + checks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build_dir")
    ap.add_argument("--seconds", type=float, default=600.0, help="load duration")
    ap.add_argument("--clients", type=int, default=3, help="client threads")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs")
    ap.add_argument("--no-memory-check", action="store_true",
                    help="a sanitizer build: its allocator reports no heap figures")
    a = ap.parse_args()

    build = os.path.abspath(a.build_dir)
    os.environ["TPMKMSD"] = os.path.join(build, "agent", "tpmkmsd")
    os.environ["TPMKMSCTL"] = os.path.join(build, "agent", "tpmkmsctl")
    os.environ.setdefault("TPMKMS_STUBS", os.path.join(build, "tests", "e2e", "stubs"))
    if a.keep:
        os.environ["TPMKMS_KEEP"] = "1"
    for p in (os.environ["TPMKMSD"], os.environ["TPMKMSCTL"]):
        if not os.access(p, os.X_OK):
            raise SoakError("%s not built" % p)

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_signal)

    failed = []
    pki = kms = world = None
    run = Run()
    threads = []
    sampler = None
    try:
        print("==== tpmkms soak: %.0f s, %d clients, %d cpus, load %.1f ====" % (
            a.seconds, a.clients, os.cpu_count() or 0, os.getloadavg()[0]), flush=True)
        pki = k.Pki(minimal=True)
        pki.make_client(CN).make_client("kms-admin")
        kms = k.KmipServer(pki)
        kms.start()
        first = kms.create_version(GROUP)
        kms.activate(first)
        world = k.FleetWorld(None, kms, cn=CN, group=GROUP, sync_interval="1s", timeout="2s")
        world.metrics_listen = os.path.join(world.dir, "metrics.sock")
        world.start()
        pid = world.proc.pid
        central = CentralDriver(run, kms, world, first)
        central.wait_roles({first: "primary"}, "the first version primary")
        clients = [Client(run, world.stub(), i) for i in range(a.clients)]
        sampler = Sampler(run, world, central)
        reseal = ResealDriver(run, world)
        run.t0 = time.monotonic()
        sampler.start()
        threads = clients + [central, reseal]
        for th in threads:
            th.start()
        print("load, rotations every %.0f s, PyKMIP restarts every %.0f s (down %.0f s), "
              "reseals every %.0f s ..." % (ROTATE_EVERY, RESTART_EVERY, DOWN_SECS,
                                            RESEAL_EVERY), flush=True)
        while run.now() < a.seconds:
            time.sleep(min(10.0, a.seconds - run.now()))
            if run.now() < a.seconds:
                print("  %4.0f s: %d ciphertexts, %d rotations, %d restarts, %d reseals, "
                      "%d failures, RSS %d KiB, %d fds" % (
                          run.now(), len(run.made), len(central.rotations), len(central.downs),
                          len(reseal.walls), len(run.failures), sampler.samples[-1][1],
                          sampler.samples[-1][3]), flush=True)
        run.stop.set()
        for th in threads:
            th.join()
        soak_secs = run.now()
        final = final_pass(run, clients)
        sampler.done.set()
        sampler.join()
        sampler.sample()

        checks = []
        unknown = [r[1] for r in run.made if r[1] not in central.versions.values()]
        if unknown:
            checks.append("%d Encrypts under key ids the driver never made (%s)"
                          % (len(unknown), unknown[0]))
        roles = world.roles()
        want = {u: "retired" for u in central.order}
        want[central.primary] = "primary"
        if roles != want:
            checks.append("cache roles at the end %r, want %r" % (roles, want))
        if not world.alive() or world.proc.pid != pid:
            checks.append("tpmkmsd died:\n" + world.log())
        sync = world.central()
        if central.downs and not sync["syncs_failed"]:
            checks.append("no failed sync in the daemon's status: the outages did not reach it")
        failed = report(a, run, clients, central, reseal, sampler, soak_secs, final, sync,
                        checks)
        rc = world.stop_daemon()
        if rc != 0:
            failed.append("tpmkmsd exited %r on SIGTERM:\n%s" % (rc, world.log()))
    except KeyboardInterrupt as e:
        failed.append("interrupted: %s" % e)
    except (SoakError, RuntimeError, AssertionError, OSError, ValueError,
            subprocess.TimeoutExpired) as e:
        failed.append("%s: %s" % (type(e).__name__, e))
    finally:
        run.stop.set()
        for th in threads:
            th.join(60)
        if sampler is not None:
            sampler.done.set()
        if world is not None:
            world.close()        # daemon, swtpm, its temp dir
        if kms is not None:
            kms.close()          # PyKMIP's process group, its temp dir
        if pki is not None:
            if a.keep:
                print("kept %s" % pki.dir)
            else:
                pki.close()

    if failed:
        print("\nFAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    print("\nno errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
