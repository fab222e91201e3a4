"""The pipeline against a Kafka listener that requires SASL over TLS, and the clients it refuses.

Tansu 0.6.0 authenticates nobody and has no TLS listener (measured; docs/security.md), so the
listener is tests/secure_gateway.py in front of a PLAINTEXT Tansu that advertises the gateway:
every client of the project (kafka-python, aiokafka, faust) must complete TLS (certificate checked
against a CA made here) and SCRAM-SHA-512 before any other request is answered or forwarded.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tgastream.core.events import load_events
from tgastream.core.kafka_security import KafkaSecurity, kafka_python_args
from tgastream.core.settings import Settings
from tgastream.state.serving import ServingStore, VectorRecord
from tgastream.stream.broker import die_with_parent, free_port, tansu_binary
from tgastream.stream.kafka_probe import probe
from tgastream.stream.synth import SynthConfig, write_file
from tgastream.stream.topics import ensure_app_topics
from tests.kafka_util import read_topic
from tests.secure_util import ROOT, SecuredBroker
from tests.trainer_util import start_trainer, stats
from tests.worker_util import start_worker, wait_until

USER = "tga-svc"
PASSWORD = "pw-" + secrets.token_hex(12)  # random per run: a grep for it finds only leaks
TOKEN = "tok-" + secrets.token_hex(12)


def _private(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secured")
    with SecuredBroker(folder, {USER: PASSWORD}, tls=True) as b:
        b.password_file = _private(folder / "sasl-password", PASSWORD)
        b.token_file = _private(folder / "api-token", TOKEN)
        yield b


def _flags(b: SecuredBroker, password_file: Path | None = None, cafile: Path | None = None,
           protocol: str = "SASL_SSL") -> list[str]:
    flags = ["--bootstrap", b.bootstrap, "--security-protocol", protocol]
    if protocol.startswith("SASL"):
        flags += ["--sasl-mechanism", "SCRAM-SHA-512", "--sasl-username", USER,
                  "--sasl-password-file", str(password_file or b.password_file)]
    if protocol.endswith("SSL"):
        flags += ["--ssl-cafile", str(cafile or b.certs["ca"])]
    return flags


def _settings(b: SecuredBroker, tmp_path: Path) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(bootstrap=b.bootstrap, partitions=2, data_dir=tmp_path / "worker",
                    events_topic=f"events-{tag}", dlq_topic=f"dlq-{tag}", samples_topic=f"samples-{tag}",
                    embeddings_topic=f"embeddings-{tag}", features_topic=f"features-{tag}",
                    security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username=USER,
                    sasl_password_file=str(b.password_file), ssl_cafile=str(b.certs["ca"]))


def _topic_flags(s: Settings) -> list[str]:
    """The topics of ``tgastream replay``."""
    return ["--partitions", str(s.partitions), "--events-topic", s.events_topic, "--dlq-topic", s.dlq_topic]


def _cli(*args: str, log: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "tgastream.stream.cli", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    return out


def _https(base: str, path: str, ca: Path, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(base + path, verify=ssl.create_default_context(cafile=str(ca)), headers=headers, timeout=5)


def test_replay_worker_trainer_and_api_run_end_to_end_over_sasl_ssl_and_leak_no_secret(secured, tmp_path):
    settings = _settings(secured, tmp_path)
    log = tmp_path / "events.csv"
    write_file(SynthConfig(users=30, events=3000, items=80, categories=8, seed=5), log)
    events = load_events(log)
    ensure_app_topics(settings.bootstrap, settings)
    logs = tmp_path / "logs"
    logs.mkdir()

    worker = start_worker(settings, logs / "worker.log", *_flags(secured))
    try:
        worker.wait_up()
        replay = _cli("replay", str(log), *_flags(secured), *_topic_flags(settings), "--watermark", "--quiet",
                      "--json", str(logs / "replay.json"), log=logs / "replay.log")
        assert replay.returncode == 0, replay.stderr
        assert json.loads((logs / "replay.json").read_text())["sent"] == len(events)
        wait_until(lambda: worker.total("tgastream_events_applied_total") >= len(events), 180, "worker applied all", worker)
        emitted = int(worker.total("tgastream_samples_emitted_total"))
        (logs / "worker-metrics.txt").write_text(json.dumps(worker.metrics()))
    finally:
        assert worker.stop() == 0, worker.log()
    sec = settings.kafka_security
    samples = read_topic(settings.bootstrap, settings.samples_topic, expected=emitted, security=sec)
    assert len(samples) == emitted > 0

    data = tmp_path / "trainer"
    trainer = start_trainer(settings, data, logs / "trainer.log", "--batch-size", "128", "--idle-exit", "4",
                            *_flags(secured))
    assert trainer.wait(600) == 0, (logs / "trainer.log").read_text()[-3000:]
    st = stats(data)
    assert st["samples"] == len(samples) and st["trained"] == len(samples)  # every sample trained

    published = read_topic(settings.bootstrap, settings.embeddings_topic, idle_s=1.0, security=sec)
    latest = {r.key.decode(): VectorRecord.from_bytes(r.value) for r in published if r.key.startswith((b"user:", b"item:"))}
    users = {k.split(":", 1)[1] for k in latest if k.startswith("user:")}
    items = {k.split(":", 1)[1] for k in latest if k.startswith("item:")}
    assert users and items

    port = free_port()
    api_dir = tmp_path / "api"
    serve_log = open(logs / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tgastream.stream.cli", "serve", *_flags(secured), "--partitions", "2",
         "--embeddings-topic", settings.embeddings_topic, "--data-dir", str(api_dir), "--api-port", str(port),
         "--checkpoint-dir", str(data / "checkpoints"), "--device", "cpu", "--api-token-file", str(secured.token_file),
         "--api-ssl-certfile", str(secured.certs["cert"]), "--api-ssl-keyfile", str(secured.certs["key"])],
        cwd=ROOT, stdout=serve_log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=die_with_parent)
    serve_log.close()
    base, ca = f"https://127.0.0.1:{port}", secured.certs["ca"]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = _https(base, "/healthz", ca).json()
                if health["source"]["caught_up"] and health["source"]["records"] >= len(latest):
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (logs / "serve.log").read_text()[-3000:]
            time.sleep(0.2)
        for user in sorted(users):  # every user vector served, as last published
            r = _https(base, f"/v1/users/{user}/embedding", ca)
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == latest[f"user:{user}"].model_version
            assert r.json()["vector"] == pytest.approx(latest[f"user:{user}"].vector.tolist(), abs=1e-5)
        assert _https(base, f"/v1/users/{next(iter(users))}/embedding", ca, token=None).status_code == 401
        assert _https(base, f"/v1/users/{next(iter(users))}/embedding", ca, token="not-it").status_code == 401
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3)  # only HTTPS
    finally:
        proc.terminate()
        proc.wait(20)
    served_items, _ = ServingStore(api_dir / "api-serving").item_matrix()
    assert items <= set(served_items)  # every item vector in the replica's index store

    # no secret in any output of the run: logs, summaries, the trainer's files, the metrics scrape
    outputs = [p for p in [*logs.rglob("*"), *data.rglob("*.json"), *data.rglob("*.jsonl")] if p.is_file()]
    assert len(outputs) >= 6
    for path in outputs:
        text = path.read_text(errors="replace")
        assert PASSWORD not in text and TOKEN not in text, f"a secret leaked into {path}"
    assert "SASL_SSL" in (logs / "trainer.log").read_text()  # the settings dump shows the protocol ...
    assert "sasl_password_file" in (logs / "trainer.log").read_text()  # ... and where the password is, not it


def _producer_refused(b: SecuredBroker, sec: KafkaSecurity, topic: str) -> None:
    """A kafka-python producer with ``sec`` (bypassing the commands' probe) gets nothing through."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        producer = KafkaProducer(**kafka_python_args(b.bootstrap, sec, max_block_ms=3000, request_timeout_ms=3000,
                                                          bootstrap_timeout_ms=3000))
    except KafkaError:
        return
    try:
        with pytest.raises(KafkaError):
            producer.send(topic, b"must-not-arrive").get(5)
    finally:
        producer.close(timeout=1)


