"""
A twisted.names DNS server for one test: serves the TXT records of a JSON
file ({"name": ["text", ...]}) on 127.0.0.1:PORT (UDP and TCP) and writes
"ready" to stdout once listening.  Names listed under the key "_slow" are
answered only after a minute (a server that does not answer in time); with
a third argument, every query is appended to that file ("NAME TYPE").  Run by tests (inside a network namespace
of their own for tools that only ask port 53: tests/test_e2e_dkim.py).  A
helper, not a test file; holds no assertions.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import reactor, task
from twisted.names import dns, server

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dnszone import Zone  # noqa: E402


def main() -> None:
    path, port = sys.argv[1], int(sys.argv[2])
    queries = open(sys.argv[3], "a", buffering=1) if len(sys.argv) > 3 else None  # noqa: SIM115
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    slow = {n.lower() for n in data.pop("_slow", [])}
    records = {
        name: [dns.Record_TXT(*[t[i : i + 250].encode() for i in range(0, len(t), 250)], ttl=60) for t in texts]
        for name, texts in data.items()
    }

    class TestZone(Zone):
        def _lookup(self, name, cls, type, timeout=None):
            if queries is not None:
                queries.write(f"{name.decode()} {dns.QUERY_TYPES.get(type, type)}\n")
            answer = super()._lookup(name, cls, type, timeout)
            if name.decode().lower() in slow:
                return task.deferLater(reactor, 60, lambda: answer)
            return answer

    zone = TestZone("test", records)
    factory = server.DNSServerFactory(authorities=[zone])
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
