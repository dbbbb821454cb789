"""
The recorder in memory: a C{task.Clock} for its batches and a synchronous
C{run} for its writer thread.  Events are batched (by time and by count),
a failing database never raises into the emitter, is logged once and
counted, the batch waits (bounded) and is written when the database is
back; stopping writes what waits; pruning runs on its own schedule.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.logger import LogPublisher, globalLogPublisher

from mailhub.history import query
from mailhub.history.recorder import HistoryCollector, Recorder
from mailhub.history.store import SQLiteStore


class FlakyStore:
    """A store whose writes fail while C{broken} (the real one otherwise)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.broken = False
        self.batches: list[int] = []
        self.resets = 0
        self.pruned: list[tuple[float, float, int]] = []

    def write(self, rows: Any) -> None:
        if self.broken:
            raise OSError(28, "No space left on device")
        self.batches.append(len(rows))
        self.real.write(rows)

    def reset(self) -> None:
        self.resets += 1

    def prune(self, now: float, retention: float, max_size: int) -> int:
        self.pruned.append((now, retention, max_size))
        return 0

    def close(self) -> None:
        self.real.close()


def sync(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


def event(i: int, kind: str = "accepted") -> dict[str, Any]:
    return {"mail_event": kind, "queue_id": f"Q{i}", "from": "a@x.test", "rcpts": ["b@y.test"], "log_time": 1e9 + i}


def make(tmp_path, **kw: Any) -> tuple[Recorder, FlakyStore, task.Clock, LogPublisher]:
    clock = task.Clock()
    store = FlakyStore(SQLiteStore(str(tmp_path / "history.sqlite")))
    publisher = LogPublisher()
    recorder = Recorder(store, clock, publisher, run=sync, interval=1.0, **kw)  # type: ignore[arg-type]
    recorder.startService()
    return recorder, store, clock, publisher


def logged(into: list[dict[str, Any]]) -> Any:
    def observer(e: dict[str, Any]) -> None:
        if "history" in str(e.get("log_format", "")):
            into.append(e)

    globalLogPublisher.addObserver(observer)
    return observer


def test_events_are_written_in_batches_every_interval(tmp_path):
    recorder, store, clock, publisher = make(tmp_path)
    for i in range(3):
        publisher(event(i))
    publisher({"log_format": "not a mail event"})
    assert store.batches == [] and recorder.pending == 3  # nothing written on the emitter's call
    clock.advance(1)
    assert store.batches == [3] and recorder.recorded == 3 and recorder.pending == 0
    assert len(query.list_messages(store.real, query.Filters())[0]) == 3


def test_a_full_batch_is_written_at_once(tmp_path):
    recorder, store, clock, publisher = make(tmp_path, batch=10)
    for i in range(25):
        publisher(event(i))
    clock.advance(0)
    assert store.batches == [10, 10]
    clock.advance(1)
    assert store.batches == [10, 10, 5]


def test_a_failing_database_is_logged_once_counted_and_recording_resumes(tmp_path):
    seen: list[dict[str, Any]] = []
    observer = logged(seen)
    try:
        recorder, store, clock, publisher = make(tmp_path)
        store.broken = True
        publisher(event(1))
        clock.advance(1)
        publisher(event(2))
        clock.advance(1)
        assert recorder.write_failures == 2 and recorder.pending == 2 and store.resets == 2  # reopened each time
        errors = [e for e in seen if "cannot record" in e["log_format"]]
        assert len(errors) == 1 and "No space left on device" in str(errors[0]["error"])
        store.broken = False
        clock.advance(1)
        assert recorder.pending == 0 and recorder.recorded == 2
        assert [m["queue_id"] for m in query.list_messages(store.real, query.Filters())[0]] == ["Q2", "Q1"]
        assert any("recording again" in e["log_format"] for e in seen)
    finally:
        globalLogPublisher.removeObserver(observer)


def test_at_most_max_pending_events_wait_and_the_oldest_are_dropped(tmp_path):
    recorder, store, clock, publisher = make(tmp_path, max_pending=5, batch=100)
    store.broken = True
    for i in range(8):
        publisher(event(i))
    clock.advance(1)
    assert recorder.pending == 5 and recorder.dropped == 3
    store.broken = False
    clock.advance(1)
    assert sorted(m["queue_id"] for m in query.list_messages(store.real, query.Filters())[0]) == [
        "Q3", "Q4", "Q5", "Q6", "Q7"]


def test_stopping_writes_what_waits_and_stops_observing(tmp_path):
    recorder, store, clock, publisher = make(tmp_path)
    publisher(event(1))
    d = recorder.stopService()
    assert d.called and store.batches == [1]
    publisher(event(2))
    assert recorder.pending == 0


def test_pruning_runs_at_start_and_every_prune_interval(tmp_path):
    recorder, store, clock, publisher = make(tmp_path, retention=86400.0, max_size=1000, prune_interval=600.0)
    assert store.pruned == [(0.0, 86400.0, 1000)]
    clock.advance(600)
    assert store.pruned[-1] == (600.0, 86400.0, 1000) and len(store.pruned) == 2


def test_the_counters_on_metrics(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    recorder, store, clock, publisher = make(tmp_path)
    registry = CollectorRegistry()
    registry.register(HistoryCollector(recorder))
    publisher(event(1))
    text = generate_latest(registry).decode()
    assert "mailhub_history_events_pending 1.0" in text
    clock.advance(1)
    text = generate_latest(registry).decode()
    assert "mailhub_history_events_recorded_total 1.0" in text and "mailhub_history_events_pending 0.0" in text
