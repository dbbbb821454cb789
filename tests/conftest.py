"""
Shared test fixtures.

C{reactor}: the global Twisted reactor running in a background thread for
end-to-end tests on real sockets.  Test code runs in the main thread and
talks to the reactor only through L{in_reactor} (blockingCallFromThread), so
servers are started and stopped inside the reactor thread while blocking
clients (smtplib, imaplib, subprocesses) run in the test thread.
Unit tests never use it: they use Clock / StringTransport / MemoryReactor.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet import threads
from twisted.logger import formatEvent, globalLogPublisher

# daemon_user: the throwaway system user of the end-to-end tests run as root
pytest_plugins = ["accounts", "usersfile"]


@pytest.fixture(scope="session")
def reactor():
    from twisted.internet import reactor as _reactor

    thread = threading.Thread(
        target=_reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
    )
    thread.start()
    yield _reactor
    _reactor.callFromThread(_reactor.stop)
    thread.join(10)


@pytest.fixture(scope="session", autouse=True)
def _no_daemon_outlives_the_run():
    """Daemons started by tests/daemon.py are killed when the session ends, even after a failed test."""
    yield
    daemon = sys.modules.get("daemon")
    if daemon is not None:
        daemon.kill_leftovers()


@pytest.fixture
def events():
    """Every log event emitted during the test, as twisted.logger dicts."""
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest.fixture
def logged(events):
    """Formatted text of every log event emitted during the test (call it)."""
    return lambda: [formatEvent(e) for e in events]


def in_reactor(reactor: Any, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run C{f} in the reactor thread and wait for its (possibly Deferred) result."""
    return threads.blockingCallFromThread(reactor, f, *args, **kwargs)


def require_tool(name: str) -> str:
    """
    Path of an external tool a test needs.  Skips where it is missing,
    except under CI (CI=true), where .ci/run installs it and a missing tool
    is a failure, so no test silently stops testing.
    """
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required under CI (.ci/run installs it)")
        pytest.skip(f"{name} not installed")
    return path


def pytest_terminal_summary(terminalreporter: Any, config: Any) -> None:
    """Name the test order at the end of every run (pytest-randomly shuffles it), also under -q."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"test order: -p randomly --randomly-seed={seed}")
