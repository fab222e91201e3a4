"""The SASL_SSL compose overlay (deploy/secure): its settings are ones the CLI knows, its secrets
are the files deploy/secure/make-certs writes (chmod 600), and the broker certificate it makes is
valid for host ``kafka`` under its CA. (``docker-compose config -q`` of the pair runs in .ci/run.)"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tgastream.core.kafka_security import PROTOCOLS
from tgastream.core.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / "deploy" / "secure" / "docker-compose.secure.yml"
MAKE_CERTS = ROOT / "deploy" / "secure" / "make-certs"


def test_the_overlay_puts_every_app_service_on_sasl_ssl_with_settings_the_cli_knows():
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    overlay = yaml.safe_load(OVERLAY.read_text())
    for name in ("worker", "trainer", "api"):
        env = {**base["services"][name].get("environment", {}), **overlay["services"][name]["environment"]}
        tg = {k[len("TGASTREAM_"):].lower(): v for k, v in env.items() if k.startswith("TGASTREAM_")}
        settings = load_settings(None, None, tg)  # unknown or invalid settings raise here
        assert settings.security_protocol == "SASL_SSL" and settings.bootstrap == "kafka:9094"
        assert settings.sasl_password_file.startswith("/run/secrets/") and not settings.sasl_password
        assert "kafka-password" in overlay["services"][name]["secrets"]
    kafka = overlay["services"]["kafka"]["environment"]
    assert "SECURE:SASL_SSL" in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    assert kafka["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512" and "SASL_SSL" in PROTOCOLS
    assert {s["file"].rsplit("/", 1)[1] for s in overlay["secrets"].values()} == {"kafka-password", "api-token"}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_make_certs_writes_private_secrets_and_a_broker_certificate_for_host_kafka(tmp_path):
    subprocess.run(["bash", str(MAKE_CERTS), str(tmp_path)], check=True, capture_output=True)
    for secret in ("broker.pem", "kafka-password", "api-token", "ca.key"):
        assert stat.S_IMODE((tmp_path / secret).stat().st_mode) == 0o600, secret
    assert len((tmp_path / "kafka-password").read_text().strip()) >= 32
    pem = (tmp_path / "broker.pem").read_text()
    assert "PRIVATE KEY" in pem and "CERTIFICATE" in pem  # Kafka's PEM keystore: key + chain
    (tmp_path / "cert.pem").write_text(pem[pem.index("-----BEGIN CERTIFICATE"):])
    ok = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), "-verify_hostname", "kafka",
                         str(tmp_path / "cert.pem")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (.ci/run installs it)")
def test_docker_compose_accepts_the_overlay(tmp_path):
    certs = ROOT / "deploy" / "secure" / "certs"
    if not (certs / "kafka-password").exists():
        subprocess.run(["bash", str(MAKE_CERTS)], check=True, capture_output=True)
    out = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "-f", str(OVERLAY.relative_to(ROOT)), "config", "-q"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
