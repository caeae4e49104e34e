#!/usr/bin/python3
"""tpmkms in two minutes: /usr/bin/python3 tests/demo/demo.py BUILD_DIR

Everything here is real: a software TPM (swtpm), the tpmkmsd daemon from
BUILD_DIR, the tpmkmsctl CLI, and a gRPC client speaking KMS v2 the way
kube-apiserver does. It all lives in a temp dir that is removed at the end.
Each step checks what it shows; the demo exits 1 if anything behaves otherwise.
"""
import os
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
from tpmkmsdemo import DemoFailed, check, show, step, use_build_dir  # noqa: E402


def main():
    use_build_dir(sys.argv, os.path.join(HERE, "..", ".."))

    import tpmkmstest as t          # the e2e tests' harness: swtpm, daemon, client
    from grpc import StatusCode

    world = t.World()
    try:
        step(1, "Start a TPM and the daemon",
             "swtpm plays the host's TPM 2.0. tpmkmsd makes a key-encryption key "
             "(KEK), seals it to the TPM under PCR 7 (the measured-boot state) and "
             "serves KMS v2 on a unix socket. It tells systemd READY=1 when it listens.")
        world.start()
        show("TPM", world.tpm.tcti)
        show("KMS socket", world.kms_sock)
        show("state dir", world.state_dir)
        check(world.notify.seen("READY=1"), "READY=1 received on NOTIFY_SOCKET")
        stub = world.stub()

        step(2, "Status, as kube-apiserver polls it",
             "The apiserver checks version v2, healthz ok, and remembers key_id: "
             "when it changes, the apiserver starts a new data-encryption key.")
        st = t.status(stub)
        show("version", st.version)
        show("healthz", st.healthz)
        show("key_id", st.key_id)
        check(st.version == "v2" and st.healthz == "ok", "healthy v2 plugin")
        first_key = st.key_id

        step(3, "Encrypt and Decrypt a DEK seed",
             "The apiserver sends 32 random bytes (its DEK seed) to Encrypt and stores "
             "the ciphertext and key_id in etcd next to every Secret. Decrypt gives "
             "the seed back; a flipped bit is refused, not decrypted.")
        seed = os.urandom(32)
        r = t.encrypt(stub, seed)
        show("plaintext", seed.hex()[:32] + "...")
        show("ciphertext", "%d bytes: %s..." % (len(r.ciphertext), r.ciphertext.hex()[:32]))
        show("key_id", r.key_id)
        check(r.key_id == first_key, "Encrypt's key_id equals Status's")
        check(t.decrypt(stub, r.ciphertext, r.key_id) == seed, "Decrypt returns the seed")
        bad = bytes([r.ciphertext[0] ^ 1]) + r.ciphertext[1:]
        code = t.rpc_code(t.decrypt, stub, bad, r.key_id)
        show("tampered Decrypt", code.name)
        check(code == StatusCode.INVALID_ARGUMENT, "a tampered ciphertext is refused")
        old_ct, old_key = r.ciphertext, r.key_id

        step(4, "tpmkmsctl status",
             "The operator's view, through the root-only control socket.")
        out = world.ctl("status", check=True).stdout
        print(textwrap.indent(out.rstrip(), "   | "))
        check(first_key in out, "the primary key is listed")

        step(5, "Rotate the KEK",
             "tpmkmsctl rotate makes a new primary key; the old one is retired: it "
             "no longer encrypts but still decrypts everything it encrypted.")
        world.ctl("rotate", check=True)
        st = t.status(stub)
        show("new key_id", st.key_id)
        check(st.key_id != first_key, "Status reports a new key_id")
        r2 = t.encrypt(stub, seed)
        check(r2.key_id == st.key_id, "new Encrypts use the new key")
        check(t.decrypt(stub, old_ct, old_key) == seed, "the old ciphertext still decrypts")
        roles = {k["id"]: k["role"] for k in world.status_json()["keys"]}
        show("keys", ", ".join("%s (%s)" % (k[:16] + "...", v) for k, v in roles.items()))

        step(6, "Restart the daemon",
             "Keys are not on disk in the clear: the cache in the state dir is "
             "encrypted under a key only this TPM unseals. A restart unseals it again.")
        world.restart_daemon()
        stub = world.stub()
        check(t.status(stub).key_id == st.key_id, "same primary after restart")
        check(t.decrypt(stub, old_ct, old_key) == seed, "data from before the rotation decrypts")
        check(t.decrypt(stub, r2.ciphertext, r2.key_id) == seed, "data after it decrypts")

        step(7, "Boot something else: a PCR changes",
             "tpm2_pcrextend changes PCR 7, as booting other firmware or a tampered "
             "boot chain would. The TPM now refuses to unseal: the daemon still runs "
             "and says why, but serves no keys (FAILED_PRECONDITION), and the cache "
             "is left as it was.")
        before = world.state_snapshot()
        world.stop_daemon()
        world.tpm.pcr_extend(7)
        world.start_daemon()
        stub = world.stub()
        st = t.status(stub)
        show("healthz", st.healthz)
        check(st.healthz.startswith("sealed cache:"), "Status explains the refusal")
        code = t.rpc_code(t.decrypt, stub, old_ct, old_key)
        show("Decrypt", code.name)
        check(code == StatusCode.FAILED_PRECONDITION, "no key is served")
        check(t.rpc_code(t.encrypt, stub, seed) == StatusCode.FAILED_PRECONDITION,
              "Encrypt is refused too")
        check(world.state_snapshot() == before, "the sealed cache is untouched")
        print("   The daemon's log names the PCR values sealed to and found:")
        for ln in world.log().splitlines():
            if "mismatch" in ln.lower():
                print(textwrap.indent(textwrap.fill(ln, 72, break_long_words=False,
                                                    break_on_hyphens=False), "   log | "))

        print("\nAll steps behaved as shown. (After a planned update, `tpmkmsctl reseal`"
              "\nre-seals the cache to the new PCRs while the daemon still holds the keys.)")
        return 0
    except (DemoFailed, AssertionError, t.DaemonError, t.grpc.RpcError) as e:
        print("\nDEMO FAILED: %s" % e, file=sys.stderr)
        log = world.log(all_runs=True)
        if log:
            print("--- tpmkmsd log ---\n" + log[-4000:], file=sys.stderr)
        return 1
    finally:
        world.close()


if __name__ == "__main__":
    sys.exit(main())
