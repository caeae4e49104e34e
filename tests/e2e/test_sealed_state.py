#!/usr/bin/python3
"""The sealed state against the attacks of docs/threat-model.md, played on a
real swtpm with the real daemon:
- other software booted on the host, with the TPM and the state dir, seals a
  cache of its own to a weaker policy: the legitimate boot refuses it;
- an older copy of the state dir put back (rollback across a rotation): refused
  until the operator accepts it with tpmkmsctl accept-restore;
- kill -9 at random moments of a cache write plus counter advance: the host
  always comes back serving the old or the new key set."""
import hashlib
import hmac
import os
import random
import struct
import subprocess
import secrets
import shutil
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
from grpc import StatusCode  # noqa: E402


class SealedStateTest(unittest.TestCase):
    def setUp(self):
        self.w = t.World(self)
        self.w.start()
        self.key_id, self.pt, self.ct = self.w.encrypt_one()

    def assert_refused_saying(self, words):
        st = t.status(self.w.stub())
        self.assertTrue(st.healthz.startswith("sealed cache:"), st.healthz)
        self.assertIn(words, st.healthz)
        self.assertEqual(t.rpc_code(t.decrypt, self.w.stub(), self.ct, self.key_id),
                         StatusCode.FAILED_PRECONDITION)
        self.assertEqual(self.w.status_json()["state"], "refused")
        return st

    def test_policy_downgrade_by_other_software_refused(self):
        """Other software boots (PCR 7 differs), runs the same binary with
        pcrs = none on the same state dir: it makes a cache of its own, whose
        key it holds. After the legitimate boot that cache must be refused."""
        self.assertEqual(self.w.stop_daemon(), 0)
        self.w.tpm.pcr_extend(7)                        # the other boot
        # The attacker's daemon refuses the real cache (measured boot), so
        # the attacker moves it away and makes a new one (as root in his boot).
        os.rename(self.w.cache_path(), self.w.cache_path() + ".real")
        self.w.pcrs = "none\ninsecure_no_pcr_policy = yes"
        self.w.write_config()
        r = self.w.ctl("new-cache")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("made a new key cache", r.stdout)
        self.w.start_daemon()
        evil_key = t.status(self.w.stub()).key_id
        self.assertNotEqual(evil_key, self.key_id)
        self.assertEqual(self.w.status_json()["pcrs"], "none")
        self.assertEqual(self.w.stop_daemon(), 0)
        snap = self.w.state_snapshot()

        self.w.tpm.restart()                            # the legitimate boot
        self.w.pcrs = "sha256:7"
        self.w.write_config()
        self.w.start_daemon()
        st = self.assert_refused_saying("policy check")
        self.assertIn("none", st.healthz)
        self.assertIn("sha256:7", st.healthz)
        self.assertEqual(self.w.state_snapshot(), snap, "the planted cache was modified")
        self.assertIn("does not meet the configured PCR policy", self.w.log())
        # The attacker's key is never served.
        self.assertEqual(t.rpc_code(t.encrypt, self.w.stub(), b"x"), StatusCode.FAILED_PRECONDITION)

    def test_weaker_selection_refused(self):
        """A cache sealed to PCR 8 only while the configuration asks for 7."""
        r = self.w.ctl("reseal", "--pcrs", "sha256:8")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("set [tpm] pcrs = sha256:8", r.stdout)
        self.w.restart_daemon()                         # config still sha256:7
        self.assert_refused_saying("sealed to sha256:8")

    def test_rollback_across_rotation_refused_then_accepted(self):
        backup = os.path.join(self.w.dir, "backup")
        shutil.copytree(self.w.state_dir, backup)
        new_key = self.w.ctl("rotate", check=True).stdout.strip()
        self.assertNotEqual(new_key, self.key_id)
        self.assertEqual(self.w.stop_daemon(), 0)

        shutil.rmtree(self.w.state_dir)
        shutil.copytree(backup, self.w.state_dir)       # the old copy put back
        snap = self.w.state_snapshot()
        self.w.start_daemon()
        st = self.assert_refused_saying("older copy")
        self.assertIn("accept-restore", st.healthz)
        self.assertEqual(self.w.state_snapshot(), snap)

        # The operator's explicit step: refused while the daemon runs ...
        r = self.w.ctl("accept-restore")
        self.assertEqual(r.returncode, 1)
        self.assertIn("stop it first", r.stderr)
        self.assertEqual(self.w.stop_daemon(), 0)
        # ... accepted with it stopped, and then the backup's keys serve.
        r = self.w.ctl("accept-restore")
        self.assertEqual(r.returncode, 0, r.stderr + self.w.log())
        self.assertIn("1 key(s)", r.stdout)
        self.w.start_daemon()
        st = t.status(self.w.stub())
        self.assertEqual((st.healthz, st.key_id), ("ok", self.key_id))
        self.assertEqual(t.decrypt(self.w.stub(), self.ct, self.key_id), self.pt)
        # Accepting it once does not make the newer copy an old one's equal:
        # the rotated state can no longer come back either.
        self.w.restart_daemon()
        self.assertEqual(t.status(self.w.stub()).healthz, "ok")

    def test_kill9_during_cache_writes_never_loses_a_key_set(self):
        rng = random.Random(7)
        known = {self.key_id: self.pt}
        cts = {self.key_id: self.ct}
        for i in range(24):
            before = t.status(self.w.stub()).key_id
            proc = self.w.ctl_async("rotate")
            time.sleep(rng.uniform(0, 0.04))
            self.w.signal(9)
            self.w.proc.wait()
            self.w.proc = None
            proc.wait(10)
            self.w.start_daemon()
            stub = self.w.stub()
            st = t.status(stub)
            self.assertEqual(st.healthz, "ok", "round %d:\n%s" % (i, self.w.log()))
            # the old primary, or the one the rotation made
            self.assertTrue(st.key_id == before or st.key_id not in known, (i, st.key_id))
            for kid, ct in cts.items():
                self.assertEqual(t.decrypt(stub, ct, kid), known[kid], (i, kid))
            pt = secrets.token_bytes(32)
            r = t.encrypt(stub, pt)
            known[r.key_id] = pt
            cts[r.key_id] = r.ciphertext


