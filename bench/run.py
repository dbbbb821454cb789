#!/usr/bin/env python3
"""
mailhub's benchmark: the same scenarios against mailhub and against a
throwaway Postfix instance, so that the mailhub/Postfix ratio comes from one
run on one machine.

Owns: everything under bench/ -- throwaway configurations (a temporary
directory per server start), starting and stopping both servers on
127.0.0.1, driving them with Postfix's C{smtp-source}, a Python latency
probe, memory sampling from /proc, and the result table (stdout, JSON).

Must not touch: mailhub's code and data (it only starts C{python -m twisted
mailhub --config FILE} with a configuration of its own), the system's
Postfix configuration (/etc/postfix is never written: C{postfix -c DIR}
with main.cf and master.cf in the temporary directory works as root), and
anything outside its temporary directory.

Usage::

    python bench/run.py                       # every scenario, both servers, medians of 3
    python bench/run.py --quick --runs 1      # smoke run, small counts
    python bench/run.py --scenarios 20x4KB --targets mailhub --profile /tmp/prof
    python bench/run.py --scenarios backlog --targets mailhub --runs 1

The C{backlog} scenario fills mailhub's spool directly (L{fill_backlog},
through L{mailhub.queue.spool.Spool}) before the daemon starts; that is the only
place the harness imports mailhub.  Postfix has no counterpart (its queue
cannot be written by hand), so its column says n/a there.

See docs/performance.rst for what each number means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAIN = "bench.example"
#: The relay scenario's recipients: routed by both servers to an smtp-sink.
REMOTE_DOMAIN = "remote.example"
SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER = f"from@{DOMAIN}"
#: smtp-source's -r N sends to "user", "2user", ..., "Nuser".
RCPT_BASE = "user"
PROBE_USER = "probe"
MAX_RECIPIENTS = 5
SMTP_SOURCE = "/usr/sbin/smtp-source"
POSTFIX = "/usr/sbin/postfix"
#: Big enough for the 100 MB scenario on both servers.
MESSAGE_SIZE_LIMIT = 200 * 1024 * 1024
#: Connection limits raised on both servers so that 1000 idle sessions fit.
CONNECTION_LIMIT = 2000


# ---------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Scenario:
    """
    One load shape.  Exactly one of messages, idle and big is non-zero;
    a backlog scenario (C{backlog} non-zero) also uses C{messages} for the
    smtp-source load it runs while the backlog is queued, and C{probes}
    for the new messages timed from 250 to the Maildir.
    """

    name: str
    sessions: int = 1
    messages: int = 0
    size: int = 4096
    recipients: int = 1
    idle: int = 0  # connections held open
    big: int = 0  # bytes of one message streamed by a Python client
    probes: int = 200  # latency samples (sequential transactions of one client)
    backlog: int = 0  # deferred messages written into the spool before the start
    relay: bool = False  # recipients at REMOTE_DOMAIN, relayed to an smtp-sink

    @property
    def kind(self) -> str:
        if self.relay:
            return "relay"
        if self.backlog:
            return "backlog"
        if self.idle:
            return "idle"
        if self.big:
            return "big"
        return "load"


FULL = (
    Scenario("1x4KB", sessions=1, messages=2000, size=4096),
    Scenario("20x4KB", sessions=20, messages=5000, size=4096),
    Scenario("20x1MB", sessions=20, messages=200, size=1024 * 1024, probes=50),
    Scenario("5rcpt", sessions=1, messages=1000, size=4096, recipients=5),
    Scenario("idle1000", idle=1000, probes=100),
    Scenario("100MB", big=100 * 1024 * 1024, probes=1),
    Scenario("backlog", backlog=100_000, sessions=1, messages=500, size=4096, probes=50),
    Scenario("relay", sessions=20, messages=5000, size=4096, relay=True),
)

QUICK = (
    Scenario("1x4KB", sessions=1, messages=200, size=4096, probes=20),
    Scenario("20x4KB", sessions=20, messages=500, size=4096, probes=20),
    Scenario("20x1MB", sessions=20, messages=20, size=1024 * 1024, probes=10),
    Scenario("5rcpt", sessions=1, messages=100, size=4096, recipients=5, probes=20),
    Scenario("idle1000", idle=200, probes=20),
    Scenario("100MB", big=10 * 1024 * 1024, probes=1),
    Scenario("backlog", backlog=10_000, sessions=1, messages=200, size=4096, probes=50),
    Scenario("relay", sessions=20, messages=500, size=4096, relay=True, probes=20),
)

#: Why a target has no number for a scenario (the table says n/a).
UNSUPPORTED = {
    ("backlog", "postfix"): (
        "Postfix's deferred queue cannot be written without SMTP, and filling it "
        "through SMTP (100 000 messages at its 400-650 msg/s here, then a delivery "
        "attempt each) takes well over 2 minutes; the issue's target is absolute"
    ),
}


def unsupported(scenario: Scenario, target: str) -> str | None:
    """Why C{target} is not run for C{scenario} (its cells say n/a), or None."""
    return UNSUPPORTED.get((scenario.kind, target))


def select_scenarios(names: Sequence[str] | None, quick: bool) -> list[Scenario]:
    """The scenarios to run, in the order given; unknown names are an error."""
    table = QUICK if quick else FULL
    if not names:
        return list(table)
    by_name = {s.name.lower(): s for s in table}
    chosen = []
    for name in names:
        s = by_name.get(name.strip().lower())
        if s is None:
            raise ValueError(f"unknown scenario {name!r} (known: {', '.join(x.name for x in table)})")
        chosen.append(s)
    return chosen


def recipient_users(count: int) -> list[str]:
    """The local parts smtp-source's C{-t user@D -r count} sends to."""
    return [RCPT_BASE] + [f"{i}{RCPT_BASE}" for i in range(2, count + 1)]


def all_users() -> list[str]:
    return recipient_users(MAX_RECIPIENTS) + [PROBE_USER]


# ---------------------------------------------------------------------------
# smtp-source


def smtp_source_args(scenario: Scenario, port: int, program: str = SMTP_SOURCE) -> list[str]:
    """
    C{smtp-source} as the issue's Postfix numbers were taken: a new
    connection per message (no C{-d}), HELO, no pipelining (it has none).
    C{-c} prints a counter after each DATA, which is how we count.
    """
    args = [program, "-c", "-s", str(scenario.sessions), "-m", str(scenario.messages), "-l", str(scenario.size)]
    if scenario.recipients > 1:
        args += ["-r", str(scenario.recipients)]
    domain = REMOTE_DOMAIN if scenario.relay else DOMAIN
    args += ["-M", "client." + DOMAIN, "-f", SENDER, "-t", f"{RCPT_BASE}@{domain}", f"127.0.0.1:{port}"]
    return args


def parse_counter(output: str) -> int:
    """
    Messages smtp-source got through DATA: its C{-c} counter prints
    C{1\\r2\\r...N\\r\\n}; the last number is the count (0 when none).
    """
    numbers = re.findall(r"\d+", output)
    return int(numbers[-1]) if numbers else 0


def parse_errors(stderr: str) -> list[str]:
    """smtp-source's complaints (C{smtp-source: fatal: ...}, warnings), one per line."""
    return [line.strip() for line in stderr.splitlines() if "smtp-source:" in line]


