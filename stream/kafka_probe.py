"""One connection to a broker, step by step, to say in one line which step fails.

Kafka clients retry a failed TLS handshake or SASL exchange until their bootstrap timeout and then
report "Unable to bootstrap" (kafka-python) or "KafkaConnectionError" (aiokafka), which does not
say whether the password, the CA, the mechanism or the protocol is wrong. :func:`probe` walks the
steps a client takes (TCP connect, TLS handshake, ApiVersions, SaslHandshake, SaslAuthenticate,
Metadata) over one socket, within a deadline, and names the first that fails. Commands call it
before they make their clients (:func:`stream.broker.connect_or_start`), ``tgastream doctor``
prints it.

The SCRAM exchange (RFC 5802 / RFC 7677, what Kafka's SCRAM-SHA-256/512 use) is written here
because the probe needs a client of its own; the test gateway uses the server half.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from tgastream.core.kafka_security import PLAINTEXT, KafkaSecurity, SecurityError, redact, ssl_context

API_VERSIONS, METADATA, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 3, 17, 36
UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, SASL_AUTHENTICATION_FAILED = 33, 34, 58
HASHES = {"SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-512": hashlib.sha512}


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of :func:`probe`: ``stage`` is the last step reached (connection, tls, protocol,
    authentication, metadata); ``message`` one line, with no secret in it."""

    ok: bool
    stage: str
    message: str


