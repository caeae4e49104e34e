#!/usr/bin/python3
"""Decrypt p99 with metrics scrapers that stall vs without any scraper.

usage: run-bench-metrics.py [--quick] BUILD_DIR

A real tpmkmsd on swtpm with [metrics] listen on a unix socket; a gRPC client
(python3-grpcio) does Decrypts one at a time. Rounds alternate: idle, then
"stalled": fifteen scrapers that each sent half a request and stopped (one
below the server's limit of 16), plus a separate process scraping back to
back (its own process: no GIL shared with the client). Prints p50/p99 of both and the ratio. Exit status is
non-zero only when a request fails, never because of speed.
"""
import argparse
import os
import socket
import sys
import subprocess
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402


# The busy scraper: GET /metrics back to back; prints how many on SIGTERM.
SCRAPER = r"""
import signal, socket, sys
n = 0
def done(*_):
    print(n)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()
    n += 1
"""


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("build")
    a = ap.parse_args()
    os.environ.setdefault("TPMKMSD", os.path.join(a.build, "agent", "tpmkmsd"))
    os.environ.setdefault("TPMKMSCTL", os.path.join(a.build, "agent", "tpmkmsctl"))
    os.environ.setdefault("TPMKMS_STUBS", os.path.join(a.build, "tests", "e2e", "stubs"))
    n, rounds = (500, 2) if a.quick else (5000, 6)
    w = t.World()
    try:
        w.metrics_listen = os.path.join(w.dir, "metrics.sock")
        w.start()
        stub = w.stub()
        enc = t.encrypt(stub, b"m" * 32)
        lat = {"idle": [], "stalled": []}
        scrapes = [0]
        for rnd in range(rounds * 2):
            mode = "idle" if rnd % 2 == 0 else "stalled"
            stalled = []
            if mode == "stalled":
                for _ in range(15):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(w.metrics_listen)
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                    stalled.append(s)

                busy = subprocess.Popen([sys.executable, "-c", SCRAPER, w.metrics_listen],
                                        stdout=subprocess.PIPE, text=True)
            for _ in range(n):
                t0 = time.perf_counter()
                if t.decrypt(stub, enc.ciphertext, enc.key_id) != b"m" * 32:
                    raise SystemExit("wrong plaintext")
                lat[mode].append(time.perf_counter() - t0)
            if mode == "stalled":
                busy.terminate()
                scrapes[0] += int(busy.communicate()[0] or 0)
                for s in stalled:
                    s.close()
        p = {m: (pct(v, 0.5) * 1e3, pct(v, 0.99) * 1e3) for m, v in lat.items()}
        print("Decrypt at 1 in flight, %d calls per mode:" % len(lat["idle"]))
        print("  no scraper:               p50 %.3f ms  p99 %.3f ms" % p["idle"])
        print("  15 stalled + 1 busy scraper: p50 %.3f ms  p99 %.3f ms  (%d scrapes served meanwhile)"
              % (p["stalled"] + (scrapes[0],)))
        print("  p99 ratio stalled/idle: %.2fx" % (p["stalled"][1] / p["idle"][1]))
    finally:
        w.close()


if __name__ == "__main__":
    main()