# ---------------------------------------------------------------------------
# statistics


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); with 20 samples p99 is the maximum."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median_of_runs(runs: Sequence[dict]) -> dict:
    """Per metric, the median over the runs that measured it (numbers only)."""
    keys: list[str] = []
    for r in runs:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    out: dict = {}
    for k in keys:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])]
        if vals:
            out[k] = statistics.median(vals)
    out["ok"] = all(r.get("ok", False) for r in runs) if runs else False
    return out


def medians_or_na(runs: Sequence[dict]) -> dict:
    """L{median_of_runs}, or C{{"na": True}} when the target was not run (see L{unsupported})."""
    return median_of_runs(runs) if runs else {"na": True}


def ratio(a: float | None, b: float | None) -> float | None:
    """a/b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


# ---------------------------------------------------------------------------
# configuration files


def mailhub_settings(
    port: int, fsync: bool = True, user: str | None = None, relay_port: int = 0
) -> dict[str, dict[str, Any]]:
    """
    mailhub's throwaway configuration as TOML tables (paths relative to the
    file).  Default durability; only the limits that the scenarios would
    otherwise hit are raised: message size (100 MB message) and connections
    (1000 idle).  Started as root, mailhub would switch to C{server.user}
    (default C{mailhub}, absent on a build machine): C{user} names the one
    to use (C{"root"} keeps root; the work done per message is the same).
    With C{relay_port}, mail to C{REMOTE_DOMAIN} goes to 127.0.0.1:relay_port
    (the relay scenario's smtp-sink) without TLS, as Postfix's does.
    """
    server: dict[str, Any] = {
        "hostname": f"mx.{DOMAIN}",
        "smtp": [f"tcp:{port}:interface=127.0.0.1"],
        "max_message_size": MESSAGE_SIZE_LIMIT,
        "max_connections": CONNECTION_LIMIT,
        "max_connections_per_ip": CONNECTION_LIMIT,
        "mail_log": "mail.log",
    }
    if user is not None:
        server["user"] = user
    settings: dict[str, dict[str, Any]] = {
        "server": server,
        "spool": {"path": "spool", "fsync": fsync},
        "local": {"domains": [DOMAIN], "mailboxes": "mailboxes"},
    }
    if relay_port:
        settings["relay"] = {"tls": "none", "routes": {REMOTE_DOMAIN: f"[127.0.0.1]:{relay_port}"}}
    return settings


def parse_override(text: str) -> tuple[str, str, Any]:
    """
    C{SECTION.KEY=VALUE} from C{--mailhub-set} as (section, key, value):
    the value is read as TOML (C{true}, C{4}, C{"syncfs"}, C{["a"]}); a
    bare word that is not TOML is a string (C{spool.sync=syncfs}).
    """
    import tomllib

    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().rpartition(".")
    if not sep or not key or not section:
        raise ValueError(f"{text!r}: expected SECTION.KEY=VALUE (e.g. spool.sync=syncfs)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def apply_overrides(settings: dict[str, dict[str, Any]], overrides: Iterable[str]) -> dict[str, dict[str, Any]]:
    """A copy of C{settings} with each C{SECTION.KEY=VALUE} set (L{parse_override})."""
    out = {name: dict(table) for name, table in settings.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        out.setdefault(section, {})[key] = value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_toml(settings: dict[str, dict[str, Any]]) -> str:
    """The tables as TOML."""
    lines = ["# written by bench/run.py"]
    for name, table in settings.items():
        lines += ["", f"[{name}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def mailhub_config(
    port: int, fsync: bool = True, overrides: Iterable[str] = (), user: str | None = None, relay_port: int = 0
) -> str:
    """L{mailhub_settings} with C{overrides} (C{--mailhub-set}, a variant's) applied, as TOML."""
    return render_toml(apply_overrides(mailhub_settings(port, fsync, user, relay_port), overrides))


def postfix_main_cf(base: str, uid: int, gid: int) -> str:
    """
    Postfix main.cf for an instance living entirely under C{base}: queue,
    data, log and Maildirs.  Virtual delivery into C{base/mail/DOMAIN/USER/}
    (the same layout as mailhub's mailbox root), default durability.
    """
    return f"""# written by bench/run.py
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.{DOMAIN}
mydomain = {DOMAIN}
myorigin = {DOMAIN}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relayhost =
biff = no
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {base}/mail
virtual_mailbox_maps = texthash:{base}/etc/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
message_size_limit = {MESSAGE_SIZE_LIMIT}
virtual_mailbox_limit = 0
mailbox_size_limit = 0
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
transport_maps = texthash:{base}/etc/transport
smtp_tls_security_level = none
"""


def postfix_transport(relay_port: int) -> str:
    """transport_maps (texthash): the relay scenario's domain to its smtp-sink, no MX lookup."""
    return f"{REMOTE_DOMAIN} smtp:[127.0.0.1]:{relay_port}\n" if relay_port else ""


_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_master_cf(port: int) -> str:
    """
    Debian's master.cf without chroot (the queue is in a temporary
    directory) and with smtpd on 127.0.0.1:PORT only; its process limit
    is raised so that 1000 idle sessions each get their smtpd.
    """
    return (
        "# written by bench/run.py\n"
        f"127.0.0.1:{port} inet n - n - {CONNECTION_LIMIT} smtpd\n" + _MASTER_SERVICES
    )


def postfix_vmailbox(users: Iterable[str]) -> str:
    """virtual_mailbox_maps (texthash): a trailing slash means Maildir."""
    return "".join(f"{u}@{DOMAIN} {DOMAIN}/{u}/\n" for u in users)


def make_maildirs(root: str, users: Iterable[str], uid: int = -1, gid: int = -1) -> dict[str, str]:
    """Create ROOT/DOMAIN/USER/{cur,new,tmp}; return user -> its new/ directory."""
    out = {}
    for u in users:
        md = os.path.join(root, DOMAIN, u)
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(md, sub), exist_ok=True)
        out[u] = os.path.join(md, "new")
    if uid >= 0:
        for dirpath, _dirs, _files in os.walk(root):
            os.chown(dirpath, uid, gid)
    return out


# ---------------------------------------------------------------------------
# backlog: a spool full of deferred messages, written without SMTP

#: Recipients of the backlog: a domain that is neither local nor ever tried
#: during a run (the next attempt is a day away).
BACKLOG_DOMAIN = "deferred.example"
#: What the backlog's last attempt said, as a real deferral would.
BACKLOG_TEXT = "connect to mx.deferred.example[192.0.2.1]:25: Connection refused"
#: The line mailhub's scheduler logs when startup recovery has queued everything.
QUEUE_LOADED = re.compile(r"scheduler: (\d+) message\(s\) in the queue")


def _import_mailhub() -> None:
    """Make C{import mailhub} find this repository's package (bench/ runs from anywhere)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def backlog_message(size: int, serial: int) -> bytes:
    """A deferred message of about C{size} bytes, headers included."""
    head = (
        f"From: <{SENDER}>\r\nTo: <rcpt{serial}@{BACKLOG_DOMAIN}>\r\nSubject: backlog {serial}\r\n"
        f"Message-ID: <backlog.{serial}@{DOMAIN}>\r\n\r\n"
    ).encode()
    line = b"X" * 78 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def backlog_envelope(queue_id: str, serial: int, now: float, size: int = 4096) -> Any:
    """
    The envelope of one backlog message, as the scheduler leaves a message
    whose first attempt failed temporarily: arrived an hour ago, one
    attempt, recipient still pending with a 4xx, next attempt in a day.
    """
    _import_mailhub()
    from mailhub.envelope import Envelope, Recipient

    rcpt = Recipient(
        address=f"rcpt{serial}@{BACKLOG_DOMAIN}",
        attempts=1,
        last_attempt=now - 3600,
        last_code=451,
        last_status="4.4.1",
        last_text=BACKLOG_TEXT,
    )
    return Envelope(
        queue_id=queue_id,
        sender=SENDER,
        recipients=[rcpt],
        arrival=now - 3600,
        next_attempt=now + 86400,
        attempts=1,
        esmtp={"size": size, "body": "7BIT"},
        client={"addr": "127.0.0.1", "helo": "client." + DOMAIN, "protocol": "ESMTP"},
    )


def fill_backlog(spool_path: str, count: int, size: int = 4096, now: float | None = None) -> list[str]:
    """
    Queue C{count} deferred messages in the spool at C{spool_path} (created
    if missing) through L{mailhub.queue.spool.Spool.add} without fsync -- the
    spool's own format and commit order (one queue file per message,
    written in C{tmp/} and renamed to C{queue/ID}, the envelope inside it),
    as fast as it goes -- before the daemon starts.  Returns their queue ids.
    """
    _import_mailhub()
    from mailhub.queue.queuefile import new_queue_id
    from mailhub.queue.spool import Spool

    now = time.time() if now is None else now
    spool = Spool(spool_path, fsync=False)
    ids = []
    arrival = now - 3600
    for n in range(count):
        qid = new_queue_id(arrival + n * 1e-6)  # distinct, sorted by serial
        spool.add(backlog_envelope(qid, n, now, size), backlog_message(size, n))
        ids.append(qid)
    return ids


class LogWatcher(threading.Thread):
    """
    Follows a log file (which may not exist yet) and notes the monotonic
    time at which a line first matches C{pattern}, and the match.  Polls
    every C{interval} seconds: the daemon's log observer flushes per event.
    """

    def __init__(self, path: str, pattern: re.Pattern[str], interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.pattern = pattern
        self.interval = interval
        self.matched_at: float | None = None
        self.match: re.Match[str] | None = None
        self._halt = threading.Event()

    def feed(self, text: str, when: float) -> bool:
        """Look at complete lines; True once matched."""
        for line in text.splitlines():
            m = self.pattern.search(line)
            if m:
                self.match, self.matched_at = m, when
                return True
        return False

    def run(self) -> None:
        f = None
        partial = ""
        try:
            while not self._halt.is_set():
                if f is None:
                    try:
                        f = open(self.path, errors="replace")
                    except FileNotFoundError:
                        self._halt.wait(self.interval)
                        continue
                chunk = f.read()
                now = time.monotonic()
                if chunk:
                    text = partial + chunk
                    cut = text.rfind("\n") + 1
                    partial = text[cut:]
                    if self.feed(text[:cut], now):
                        return
                else:
                    self._halt.wait(self.interval)
        finally:
            if f is not None:
                f.close()

    def wait(self, timeout: float) -> float | None:
        """The time of the match, waiting up to C{timeout} s for it."""
        self.join(timeout)
        return self.matched_at

    def stop(self) -> None:
        self._halt.set()


# ---------------------------------------------------------------------------
# /proc


def proc_kb(pid: int, key: str) -> int:
    """A C{kB} field of /proc/PID/status (VmRSS, VmHWM), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages divided among their users."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_cpu_s(pids: Iterable[int]) -> float:
    """
    User + system CPU seconds of these processes, including their children
    that have exited and been reaped (C{cutime}, C{cstime}): the difference
    of two readings over [master] + children is the CPU the whole server
    used between them, whether its workers lived throughout or not.
    """
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def children_of(parent: int) -> list[int]:
    """Direct children of a process (Postfix's master forks every daemon)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(parent):
            out.append(int(name))
    return out


def descendants_of(parent: int) -> list[int]:
    """Children, grandchildren ... of a process (mailhub's supervisor forks its own)."""
    out: list[int] = []
    todo = [parent]
    while todo:
        kids = children_of(todo.pop())
        out += kids
        todo += kids
    return out


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, utime + stime ticks of the process itself, RSS kB) from /proc/PID/stat, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    comm = stat[stat.find("(") + 1 : stat.rfind(")")]
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return comm, int(fields[11]) + int(fields[12]), int(fields[21]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (IndexError, ValueError):
        return None


def proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def mailhub_kind(pid: int, main: int) -> str:
    """
    Which of mailhub's processes C{pid} is: C{main} (the daemon), C{delivery}
    (a local delivery process), C{supervisor} (system mode's root
    supervisor) or C{acceptor} (an SMTP worker process: any other child).
    """
    if pid == main:
        return "main"
    cmd = proc_cmdline(pid)
    if "localchild" in cmd:
        return "delivery"
    if "supervisor" in cmd:
        return "supervisor"
    return "acceptor"


class MemorySampler(threading.Thread):
    """
    Samples a server's processes every C{interval} seconds: the sum of
    VmRSS (C{peak_kb}), each process's RSS (its lowest, C{first_kb}, and
    highest, C{peak_by_pid}),
    and each process's own CPU ticks by kind (C{kind}: pid -> name;
    default: the process's C{comm}, as Postfix's daemons are told apart).
    A process that exits between two samples keeps the CPU it had at the
    last one; L{cpu_ms_by_kind} adds what the ones present at L{mark}
    used since then and what the new ones used in all.
    """

    def __init__(
        self, pids: Callable[[], list[int]], interval: float = 0.1, kind: Callable[[int, str], str] | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.interval = interval
        self.kind = kind or (lambda _pid, comm: comm)
        self.peak_kb = 0
        self.first_kb: dict[int, int] = {}
        self.peak_by_pid: dict[int, int] = {}
        self._kinds: dict[int, str] = {}
        self._base: dict[int, int] = {}  # ticks at mark()
        self._last: dict[int, int] = {}  # ticks at the last sample
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def sample(self) -> int:
        pids = self.pids()
        total = sum(proc_kb(p, "VmRSS") for p in pids)
        self.peak_kb = max(self.peak_kb, total)
        with self._lock:
            for p in pids:
                st = proc_stat(p)
                if st is None:
                    continue
                comm, ticks, rss = st
                if p not in self._kinds:
                    self._kinds[p] = self.kind(p, comm)
                self._last[p] = ticks
                self.first_kb[p] = min(self.first_kb.get(p, rss), rss)
                self.peak_by_pid[p] = max(self.peak_by_pid.get(p, 0), rss)
        return total

    def mark(self) -> None:
        """Start counting CPU from now (the processes alive now count from here)."""
        self.sample()
        with self._lock:
            self._base = dict(self._last)

    def cpu_ms_by_kind(self) -> dict[str, float]:
        """CPU milliseconds per process kind since L{mark} (sample first)."""
        self.sample()
        out: dict[str, float] = {}
        tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
        with self._lock:
            for p, ticks in self._last.items():
                used = ticks - self._base.get(p, 0)
                kind = self._kinds.get(p, "?")
                out[kind] = out.get(kind, 0.0) + used * tick_ms
        return out

    def max_growth_kb(self) -> tuple[int, int]:
        """(pid, kB) of the process whose RSS grew most above its lowest sample."""
        best = (0, 0)
        for p, peak in self.peak_by_pid.items():
            growth = peak - self.first_kb.get(p, peak)
            if growth > best[1]:
                best = (p, growth)
        return best

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.sample()
        return self.peak_kb


# ---------------------------------------------------------------------------
# servers


def settle() -> None:
    """
    Write back what earlier runs left dirty before the next one starts
    (not timed).  The backlog scenario writes and then deletes about
    800 MB; in the full run without this, every scenario after it was
    slower for both servers (1x4KB: mailhub 553 msg/s in the first run,
    304-344 in the next two; Postfix 598, then 445-448), mailhub more,
    with twice Postfix's fsyncs per message to wait for.
    """
    os.sync()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool], interval: float = 0.05) -> None:
    """
    Return as soon as a 220 greeting arrives on 127.0.0.1:PORT.  A
    connection the kernel accepted is kept until its greeting comes (mailhub
    binds before its spool recovery and greets after it), so the return is
    as close to the greeting as the scheduler allows, however long startup takes.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("server exited during startup")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(0.5)
                data = b""
                while time.monotonic() < deadline and alive():
                    try:
                        chunk = s.recv(512)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    data += chunk
                    if data.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
                    if len(data) >= 3:
                        break  # a 421 or 554 greeting: try again
        except OSError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port} within {timeout} s")


class Sink:
    """
    Postfix's C{smtp-sink} on 127.0.0.1 (the relay scenario's remote
    server): accepts everything, keeps nothing, counts each completed DATA
    (C{-c}: C{mesg=N} on stdout, read by a thread).  Started as root it
    runs as C{nobody} (C{-u}, required there).
    """

    def __init__(self, program: str = SMTP_SINK) -> None:
        self.program = program
        self.port = 0
        self.count = 0
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def args(self) -> list[str]:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        return [self.program, "-c", *user, f"127.0.0.1:{self.port}", "256"]

    def start(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for_port(self.port, 10, lambda: self.proc is not None and self.proc.poll() is None)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        tail = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                return
            tail = (tail + chunk)[-256:]
            found = parse_sink_counter(tail.decode(errors="replace"))
            if found is not None:
                self.count = found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def parse_sink_counter(output: str) -> int | None:
    """The last C{mesg=N} of smtp-sink's C{-c} counter, or None."""
    numbers = re.findall(r"mesg=(\d+)", output)
    return int(numbers[-1]) if numbers else None


