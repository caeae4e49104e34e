#!/usr/bin/python3
"""Files and sockets that are not what they seem, played against the real
daemon and CLI: a FIFO or /dev/zero as the configuration or the cache, a
state dir others may write to, a cache that vanished, a stray temp file of
an interrupted write, bytes that are not UTF-8, and a flood of held control
connections. Each asserts what is said, what is served meanwhile, and that
nothing is lost."""
import json
import os
import socket
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402


def run(*args, timeout=10):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


class ConfigFileTest(unittest.TestCase):
    """--config that is not a regular file: a clear error at once, never a
    hang, never 'configuration is valid' with defaults."""

    def setUp(self):
        self.w = t.World(self)

    def test_fifo_and_device_configs(self):
        fifo = os.path.join(self.w.dir, "fifo.conf")
        os.mkfifo(fifo)
        for path in (fifo, "/dev/zero", "/dev/null"):
            for argv in ([self.w.tpmkmsd, "--check-config", "--config", path],
                         [self.w.tpmkmsctl, "--config", path, "status"]):
                r = run(*argv)                   # the timeout is the hang detector
                self.assertEqual(r.returncode, 1, (argv, r.stdout, r.stderr))
                self.assertIn("%s: not a regular file" % path, r.stderr)
                self.assertNotIn("valid", r.stdout + r.stderr)

    def test_huge_config_refused(self):
        path = os.path.join(self.w.dir, "huge.conf")
        with open(path, "wb") as f:
            f.truncate(2 << 20)
        r = run(self.w.tpmkmsd, "--check-config", "--config", path)
        self.assertEqual(r.returncode, 1)
        self.assertIn("larger than 1 MiB", r.stderr)

    def test_non_utf8_value_refused_with_its_line(self):
        self.w.start_tpm()
        self.w.write_config()
        with open(self.w.config, "ab") as f:
            f.write(b"[central]\nkey_group = caf\xe9\n")
        r = run(self.w.tpmkmsd, "--check-config", "--config", self.w.config)
        self.assertEqual(r.returncode, 1)
        self.assertRegex(r.stderr, r"tpmkmsd\.conf:\d+: not valid UTF-8")