def test_no_credentials_or_a_wrong_password_is_refused_in_one_line_and_nothing_reaches_a_topic(secured, tmp_path):
    settings = _settings(secured, tmp_path)
    ensure_app_topics(settings.bootstrap, settings)
    log = tmp_path / "events.csv"
    write_file(SynthConfig(users=5, events=200, seed=2), log)
    wrong = _private(tmp_path / "wrong-password", "pw-" + secrets.token_hex(12))

    t0 = time.monotonic()
    none = _cli("replay", str(log), "--bootstrap", secured.bootstrap, *_topic_flags(settings), "--quiet")
    assert none.returncode == 1 and none.stderr.count("\n") == 1, none.stderr
    assert "the listener speaks TLS" in none.stderr  # a PLAINTEXT client on the SASL_SSL listener
    no_sasl = _cli("replay", str(log), *_flags(secured, protocol="SSL"), *_topic_flags(settings), "--quiet")
    assert no_sasl.returncode == 1 and no_sasl.stderr.count("\n") == 1, no_sasl.stderr
    assert "requires SASL authentication" in no_sasl.stderr
    bad = _cli("replay", str(log), *_flags(secured, password_file=wrong), *_topic_flags(settings), "--quiet")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert f"authentication as '{USER}' (SCRAM-SHA-512) failed: wrong password or unknown user" in bad.stderr
    assert wrong.read_text().strip() not in bad.stderr + bad.stdout
    assert time.monotonic() - t0 < 60  # three refusals, each within seconds, not minutes of retries

    ca = str(secured.certs["ca"])
    for sec in (KafkaSecurity(), KafkaSecurity("SSL", cafile=ca),
                KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", USER, wrong.read_text().strip(), cafile=ca),
                KafkaSecurity("SASL_SSL", "PLAIN", USER, wrong.read_text().strip(), cafile=ca)):
        _producer_refused(secured, sec, settings.events_topic)
    for topic in (settings.events_topic, settings.dlq_topic):
        assert read_topic(settings.bootstrap, topic, idle_s=1.0, timeout_s=10, security=settings.kafka_security) == []