class Server:
    """A server started in its own temporary directory."""

    name = "?"
    port = 0
    #: where mail to REMOTE_DOMAIN goes (the relay scenario's smtp-sink), 0: nowhere
    relay_port = 0
    maildirs: dict[str, str]
    #: monotonic times: just before the server process was started, and
    #: when its port first answered 220
    started_at = 0.0
    ready_at = 0.0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    def kind(self, pid: int, comm: str) -> str:
        """The process kind C{pid} counts under in the CPU breakdown."""
        return comm

    def peak_rss_kb(self, sampled: int) -> int:
        return sampled

    def pss_kb(self) -> int:
        return sum(pss_kb(p) for p in self.pids())

    def rss_kb(self) -> int:
        return sum(proc_kb(p, "VmRSS") for p in self.pids())

    def delivered(self, users: Iterable[str]) -> int:
        return sum(len(os.listdir(self.maildirs[u])) for u in users)

    def log_tail(self) -> str:
        return ""


class Mailhub(Server):
    """
    C{python -m twisted mailhub --config FILE}, PYTHONPATH = the repository.

    With C{backlog}, the spool is first filled with that many deferred
    messages (L{fill_backlog}, timed as C{fill_s}), and the log is watched
    from the process start for the scheduler's "N message(s) in the
    queue" line (C{loaded}, a L{LogWatcher}).
    """

    name = "mailhub"
    #: the message history on or off (C{--history}), for every mailhub started
    history = True

    def __init__(
        self,
        base: str,
        python: str = sys.executable,
        profile: str | None = None,
        backlog: int = 0,
        size: int = 4096,
        overrides: Sequence[str] = (),
        relay_port: int = 0,
        name: str = "mailhub",
    ) -> None:
        self.base = base
        self.overrides = tuple(overrides)
        self.relay_port = relay_port
        self.name = name
        self.python = python
        self.profile = profile
        self.backlog = backlog
        self.backlog_size = size
        self.fill_s = 0.0
        self.backlog_ids: frozenset[str] = frozenset()
        self.loaded: LogWatcher | None = None
        self.proc: subprocess.Popen | None = None

    def command(self, conf: str, log: str) -> list[str]:
        tail = ["--log-format=text", f"--log-file={log}", "mailhub", "--config", conf]
        if self.profile:
            return [self.python, "-c", _PROFILE_SNIPPET, self.profile] + tail
        return [self.python, "-m", "twisted"] + tail

    def start(self) -> None:
        self.port = free_port()
        conf = os.path.join(self.base, "mailhub.toml")
        with open(conf, "w") as f:
            user = "root" if os.geteuid() == 0 else None
            overrides = self.overrides if self.history else (*self.overrides, "history.enabled=false")
            f.write(mailhub_config(self.port, overrides=overrides, user=user, relay_port=self.relay_port))
        self.maildirs = make_maildirs(os.path.join(self.base, "mailboxes"), all_users())
        if self.backlog:
            t0 = time.monotonic()
            ids = fill_backlog(os.path.join(self.base, "spool"), self.backlog, self.backlog_size)
            self.backlog_ids = frozenset(ids)
            self.fill_s = time.monotonic() - t0
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = os.path.join(self.base, "mailhub.log")
        if self.backlog:
            self.loaded = LogWatcher(self.log, QUEUE_LOADED, interval=0.002)
            self.loaded.start()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(conf, self.log), cwd=self.base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_for_port(self.port, 60 + self.backlog / 200, lambda: self.proc.poll() is None, interval=0.01)
        except RuntimeError as e:
            raise RuntimeError(f"mailhub: {e}: {self.log_tail()}") from None
        self.ready_at = time.monotonic()

    def pids(self) -> list[int]:
        # the daemon, its local delivery processes (local.delivery_processes),
        # SMTP worker processes if any, and whatever those start
        if not self.proc or self.proc.poll() is not None:
            return []
        return [self.proc.pid] + descendants_of(self.proc.pid)

    def kind(self, pid: int, comm: str) -> str:
        return mailhub_kind(pid, self.proc.pid if self.proc else -1)

    def peak_rss_kb(self, sampled: int) -> int:
        # the daemon's own high-water mark plus its children's at their
        # peak (VmHWM of each): never less than the sampled sum
        children = sum(proc_kb(p, "VmHWM") for p in descendants_of(self.proc.pid))
        return max(sampled, proc_kb(self.proc.pid, "VmHWM") + children)

    def stop(self) -> None:
        if self.loaded is not None:
            self.loaded.stop()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self) -> str:
        err = ""
        if self.proc and self.proc.poll() is not None and self.proc.stderr:
            err = self.proc.stderr.read().decode(errors="replace")[-2000:]
        try:
            with open(self.log) as f:
                return err + f.read()[-2000:]
        except OSError:
            return err


