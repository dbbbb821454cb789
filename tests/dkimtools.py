"""
OpenDKIM as the independent verifier of mailhub's signatures.  A helper
module, not a test file: tests import from it.

L{run_testmsg} runs C{opendkim-testmsg} (Debian opendkim-tools), which looks
keys up through the system resolver on port 53 only: each run gets a
network and mount namespace of its own (C{unshare}, root), where loopback
is up, /etc/resolv.conf is bind-mounted to say 127.0.0.1, and
tests/dnsserve.py serves the zone with twisted.names on 127.0.0.1:53 --
nothing outside the namespace is touched or reached.  L{opendkim_test}
runs C{opendkim -t} with the keys in a C{TestPublicKeys} file instead, and
returns the Authentication-Results it would add.

Owns: running the tools and reading their answers.  Holds no assertions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import require_tool

__all__ = ["run_testmsg", "opendkim_test", "only_signatures", "crlf", "zone_from_keygen"]

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = r"""
set -u
ip link set lo up || exit 97
mount --bind "$DIR/resolv.conf" /etc/resolv.conf || exit 98
"$PY" "$HERE/dnsserve.py" "$DIR/zone.json" 53 > "$DIR/dns.out" 2>&1 &
server=$!
n=0
until grep -q ready "$DIR/dns.out"; do
  n=$((n + 1)); [ $n -gt 200 ] && { cat "$DIR/dns.out" >&2; kill $server; exit 99; }
  sleep 0.05
done
for f in "$DIR"/msg.*; do
  "$TESTMSG" < "$f" > "$f.out" 2>&1
  echo "$(basename "$f") $?"
done
kill $server
"""


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def only_signatures(message: bytes, algorithm: str) -> bytes:
    """C{message} (CRLF from now on) without the DKIM-Signature fields of other algorithms (a=)."""
    message = crlf(message)
    fields = re.findall(rb"DKIM-Signature:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", message)
    assert fields, "no DKIM-Signature field"
    out = message
    for f in fields:
        if f"a={algorithm};".encode() not in re.sub(rb"\s+", b"", f):
            out = out.replace(f, b"", 1)
    return out


def zone_from_keygen(output: str) -> dict[str, list[str]]:
    """The TXT records of C{mailhub dkim keygen}'s printed zone lines."""
    zone: dict[str, list[str]] = {}
    for line in output.splitlines():
        m = re.match(r'^(\S+)\. IN TXT \(? ?((?:"[^"]*" ?)+)\)?$', line)
        if m:
            zone.setdefault(m.group(1), []).append("".join(re.findall(r'"([^"]*)"', m.group(2))))
    return zone


def run_testmsg(tmp_path, messages: list[bytes], zone: dict[str, list[str]]) -> list[tuple[int, str]]:
    """(exit status, output) of opendkim-testmsg for each message, keys from C{zone}."""
    tool = require_tool("opendkim-testmsg")
    require_tool("unshare")
    require_tool("ip")
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("opendkim-testmsg needs root here (a namespace with its own port 53)")
        pytest.skip("opendkim-testmsg needs root (a namespace with its own port 53)")
    d = tmp_path / "testmsg"
    d.mkdir(exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    (d / "zone.json").write_text(json.dumps(zone))
    (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    for i, m in enumerate(messages):
        (d / f"msg.{i:03d}").write_bytes(crlf(m))
    env = dict(os.environ, DIR=str(d), PY=sys.executable, HERE=HERE, TESTMSG=tool,
               PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", SCRIPT], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    status = dict(line.split() for line in r.stdout.splitlines())
    return [(int(status[f"msg.{i:03d}"]), (d / f"msg.{i:03d}.out").read_text()) for i in range(len(messages))]


def opendkim_test(tmp_path, message: bytes, zone: dict[str, list[str]]) -> str:
    """The Authentication-Results C{opendkim -t} adds, keys from a TestPublicKeys file."""
    tool = require_tool("opendkim")
    d = tmp_path / "opendkim-t"
    d.mkdir(exist_ok=True)
    (d / "keys").write_text("".join(f"{name} {text}\n" for name, texts in zone.items() for text in texts))
    (d / "opendkim.conf").write_text(f"Mode v\nTestPublicKeys {d / 'keys'}\nSyslog no\n")
    (d / "msg").write_bytes(crlf(message))
    r = subprocess.run([tool, "-x", str(d / "opendkim.conf"), "-t", str(d / "msg"), "-vvv"],
                       capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr
