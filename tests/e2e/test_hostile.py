#!/usr/bin/python3
"""Hostile clients on the KMS socket (raw unix sockets, hand-made HTTP/2) and
peers whose uid is not allowed. After each, the daemon is alive and a normal
gRPC client is served."""
import os
import secrets
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tpmkmstest as t  # noqa: E402
from tpmkmstest import (DATA, HEADERS, SETTINGS, GOAWAY, WINDOW_UPDATE, PING,  # noqa: E402
                        END_STREAM, END_HEADERS, h2_frame, H2_PREFACE)


class HostileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.w = t.World()
        cls.addClassCleanup(cls.w.close)
        cls.w.start()
        cls.key_id = t.status(cls.w.stub()).key_id

    def assert_served(self, timeout=3):
        """A new, normal client gets answers within the apiserver's 3 s budget."""
        self.assertTrue(self.w.alive(), "daemon died:\n" + self.w.log())
        ch = self.w.channel(fresh=True)
        try:
            stub = t.stubs()[1].KeyManagementServiceStub(ch)
            st = t.status(stub, timeout=timeout)
            self.assertEqual((st.healthz, st.key_id), ("ok", self.key_id))
            pt = secrets.token_bytes(32)
            r = t.encrypt(stub, pt, timeout=timeout)
            self.assertEqual(t.decrypt(stub, r.ciphertext, r.key_id, timeout=timeout), pt)
        finally:
            ch.close()

    def raw(self):
        c = t.RawConn(self.w.kms_sock)
        self.addCleanup(c.close)
        return c

    def goaway_or_closed(self, c, timeout=5):
        fr = c.frames(timeout, until=lambda fs: any(f[0] == GOAWAY for f in fs))
        return c.closed or any(f[0] == GOAWAY for f in fr)

    # garbage

    def test_random_bytes(self):
        for n in (1, 24, 4096, 1 << 20):
            c = self.raw()
            data = b"\x00" + secrets.token_bytes(n - 1)   # not a prefix of the preface
            c.try_send(data)
            self.assertTrue(c.wait_closed(5), "garbage connection (%d bytes) left open" % n)
            self.assert_served()

    def test_http1_request(self):
        c = self.raw()
        c.try_send(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
        self.assertTrue(c.wait_closed(5))
        self.assertFalse(c.buf.startswith(b"HTTP/1.1 2"), "answered HTTP/1.1 with success")
        c = self.raw()
        c.try_send(b"POST /v2.KeyManagementService/Status HTTP/1.1\r\nHost: x\r\n"
                   b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                   b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(c.wait_closed(5))
        self.assert_served()

    def test_valid_raw_request_is_answered(self):
        """Sanity for the hand-made frames below: a correct raw request works."""
        c = self.raw()
        c.h2_handshake()
        c.send(h2_frame(HEADERS, END_HEADERS, 1, t.grpc_request_headers("Status")))
        c.send(h2_frame(DATA, END_STREAM, 1, t.grpc_message(b"")))
        fr = c.frames(5, until=lambda fs: any(f[2] == 1 and f[1] & END_STREAM for f in fs))
        datas = b"".join(f[3] for f in fr if f[0] == DATA and f[2] == 1)
        self.assertGreater(len(datas), 5, fr)
        pb = t.stubs()[0]
        msg = pb.StatusResponse.FromString(datas[5:])
        self.assertEqual((msg.version, msg.healthz, msg.key_id), ("v2", "ok", self.key_id))

    # framing attacks

    def test_oversized_frames(self):
        # a frame larger than the server's SETTINGS_MAX_FRAME_SIZE (RFC 9113 4.2)
        for ftype, stream in ((DATA, 1), (HEADERS, 1), (SETTINGS, 0), (PING, 0)):
            c = self.raw()
            c.h2_handshake()
            size = c.max_frame_size() + 1
            if size >= 1 << 24:
                break                           # server allows any size: next case
            if ftype == DATA:
                c.send(h2_frame(HEADERS, END_HEADERS, 1, t.grpc_request_headers("Encrypt")))
            payload = b"\x00" * size
            c.try_send(h2_frame(ftype, 0, stream, payload))
            self.assertTrue(self.goaway_or_closed(c), "frame type %d of %d bytes" % (ftype, size))
            self.assert_served()
        # a header claiming 16 MiB - 1 that never comes
        c = self.raw()
        c.h2_handshake()
        c.try_send(h2_frame(DATA, 0, 1, b"\x00" * 100, length=(1 << 24) - 1))
        self.assertTrue(self.goaway_or_closed(c))
        self.assert_served()

    def test_oversized_grpc_message(self):
        """A gRPC length prefix of 4 GiB - 1 and a body streamed past the cap."""
        c = self.raw()
        c.h2_handshake()
        c.send(h2_frame(HEADERS, END_HEADERS, 1, t.grpc_request_headers("Encrypt")))
        c.try_send(h2_frame(DATA, 0, 1, b"\x00\xff\xff\xff\xff" + b"\x0a" * 16000))
        for _ in range(8):
            if not c.try_send(h2_frame(DATA, 0, 1, b"\x0a" * 16000)):
                break
        fr = c.frames(5, until=lambda fs: any(f[2] == 1 and (f[1] & END_STREAM or f[0] == 3)
                                               for f in fs) or
                      any(f[0] == GOAWAY for f in fs))
        self.assertTrue(c.closed or any(f[2] == 1 for f in fr) or
                        any(f[0] == GOAWAY for f in fr),
                        "the oversized message was neither refused nor the stream reset")
        self.assertFalse(any(f[0] == DATA and f[2] == 1 for f in fr),
                         "an oversized request produced a response message")
        self.assert_served()

    def test_truncated_frames(self):
        cases = [H2_PREFACE[:10],
                 H2_PREFACE + h2_frame(SETTINGS, 0, 0)[:5],
                 H2_PREFACE + h2_frame(SETTINGS, 0, 0) +
                 h2_frame(HEADERS, END_HEADERS | END_STREAM, 1,
                          t.grpc_request_headers("Status"))[:20],
                 H2_PREFACE + h2_frame(SETTINGS, 0, 0) +
                 h2_frame(HEADERS, END_HEADERS, 1, t.grpc_request_headers("Encrypt")) +
                 h2_frame(DATA, END_STREAM, 1, t.grpc_message(b"\x0a\x20" + b"k" * 32))[:12],
                 # complete frames but a truncated gRPC message inside
                 H2_PREFACE + h2_frame(SETTINGS, 0, 0) +
                 h2_frame(HEADERS, END_HEADERS, 1, t.grpc_request_headers("Encrypt")) +
                 h2_frame(DATA, END_STREAM, 1, t.grpc_message(b"\x0a\x20" + b"k" * 32)[:10])]
        for data in cases:
            c = self.raw()
            c.try_send(data)
            time.sleep(0.05)
            c.close()
            self.assert_served()
        # a truncated gRPC message with END_STREAM gets an error status, not a hang
        c = self.raw()
        c.h2_handshake()
        c.send(h2_frame(HEADERS, END_HEADERS, 1, t.grpc_request_headers("Encrypt")))
        c.send(h2_frame(DATA, END_STREAM, 1, t.grpc_message(b"\x0a\x20" + b"k" * 32)[:10]))
        fr = c.frames(5, until=lambda fs: any(f[2] == 1 and (f[1] & END_STREAM or f[0] == 3)
                                               for f in fs))
        self.assertTrue(any(f[2] == 1 and (f[1] & END_STREAM or f[0] == 3) for f in fr) or
                        c.closed, "no answer to a truncated gRPC message: %r" % fr)
        self.assertFalse(any(f[0] == DATA and f[2] == 1 for f in fr))
        self.assert_served()

    def test_protocol_violations(self):
        bad = [h2_frame(DATA, 0, 0, b"x"),                       # DATA on stream 0
               h2_frame(HEADERS, END_HEADERS, 2, t.grpc_request_headers("Status")),  # even
               h2_frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"),  # zero increment
               h2_frame(SETTINGS, 0, 1, b""),                    # SETTINGS on a stream
               h2_frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff"),  # bad HPACK
               h2_frame(0xEE, 0, 0, b"unknown frame types are ignored") +
               h2_frame(PING, 0, 0, b"\x00" * 7)]                # short PING
        for f in bad:
            c = self.raw()
            c.h2_handshake()
            c.try_send(f)
            self.assertTrue(self.goaway_or_closed(c), f[:9].hex())
            self.assert_served()

    # slow and idle clients

    def test_client_holding_stream_open(self):
        holders = []
        for i in range(4):
            c = self.raw()
            c.h2_handshake()
            c.send(h2_frame(HEADERS, END_HEADERS, 1, t.grpc_request_headers("Encrypt")))
            if i % 2:
                c.send(h2_frame(DATA, 0, 1, t.grpc_message(b"\x0a\x20" + b"k" * 32)[:7]))
            holders.append(c)
        # a half-sent preface and a never-finished HEADERS block (no END_HEADERS)
        c = self.raw()
        c.send(H2_PREFACE[:12])
        holders.append(c)
        c = self.raw()
        c.h2_handshake()
        c.send(h2_frame(HEADERS, 0, 1, t.grpc_request_headers("Status")[:8]))
        holders.append(c)
        time.sleep(0.5)
        self.assert_served()
        time.sleep(2)
        self.assert_served()
        for c in holders:
            c.close()
        self.assert_served()

    def open_idle(self, n):
        """n idle connections: a third silent, a third with only the preface,
        a third with a complete handshake (preface + SETTINGS + ACK)."""
        conns = []
        for i in range(n):
            c = t.RawConn(self.w.kms_sock)
            self.addCleanup(c.close)
            if i % 3 == 1:
                c.send(H2_PREFACE)
            elif i % 3 == 2:
                c.h2_handshake()
            conns.append(c)
        return conns

    def test_idle_connections_below_cap(self):
        conns = self.open_idle(40)
        self.assert_served()
        for c in conns:
            c.close()
        self.assert_served()

    def test_unfinished_handshakes_are_dropped(self):
        silent = [t.RawConn(self.w.kms_sock) for _ in range(5)]
        half = [t.RawConn(self.w.kms_sock) for _ in range(5)]
        for c in silent + half:
            self.addCleanup(c.close)
        for c in half:
            c.send(H2_PREFACE[:10])
        for c in silent + half:
            self.assertTrue(c.wait_closed(15), "a connection without a handshake is kept")
        self.assert_served()

    def test_idle_connections_beyond_cap_do_not_lock_out_clients(self):
        """100 idle, handshaken connections from an allowed peer (a leaky
        client) must not lock kube-apiserver out: at the cap, a new connection
        should displace an idle one, not be refused for the idle timeout."""
        conns = []
        for _ in range(100):
            c = t.RawConn(self.w.kms_sock)
            self.addCleanup(c.close)
            if c.try_send(H2_PREFACE + h2_frame(SETTINGS, 0, 0)):
                conns.append(c)
        time.sleep(0.5)
        try:
            self.assert_served()
        except t.grpc.RpcError as e:
            self.fail("a new client is refused (%s) while %d idle connections are open: "
                      "idle connections hold the connection cap until the idle timeout"
                      % (e.code().name, len(conns)))
        finally:
            for c in conns:
                c.close()
        self.assert_served()

    def test_stalled_request_is_ended(self):
        """A request whose body never completes is ended by the server (stream
        timeout), not held forever; other clients are served meanwhile."""
        c = self.raw()
        c.h2_handshake()
        c.send(h2_frame(HEADERS, END_HEADERS, 1, t.grpc_request_headers("Encrypt")))
        c.send(h2_frame(DATA, 0, 1, t.grpc_message(b"\x0a\x20" + b"k" * 32)[:7]))
        self.assert_served()
        fr = c.frames(30, until=lambda fs: any(f[2] == 1 and (f[1] & END_STREAM or f[0] == 3)
                                                for f in fs) or
                      any(f[0] == GOAWAY for f in fs))
        self.assertTrue(c.closed or any(f[0] == GOAWAY for f in fr) or
                        any(f[2] == 1 and (f[1] & END_STREAM or f[0] == 3) for f in fr),
                        "a stalled request is held open for 30 s")
        self.assertFalse(any(f[0] == DATA and f[2] == 1 for f in fr))
        self.assert_served()

    def test_many_streams_on_one_connection(self):
        """More streams than a server should allow concurrently, none finished."""
        c = self.raw()
        fr = c.h2_handshake()
        for sid in range(1, 2 * 1000, 2):
            if not c.try_send(h2_frame(HEADERS, END_HEADERS, sid,
                                       t.grpc_request_headers("Encrypt"))):
                break
        c.frames(1)
        self.assertTrue(fr)
        self.assert_served()
        self.assertTrue(self.w.alive())

    # peers

    def test_uid_not_allowed(self):
        os.chmod(self.w.dir, 0o755)              # test only: let nobody reach the socket
        os.chmod(self.w.kms_sock, 0o666)
        try:
            res = t.call_as_uid(self.w.kms_sock, 65534)
        finally:
            os.chmod(self.w.kms_sock, 0o600)
            os.chmod(self.w.dir, 0o700)
        self.assertEqual(res["grpc"], "UNAVAILABLE", res)
        self.assertIs(res["connect"], True, res)
        # closed before any HTTP/2: no SETTINGS frame, just EOF or a reset
        self.assertIn(res["raw_reply"], ("", "error:ConnectionResetError"), res)
        self.assert_served()


if __name__ == "__main__":
    unittest.main()
