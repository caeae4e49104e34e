"""tpmkmsd behind a real kube-apiserver (tests/apiserver/build.sh builds it from
k8s.io/kubernetes, pinned in tests/apiserver/go.mod) with a real etcd, configured
from `tpmkmsctl encryption-config` as an operator would. Each test brings its
own swtpm, tpmkmsd, etcd and apiserver on 127.0.0.1 (tests/lib).

What the apiserver does is described in docs/kms-v2-contract.md ("How the
apiserver polls"); these tests check it against the real thing.
"""
import base64
import json
import os
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
import tpmkmstest_apiserver as a  # noqa: E402

NAME = "tpmkms"                 # the provider name (tpmkmsctl encryption-config --name)
CHECK = "kms-providers"         # the apiserver's health check over its KMS providers
HEALTH_TTL = 20                 # the apiserver caches a healthy Status answer this long
DOWN_TIMEOUT = 60               # seconds for the apiserver to notice the plugin's state
BULK = int(os.environ.get("TPMKMS_APISERVER_BULK", "2000"))


def secret_body(name, value):
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {"value": base64.b64encode(value.encode()).decode()}}


class ApiserverCase(unittest.TestCase):
    resources = ("secrets",)

    def setUp(self):
        self.w = t.World(self)
        self.w.start()
        self.pki = a.ClusterPki(self)
        self.etcd = a.Etcd(self).start()
        self.enc = a.encryption_config(self.w, os.path.join(self.w.dir, "encryption.yaml"),
                                       "--name", NAME, "--timeout", "3s", *self.resources)
        self.api = a.Apiserver(self, self.etcd, self.pki, self.enc)
        self.api.start()

    # helpers

    def key_id(self):
        """tpmkmsd's Status key_id (the KMS v2 API, as the apiserver sees it)."""
        return t.status(self.w.stub()).key_id

    def create_secret(self, name, value, check=True):
        return self.api.kubectl("create", "secret", "generic", name,
                                "--from-literal=value=" + value, check=check)

    def read_secret(self, name):
        r = self.api.kubectl("get", "secret", name, "-o", "json")
        return base64.b64decode(json.loads(r.stdout)["data"]["value"]).decode()

    def stored(self, resource, name, ns="default"):
        return self.etcd.get("/registry/%s/%s/%s" % (resource, ns, name))

    def stored_key_id(self, name):
        return a.kms_envelope(self.stored("secrets", name), NAME)["key_id"]

    def check_body(self):
        """(HTTP status, body) of the apiserver's own KMS check: the only health
        output that shows the check's error (/readyz?verbose withholds it)."""
        return self.api.get("/readyz/" + CHECK)

    def wait_check(self, healthy, timeout=DOWN_TIMEOUT):
        def probe():
            code, body = self.check_body()
            return (code, body) if (code == 200) == healthy else None
        return a.wait_for(probe, timeout, "%s %s" % (CHECK, "healthy" if healthy else "failing"))


class TestStorage(ApiserverCase):
    def test_secret_encrypted_under_status_key_id_configmap_plain(self):
        kid = self.key_id()
        self.assertRegex(kid, t.KEY_ID_RE)
        self.create_secret("s1", "hunter2")
        self.api.kubectl("create", "configmap", "c1", "--from-literal=value=plain-visible")
        self.assertEqual(self.read_secret("s1"), "hunter2")

        raw = self.stored("secrets", "s1")
        self.assertTrue(raw.startswith(b"k8s:enc:kms:v2:%s:" % NAME.encode()), raw[:40])
        env = a.kms_envelope(raw, NAME)
        self.assertEqual(env["key_id"], kid)
        self.assertEqual(env["key_id"], self.w.status_json()["keys"][0]["id"])
        # the seed's ciphertext is tpmkmsd's envelope: format 1, 32-byte seed + 29
        self.assertEqual(len(env["encrypted_dek_source"]), 32 + t.GCM_OVERHEAD)
        self.assertEqual(env["encrypted_dek_source"][0], 1)
        self.assertEqual(env["source_type"], 1)          # HKDF_SHA256_XNONCE_AES_GCM_SEED
        self.assertNotIn(b"hunter2", raw)
        # tpmkmsd served the seed's Encrypt (audit line)
        self.assertIn("audit encrypt key_id=%s " % kid, self.w.log())

        craw = self.stored("configmaps", "c1")
        self.assertTrue(craw.startswith(a.PLAIN_PREFIX), craw[:40])
        self.assertIn(b"plain-visible", craw)

        code, body = self.api.get("/readyz?verbose")
        self.assertEqual(code, 200, body)
        self.assertIn("[+]%s ok" % CHECK, body)
        a.figure("readyz?verbose healthy:\n" + body)


class TestConfiguredConfigMaps(ApiserverCase):
    resources = ("secrets", "configmaps")

    def test_configmaps_encrypted_when_configured(self):
        self.api.kubectl("create", "configmap", "c1", "--from-literal=value=now-hidden")
        raw = self.stored("configmaps", "c1")
        self.assertEqual(a.kms_envelope(raw, NAME)["key_id"], self.key_id())
        self.assertNotIn(b"now-hidden", raw)
        r = self.api.kubectl("get", "configmap", "c1", "-o", "jsonpath={.data.value}")
        self.assertEqual(r.stdout, "now-hidden")