TPM2_ALG_SHA256 = 0x000B
OTHER_COUNTER = "0x01800f00"     # a throwaway counter: the first daemon makes the SRK only


def format1_cache(tpm, workdir, pcrs="sha256:7", keys=1, version=1, counter=0):
    """A cache file as format 1 (the first release) wrote it: a sealed data
    object (tpm2_create under the SRK, PolicyPCR) holding the cache key, and
    AES-256-GCM over the key records with the whole header as AAD. Returns
    (file bytes, [(key id, kek)]). version=2 writes the same object (kind 1)
    in a format-2 header and records, with counter: what other software
    booted on the host could plant."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    env = tpm.env()
    run = lambda *a: subprocess.run(list(a), env=env, check=True, capture_output=True)  # noqa: E731
    pol, pub, priv, secret = (os.path.join(workdir, n) for n in ("pol", "pub", "priv", "secret"))
    cache_key = secrets.token_bytes(32)
    with open(secret, "wb") as f:
        f.write(cache_key)
    mask = 0
    if pcrs == "none":
        run("tpm2_startauthsession", "-S", os.path.join(workdir, "s"))
        run("tpm2_policycommandcode", "-S", os.path.join(workdir, "s"), "-L", pol, "TPM2_CC_Unseal")
        run("tpm2_flushcontext", os.path.join(workdir, "s"))
        values, bank = [], 0
    else:
        pcr = int(pcrs.split(":")[1])
        mask, bank = 1 << pcr, TPM2_ALG_SHA256
        run("tpm2_createpolicy", "--policy-pcr", "-l", pcrs, "-L", pol)
        values = [t.tpm_pcr(tpm, pcr)]
    run("tpm2_create", "-C", "0x81000001", "-g", "sha256", "-L", pol, "-i", secret,
        "-a", "fixedtpm|fixedparent|noda", "-u", pub, "-r", priv)
    os.unlink(secret)
    blobs = []
    for p in (pub, priv, pol):
        with open(p, "rb") as f:
            blobs.append(f.read())
    header = b"TPMKMSC\0" + struct.pack(">I", version)
    if version >= 2:
        header += struct.pack(">B", 1)                     # kind: sealed data object
    header += struct.pack(">HI", bank, mask)
    header += struct.pack(">H", len(blobs[0])) + blobs[0] + struct.pack(">H", len(blobs[1])) + blobs[1]
    header += struct.pack(">BB", len(values), 32 if values else 0) + b"".join(values)
    header += struct.pack(">B", len(blobs[2])) + blobs[2]
    if version >= 2:
        header += struct.pack(">Q", counter)
    records, ids = struct.pack(">I", keys), []
    for i in range(keys):
        kek = secrets.token_bytes(32)
        check = hmac.new(kek, b"tpmkms key check value v1", hashlib.sha256).hexdigest()[:16]
        kid = "local:%s.%s" % (secrets.token_hex(16), check)
        role = 1 if i == keys - 1 else 2                   # the last one is primary
        if version >= 2:
            records += struct.pack(">BQQQH", role, 1000 + i, 2000 + i, 0, len(kid)) + kid.encode()
        else:
            records += struct.pack(">BQQH", role, 1000 + i, 2000 + i, len(kid)) + kid.encode()
        records += struct.pack(">H", 0) + kek
        ids.append((kid, kek))
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(cache_key).encrypt(nonce, records, header)
    return header + nonce + struct.pack(">I", len(sealed) - 16) + sealed, ids


def header_counter(data):
    """The rollback counter value in a format-2 cache header (docs/file-formats.md)."""
    off = 8 + 4 + 1 + 2 + 4
    for _ in range(2):                                     # public, private
        (n,) = struct.unpack(">H", data[off:off + 2])
        off += 2 + n
    count, size = data[off], data[off + 1]
    off += 2 + count * size
    off += 1 + data[off]                                   # policy digest
    return struct.unpack(">Q", data[off:off + 8])[0]


class MigrationTest(unittest.TestCase):
    """A cache of format 1 is re-sealed in format 2 on the first start, once;
    one that fails the policy check, or that is put back afterwards, is
    refused."""

    def setUp(self):
        self.w = t.World(self)
        self.w.tpm_config = "counter_index = %s\n" % OTHER_COUNTER
        self.w.start()                                  # makes the SRK
        self.assertEqual(self.w.stop_daemon(), 0)
        os.unlink(self.w.cache_path())
        self.w.tpm_config = ""

    def plant(self, data):
        with open(self.w.cache_path(), "wb") as f:
            f.write(data)
        os.chmod(self.w.cache_path(), 0o600)
        self.w.write_config()                   # the default counter index from here on

    def migrate(self):
        r = self.w.ctl("migrate")
        return r

    def test_format1_refused_until_migrated_then_old_copy_refused(self):
        data, ids = format1_cache(self.w.tpm, self.w.dir, keys=2)
        self.plant(data)
        self.w.write_config()
        self.w.start_daemon()
        st = t.status(self.w.stub())
        self.assertTrue(st.healthz.startswith("sealed cache: format 1"), st.healthz)
        self.assertIn("tpmkmsctl migrate", st.healthz)
        self.assertEqual(self.w.stop_daemon(), 0)

        r = self.migrate()                      # the operator's step after the upgrade
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("the key cache is in the current format", r.stdout)
        self.assertIn("Migrated the key cache to format 2", r.stderr)
        with open(self.w.cache_path(), "rb") as f:
            self.assertEqual(struct.unpack(">I", f.read(12)[8:])[0], 2)
        self.w.start_daemon()
        stub = self.w.stub()
        st = t.status(stub)
        self.assertEqual((st.healthz, st.key_id), ("ok", ids[-1][0]), self.w.log())
        ct = t.encrypt(stub, b"migrated").ciphertext
        self.w.restart_daemon()
        self.assertEqual(t.decrypt(self.w.stub(), ct, ids[-1][0]), b"migrated")

        self.assertEqual(self.w.stop_daemon(), 0)
        self.plant(data)                        # the format-1 copy put back
        r = self.migrate()
        self.assertEqual(r.returncode, 1)
        self.assertIn("a format-1 cache on a host that already uses format 2", r.stderr)

    def test_format1_planted_after_the_counter_is_removed_refused(self):
        """Other software with the (empty) owner authorisation removes the
        rollback counter, then plants a format-1 cache holding a key of its
        choice: a start must not take it, whatever the counter says."""
        data, _ = format1_cache(self.w.tpm, self.w.dir)
        self.plant(data)
        r = self.migrate()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.w.write_config()
        self.w.start_daemon()
        self.assertEqual(t.status(self.w.stub()).healthz, "ok")
        self.assertEqual(self.w.stop_daemon(), 0)
        subprocess.run(["tpm2_nvundefine", "-C", "o", "0x01a71c00"], env=self.w.tpm.env(),
                       check=True, capture_output=True)
        evil, evil_ids = format1_cache(self.w.tpm, self.w.dir)
        self.plant(evil)
        snap = self.w.state_snapshot()
        self.w.start_daemon()
        st = t.status(self.w.stub())
        self.assertTrue(st.healthz.startswith("sealed cache: format 1"), st.healthz)
        self.assertNotEqual(st.key_id, evil_ids[0][0])
        self.assertEqual(self.w.state_snapshot(), snap)

    def test_kind1_object_in_a_format2_file_refused(self):
        """A format-2 file whose object is a sealed data object (a key its
        maker chose), with the counter value copied from the real file: the
        header is refused before the TPM is asked."""
        self.w.write_config()
        self.w.start_daemon()                   # a real format-2 cache and counter
        self.assertEqual(self.w.stop_daemon(), 0)
        with open(self.w.cache_path(), "rb") as f:
            real = f.read()
        counter = header_counter(real)
        data, ids = format1_cache(self.w.tpm, self.w.dir, version=2, counter=counter)
        self.plant(data)
        snap = self.w.state_snapshot()
        self.w.start_daemon()
        st = t.status(self.w.stub())
        self.assertTrue(st.healthz.startswith("sealed cache: malformed"), st.healthz)
        self.assertNotEqual(st.key_id, ids[0][0])
        self.assertEqual(self.w.state_snapshot(), snap)

    def test_format1_sealed_to_none_refused(self):
        data, _ = format1_cache(self.w.tpm, self.w.dir, pcrs="none")
        self.plant(data)
        snap = self.w.state_snapshot()
        self.w.write_config()
        self.w.start_daemon()
        st = t.status(self.w.stub())
        self.assertTrue(st.healthz.startswith("sealed cache: sealed object fails the policy check"),
                        st.healthz)
        self.assertIn("none", st.healthz)
        self.assertEqual(self.w.state_snapshot(), snap)


class OwnerAuthTest(unittest.TestCase):
    """The rollback counter is defined with the owner hierarchy's
    authorisation: empty (the other tests), or one read from owner_auth_file."""

    def setUp(self):
        self.w = t.World(self)
        self.w.start_tpm()
        subprocess.run(["tpm2_changeauth", "-c", "owner", "s3cret-owner"], env=self.w.tpm.env(),
                       check=True, capture_output=True)
        self.auth = os.path.join(self.w.dir, "owner-auth")

    def write_auth(self, text):
        with open(self.auth, "w") as f:
            f.write(text)
        os.chmod(self.auth, 0o600)

    def test_configured_owner_auth_defines_the_counter(self):
        self.write_auth("s3cret-owner\n")
        self.w.tpm_config = "owner_auth_file = %s\n" % self.auth
        self.w.start()
        self.assertEqual(t.status(self.w.stub()).healthz, "ok")
        self.assertIn("Defined the rollback counter", self.w.log())

    def test_wrong_owner_auth_fails_start_clearly(self):
        self.write_auth("not-it\n")
        self.w.tpm_config = "owner_auth_file = %s\n" % self.auth
        with self.assertRaises(t.DaemonError):
            self.w.start()
        self.assertIn("owner authorisation was refused", self.w.log())
        self.assertFalse(os.path.exists(self.w.cache_path()), "no cache without a counter")


if __name__ == "__main__":
    unittest.main()
