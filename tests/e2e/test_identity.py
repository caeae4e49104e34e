#!/usr/bin/python3
"""The host's identity at the central KMS bound to its TPM (tpmkmsctl enroll;
agent/identity.h, tpm.h "the client key"): real swtpm, real PyKMIP over
mutual TLS, the test CA of tpmkmstest_kmip.Pki signing the CSRs.

Attacks played: /etc copied to another machine (its own TPM, an empty state
dir); the same host booted into other software (a PCR extended) with its state
dir removed. Neither gets a TLS session with the central KMS nor a key.
"""
import os
import shutil
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
import tpmkmstest_kmip as k  # noqa: E402

GROUP = "cluster-a-kek"
CONVERGE = 8.0
NO_SECRET = "holds no secret for it"

PKI = None


def setUpModule():
    global PKI
    PKI = k.Pki()


def tearDownModule():
    if PKI is not None:
        PKI.close()


class IdentityCase(unittest.TestCase):
    def setUp(self):
        self.kms = k.KmipServer(PKI, self)
        self.kms.start()

    def host(self, cn="node-a", **kw):
        """A fleet host whose key_file and cert_file live in its own dir
        (its /etc), not yet enrolled."""
        w = k.FleetWorld(self, self.kms, cn=cn, group=GROUP, **kw)
        w.key = os.path.join(w.dir, "node.key")
        w.cert = os.path.join(w.dir, "node.crt")
        w.csr = os.path.join(w.dir, "node.csr")
        w.start_tpm()
        w.write_config()
        return w

    def sign(self, w, cn, days=90):
        """The fleet CA signs the host's CSR (clientAuth, as the CSR asks)."""
        ext = os.path.join(w.dir, "client.ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=clientAuth\n")
        subprocess.run(["openssl", "req", "-in", w.csr, "-verify", "-noout"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", w.csr, "-CA", PKI.crt("ca"),
                        "-CAkey", PKI.key("ca"), "-CAcreateserial", "-days", str(days), "-sha256",
                        "-extfile", ext, "-out", w.cert], check=True, capture_output=True)

    def enroll(self, w, cn, *extra, days=90):
        r = w.ctl("enroll", "--subject", "/CN=%s/O=tpmkms e2e" % cn, "--csr", w.csr,
                  "--san", "DNS:%s.example" % cn, *extra)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.sign(w, cn, days)
        return r

    def active_version(self):
        uid = self.kms.create_version(GROUP)
        self.kms.activate(uid)
        return uid

    def assert_no_session(self, w, cn, offset, error_part):
        """No TLS session with the central KMS, no key, a clear error in status
        and in the journal."""
        k.wait_for(lambda: error_part in w.central()["last_error"], CONVERGE,
                   "%s: sync error naming the missing secret" % cn)
        st = w.status_json()
        self.assertEqual(st["keys"], [])
        self.assertIn(error_part, st["identity"]["problem"])
        self.assertFalse(st["identity"]["enrolled"])
        self.assertIn(error_part, w.log())
        self.assertEqual(self.kms.sessions_from(cn, offset), set())