class TestRotation(ApiserverCase):
    def test_rotate_new_writes_new_key_old_read_migration(self):
        old = self.key_id()
        for i in range(5):
            self.create_secret("old-%d" % i, "old-value-%d" % i)
        self.assertEqual({self.stored_key_id("old-%d" % i) for i in range(5)}, {old})

        self.w.ctl("rotate", check=True)
        t0 = time.monotonic()
        new = self.key_id()
        self.assertNotEqual(new, old)
        self.assertRegex(new, t.KEY_ID_RE)

        # The apiserver takes the new key id from its next Status call: the
        # minute poll, or its health check once the cached answer (20 s) is
        # older. Write a probe Secret until it is stored under the new key id.
        n = [0]

        def probe():
            self.api.get("/readyz/" + CHECK)
            n[0] += 1
            self.create_secret("probe-%d" % n[0], "probe")
            return self.stored_key_id("probe-%d" % n[0]) == new
        a.wait_for(probe, 90, "a write under the new key id %s" % new, interval=2)
        took = time.monotonic() - t0
        a.figure("rotation: new writes under the new key id %.0f s after tpmkmsctl rotate "
               "(probe writes: %d)" % (took, n[0]))

        # old objects still read, and are still stored under the old key id;
        # after an apiserver restart (no cached seeds) through a Decrypt under it
        for i in range(5):
            self.assertEqual(self.read_secret("old-%d" % i), "old-value-%d" % i)
            self.assertEqual(self.stored_key_id("old-%d" % i), old)
        mark = len(self.w.log())
        self.api.restart()
        for i in range(5):
            self.assertEqual(self.read_secret("old-%d" % i), "old-value-%d" % i)
        self.assertIn("audit decrypt key_id=%s " % old, self.w.log()[mark:])

        # storage migration, as the README's fleet rotation (step 4) has it
        listing = self.api.kubectl("get", "secrets", "-A", "-o", "json").stdout
        self.assertEqual(len(json.loads(listing)["items"]), 5 + n[0])
        self.api.kubectl("replace", "-f", "-", input=listing)
        stored = self.etcd.get_prefix("/registry/secrets/")
        self.assertEqual(len(stored), 5 + n[0])
        ids = {k: a.kms_envelope(v, NAME)["key_id"] for k, v in stored.items()}
        self.assertEqual([k for k, v in ids.items() if v != new], [])
        # the old key is no longer needed: a fresh apiserver reads everything
        # without one Decrypt under it (README: when to deactivate the old version)
        mark = len(self.w.log())
        self.api.restart()
        for i in range(5):
            self.assertEqual(self.read_secret("old-%d" % i), "old-value-%d" % i)
        self.api.kubectl("get", "secrets", "-o", "json")
        after = self.w.log()[mark:]
        self.assertIn("audit decrypt key_id=%s " % new, after)
        self.assertNotIn("key_id=%s " % old, after)


class TestPluginDown(ApiserverCase):
    def test_stopped_plugin_named_in_readyz_then_ready_again(self):
        self.create_secret("before", "kept")
        self.w.stop_daemon()
        code, body = self.wait_check(healthy=False)
        self.assertEqual(code, 500)
        self.assertIn("kms", body.lower())
        a.figure("/readyz/%s with tpmkmsd stopped: %d %s" % (CHECK, code, body.strip()))
        code, verbose = self.api.get("/readyz?verbose")
        self.assertEqual(code, 500)
        self.assertIn("[-]%s failed: reason withheld" % CHECK, verbose)
        self.assertIn("[+]etcd ok", verbose)
        a.figure("readyz?verbose with tpmkmsd stopped:\n" + verbose)

        self.w.start_daemon()
        self.wait_check(healthy=True)
        self.api.wait_for_health("readyz", 60)
        self.assertEqual(self.read_secret("before"), "kept")
        self.create_secret("after", "new")
        self.assertEqual(self.read_secret("after"), "new")
        self.assertEqual(self.stored_key_id("after"), self.key_id())


class TestMeasuredBoot(ApiserverCase):
    def test_refused_unseal_reason_in_apiserver_health(self):
        self.create_secret("before", "kept")
        self.w.stop_daemon()
        self.w.tpm.pcr_extend(7)
        self.w.write_config()
        self.w.start_daemon()               # serves Status, refuses keys
        reason = t.status(self.w.stub()).healthz
        self.assertIn("measured boot mismatch", reason)
        code, body = self.wait_check(healthy=False)
        self.assertEqual(code, 500)
        self.assertIn("got unexpected healthz status: " + reason, body)
        a.figure("/readyz/%s after a PCR 7 change: %d %s" % (CHECK, code, body.strip()))

        self.w.reboot()                     # PCRs back to the sealed values
        self.wait_check(healthy=True)
        self.assertEqual(self.read_secret("before"), "kept")


