#!/usr/bin/python3
"""Metrics on [metrics] listen, the shipped alert rules and the dashboard,
against real daemons (swtpm, PyKMIP over mutual TLS, a real gRPC client):

  - after a known sequence of calls the scrape has exact counts and labels,
    and `promtool check metrics` accepts it;
  - a fleet host shows its sync, endpoints, staleness and client certificate;
    a refused host its refusal cause;
  - the alert rules pass `promtool check rules`, and `promtool test rules`
    on input series whose names and label sets come from those real scrapes;
  - the rules and the dashboard use only series that the daemon serves;
  - scrapers that stall hold neither the KMS socket nor other scrapers.
"""
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import yaml  # python3-yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
import tpmkmstest_kmip as k  # noqa: E402
from grpc import StatusCode  # noqa: E402

MONITORING = os.path.join(t.source_dir(), "packaging", "monitoring")
RULES = os.path.join(MONITORING, "tpmkms-alerts.yml")
DASHBOARD = os.path.join(MONITORING, "tpmkms-dashboard.json")
GROUP = "cluster-a-kek"
PKI = None
SCRAPES = {}        # name: scrape text, shared by the rule and dashboard tests


def setUpModule():
    global PKI
    PKI = k.Pki()


def tearDownModule():
    if PKI is not None:
        PKI.close()


def promtool(*args, stdin=None):
    return subprocess.run(["promtool"] + list(args), input=stdin, capture_output=True, text=True,
                          timeout=60)


def families(text):
    """Metric family names with a # TYPE line in a scrape."""
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def series(samples, name, **override):
    """The label sets of name in a scrape, each as a promtool series string
    with override applied (e.g. instance="a")."""
    out = []
    for (n, labels), _ in samples.items():
        if n != name:
            continue
        lab = dict(labels)
        lab.update(override)
        out.append("%s{%s}" % (n, ",".join('%s="%s"' % (a, b) for a, b in sorted(lab.items()))))
    if not out:
        raise AssertionError("%s not in the scrape" % name)
    return out


def one_series(samples, name, **match_and_override):
    """The one series of name whose labels match those given with a value,
    rewritten with instance etc.: match on keys present in the scrape."""
    for s in series(samples, name):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', s))
        if all(labels.get(a) == b for a, b in match_and_override.items() if a in labels and a != "instance"):
            labels.update(match_and_override)
            return "%s{%s}" % (name, ",".join('%s="%s"' % (a, b) for a, b in sorted(labels.items())))
    raise AssertionError("no %s matching %r" % (name, match_and_override))


