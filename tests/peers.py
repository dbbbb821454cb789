"""
Helpers for end-to-end tests that talk to real peers on 127.0.0.1: a free
port, bounded polling for a subprocess, and Postfix's smtp-sink as a
receiving MTA.  A helper module, not a test file: tests import from it.

Owns: starting, probing and stopping peer processes and reading what they
received.  Must not touch: mailhub itself (tests/daemon.py runs the daemon).
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time
from collections.abc import Callable

from conftest import require_tool

__all__ = ["free_port", "wait_for", "wait_listening", "Sink", "sink_message"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll C{predicate} until it is true; bounded, for real subprocesses."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_listening(port: int, proc: subprocess.Popen, what: str = "smtp-sink", timeout: float = 10) -> None:
    """Wait until C{proc} accepts connections on 127.0.0.1:C{port}; fail if it exits first."""

    def up() -> bool:
        assert proc.poll() is None, f"{what} exited: {proc.stderr.read() if proc.stderr else ''!r}"
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return False

    wait_for(up, timeout, f"{what} to listen")


class Sink:
    """smtp-sink on 127.0.0.1:port, one dump file per transaction in C{dump}."""

    def __init__(self, dump, port: int, *args: str) -> None:
        tool = require_tool("smtp-sink")
        self.dump = dump
        self.port = port
        dump.mkdir(exist_ok=True)
        # -u is required when running as root; staying the same user keeps
        # tmp_path (mode 0700) writable for the dumps.
        user = ["-u", pwd.getpwuid(os.getuid()).pw_name]
        self.proc = subprocess.Popen(
            [tool, *user, "-h", "sink.test", "-d", f"{dump}/%M.", *args, f"127.0.0.1:{port}", "10"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        wait_listening(port, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self.proc.stderr.close()

    def dumps(self) -> list[bytes]:
        return [(self.dump / n).read_bytes() for n in sorted(os.listdir(self.dump))]


def sink_message(dump: bytes) -> tuple[dict, bytes]:
    """(smtp-sink's X- headers, the message as received, LF line ends)."""
    lines = dump.split(b"\n")
    i = next(n for n, line in enumerate(lines) if line.startswith(b"Received: from"))
    headers: dict = {}
    for line in lines[:i]:
        k, _, v = line.decode().partition(": ")
        headers.setdefault(k, []).append(v)
    return headers, b"\n".join(lines[i + 3 :])  # after smtp-sink's own 3-line Received
