#!/usr/bin/python3
"""The .deb installed for real on this machine (as root), as a user would:

install -> files, owners, modes, conffile, user, `tpmkmsd --version`, the
installed units through `systemd-analyze verify` and `security`; the
installed daemon run as user tpmkms on a swtpm with the shipped config edited
(as an admin would) -> upgrade to a newer build: the edit and the state are
kept and the old ciphertext still decrypts -> `dpkg -r`: config and state kept
-> `dpkg -P`: config and systemd state gone, state dir kept (documented).

Cleanup, also on failure: the daemon and swtpm are stopped, the package
purged, /var/lib/tpmkms removed, and the tpmkms user (and its group) deleted
if this test created it, so the machine is left as found. The test refuses to
start if tpmkms is installed or /etc/tpmkms or /var/lib/tpmkms exist: it never
touches a real installation.
"""
import glob
import grp
import hashlib
import os
import pwd
import signal
import stat
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as T  # noqa: E402
from tpmkmstest_swtpm import Swtpm  # noqa: E402

PKG_DIR = T.env_path("TPMKMS_PKG_DIR")
VERSION = T.env_path("TPMKMS_VERSION")
CONF = "/etc/tpmkms/tpmkmsd.conf"
STATE = "/var/lib/tpmkms"
UNITDIR = "/usr/lib/systemd/system"
THRESHOLD = 15          # systemd-analyze security --threshold: exposure 1.5

# path: (type, mode, owner, group) of every file the package ships
SHIPPED = {
    "/etc/tpmkms": ("d", 0o755, "root", "root"),
    CONF: ("f", 0o640, "root", "tpmkms"),
    "/usr/sbin/tpmkmsd": ("f", 0o755, "root", "root"),
    "/usr/sbin/tpmkmsctl": ("f", 0o755, "root", "root"),
    UNITDIR + "/tpmkmsd.service": ("f", 0o644, "root", "root"),
    UNITDIR + "/tpmkmsd.socket": ("f", 0o644, "root", "root"),
    "/usr/lib/sysusers.d/tpmkms.conf": ("f", 0o644, "root", "root"),
    "/usr/lib/tmpfiles.d/tpmkms.conf": ("f", 0o644, "root", "root"),
    "/usr/share/man/man8/tpmkmsd.8.gz": ("f", 0o644, "root", "root"),
    "/usr/share/man/man8/tpmkmsctl.8.gz": ("f", 0o644, "root", "root"),
    "/usr/share/man/man5/tpmkmsd.conf.5.gz": ("f", 0o644, "root", "root"),
    "/usr/share/doc/tpmkms/copyright": ("f", 0o644, "root", "root"),
    "/usr/share/doc/tpmkms/changelog.gz": ("f", 0o644, "root", "root"),
    "/usr/share/tpmkms/prometheus/tpmkms-alerts.yml": ("f", 0o644, "root", "root"),
    "/usr/share/tpmkms/grafana/tpmkms-dashboard.json": ("f", 0o644, "root", "root"),
}