#: Runs mailhub under cProfile (the reactor thread only) and dumps the
#: statistics when the reactor has stopped (SIGTERM stops it cleanly).
_PROFILE_SNIPPET = """
import cProfile, sys
out = sys.argv[1]
sys.argv = ["twist"] + sys.argv[2:]
from twisted.application.twist import _twist
p = cProfile.Profile()
def dump():
    p.disable()
    p.dump_stats(out)
_exit_with_signal = _twist._exitWithSignal
def _exitWithSignal(sig):  # twist re-raises SIGTERM after a clean stop
    dump()
    _exit_with_signal(sig)
_twist._exitWithSignal = _exitWithSignal
Twist = _twist.Twist
p.enable()
try:
    Twist.main(sys.argv)
finally:
    dump()
"""


class Postfix(Server):
    """
    A Postfix instance whose configuration, queue, data, log and Maildirs
    all live under C{base}: C{postfix -c BASE/etc check|start|stop}.  Needs
    root (the master runs as root, its daemons as C{mail_owner} postfix).
    """

    name = "postfix"

    def __init__(self, base: str, program: str = POSTFIX, relay_port: int = 0) -> None:
        self.base = base
        self.relay_port = relay_port
        self.program = program
        self.etc = os.path.join(base, "etc")

    @staticmethod
    def available() -> str | None:
        """Why Postfix cannot be benchmarked here, or None."""
        if not os.path.exists(POSTFIX):
            return f"{POSTFIX} not found (Debian package postfix)"
        if os.geteuid() != 0:
            return "starting a Postfix instance needs root"
        try:
            pwd.getpwnam("postfix")
        except KeyError:
            return "no 'postfix' user"
        return None

    def _postfix(self, *args: str) -> None:
        r = subprocess.run([self.program, "-c", self.etc, *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()} {self.log_tail()}")

    def start(self) -> None:
        self.port = free_port()
        nobody = pwd.getpwnam("nobody")
        os.chmod(self.base, 0o755)  # postfix and nobody must reach their directories
        for d in ("etc", "queue", "data"):
            os.makedirs(os.path.join(self.base, d), exist_ok=True)
        shutil.chown(os.path.join(self.base, "data"), "postfix")
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(postfix_main_cf(self.base, nobody.pw_uid, nobody.pw_gid))
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(postfix_master_cf(self.port))
        with open(os.path.join(self.etc, "vmailbox"), "w") as f:
            f.write(postfix_vmailbox(all_users()))
        with open(os.path.join(self.etc, "transport"), "w") as f:
            f.write(postfix_transport(self.relay_port))
        self.maildirs = make_maildirs(os.path.join(self.base, "mail"), all_users(), nobody.pw_uid, nobody.pw_gid)
        self._postfix("check")  # creates the queue's subdirectories with their owners
        self._postfix("start")
        wait_for_port(self.port, 60, lambda: True)

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.base, "queue", "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        master = self.master_pid()
        if master is None or not os.path.exists(f"/proc/{master}"):
            return []
        return [master] + children_of(master)

    def stop(self) -> None:
        master = self.master_pid()
        if master is None:
            return
        subprocess.run([self.program, "-c", self.etc, "stop"], capture_output=True)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{master}") and time.monotonic() < deadline:
            time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.base, "maillog")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""