class LocalMetrics(unittest.TestCase):
    def test_known_sequence(self):
        w = t.World(self)
        w.metrics_listen = os.path.join(w.dir, "metrics.sock")
        w.start()
        stub = w.stub()
        first = [t.encrypt(stub, bytes([i]) * 32) for i in range(3)]
        a = first[0].key_id
        for r in first[:2]:
            t.decrypt(stub, r.ciphertext, r.key_id)
        bad = bytearray(first[2].ciphertext)
        bad[-1] ^= 1
        self.assertEqual(t.rpc_code(t.decrypt, stub, bytes(bad), a), StatusCode.INVALID_ARGUMENT)
        self.assertEqual(t.rpc_code(t.decrypt, stub, first[2].ciphertext, "local:nope.0"), StatusCode.NOT_FOUND)
        t.status(stub)
        b = w.ctl("rotate", check=True).stdout.strip()
        r = t.encrypt(stub, b"b" * 32)
        self.assertEqual(r.key_id, b)
        t.decrypt(stub, r.ciphertext, b)
        t.decrypt(stub, first[2].ciphertext, a)

        text = w.scrape()
        m = t.parse_metrics(text)
        self.assertEqual(t.metric(m, "tpmkms_requests_total", method="Encrypt", code="OK"), 4)
        self.assertEqual(t.metric(m, "tpmkms_requests_total", method="Decrypt", code="OK"), 4)
        self.assertEqual(t.metric(m, "tpmkms_requests_total", method="Decrypt", code="INVALID_ARGUMENT"), 1)
        self.assertEqual(t.metric(m, "tpmkms_requests_total", method="Decrypt", code="NOT_FOUND"), 1)
        self.assertEqual(t.metric(m, "tpmkms_requests_total", method="Status", code="OK"), 1)
        self.assertEqual(sorted(dict(lab)["code"] for n, lab in m if n == "tpmkms_requests_total"),
                         sorted(["OK", "OK", "OK", "INVALID_ARGUMENT", "NOT_FOUND"]))
        for method, n in (("Encrypt", 4), ("Decrypt", 6), ("Status", 1), ("other", 0)):
            self.assertEqual(t.metric(m, "tpmkms_request_duration_seconds_count", method=method), n)
            self.assertEqual(t.metric(m, "tpmkms_request_duration_seconds_bucket", method=method, le="+Inf"), n)
        self.assertEqual(t.metric(m, "tpmkms_decrypts_total", key_id=a, result="ok"), 3)
        self.assertEqual(t.metric(m, "tpmkms_decrypts_total", key_id=a, result="error"), 1)
        self.assertEqual(t.metric(m, "tpmkms_decrypts_total", key_id=b, result="ok"), 1)
        self.assertEqual(t.metric(m, "tpmkms_decrypts_total", key_id="unknown", result="error"), 1)
        self.assertEqual(t.metric(m, "tpmkms_key_info", key_id=a, role="retired", central_id=""), 1)
        self.assertEqual(t.metric(m, "tpmkms_key_info", key_id=b, role="primary", central_id=""), 1)
        self.assertEqual([dict(lab) for n, lab in m if n == "tpmkms_primary_key_info"],
                         [{"key_id": b, "key_group": ""}])
        since = t.metric(m, "tpmkms_primary_key_since_timestamp_seconds")
        self.assertLess(abs(since - time.time()), 60)
        self.assertEqual(t.metric(m, "tpmkms_build_info", version=t.env_path("TPMKMS_VERSION", "0.1.0"),
                                  mode="standalone"), 1)
        self.assertEqual(t.metric(m, "tpmkms_connections_accepted_total"), 1)
        self.assertEqual(t.metric(m, "tpmkms_connections_open"), 1)
        if os.environ.get("TPMKMS_SANITIZED") == "1":
            self.assertNotIn("tpmkms_heap_", text, "no heap figures from a sanitizer's allocator")
        else:
            self.check_heap(m, w.proc.pid)
        self.assertEqual(t.metric(m, "tpmkms_connections_refused_total"), 0)
        st = os.stat(w.cache_path())
        self.assertAlmostEqual(t.metric(m, "tpmkms_cache_write_timestamp_seconds"), st.st_mtime, delta=0.01)
        self.assertNotIn("tpmkms_sync_last_success_timestamp_seconds", text, "no central series standalone")
        r = promtool("check", "metrics", stdin=text)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(t.http_get(w.metrics_listen, "/other")[0], 404)
        SCRAPES["standalone"] = text

    def check_heap(self, m, pid):
        """The allocator's figures are real: something in use, no more than
        was obtained, and that no more than the process's resident memory."""
        in_use = t.metric(m, "tpmkms_heap_in_use_bytes")
        obtained = t.metric(m, "tpmkms_heap_obtained_bytes")
        with open("/proc/%d/status" % pid) as f:
            rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) * 1024
        self.assertGreater(in_use, 64 * 1024)
        self.assertLessEqual(in_use, obtained)
        self.assertLess(obtained, rss)

    def test_tcp_listen_and_refused_host(self):
        w = t.World(self)
        w.metrics_listen = "127.0.0.1:%d" % k.free_port()
        w.start()
        w.stop_daemon()
        w.tpm.pcr_extend(7)
        w.start_daemon()
        text = w.scrape()
        m = t.parse_metrics(text)
        self.assertEqual([dict(lab) for n, lab in m if n == "tpmkms_unseal_refusals_total"],
                         [{"cause": "measured_boot"}])
        self.assertFalse([n for n, _ in m if n in ("tpmkms_primary_key_info", "tpmkms_key_info")])
        self.assertEqual(promtool("check", "metrics", stdin=text).returncode, 0)
        SCRAPES["refused"] = text

    def test_stalled_scrapers(self):
        """Sixteen scrapers that send half a request and stop: the KMS socket
        answers as before, and once they time out a scrape works again."""
        w = t.World(self)
        w.metrics_listen = os.path.join(w.dir, "metrics.sock")
        w.start()
        stub = w.stub()
        r = t.encrypt(stub, b"s" * 32)
        stalled = []
        for _ in range(16):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(w.metrics_listen)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            stalled.append(s)
        t0 = time.monotonic()
        for _ in range(200):
            t.decrypt(stub, r.ciphertext, r.key_id)
        self.assertLess(time.monotonic() - t0, 2.0, "Decrypts waited on the stalled scrapers")
        for s in stalled:
            s.close()
        k.wait_for(lambda: t.parse_metrics(w.scrape(timeout=2)), 15, "a scrape after the stall")


