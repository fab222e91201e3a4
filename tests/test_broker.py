"""The embedded broker: starts, answers, and never outlives its owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tgastream.stream.broker import BrokerError, EmbeddedBroker, answers_metadata, connect_or_start, free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split()[2] != "Z"


def test_session_broker_answers_metadata(broker):
    assert answers_metadata(broker.bootstrap)


def test_stop_leaves_no_process():
    with EmbeddedBroker() as b:
        pid = b.pid
        assert _alive(pid) and answers_metadata(b.bootstrap)
    assert not _alive(pid)


def test_broker_dies_with_owner_on_exception_and_sigterm(tmp_path):
    pidfile = tmp_path / "pid"
    script = textwrap.dedent(f"""
        import sys, time
        from tgastream.stream.broker import EmbeddedBroker, install_sigterm_handler
        install_sigterm_handler()
        with EmbeddedBroker() as b:
            open({str(pidfile)!r}, "w").write(str(b.pid))
            if sys.argv[1] == "raise":
                raise RuntimeError("test failed")
            time.sleep(60)
    """)
    for mode in ("raise", "sigterm"):
        pidfile.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", script, mode], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline and proc.poll() is None or mode == "raise"
            time.sleep(0.1)
        broker_pid = int(pidfile.read_text())
        if mode == "sigterm":
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        time.sleep(0.2)
        assert not _alive(broker_pid), mode


def test_explicit_unreachable_bootstrap_is_a_one_line_error():
    port = free_port()
    with pytest.raises(BrokerError, match=f"no Kafka broker answers at 127.0.0.1:{port}"):
        connect_or_start(f"127.0.0.1:{port}")


def test_connect_or_start_uses_an_existing_broker(broker):
    handle = connect_or_start(broker.bootstrap)
    assert handle.embedded is None and handle.bootstrap == broker.bootstrap


def test_port_in_use_is_reported(broker):
    with pytest.raises(BrokerError, match="already in use"):
        EmbeddedBroker(port=broker.port).start()
