"""
The acceptor processes' pieces that run in memory: the log events on the
wire, the restart backoff (task.Clock), what the main process does with
an announced commit, the sessions gauge and status page, server.processes.
(The processes themselves: tests/test_e2e_acceptors.py.)
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import task
from twisted.logger import Logger, LogLevel, eventAsText
from twisted.python.failure import Failure

from mailhub.config import ConfigError, load_config
from mailhub.daemon.acceptor import event_to_wire
from mailhub.daemon.acceptors import MAX_BACKOFF, AcceptorPool, _Worker, event_from_wire, processes_for
from mailhub.daemon.anvil import Anvil
from mailhub.envelope import Envelope, Recipient
from mailhub.metrics import MailMetrics
from mailhub.web.statuspage import StatusPage


def captured(emit: Any) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    log = Logger(namespace="mailhub.smtp.server", observer=events.append)
    emit(log)
    return events[0]


def test_a_mail_event_crosses_whole() -> None:
    event = captured(lambda log: log.info(
        "{queue_id}: accepted from=<{sender}>", queue_id="ABC", sender="a@b", mail_event="accepted",
        commands={"ehlo": 1}, odd=object(),
    ))
    back = event_from_wire(event_to_wire(event), 4242)
    assert back is not None
    assert back["log_level"] is LogLevel.info
    assert back["mail_event"] == "accepted"
    assert back["commands"] == {"ehlo": 1}
    assert back["acceptor_pid"] == 4242
    assert eventAsText(back, includeTimestamp=False, includeSystem=False) == "ABC: accepted from=<a@b>"


def test_a_failure_crosses_as_its_traceback() -> None:
    try:
        raise ValueError("boom {not a field}")
    except ValueError:
        failure = Failure()
    event = captured(lambda log: log.failure("commit failed for {queue_id}", failure, queue_id="Q1"))
    back = event_from_wire(event_to_wire(event), 1)
    assert back is not None
    assert back["log_level"] is LogLevel.critical
    text = eventAsText(back, includeTimestamp=False, includeSystem=False)
    assert text.startswith("commit failed for Q1\n")
    assert "ValueError: boom {not a field}" in text


@pytest.mark.parametrize("line", [b"", b"not json", b"[1, 2]", b'"text"'])
def test_what_is_not_an_event_is_dropped(line: bytes) -> None:
    assert event_from_wire(line, 1) is None


class Pool(AcceptorPool):
    """An AcceptorPool whose processes are stand-ins, on a clock that is running."""

    def __init__(self, clock: task.Clock, **kw: Any) -> None:
        clock.callWhenRunning = lambda f, *a: f(*a)  # type: ignore[attr-defined]
        super().__init__(clock, 2, [], {}, Anvil(clock, lambda: (10, 10)), self.got.append, self.load, **kw)
        self.clock = clock
        self.spawned = 0

    got: list[Envelope] = []
    loaded: list[str] = []

    def load(self, queue_id: str) -> Envelope:
        self.loaded.append(queue_id)
        return envelope(queue_id)

    def spawn(self) -> _Worker:
        self.spawned += 1
        worker = _Worker(self, self.clock.seconds())
        worker.pid = 1000 + self.spawned
        self.workers.append(worker)
        return worker


class Ended:
    def __init__(self, sig: int | None = 9) -> None:
        self.value = type("E", (), {"signal": sig, "exitCode": None if sig else 1})()


def envelope(queue_id: str) -> Envelope:
    return Envelope(queue_id=queue_id, sender="a@example.org", recipients=[Recipient("b@example.org")], arrival=1.0)


def delays(clock: task.Clock) -> list[float]:
    return sorted(c.getTime() - clock.seconds() for c in clock.getDelayedCalls())


def test_an_acceptor_that_ends_is_restarted_with_backoff() -> None:
    clock = task.Clock()
    pool = Pool(clock)
    pool.startService()
    assert pool.spawned == 2
    expected = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    for delay in expected:
        worker = pool.workers[-1]  # the newest
        clock.advance(5)  # dies 5 s after its start
        worker.processEnded(Ended())
        assert delays(clock) == [delay]
        clock.advance(delay)
        assert len(pool.workers) == 2
    assert pool.restarts == len(expected)
    assert max(expected) == MAX_BACKOFF
    # one that ran long enough starts the backoff again from the shortest
    clock.advance(100)
    pool.workers[0].processEnded(Ended(sig=None))
    assert delays(clock) == [1.0]


def test_no_restart_while_stopping() -> None:
    clock = task.Clock()
    pool = Pool(clock)
    pool.startService()
    worker = pool.workers[0]
    worker.stopping = True
    worker.processEnded(Ended())
    assert clock.getDelayedCalls() == []
    assert len(pool.workers) == 1


def test_after_a_death_unannounced_commits_are_queued() -> None:
    clock = task.Clock()
    found = [envelope("15PEFAAAAAAAAAAAA")]
    pool = Pool(clock, recover=lambda: found)
    pool.got.clear()
    pool.startService()
    worker = pool.workers[0]
    worker.channel = object()  # type: ignore[assignment]
    worker.processEnded(Ended())
    assert pool.got == []  # not before everything it wrote on its channel was read
    worker.channel_lost.callback(None)
    assert [e.queue_id for e in pool.got] == ["15PEFAAAAAAAAAAAA"]


def test_queued_takes_the_envelope_sent_or_reads_the_spool() -> None:
    pool = Pool(task.Clock())
    pool.got.clear()
    pool.loaded.clear()
    pool.queued("15PEFBBBBBBBBBBBB", envelope("15PEFBBBBBBBBBBBB").to_json())
    pool.queued("15PEFCCCCCCCCCCCC", b"")
    assert [e.queue_id for e in pool.got] == ["15PEFBBBBBBBBBBBB", "15PEFCCCCCCCCCCCC"]
    assert pool.loaded == ["15PEFCCCCCCCCCCCC"]
    # an envelope announced under another id, or no envelope at all: nothing queued
    pool.queued("15PEFDDDDDDDDDDDD", envelope("15PEFBBBBBBBBBBBB").to_json())
    pool.queued("15PEFEEEEEEEEEEEE", b"{not json")
    assert len(pool.got) == 2


def test_sessions_per_process_in_metrics_and_status_page() -> None:
    clock = task.Clock()
    pool = Pool(clock)
    pool.startService()
    a, b = (w.pid for w in pool.workers)
    pool.anvil.admit(a, "smtp", "192.0.2.1")
    pool.anvil.admit(a, "smtp", "192.0.2.2")
    pool.anvil.admit(b, "submission", "192.0.2.1")
    metrics = MailMetrics(clock)
    metrics.sessions = pool.sessions
    text = metrics.exposition().decode()
    assert f'mailhub_smtp_sessions{{process="{a}"}} 2.0' in text
    assert f'mailhub_smtp_sessions{{process="{b}"}} 1.0' in text
    assert "mailhub_smtp_processes 2.0" in text
    page = StatusPage(metrics, "mx.example.org").render_html().decode()
    assert '<div class="num" id="smtp-sessions">3</div>' in page
    assert f"{a}: 2, {b}: 1" in page


def test_processes_for() -> None:
    assert processes_for(3) == 3
    assert processes_for("auto") >= 1


@pytest.mark.parametrize("value", ['"many"', "0", "65", "1.5", "true"])
def test_server_processes_values(tmp_path: Any, value: str) -> None:
    path = tmp_path / "mailhub.toml"
    path.write_text(f"[server]\nprocesses = {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert 'server.processes: must be "auto" or a number of processes, 1 to 64' in str(e.value)


def test_server_processes_default_and_number(tmp_path: Any) -> None:
    assert load_config(None).server.processes == "auto"
    path = tmp_path / "mailhub.toml"
    path.write_text("[server]\nprocesses = 4\n")
    assert load_config(str(path)).server.processes == 4


def test_make_service_with_acceptor_processes(tmp_path: Any, monkeypatch: Any) -> None:
    """processes = 2: the daemon binds the SMTP listeners and an AcceptorPool serves them."""
    import os

    from mailhub import tap

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILHUB_CONFIG", raising=False)
    conf = tmp_path / "m.toml"
    conf.write_text(
        '[server]\nprocesses = 2\nsmtp = ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.2"]\n'
        'max_connections_per_ip = 3\n'
    )
    options = tap.Options()
    options.parseOptions(["--config", str(conf), *(["--user=root"] if os.geteuid() == 0 else [])])
    top = tap.makeService(options)
    children = list(top)
    shared = [c for c in children if isinstance(c, tap._SharedListener)]
    assert [(c.kind, c.description) for c in shared] == [
        ("smtp", "tcp:0:interface=127.0.0.1"), ("smtp", "tcp:0:interface=127.0.0.2"),
    ]
    pools = [c for c in children if isinstance(c, AcceptorPool)]
    assert len(pools) == 1
    pool = pools[0]
    assert pool.count == 2 and pool.listeners == shared
    assert children.index(pool) > max(children.index(c) for c in shared)  # stops first: drains before the sockets close
    assert pool.settings == {"config": str(conf), "overrides": {"server.user": "root"} if os.geteuid() == 0 else {},
                             "data": None}
    assert pool.anvil.limits() == (100, 3)
    assert pool.enqueue == top.getServiceNamed("scheduler").enqueue
    # the sockets are bound, and this process reads nothing from them
    for listener in shared:
        listener.privilegedStartService()
        port = listener._waitingForPort.result
        assert port.fileno() >= 0
        assert port not in port.reactor.getReaders()
        port.stopListening()