class _Failed(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage, self.message = stage, message


# --- SCRAM (RFC 5802) -----------------------------------------------------------------------------

def scram_salted_password(mechanism: str, password: str, salt: bytes, iterations: int) -> bytes:
    """SaltedPassword = Hi(password, salt, i) = PBKDF2-HMAC-H."""
    return hashlib.pbkdf2_hmac(HASHES[mechanism]().name, password.encode(), salt, iterations)


def _hmac(mechanism: str, key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, HASHES[mechanism]).digest()


def scram_keys(mechanism: str, salted: bytes) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey = H(ClientKey), ServerKey) of a salted password."""
    client_key = _hmac(mechanism, salted, b"Client Key")
    return client_key, HASHES[mechanism](client_key).digest(), _hmac(mechanism, salted, b"Server Key")


def parse_scram(message: bytes) -> dict[str, str]:
    """``a=1,b=2`` → ``{"a": "1", "b": "2"}`` (values may contain ``=``)."""
    out = {}
    for part in message.decode().split(","):
        key, _, value = part.partition("=")
        out[key] = value
    return out


class ScramClient:
    """The client side of one SCRAM exchange: :meth:`first`, :meth:`final`, :meth:`verify`."""

    def __init__(self, mechanism: str, username: str, password: str) -> None:
        self.mechanism, self.password = mechanism, password
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        user = username.replace("=", "=3D").replace(",", "=2C")
        self.first_bare = f"n={user},r={self.nonce}"
        self._server_signature = b""

    def first(self) -> bytes:
        return ("n,," + self.first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        fields = parse_scram(server_first)
        if not fields.get("r", "").startswith(self.nonce):
            raise _Failed("authentication", "the broker's SCRAM answer does not continue our nonce")
        salted = scram_salted_password(self.mechanism, self.password, base64.b64decode(fields["s"]), int(fields["i"]))
        client_key, stored_key, server_key = scram_keys(self.mechanism, salted)
        without_proof = f"c=biws,r={fields['r']}"
        auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = _hmac(self.mechanism, stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self._server_signature = _hmac(self.mechanism, server_key, auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> bool:
        fields = parse_scram(server_final)
        return "v" in fields and hmac.compare_digest(base64.b64decode(fields["v"]), self._server_signature)


# --- wire -------------------------------------------------------------------------------------

def _kstr(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">h", -1)
    b = text.encode()
    return struct.pack(">h", len(b)) + b


def _kbytes(data: bytes) -> bytes:
    return struct.pack(">i", len(data)) + data


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str | None:
        n = self.take(">h")
        if n < 0:
            return None
        s = self.data[self.pos:self.pos + n].decode(errors="replace")
        self.pos += n
        return s

    def bytes_(self) -> bytes:
        n = self.take(">i")
        if n < 0:
            return b""
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b


class _Conn:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.corr = sock, deadline, 0

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        return left

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            self.sock.settimeout(self._left())
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionResetError("closed")
            data += chunk
        return data

    def request(self, api_key: int, version: int, body: bytes) -> _Reader:
        self.corr += 1
        msg = struct.pack(">hhi", api_key, version, self.corr) + _kstr("tgastream-probe") + body
        self.sock.settimeout(self._left())
        self.sock.sendall(struct.pack(">i", len(msg)) + msg)
        head = self._recv_exact(4)
        if head[:2] == b"\x15\x03":  # a TLS alert record: the listener speaks TLS
            raise _Failed("tls", "the listener speaks TLS but the client does not: use security_protocol SSL or SASL_SSL")
        (size,) = struct.unpack(">i", head)
        if not 0 < size < 64 << 20:
            raise _Failed("protocol", "the listener's answer is not Kafka (wrong port, or it speaks TLS?)")
        reader = _Reader(self._recv_exact(size))
        if reader.take(">i") != self.corr:
            raise _Failed("protocol", "the broker answered out of order")
        return reader


def _tls_failure(exc: BaseException, sec: KafkaSecurity, host: str) -> _Failed:
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == 62 or "hostname" in (exc.verify_message or "").lower():
            return _Failed("tls", f"the broker's certificate does not name host {host} "
                                  "(fix the certificate, or ssl_check_hostname = false)")
        return _Failed("tls", f"the broker's certificate is not signed by a trusted CA ({exc.verify_message}); "
                              f"set ssl_cafile to the CA that signed it (now: {sec.cafile or 'the system CAs'})")
    text = str(exc)
    if "CERTIFICATE_REQUIRED" in text or "certificate required" in text.lower():
        return _Failed("tls", "the broker requires a client certificate: set ssl_certfile and ssl_keyfile")
    if "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text or "CERTIFICATE_UNKNOWN" in text:
        return _Failed("tls", "the broker refused our client certificate (ssl_certfile): "
                              "it is not signed by a CA the broker trusts")
    if isinstance(exc, (socket.timeout, TimeoutError)) or "WRONG_VERSION_NUMBER" in text or "record layer" in text \
            or isinstance(exc, (ConnectionResetError, ssl.SSLEOFError)) or "EOF" in text:
        return _Failed("tls", "the TLS handshake failed: the listener does not speak TLS "
                              f"(a PLAINTEXT or SASL_PLAINTEXT listener?) ({type(exc).__name__})")
    return _Failed("tls", f"the TLS handshake failed: {exc}")


def _authenticate(conn: _Conn, sec: KafkaSecurity, versions: dict[int, int]) -> None:
    if SASL_HANDSHAKE not in versions:
        raise _Failed("authentication", "the broker offers no SASL on this listener (no SaslHandshake): "
                                        "use security_protocol PLAINTEXT or SSL, or the broker's SASL listener")
    try:
        r = conn.request(SASL_HANDSHAKE, 1, _kstr(sec.mechanism))
    except (ConnectionResetError, BrokenPipeError):
        raise _Failed("authentication", f"the broker closed the connection on SASL mechanism {sec.mechanism}: "
                                        "it does not offer it") from None
    error = r.take(">h")
    offered = [r.string() for _ in range(max(0, r.take(">i")))]
    if error == UNSUPPORTED_SASL_MECHANISM:
        raise _Failed("authentication", f"the broker does not offer SASL mechanism {sec.mechanism}; "
                                        f"it offers: {', '.join(o for o in offered if o) or 'none'}")
    if error:
        raise _Failed("authentication", f"SaslHandshake failed with Kafka error {error}")

    def step(token: bytes) -> bytes:
        try:
            resp = conn.request(SASL_AUTHENTICATE, 0, _kbytes(token))
        except (ConnectionResetError, BrokenPipeError):
            raise _Failed("authentication", f"authentication as {sec.username!r} ({sec.mechanism}) failed: the broker "
                                            "closed the connection (wrong password or unknown user)") from None
        code, text = resp.take(">h"), resp.string()
        if code:
            raise _Failed("authentication", f"authentication as {sec.username!r} ({sec.mechanism}) failed: "
                                            f"wrong password or unknown user (broker: {redact(text or str(code), sec.secrets())})")
        return resp.bytes_()

    if sec.mechanism == "PLAIN":
        step(b"\0" + sec.username.encode() + b"\0" + sec.password.encode())
        return
    client = ScramClient(sec.mechanism, sec.username, sec.password)
    server_first = step(client.first())
    server_final = step(client.final(server_first))
    if not client.verify(server_final):
        raise _Failed("authentication", "the broker's SCRAM signature is wrong: it does not know this password "
                                        "(a man in the middle?)")


def speaks_tls(host: str, port: int, timeout_s: float) -> bool:
    """True when a TLS handshake (certificate not checked) succeeds at ``host:port``."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with ctx.wrap_socket(raw, server_hostname=host):
                return True
    except (OSError, ssl.SSLError):
        return False


