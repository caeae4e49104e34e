#!/usr/bin/python3
"""A fleet rotating its KEK together: /usr/bin/python3 tests/demo/demo_fleet.py BUILD_DIR

Everything here is real: a central KMS (PyKMIP's KMIP server, mutual TLS with a
throwaway CA), two control-plane hosts (each its own software TPM, tpmkmsd from
BUILD_DIR and client certificate), and gRPC clients speaking KMS v2 the way
kube-apiserver does. It all lives in temp dirs that are removed at the end.
Each step checks what it shows; the demo exits 1 if anything behaves otherwise.
"""
import os
import secrets
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
from tpmkmsdemo import DemoFailed, check, show, step, use_build_dir  # noqa: E402

GROUP = "cluster-a-kek"
CONVERGE = 8.0
RECOVER = 30.0


def main():
    use_build_dir(sys.argv, os.path.join(HERE, "..", ".."))

    import tpmkmstest as t              # swtpm, daemon, KMS v2 client
    import tpmkmstest_kmip as k         # PyKMIP, certificates, fleet-mode hosts
    from grpc import StatusCode

    pki = kms = None
    hosts = []

    def roles(w):
        return {x["central_id"]: x["role"] for x in w.status_json()["keys"]}

    def wait_roles(want, timeout=CONVERGE):
        for w in hosts:
            try:
                k.wait_for(lambda w=w: roles(w) == want, timeout, "%s: roles %r" % (w.cn, want))
            except AssertionError as e:
                raise DemoFailed(str(e))

    def show_keys():
        for w in hosts:
            keys = w.status_json()["keys"]
            show(w.cn, ", ".join("%s=%s" % (x["central_id"], x["role"]) for x in keys) or "(none)")

    def key_ids():
        return [t.status(w.stub()).key_id for w in hosts]

    try:
        step(1, "A central KMS and two control-plane hosts",
             "PyKMIP plays the central KMS (KMIP 1.2 over mutual TLS 1.2). Each host "
             "runs tpmkmsd on its own TPM with its own client certificate (CN=node-a, "
             "CN=node-b) and syncs the KMIP Object Group '%s' every second. The "
             "operator (CN=kms-admin) creates the KEK versions with an operation "
             "policy that lets every host read them." % GROUP)
        pki = k.Pki()
        kms = k.KmipServer(pki)
        kms.start()
        show("central KMS", kms.endpoint)
        for cn in ("node-a", "node-b"):
            w = k.FleetWorld(None, kms, cn=cn, group=GROUP, sync_interval="1s", timeout="2s")
            hosts.append(w)
            w.start()
            show(cn, "%s (TPM %s)" % (w.kms_sock, w.tpm.tcti))
        st = t.status(hosts[0].stub())
        show("healthz", st.healthz)
        check(st.healthz != "ok", "no KEK yet: the hosts report it and refuse to encrypt")

        step(2, "Phase 1 of a rotation: the operator creates a version Pre-Active",
             "Every host fetches it and caches it 'staged': it may decrypt with it but "
             "does not encrypt with it yet, so no host writes data that another host "
             "could not read.")
        v1 = kms.create_version(GROUP)
        show("KMIP uid", "%s (%s)" % (v1, kms.state(v1)))
        wait_roles({v1: "staged"})
        show_keys()
        check(True, "staged on both hosts")

        step(3, "Phase 2: the operator activates it",
             "At their next sync both hosts promote it to primary. Status's key_id "
             "changes, which makes each apiserver draw a new DEK seed, and the id is "
             "the same on every host: kmip:<group>/<uid>.<key check value>.")
        kms.activate(v1)
        wait_roles({v1: "primary"})
        ids = key_ids()
        show("node-a key_id", ids[0])
        show("node-b key_id", ids[1])
        check(ids[0] == ids[1] and ids[0].startswith("kmip:%s/%s." % (GROUP, v1)),
              "both hosts report the same key_id")
        kid1 = ids[0]

        step(4, "Cross-host decrypt",
             "What node-a's apiserver stored in etcd, node-b's apiserver can read: "
             "both hold the same KEK, sealed to their own TPMs.")
        seed = secrets.token_bytes(32)
        r = t.encrypt(hosts[0].stub(), seed)
        show("encrypted on node-a", "%d bytes under %s" % (len(r.ciphertext), r.key_id))
        check(t.decrypt(hosts[1].stub(), r.ciphertext, r.key_id) == seed,
              "node-b decrypts node-a's ciphertext")
        old_ct, old_kid = r.ciphertext, r.key_id

        step(5, "The next rotation",
             "A second version goes the same way: staged, then activated. The first "
             "becomes 'retired': it no longer encrypts but still decrypts.")
        v2 = kms.create_version(GROUP)
        wait_roles({v1: "primary", v2: "staged"})
        kms.activate(v2)
        wait_roles({v1: "retired", v2: "primary"})
        show_keys()
        ids = key_ids()
        check(ids[0] == ids[1] != kid1, "both switched to the new key_id")
        kid2 = ids[0]
        check(all(t.decrypt(w.stub(), old_ct, old_kid) == seed for w in hosts),
              "the old ciphertext still decrypts on both")

        step(6, "The central KMS goes down",
             "The apiserver's path never waits on the network: both hosts keep "
             "serving from their sealed caches. tpmkmsctl status shows the failing "
             "endpoint and how stale the cache is getting.")
        kms.stop()
        for w in hosts:
            k.wait_for(lambda w=w: w.endpoint_health(kms.endpoint)["last_error"], CONVERGE,
                       "%s: endpoint failure reported" % w.cn)
        time.sleep(1.5)
        for w in hosts:
            stub = w.stub()
            st = t.status(stub)
            r = t.encrypt(stub, seed)
            check(st.healthz == "ok" and r.key_id == kid2
                  and t.decrypt(stub, r.ciphertext, r.key_id) == seed,
                  "%s still encrypts and decrypts, healthz ok" % w.cn)
        c = hosts[0].central()
        ep = hosts[0].endpoint_health(kms.endpoint)
        show("last_error", ep["last_error"])
        show("failures in a row", ep["consecutive_failures"])
        show("last sync", c["last_sync"])
        show("staleness", "%s s" % c["staleness_seconds"])
        check(c["staleness_seconds"] > 0, "status shows the cache's staleness")

        step(7, "The central KMS comes back",
             "Sync resumes on its own (with backoff while it was down); a version "
             "created meanwhile reaches both hosts.")
        kms.start()
        v3 = kms.create_version(GROUP)
        for w in hosts:
            k.wait_for(lambda w=w: w.endpoint_health(kms.endpoint)["last_error"] == "",
                       RECOVER, "%s: sync resumed" % w.cn)
        wait_roles({v1: "retired", v2: "primary", v3: "staged"}, RECOVER)
        show_keys()
        c = hosts[0].central()
        show("staleness", "%s s" % c["staleness_seconds"])
        check(True, "both hosts in sync again")

        step(8, "An old version is compromised",
             "The operator revokes the first version for key compromise. Every host "
             "purges it from its cache at the next sync; what was encrypted under it "
             "no longer decrypts anywhere (NOT_FOUND), while the current key serves on.")
        kms.compromise(v1)
        show("KMIP state", kms.state(v1))
        wait_roles({v2: "primary", v3: "staged"})
        show_keys()
        for w in hosts:
            code = t.rpc_code(t.decrypt, w.stub(), old_ct, old_kid)
            check(code == StatusCode.NOT_FOUND, "%s: Decrypt under the compromised key -> %s"
                  % (w.cn, code.name))
        check(key_ids() == [kid2, kid2], "both hosts still serve the current primary")

        print("\nAll steps behaved as shown.")
        return 0
    except (DemoFailed, AssertionError, RuntimeError, t.DaemonError, t.grpc.RpcError) as e:
        print("\nDEMO FAILED: %s" % e, file=sys.stderr)
        for w in hosts:
            log = w.log(all_runs=True)
            if log:
                print("--- tpmkmsd log (%s) ---\n%s" % (w.cn, log[-3000:]), file=sys.stderr)
        return 1
    finally:
        for w in hosts:
            w.close()
        if kms is not None:
            kms.close()
        if pki is not None:
            pki.close()


if __name__ == "__main__":
    sys.exit(main())
