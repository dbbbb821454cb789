"""
The HTTP interface: a JSON API to submit and follow messages, the
Prometheus C{/metrics} endpoint and the status page, on one twisted.web
L{Site}.

Owns: the routes (L{ROUTES}, which docs/openapi.json must describe), bearer
token authentication (tokens from L{mailhub.users.UsersFile}), turning a
JSON request into a MIME message (the C{email} package), the request body
limit (enforced while the body arrives, before it is stored), and the JSON
error format C{{"error": TEXT, "code": HTTP_STATUS}}.

Must not touch: the spool's files (only L{Spool.new_message} and
L{SpoolWriter.commit}, as smtpd does), delivery, configuration files.  A
C{202} is given only after the commit returned ("durable before 250"): any spool
error before that is a C{503} (C{507} when the disk is full) and nothing is
queued.

C{/metrics} and the status page need no token: the HTTP listener is meant
to bind loopback (C{tcp:8080:interface=127.0.0.1}) or sit behind a proxy.
"""

from __future__ import annotations

import email.policy
import email.utils
import errno
import json
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from mailhub import address
from mailhub.envelope import DELIVERED, FAILED, PENDING, Envelope, Recipient
from mailhub.maillog import mail_event
from mailhub.queue.queuefile import is_queue_id
from mailhub.queue.status import FLUSHED, HELD
from mailhub.rfc5322 import address_literal, after_trace_header, complete_header, format_date, trace_header
from mailhub.web.limits import ConnectionLimits, LimitedConnection, RefusedConnection

__all__ = ["make_http_site", "ApiSite", "ApiResource", "ROUTES", "DEFAULT_MAX_BODY", "HttpError"]

log = Logger()

#: 10240000 bytes of message (Postfix message_size_limit) as base64 in JSON, plus headroom.
DEFAULT_MAX_BODY = 14 * 1024 * 1024

#: (method, path pattern) of every route; {id} is a queue id.  docs/openapi.json describes each.
ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/"),
    ("GET", "/status"),
    ("GET", "/metrics"),
    ("POST", "/v1/messages"),
    ("GET", "/v1/messages"),
    ("GET", "/v1/messages/{id}"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/queue"),
    ("POST", "/v1/queue/flush"),
)

_JSON = "application/json"
#: the status page needs nothing but its own inline style
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'none'"