class FleetMetrics(unittest.TestCase):
    def test_fleet_scrape(self):
        kms = k.KmipServer(PKI, self)
        kms.start()
        v1 = kms.create_version(GROUP)
        kms.activate(v1)
        v2 = kms.create_version(GROUP)          # Pre-Active: staged
        dead = "127.0.0.1:%d" % k.dead_port()
        w = k.FleetWorld(self, kms, cn="node-a", group=GROUP, max_staleness="1h",
                         endpoints=[dead, kms.endpoint])
        w.metrics_listen = os.path.join(w.dir, "metrics.sock")
        w.start()
        k.wait_for(lambda: len(w.roles()) == 2 and w.central()["last_sync"], 10, "first sync")
        stub = w.stub()
        enc = t.encrypt(stub, b"f" * 32)
        t.decrypt(stub, enc.ciphertext, enc.key_id)
        self.assertEqual(t.rpc_code(t.decrypt, stub, enc.ciphertext, "kmip:%s/none.00" % GROUP),
                         StatusCode.NOT_FOUND)
        text = w.scrape()
        m = t.parse_metrics(text)
        keys = w.keys()
        self.assertEqual([dict(lab) for n, lab in m if n == "tpmkms_primary_key_info"],
                         [{"key_id": keys[v1]["id"], "key_group": GROUP}])
        self.assertEqual(t.metric(m, "tpmkms_key_info", key_id=keys[v2]["id"], role="staged", central_id=v2), 1)
        self.assertEqual(t.metric(m, "tpmkms_decrypts_total", key_id=keys[v1]["id"], result="ok"), 1)
        self.assertEqual(t.metric(m, "tpmkms_central_max_staleness_seconds"), 3600)
        self.assertLess(t.metric(m, "tpmkms_central_staleness_seconds"), 30)
        self.assertGreaterEqual(t.metric(m, "tpmkms_syncs_total", result="ok"), 1)
        self.assertEqual(t.metric(m, "tpmkms_central_endpoint_up", endpoint=kms.endpoint), 1)
        self.assertEqual(t.metric(m, "tpmkms_central_endpoint_up", endpoint=dead), 0)
        self.assertGreaterEqual(t.metric(m, "tpmkms_central_endpoint_errors_total", endpoint=dead), 1)
        self.assertEqual(t.metric(m, "tpmkms_central_endpoint_errors_total", endpoint=kms.endpoint), 0)
        self.assertGreater(t.metric(m, "tpmkms_central_endpoint_latency_seconds", endpoint=kms.endpoint), 0)
        last = t.metric(m, "tpmkms_sync_last_success_timestamp_seconds")
        self.assertLess(abs(last - time.time()), 30)
        end = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in", w.cert],
                             capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
        want = time.mktime(time.strptime(end, "%Y-%m-%d %H:%M:%SZ")) - time.timezone
        self.assertEqual(t.metric(m, "tpmkms_client_certificate_expiry_timestamp_seconds"), want)
        r = promtool("check", "metrics", stdin=text)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        SCRAPES["fleet"] = text


