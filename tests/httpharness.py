"""
The HTTP API in memory (not a test file): the real Site and HTTP parser of
mailhub.web.api over a StringTransport, with a real spool in tmp_path, a
real users file with tokens for alice (a user) and root (an admin), a
task.Clock and a fake scheduler.

Owns: L{Env} (one such API and C{request()} on it), L{Response} (status,
headers and body of one answer), L{FakeScheduler}, and the two ways of
submitting a message every API test uses (L{message_json}, L{post_json}).
Must not hold assertions about the API's answers: those stay in the test
files (test_httpapi, test_httpapi_input, test_httplimits).
"""

from __future__ import annotations

import json
import os

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailhub.metrics import MailMetrics, spool_queue_stats
from mailhub.queue.spool import Spool
from mailhub.users import UsersFile
from mailhub.web.api import make_http_site

__all__ = ["Env", "FakeScheduler", "Response", "message_json", "post_json"]


class FakeScheduler:
    def __init__(self) -> None:
        self.enqueued: list = []
        self.flushed: list = []

    def enqueue(self, env) -> None:
        self.enqueued.append(env)

    def flush(self, queue_id=None) -> str:
        """As Scheduler.flush: KeyError if not queued; "held" for the one message named when on hold."""
        if queue_id is not None and queue_id not in ("0000000000000AAAAA", "0000000000000HHHHH"):
            raise KeyError(queue_id)
        self.flushed.append(queue_id)
        return "held" if queue_id == "0000000000000HHHHH" else "flushed"


class Env:
    def __init__(self, tmp_path, max_body=100_000, run=None) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.spool = Spool(str(tmp_path / "spool"), fsync=False)
        self.users = UsersFile(str(tmp_path / "users"), rounds=4)
        self.users.add("alice@example.com", "secret-a")
        self.users.add("root@example.com", "secret-r")
        self.alice = self.users.add_token("alice@example.com")
        self.root = self.users.add_token("root@example.com")
        self.scheduler = FakeScheduler()
        self.metrics = MailMetrics(self.clock, spool_queue_stats(self.spool))
        self.site = make_http_site(
            self.spool, self.scheduler.enqueue, self.scheduler, self.users, self.metrics, "mx.example.com",
            max_body=max_body, run=run, admins=["root@example.com"], clock=self.clock,
        )

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None, token: str | None = None,
                raw: bytes | None = None):
        proto = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        proto.makeConnection(transport)
        if raw is None:
            h = {"Host": "localhost", "Content-Length": str(len(body))}
            if token:
                h["Authorization"] = f"Bearer {token}"
            h.update(headers or {})
            head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
            raw = head.encode() + body
        proto.dataReceived(raw)
        return Response(transport.value(), transport)


class Response:
    def __init__(self, data: bytes, transport) -> None:
        self.raw = data
        self.transport = transport
        head, _, self.body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0] else 0
        self.headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()

    def json(self):
        return json.loads(self.body)


def message_json(**kw):
    data = {"from": "alice@example.com", "to": ["bob@example.org"], "subject": "Hi", "text": "Hello Bob\n"}
    data.update(kw)
    return json.dumps(data).encode()


def post_json(env, body, token="alice"):
    return env.request("POST", "/v1/messages", body, {"Content-Type": "application/json"},
                       token=getattr(env, token) if token in ("alice", "root") else token)


# -- the OpenAPI document (docs/openapi.json) ----------------------------------------------------

OPENAPI = os.path.join(os.path.dirname(__file__), "..", "docs", "openapi.json")


def openapi() -> dict:
    with open(OPENAPI) as f:
        return json.load(f)


def conforms(value, schema: dict, doc: dict) -> bool:
    """A JSON Schema check for the keywords docs/openapi.json uses ($ref, oneOf, type, enum, items, properties)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        if not conforms(value, doc["components"]["schemas"][name], doc):
            return False
    if "oneOf" in schema and sum(conforms(value, s, doc) for s in schema["oneOf"]) != 1:
        return False
    types = {"string": str, "array": list, "object": dict, "integer": int, "number": (int, float), "null": type(None),
             "boolean": bool}
    if "type" in schema:
        wanted = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(isinstance(value, types[t]) and not (t != "boolean" and isinstance(value, bool)) for t in wanted):
            return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, list) and "items" in schema and not all(conforms(v, schema["items"], doc) for v in value):
        return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if any(k not in value for k in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and any(k not in props for k in value):
            return False
        if not all(conforms(v, props[k], doc) for k, v in value.items() if k in props):
            return False
    return True