def probe(bootstrap: str, sec: KafkaSecurity = PLAINTEXT, timeout_s: float = 10.0) -> ProbeResult:
    """Connect to the first HOST:PORT of ``bootstrap`` as a client with ``sec`` would, within
    ``timeout_s``; the result names the step that failed (or says all passed)."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    deadline = time.monotonic() + timeout_s
    stage = "connection"
    try:
        try:
            raw = socket.create_connection((host, int(port)), timeout=timeout_s)
        except OSError as exc:
            raise _Failed("connection", f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        sock: socket.socket = raw
        try:
            if sec.tls:
                stage = "tls"
                try:
                    ctx = ssl_context(sec)
                except SecurityError as exc:
                    raise _Failed("tls", str(exc)) from None
                try:
                    raw.settimeout(max(0.1, deadline - time.monotonic()))
                    sock = ctx.wrap_socket(raw, server_hostname=host)
                except (ssl.SSLError, OSError) as exc:
                    raise _tls_failure(exc, sec, host) from None
            conn = _Conn(sock, deadline)
            stage = "protocol"
            try:
                r = conn.request(API_VERSIONS, 0, b"")
            except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate shows on the first read
                raise _tls_failure(exc, sec, host) from None
            except (ConnectionResetError, BrokenPipeError):
                if not sec.tls and speaks_tls(host, int(port), max(0.5, deadline - time.monotonic())):
                    raise _Failed("tls", "the listener speaks TLS but the client does not: "
                                         "use security_protocol SSL or SASL_SSL") from None
                if sec.tls and not sec.sasl:  # Kafka answers ApiVersions before SASL: TLS refused us
                    cert = ("it may not accept our client certificate (ssl_certfile)" if sec.certfile else
                            "it probably requires a client certificate (ssl_certfile, ssl_keyfile)")
                    raise _Failed("tls", f"the broker closed the connection right after the TLS handshake: {cert}, "
                                         "or a SASL login (security_protocol SASL_SSL)") from None
                hint = ("it requires SASL authentication (security_protocol SASL_PLAINTEXT or SASL_SSL)"
                        if not sec.sasl else "it may expect another security_protocol"
                        + ("" if not sec.tls or sec.certfile else " or a client certificate (ssl_certfile, ssl_keyfile)"))
                raise _Failed("authentication" if not sec.sasl else "protocol",
                              f"the broker closed the connection before answering: {hint}") from None
            error = r.take(">h")
            versions = {}
            for _ in range(max(0, r.take(">i"))):
                key, _lo, hi = r.take(">h"), r.take(">h"), r.take(">h")
                versions[key] = hi
            if error:
                raise _Failed("protocol", f"ApiVersions failed with Kafka error {error}")
            if sec.sasl:
                stage = "authentication"
                _authenticate(conn, sec, versions)
            stage = "metadata"
            try:
                conn.request(METADATA, 1, struct.pack(">i", 0))
            except (ConnectionResetError, BrokenPipeError):
                what = "it requires SASL authentication" if not sec.sasl else "it refused the authenticated client"
                raise _Failed("authentication" if not sec.sasl else "metadata",
                              f"the broker closed the connection on a metadata request: {what}") from None
        finally:
            sock.close()
    except _Failed as f:
        return ProbeResult(False, f.stage, redact(f.message, sec.secrets()))
    except (socket.timeout, TimeoutError):
        return ProbeResult(False, stage, f"no answer at the {stage} step within {timeout_s:.0f}s"
                           + (" (a TLS listener? set security_protocol SSL or SASL_SSL)" if stage == "protocol" and not sec.tls else ""))
    except (ConnectionResetError, BrokenPipeError, OSError) as exc:
        return ProbeResult(False, stage, f"the connection failed at the {stage} step: {type(exc).__name__}")
    what = f"authenticated as {sec.username!r} ({sec.mechanism})" if sec.sasl else "no authentication"
    return ProbeResult(True, "metadata", f"{bootstrap} answers over {sec.protocol} ({what}{', TLS verified' if sec.tls else ''})")