# ---------------------------------------------------------------------------
# clients


def message_bytes(size: int, serial: int) -> bytes:
    """A message of about C{size} body bytes in 78-character lines (no leading dots)."""
    line = b"Y" * 78 + b"\r\n"
    body = line * max(1, size // len(line))
    head = (
        f"From: <{SENDER}>\r\nTo: <{PROBE_USER}@{DOMAIN}>\r\nSubject: probe {serial}\r\n"
        f"Message-ID: <probe.{serial}.{time.monotonic_ns()}@{DOMAIN}>\r\n\r\n"
    ).encode()
    return head + body


class LatencyProbe(threading.Thread):
    """
    One smtplib connection, sequential transactions (MAIL, RCPT, DATA) to
    C{probe@}, each timed from MAIL FROM to the 250 after the data, until
    told to stop and at least C{minimum} are done.
    """

    def __init__(self, port: int, size: int, minimum: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.size = size
        self.minimum = minimum
        self.samples: list[float] = []
        self.error: str | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        import smtplib

        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=120) as c:
                c.ehlo("probe." + DOMAIN)
                n = 0
                while len(self.samples) < self.minimum or not self._halt.is_set():
                    msg = message_bytes(self.size, n)
                    t0 = time.perf_counter()
                    c.sendmail(SENDER, [f"{PROBE_USER}@{DOMAIN}"], msg)
                    self.samples.append(time.perf_counter() - t0)
                    n += 1
        except Exception as e:  # reported, never raised: the table says what failed
            self.error = f"{type(e).__name__}: {e}"

    def finish(self, timeout: float = 600) -> None:
        self._halt.set()
        self.join(timeout)


def recv_reply(sock: socket.socket) -> bytes:
    """Read one (possibly multi-line) SMTP reply."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
        lines = data.split(b"\r\n")
        for line in lines[:-1]:
            if len(line) >= 4 and line[3:4] == b" ":
                return data
        # a reply ends with "NNN text\r\n"


def send_big(port: int, size: int, chunk: int = 1 << 16) -> float:
    """
    Stream one message of C{size} bytes over a raw socket (never holding
    it in memory); return the seconds from MAIL FROM to the final 250.
    """
    line = b"Z" * 78 + b"\r\n"
    block = line * (chunk // len(line))
    with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
        recv_reply(s)
        s.sendall(f"EHLO big.{DOMAIN}\r\n".encode())
        recv_reply(s)
        t0 = time.perf_counter()
        for cmd in (f"MAIL FROM:<{SENDER}> SIZE={size + 200}", f"RCPT TO:<{PROBE_USER}@{DOMAIN}>", "DATA"):
            s.sendall(cmd.encode() + b"\r\n")
            reply = recv_reply(s)
            if reply[:1] not in (b"2", b"3"):
                raise RuntimeError(f"{cmd}: {reply!r}")
        s.sendall(f"From: <{SENDER}>\r\nSubject: big\r\n\r\n".encode())
        sent = 0
        while sent < size:
            piece = block if size - sent >= len(block) else line * max(1, (size - sent) // len(line))
            s.sendall(piece)
            sent += len(piece)
        s.sendall(b".\r\n")
        reply = recv_reply(s)
        elapsed = time.perf_counter() - t0
        if not reply.startswith(b"250"):
            raise RuntimeError(f"end of data: {reply!r}")
        s.sendall(b"QUIT\r\n")
        return elapsed


def open_idle(port: int, count: int) -> list[socket.socket]:
    """C{count} sessions greeted and EHLO'd, then left idle."""
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=60)
            socks.append(s)
            recv_reply(s)
            s.sendall(f"EHLO idle.{DOMAIN}\r\n".encode())
            if not recv_reply(s).startswith(b"250"):
                raise RuntimeError("EHLO refused")
    except Exception:
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def delivery_latencies(
    port: int, new_dir: str, count: int, size: int, timeout: float = 60.0, poll: float = 0.001
) -> tuple[list[float], str | None]:
    """
    Send C{count} messages to C{probe@} one at a time on one smtplib
    connection; for each, the seconds from the 250 after its data until its
    file is in C{new_dir} (the Maildir's new/, polled every C{poll} s).
    The next message goes only once the previous one is there, so each
    sample is one message's own way through the queue.  Returns the
    samples and the first error (then fewer samples).
    """
    import smtplib

    samples: list[float] = []
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as c:
            c.ehlo("new." + DOMAIN)
            for n in range(count):
                before = len(os.listdir(new_dir))
                c.sendmail(SENDER, [f"{PROBE_USER}@{DOMAIN}"], message_bytes(size, n))
                t0 = time.perf_counter()
                deadline = t0 + timeout
                while len(os.listdir(new_dir)) <= before:
                    if time.perf_counter() > deadline:
                        return samples, f"message {n + 1} not in {new_dir} after {timeout:.0f} s"
                    time.sleep(poll)
                samples.append(time.perf_counter() - t0)
    except Exception as e:  # reported, never raised: the table says what failed
        return samples, f"{type(e).__name__}: {e}"
    return samples, None