class HttpError(Exception):
    """An error answer: HTTP C{status} with C{{"error": text, "code": status}}."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers or {}


def _unauthorized(text: str) -> HttpError:
    return HttpError(401, text, {"WWW-Authenticate": 'Bearer realm="mailhub"'})


# -- the request body limit ------------------------------------------------------------------


class CappedRequest(server.Request):
    """
    A request whose body may not exceed C{site.max_body} bytes.  A larger
    C{Content-Length} is refused with 413 as soon as the headers are in; a
    chunked body is counted as it arrives.  Either way nothing beyond the
    limit is stored, and the connection is closed after the answer (the
    client is still sending).
    """

    _refused = False
    _received = 0

    def _limit(self) -> int:
        site: Any = getattr(self.channel, "site", None)
        return getattr(site, "max_body", DEFAULT_MAX_BODY)

    def _limits(self) -> Any:
        """The L{LimitedConnection} this request arrived on, if any."""
        transport = getattr(getattr(self, "channel", None), "transport", None)
        return transport if isinstance(transport, LimitedConnection) else None

    def gotLength(self, length: int | None) -> None:
        # called once the whole header is in
        connection = self._limits()
        if connection is not None:
            connection.header_complete()
        super().gotLength(length)
        if length is not None and length > self._limit():
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._refused = True
        # no "100 Continue" after this answer (the channel looks after gotLength)
        self.requestHeaders.removeHeader(b"expect")
        self._answer_and_close(413, b"Content Too Large", f"request body larger than {self._limit()} bytes")

    def _answer_and_close(self, status: int, reason: bytes, text: str) -> None:
        """Answer with the JSON error body outside the resource tree, and close."""
        body = _error_body(status, text)
        head = (
            b"HTTP/1.1 " + str(status).encode() + b" " + reason + b"\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n"
        )
        transport = self.channel.transport
        if self.channel.requests and self.channel.requests[0] is not self:
            # an earlier pipelined request is still being answered: do not
            # interleave; just close (rare, and the client misbehaves anyway)
            self.channel.loseConnection()
            return
        assert transport is not None  # the channel is connected: it just read this request
        transport.write(head + body)
        self.channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        connection = self._limits()
        if connection is not None:
            connection.request_complete()
        # twisted.web parses form bodies itself (and answers a bare 400 when
        # they are malformed); the API takes none
        ctype = (self.requestHeaders.getRawHeaders(b"content-type") or [b""])[0]
        if command == b"POST" and ctype.split(b";")[0].strip().lower() == b"multipart/form-data" and not self._refused:
            self._refused = True
            self._answer_and_close(415, b"Unsupported Media Type", "Content-Type must be application/json or message/rfc822")
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        if self._refused:
            return
        super().process()

    def finish(self) -> None:
        connection = self._limits()
        super().finish()
        if connection is not None:
            connection.answered()


class ApiSite(server.Site):
    """
    A L{server.Site} with a body limit (C{max_body}), L{CappedRequest}s and,
    given C{limits}, deadlines and connection caps (L{mailhub.web.limits}).
    """

    requestFactory = CappedRequest
    noisy = False  # no "Starting factory" line at start and stop (mailhub/loglevel.py)

    def __init__(
        self, root: resource.IResource, max_body: int = DEFAULT_MAX_BODY, limits: ConnectionLimits | None = None, **kwargs: Any
    ) -> None:
        super().__init__(root, **kwargs)
        self.max_body = max_body
        self.limits = limits

    def buildProtocol(self, addr: Any) -> Any:
        if self.limits is None:
            return super().buildProtocol(addr)
        ip = str(getattr(addr, "host", ""))
        over = self.limits.over(ip)
        if over is not None:
            return RefusedConnection(ip, over)
        return LimitedConnection(self.limits, ip, super().buildProtocol(addr))


def _error_body(status: int, text: str) -> bytes:
    return json.dumps({"error": text, "code": status}).encode("utf-8") + b"\n"


# -- the API ----------------------------------------------------------------------------


def _match(pattern: str, path: str) -> dict[str, str] | None:
    p_parts = pattern[1:].split("/")
    parts = path[1:].split("/")
    if pattern == "/":
        return {} if path == "/" else None
    if len(p_parts) != len(parts):
        return None
    found = {}
    for want, have in zip(p_parts, parts, strict=True):
        if want.startswith("{"):
            if not have:
                return None
            found[want[1:-1]] = have
        elif want != have:
            return None
    return found


class ApiResource(resource.Resource):
    """The one resource behind every route; dispatches on L{ROUTES}."""

    isLeaf = True

    def __init__(
        self,
        spool: Any,
        enqueue: Callable[[Envelope], None],
        scheduler: Any,
        users: Any,
        metrics: Any,
        hostname: str,
        status_page: Any = None,
        run: Callable[..., Any] | None = None,
        resolve_recipient: Callable[[str], Sequence[str]] | None = None,
        admins: Collection[str] = (),
        max_recipients: int = 1000,
        event_log: str | None = None,
        separator: str = "+",
        clock: Any = None,
        ratelimit: Any = None,
        history: Any = None,
    ) -> None:
        """
        @param spool: L{mailhub.queue.spool.Spool}.
        @param enqueue: C{scheduler.enqueue}, called after each commit.
        @param scheduler: for C{POST /v1/queue/flush} (C{flush(queue_id=None)}).
        @param users: L{mailhub.users.UsersFile} (C{check_token}, C{may_send_as}).
        @param metrics: L{mailhub.metrics.MailMetrics} or C{None}.
        @param status_page: a L{mailhub.web.statuspage.StatusPage}, C{"default"} for
            one over C{metrics}, or C{None} to disable C{/} and C{/status}.
        @param run: how the blocking spool commit runs: C{deferToThread} in the
            daemon, synchronous (the default) in tests.
        @param resolve_recipient: alias/extension resolution of a recipient
            (e.g. C{lambda a: directory.resolve(parse_mailbox(a))} for local
            domains); C{None} queues recipients as given.
        @param admins: users allowed to list the whole queue and flush it.
        @param event_log: the JSON event log, to answer for messages that left the queue.
        @param ratelimit: the L{mailhub.ratelimit.limits.RateLimits} (per API
            token: messages and recipients per hour; 429 over them), or C{None}.
        @param history: the history store (L{mailhub.history.store.Store}),
            or (store, the recorder's C{flush}):
            C{GET /v1/messages}, C{/v1/stats}, messages that left the queue,
            the status page's history (L{mailhub.web.history}).
        """
        super().__init__()
        if status_page == "default":
            status_page = None
            if metrics is not None:
                from mailhub.web.statuspage import StatusPage

                status_page = StatusPage(metrics, hostname)
        from mailhub.web.history import HistoryRoutes

        self.history = None
        if history is not None:
            store, flush = history if isinstance(history, tuple) else (history, None)
            self.history = HistoryRoutes(store, self._run_query, self._is_admin, flush)
        if status_page is not None and self.history is not None:
            status_page.history = self.history
        self.spool = spool
        self.enqueue = enqueue
        self.scheduler = scheduler
        self.users = users
        self.metrics = metrics
        self.hostname = hostname
        self.status_page = status_page
        self.run = run or defer.maybeDeferred
        self.resolve_recipient = resolve_recipient
        self.admins = {a.lower() for a in admins}
        self.max_recipients = max_recipients
        self.event_log = event_log
        self.separator = separator
        self.ratelimit = ratelimit
        self.clock = clock if clock is not None else getattr(metrics, "clock", None)
        self._handlers: dict[tuple[str, str], Callable[..., Any]] = {
            ("GET", "/"): self.get_status,
            ("GET", "/status"): self.get_status,
            ("GET", "/metrics"): self.get_metrics,
            ("POST", "/v1/messages"): self.post_message,
            ("GET", "/v1/messages"): self.get_messages,
            ("GET", "/v1/messages/{id}"): self.get_message,
            ("GET", "/v1/stats"): self.get_stats,
            ("GET", "/v1/queue"): self.get_queue,
            ("POST", "/v1/queue/flush"): self.post_flush,
        }
        assert set(self._handlers) == set(ROUTES)

    def _now(self) -> float:
        if self.clock is not None:
            return self.clock.seconds()
        import time

        return time.time()

    # -- dispatch ----------------------------------------------------------------

    def render(self, request: server.Request) -> Any:
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        allowed = []
        handler: Callable[..., Any] | None = None
        params: dict[str, str] = {}
        for route_method, pattern in ROUTES:
            found = _match(pattern, path)
            if found is None:
                continue
            allowed.append(route_method)
            if route_method == method or (method == "HEAD" and route_method == "GET"):
                handler, params = self._handlers[(route_method, pattern)], found
        if handler is None:
            if allowed:
                self._send(request, HttpError(405, f"method {method} not allowed", {"Allow": ", ".join(sorted(set(allowed)))}))
            else:
                self._send(request, HttpError(404, "no such resource"))
            return server.NOT_DONE_YET
        d = defer.maybeDeferred(handler, request, **params)
        d.addCallbacks(lambda answer: self._send(request, answer), lambda f: self._failed(request, f))
        return server.NOT_DONE_YET

    def _failed(self, request: server.Request, failure: Any) -> None:
        if failure.check(HttpError):
            self._send(request, failure.value)
            return
        log.failure(
            "HTTP {method} {path} failed", failure,
            method=request.method.decode("latin-1"), path=request.path.decode("latin-1"),
        )
        self._send(request, HttpError(500, "internal error"))

    def _send(self, request: server.Request, answer: Any) -> None:
        """Write C{answer}: an L{HttpError}, C{(status, dict)}, or C{(status, bytes, content type)}."""
        if request.finished or getattr(request, "_disconnected", False):
            return
        headers: dict[str, str] = {}
        if isinstance(answer, HttpError):
            status, body, ctype = answer.status, _error_body(answer.status, answer.text), _JSON
            headers = answer.headers
        elif len(answer) == 2:
            status, data = answer
            body = json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"
            ctype = _JSON
        elif len(answer) == 3:
            status, body, ctype = answer
        else:
            status, body, ctype, headers = answer
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", ctype.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        for k, v in headers.items():
            request.setHeader(k.encode("ascii"), v.encode("utf-8"))
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    # -- authentication -------------------------------------------------------------

    def _user(self, request: server.Request) -> str:
        if len(request.requestHeaders.getRawHeaders(b"authorization", [])) > 1:
            raise HttpError(400, "more than one Authorization header")
        header = _header(request, b"authorization")
        if header is None:
            raise _unauthorized("missing bearer token")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("expected Authorization: Bearer TOKEN")
        if self.users is None:
            raise _unauthorized("no API users configured")
        user = self.users.check_token(token.strip())
        if user is None:
            raise _unauthorized("invalid token")
        return user

    def _is_admin(self, user: str) -> bool:
        return user.lower() in self.admins

    # -- pages --------------------------------------------------------------------

    def get_status(self, request: server.Request) -> Any:
        if self.status_page is None:
            raise HttpError(404, "status page disabled")
        headers = {"Content-Security-Policy": _CSP}
        if self.history is not None:
            chosen = _query(request).get("range", [""])[0]
            d = self.history.page(self.status_page, chosen, self._now())
            return d.addCallback(lambda html: (200, html, "text/html; charset=utf-8", headers))
        return (200, self.status_page.render_html(), "text/html; charset=utf-8", headers)

    # -- history (mailhub.web.history) ----------------------------------------------

    def _run_query(self, f: Callable[..., Any], *args: Any) -> Any:
        return defer.maybeDeferred(self.run, f, *args)

    def _history(self) -> Any:
        if self.history is None:
            raise HttpError(404, "history disabled (history.enabled)")
        return self.history

    def get_messages(self, request: server.Request) -> Any:
        user = self._user(request)
        return self._history().get_messages(_query(request), user, self._now())

    def get_stats(self, request: server.Request) -> Any:
        user = self._user(request)
        return self._history().get_stats(_query(request), user, self._now())

    def get_metrics(self, request: server.Request) -> Any:
        from mailhub.metrics import CONTENT_TYPE

        if self.metrics is None:
            raise HttpError(404, "metrics disabled")
        return (200, self.metrics.exposition(), CONTENT_TYPE)

    # -- queue --------------------------------------------------------------------

    def _envelope_json(self, env: Envelope) -> dict[str, Any]:
        return {
            "queue_id": env.queue_id,
            "state": "held" if env.held else ("done" if env.done else "queued"),
            "sender": env.sender,
            "arrival": env.arrival,
            "next_attempt": env.next_attempt,
            "attempts": env.attempts,
            "size": env.esmtp.get("size"),
            "recipients": [
                {
                    "address": r.address,
                    "original": r.original,
                    "state": r.state,
                    "attempts": r.attempts,
                    "last_code": r.last_code,
                    "last_status": r.last_status,
                    "last_text": r.last_text,
                    "last_attempt": r.last_attempt,
                    "remote_mta": r.remote_mta,
                }
                for r in env.recipients
            ],
        }

    def _visible(self, user: str, env: Envelope) -> bool:
        return self._is_admin(user) or str(env.client.get("user", "")).lower() == user.lower()

    def get_message(self, request: server.Request, id: str) -> Any:
        """
        One message's status, the same JSON while it is queued and after it
        left the queue (then from the event log): see docs/http.rst.
        """
        user = self._user(request)
        if not is_queue_id(id):
            raise HttpError(404, "no such message")
        event_log = self.event_log

        def lookup() -> tuple[Any, list[dict[str, Any]]]:
            # disk only: runs in a thread in the daemon (self.run)
            from mailhub.eventlog import story

            try:
                env: Any = self.spool.load(id)
            except KeyError:
                env = None
            except Exception as e:  # corrupt envelope
                env = HttpError(503, f"cannot read the envelope: {str(e)[:200]}")
            events = story(event_log, id, follow=False) if event_log else []
            return env, events

        d = defer.maybeDeferred(self.run, lookup)
        d.addCallback(self._from_history, user, id)
        return d

    def _from_history(self, found: tuple[Any, list[dict[str, Any]]], user: str, qid: str) -> Any:
        """Not in the queue: the history answers when there is one, else the event log."""
        env, events = found
        if env is not None or self.history is None:
            return self._message_status(user, qid, env, events)
        return self.history.get_message(qid, user)

    def _message_status(self, user: str, qid: str, env: Any, events: list[dict[str, Any]]) -> Any:
        events = [e for e in events if e.get("queue_id") == qid]
        if isinstance(env, HttpError):
            raise env
        if env is not None:
            if not self._visible(user, env):
                raise HttpError(404, "no such message")
            data = self._envelope_json(env)
        else:
            if not self.event_log:
                raise HttpError(404, "no such message (not in the queue, and no event log)")
            accepted = next((e for e in events if e.get("event") in ("accepted", "pickup")), None)
            if accepted is None or not (self._is_admin(user) or str(accepted.get("user", "")).lower() == user.lower()):
                raise HttpError(404, "no such message")
            data = self._finished_json(qid, accepted, events)
        notices = [e for e in events if e.get("event") == "bounce" and e.get("dsn_id")]
        data["bounces"] = [e["dsn_id"] for e in notices if "delay" not in str(e.get("kind", ""))]
        data["delay_notices"] = [e["dsn_id"] for e in notices if "delay" in str(e.get("kind", ""))]
        return (200, data)

    def _finished_json(self, qid: str, accepted: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
        """L{_envelope_json}'s shape for a message that left the queue, from its events."""
        states = {"sent": DELIVERED, "bounced": FAILED, "deferred": PENDING}
        recipients: dict[str, dict[str, Any]] = {}
        for e in events:
            if e.get("event") != "delivery" or not e.get("to"):
                continue
            code = e.get("code")
            recipients[e["to"]] = {
                "address": e["to"],
                "original": e.get("orig_to", e["to"]),
                "state": states.get(str(e.get("status")), PENDING),
                "attempts": e.get("attempts"),
                "last_code": code if isinstance(code, int) else None,
                "last_status": e.get("dsn", ""),
                "last_text": e.get("detail", ""),
                "last_attempt": e.get("last_attempt", e.get("time")),
                "remote_mta": e.get("remote_mta", ""),
            }
        attempts = [r["attempts"] for r in recipients.values() if isinstance(r["attempts"], int)]
        size = accepted.get("size")
        return {
            "queue_id": qid,
            "state": "done",
            "sender": accepted.get("sender", ""),
            "arrival": accepted.get("time"),
            "next_attempt": None,
            "attempts": max(attempts, default=0),
            "size": int(size) if isinstance(size, (int, str)) and str(size).isdigit() else None,
            "recipients": list(recipients.values()),
        }

    def get_queue(self, request: server.Request) -> Any:
        user = self._user(request)
        out = []
        for env in self.spool:
            if self._visible(user, env):
                item = self._envelope_json(env)
                out.append(item)
        return (200, {"messages": out, "count": len(out)})

    def post_flush(self, request: server.Request) -> Any:
        user = self._user(request)
        if not self._is_admin(user):
            raise HttpError(403, "flushing the queue is for administrators (http admins)")
        qid = _query(request).get("queue_id", [None])[0]
        if self.scheduler is None:
            raise HttpError(503, "no scheduler")
        try:
            result = self.scheduler.flush(qid)
        except KeyError:
            raise HttpError(404, "no such message")
        if qid is None:
            return (202, {"flushed": "all"})
        # Scheduler.flush: HELD when the one message named is on hold (nothing done)
        return (202, {"flushed": qid, "result": HELD if result == HELD else FLUSHED})

    # -- submission ------------------------------------------------------------------

    def post_message(self, request: server.Request) -> Any:
        user = self._user(request)
        ctype = (_header(request, b"content-type") or "").split(";")[0].strip().lower()
        assert request.content is not None  # twisted.web gives every request a body file
        request.content.seek(0)
        body = request.content.read()
        if ctype == "application/json":
            sender, recipients, message = self._from_json(body)
        elif ctype == "message/rfc822":
            sender, recipients, message = self._from_raw(request, body)
        else:
            raise HttpError(415, "Content-Type must be application/json or message/rfc822")
        sender = self._check_sender(sender)
        if not self.users.may_send_as(user, sender, self.separator):
            raise HttpError(403, f"sender <{sender}> is not owned by {user}")
        checked = self._check_recipients(recipients)
        if self.ratelimit is None:
            return self._queue(request, user, sender, checked, message)
        token = (_header(request, b"authorization") or "").strip().partition(" ")[2].strip()
        client_ip = getattr(request.getClientAddress(), "host", "")
        d = self.ratelimit.api_message(client_ip, token, len(checked))

        def judged(verdict: Any) -> Any:
            if verdict is not None:  # 429 over a limit; 503 when the counter is down and limits fail closed
                status = 503 if verdict.limit == "unavailable" else 429
                raise HttpError(status, verdict.text, {"Retry-After": str(verdict.retry_after)})
            return self._queue(request, user, sender, checked, message)

        return d.addCallback(judged)

    def _check_sender(self, sender: Any) -> str:
        if not isinstance(sender, str) or not sender:
            raise HttpError(400, "missing sender (from)")
        try:
            sender.encode("utf-8")
            address.parse_mailbox(sender)
        except UnicodeEncodeError:
            raise HttpError(400, "invalid sender: not UTF-8")
        except address.AddressError as e:
            raise HttpError(400, f"invalid sender: {e}")
        return sender

    def _check_recipients(self, recipients: list[Any]) -> list[str]:
        if not recipients:
            raise HttpError(400, "no recipients")
        if len(recipients) > self.max_recipients:
            raise HttpError(400, f"too many recipients (limit {self.max_recipients})")
        out: list[str] = []
        for r in recipients:
            if not isinstance(r, str):
                raise HttpError(400, "recipients must be strings")
            try:
                r.encode("utf-8")
                mailbox = address.parse_mailbox(r)
            except UnicodeEncodeError:
                raise HttpError(400, f"invalid recipient {r[:100]!r}: not UTF-8")
            except address.AddressError as e:
                raise HttpError(400, f"invalid recipient {r[:100]!r}: {e}")
            text = str(mailbox)
            if text not in out:
                out.append(text)
        return out

    def _from_raw(self, request: server.Request, body: bytes) -> tuple[Any, list[Any], bytes]:
        if not body.strip():
            raise HttpError(400, "empty message")
        message = re.sub(rb"\r?\n", b"\r\n", body)
        if not message.endswith(b"\r\n"):
            message += b"\r\n"
        message = complete_header(message, self.hostname, self._now())
        query = _query(request)
        sender = query.get("from", [None])[0]
        recipients: list[Any] = list(query.get("to", []))
        head_end = message.find(b"\r\n\r\n")
        head = message[: head_end + 2] if head_end >= 0 else message
        if sender is None or not recipients:
            try:
                parsed = email.message_from_bytes(head, policy=email.policy.compat32)
                if sender is None:
                    froms = email.utils.getaddresses(parsed.get_all("From", []))
                    sender = froms[0][1] if froms and froms[0][1] else None
                if not recipients:
                    fields = parsed.get_all("To", []) + parsed.get_all("Cc", []) + parsed.get_all("Bcc", [])
                    recipients = [a for _, a in email.utils.getaddresses(fields) if a]
            except (RecursionError, ValueError, TypeError, LookupError):
                raise HttpError(400, "cannot read the addresses in the From:, To:, Cc: or Bcc: header fields")
        # Bcc never travels (sendmail -t does the same)
        message = _strip_header(message, b"bcc")
        return sender, recipients, message

    def _from_json(self, body: bytes) -> tuple[str, list[str], bytes]:
        from mailhub.web.mime import InvalidMessage, build_message

        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise HttpError(400, f"malformed JSON: {str(e)[:200]}")
        except RecursionError:
            raise HttpError(400, "malformed JSON: nested too deeply")
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise HttpError(400, "JSON strings must be valid Unicode (lone surrogate)")
        except (RecursionError, ValueError):
            raise HttpError(400, "malformed JSON: nested too deeply")
        try:
            return build_message(data, self.hostname, self._now())
        except InvalidMessage as e:
            raise HttpError(400, str(e))
        except RecursionError:
            raise HttpError(400, "JSON value nested too deeply")

    def _queue(self, request: server.Request, user: str, sender: str, recipients: list[str], message: bytes) -> Any:
        now = self._now()
        client_ip = getattr(request.getClientAddress(), "host", "")
        rcpts: list[Recipient] = []
        seen: set[str] = set()
        for original in recipients:
            finals = [original]
            if self.resolve_recipient is not None:
                try:
                    finals = list(self.resolve_recipient(original))
                except Exception as e:
                    code = getattr(e, "code", None)
                    if isinstance(code, int) and code >= 500:
                        raise HttpError(400, f"recipient <{original}>: {getattr(e, 'text', e)}")
                    raise HttpError(503, f"recipient <{original}>: {getattr(e, 'text', e)}")
            for a in finals:
                if a not in seen:
                    seen.add(a)
                    rcpts.append(Recipient(address=a, original=original))

        def write() -> Envelope:
            writer = self.spool.new_message()
            try:
                clauses = [
                    f"from {address_literal(client_ip)} (user {user})",
                    f"by {self.hostname} (mailhub) with HTTP id {writer.queue_id}",
                ]
                if len(recipients) == 1:
                    clauses.append(f"for <{recipients[0]}>")
                writer.write(trace_header(clauses, format_date(now)))
                writer.write(after_trace_header(message))
                writer.write(message)
                esmtp: dict[str, Any] = {"size": writer.size, "body": "7BIT" if message.isascii() else "8BITMIME"}
                if not sender.isascii() or not all(r.address.isascii() for r in rcpts):
                    esmtp["smtputf8"] = True
                env = Envelope(
                    queue_id=writer.queue_id,
                    sender=sender,
                    recipients=rcpts,
                    arrival=now,
                    next_attempt=now,
                    esmtp=esmtp,
                    client={"addr": client_ip, "protocol": "HTTP", "user": user, "listener": "http", "helo": None},
                )
            except BaseException:
                writer.abort()
                raise
            writer.commit(env)
            return env

        d = defer.maybeDeferred(self.run, write)

        def committed(env: Envelope) -> Any:
            # logged before enqueue: enqueue may deliver at once, and the
            # story of a message must start with its arrival
            mail_event(
                "accepted",
                "{queue_id}: accepted from=<{sender}> nrcpt={nrcpt} size={size} client=[{client}] proto=HTTP user={user}",
                queue_id=env.queue_id, sender=env.sender, nrcpt=len(env.recipients), size=env.esmtp["size"],
                client=client_ip, proto="HTTP", user=user, listener="http",
                rcpts=[r.address for r in env.recipients], **{"from": env.sender},
            )
            try:
                self.enqueue(env)
            except Exception:
                # committed means queued: the scheduler finds it at the next start
                log.failure("enqueue failed for {queue_id}", queue_id=env.queue_id)
            return (202, {"queue_id": env.queue_id})

        def failed(f: Any) -> Any:
            log.failure("HTTP submission could not be queued", f)
            if f.check(OSError) and f.value.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HttpError(507, "insufficient storage: message not queued")
            raise HttpError(503, "spool error: message not queued, try again later", {"Retry-After": "60"})

        d.addCallbacks(committed, failed)
        return d


def _header(request: server.Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _query(request: server.Request) -> dict[str, list[str]]:
    uri = request.uri.decode("utf-8", "replace")
    _, _, qs = uri.partition("?")
    return parse_qs(qs, keep_blank_values=False)


def _strip_header(message: bytes, name: bytes) -> bytes:
    """Remove every C{name:} header (with its continuation lines) from the header section."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message
    head, rest = message[: end + 2], message[end + 2 :]
    out: list[bytes] = []
    skipping = False
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() == name
        if not skipping:
            out.append(line)
    return b"".join(line + b"\r\n" for line in out) + rest


def make_http_site(
    *args: Any,
    max_body: int = DEFAULT_MAX_BODY,
    status_page: Any = "default",
    header_timeout: float = 60.0,
    request_timeout: float = 300.0,
    max_connections: int = 100,
    max_connections_per_ip: int = 50,
    **kwargs: Any,
) -> ApiSite:
    """
    The HTTP site: API, C{/metrics} and the status page.

    @param args: L{ApiResource}'s arguments (spool, enqueue, scheduler,
        users, metrics, hostname); C{kwargs} its keywords, documented there.
    @param max_body: the largest request body accepted, in bytes.
    @param status_page: as for L{ApiResource}, but C{"default"} (one over
        C{metrics}) unless told otherwise.
    @param header_timeout: seconds for a request's whole header.
    @param request_timeout: seconds for a whole request (header and body).
    @param max_connections: open connections at most, all clients together.
    @param max_connections_per_ip: open connections at most from one address.
        The last four need a clock (C{clock=}, or the metrics' clock); without
        one the site has no deadlines and no caps.
    """
    kwargs["status_page"] = status_page
    root = ApiResource(*args, **kwargs)
    limits = None
    if root.clock is not None:
        limits = ConnectionLimits(root.clock, header_timeout, request_timeout, max_connections, max_connections_per_ip)
    site = ApiSite(root, max_body=max_body, limits=limits)
    site.displayTracebacks = False
    return site
