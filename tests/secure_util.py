"""A secured broker for the tests: Tansu (PLAINTEXT, loopback) behind tests/secure_gateway.py
(SASL + TLS), certificates made with ``openssl`` in a temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tgastream.stream.broker import free_port, port_open, tansu_binary

ROOT = Path(__file__).resolve().parents[1]


def make_certificates(folder: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """A CA, a server certificate for ``host`` (and localhost) signed by it, and an unrelated CA
    (for the unknown-CA test), written as PEM files (keys chmod 600)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the TLS tests need the openssl command (apt-get install openssl)")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*cmd: str) -> None:
        subprocess.run(["openssl", *cmd], check=True, capture_output=True, cwd=folder)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
            "-days", "2", "-subj", f"/CN=tgastream test {ca}")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={host}")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=tgastream")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "client.pem", "-days", "2")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "stranger.key", "-out", "stranger.csr", "-subj", "/CN=stranger")
    run("x509", "-req", "-in", "stranger.csr", "-CA", "other-ca.pem", "-CAkey", "other-ca.key", "-CAcreateserial",
        "-out", "stranger.pem", "-days", "2")
    (folder / "ext.cnf").write_text(f"subjectAltName=IP:{host},DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return {"ca": folder / "ca.pem", "other_ca": folder / "other-ca.pem",
            "cert": folder / "server.pem", "key": folder / "server.key",
            "client_cert": folder / "client.pem", "client_key": folder / "client.key",
            "stranger_cert": folder / "stranger.pem", "stranger_key": folder / "stranger.key"}


@dataclass
class SecuredBroker:
    """Tansu on a hidden port, advertised as the gateway's port; the gateway requires SASL (and
    TLS with ``tls=True``). ``bootstrap`` is the gateway; ``inner`` the unsecured Tansu port."""

    folder: Path
    users: dict[str, str]
    tls: bool = True
    mechanisms: str = "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
    mutual_tls: bool = False  # require client certificates signed by the test CA
    port: int = 0
    inner: int = 0
    certs: dict[str, Path] = field(default_factory=dict)
    _procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "SecuredBroker":
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certs = make_certificates(self.folder / "certs")
        self.port, self.inner = free_port(), free_port()
        users = self.folder / "users.json"
        users.write_text(json.dumps(self.users))
        gw = [sys.executable, "-m", "tests.secure_gateway", "--port", str(self.port),
              "--upstream", f"127.0.0.1:{self.inner}", "--users", str(users), "--mechanisms", self.mechanisms]
        if self.tls:
            gw += ["--cert", str(self.certs["cert"]), "--key", str(self.certs["key"])]
            if self.mutual_tls:
                gw += ["--client-ca", str(self.certs["ca"])]
        self._procs.append(subprocess.Popen(gw, cwd=ROOT, stdout=open(self.folder / "gateway.log", "wb"),
                                            stderr=subprocess.STDOUT, start_new_session=True))
        url, advertised = f"tcp://127.0.0.1:{self.inner}", f"tcp://127.0.0.1:{self.port}"
        self._procs.append(subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
             "--storage-engine", "memory://tansu/"],
            stdout=open(self.folder / "tansu.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 30
        while not (port_open(self.bootstrap, 0.2) and port_open(f"127.0.0.1:{self.inner}", 0.2)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self._procs):
                self.stop()
                raise RuntimeError(f"secured broker did not start: {(self.folder / 'gateway.log').read_text()[-2000:]}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
        self._procs.clear()

    def __enter__(self) -> "SecuredBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
