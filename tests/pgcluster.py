"""
A throwaway PostgreSQL cluster for tests: C{initdb} into a temporary
directory, C{postgres} on 127.0.0.1 and a free port, run as C{nobody} when
the tests run as root (PostgreSQL refuses to run as root), trust
authentication for the one role C{mailhub}.  A helper module, not a test
file (tests/test_e2e_history_postgres.py uses it).

Owns: the cluster's directory and process.  Must not touch: what a test asserts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile

from conftest import require_tool
from peers import wait_for

__all__ = ["PostgresCluster", "BIN"]

BIN = "/usr/lib/postgresql/15/bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    def __init__(self) -> None:
        initdb = os.path.join(BIN, "initdb")
        if not os.path.exists(initdb):
            require_tool("postgresql")  # not there: skips locally, fails under CI
        self.root = tempfile.mkdtemp(prefix="mailhub-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.user: dict[str, str] = {}
        if os.geteuid() == 0:
            shutil.chown(self.root, "nobody", "nogroup")
            self.user = {"user": "nobody", "group": "nogroup"}
        self._run([initdb, "-D", self.data, "-U", "mailhub", "--auth=trust", "-E", "UTF8", "--no-sync"])

    def _run(self, argv: list[str]) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=120, cwd=self.root, **self.user)  # type: ignore[call-overload]

    @property
    def url(self) -> str:
        return f"postgresql://mailhub@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresCluster:
        log = open(os.path.join(self.root, "postgres.log"), "wb")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "postgres"), "-D", self.data, "-p", str(self.port), "-h", "127.0.0.1",
             "-k", self.root, "-c", "fsync=off", "-c", "max_connections=40"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, **self.user,  # type: ignore[call-overload]
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"postgres exited: {self.log()}")
            r = subprocess.run([os.path.join(BIN, "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                               capture_output=True, timeout=10)
            return r.returncode == 0

        wait_for(ready, 60, "PostgreSQL to accept connections")
        return self

    def log(self) -> str:
        with open(os.path.join(self.root, "postgres.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: does not wait for clients to leave
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