class EnrolTest(IdentityCase):
    def test_enrolled_host_syncs_and_serves(self):
        uid = self.active_version()
        w = self.host("node-a")
        out = self.enroll(w, "node-a").stdout
        self.assertIn("TPM-bound", out)
        # the key file is a TPM key: OpenSSL alone cannot read it
        with open(w.key) as f:
            self.assertTrue(f.read().startswith("-----BEGIN TSS2 PRIVATE KEY-----"))
        r = subprocess.run(["openssl", "pkey", "-in", w.key, "-noout"], capture_output=True)
        self.assertNotEqual(r.returncode, 0)
        csr = subprocess.run(["openssl", "req", "-in", w.csr, "-noout", "-text"], check=True,
                             capture_output=True, text=True).stdout
        self.assertIn("TLS Web Client Authentication", csr)
        self.assertIn("DNS:node-a.example", csr)
        self.assertIn("ecdsa-with-SHA256", csr)

        offset = self.kms.log_offset()
        w.start_daemon()
        k.wait_for(lambda: w.roles() == {uid: "primary"}, CONVERGE, "node-a: primary synced")
        self.assertTrue(self.kms.sessions_from("node-a", offset))
        ct = t.encrypt(w.stub(), b"s" * 32)
        self.assertTrue(ct.key_id.startswith("kmip:%s/%s." % (GROUP, uid)))
        ident = w.status_json()["identity"]
        self.assertTrue(ident["tpm_bound"])
        self.assertTrue(ident["enrolled"])
        self.assertEqual(ident["key_type"], "ecdsa-p256")
        self.assertEqual(ident["problem"], "")
        self.assertIn(ident["days_left"], (89, 90))
        self.assertFalse(ident["expiry_warning"])
        self.assertRegex(ident["not_after"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        text = w.ctl("status", check=True).stdout
        self.assertIn("identity:      TPM-bound ecdsa-p256", text)
        self.assertIn("days left", text)
        self.assertIn("expires on", w.log())

    def test_certificate_expiry_warned_30_days_before(self):
        uid = self.active_version()
        w = self.host("node-a")
        self.enroll(w, "node-a", days=10)
        w.start_daemon()
        k.wait_for(lambda: w.roles() == {uid: "primary"}, CONVERGE, "node-a: synced")
        ident = w.status_json()["identity"]
        self.assertIn(ident["days_left"], (9, 10))
        self.assertTrue(ident["expiry_warning"])
        self.assertIn("RENEW SOON", w.ctl("status", check=True).stdout)
        self.assertRegex(w.log(), r"client certificate .* expires on .*, in (9|10) day\(s\): renew it")

    def test_refuses_to_overwrite_without_force(self):
        w = self.host("node-a")
        self.enroll(w, "node-a")
        with open(w.key) as f:
            before = f.read()
        r = w.ctl("enroll", "--subject", "/CN=node-a", "--csr", w.csr)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--force", r.stderr)
        with open(w.key) as f:
            self.assertEqual(f.read(), before)

    def test_reenrol_on_running_daemon_with_rsa(self):
        uid = self.active_version()
        w = self.host("node-a")
        self.enroll(w, "node-a")
        w.start_daemon()
        k.wait_for(lambda: w.roles() == {uid: "primary"}, CONVERGE, "node-a: synced")
        r = w.ctl("enroll", "--subject", "/CN=node-a", "--csr", w.csr)
        self.assertNotEqual(r.returncode, 0)
        self.enroll(w, "node-a", "--force", "--key-type", "rsa-2048")
        offset = self.kms.log_offset()
        w.ctl("sync")
        k.wait_for(lambda: self.kms.sessions_from("node-a", offset), CONVERGE,
                   "node-a: a session with the new RSA key")
        self.assertEqual(w.status_json()["identity"]["key_type"], "rsa-2048")
        self.assertEqual(w.central()["last_error"], "")
        # the secret survives a reseal and a restart
        w.ctl("reseal", check=True)
        w.stop_daemon()
        offset = self.kms.log_offset()
        w.start_daemon()
        k.wait_for(lambda: self.kms.sessions_from("node-a", offset), CONVERGE,
                   "node-a: a session after reseal and restart")
        self.assertTrue(w.status_json()["identity"]["enrolled"])

    def test_plain_key_works_with_a_warning(self):
        uid = self.active_version()
        w = k.FleetWorld(self, self.kms, cn="node-b", group=GROUP)
        w.start()
        k.wait_for(lambda: w.roles() == {uid: "primary"}, CONVERGE, "node-b: synced")
        ident = w.status_json()["identity"]
        self.assertFalse(ident["tpm_bound"])
        self.assertEqual(ident["key_type"], "plain")
        self.assertIn("not bound to the TPM", ident["problem"])
        self.assertIn("not bound to the TPM", w.log())
        self.assertIn("NOT TPM-bound", w.ctl("status", check=True).stdout)


class AttackTest(IdentityCase):
    def test_etc_copied_to_another_machine_gets_nothing(self):
        """The thief copies /etc (config, CA, certificate, key file) to a host
        with another TPM and an empty state dir."""
        self.active_version()
        a = self.host("node-a")
        self.enroll(a, "node-a")
        thief = self.host("node-a")
        for name in ("key", "cert"):
            shutil.copyfile(getattr(a, name), getattr(thief, name))
        os.chmod(thief.key, 0o600)
        offset = self.kms.log_offset()
        thief.start_daemon()
        self.assert_no_session(thief, "node-a", offset, NO_SECRET)

    def test_other_boot_with_state_dir_removed_gets_nothing(self):
        uid = self.active_version()
        w = self.host("node-a")
        self.enroll(w, "node-a")
        w.start_daemon()
        k.wait_for(lambda: w.roles() == {uid: "primary"}, CONVERGE, "node-a: synced")
        w.stop_daemon()
        w.tpm.pcr_extend(7)       # other software booted
        shutil.rmtree(w.state_dir)
        os.mkdir(w.state_dir, 0o700)
        offset = self.kms.log_offset()
        w.start_daemon()
        self.assert_no_session(w, "node-a", offset, NO_SECRET)


class FleetTest(IdentityCase):
    def test_two_enrolled_hosts_rotate_together(self):
        a, b = self.host("node-a"), self.host("node-b")
        self.enroll(a, "node-a")
        self.enroll(b, "node-b")
        v1 = self.active_version()
        a.start_daemon()
        b.start_daemon()
        for w in (a, b):
            k.wait_for(lambda w=w: w.roles() == {v1: "primary"}, CONVERGE, "%s: v1" % w.cn)
        v2 = self.kms.create_version(GROUP)
        for w in (a, b):
            k.wait_for(lambda w=w: w.roles() == {v1: "primary", v2: "staged"}, CONVERGE,
                       "%s: v2 staged" % w.cn)
        self.kms.activate(v2)
        for w in (a, b):
            k.wait_for(lambda w=w: w.roles() == {v1: "retired", v2: "primary"}, CONVERGE,
                       "%s: v2 primary" % w.cn)
        ct = t.encrypt(a.stub(), b"x" * 32)
        self.assertEqual(t.decrypt(b.stub(), ct.ciphertext, ct.key_id), b"x" * 32)


if __name__ == "__main__":
    unittest.main()