def wait_delivered(
    server: Server, users: list[str], expected: int, timeout: float, count: Callable[[], int] | None = None
) -> tuple[int, float]:
    """
    Poll the Maildirs' new/ (or C{count}: the relay scenario's sink) until
    C{expected} messages are there; (count, monotonic time).
    """
    deadline = time.monotonic() + timeout
    while True:
        n = count() if count is not None else server.delivered(users)
        now = time.monotonic()
        if n >= expected or now > deadline:
            return n, now
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# one measurement


def measure(server: Server, scenario: Scenario, smtp_source: str = SMTP_SOURCE, sink: Sink | None = None) -> dict:
    """Run one scenario against a started server; a dict of metrics (see docs/performance.rst)."""
    sampler = MemorySampler(server.pids, kind=server.kind)
    result: dict = {"ok": False, "errors": []}
    start_rss = server.rss_kb()
    result["start_rss_mb"] = start_rss / 1024
    if scenario.kind in ("load", "relay"):
        users = recipient_users(scenario.recipients)
        count = None
        if scenario.relay:
            if sink is None:
                raise RuntimeError("the relay scenario needs its smtp-sink")
            sunk = sink.count
            count = lambda: sink.count - sunk  # noqa: E731
        sampler.mark()
        sampler.start()
        cpu0 = tree_cpu_s(server.pids())
        t0 = time.monotonic()
        r = subprocess.run(smtp_source_args(scenario, server.port, smtp_source), capture_output=True, text=True)
        t1 = time.monotonic()
        accepted = parse_counter(r.stdout)
        result["errors"] += parse_errors(r.stderr)
        if r.returncode != 0 and not result["errors"]:
            result["errors"].append(f"smtp-source exited {r.returncode}")
        expected = scenario.messages * scenario.recipients
        delivered, t2 = wait_delivered(server, users, expected, timeout=max(60.0, expected / 20), count=count)
        # everything the server spent on the load: accepting and delivering
        result["cpu_ms_per_msg"] = (tree_cpu_s(server.pids()) - cpu0) * 1000 / max(1, scenario.messages)
        # ... and by process kind (main, acceptor, delivery; Postfix: smtpd, cleanup, qmgr, ...)
        for kind, ms in sorted(sampler.cpu_ms_by_kind().items()):
            result[f"cpu_ms_per_msg.{kind}"] = ms / max(1, scenario.messages)
        # Latency afterwards, on the quiet server, so that the load above is
        # smtp-source's alone (the Postfix numbers were taken so).
        probe = LatencyProbe(server.port, scenario.size, scenario.probes)
        probe.start()
        probe.finish()
        if probe.error:
            result["errors"].append("probe: " + probe.error)
        probed, _ = wait_delivered(server, [PROBE_USER], len(probe.samples), timeout=60)
        result.update(
            accepted=accepted,
            accepted_per_s=accepted / (t1 - t0),
            delivered=delivered,
            expected=expected,
            delivered_per_s=scenario.messages / (t2 - t0) if delivered >= expected else 0.0,
            lag_s=max(0.0, t2 - t1),
            p50_ms=percentile(probe.samples, 50) * 1000,
            p99_ms=percentile(probe.samples, 99) * 1000,
            probes=len(probe.samples),
        )
        result["ok"] = (
            accepted == scenario.messages
            and delivered == expected
            and probed == len(probe.samples)
            and not result["errors"]
        )
    elif scenario.kind == "idle":
        # warm up the code paths first so the delta is the sessions' cost
        warm = LatencyProbe(server.port, 4096, 3)
        warm.start()
        warm.finish()
        time.sleep(0.5)
        before = server.pss_kb()
        sampler.start()
        socks: list[socket.socket] = []
        try:
            socks = open_idle(server.port, scenario.idle)
            time.sleep(1.0)
            after = server.pss_kb()
            result["per_conn_kb"] = (after - before) / scenario.idle
            result["idle_open"] = len(socks)
            probe = LatencyProbe(server.port, 4096, scenario.probes)
            probe.start()
            probe.finish()
            if probe.error:
                result["errors"].append("probe: " + probe.error)
            result["p50_ms"] = percentile(probe.samples, 50) * 1000
            result["p99_ms"] = percentile(probe.samples, 99) * 1000
            result["ok"] = len(socks) == scenario.idle and not result["errors"]
        except Exception as e:
            result["errors"].append(f"{type(e).__name__}: {e}")
        finally:
            close_all(socks)
    elif scenario.kind == "backlog":
        sampler.start()
        try:
            measure_backlog(server, scenario, result, smtp_source)
        except Exception as e:
            result["errors"].append(f"{type(e).__name__}: {e}")
    else:  # big
        sampler.start()
        try:
            elapsed = send_big(server.port, scenario.big)
            result["p50_ms"] = result["p99_ms"] = elapsed * 1000
            delivered, _ = wait_delivered(server, [PROBE_USER], 1, timeout=300)
            result["delivered"] = delivered
            result["ok"] = delivered == 1
        except Exception as e:
            result["errors"].append(f"{type(e).__name__}: {e}")
    peak = server.peak_rss_kb(sampler.stop() if sampler.is_alive() else sampler.sample())
    result["peak_rss_mb"] = peak / 1024
    if scenario.kind == "big":
        result["rss_growth_mb"] = (peak - start_rss) / 1024
        # the target is per process: the one that received the message
        _pid, grown = sampler.max_growth_kb()
        result["proc_rss_growth_mb"] = grown / 1024
    if not result["ok"] and not result["errors"]:
        result["errors"].append("not every message arrived")
    return result


def still_queued(spool_path: str, ids: Iterable[str]) -> int:
    """
    How many of C{ids} still have their queue file (C{queue/ID}) in the
    spool (no deferred message lost or sent); -1 if there is no spool.
    """
    try:
        names = set(os.listdir(os.path.join(spool_path, "queue")))
    except OSError:
        return -1
    return sum(1 for qid in ids if qid in names)


