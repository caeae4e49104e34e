#!/usr/bin/python3
"""A TPM that stops answering (swtpm SIGSTOPped) must not stop the service:
the event loop keeps serving Encrypt/Decrypt/Status from memory, tpmkmsctl
status says the TPM is not answering, SIGTERM is honoured, and a start that
cannot reach the TPM exits within [tpm] timeout instead of hanging."""
import os
import signal
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402


class HungTpmTest(unittest.TestCase):
    def setUp(self):
        self.w = t.World(self)
        self.w.tpm_config = "timeout = 3s\n"
        self.w.start()
        self.key_id, self.pt, self.ct = self.w.encrypt_one()

    def hang_tpm(self):
        pid = self.w.tpm.proc.pid
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)
        return pid

    def assert_serving_fast(self):
        stub = self.w.stub()
        t0 = time.monotonic()
        st = t.status(stub, timeout=1)
        self.assertEqual((st.healthz, st.key_id), ("ok", self.key_id))
        self.assertEqual(t.decrypt(stub, self.ct, self.key_id, timeout=1), self.pt)
        self.assertLess(time.monotonic() - t0, 1.0)

    def test_reseal_on_a_hung_tpm_does_not_stop_serving(self):
        pid = self.hang_tpm()
        reseal = self.w.ctl_async("reseal")
        for _ in range(3):                      # across the TPM's silence
            time.sleep(2)
            self.assert_serving_fast()
        js = self.w.status_json()               # the control socket answers too
        self.assertRegex(js["tpm"], r"^not answering for \d+ s$")
        self.assertGreaterEqual(js["tpm_busy_seconds"], 5)
        self.assertIn("TPM:           not answering", self.w.ctl("status", check=True).stdout)

        # SIGTERM is honoured with the TPM still silent.
        t0 = time.monotonic()
        self.w.signal(signal.SIGTERM)
        self.w.proc.wait(15)
        self.assertLess(time.monotonic() - t0, 10, self.w.log())
        self.assertIn("abandoned", self.w.log())
        self.w.proc = None
        reseal.wait(35)

        # The TPM comes back: the cache in force (old or re-sealed) serves.
        os.kill(pid, signal.SIGCONT)
        self.w.start_daemon()
        self.assert_serving_fast()

    def test_reseal_with_the_tpm_gone_says_why(self):
        self.w.tpm.stop()
        r = self.w.ctl("reseal")
        self.assertEqual(r.returncode, 1)
        self.assertIn("re-seal failed, the previous cache stays in force: ", r.stderr)
        self.assertIn("no TPM answers on the configured tcti", r.stderr)
        self.assert_serving_fast()              # from memory

    def test_start_on_a_hung_tpm_exits_within_the_timeout(self):
        self.assertEqual(self.w.stop_daemon(), 0)
        self.hang_tpm()
        t0 = time.monotonic()
        with self.assertRaises(t.DaemonError):
            self.w.start_daemon()
        took = time.monotonic() - t0
        self.assertEqual(self.w.proc.returncode, 1)
        self.assertLess(took, 9, "exit took %.1f s" % took)
        self.assertIn("did not finish opening the sealed cache within 3 s", self.w.log())
        self.w.proc = None

    def test_sigterm_while_starting_on_a_hung_tpm(self):
        self.assertEqual(self.w.stop_daemon(), 0)
        self.hang_tpm()
        self.w.start_daemon(wait_ready=False)
        time.sleep(1)
        t0 = time.monotonic()
        self.w.signal(signal.SIGTERM)
        self.assertEqual(self.w.proc.wait(8), 0, self.w.log())
        self.assertLess(time.monotonic() - t0, 6)
        self.assertIn("while starting", self.w.log())
        self.w.proc = None


if __name__ == "__main__":
    unittest.main()