class StateDirTest(unittest.TestCase):
    def setUp(self):
        self.w = t.World(self)
        self.w.start()
        self.key_id, self.pt, self.ct = self.w.encrypt_one()

    def assert_refused_saying(self, words):
        st = t.status(self.w.stub())
        self.assertIn(words, st.healthz)
        self.assertEqual(self.w.status_json()["state"], "refused")
        return st

    def test_fifo_at_the_cache_path_refused_without_hanging(self):
        self.assertEqual(self.w.stop_daemon(), 0)
        os.rename(self.w.cache_path(), self.w.cache_path() + ".real")
        os.mkfifo(self.w.cache_path(), 0o600)
        self.w.start_daemon()                    # READY within the harness's timeout
        self.assert_refused_saying("not a regular file")

    def test_world_writable_state_dir_refused(self):
        self.assertEqual(self.w.stop_daemon(), 0)
        os.chmod(self.w.state_dir, 0o777)
        self.w.start_daemon()
        st = self.assert_refused_saying("state dir:")
        self.assertIn("chmod 0700", st.healthz)
        os.chmod(self.w.state_dir, 0o700)
        self.w.restart_daemon()
        self.assertEqual(t.decrypt(self.w.stub(), self.ct, self.key_id), self.pt)

    def test_vanished_cache_refused_not_replaced_by_a_new_key(self):
        self.assertEqual(self.w.stop_daemon(), 0)
        os.rename(self.w.cache_path(), os.path.join(self.w.dir, "kek-cache.moved"))
        self.w.start_daemon()
        st = self.assert_refused_saying("the key cache is gone")
        self.assertIn("new-cache", st.healthz)
        self.assertFalse(os.path.exists(self.w.cache_path()), "a new cache was made")
        # Put back, it serves again (the counter did not move).
        self.assertEqual(self.w.stop_daemon(), 0)
        os.rename(os.path.join(self.w.dir, "kek-cache.moved"), self.w.cache_path())
        self.w.start_daemon()
        self.assertEqual(t.decrypt(self.w.stub(), self.ct, self.key_id), self.pt)

    def test_state_dir_in_use_by_another_writer(self):
        """One writer of the state dir at a time: while another process holds
        it (a tpmkmsctl offline step, a second daemon), a start says so."""
        import fcntl
        self.assertEqual(self.w.stop_daemon(), 0)
        fd = os.open(self.w.state_dir, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with self.assertRaises(t.DaemonError):
            self.w.start_daemon()
        self.w.proc = None
        self.assertIn("in use by another tpmkmsd or tpmkmsctl", self.w.log())
        r = self.w.ctl("new-cache")
        self.assertEqual(r.returncode, 1)
        self.assertIn("in use by another", r.stderr)
        fcntl.flock(fd, fcntl.LOCK_UN)
        self.w.start_daemon()
        self.assertEqual(t.decrypt(self.w.stub(), self.ct, self.key_id), self.pt)

    def test_stray_temp_file_wiped_at_start(self):
        self.assertEqual(self.w.stop_daemon(), 0)
        with open(self.w.cache_path(), "rb") as f:
            body = f.read()
        stray = os.path.join(self.w.state_dir, ".kek-cache.0badf00d")
        with open(stray, "wb") as f:
            f.write(body)
        other = os.path.join(self.w.state_dir, ".kek-cache.notours")   # not our pattern: kept
        open(other, "wb").close()
        self.w.start_daemon()
        self.assertFalse(os.path.exists(stray))
        self.assertTrue(os.path.exists(other))
        self.assertIn("Wiped and removed 1 temp file", self.w.log())
        self.assertEqual(t.decrypt(self.w.stub(), self.ct, self.key_id), self.pt)


class DiskFullTest(unittest.TestCase):
    """The state dir on a full file system: a key-set change fails with a
    clear error, the old cache stays in force and intact, no temp file is
    left, and once there is room again it works."""

    def setUp(self):
        self.w = t.World(self)
        # The daemon gets its own mount namespace with a 64 KiB tmpfs on the
        # state dir; the test reaches it through /proc/PID/root.
        self.w.daemon_prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                                'mount -t tmpfs -o size=64k tmpfs "$0" && chmod 700 "$0" && exec "$@"',
                                self.w.state_dir]
        self.w.start()

    def ns_path(self, name=""):
        return "/proc/%d/root%s" % (self.w.proc.pid, os.path.join(self.w.state_dir, name))

    def test_rotate_on_a_full_disk_keeps_the_old_cache(self):
        stub = self.w.stub()
        kid = t.status(stub).key_id
        ct = t.encrypt(stub, b"before").ciphertext
        with open(self.ns_path("kek-cache"), "rb") as f:
            before = f.read()
        filler = self.ns_path("filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)   # fill it up
        try:
            while os.write(fd, b"\0" * 4096) > 0:
                pass
        except OSError:
            pass
        os.close(fd)
        r = self.w.ctl("rotate")
        self.assertEqual(r.returncode, 1)
        self.assertIn("No space left on device", r.stderr)
        self.assertIn("cannot persist the new key", r.stderr)
        self.assertEqual(sorted(os.listdir(self.ns_path())), ["filler", "kek-cache"], "a temp file was left")
        with open(self.ns_path("kek-cache"), "rb") as f:
            self.assertEqual(f.read(), before, "the cache changed")
        self.assertEqual(t.status(self.w.stub()).key_id, kid)
        self.assertEqual(t.decrypt(self.w.stub(), ct, kid), b"before")
        os.unlink(filler)                       # room again
        new = self.w.ctl("rotate", check=True).stdout.strip()
        self.assertNotEqual(new, kid)
        self.assertEqual(t.decrypt(self.w.stub(), ct, kid), b"before")


class ControlFloodTest(unittest.TestCase):
    def test_held_control_connections_do_not_starve_anyone(self):
        """Root opens and holds far more control connections than the fd
        limit would allow if each took a descriptor: the daemon holds at
        most its cap, the rest wait in the kernel's backlog, the KMS socket
        keeps admitting apiserver connections, and tpmkmsctl works again
        once they go."""
        w = t.World(self)
        w.start()
        stub = w.stub()
        kid = t.status(stub).key_id
        ct = t.encrypt(stub, b"flood").ciphertext
        held = []
        self.addCleanup(lambda: [s.close() for s in held])
        for _ in range(1100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(w.ctl_sock)
            except BlockingIOError:              # the backlog is full: that is the point
                s.close()
                continue
            held.append(s)
        self.assertGreater(len(held), 100)
        time.sleep(0.5)
        self.assertTrue(w.alive(), w.log())
        fds = len(os.listdir("/proc/%d/fd" % w.proc.pid))
        self.assertLess(fds, 100, "the daemon holds %d descriptors" % fds)
        # The KMS socket admits new apiserver connections and answers.
        for _ in range(5):
            self.assertEqual(t.decrypt(w.stub(), ct, kid), b"flood")
        self.assertNotIn("Too many open files", w.log())
        self.assertIn("new ones wait until one closes", w.log())
        for s in held:
            s.close()
        held.clear()
        r = w.ctl("status", timeout=30)          # served once the held ones are gone
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_status_json_valid_and_arguments_named(self):
        w = t.World(self)
        w.start()
        js = json.loads(w.ctl("status", "--json", check=True).stdout)
        self.assertEqual(js["state"], "serving")
        r = w.ctl("status", "--json", "extra")
        self.assertEqual(r.returncode, 1)
        self.assertIn("'extra'", r.stderr)


if __name__ == "__main__":
    unittest.main()