def measure_backlog(server: Server, scenario: Scenario, result: dict, smtp_source: str = SMTP_SOURCE) -> None:
    """
    The backlog scenario on a server started over a full spool (L{Mailhub}
    with C{backlog}): startup and queue-loaded times, then new local
    messages timed from 250 to Maildir, then an smtp-source load.  Fills
    C{result}; C{ok} only if the whole backlog was loaded, every new
    message arrived and the backlog is still queued at the end.
    """
    watcher = getattr(server, "loaded", None)
    if watcher is None:
        raise RuntimeError(f"{server.name} was not started with a backlog")
    result["backlog"] = scenario.backlog
    result["fill_s"] = getattr(server, "fill_s", 0.0)
    result["startup_s"] = server.ready_at - server.started_at
    # Recovery runs before the listeners greet, so the line is there by now;
    # the wait only covers a slow log flush.
    loaded_at = watcher.wait(30)
    loaded = int(watcher.match.group(1)) if watcher.match else -1
    result["loaded"] = loaded
    if loaded_at is not None:
        result["loaded_s"] = loaded_at - server.started_at
    if loaded != scenario.backlog:
        result["errors"].append(f"scheduler loaded {loaded} message(s), not {scenario.backlog}")
    samples, error = delivery_latencies(server.port, server.maildirs[PROBE_USER], scenario.probes, scenario.size)
    if error:
        result["errors"].append("new messages: " + error)
    result.update(
        new_p50_ms=percentile(samples, 50) * 1000,
        new_p99_ms=percentile(samples, 99) * 1000,
        new_max_ms=max(samples) * 1000 if samples else math.nan,
        probes=len(samples),
    )
    t0 = time.monotonic()
    r = subprocess.run(smtp_source_args(scenario, server.port, smtp_source), capture_output=True, text=True)
    t1 = time.monotonic()
    accepted = parse_counter(r.stdout)
    result["errors"] += parse_errors(r.stderr)
    if r.returncode != 0 and not parse_errors(r.stderr):
        result["errors"].append(f"smtp-source exited {r.returncode}")
    users = recipient_users(scenario.recipients)
    expected = scenario.messages * scenario.recipients
    delivered, t2 = wait_delivered(server, users, expected, timeout=max(60.0, expected / 20))
    spool = os.path.join(getattr(server, "base", ""), "spool")
    still = still_queued(spool, getattr(server, "backlog_ids", frozenset()))
    result.update(
        accepted=accepted,
        accepted_per_s=accepted / (t1 - t0),
        delivered=delivered,
        expected=expected,
        lag_s=max(0.0, t2 - t1),
        still_queued=still,
    )
    if still < scenario.backlog:
        result["errors"].append(f"only {still} of the {scenario.backlog} deferred messages still queued")
    result["ok"] = (
        loaded == scenario.backlog
        and len(samples) == scenario.probes
        and accepted == scenario.messages
        and delivered == expected
        and still >= scenario.backlog
        and not result["errors"]
    )


# ---------------------------------------------------------------------------
# the table

#: (key, label, format) per scenario kind, in table order.
METRICS = {
    "load": [
        ("accepted_per_s", "accepted msg/s", "{:.0f}"),
        ("delivered_per_s", "delivered msg/s (end to end)", "{:.0f}"),
        ("lag_s", "last 250 -> all in Maildir, s", "{:.2f}"),
        ("cpu_ms_per_msg", "server CPU ms per message", "{:.2f}"),
        ("p50_ms", "p50 transaction ms", "{:.1f}"),
        ("p99_ms", "p99 transaction ms", "{:.1f}"),
        ("peak_rss_mb", "peak RSS MB", "{:.1f}"),
    ],
    "relay": [
        ("accepted_per_s", "accepted msg/s", "{:.0f}"),
        ("delivered_per_s", "relayed msg/s (end to end, at the sink)", "{:.0f}"),
        ("lag_s", "last 250 -> all at the sink, s", "{:.2f}"),
        ("cpu_ms_per_msg", "server CPU ms per message", "{:.2f}"),
        ("p50_ms", "p50 transaction ms (local probe)", "{:.1f}"),
        ("p99_ms", "p99 transaction ms (local probe)", "{:.1f}"),
        ("peak_rss_mb", "peak RSS MB", "{:.1f}"),
    ],
    "idle": [
        ("per_conn_kb", "memory per idle connection KB (PSS, all processes)", "{:.1f}"),
        ("p50_ms", "p50 transaction ms (while idle held)", "{:.1f}"),
        ("p99_ms", "p99 transaction ms (while idle held)", "{:.1f}"),
        ("peak_rss_mb", "peak RSS MB", "{:.1f}"),
    ],
    "big": [
        ("rss_growth_mb", "RSS growth MB (all processes)", "{:.1f}"),
        ("proc_rss_growth_mb", "RSS growth MB (the process that grew most)", "{:.1f}"),
        ("p50_ms", "transaction ms", "{:.0f}"),
        ("peak_rss_mb", "peak RSS MB", "{:.1f}"),
    ],
    "backlog": [
        ("startup_s", "startup s", "{:.2f}"),
        ("loaded_s", "queue loaded s", "{:.2f}"),
        ("new_p99_ms", "new message 250 -> Maildir p99 ms", "{:.1f}"),
        ("accepted_per_s", "accepted msg/s (with backlog)", "{:.0f}"),
        ("peak_rss_mb", "peak RSS MB", "{:.1f}"),
    ],
}


def describe(s: Scenario) -> str:
    if s.kind == "backlog":
        return f"{s.backlog} deferred queued; {s.probes} new + {s.sessions} sess x {s.messages} msg"
    if s.kind == "idle":
        return f"{s.idle} idle connections"
    if s.kind == "big":
        return f"one {s.big // (1024 * 1024)} MB message"
    size = f"{s.size // 1024} KB" if s.size < 1024 * 1024 else f"{s.size // (1024 * 1024)} MB"
    rc = f" x {s.recipients} rcpt" if s.recipients > 1 else ""
    return f"{s.sessions} sess x {s.messages} msg x {size}{rc}"


