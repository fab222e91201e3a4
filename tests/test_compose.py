"""docker-compose.yml says what the code expects: each topic created once with its intended configs,
and every tgastream command and setting it names exists (checked against the real CLI parsers)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tgastream.core.settings import load_settings
from tgastream.stream.cli import build_parser
from tgastream.stream.topics import app_topics

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"
_VAR = re.compile(r"\$\{?(\w+)\}?")


def load_compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def _expand(text: str, variables: dict[str, str]) -> str:
    return _VAR.sub(lambda m: variables.get(m.group(1), m.group(0)), text)


def topic_creations(script: str) -> list[tuple[str, dict[str, str], str]]:
    """(topic, configs, partitions) of every ``kafka-topics.sh --create`` the shell script runs.

    Understands what such a script uses: ``NAME=value`` assignments, ``$NAME`` expansion and
    one-line ``for VAR in A B; do`` ... ``done`` loops (compose's ``$$`` is a literal ``$``)."""
    variables: dict[str, str] = {}
    loops: list[tuple[str, list[str], list[str]]] = []  # (var, values, body lines)
    commands: list[str] = []

    def emit(line: str) -> None:
        if loops:
            loops[-1][2].append(line)
        else:
            commands.append(line)

    for raw in script.replace("$$", "$").replace("\\\n", " ").splitlines():
        line = raw.strip()
        words = shlex.split(line, comments=True) if line else []
        if words[:1] == ["for"] and "in" in words:
            values = [w.rstrip(";") for w in words[words.index("in") + 1:] if w.rstrip(";") not in ("", "do")]
            loops.append((words[1], values, []))
        elif words[:1] == ["done"]:
            var, values, body = loops.pop()
            for value in values:
                for body_line in body:
                    emit(_expand(body_line, {var: value}))
        elif words:
            emit(line)
    created = []
    for line in commands:
        words = shlex.split(line, comments=True)
        if len(words) == 1 and re.fullmatch(r"\w+=.*", words[0]):
            name, _, value = words[0].partition("=")
            variables[name] = value
            continue
        words = shlex.split(_expand(line, variables), comments=True)
        if "--create" not in words:
            continue
        opts = _options(words)
        configs = dict(v.split("=", 1) for v in opts.get("--config", []))
        created.append((opts["--topic"][0], configs, opts.get("--partitions", ["?"])[0]))
    return created


def _options(words: list[str]) -> dict[str, list[str]]:
    opts: dict[str, list[str]] = {}
    for flag, value in zip(words, words[1:]):
        if flag.startswith("--") and not value.startswith("--"):
            opts.setdefault(flag, []).append(value)
    return opts


def _script(service: dict) -> str:
    command = service.get("command", "")
    return "\n".join(command) if isinstance(command, list) else command


def app_services(compose: dict) -> dict[str, dict]:
    """The services running the tgastream image (built here; entrypoint ``tgastream``)."""
    return {name: s for name, s in compose["services"].items()
            if "build" in s or str(s.get("image", "")).startswith("tgastream")}


def check_topics(compose: dict) -> list[str]:
    """Problems with the topics the compose file creates, as readable lines (empty = none)."""
    problems = []
    created = [c for s in compose["services"].values() for c in topic_creations(_script(s))]
    names = [t for t, _, _ in created]
    for topic in sorted({t for t in names if names.count(t) > 1}):
        problems.append(f"topic {topic} is created {names.count(topic)} times (a second --if-not-exists create "
                        f"is a no-op: its configs are ignored)")
    env = next(iter(app_services(compose).values())).get("environment", {})
    settings = load_settings(None, {k: str(v) for k, v in env.items()})
    wanted = app_topics(settings)
    for topic, configs, partitions in created:
        if topic not in wanted:
            problems.append(f"topic {topic} is not one the pipeline uses ({sorted(wanted)})")
        elif configs != wanted[topic]:
            problems.append(f"topic {topic} is created with configs {configs}, the pipeline expects {wanted[topic]}")
        if partitions != str(settings.partitions):
            problems.append(f"topic {topic} has {partitions} partitions, TGASTREAM_PARTITIONS is {settings.partitions}")
    problems += [f"topic {t} is never created" for t in wanted if t not in names]
    return problems


def check_commands(compose: dict) -> list[str]:
    """Problems with the tgastream commands and TGASTREAM_* settings of the app services."""
    parser, _ = build_parser()
    problems = []
    for name, service in app_services(compose).items():
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        command = service.get("command", [])
        argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            problems.append(f"service {name}: `tgastream {' '.join(argv)}` is not a valid tgastream command line")
            continue
        flags = {k[len("setting_"):]: v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}
        try:  # what the command does first: environment, then its setting flags, validated
            load_settings(None, env, flags)
        except ValueError as exc:
            problems.append(f"service {name}: `tgastream {' '.join(argv)}`: {exc}")
    return problems


def test_every_topic_is_created_once_with_the_configs_the_pipeline_expects():
    assert check_topics(load_compose()) == []


def test_every_app_service_runs_a_command_line_the_cli_accepts():
    compose = load_compose()
    assert {"worker", "trainer", "api"} <= set(app_services(compose))
    assert check_commands(compose) == []


BROKEN_TOPICS = """
services:
  app: {build: ., environment: {TGASTREAM_PARTITIONS: "8"}, command: [worker]}
  topics:
    command:
      - |
        t=/opt/kafka/bin/kafka-topics.sh
        for topic in behavior-events behavior-events-dlq training-samples; do
          $$t --bootstrap-server kafka:9092 --create --if-not-exists --topic $$topic --partitions 8
        done
        $$t --bootstrap-server kafka:9092 --create --if-not-exists --topic training-samples --partitions 8 \\
          --config compression.type=lz4
        for topic in embeddings user-features; do
          $$t --bootstrap-server kafka:9092 --create --topic $$topic --partitions 4 --config cleanup.policy=delete
        done
"""


def test_a_topic_created_twice_or_with_other_configs_is_caught(tmp_path: Path):
    path = tmp_path / "compose.yml"
    path.write_text(BROKEN_TOPICS)
    problems = check_topics(load_compose(path))
    assert any("training-samples is created 2 times" in p for p in problems), problems
    assert any("training-samples is created with configs {}" in p for p in problems), problems
    assert any("embeddings is created with configs {'cleanup.policy': 'delete'}" in p for p in problems), problems
    assert any("user-features has 4 partitions" in p for p in problems), problems


@pytest.mark.parametrize("command,env,fragment", [
    (["serve", "--api-hots", "0.0.0.0"], {}, "is not a valid tgastream command line"),
    (["train", "--batch-size", "many"], {}, "batch_size must be int, got 'many'"),
    (["serve", "--bogus"], {}, "is not a valid tgastream command line"),
    (["nosuchcommand"], {}, "is not a valid tgastream command line"),
    (["worker"], {"TGASTREAM_KERNEL_DIR": "/cache"}, "unknown setting 'kernel_dir' in environment"),
])
def test_a_flag_command_or_setting_the_cli_does_not_have_is_caught(command, env, fragment):
    compose = {"services": {"app": {"build": ".", "command": command, "environment": env}}}
    problems = check_commands(compose)
    assert len(problems) == 1 and fragment in problems[0], problems
