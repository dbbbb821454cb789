"""
The history store on PostgreSQL, so several nodes share one history.

Owns: the connection pool (psycopg 3's C{psycopg_pool.ConnectionPool}:
connections opened on demand, checked before reuse, reconnected after
the server restarts), the dialect (C{%s} placeholders, C{DOUBLE
PRECISION}, C{BIGSERIAL}, C{FLOOR}), the schema's creation under an
advisory lock (two daemons starting together) and the database's size.

Must not touch: anything but its database.  Every method blocks: callers
run them in a thread, as for SQLite (L{mailhub.history.store}).
"""

from __future__ import annotations

import threading
from typing import Any

from mailhub.history.store import Store, StoreError

__all__ = ["PostgresStore"]

#: the advisory lock key held while the schema is created ("mailhub" in ASCII)
_SCHEMA_LOCK = 0x6D61696C687562


class _Conn:
    """A pooled psycopg connection with the calls L{Store} makes (sqlite3's shape)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self.conn.execute(sql, params or None)

    def executemany(self, sql: str, params: Any) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql, params)

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()


class PostgresStore(Store):
    placeholder = "%s"
    float_type = "DOUBLE PRECISION"
    id_type = "BIGSERIAL PRIMARY KEY"
    #: the live size comes from statistics updated after the transaction:
    #: one round per pruning, the next pruning sees the result
    size_rounds = 1

    def __init__(self, conninfo: str, node: str = "", max_size: int = 4, timeout: float = 10.0) -> None:
        super().__init__(node)
        try:
            import psycopg  # noqa: F401
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise StoreError(
                "history.database is PostgreSQL but psycopg is not installed (pip install 'mailhub[postgresql]')"
            ) from None
        self.conninfo = conninfo
        self._created = False
        self._lock = threading.Lock()
        self.pool = ConnectionPool(
            conninfo, min_size=0, max_size=max_size, timeout=timeout, open=False,
            check=ConnectionPool.check_connection, name="mailhub-history",
        )
        self._opened = False

    def floor(self, expression: str) -> str:
        return f"FLOOR({expression})::BIGINT"

    def connect(self) -> _Conn:
        import psycopg
        import psycopg_pool

        with self._lock:
            if not self._opened:
                self.pool.open(wait=False)
                self._opened = True
        try:
            conn = self.pool.getconn()
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise StoreError(f"history database: {_first_line(e)}") from None
        wrapped = _Conn(conn)
        if not self._created:
            try:
                wrapped.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                self.create(wrapped)
                conn.commit()
                self._created = True
            except psycopg.Error as e:
                conn.rollback()
                self.pool.putconn(conn)
                raise StoreError(f"history database: {_first_line(e)}") from None
        return wrapped

    def release(self, conn: Any) -> None:
        raw = conn.conn
        if raw.info.transaction_status != 0:  # IDLE; anything else: end it
            try:
                raw.rollback()
            except Exception:
                pass
        self.pool.putconn(raw)

    def size(self, conn: Any) -> int:
        """
        The live share of the tables' size: deleted rows keep their space
        until autovacuum, so the size on disk alone would make every
        pruning round delete more.
        """
        row = conn.execute(
            "SELECT COALESCE(SUM(pg_total_relation_size(relid) * CASE WHEN n_live_tup + n_dead_tup > 0"
            " THEN n_live_tup::float8 / (n_live_tup + n_dead_tup) ELSE 1 END), 0) FROM pg_stat_user_tables"
            " WHERE relname IN ('events', 'messages', 'recipients') AND schemaname = current_schema()"
        ).fetchone()
        return int(row[0])

    def close(self) -> None:
        if self._opened:
            self.pool.close()
            self._opened = False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