class Rules(unittest.TestCase):
    """Runs after the scrapes above (unittest orders classes by name: Fleet,
    Local, Rules); a scrape not taken yet (one test run alone) is taken here."""

    def scrape(self, name):
        if name not in SCRAPES:
            case = {"fleet": "test_fleet_scrape", "standalone": "test_known_sequence",
                    "refused": "test_tcp_listen_and_refused_host"}[name]
            cls = FleetMetrics if name == "fleet" else LocalMetrics
            res = unittest.TestResult()
            cls(case).run(res)
            self.assertTrue(res.wasSuccessful(), res.errors + res.failures)
        return t.parse_metrics(SCRAPES[name]), SCRAPES[name]

    def test_check_rules(self):
        r = promtool("check", "rules", RULES)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("SUCCESS: 12 rules found", r.stdout)

    def test_rules_and_dashboard_use_served_series(self):
        served = set()
        for name in ("fleet", "standalone", "refused"):
            served |= families(self.scrape(name)[1])
        with open(RULES) as f:
            rules = "\n".join(r["expr"] for g in yaml.safe_load(f)["groups"] for r in g["rules"])
        with open(DASHBOARD) as f:
            dash = json.load(f)
        exprs = [tg["expr"] for p in dash["panels"] for tg in p["targets"]]
        exprs.append(dash["templating"]["list"][1]["query"])
        for where, text in (("rules", rules), ("dashboard", "\n".join(exprs))):
            used = set(re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\btpmkms_\w+", text))
            self.assertTrue(used, where)
            self.assertEqual(used - served, set(), "%s uses series the daemon does not serve" % where)

    def test_rules_on_scraped_series(self):
        fleet, _ = self.scrape("fleet")
        refused, _ = self.scrape("refused")
        prim = series(fleet, "tpmkms_primary_key_info", instance="a")[0]
        staged = [dict(lab)["key_id"] for (n, lab) in fleet
                  if n == "tpmkms_key_info" and dict(lab)["role"] == "staged"][0]
        prim_b = re.sub(r'key_id="[^"]*"', 'key_id="%s"' % staged, prim).replace('instance="a"', 'instance="b"')
        endpoint_down = [s for s in series(fleet, "tpmkms_central_endpoint_up", instance="a")
                         if fleet[("tpmkms_central_endpoint_up",
                                   frozenset(dict(re.findall(r'(\w+)="([^"]*)"', s)).items()
                                             - {("instance", "a")}))] == 0][0]
        dead = re.search(r'endpoint="([^"]*)"', endpoint_down).group(1)
        buckets = series(fleet, "tpmkms_request_duration_seconds_bucket", instance="a")
        decrypt_buckets = [(s, 0 if float(re.search(r'le="([^"]*)"', s).group(1).replace("+Inf", "inf")) < 0.25
                            else 10) for s in buckets if 'method="Decrypt"' in s]
        ok = one_series(fleet, "tpmkms_requests_total", method="Decrypt", code="OK", instance="a")
        nf = one_series(fleet, "tpmkms_requests_total", method="Decrypt", code="NOT_FOUND", instance="a")
        cause = dict([lab for n, lab in refused if n == "tpmkms_unseal_refusals_total"][0])["cause"]
        build = series(refused, "tpmkms_build_info", instance="r")[0]
        refusal = series(refused, "tpmkms_unseal_refusals_total", instance="r")[0]
        cert = series(fleet, "tpmkms_client_certificate_expiry_timestamp_seconds", instance="a")[0]
        stale = series(fleet, "tpmkms_central_staleness_seconds", instance="a")[0]
        max_stale = series(fleet, "tpmkms_central_max_staleness_seconds", instance="a")[0]
        sync_ok = one_series(fleet, "tpmkms_syncs_total", result="ok", instance="a")
        sync_err = one_series(fleet, "tpmkms_syncs_total", result="error", instance="a")

        def alert(name, at, labels, summary, description):
            return {"eval_time": at, "alertname": name, "exp_alerts": [] if labels is None else [
                {"exp_labels": labels, "exp_annotations": {"summary": summary, "description": description}}]}

        tests = [
            {"interval": "1m", "input_series": [
                {"series": prim, "values": "1x20"}, {"series": prim_b, "values": "1x20"}],
             "alert_rule_test": [
                alert("TpmkmsPrimaryDisagreement", "5m", None, "", ""),
                alert("TpmkmsPrimaryDisagreement", "15m", {"key_group": GROUP, "severity": "critical"},
                      "Hosts of key group %s disagree on the primary key" % GROUP,
                      "2 different primary key ids for more than 10 minutes. Compare tpmkms_primary_key_info "
                      "per host; see docs/runbook.md, 'Hosts disagree on the primary'.")]},
            {"interval": "1m", "input_series": [
                {"series": build, "values": "1x10"}, {"series": refusal, "values": "1x10"}],
             "alert_rule_test": [
                alert("TpmkmsUnsealRefused", "1m", {"instance": "r", "cause": cause, "severity": "critical"},
                      "r refused its sealed cache (%s): nothing is served" % cause,
                      "See docs/runbook.md, 'Recovery of a refused host'."),
                alert("TpmkmsNoPrimary", "6m", {"instance": "r", "version": dict(re.findall(
                      r'(\w+)="([^"]*)"', build))["version"], "mode": "standalone", "severity": "critical"},
                      "r serves no primary key: Encrypt fails",
                      "See tpmkmsctl doctor and docs/runbook.md, 'Triage'.")]},
            {"interval": "1m", "input_series": [
                {"series": sync_ok, "values": "5x40"}, {"series": sync_err, "values": "0+1x40"},
                {"series": endpoint_down, "values": "0x40"},
                {"series": stale, "values": "2000+60x40"}, {"series": max_stale, "values": "3600x40"},
                {"series": cert, "values": "%dx40" % (10 * 86400)}],
             "alert_rule_test": [
                alert("TpmkmsSyncFailing", "25m", {"instance": "a", "result": "error", "severity": "warning"},
                      "a: no successful sync with the central KMS in 15 minutes",
                      "The host keeps serving from its cache but learns of no rotation or compromise. "
                      "tpmkmsctl doctor names the failing endpoint; see docs/runbook.md, 'Central KMS "
                      "unreachable'."),
                alert("TpmkmsCentralEndpointDown", "16m", {"instance": "a", "endpoint": dead,
                                                           "severity": "warning"},
                      "a: central KMS endpoint %s failing" % dead,
                      "Failover keeps syncs going while another endpoint answers. See tpmkmsctl doctor."),
                alert("TpmkmsStalenessNearMax", "10m", None, "", ""),
                alert("TpmkmsStalenessNearMax", "20m", {"instance": "a", "severity": "critical"},
                      "a: keys last synced 53m 20s ago, near max_staleness",
                      "At [central] max_staleness the host stops serving (fail closed) and the apiserver "
                      "fails. Restore the central KMS connection; see docs/runbook.md, 'Central KMS "
                      "unreachable'."),
                alert("TpmkmsClientCertificateExpiring", "1m", {"instance": "a", "severity": "warning"},
                      "a: client certificate for the central KMS expires in 9d 23h 59m 0s",
                      "Renew [central] cert_file (tpmkmsctl enroll makes the CSR). An expired certificate "
                      "stops every sync.")]},
            {"interval": "1m", "input_series": [
                {"series": ok, "values": "0+100x20"}, {"series": nf, "values": "0+10x20"}]
             + [{"series": s, "values": "0+%dx20" % n} for s, n in decrypt_buckets],
             "alert_rule_test": [
                alert("TpmkmsErrorRatio", "15m", {"instance": "a", "severity": "critical"},
                      "a: 9.091% of Encrypt/Decrypt calls fail",
                      "tpmkms_requests_total by code tells which (NOT_FOUND: unknown key id; "
                      "FAILED_PRECONDITION: refused cache; UNAVAILABLE: no keys or max_staleness). See "
                      "docs/runbook.md, 'Symptoms'."),
                alert("TpmkmsLatencyHigh", "15m", {"instance": "a", "method": "Decrypt", "severity": "warning"},
                      "a: Decrypt p99 248.5ms",
                      "Calls are served from memory and take well under a millisecond; the apiserver gives "
                      "up at 3 s. Look for CPU starvation or a flood of connections (tpmkms_connections_*).")]},
        ]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "tests.yml")
            with open(path, "w") as f:    # JSON is YAML
                json.dump({"rule_files": [RULES], "evaluation_interval": "1m", "tests": tests}, f, indent=1)
            r = promtool("test", "rules", path)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


if __name__ == "__main__":
    unittest.main()