def per_run_ratios(mine: Sequence[dict], theirs: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """
    Per metric, the ratio mailhub/Postfix of each run (run N of one with
    run N of the other: the runs alternate, so a pair shares the machine's
    state), and their median, minimum and maximum.  Runs that failed or did
    not measure the metric are left out.
    """
    out: dict[str, dict[str, Any]] = {}
    keys: list[str] = []
    for r in mine:
        keys += [k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys]
    for k in keys:
        values = []
        for a, b in zip(mine, theirs, strict=False):
            if not (a.get("ok") and b.get("ok")):
                continue
            q = ratio(a.get(k), b.get(k))
            if q is not None:
                values.append(q)
        if values:
            out[k] = {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
    return out


def variants_of(targets: Sequence[str]) -> list[str]:
    """The mailhub targets (C{mailhub}, C{mailhub-syncfs}) among C{targets}."""
    return [t for t in targets if t.startswith("mailhub")]


def _row_keys(kind: str, per_target: dict) -> list[tuple[str, str, str]]:
    """METRICS[kind], with the per-process-kind CPU rows after the total."""
    rows = []
    for key, label, fmt in METRICS[kind]:
        rows.append((key, label, fmt))
        if key == "cpu_ms_per_msg":
            extra: list[str] = []
            for m in per_target.values():
                for k in (m or {}):
                    if k.startswith("cpu_ms_per_msg.") and k not in extra:
                        extra.append(k)
            rows += [(k, f"  CPU ms per message: {k.split('.', 1)[1]}", "{:.2f}") for k in sorted(extra)]
    return rows


def format_table(
    scenarios: Sequence[Scenario], medians: dict, targets: Sequence[str], ratios: dict | None = None
) -> str:
    """
    The human table: one row per metric, a column per server, then one
    ratio column per mailhub variant: mailhub/Postfix, with C{ratios}
    (L{per_run_ratios} by scenario and variant) the median of the per-run
    ratios and their range, else the ratio of the medians.
    """
    header = ["scenario", "metric"] + list(targets)
    compared = variants_of(targets) if "postfix" in targets else []
    header += [f"{v}/postfix" for v in compared]
    rows = [header]
    for s in scenarios:
        first = True
        per_target = medians.get(s.name, {})
        for key, label, fmt in _row_keys(s.kind, per_target):
            row = [f"{s.name} ({describe(s)})" if first else "", label]
            first = False
            vals = {}
            for t in targets:
                m = per_target.get(t)
                if m is not None and m.get("na"):
                    vals[t] = None
                    row.append("n/a")
                    continue
                v = m.get(key) if m else None
                vals[t] = v
                cell = "-" if v is None else fmt.format(v)
                if m is not None and not m.get("ok", False) and key == METRICS[s.kind][0][0]:
                    cell += " (FAILED)"
                row.append(cell)
            for v in compared:
                spread = (ratios or {}).get(s.name, {}).get(v, {}).get(key) if ratios is not None else None
                if spread is not None:
                    row.append(f"{spread['median']:.2f} ({spread['min']:.2f}-{spread['max']:.2f})")
                    continue
                q = ratio(vals.get(v), vals.get("postfix")) if ratios is None else None
                row.append("-" if q is None else f"{q:.2f}")
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for i, r in enumerate(rows):
        cells = (c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# main


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (inherited by both servers) for the idle scenario."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


#: The servers --targets may name, and the mailhub configuration keys of each
#: mailhub variant (on top of --mailhub-set).
TARGETS: dict[str, tuple[str, ...]] = {
    "mailhub": (),
    "mailhub-syncfs": ('spool.sync="syncfs"',),
    "postfix": (),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark mailhub against Postfix on 127.0.0.1 (see docs/performance.rst).")
    p.add_argument("--scenarios", help="comma-separated: " + ", ".join(s.name for s in FULL) + " (default: all)")
    p.add_argument("--runs", type=int, default=3, help="runs per scenario and server; medians are reported (default 3)")
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument(
        "--targets",
        default="mailhub,postfix",
        help="any of " + ", ".join(TARGETS) + " (default mailhub,postfix; mailhub-syncfs: spool.sync = \"syncfs\")",
    )
    p.add_argument(
        "--mailhub-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a mailhub configuration key for every mailhub target (repeatable; VALUE in TOML or a bare word)",
    )
    p.add_argument("--json", metavar="FILE", help="also write every run and the medians as JSON")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs mailhub (default: this one)")
    p.add_argument("--smtp-source", default=SMTP_SOURCE, help=f"load generator (default {SMTP_SOURCE})")
    p.add_argument("--smtp-sink", default=SMTP_SINK, help=f"the relay scenario's remote server (default {SMTP_SINK})")
    p.add_argument("--profile", metavar="DIR", help="run mailhub under cProfile; stats to DIR/SCENARIO-RUN.prof")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories (logs, queues, Maildirs)")
    p.add_argument("--workdir", default=None, help="where the temporary directories go (default: $TMPDIR)")
    p.add_argument("--history", choices=("on", "off"), default="on",
                   help="mailhub's message history (history.enabled; default on): compare both for its cost")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in args.targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r} (known: {', '.join(TARGETS)})")
    for text in args.mailhub_set:
        try:
            parse_override(text)
        except ValueError as e:
            p.error(f"--mailhub-set {e}")
    try:
        args.scenario_list = select_scenarios(args.scenarios.split(",") if args.scenarios else None, args.quick)
    except ValueError as e:
        p.error(str(e))
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    Mailhub.history = args.history == "on"
    if not os.path.exists(args.smtp_source):
        print(f"bench: {args.smtp_source} not found (Debian package postfix)", file=sys.stderr)
        return 2
    targets = list(args.targets)
    if "postfix" in targets:
        why = Postfix.available()
        if why:
            print(f"bench: skipping Postfix: {why}", file=sys.stderr)
            targets.remove("postfix")
    nofile = raise_nofile()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    runs: dict = {s.name: {t: [] for t in targets} for s in args.scenario_list}
    notes: dict[str, str] = {}
    failed = False
    for n in range(args.runs):
        for s in args.scenario_list:
            for t in targets:
                why = unsupported(s, t)
                if why:
                    notes[f"{s.name} on {t}"] = why
                    continue
                base = tempfile.mkdtemp(prefix=f"mailhub-bench-{t}-{s.name}-", dir=args.workdir)
                sink = Sink(args.smtp_sink) if s.relay else None
                print(f"[run {n + 1}/{args.runs}] {s.name} on {t} ...", file=sys.stderr, flush=True)
                settle()
                server: Server | None = None
                try:
                    if sink is not None:
                        sink.start()
                    relay_port = sink.port if sink is not None else 0
                    if t.startswith("mailhub"):
                        prof = os.path.join(args.profile, f"{t}-{s.name}-{n + 1}.prof") if args.profile else None
                        server = Mailhub(
                            base, args.python, prof, backlog=s.backlog, size=s.size,
                            overrides=[*args.mailhub_set, *TARGETS[t]], relay_port=relay_port, name=t,
                        )  # fmt: skip
                    else:
                        server = Postfix(base, relay_port=relay_port)
                    server.start()
                    r = measure(server, s, args.smtp_source, sink)
                except Exception as e:
                    r = {"ok": False, "errors": [f"{type(e).__name__}: {e}"]}
                finally:
                    if server is not None:
                        server.stop()
                    if sink is not None:
                        sink.stop()
                if not r.get("ok"):
                    failed = True
                    tail = server.log_tail()[-800:] if server is not None else ""
                    print(f"  FAILED: {r.get('errors')} {tail}", file=sys.stderr)
                else:
                    summary = ", ".join(
                        f"{k}={r[k]:.1f}" for k, _l, _f in METRICS[s.kind] if isinstance(r.get(k), float)
                    )
                    print(f"  {summary}", file=sys.stderr)
                runs[s.name][t].append(r)
                if args.keep:
                    print(f"  kept {base}", file=sys.stderr)
                else:
                    shutil.rmtree(base, ignore_errors=True)
                if args.profile and t.startswith("mailhub"):
                    print_profile(os.path.join(args.profile, f"{t}-{s.name}-{n + 1}.prof"))
    medians = {name: {t: medians_or_na(rs) for t, rs in per.items()} for name, per in runs.items()}
    ratios = {
        name: {v: per_run_ratios(per[v], per["postfix"]) for v in variants_of(targets) if "postfix" in per}
        for name, per in runs.items()
    }
    print(f"\n$ {command}")
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"medians of {args.runs} run(s), RLIMIT_NOFILE {nofile}"
    )
    if args.mailhub_set:
        print("mailhub configuration overrides: " + " ".join(args.mailhub_set))
    print(format_table(args.scenario_list, medians, targets, ratios))
    for what, why in notes.items():
        print(f"n/a: {what}: {why} (docs/performance.rst)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "command": command,
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "scenarios": [asdict(s) for s in args.scenario_list],
                    "runs": runs,
                    "medians": medians,
                    "notes": notes,
                    "mailhub_set": args.mailhub_set,
                    # per scenario and mailhub variant, per metric: the median
                    # of the per-run ratios to Postfix, their min, max and values
                    "ratios": ratios,
                },
                f,
                indent=2,
                default=str,
            )
    return 1 if failed else 0


def print_profile(path: str, lines: int = 15) -> None:
    """The top of a cProfile dump by internal time, to stderr."""
    import pstats

    if not os.path.exists(path):
        print(f"  (no profile at {path})", file=sys.stderr)
        return
    pstats.Stats(path, stream=sys.stderr).sort_stats("tottime").print_stats(lines)


if __name__ == "__main__":
    sys.exit(main())
