#!/usr/bin/python3
"""The fleet benchmark: H hosts (each a tpmkmsd on its own swtpm, default 20)
syncing one key group from one PyKMIP, all on this machine.

usage: run-bench-fleet.py [--hosts H] [--versions N] [--interval S] [--window S]
                          [--decrypt-secs S] BUILD_DIR

1. N versions (default 10: N-1 Deactivated, 1 Active), then the H hosts start
   (sync_interval S, default 10s; every host uses the client certificate
   CN=node-a, so PyKMIP's log counts the fleet as one client).
2. A window of steady syncs with no change: central request messages, TLS
   sessions (connections) and PyKMIP CPU per host-sync (host-syncs: the
   hosts' syncs_ok in `tpmkmsctl status --json`).
3. Decrypt at 1 in flight (kmsbench) on host 0 while the fleet syncs, then
   with the other hosts stopped: p50/p99.
   (Run before 4: the fleet is still up.)
4. A new version: created (every host stages it at its next sync), then
   activated: the time from Activate until every host's Status key_id names
   it (at most about one sync_interval + 10%: no host polls faster).

Exit status non-zero only if something failed to run; the figures are for
people (a shared 2-core machine: PyKMIP, 20 daemons and 20 swtpms share it).
"""
import argparse
import importlib.util
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))

GROUP = "fleet-kek"
CN = "node-a"


def load_sync_bench():
    """run-bench-sync.py's helpers (CpuProbe, kmsbench)."""
    spec = importlib.util.spec_from_file_location("bench_sync", os.path.join(HERE, "run-bench-sync.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build_dir")
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--versions", type=int, default=10)
    ap.add_argument("--interval", type=int, default=10, help="sync_interval, seconds")
    ap.add_argument("--window", type=float, default=60.0, help="steady-state window, seconds")
    ap.add_argument("--decrypt-secs", type=float, default=10.0)
    a = ap.parse_args()

    build = os.path.abspath(a.build_dir)
    os.environ["TPMKMSD"] = os.path.join(build, "agent", "tpmkmsd")
    os.environ["TPMKMSCTL"] = os.path.join(build, "agent", "tpmkmsctl")
    kmsbench_bin = os.path.join(build, "tests", "bench", "kmsbench")
    bs = load_sync_bench()
    import tpmkmstest as t
    import tpmkmstest_kmip as k

    pki = k.Pki(minimal=True)
    pki.make_client(CN).make_client("kms-admin")    # the hosts; the operator
    kms = k.KmipServer(pki)
    hosts = []
    try:
        kms.start()
        uids = [kms.create_version(GROUP, distinct_second=False) for _ in range(a.versions)]
        for u in uids:
            kms.activate(u)
        for u in uids[:-1]:
            kms.deactivate(u)
        print("==== tpmkms fleet benchmark: %d hosts, %d versions, sync_interval %ds, %d cpus ===="
              % (a.hosts, a.versions, a.interval, os.cpu_count() or 0), flush=True)
        t0 = time.monotonic()
        for i in range(a.hosts):
            w = k.FleetWorld(None, kms, cn=CN, group=GROUP, sync_interval="%ds" % a.interval,
                             timeout="10s")
            hosts.append(w)
            w.start()
        for w in hosts:
            k.wait_for(lambda w=w: len(w.roles()) == a.versions, 120, "first sync")
        print("%d hosts up and synced in %.1f s" % (a.hosts, time.monotonic() - t0), flush=True)

        # ---- 2. steady state ----
        time.sleep(a.interval)      # past the first syncs
        cpu = bs.CpuProbe(hosts[0].proc.pid, kms.proc.pid)
        off = kms.log_offset()
        ok0 = sum(w.central()["syncs_ok"] for w in hosts)
        c0 = cpu.sample()
        time.sleep(a.window)
        c1 = cpu.sample()
        ok1 = sum(w.central()["syncs_ok"] for w in hosts)
        syncs = ok1 - ok0
        msgs = kms.requests_from(CN, off)
        sessions = len(kms.sessions_from(CN, off))
        kcpu = (c1["kmip"] - c0["kmip"]) / 1000.0
        print("steady %.0f s: %d host-syncs; central: %d request messages (%.2f per host-sync), "
              "%d TLS sessions (%.2f), %d Get, PyKMIP CPU %.0f ms (%.1f ms per host-sync, %.0f%% of one "
              "core)" % (a.window, syncs, msgs, msgs / max(syncs, 1), sessions, sessions / max(syncs, 1),
                         kms.operations("Get", off), kcpu, kcpu / max(syncs, 1),
                         100.0 * kcpu / 1000.0 / a.window), flush=True)
        resumed = sum(w.central()["endpoints"][0]["tls_resumed"] for w in hosts)
        total = sum(w.central()["endpoints"][0]["requests"] for w in hosts)
        print("  TLS: %d of %d connections resumed a session" % (resumed, total), flush=True)

        # ---- 3. Decrypt on host 0 ----
        w0 = hosts[0]
        during = bs.kmsbench(kmsbench_bin, w0.kms_sock, w0.proc.pid, a.decrypt_secs, "fleet-sync")
        for w in hosts[1:]:
            w.stop_daemon()
        idle = bs.kmsbench(kmsbench_bin, w0.kms_sock, w0.proc.pid, a.decrypt_secs, "fleet-idle")
        for w in hosts[1:]:
            w.start_daemon()
        print("Decrypt @1 in flight on host 0: with the fleet syncing p50 %.3f p99 %.3f ms; other "
              "hosts stopped p50 %.3f p99 %.3f ms (%.2fx)" % (
                  during["p50"], during["p99"], idle["p50"], idle["p99"],
                  during["p99"] / idle["p99"] if idle["p99"] else float("nan")), flush=True)

        # ---- 4. rotation ----
        new = kms.create_version(GROUP, distinct_second=True)
        for w in hosts:
            k.wait_for(lambda w=w: w.roles().get(new) == "staged", 4 * a.interval + 30, "staged")
        kid = "kmip:%s/%s.%s" % (GROUP, new, k.key_check_value(kms.get(new)))
        stubs = [w.stub() for w in hosts]
        t0 = time.monotonic()
        kms.activate(new)
        pending = set(range(len(hosts)))
        times = {}
        while pending and time.monotonic() - t0 < 4 * a.interval + 30:
            for i in list(pending):
                if t.status(stubs[i]).key_id == kid:
                    times[i] = time.monotonic() - t0
                    pending.discard(i)
            time.sleep(0.05)
        if pending:
            raise RuntimeError("%d hosts never took the new primary" % len(pending))
        ts = sorted(times.values())
        print("Activate -> every host's Status key_id is the new version: %.1f s (first host %.1f s, "
              "median %.1f s)" % (ts[-1], ts[0], ts[len(ts) // 2]), flush=True)
    finally:
        for w in hosts:
            try:
                w.close()
            except Exception as e:   # keep stopping the others
                print("stopping a host: %s" % e, file=sys.stderr)
        kms.close()
        pki.close()
    print("no errors")


if __name__ == "__main__":
    main()
