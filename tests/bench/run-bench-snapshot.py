#!/usr/bin/python3
"""tpmkmsctl audit-snapshot on large real etcd snapshots (a benchmark, not a
timed test).

usage: run-bench-snapshot.py [--mib N] [--keep] BUILD_DIR   (ctest: bench-snapshot-smoke, 16 MiB)

Fills a real etcd (tests/lib/tpmkmstest_etcd.py) with objects as
kube-apiserver stores them, 2-14 KiB each: a third KMS v2 Secrets (under 4
key ids), a third plaintext Secrets, a third plaintext ConfigMaps; every
fourth object is written twice (history that the audit must skip). It saves a
snapshot at 1/16 of the way and at the end (N MiB of data, default 1024),
then audits both three times, sampling the process's memory from /proc every
millisecond: peak RssAnon (heap and stack: must not grow with the file) and
peak RssFile (mapped pages of the snapshot, which the kernel may drop at any
time). Prints the figures and the speed; exits non-zero only if something
failed to run or the counts are wrong, never because of speed.
"""
import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from tpmkmstest_etcd import Etcd  # noqa: E402

TXN_OPS = 96                    # puts per transaction (etcd allows 128)
TARGET_SECONDS_PER_GIB = 10.0   # the figure, for the reader to judge


def encrypted_object(key_id, size):
    def ld(number, payload):
        n, out = len(payload), b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | 0x80]) if n else bytes([b])
            if not n:
                break
        return bytes([number << 3 | 2]) + out + payload
    return ld(1, os.urandom(size)) + ld(2, key_id.encode()) + ld(3, os.urandom(61)) + b"\x28\x01"


def value_for(i, rng):
    size = rng.randint(2048, 14336)
    kind = i % 3
    if kind == 0:
        key = b"/registry/secrets/ns-%d/s-%d" % (i % 50, i)
        return key, b"k8s:enc:kms:v2:tpmkms:" + encrypted_object("local:bench.%d" % (i % 4), size)
    if kind == 1:
        return b"/registry/secrets/ns-%d/p-%d" % (i % 50, i), b"k8s\x00" + os.urandom(size)
    return b"/registry/configmaps/ns-%d/c-%d" % (i % 50, i), b'{"kind":"ConfigMap","data":"' + \
        os.urandom(size).hex()[:size].encode() + b'"}'


def fill(etcd, mib, snapshot_small, snapshot_large):
    rng = random.Random(1)
    total, written, batch, again, i = mib << 20, 0, [], [], 0
    small_at = total // 16
    small_saved = False
    objects = 0
    t0 = time.monotonic()
    while written < total:
        key, value = value_for(i, rng)
        batch.append((key, value))
        written += len(value)
        objects += 1
        if i % 4 == 0:
            again.append(value_for(i, rng))       # an overwrite, in a later transaction
            written += len(again[-1][1])
        i += 1
        if len(batch) >= TXN_OPS or written >= total or (not small_saved and written >= small_at):
            etcd.put_many(batch)
            if again:
                etcd.put_many(again)
            batch, again = [], []
        if not small_saved and written >= small_at:
            etcd.snapshot_save(snapshot_small)
            small_saved = objects
    etcd.snapshot_save(snapshot_large)
    print("filled etcd: %d objects, %.0f MiB of values in %.0f s"
          % (objects, written / 2**20, time.monotonic() - t0))
    return small_saved, objects


def status_kib(pid, field):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def audit(tpmkmsctl, path):
    """(seconds, peak RssAnon KiB, peak RssFile KiB, VmHWM KiB, stdout)"""
    out = tempfile.TemporaryFile()
    t0 = time.monotonic()
    p = subprocess.Popen([tpmkmsctl, "audit-snapshot", path, "--json", "--require-encrypted", "secrets"],
                         stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    anon = file_ = hwm = 0
    while p.poll() is None:
        a, f, h = (status_kib(p.pid, k) for k in ("RssAnon", "RssFile", "VmHWM"))
        anon, file_, hwm = max(anon, a or 0), max(file_, f or 0), max(hwm, h or 0)
        time.sleep(0.001)
    seconds = time.monotonic() - t0
    err = p.stderr.read().decode()
    if p.returncode != 1:      # plaintext Secrets are there on purpose
        raise RuntimeError("audit-snapshot exited %d: %s" % (p.returncode, err))
    out.seek(0)
    return seconds, anon, file_, hwm, out.read()


def check_counts(doc_bytes, objects):
    import json
    doc = json.loads(doc_bytes)
    res = {r["resource"]: r for r in doc["resources"]}
    counted = res["secrets"]["objects"] + res.get("configmaps", {"objects": 0})["objects"]
    if counted != objects:
        raise RuntimeError("counted %d objects, wrote %d" % (counted, objects))
    kms = sum(k["objects"] for k in res["secrets"]["kms_v2_key_ids"])
    if kms != res["secrets"]["kms_v2"] or len(res["secrets"]["kms_v2_key_ids"]) != 4:
        raise RuntimeError("KMS v2 key ids do not add up: %r" % res["secrets"]["kms_v2_key_ids"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("build_dir")
    a = ap.parse_args()
    tpmkmsctl = os.path.join(a.build_dir, "agent", "tpmkmsctl")
    work = tempfile.mkdtemp(prefix="tpmkms-bench-snapshot-")
    etcd = Etcd(extra_args=["--quota-backend-bytes", str(8 << 30), "--snapshot-count", "1000000"])
    try:
        etcd.start()
        small, large = os.path.join(work, "small.db"), os.path.join(work, "large.db")
        n_small, n_large = fill(etcd, a.mib, small, large)
        etcd.close()
        print("%-6s %10s %9s %8s %8s %12s %12s %10s" % ("", "file MiB", "objects", "run", "seconds",
                                                       "RssAnon KiB", "RssFile KiB", "MiB/s"))
        for name, path, n in (("small", small, n_small), ("large", large, n_large)):
            size = os.path.getsize(path)
            for run in range(3):
                sec, anon, file_, _, doc = audit(tpmkmsctl, path)
                check_counts(doc, n)
                print("%-6s %10.0f %9d %8d %8.2f %12d %12d %10.0f"
                      % (name, size / 2**20, n, run + 1, sec, anon, file_, size / 2**20 / sec))
        size = os.path.getsize(large)
        print("target: %.0f s per GiB -> at most %.1f s for the large file" %
              (TARGET_SECONDS_PER_GIB, TARGET_SECONDS_PER_GIB * size / 2**30))
    finally:
        etcd.close()
        if a.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
