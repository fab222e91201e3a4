"""Kafka TLS/SASL settings, the one client-arguments builder per library, secrets kept secret
(no broker needed; tests/test_secure_cluster.py runs them against a secured listener)."""

from __future__ import annotations

import io
import logging
import re
import ssl
import sys
from pathlib import Path

import pytest

from tgastream.core.kafka_security import (PLAINTEXT, KafkaSecurity, SecurityError, aiokafka_args, check_secret_file,
                                           faust_args, install_log_redaction, kafka_python_args, read_secret_file,
                                           redact, server_ssl_context, ssl_context)
from tgastream.core.settings import Settings, SettingsError, load_settings
from tgastream.stream.cli import KAFKA_SECURITY_SETTINGS, add_setting_flags, build_parser, main
from tests.secure_util import make_certificates

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("core", "state", "model", "stream", "bench")
CLIENTS = re.compile(r"\b(KafkaProducer|KafkaConsumer|KafkaAdminClient|AIOKafkaProducer|AIOKafkaConsumer|"
                     r"AIOKafkaAdminClient|faust\.App|WorkerApp|SimpleClient|KafkaClient)\(")
BUILDERS = ("kafka_python_args(", "aiokafka_args(", "faust_args(")


def _call_text(source: str, start: int) -> str:
    """The text of the call whose opening parenthesis is at ``start`` (to the matching one)."""
    depth = 0
    for i in range(start, len(source)):
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        if depth == 0:
            return source[start:i + 1]
    return source[start:]


def _wrapper_builders(sources: dict[Path, str]) -> set[str]:
    """Functions of the project whose body calls a builder (faust_config, make_producer, ...)."""
    names = set()
    for text in sources.values():
        for m in re.finditer(r"^def (\w+)\(.*?(?=^def |\Z)", text, re.S | re.M):
            if any(b in m.group(0) for b in BUILDERS):
                names.add(m.group(1) + "(")
    return names


