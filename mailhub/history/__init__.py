"""
Message history: every mail event kept in a database, searchable and
charted (docs/history.rst).

The parts, lowest first:

- L{mailhub.history.rows}: a mail event (L{mailhub.maillog}) as a row.  Pure.
- L{mailhub.history.store}: the tables, the SQL both databases share, SQLite
  (stdlib C{sqlite3}, WAL) and L{open_store}, which picks the database from
  C{history.database}.
- L{mailhub.history.postgres}: the same store on PostgreSQL (psycopg 3 and
  its connection pool).
- L{mailhub.history.query}: what one asks: filters, cursors, a message's
  story, counts per time bucket, latency percentiles, top lists.
- L{mailhub.history.recorder}: the observer of mail events that batches
  them in memory and writes them in its own thread; the pruning.

Must not touch: the spool, the network (except the PostgreSQL server),
the SMTP server.  It observes mail events and never emits them.
"""
