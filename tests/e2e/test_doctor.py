#!/usr/bin/python3
"""tpmkmsctl doctor on real hosts (swtpm, tpmkmsd, PyKMIP over mutual TLS):
each case breaks one thing and asserts the finding that names it, what it
says to do, and the exit status (0 healthy, 1 warnings, 2 failures). An
expired client certificate is a failure (2): the central KMS refuses every
sync with it."""
import datetime
import json
import os
import re
import signal
import sys
import time
import unittest

from cryptography import x509  # python3-cryptography
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
import tpmkmstest_kmip as k  # noqa: E402

GROUP = "doctor-kek"
PKI = None


def setUpModule():
    global PKI
    PKI = k.Pki(days=365)       # not within doctor's 30-day expiry warning


def tearDownModule():
    if PKI is not None:
        PKI.close()


def doctor(w, timeout=60):
    """(exit status, {check: finding}, the findings in order) of doctor --json."""
    r = w.ctl("doctor", "--json", timeout=timeout)
    out = json.loads(r.stdout)
    return r.returncode, {f["check"]: f for f in out["findings"]}, out


def expired_client_cert(pki, name, cn):
    """NAME.crt for CN cn with cn's key (CN.key), signed by the test CA,
    valid from ten days ago until yesterday."""
    with open(pki.key("ca"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    with open(pki.crt("ca"), "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    with open(pki.key(cn), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    with open(pki.crt(name), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return pki.crt(name)


class Standalone(unittest.TestCase):
    def setUp(self):
        self.w = t.World(self)
        self.w.tpm_config = "timeout = 3s\n"
        self.w.start()

    def test_healthy(self):
        code, f, out = doctor(self.w)
        self.assertEqual(code, 0, out)
        self.assertEqual(out["status"], "ok")
        for check in ("daemon", "kms-socket", "tpm", "measured-boot", "cache"):
            self.assertEqual(f[check]["status"], "ok", f[check])
        text = self.w.ctl("doctor")
        self.assertEqual(text.returncode, 0)
        self.assertIn("healthy: 0 failure(s), 0 warning(s)", text.stdout)

    def test_daemon_stopped(self):
        self.w.stop_daemon()
        code, f, out = doctor(self.w)
        self.assertEqual(code, 2, out)
        self.assertEqual(f["daemon"]["status"], "failure")
        self.assertIn("start tpmkmsd", f["daemon"]["action"])
        self.assertEqual(f["kms-socket"]["status"], "failure")
        self.assertEqual(f["tpm"]["status"], "ok", "the TPM is still checked")
        self.assertEqual(f["measured-boot"]["status"], "ok")

    def test_extended_pcr_and_restart(self):
        self.w.stop_daemon()
        self.w.tpm.pcr_extend(7)
        self.w.start_daemon()
        code, f, out = doctor(self.w)
        self.assertEqual(code, 2, out)
        self.assertEqual(f["daemon"]["status"], "failure")
        self.assertIn("measured boot mismatch", f["daemon"]["detail"])
        mb = f["measured-boot"]
        self.assertEqual(mb["status"], "failure")
        self.assertRegex(mb["detail"], r"PCR\(s\) 7 differ .*sealed sha256:7=0{64}, now sha256:7=[0-9a-f]{64}")
        self.assertIn("Recovery of a refused host", mb["action"])

    def test_pcr_extended_while_serving(self):
        self.w.tpm.pcr_extend(7)
        code, f, out = doctor(self.w)
        self.assertEqual(code, 1, out)
        self.assertEqual(f["measured-boot"]["status"], "warning")
        self.assertIn("the next start refuses the cache", f["measured-boot"]["detail"])
        self.assertIn("tpmkmsctl reseal", f["measured-boot"]["action"])

    def test_stopped_swtpm(self):
        pid = self.w.tpm.proc.pid
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)
        t0 = time.monotonic()
        code, f, out = doctor(self.w, timeout=20)
        took = time.monotonic() - t0
        self.assertLess(took, 8, "doctor took %.1f s on a silent TPM" % took)
        self.assertEqual(code, 2, out)
        self.assertEqual(f["tpm"]["status"], "failure")
        self.assertIn("no answer from the TPM", f["tpm"]["detail"])
        self.assertIn("within 3 s", f["tpm"]["detail"])
        self.assertEqual(f["daemon"]["status"], "ok", "the keys keep serving from memory")

    def test_kms_socket_owned_by_another_uid(self):
        os.chown(self.w.kms_sock, 65534, 65534)
        code, f, out = doctor(self.w)
        self.assertEqual(code, 2, out)
        s = f["kms-socket"]
        self.assertEqual(s["status"], "failure")
        self.assertIn("owned by uid 65534, which is not in [kms] allowed_uids (0)", s["detail"])
        self.assertIn("restart tpmkmsd", s["action"])

    def test_kms_socket_an_allowed_uid_cannot_open(self):
        self.w.stop_daemon()
        self.w.extra_config = ""
        with open(self.w.write_config()) as f:
            conf = f.read()
        with open(self.w.config, "w") as f:
            f.write(conf.replace("allowed_uids = 0\n", "allowed_uids = 0, 65534\n"))
        self.w.start_daemon()
        code, f, out = doctor(self.w)
        self.assertEqual(code, 2, out)
        self.assertIn("uid(s) 65534 of [kms] allowed_uids cannot open", f["kms-socket"]["detail"])
        os.chmod(self.w.kms_sock, 0o666)
        code, f, out = doctor(self.w)
        self.assertEqual(code, 1, out)
        self.assertEqual(f["kms-socket"]["status"], "warning")
        self.assertIn("wider than 0660", f["kms-socket"]["detail"])


class Fleet(unittest.TestCase):
    def setUp(self):
        self.kms = k.KmipServer(PKI, self)
        self.kms.start()
        v1 = self.kms.create_version(GROUP)
        self.kms.activate(v1)
        self.w = k.FleetWorld(self, self.kms, cn="node-a", group=GROUP, sync_interval="1h")
        self.w.start()
        k.wait_for(lambda: self.w.central()["last_sync"], 15, "first sync")
        self.ep = "central " + self.kms.endpoint

    def test_healthy(self):
        code, f, out = doctor(self.w)
        self.assertEqual(code, 0, out)
        e = f[self.ep]
        self.assertEqual(e["status"], "ok")
        self.assertGreater(e["latency_ms"], 0)
        self.assertRegex(e["detail"], r"^127\.0\.0\.1: connect [\d.]+ ms, TLS handshake [\d.]+ ms \(TLSv1\.[23], "
                                      r"protocol 1\.\d, server certificate verified, expires in \d+ days\), "
                                      r"request answered in [\d.]+ ms; clock skew [+-]\d+ s$")
        self.assertEqual(f["client-certificate"]["status"], "ok")
        self.assertEqual(f["central-sync"]["status"], "ok")

    def test_central_kms_stopped(self):
        self.kms.stop()
        code, f, out = doctor(self.w)
        self.assertEqual(code, 2, out)
        e = f[self.ep]
        self.assertEqual(e["status"], "failure")
        self.assertIn("connect failed at 127.0.0.1", e["detail"])
        self.assertIn("Connection refused", e["detail"])
        self.assertIn("start the central KMS", e["action"])
        self.assertNotIn("latency_ms", e)

    def test_expired_client_certificate(self):
        self.w.cert = expired_client_cert(PKI, "node-a-expired", "node-a")
        self.w.write_config()                  # doctor reads the configuration, not the daemon
        code, f, out = doctor(self.w)
        self.assertEqual(code, 2, out)
        c = f["client-certificate"]
        self.assertEqual(c["status"], "failure")
        self.assertIn("expired on", c["detail"])
        self.assertIn("tpmkmsctl enroll --force", c["action"])
        self.assertEqual(f[self.ep]["status"], "failure", "the server refuses it too")


class RunbookLinks(unittest.TestCase):
    def test_every_linked_section_exists(self):
        """docs/runbook.md has every section that the alert rules and doctor's
        findings send the operator to."""
        src = t.source_dir()
        with open(os.path.join(src, "docs", "runbook.md")) as f:
            headings = set(re.findall(r"^#+ (.+)$", f.read(), re.M))
        linked = set()
        for path in (("packaging", "monitoring", "tpmkms-alerts.yml"), ("agent", "doctor.c")):
            with open(os.path.join(src, *path)) as f:
                linked |= set(re.findall(r"docs/runbook\.md, '([^']+)'", f.read()))
        self.assertGreaterEqual(len(linked), 6, linked)
        self.assertEqual(linked - headings, set())


if __name__ == "__main__":
    unittest.main()
