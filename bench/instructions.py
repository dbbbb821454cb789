#!/usr/bin/env python3
"""
Instructions per message of each mailhub process, counted by valgrind's
callgrind: a measure of "how much Python per message" that does not move
with the load of a shared machine, unlike CPU seconds.

Owns: starting one mailhub (the configuration of L{run.mailhub_config})
under C{valgrind --tool=callgrind --trace-children=yes
--instr-atstart=no}, warming it up (a few messages to C{probe@}, so the
delivery processes have imported what they need), switching
instrumentation on for the daemon and its children only while an
C{smtp-source} load runs and is delivered, and adding up each process's
instruction count (C{Ir}) by kind (main, delivery, acceptor).

Must not touch: anything outside its temporary directory (kept with
C{--keep} for C{callgrind_annotate}).

Usage::

    python bench/instructions.py                       # 1x4KB, 20x4KB, 5rcpt, 200 messages each
    python bench/instructions.py --scenarios 1x4KB --messages 300 --root /path/to/another/checkout

Each run takes a minute or two (Python runs about 50 times slower under
callgrind).  Runs must not overlap: C{callgrind_control} is given the
process ids, but two loads at once still share the machine's time.
Needs valgrind (Debian package C{valgrind}) and smtp-source (C{postfix}).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (bench/ is not a package)

#: scenario name -> (sessions, recipients, message size)
SHAPES = {"1x4KB": (1, 1, 4096), "20x4KB": (20, 1, 4096), "5rcpt": (1, 5, 4096), "20x1MB": (20, 1, 1 << 20)}


def _control(action: str, pids: list[int]) -> None:
    for pid in pids:
        subprocess.run(["callgrind_control", action, str(pid)], capture_output=True)


def kind_of(cmdline: str) -> str:
    """The process kind of a callgrind output file's C{cmd:} line."""
    if "localchild" in cmdline:
        return "delivery"
    if "mailhub --config" in cmdline:
        return "main"
    return "acceptor" if "python" in cmdline else "other"


def count(base: str) -> dict[str, int]:
    """Instructions per process kind in the part-1 dumps (the load) under C{base}."""
    totals: dict[str, int] = {}
    for path in glob.glob(os.path.join(base, "callgrind.*.1")):
        with open(path, errors="replace") as f:
            text = f.read()
        cmd = re.search(r"^cmd: (.*)$", text, re.M)
        ir = re.search(r"^totals: (\d+)", text, re.M)
        if cmd and ir:
            kind = kind_of(cmd.group(1))
            totals[kind] = totals.get(kind, 0) + int(ir.group(1))
    return totals


def measure(name: str, messages: int, root: str, python: str, keep: bool) -> dict[str, float]:
    """Millions of instructions per message by process kind for one scenario."""
    sessions, recipients, size = SHAPES[name]
    base = tempfile.mkdtemp(prefix=f"mailhub-instructions-{name}-")
    port = bench.free_port()
    conf = os.path.join(base, "mailhub.toml")
    with open(conf, "w") as f:
        f.write(bench.mailhub_config(port, user="root" if os.geteuid() == 0 else None))
    maildirs = bench.make_maildirs(os.path.join(base, "mailboxes"), bench.all_users())
    command = [
        "valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no",
        f"--callgrind-out-file={base}/callgrind.%p",
        python, "-m", "twisted", "--log-format=text", f"--log-file={base}/mailhub.log", "mailhub", "--config", conf,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=root)
    with open(os.path.join(base, "valgrind.log"), "w") as err:
        proc = subprocess.Popen(command, cwd=base, env=env, stdout=subprocess.DEVNULL, stderr=err)
    server = bench.Server()
    server.maildirs = maildirs
    try:
        bench.wait_for_port(port, 600, lambda: proc.poll() is None, 0.2)
        warm = bench.LatencyProbe(port, 4096, 5)
        warm.start()
        warm.finish()
        bench.wait_delivered(server, [bench.PROBE_USER], 5, 600)
        time.sleep(2)
        pids = [proc.pid] + bench.descendants_of(proc.pid)
        _control("--instr=on", pids)
        scenario = bench.Scenario(name, sessions=sessions, messages=messages, size=size, recipients=recipients)
        subprocess.run(bench.smtp_source_args(scenario, port), capture_output=True)
        users = bench.recipient_users(recipients)
        delivered, _ = bench.wait_delivered(server, users, messages * recipients, 600)
        time.sleep(1)
        _control("--instr=off", pids)
        _control("--dump", pids)
        time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(300)
    totals = count(base)
    if delivered != messages * recipients:
        raise RuntimeError(f"{name}: {delivered} of {messages * recipients} delivered ({base})")
    if keep:
        print(f"  kept {base}", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)
    return {kind: ir / messages / 1e6 for kind, ir in sorted(totals.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Instructions per message of mailhub's processes (callgrind).")
    p.add_argument("--scenarios", default="1x4KB,20x4KB,5rcpt", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--messages", type=int, default=200, help="messages per scenario (default 200)")
    p.add_argument("--root", default=bench.ROOT, help="the checkout whose mailhub is measured (PYTHONPATH)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--keep", action="store_true", help="keep the callgrind files for callgrind_annotate")
    args = p.parse_args(argv)
    if not shutil.which("valgrind"):
        print("instructions: valgrind not found (Debian package valgrind)", file=sys.stderr)
        return 2
    for name in args.scenarios.split(","):
        if name not in SHAPES:
            p.error(f"unknown scenario {name!r}")
        result = measure(name, args.messages, os.path.abspath(args.root), args.python, args.keep)
        cells = ", ".join(f"{kind} {m:.2f}" for kind, m in result.items())
        print(f"{name}: M instructions per message: {cells} (total {sum(result.values()):.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
