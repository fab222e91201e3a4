"""A secured Kafka listener for the tests: SASL (PLAIN, SCRAM-SHA-256/512) and TLS in front of Tansu.

Measured (docs/security.md): Tansu 0.6.0 started with ``--authentication`` authenticates nobody
(every SaslAuthenticate ends in ``Auth(Sasl(NoSharedMechanism))``, PLAIN is not even offered, and
``tansu user create`` is itself refused since it cannot authenticate; users made before cannot
survive a restart, storage being memory only), and ``--cert``/``--key`` cannot be given together
and do not make the listener speak TLS. So the secured end-to-end tests put this gateway in
front of a PLAINTEXT Tansu whose advertised listener is the gateway: clients bootstrap, fetch
metadata and find coordinators through it, each connection must first complete the Kafka SASL
exchange (SaslHandshake + SaslAuthenticate, RFC 5802 SCRAM with server signature, or PLAIN)
over TLS when a certificate is given; until then any other request closes the connection (as
Kafka does) and nothing is forwarded, so a refused client never reaches a topic. After success
the bytes are piped unchanged. Clients are the project's real ones (kafka-python, aiokafka,
faust) with the arguments built by ``core/kafka_security.py``.

Run: ``python -m tests.secure_gateway --port P --upstream 127.0.0.1:A --users users.json
[--cert C --key K] [--mechanisms SCRAM-SHA-512,PLAIN]``; users.json maps user → password.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import struct
import sys
from pathlib import Path

from tgastream.stream.kafka_probe import (SASL_AUTHENTICATE, SASL_AUTHENTICATION_FAILED, SASL_HANDSHAKE,
                                          UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, parse_scram,
                                          scram_keys, scram_salted_password, _hmac, HASHES)

API_VERSIONS = 18
ITERATIONS = 4096


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _enc_uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class Session:
    """SASL state of one client connection."""

    def __init__(self, users: dict[str, str], mechanisms: list[str]) -> None:
        self.users, self.mechanisms = users, mechanisms
        self.mechanism: str | None = None
        self.scram: dict | None = None
        self.authenticated = False
        self.failed = False

    def handshake(self, mechanism: str) -> int:
        if mechanism not in self.mechanisms:
            return UNSUPPORTED_SASL_MECHANISM
        self.mechanism = mechanism
        return 0

    def authenticate(self, token: bytes) -> tuple[int, str | None, bytes]:
        """One SaslAuthenticate step → (error code, error message, auth bytes)."""
        if self.mechanism is None:
            self.failed = True
            return ILLEGAL_SASL_STATE, "SaslAuthenticate before SaslHandshake", b""
        if self.mechanism == "PLAIN":
            parts = token.split(b"\0")
            if len(parts) == 3 and self.users.get(parts[1].decode(errors="replace")) == parts[2].decode(errors="replace"):
                self.authenticated = True
                return 0, None, b""
            return self._fail()
        if self.scram is None:
            text = token.decode(errors="replace")
            gs2, _, bare = text.partition(",,") if text.startswith(("n,", "y,")) else ("", "", "")
            fields = parse_scram(bare.encode()) if bare else {}
            user = fields.get("n", "").replace("=2C", ",").replace("=3D", "=")
            if user not in self.users or "r" not in fields:
                return self._fail()
            salt = os.urandom(16)
            salted = scram_salted_password(self.mechanism, self.users[user], salt, ITERATIONS)
            nonce = fields["r"] + base64.b64encode(os.urandom(18)).decode()
            server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i={ITERATIONS}"
            self.scram = dict(bare=bare, server_first=server_first, salted=salted, nonce=nonce)
            return 0, None, server_first.encode()
        fields = parse_scram(token)
        if fields.get("r") != self.scram["nonce"] or "p" not in fields:
            return self._fail()
        without_proof = token.decode().rsplit(",p=", 1)[0]
        auth_message = f"{self.scram['bare']},{self.scram['server_first']},{without_proof}".encode()
        _, stored_key, server_key = scram_keys(self.mechanism, self.scram["salted"])
        signature = _hmac(self.mechanism, stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(fields["p"]), signature))
        if HASHES[self.mechanism](client_key).digest() != stored_key:
            return self._fail()
        self.authenticated = True
        return 0, None, f"v={base64.b64encode(_hmac(self.mechanism, server_key, auth_message)).decode()}".encode()

    def _fail(self) -> tuple[int, str, bytes]:
        self.failed = True
        return (SASL_AUTHENTICATION_FAILED,
                f"Authentication failed during authentication due to invalid credentials with SASL mechanism {self.mechanism}",
                b"")


def handshake_response(corr: int, error: int, mechanisms: list[str]) -> bytes:
    body = struct.pack(">ih", corr, error) + struct.pack(">i", len(mechanisms))
    for m in mechanisms:
        body += struct.pack(">h", len(m)) + m.encode()
    return body


def authenticate_response(corr: int, version: int, error: int, message: str | None, auth: bytes) -> bytes:
    if version >= 2:  # flexible: response header v1 (tagged fields), compact strings/bytes
        msg = b"\x00" if message is None else _enc_uvarint(len(message.encode()) + 1) + message.encode()
        return (struct.pack(">i", corr) + b"\x00" + struct.pack(">h", error) + msg
                + _enc_uvarint(len(auth) + 1) + auth + struct.pack(">q", 0) + b"\x00")
    msg = struct.pack(">h", -1) if message is None else struct.pack(">h", len(message.encode())) + message.encode()
    body = struct.pack(">ih", corr, error) + msg + struct.pack(">i", len(auth)) + auth
    if version >= 1:
        body += struct.pack(">q", 0)
    return body


def authenticate_token(payload: bytes, version: int) -> bytes:
    """The auth bytes of a SaslAuthenticate request body (after the header)."""
    if version >= 2:
        # header v2: client_id (int16 nullable string) then tagged fields
        (n,) = struct.unpack_from(">h", payload, 8)
        pos = 10 + max(n, 0)
        tags, pos = _uvarint(payload, pos)
        for _ in range(tags):
            _tag, pos = _uvarint(payload, pos)
            size, pos = _uvarint(payload, pos)
            pos += size
        length, pos = _uvarint(payload, pos)
        return payload[pos:pos + length - 1]
    (n,) = struct.unpack_from(">h", payload, 8)
    pos = 10 + max(n, 0)
    (length,) = struct.unpack_from(">i", payload, pos)
    return payload[pos + 4:pos + 4 + length]


def handshake_mechanism(payload: bytes) -> str:
    (n,) = struct.unpack_from(">h", payload, 8)
    pos = 10 + max(n, 0)
    (length,) = struct.unpack_from(">h", payload, pos)
    return payload[pos + 2:pos + 2 + length].decode(errors="replace")


class Gateway:
    def __init__(self, upstream: tuple[str, int], users: dict[str, str], mechanisms: list[str]) -> None:
        self.upstream, self.users, self.mechanisms = upstream, users, mechanisms
        self.refused = 0
        self.accepted = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_writer = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            session = Session(self.users, self.mechanisms)
            while not session.authenticated:
                head = await reader.readexactly(4)
                (size,) = struct.unpack(">i", head)
                payload = await reader.readexactly(size)
                api_key, version, corr = struct.unpack_from(">hhi", payload, 0)
                if api_key == API_VERSIONS:  # allowed before authentication, answered by the broker
                    up_writer.write(head + payload)
                    await up_writer.drain()
                    (rsize,) = struct.unpack(">i", await up_reader.readexactly(4))
                    answer = await up_reader.readexactly(rsize)
                    writer.write(struct.pack(">i", rsize) + answer)
                elif api_key == SASL_HANDSHAKE:
                    error = session.handshake(handshake_mechanism(payload))
                    body = handshake_response(corr, error, self.mechanisms)
                    writer.write(struct.pack(">i", len(body)) + body)
                elif api_key == SASL_AUTHENTICATE:
                    error, message, auth = session.authenticate(authenticate_token(payload, version))
                    body = authenticate_response(corr, version, error, message, auth)
                    writer.write(struct.pack(">i", len(body)) + body)
                else:  # anything else before authentication: close, forward nothing
                    session.failed = True
                await writer.drain()
                if session.failed:
                    self.refused += 1
                    return
            self.accepted += 1
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()


async def serve(port: int, gateway: Gateway, ssl_ctx: ssl.SSLContext | None) -> None:
    server = await asyncio.start_server(gateway.handle, "127.0.0.1", port, ssl=ssl_ctx)
    print(f"gateway listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--users", required=True, help="JSON file: user → password")
    p.add_argument("--mechanisms", default="PLAIN,SCRAM-SHA-256,SCRAM-SHA-512")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--client-ca", help="require client certificates signed by this CA (mutual TLS)")
    args = p.parse_args(argv)
    host, _, up_port = args.upstream.rpartition(":")
    users = json.loads(Path(args.users).read_text())
    ctx = None
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        if args.client_ca:
            ctx.load_verify_locations(args.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    gateway = Gateway((host, int(up_port)), users, args.mechanisms.split(","))
    try:
        asyncio.run(serve(args.port, gateway, ctx))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