class TestFailClosed(ApiserverCase):
    def test_apiserver_restarted_without_plugin(self):
        self.create_secret("before", "kept")
        self.w.stop_daemon()
        self.api.restart(wait="livez")
        code, _ = self.check_body()
        self.assertEqual(code, 500)

        r = self.create_secret("during", "refused", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIsNone(self.stored("secrets", "during"))
        a.figure("kubectl create secret, tpmkmsd down: " + r.stderr.strip())
        r = self.api.kubectl("get", "secret", "before", check=False)
        self.assertNotEqual(r.returncode, 0)
        a.figure("kubectl get secret, tpmkmsd down: " + r.stderr.strip())
        self.api.kubectl("create", "configmap", "during", "--from-literal=value=fine")
        self.assertTrue(self.stored("configmaps", "during").startswith(a.PLAIN_PREFIX))

        self.w.start_daemon()
        self.wait_check(healthy=True)
        a.wait_for(lambda: self.create_secret("after", "ok", check=False).returncode == 0,
                   60, "a Secret write once tpmkmsd is back")
        self.assertEqual(self.read_secret("before"), "kept")
        self.assertEqual(self.read_secret("after"), "ok")


def bulk_create(api, n, prefix="bulk-", workers=4):
    """n Secrets through the REST API, on `workers` connections."""
    errors = []

    def run(k):
        c = api.connection()
        try:
            for i in range(k, n, workers):
                code, body = api.request("POST", "/api/v1/namespaces/default/secrets",
                                         secret_body("%s%05d" % (prefix, i), "v%d" % i), conn=c)
                if code != 201:
                    errors.append((i, code, body[:200]))
                    return
        finally:
            c.close()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise AssertionError("creating Secrets failed: %r" % errors[:3])


def read_all(api, n, prefix="bulk-"):
    """List every Secret and check each bulk one's value."""
    code, body = api.get("/api/v1/namespaces/default/secrets")
    if code != 200:
        raise AssertionError("list secrets: %d %s" % (code, body[:500]))
    items = {i["metadata"]["name"]: base64.b64decode(i["data"]["value"]).decode()
             for i in json.loads(body)["items"] if i["metadata"]["name"].startswith(prefix)}
    return items == {"%s%05d" % (prefix, i): "v%d" % i for i in range(n)}


class TestRestartMany(unittest.TestCase):
    """An apiserver restart with BULK Secrets, KMS v2 (tpmkmsd) beside the
    identity provider on the same etcd (another --etcd-prefix), same run."""

    def restart_and_read(self, api):
        ready = api.restart()
        readable = a.wait_for(lambda: read_all(api, BULK), 120, "all Secrets readable")
        self.assertTrue(readable)
        return ready, time.monotonic() - api.started_at

    def test_restart_with_many_secrets(self):
        w = t.World(self)
        w.start()
        pki = a.ClusterPki(self)
        etcd = a.Etcd(self).start()
        enc = a.encryption_config(w, os.path.join(w.dir, "encryption.yaml"), "--name", NAME)
        ident = os.path.join(w.dir, "identity.yaml")
        with open(ident, "w") as f:
            f.write("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\n"
                    "resources:\n  - resources: [secrets]\n    providers:\n"
                    "      - identity: {}\n")
        kms = a.Apiserver(self, etcd, pki, enc, name="kms")
        plain = a.Apiserver(self, etcd, pki, ident, etcd_prefix="/identity", name="identity")

        kms.start()
        t0 = time.monotonic()
        bulk_create(kms, BULK)
        a.figure("created %d Secrets through KMS v2 in %.1f s" % (BULK, time.monotonic() - t0))
        stored = etcd.get_prefix("/registry/secrets/default/bulk-")
        self.assertEqual(len(stored), BULK)
        seeds = {a.kms_envelope(v, NAME)["encrypted_dek_source"] for v in stored.values()}
        kms.stop()

        plain.start()
        bulk_create(plain, BULK)
        raw = etcd.get_prefix("/identity/secrets/default/bulk-")
        self.assertEqual(len(raw), BULK)
        self.assertTrue(all(v.startswith(a.PLAIN_PREFIX) for v in raw.values()))
        plain.stop()

        before = len(w.log())
        kms_ready, kms_read = self.restart_and_read(kms)
        decrypts = a.decrypt_calls(w.log()[before:])
        kms.stop()
        id_ready, id_read = self.restart_and_read(plain)

        # KMS v2: one Decrypt per stored seed (the apiserver caches seeds), not per object
        self.assertGreaterEqual(decrypts, 1)
        self.assertLess(decrypts, BULK)
        a.figure("restart with %d Secrets: Decrypt calls served by tpmkmsd: %d "
               "(distinct seeds stored: %d)" % (BULK, decrypts, len(seeds)))
        a.figure("time to /readyz: kms %.1f s, identity %.1f s, ratio %.2f"
               % (kms_ready, id_ready, kms_ready / id_ready))
        a.figure("time to all %d readable: kms %.1f s, identity %.1f s, ratio %.2f"
               % (BULK, kms_read, id_read, kms_read / id_read))


if __name__ == "__main__":
    unittest.main()
