#!/usr/bin/python3
"""The .rpm installed with `rpm -i --root` into a scratch root: its file
list (every file with its mode, owner and flags; no system directory owned),
its dependencies on the runtime libraries, and its scriptlets (the
distribution's conventions, valid sh). The scratch root has no /bin/sh, so the
scriptlets are checked, not run (--noscripts); nothing here touches the host's
rpm database or files.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as T  # noqa: E402

PKG_DIR = T.env_path("TPMKMS_PKG_DIR")
VERSION = T.env_path("TPMKMS_VERSION")

# path: (mode string, owner, group, rpm file flags)
FILES = {
    "/etc/tpmkms": ("drwxr-xr-x", "root", "root", ""),
    "/etc/tpmkms/tpmkmsd.conf": ("-rw-r-----", "root", "tpmkms", "cn"),
    "/usr/lib/systemd/system/tpmkmsd.service": ("-rw-r--r--", "root", "root", ""),
    "/usr/lib/systemd/system/tpmkmsd.socket": ("-rw-r--r--", "root", "root", ""),
    "/usr/lib/sysusers.d/tpmkms.conf": ("-rw-r--r--", "root", "root", ""),
    "/usr/lib/tmpfiles.d/tpmkms.conf": ("-rw-r--r--", "root", "root", ""),
    "/usr/sbin/tpmkmsctl": ("-rwxr-xr-x", "root", "root", ""),
    "/usr/sbin/tpmkmsd": ("-rwxr-xr-x", "root", "root", ""),
    "/usr/share/doc/tpmkms": ("drwxr-xr-x", "root", "root", ""),
    "/usr/share/doc/tpmkms/changelog.gz": ("-rw-r--r--", "root", "root", "d"),
    "/usr/share/doc/tpmkms/copyright": ("-rw-r--r--", "root", "root", "dl"),
    "/usr/share/man/man5/tpmkmsd.conf.5.gz": ("-rw-r--r--", "root", "root", "d"),
    "/usr/share/man/man8/tpmkmsctl.8.gz": ("-rw-r--r--", "root", "root", "d"),
    "/usr/share/man/man8/tpmkmsd.8.gz": ("-rw-r--r--", "root", "root", "d"),
    "/usr/share/tpmkms": ("drwxr-xr-x", "root", "root", ""),
    "/usr/share/tpmkms/grafana": ("drwxr-xr-x", "root", "root", ""),
    "/usr/share/tpmkms/grafana/tpmkms-dashboard.json": ("-rw-r--r--", "root", "root", ""),
    "/usr/share/tpmkms/prometheus": ("drwxr-xr-x", "root", "root", ""),
    "/usr/share/tpmkms/prometheus/tpmkms-alerts.yml": ("-rw-r--r--", "root", "root", ""),
}
OWN_DIRS = {"/etc/tpmkms", "/usr/share/doc/tpmkms", "/usr/share/tpmkms", "/usr/share/tpmkms/grafana",
            "/usr/share/tpmkms/prometheus"}

# Runtime libraries by soname: linked ones (found by rpm) and the device
# TCTI that tss2-tctildr dlopen()s (declared by us).
SONAMES = ["libtss2-esys.so.0", "libtss2-mu.so.0", "libtss2-rc.so.0", "libtss2-tctildr.so.0",
           "libtss2-tcti-device.so.0", "libssl.so.3", "libcrypto.so.3", "libsystemd.so.0",
           "libnghttp2.so.14", "libprotobuf-c.so.1", "libinih.so.1", "libmicrohttpd.so.12", "libc.so.6"]

# scriptlet tag: what it must do (Fedora's systemd/sysusers/tmpfiles macros)
SCRIPTS = {
    "PREIN": ["systemd-sysusers --replace=/usr/lib/sysusers.d/tpmkms.conf -",
              "u tpmkms - ", "m tpmkms tss"],
    "POSTIN": ["[ $1 -eq 1 ]", "systemd-update-helper install-system-units tpmkmsd.service tpmkmsd.socket",
               "systemctl --no-reload preset", "systemd-tmpfiles --create tpmkms.conf"],
    "PREUN": ["[ $1 -eq 0 ]", "systemd-update-helper remove-system-units tpmkmsd.service tpmkmsd.socket"],
    "POSTUN": ["[ $1 -ge 1 ]", "systemd-update-helper mark-restart-system-units tpmkmsd.service"],
}


def run(*cmd, check=True):
    r = subprocess.run(list(cmd), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError("%s: exit %d\n%s%s" % (" ".join(cmd), r.returncode, r.stdout, r.stderr))
    return r


class RpmTest(unittest.TestCase):
    def setUp(self):
        rpms = glob.glob(os.path.join(PKG_DIR, "tpmkms-%s-*.rpm" % VERSION))
        self.assertEqual(len(rpms), 1, "no package in %s: run packaging_build" % PKG_DIR)
        self.rpm = rpms[0]
        self.root = tempfile.mkdtemp(prefix="tpmkms-rpmroot-")
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def q(self, fmt):
        return run("rpm", "--root", self.root, "-q", "--qf", fmt, "tpmkms").stdout

    def test_install_into_scratch_root(self):
        arch = run("rpm", "-qp", "--qf", "%{ARCH}", self.rpm).stdout
        self.assertEqual(os.path.basename(self.rpm), "tpmkms-%s-1.%s.rpm" % (VERSION, arch))
        run("rpm", "--root", self.root, "--initdb")
        # --nodeps: the scratch root has no libraries; --noscripts: no /bin/sh.
        r = run("rpm", "--root", self.root, "-i", "--nodeps", "--noscripts", self.rpm)
        print(r.stdout + r.stderr, file=sys.stderr)
        self.assertEqual(self.q("%{VERSION}"), VERSION)

        rows = self.q("[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} "
                      "%{FILEFLAGS:fflags}|%{FILENAMES}\n]").splitlines()
        got = {}
        for row in rows:
            meta, path = row.split("|")
            parts = meta.split(" ")
            got[path] = (parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else "")
        self.assertEqual(got, FILES)
        dirs = {p for p, v in got.items() if v[0].startswith("d")}
        self.assertEqual(dirs, OWN_DIRS, "owns no system directory")
        for path, (mode, _, _, _) in FILES.items():
            self.assertTrue(os.path.lexists(self.root + path), path)
        self.assertEqual(run("rpm", "--root", self.root, "-qc", "tpmkms").stdout.split(),
                         ["/etc/tpmkms/tpmkmsd.conf"])
        with open(self.root + "/usr/lib/systemd/system/tpmkmsd.service") as f:
            self.assertIn("ExecStart=/usr/sbin/tpmkmsd --config /etc/tpmkms/tpmkmsd.conf\n", f.read())

        requires = run("rpm", "--root", self.root, "-q", "--requires", "tpmkms").stdout
        for soname in SONAMES:
            self.assertIn(soname, requires)
        self.assertIn("/usr/bin/systemd-sysusers", requires)

        for tag, needles in SCRIPTS.items():
            text = self.q("%%{%s}" % tag)
            for n in needles:
                self.assertIn(n, text, "%s scriptlet" % tag)
            self.assertEqual(self.q("%%{%sPROG}" % tag), "/bin/sh")
            r = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, "%s: %s" % (tag, r.stderr))
        # Neither erase scriptlet deletes the state dir or the user.
        for tag in ("PREUN", "POSTUN"):
            code = "\n".join(l for l in self.q("%%{%s}" % tag).splitlines()
                             if not l.lstrip().startswith("#"))
            self.assertNotIn("/var/lib/tpmkms", code)
            self.assertNotIn("userdel", code)

        run("rpm", "--root", self.root, "-e", "--noscripts", "tpmkms")
        for path in FILES:
            if path != "/etc/tpmkms/tpmkmsd.conf":
                self.assertFalse(os.path.lexists(self.root + path), path)


if __name__ == "__main__":
    unittest.main()