def run(*cmd, check=True, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    r = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError("%s: exit %d\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(cmd), r.returncode, r.stdout, r.stderr))
    return r


def pkg_status():
    r = run("dpkg-query", "-W", "-f=${db:Status-Abbrev}${Version}", "tpmkms", check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def user_exists(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def group_exists(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def systemd_leftovers():
    """Enablement/mask state of our units anywhere systemd or d-s-h keeps it."""
    pats = ["/etc/systemd/system/*tpmkms*", "/etc/systemd/system/*/*tpmkms*",
            "/var/lib/systemd/deb-systemd-helper-enabled/*tpmkms*",
            "/var/lib/systemd/deb-systemd-helper-enabled/*/*tpmkms*",
            "/var/lib/systemd/deb-systemd-helper-masked/*tpmkms*"]
    return sorted(p for pat in pats for p in glob.glob(pat))


class Daemon:
    """The installed /usr/sbin/tpmkmsd run as user tpmkms (setpriv), with a
    test NOTIFY_SOCKET, as the unit would run it minus the sandbox."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.proc = None
        self.notify = None
        self.log = os.path.join(tmp, "daemon.log")

    def start(self):
        if self.notify:
            self.notify.close()
        self.notify = T.NotifySocket(os.path.join(self.tmp, "notify.sock"))
        os.chmod(self.notify.path, 0o666)      # tpmkms must be able to send
        env = dict(os.environ, NOTIFY_SOCKET=self.notify.path)
        env.pop("JOURNAL_STREAM", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["setpriv", "--reuid=tpmkms", "--regid=tpmkms", "--init-groups",
                 "/usr/sbin/tpmkmsd", "--config", CONF],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                preexec_fn=T._die_with_parent)
        deadline = time.monotonic() + T.READY_TIMEOUT
        while time.monotonic() < deadline:
            self.notify.drain(0.2)
            if any("READY=1" in m for m in self.notify.messages):
                return
            if self.proc.poll() is not None:
                break
        raise AssertionError("installed tpmkmsd did not get ready; log:\n" + self.text())

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(T.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode if self.proc else None
        self.proc = None
        return rc

    def text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def close(self):
        self.stop()
        if self.notify:
            self.notify.close()
            self.notify = None


class DebTest(unittest.TestCase):
    def setUp(self):
        self.assertEqual(os.geteuid(), 0, "needs root (dpkg)")
        st = pkg_status()
        if st:
            self.fail("tpmkms is installed here (%s): this test installs and purges the "
                      "package, so it refuses to run on such a machine" % st)
        for p in ("/etc/tpmkms", STATE):
            self.assertFalse(os.path.lexists(p), "%s exists: refusing to touch it" % p)
        self.debs = glob.glob(os.path.join(PKG_DIR, "tpmkms_%s_*.deb" % VERSION))
        self.new_debs = glob.glob(os.path.join(PKG_DIR, "new", "tpmkms_%s+1_*.deb" % VERSION))
        self.assertEqual(len(self.debs), 1, "no package in %s: run packaging_build" % PKG_DIR)
        self.assertEqual(len(self.new_debs), 1)
        self.had_user = user_exists("tpmkms")
        self.had_group = group_exists("tpmkms")
        self.leftovers_before = systemd_leftovers()
        self.tmp = tempfile.mkdtemp(prefix="tpmkms-pkg-")
        os.chmod(self.tmp, 0o755)
        self.tpm = Swtpm()
        self.daemon = Daemon(self.tmp)
        self.addCleanup(self.cleanup)

    def cleanup(self):
        errors = []
        self.daemon.close()
        self.tpm.close()
        if pkg_status():
            r = run("dpkg", "-P", "tpmkms", check=False)
            if r.returncode != 0:
                errors.append("dpkg -P: " + r.stderr)
        run("rm", "-rf", STATE, "/etc/tpmkms", self.tmp, check=False)
        if not self.had_user and user_exists("tpmkms"):
            run("userdel", "tpmkms", check=False)
        if not self.had_group and group_exists("tpmkms"):
            run("groupdel", "tpmkms", check=False)
        for p in set(systemd_leftovers()) - set(self.leftovers_before):
            errors.append("left behind: " + p)
            run("rm", "-f", p, check=False)
        if user_exists("tpmkms") != self.had_user:
            errors.append("could not remove user tpmkms")
        if errors:
            raise AssertionError("cleanup: " + "; ".join(errors))

    # --- checks -------------------------------------------------------------

    def check_files(self):
        listed = set(run("dpkg", "-L", "tpmkms").stdout.split())
        for path, (kind, mode, owner, group) in SHIPPED.items():
            self.assertIn(path, listed)
            st = os.lstat(path)
            self.assertEqual(stat.S_ISDIR(st.st_mode), kind == "d", path)
            self.assertEqual(stat.S_IMODE(st.st_mode), mode,
                             "%s: mode %o" % (path, stat.S_IMODE(st.st_mode)))
            self.assertEqual(pwd.getpwuid(st.st_uid).pw_name, owner, path)
            self.assertEqual(grp.getgrgid(st.st_gid).gr_name, group, path)
        ours = {p for p in listed if os.path.isfile(p)}
        self.assertEqual(ours, {p for p, v in SHIPPED.items() if v[0] == "f"})
        conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "tpmkms").stdout.split()
        self.assertIn(CONF, conffiles)
        # the state dir, from tmpfiles.d at install
        st = os.stat(STATE)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o700)
        self.assertEqual(pwd.getpwuid(st.st_uid).pw_name, "tpmkms")

    def check_user(self):
        u = pwd.getpwnam("tpmkms")
        self.assertLess(u.pw_uid, 1000, "a system user")
        self.assertEqual(u.pw_dir, STATE)
        self.assertTrue(u.pw_shell.endswith("nologin"), u.pw_shell)
        self.assertEqual(grp.getgrgid(u.pw_gid).gr_name, "tpmkms")
        self.assertIn("tpmkms", grp.getgrnam("tss").gr_mem, "tpmkms may open /dev/tpmrm0")

    def check_units(self):
        units = [UNITDIR + "/tpmkmsd.service", UNITDIR + "/tpmkmsd.socket"]
        r = run("systemd-analyze", "verify", *units, check=False)
        self.assertEqual((r.returncode, r.stderr), (0, ""), "systemd-analyze verify")
        r = run("systemd-analyze", "security", "--offline=true",
                "--threshold=%d" % THRESHOLD, units[0], check=False)
        overall = [l for l in r.stdout.splitlines() if "Overall exposure" in l]
        print("\n".join(overall), file=sys.stderr)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        with open(units[0]) as f:
            text = f.read()
        self.assertIn("ExecStart=/usr/sbin/tpmkmsd --config %s\n" % CONF, text)
        # Debian: the service is enabled at install, the optional socket is not.
        self.assertTrue(os.path.islink(
            "/etc/systemd/system/multi-user.target.wants/tpmkmsd.service"))
        self.assertFalse(os.path.lexists("/etc/systemd/system/sockets.target.wants/tpmkmsd.socket"))

    def edit_conffile(self):
        """As an admin would: the TPM (here swtpm) and the sockets."""
        with open(CONF) as f:
            text = f.read()
        for old, new in (("tcti = device:/dev/tpmrm0", "tcti = " + self.tpm.tcti),
                         ("socket = /run/tpmkms/kms.sock", "socket = %s/kms.sock" % self.run_dir),
                         ("socket = /run/tpmkms/control.sock",
                          "socket = %s/control.sock" % self.run_dir)):
            self.assertIn(old, text)
            text = text.replace(old, new)
        with open(CONF, "w") as f:     # in place: keeps owner, group, mode
            f.write(text)
        return text

    def stub(self):
        import grpc
        # Own subchannel pool: grpc would reuse the connection to the daemon
        # stopped before the upgrade (see tpmkmstest.World.channel).
        ch = grpc.insecure_channel("unix://%s/kms.sock" % self.run_dir,
                                   options=[("grpc.use_local_subchannel_pool", 1)])
        self.addCleanup(ch.close)
        return T.stubs()[1].KeyManagementServiceStub(ch)

    # --- the story ------------------------------------------------------------

    def test_install_run_upgrade_remove(self):
        r = run("dpkg", "-i", self.debs[0])
        print(r.stdout, r.stderr, file=sys.stderr)
        self.assertTrue(pkg_status().startswith("ii"), pkg_status())
        self.check_files()
        self.check_user()
        self.assertEqual(run("/usr/sbin/tpmkmsd", "--version").stdout.strip(),
                         "tpmkmsd " + VERSION)
        self.check_units()
        # the shipped config is valid as shipped, read as tpmkms (group)
        run("setpriv", "--reuid=tpmkms", "--regid=tpmkms", "--init-groups",
            "/usr/sbin/tpmkmsd", "--check-config", "--config", CONF)

        # The installed daemon, as user tpmkms, on swtpm.
        self.tpm.start()
        self.run_dir = os.path.join(self.tmp, "run")
        os.mkdir(self.run_dir, 0o755)
        os.chown(self.run_dir, pwd.getpwnam("tpmkms").pw_uid, grp.getgrnam("tpmkms").gr_gid)
        edited = self.edit_conffile()
        self.daemon.start()
        with open("/proc/%d/status" % self.daemon.proc.pid) as f:
            status = f.read()
        uid = pwd.getpwnam("tpmkms").pw_uid
        self.assertIn("Uid:\t%d\t%d\t%d\t%d" % (uid, uid, uid, uid), status)
        self.assertIn(str(grp.getgrnam("tss").gr_gid), status.split("Groups:")[1].split("\n")[0])
        stub = self.stub()
        self.assertEqual(T.status(stub).healthz, "ok")
        resp = T.encrypt(stub, b"k" * 32)
        r = run("/usr/sbin/tpmkmsctl", "--config", CONF, "status")
        self.assertIn(resp.key_id, r.stdout)
        cache = os.path.join(STATE, "kek-cache")
        st = os.stat(cache)
        self.assertEqual((st.st_uid, stat.S_IMODE(st.st_mode)), (uid, 0o600))
        self.assertEqual(self.daemon.stop(), 0, self.daemon.text())
        self.assertTrue(any("STOPPING=1" in m for m in self.daemon.notify.drain(1) +
                            self.daemon.notify.messages))
        state_before = sha256(cache)

        # Upgrade to a newer build. The shipped conffile did not change, so
        # dpkg keeps the edit without asking (stdin is /dev/null: a prompt
        # would fail the upgrade).
        r = run("dpkg", "-i", self.new_debs[0])
        print(r.stdout, r.stderr, file=sys.stderr)
        self.assertEqual(pkg_status(), "ii %s+1" % VERSION)
        with open(CONF) as f:
            self.assertEqual(f.read(), edited, "the admin's edit survives the upgrade")
        self.check_files()
        self.assertEqual(sha256(cache), state_before, "state kept across the upgrade")
        self.daemon.start()
        stub = self.stub()
        self.assertEqual(T.decrypt(stub, resp.ciphertext, resp.key_id), b"k" * 32)
        self.assertEqual(self.daemon.stop(), 0, self.daemon.text())

        # Remove: binaries go, config and state stay.
        run("dpkg", "-r", "tpmkms")
        self.assertTrue(pkg_status().startswith("rc"), pkg_status())
        self.assertFalse(os.path.exists("/usr/sbin/tpmkmsd"))
        self.assertFalse(os.path.exists(UNITDIR + "/tpmkmsd.service"))
        with open(CONF) as f:
            self.assertEqual(f.read(), edited)
        self.assertEqual(sha256(cache), state_before, "state kept on removal")

        # Purge: config and systemd state go; the sealed cache stays, said so.
        r = run("dpkg", "-P", "tpmkms")
        self.assertIn("keeping /var/lib/tpmkms", r.stderr)
        self.assertEqual(pkg_status(), "")
        self.assertFalse(os.path.exists(CONF))
        self.assertEqual(sha256(cache), state_before, "state kept on purge")
        self.assertEqual(systemd_leftovers(), self.leftovers_before)


if __name__ == "__main__":
    unittest.main()