def test_every_kafka_client_of_the_project_is_made_with_the_security_builder():
    """Walk the source: every place a Kafka client is made gets its arguments from
    kafka_python_args / aiokafka_args / faust_args (directly, through a ``**name`` built by one, or
    through a project function that calls one), so none can silently talk PLAINTEXT."""
    sources = {p: p.read_text() for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")}
    wrappers = _wrapper_builders(sources) | set(BUILDERS)
    found, bad = 0, []
    for path, text in sources.items():
        for m in CLIENTS.finditer(text):
            line_start = text.rfind("\n", 0, m.start()) + 1
            line = text[line_start:text.find("\n", m.start())]
            if line.lstrip().startswith(("class ", "#", "def ")) or "isinstance(" in line or '"' in line[:m.start() - line_start]:
                continue
            call = _call_text(text, m.end() - 1)
            found += 1
            if any(w in call for w in wrappers):
                continue
            spread = re.findall(r"\*\*(self\.)?(\w+)", call)
            if spread and all(re.search(rf"\b{name}\b[^=\n]*=\s*(\w+_args|{'|'.join(w[:-1] for w in wrappers)})\(", text)
                              for _, name in spread):
                continue
            bad.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {line.strip()}")
    assert found >= 10, f"the walk found only {found} client constructions: the pattern is broken"
    assert not bad, "Kafka clients made without core/kafka_security.py:\n" + "\n".join(bad)


def test_the_walk_catches_a_client_made_without_the_builder(tmp_path):
    text = "def f(b):\n    return KafkaConsumer(bootstrap_servers=b, group_id=None)\n"
    m = CLIENTS.search(text)
    call = _call_text(text, m.end() - 1)
    assert not any(w in call for w in BUILDERS)


def _sec(**kw) -> KafkaSecurity:
    return KafkaSecurity(**{"protocol": "SASL_SSL", "mechanism": "SCRAM-SHA-512", "username": "svc",
                            "password": "pa55-W0rd-x", **kw})


def test_kafka_python_args_per_protocol(tmp_path):
    certs = make_certificates(tmp_path)
    plain = kafka_python_args("h:1", PLAINTEXT, acks="all")
    assert plain == {"bootstrap_servers": "h:1", "security_protocol": "PLAINTEXT", "acks": "all"}
    sasl = kafka_python_args("h:1", _sec(protocol="SASL_PLAINTEXT"))
    assert sasl["security_protocol"] == "SASL_PLAINTEXT" and "ssl_context" not in sasl
    assert (sasl["sasl_mechanism"], sasl["sasl_plain_username"], sasl["sasl_plain_password"]) == ("SCRAM-SHA-512", "svc", "pa55-W0rd-x")
    tls = kafka_python_args("h:1", _sec(cafile=str(certs["ca"]), check_hostname=False))
    assert tls["security_protocol"] == "SASL_SSL" and isinstance(tls["ssl_context"], ssl.SSLContext)
    assert tls["ssl_context"].check_hostname is False and tls["ssl_check_hostname"] is False
    ssl_only = kafka_python_args("h:1", KafkaSecurity(protocol="SSL", cafile=str(certs["ca"])))
    assert "sasl_mechanism" not in ssl_only and ssl_only["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def test_aiokafka_and_faust_args_carry_the_same_security(tmp_path):
    import faust

    certs = make_certificates(tmp_path)
    sec = _sec(mechanism="SCRAM-SHA-256", cafile=str(certs["ca"]))
    a = aiokafka_args("h:1,h:2", sec, client_id="x")
    assert a["security_protocol"] == "SASL_SSL" and a["sasl_mechanism"] == "SCRAM-SHA-256"
    assert a["sasl_plain_password"] == "pa55-W0rd-x" and isinstance(a["ssl_context"], ssl.SSLContext)
    f = faust_args("h:1,h:2", sec)
    assert f["broker"] == ["kafka://h:1", "kafka://h:2"]
    cred = f["broker_credentials"]
    assert isinstance(cred, faust.SASLCredentials) and cred.mechanism.value == "SCRAM-SHA-256"
    assert cred.protocol.value == "SASL_SSL" and cred.username == "svc"
    assert isinstance(faust_args("h:1", KafkaSecurity(protocol="SSL"))["broker_credentials"], faust.SSLCredentials)
    assert "broker_credentials" not in faust_args("h:1", PLAINTEXT)
    # what faust hands to aiokafka
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    auth = credentials_to_aiokafka_auth(cred)
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_plain_password"] == "pa55-W0rd-x"


def test_settings_from_toml_env_and_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[tgastream]\nsecurity_protocol = "SASL_SSL"\nsasl_username = "svc"\nssl_check_hostname = false\n')
    pw = tmp_path / "pw"
    pw.write_text("from-a-file\n")
    pw.chmod(0o600)
    s = load_settings(cfg, {"TGASTREAM_SASL_MECHANISM": "SCRAM-SHA-256"}, {"sasl_password_file": str(pw)})
    sec = s.kafka_security
    assert (sec.protocol, sec.mechanism, sec.username, sec.password, sec.check_hostname) == \
        ("SASL_SSL", "SCRAM-SHA-256", "svc", "from-a-file", False)
    env = load_settings(None, {"TGASTREAM_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "TGASTREAM_SASL_USERNAME": "u",
                               "TGASTREAM_SASL_PASSWORD": "env-secret-1"})
    assert env.kafka_security.password == "env-secret-1"


@pytest.mark.parametrize("values, says", [
    ({"security_protocol": "TLS"}, "security_protocol must be one of"),
    ({"sasl_mechanism": "GSSAPI"}, "sasl_mechanism must be one of"),
    ({"sasl_password": "a", "sasl_password_file": "/x"}, "not both"),
    ({"api_token": "a", "api_token_file": "/x"}, "not both"),
    ({"api_ssl_certfile": "/c"}, "go together"),
])
def test_bad_security_settings_are_one_line(values, says):
    with pytest.raises(SettingsError, match=says) as err:
        load_settings(None, None, values)
    assert "\n" not in str(err.value)


def test_sasl_without_a_password_is_refused_in_one_line():
    s = load_settings(None, None, {"security_protocol": "SASL_SSL", "sasl_username": "svc"})
    with pytest.raises(SettingsError, match="needs sasl_username and a password"):
        s.kafka_security


def test_a_secret_file_readable_by_group_or_others_is_refused_like_ssh(tmp_path):
    f = tmp_path / "pw"
    f.write_text("s3cr3t-value\n")
    for mode in (0o644, 0o640, 0o604, 0o660):
        f.chmod(mode)
        with pytest.raises(SecurityError, match=r"accessible by group or others .*chmod 600") as err:
            read_secret_file(f, "sasl_password")
        assert "\n" not in str(err.value) and "s3cr3t" not in str(err.value)
    f.chmod(0o600)
    assert read_secret_file(f, "sasl_password") == "s3cr3t-value"
    f.chmod(0o400)
    assert check_secret_file(f, "x") == f
    with pytest.raises(SecurityError, match="does not exist"):
        read_secret_file(tmp_path / "none", "sasl_password")


def test_the_cli_refuses_a_world_readable_password_file_in_one_line(tmp_path, capsys):
    f = tmp_path / "pw"
    f.write_text("not-to-be-seen-9\n")
    f.chmod(0o644)
    (tmp_path / "x.csv").write_text("1,2,3,pv,1511658000\n")
    code = main(["replay", str(tmp_path / "x.csv"), "--bootstrap", "127.0.0.1:1", "--security-protocol", "SASL_SSL",
                 "--sasl-username", "u", "--sasl-password-file", str(f)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "chmod 600" in err and "not-to-be-seen" not in err


def test_the_password_has_no_command_line_flag_on_any_command():
    parser, _ = build_parser()
    text = []
    for action in parser._subparsers._group_actions:  # every subcommand's own parser
        for name, sub in action.choices.items():
            text.append(sub.format_help())
            if name == "bench":
                for sub_action in sub._subparsers._group_actions:
                    text.extend(p.format_help() for p in sub_action.choices.values())
    joined = "\n".join(text)
    assert "--sasl-password-file" in joined
    assert "--sasl-password " not in joined and "--sasl-password\n" not in joined and "--api-token " not in joined
    import argparse

    with pytest.raises(ValueError, match="secret"):
        add_setting_flags(argparse.ArgumentParser(), "sasl_password")


def test_every_kafka_command_has_the_security_flags():
    parser, _ = build_parser()
    subs = {name: sub for a in parser._subparsers._group_actions for name, sub in a.choices.items()}
    bench = {name: sub for a in subs["bench"]._subparsers._group_actions for name, sub in a.choices.items()}
    for name, sub in [*[(n, subs[n]) for n in ("worker", "train", "serve", "replay", "doctor", "demo")],
                      ("bench stream", bench["stream"]), ("bench freshness", bench["freshness"])]:
        helptext = sub.format_help()
        for setting in KAFKA_SECURITY_SETTINGS:
            assert f"--{setting.replace('_', '-')}" in helptext, (name, setting)


def test_secrets_never_appear_in_the_settings_dump_or_repr(tmp_path):
    s = Settings(security_protocol="SASL_SSL", sasl_username="svc", sasl_password="dump-secret-77", api_token="tok-secret-88")
    text = s.describe() + repr(s.kafka_security) + s.kafka_security.describe()
    assert "dump-secret-77" not in text and "tok-secret-88" not in text
    assert "sasl_password = ***" in s.describe() and "api_token = ***" in s.describe()
    assert set(s.secrets()) == {"dump-secret-77", "tok-secret-88"}


def test_log_redaction_hides_secrets_in_messages_args_and_tracebacks():
    install_log_redaction(["redact-me-123"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("tgastream.test-redaction")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("config %s", {"sasl_plain_password": "redact-me-123"})
        log.warning("plain redact-me-123 text")
        try:
            raise RuntimeError("auth failed for password redact-me-123")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert "redact-me-123" not in out and out.count("***") >= 3 and "RuntimeError" in out
    assert redact("a redact-me-123 b", ["redact-me-123"]) == "a *** b"


def test_tls_contexts_check_the_ca_and_load_the_server_key(tmp_path):
    certs = make_certificates(tmp_path)
    ctx = ssl_context(KafkaSecurity(protocol="SSL", cafile=str(certs["ca"])))
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ssl_context(PLAINTEXT) is None
    with pytest.raises(SecurityError, match="cannot be loaded"):
        ssl_context(KafkaSecurity(protocol="SSL", cafile=str(certs["key"])))
    server = server_ssl_context(str(certs["cert"]), str(certs["key"]))
    assert isinstance(server, ssl.SSLContext)
    certs["key"].chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        server_ssl_context(str(certs["cert"]), str(certs["key"]))
    assert server_ssl_context("", "") is None


def test_api_token_from_a_private_file(tmp_path):
    f = tmp_path / "token"
    f.write_text("tok-from-file\n")
    f.chmod(0o600)
    assert Settings(api_token_file=str(f)).resolved_api_token() == "tok-from-file"
    f.chmod(0o644)
    with pytest.raises(SettingsError, match="chmod 600"):
        Settings(api_token_file=str(f)).resolved_api_token()


def test_an_uncaught_exception_is_printed_with_its_secrets_masked():
    import subprocess

    code = ("from tgastream.core.kafka_security import install_log_redaction as i; i(['zz-uncaught-zz']); "
            "raise RuntimeError('failed with zz-uncaught-zz')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "RuntimeError: failed with ***" in r.stderr and "zz-uncaught-zz" not in r.stderr


def test_a_config_file_holding_a_secret_must_be_private(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('security_protocol = "SASL_SSL"\nsasl_username = "u"\nsasl_password = "in-the-toml-5"\n')
    cfg.chmod(0o644)
    with pytest.raises(SettingsError, match="holds sasl_password and is accessible by group or others") as err:
        load_settings(cfg)
    assert "in-the-toml-5" not in str(err.value)
    cfg.chmod(0o600)
    assert load_settings(cfg).kafka_security.password == "in-the-toml-5"
    open_cfg = tmp_path / "open.toml"
    open_cfg.write_text('partitions = 8\n')
    open_cfg.chmod(0o644)
    assert load_settings(open_cfg).partitions == 8  # no secret in it: any mode