def test_each_misconfiguration_is_named_by_the_probe_within_its_deadline(secured, tmp_path):
    ca, other = str(secured.certs["ca"]), str(secured.certs["other_ca"])
    cases = [
        (KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", USER, PASSWORD, cafile=ca), True, "metadata", "authenticated"),
        (KafkaSecurity("SASL_SSL", "SCRAM-SHA-256", USER, PASSWORD, cafile=ca), True, "metadata", "authenticated"),
        (KafkaSecurity("SASL_SSL", "PLAIN", USER, PASSWORD, cafile=ca), True, "metadata", "authenticated"),
        (KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", USER, PASSWORD + "x", cafile=ca), False, "authentication", "wrong password"),
        (KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", "nobody", PASSWORD, cafile=ca), False, "authentication", "unknown user"),
        (KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", USER, PASSWORD, cafile=other), False, "tls", "not signed by a trusted CA"),
        (KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", USER, PASSWORD), False, "tls", "speaks TLS"),
        (KafkaSecurity(), False, "tls", "speaks TLS"),
    ]
    for sec, ok, stage, says in cases:
        t0 = time.monotonic()
        result = probe(secured.bootstrap, sec, timeout_s=5.0)
        assert time.monotonic() - t0 < 6.0
        assert (result.ok, result.stage) == (ok, stage) and says in result.message, (sec.describe(), result)
        assert PASSWORD not in result.message

    with SecuredBroker(tmp_path / "scram-only", {USER: PASSWORD}, tls=False, mechanisms="SCRAM-SHA-512") as plain:
        result = probe(plain.bootstrap, KafkaSecurity("SASL_PLAINTEXT", "PLAIN", USER, PASSWORD))
        assert (result.ok, result.stage) == (False, "authentication")
        assert "does not offer SASL mechanism PLAIN; it offers: SCRAM-SHA-512" in result.message
        result = probe(plain.bootstrap, KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", USER, PASSWORD, cafile=ca))
        assert (result.ok, result.stage) == (False, "tls") and "does not speak TLS" in result.message
        assert probe(plain.bootstrap, KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", USER, PASSWORD)).ok


def test_a_worker_with_a_wrong_password_exits_in_one_line_within_stop_timeout(secured, tmp_path):
    wrong = _private(tmp_path / "wrong-password", "pw-" + secrets.token_hex(12))
    t0 = time.monotonic()
    out = _cli("worker", *_flags(secured, password_file=wrong), "--data-dir", str(tmp_path / "w"),
               "--stop-timeout-s", "4", "--quiet")
    assert time.monotonic() - t0 < 4 + 15  # the probe's deadline plus interpreter start on a busy machine
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and last.startswith("tgastream worker: error: Kafka at"), out.stderr
    assert "authentication failed" in last and wrong.read_text().strip() not in out.stderr + out.stdout


def test_doctor_says_which_part_of_the_connection_fails(secured, tmp_path):
    good = _cli("doctor", *_flags(secured), "--require-broker")
    assert good.returncode == 0, good.stdout
    assert f"authenticated as '{USER}' (SCRAM-SHA-512), TLS verified" in good.stdout
    wrong = _private(tmp_path / "wrong-password", "pw-" + secrets.token_hex(12))
    bad = _cli("doctor", *_flags(secured, password_file=wrong), "--require-broker")
    assert bad.returncode == 1 and "authentication failed: authentication as" in bad.stdout, bad.stdout
    ca = _cli("doctor", *_flags(secured, cafile=secured.certs["other_ca"]), "--require-broker")
    assert ca.returncode == 1 and "tls failed: the broker's certificate is not signed by a trusted CA" in ca.stdout
    loose = tmp_path / "loose"
    loose.write_text(PASSWORD)
    loose.chmod(0o644)
    perm = _cli("doctor", *_flags(secured, password_file=loose), "--require-broker")
    assert perm.returncode == 1 and "chmod 600" in perm.stdout
    for out in (good, bad, ca, perm):
        assert PASSWORD not in out.stdout + out.stderr and wrong.read_text().strip() not in out.stdout + out.stderr


def test_tansu_with_authentication_authenticates_nobody(tmp_path):
    """The measurement docs/security.md reports (Tansu 0.6.0): with --authentication every client
    is refused, whatever the mechanism, and no user can be created. Fails when a Tansu release
    starts to authenticate: then the secured tests can drop the gateway."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/", "--authentication"],
                            stdout=open(tmp_path / "tansu.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while probe(f"127.0.0.1:{port}", KafkaSecurity(), 1.0).stage == "connection":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        created = subprocess.run([tansu_binary(), "user", "create", "--broker", url, USER, PASSWORD],
                                 capture_output=True, text=True, timeout=20)
        assert created.returncode != 0  # the user tool cannot authenticate either
        assert not probe(f"127.0.0.1:{port}", KafkaSecurity()).ok
        for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            result = probe(f"127.0.0.1:{port}", KafkaSecurity("SASL_PLAINTEXT", mechanism, USER, PASSWORD), 5.0)
            assert (result.ok, result.stage) == (False, "authentication"), result
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)


def test_the_demo_runs_over_sasl_ssl_with_the_password_from_the_environment_and_reports_no_secret(secured, tmp_path):
    out = tmp_path / "demo"
    flags = [f for f in _flags(secured) if f not in ("--sasl-password-file", str(secured.password_file))]
    run = subprocess.run(
        [sys.executable, "-m", "tgastream.stream.cli", "demo", "--out", str(out), "--events", "1500", "--users", "40",
         "--batch-size", "128", "--timeout", "400", "--partitions", "2", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TGASTREAM_SASL_PASSWORD": PASSWORD})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["events_replayed"] == 1500 and report["train_steps"] > 0
    assert "sasl_password = ***" in run.stdout
    files = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".log", ".jsonl", ".txt", ".csv")]
    assert any(p.suffix == ".log" for p in files) and (out / "report.json") in files
    for text in [run.stdout, run.stderr, *(p.read_text(errors="replace") for p in files)]:
        assert PASSWORD not in text


def test_mutual_tls_client_certificates_from_the_settings(tmp_path):
    """SSL with client certificates (no SASL): kafka-python and the probe present ssl_certfile/
    ssl_keyfile; without one, or with one from another CA, the failure is named."""
    from kafka import KafkaAdminClient

    with SecuredBroker(tmp_path / "mtls", {}, tls=True, mutual_tls=True, mechanisms="SCRAM-SHA-512") as b:
        c = b.certs
        good = KafkaSecurity("SSL", cafile=str(c["ca"]), certfile=str(c["client_cert"]), keyfile=str(c["client_key"]))
        assert probe(b.bootstrap, good, 5.0).stage == "authentication"  # TLS passed; the gateway still wants SASL
        none = probe(b.bootstrap, KafkaSecurity("SSL", cafile=str(c["ca"])), 5.0)
        assert (none.ok, none.stage) == (False, "tls") and "requires a client certificate" in none.message, none
        stranger = probe(b.bootstrap, KafkaSecurity("SSL", cafile=str(c["ca"]), certfile=str(c["stranger_cert"]),
                                                    keyfile=str(c["stranger_key"])), 5.0)
        assert (stranger.ok, stranger.stage) == (False, "tls") and "client certificate" in stranger.message, stranger
    with SecuredBroker(tmp_path / "mtls-sasl", {USER: PASSWORD}, tls=True, mutual_tls=True) as b:
        c = b.certs
        sec = KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", USER, PASSWORD, cafile=str(c["ca"]),
                            certfile=str(c["client_cert"]), keyfile=str(c["client_key"]))
        assert probe(b.bootstrap, sec, 5.0).ok
        admin = KafkaAdminClient(**kafka_python_args(b.bootstrap, sec, request_timeout_ms=5000))
        try:
            assert isinstance(admin.list_topics(), list)
        finally:
            admin.close()
