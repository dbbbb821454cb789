"""
The history store: three tables, the SQL both databases share, and SQLite.

Owns: the schema (L{schema}), writing a batch of event rows in one
transaction (L{Store.write}: the C{events} rows, and what they change in
C{messages} and C{recipients}), pruning by age and size (L{Store.prune}),
the SQLite store (L{SQLiteStore}: WAL, a busy timeout so several
processes may write, incremental vacuum) and L{open_store}, which picks
SQLite or PostgreSQL from C{history.database}.

Tables::

    events      one row per mail event (kind, time, queue id, client,
                sender, recipient and its domain, status, code, reason,
                the reply text, the log line, the other fields as JSON)
    messages    one row per message: arrival, sender, client, user,
                size, its state (rows.MESSAGE_STATUSES), when it ended and
                its latency; a refused transaction is a message too
                (status "rejected", id from rows.rejection_id)
    recipients  one row per recipient of a message: its last outcome

Every method here blocks: the recorder calls them in its own thread, the
HTTP API and the status page through C{deferToThread}, the CLI directly.
SQL is written with C{?} placeholders; a dialect turns them into its own.

Must not touch: the reactor, mail events (L{mailhub.history.recorder}
observes them), the spool.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from mailhub.history.rows import EventRow, recipient_domain, rejection_id

__all__ = ["Store", "SQLiteStore", "open_store", "schema", "StoreError"]


class StoreError(Exception):
    """The history database cannot be opened or used (one line, for the CLI and the log)."""


def schema(float_type: str, id_type: str) -> list[str]:
    """
    The statements creating the tables and indexes (idempotent).  Searches
    by sender, recipient, domain, client and status go to C{messages} and
    C{recipients}; C{events} is read by queue id (a story) and by kind and
    time (statistics), so it has only those indexes: each one more costs
    every insert.
    """
    return [
        f"""CREATE TABLE IF NOT EXISTS events (
            id {id_type}, time {float_type} NOT NULL, kind TEXT NOT NULL, queue_id TEXT,
            client TEXT NOT NULL DEFAULT '', sender TEXT, recipient TEXT NOT NULL DEFAULT '',
            domain TEXT NOT NULL DEFAULT '', status TEXT NOT NULL DEFAULT '', code INTEGER,
            enhanced TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '',
            detail TEXT NOT NULL DEFAULT '', line TEXT NOT NULL DEFAULT '', data TEXT NOT NULL DEFAULT '{{}}',
            node TEXT NOT NULL DEFAULT '')""",
        f"""CREATE TABLE IF NOT EXISTS messages (
            queue_id TEXT PRIMARY KEY, time {float_type} NOT NULL, updated {float_type} NOT NULL,
            sender TEXT, client TEXT NOT NULL DEFAULT '', username TEXT NOT NULL DEFAULT '',
            proto TEXT NOT NULL DEFAULT '', size INTEGER, nrcpt INTEGER, status TEXT NOT NULL,
            held INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '',
            finished {float_type}, latency {float_type}, bounce_of TEXT NOT NULL DEFAULT '',
            node TEXT NOT NULL DEFAULT '')""",
        f"""CREATE TABLE IF NOT EXISTS recipients (
            queue_id TEXT NOT NULL, address TEXT NOT NULL, domain TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL, time {float_type} NOT NULL, code INTEGER,
            enhanced TEXT NOT NULL DEFAULT '', relay TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0,
            detail TEXT NOT NULL DEFAULT '', original TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (queue_id, address))""",
        "CREATE INDEX IF NOT EXISTS events_time ON events (time)",
        "CREATE INDEX IF NOT EXISTS events_queue_id ON events (queue_id)",
        "CREATE INDEX IF NOT EXISTS events_kind_time ON events (kind, time)",
        "CREATE INDEX IF NOT EXISTS messages_time ON messages (time, queue_id)",
        "CREATE INDEX IF NOT EXISTS messages_updated ON messages (updated)",
        "CREATE INDEX IF NOT EXISTS messages_sender ON messages (LOWER(sender))",
        "CREATE INDEX IF NOT EXISTS messages_client ON messages (client)",
        "CREATE INDEX IF NOT EXISTS messages_status ON messages (status, time)",
        "CREATE INDEX IF NOT EXISTS messages_finished ON messages (finished)",
        "CREATE INDEX IF NOT EXISTS recipients_address ON recipients (LOWER(address))",
        "CREATE INDEX IF NOT EXISTS recipients_domain ON recipients (domain)",
    ]


#: (the statement before its VALUES rows, columns per row, what follows the rows)
_INSERT_EVENT = (
    "INSERT INTO events (time, kind, queue_id, client, sender, recipient, domain, status, code, enhanced,"
    " reason, detail, line, data, node) VALUES", 15, "",
)
_NEW_MESSAGE = (
    "INSERT INTO messages (queue_id, time, updated, sender, client, username, proto, size, nrcpt, status,"
    " reason, detail, bounce_of, node) VALUES", 14, " ON CONFLICT (queue_id) DO NOTHING",
)
_ACCEPTED = (
    "INSERT INTO messages (queue_id, time, updated, sender, client, username, proto, size, nrcpt, status, node)"
    " VALUES", 11,
    " ON CONFLICT (queue_id) DO UPDATE SET time = excluded.time, sender = excluded.sender,"
    " client = excluded.client, username = excluded.username, proto = excluded.proto, size = excluded.size,"
    " nrcpt = excluded.nrcpt, node = excluded.node",
)
_QUEUED_RECIPIENT = (
    "INSERT INTO recipients (queue_id, address, domain, status, time, original) VALUES", 6,
    " ON CONFLICT (queue_id, address) DO NOTHING",
)
_RECIPIENT = (
    "INSERT INTO recipients (queue_id, address, domain, status, time, code, enhanced, relay, attempts, detail,"
    " original) VALUES", 11,
    " ON CONFLICT (queue_id, address) DO UPDATE SET status = excluded.status, time = excluded.time,"
    " code = excluded.code, enhanced = excluded.enhanced, relay = excluded.relay, attempts = excluded.attempts,"
    " detail = excluded.detail, original = excluded.original",
)
#: rows in one statement (SQLite allows 32766 parameters, PostgreSQL 65535)
_CHUNK = 500


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class Store:
    """
    What SQLite and PostgreSQL share; a subclass gives L{connect} and the
    dialect (L{placeholder}, L{floor}).
    """

    #: the dialect's placeholder for C{?}
    placeholder = "?"
    float_type = "REAL"
    id_type = "INTEGER PRIMARY KEY AUTOINCREMENT"
    #: rounds of deleting the oldest share while over the size cap (pages
    #: are not freed in proportion to the rows deleted)
    size_rounds = 8

    def __init__(self, node: str = "") -> None:
        self.node = node[:255]

    # -- the dialect ------------------------------------------------------------------------

    def sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def floor(self, expression: str) -> str:
        """SQL rounding C{expression} down to an integer."""
        return f"CAST({expression} AS INTEGER)"

    def connect(self) -> Any:  # pragma: no cover - every store has its own
        raise NotImplementedError

    def release(self, conn: Any) -> None:
        """Give back a connection from L{connect}."""
        conn.close()

    def size(self, conn: Any) -> int:  # pragma: no cover
        raise NotImplementedError

    def create(self, conn: Any) -> None:
        for statement in schema(self.float_type, self.id_type):
            conn.execute(statement)

    def close(self) -> None:
        """Close what the store keeps open."""

    def reset(self) -> None:
        """After an error: drop this thread's connection, the next use opens a new one."""

    # -- reading ---------------------------------------------------------------------------

    def fetch(self, text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one query (blocking)."""
        conn = self.connect()
        try:
            cur = conn.execute(self.sql(text), tuple(params))
            rows = list(cur.fetchall())
            conn.commit()
            return rows
        finally:
            self.release(conn)

    # -- writing ---------------------------------------------------------------------------

    def write(self, rows: Sequence[EventRow]) -> None:
        """Record C{rows} (in their order) in one transaction."""
        if not rows:
            return
        conn = self.connect()
        try:
            try:
                self._write(conn, rows)
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        finally:
            self.release(conn)

    def _many(self, conn: Any, statement: tuple[str, int, str], rows: Sequence[tuple[Any, ...]]) -> None:
        """
        C{rows} in as few statements as possible: each statement is one
        step for the database, and each step lets go of the GIL (sqlite3,
        psycopg) -- thousands of small statements a second make the
        reactor thread wait for the GIL at every one of them.
        """
        head, width, tail = statement
        one = "(" + ", ".join([self.placeholder] * width) + ")"
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            params = [value for row in chunk for value in row]
            conn.execute(f"{head} {', '.join([one] * len(chunk))}{tail}", params)

    def _write(self, conn: Any, rows: Sequence[EventRow]) -> None:
        node = self.node
        self._many(conn, _INSERT_EVENT, [
            (r.time, r.kind, r.queue_id, r.client, r.sender, r.recipient, r.domain, r.status, r.code,
             r.enhanced, r.reason, r.detail, r.line, r.data, node)
            for r in rows
        ])
        # What the events change, gathered first (a later event about the
        # same row wins), then written a statement per kind of change.
        accepted: dict[str, tuple[Any, ...]] = {}
        new: dict[str, tuple[Any, ...]] = {}  # messages known only from later events, DSNs, rejections
        queued: dict[tuple[str, str], tuple[Any, ...]] = {}
        outcomes: dict[tuple[str, str], tuple[Any, ...]] = {}
        flags: list[tuple[str, str, float, str]] = []  # (hold | release | delete, queue id, time, why)
        touched: dict[str, float] = {}
        for r in rows:
            kind, qid = r.kind, r.queue_id
            if kind == "reject":
                rid = rejection_id(r.time)
                new[rid] = (rid, r.time, r.time, r.sender, r.client, "", "", None, 1 if r.recipient else 0, "rejected",
                            r.reason, r.detail, "", node)
                if r.recipient:
                    outcomes[(rid, r.recipient)] = (rid, r.recipient, r.domain, "rejected", r.time, r.code, r.enhanced,
                                                    "", 0, r.detail, r.recipient)
                continue
            if qid is None:
                continue
            data = r.fields
            if kind in ("accepted", "pickup"):
                accepted[qid] = (
                    qid, r.time, r.time, r.sender, r.client, str(data.get("user") or "")[:255],
                    str(data.get("proto") or ("pickup" if kind == "pickup" else ""))[:20], _int(data.get("size")),
                    _int(data.get("nrcpt")), "queued", node,
                )
                for a in r.recipients:
                    queued.setdefault((qid, a), (qid, a, recipient_domain(a), "queued", r.time, a))
            elif kind in ("delivery", "expired"):
                new.setdefault(qid, self._bare(qid, r.time))
                status = r.status if r.status in ("sent", "deferred", "bounced") else "deferred"
                outcomes[(qid, r.recipient)] = (
                    qid, r.recipient, r.domain, status, r.time, r.code, r.enhanced,
                    str(data.get("relay") or "")[:255], _int(data.get("attempts")) or 0, r.detail,
                    str(data.get("orig_to") or r.recipient)[:320],
                )
                touched[qid] = r.time
            elif kind == "bounce":
                dsn = str(data.get("dsn_id") or "")[:64]
                if dsn:
                    new.setdefault(dsn, (dsn, r.time, r.time, "", "", "", "dsn", None, None, "queued", "", "", qid, node))
            elif kind in ("hold", "release", "removed"):
                new.setdefault(qid, self._bare(qid, r.time))
                if kind != "removed":
                    flags.append((kind, qid, r.time, ""))
                    touched[qid] = r.time
                elif data.get("why"):
                    flags.append(("delete", qid, r.time, str(data["why"])[:200]))
                    touched.pop(qid, None)
                else:
                    touched[qid] = r.time
        self._many(conn, _ACCEPTED, list(accepted.values()))
        self._many(conn, _NEW_MESSAGE, list(new.values()))
        self._many(conn, _QUEUED_RECIPIENT, list(queued.values()))
        self._many(conn, _RECIPIENT, list(outcomes.values()))
        q = self.sql
        for what, qid, t, why in flags:  # operators' actions: few
            if what == "delete":
                conn.execute(q(
                    "UPDATE messages SET status = 'deleted', held = 0, updated = ?, finished = ?, detail = ?"
                    " WHERE queue_id = ?"), (t, t, why, qid))
            else:
                conn.execute(q("UPDATE messages SET held = ?, updated = ? WHERE queue_id = ?"),
                             (1 if what == "hold" else 0, t, qid))
        self._settle(conn, touched)

    def _bare(self, qid: str, t: float) -> tuple[Any, ...]:
        """A message row for C{qid} known only from later events (recovered from the spool, or a DSN)."""
        return (qid, t, t, None, "", "", "", None, None, "queued", "", "", "", self.node)

    def _settle(self, conn: Any, touched: dict[str, float]) -> None:
        """The states of the C{touched} messages from their recipients' (and hold): one query, one update."""
        ids = list(touched)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            marks = ", ".join([self.placeholder] * len(chunk))
            found = conn.execute(
                "SELECT m.queue_id, m.status, m.held, m.time, COUNT(r.address),"
                " SUM(CASE WHEN r.status = 'deferred' THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN r.status = 'queued' THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN r.status = 'bounced' THEN 1 ELSE 0 END), MAX(r.time)"
                f" FROM messages m LEFT JOIN recipients r ON r.queue_id = m.queue_id WHERE m.queue_id IN ({marks})"
                " GROUP BY m.queue_id, m.status, m.held, m.time",
                chunk,
            ).fetchall()
            updates = []
            for qid, old, held, arrival, total, deferred, queued, bounced, last in found:
                if old in ("deleted", "rejected"):
                    continue
                finished = None
                if deferred:
                    status = "deferred"
                elif queued or not total:
                    status = "queued"
                elif bounced:
                    status = "bounced"
                else:
                    status = "sent"
                if status in ("sent", "bounced"):
                    finished = last
                elif held:
                    status = "held"
                latency = max(0.0, finished - arrival) if finished is not None and status == "sent" else None
                updates.append((qid, status, touched[qid], finished, latency))
            if not updates:
                continue
            one = "(" + ", ".join([self.placeholder] * 5) + ")"
            f = self.float_type
            conn.execute(
                f"UPDATE messages SET status = v.column2, updated = CAST(v.column3 AS {f}),"
                f" finished = CAST(v.column4 AS {f}), latency = CAST(v.column5 AS {f})"
                f" FROM (VALUES {', '.join([one] * len(updates))}) AS v WHERE messages.queue_id = v.column1",
                [value for row in updates for value in row],
            )

    # -- pruning ---------------------------------------------------------------------------

    def prune(self, now: float, retention: float, max_size: int) -> int:
        """
        Delete what is older than C{retention} seconds, then, when the
        database is larger than C{max_size} bytes (0: no cap), the oldest
        share of the rest that brings it under the cap.  Returns the
        events deleted.
        """
        conn = self.connect()
        try:
            deleted = 0
            if retention > 0:
                deleted += self._delete_before(conn, now - retention)
                conn.commit()
            self.compact(conn)
            for _ in range(self.size_rounds if max_size > 0 else 0):
                size = self.size(conn)
                if size <= max_size:
                    break
                total = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
                if not total:
                    break
                share = min(1.0, (size - max_size) / size + 0.05)
                row = conn.execute(
                    self.sql("SELECT time FROM events ORDER BY time LIMIT 1 OFFSET ?"),
                    (max(0, int(total * share) - 1),),
                ).fetchone()
                if row is None:
                    break
                deleted += self._delete_before(conn, row[0] + 1e-6)
                conn.commit()
                self.compact(conn)
            return deleted
        finally:
            self.release(conn)

    def _delete_before(self, conn: Any, cutoff: float) -> int:
        q = self.sql
        cur = conn.execute(q("DELETE FROM events WHERE time < ?"), (cutoff,))
        gone = max(0, cur.rowcount or 0)
        conn.execute(q(
            "DELETE FROM recipients WHERE queue_id IN (SELECT queue_id FROM messages WHERE updated < ?)"
        ), (cutoff,))
        conn.execute(q("DELETE FROM messages WHERE updated < ?"), (cutoff,))
        return gone

    def compact(self, conn: Any) -> None:
        """Give freed space back where the database can (SQLite: incremental vacuum)."""


class SQLiteStore(Store):
    """
    The history in one SQLite file: WAL (readers never wait for the
    writer, a crash loses at most the transaction being written and never
    corrupts the file), C{synchronous=NORMAL} (a committed batch survives
    a crash of the process; only a power loss may lose the last ones),
    a busy timeout (several processes may write: they take turns),
    C{auto_vacuum=INCREMENTAL} so pruning gives space back.
    """

    def __init__(self, path: str, node: str = "", busy_timeout: float = 10.0, readonly: bool = False) -> None:
        super().__init__(node)
        self.path = path
        self.busy_timeout = busy_timeout
        self.readonly = readonly
        self._local = threading.local()
        if not readonly:
            directory = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(directory, 0o750, exist_ok=True)
            except OSError as e:
                raise StoreError(f"history database {path}: {e.strerror or e}") from None

    def connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            if self.readonly:
                if not os.path.exists(self.path):
                    raise StoreError(f"history database {self.path}: no such file")
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=self.busy_timeout,
                                       check_same_thread=False)
            else:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)  # 0640: addresses inside
                os.close(fd)
                conn = sqlite3.connect(self.path, timeout=self.busy_timeout, check_same_thread=False)
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                self.create(conn)
                conn.commit()
        except (sqlite3.Error, OSError) as e:
            if conn is not None:
                conn.close()
            raise StoreError(f"history database {self.path}: {getattr(e, 'strerror', None) or e}") from None
        self._local.conn = conn
        return conn

    def release(self, conn: Any) -> None:
        """Kept open for the thread that opened it."""

    def forget(self) -> None:
        """Close this thread's connection (after an error: the next use reopens)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    close = forget
    reset = forget

    def size(self, conn: Any) -> int:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * page_size)

    def compact(self, conn: Any) -> None:
        conn.execute("PRAGMA incremental_vacuum")
        conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def open_store(database: str, node: str = "", readonly: bool = False) -> Store:
    """
    The store C{database} names: C{postgresql://...} (or C{postgres://})
    is PostgreSQL, anything else a SQLite file path.

    @raise StoreError: PostgreSQL without psycopg installed.
    """
    if database.startswith(("postgresql://", "postgres://")):
        from mailhub.history.postgres import PostgresStore

        return PostgresStore(database, node)
    return SQLiteStore(database, node, readonly=readonly)


def rows_of(events: Iterable[dict[str, Any]]) -> list[EventRow]:
    """The rows of the mail events among C{events}."""
    from mailhub.history.rows import event_row

    out = []
    for e in events:
        r = event_row(e)
        if r is not None:
            out.append(r)
    return out
