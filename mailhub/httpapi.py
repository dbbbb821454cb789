"""
The HTTP interface: a JSON API to submit and follow messages, the
Prometheus C{/metrics} endpoint and the status page, on one twisted.web
L{Site}.

Owns: the routes (L{ROUTES}, which docs/openapi.json must describe), bearer
token authentication (tokens from L{mailhub.auth.UsersFile}), turning a
JSON request into a MIME message (the C{email} package), the request body
limit (enforced while the body arrives, before it is stored), and the JSON
error format C{{"error": TEXT, "code": HTTP_STATUS}}.

Must not touch: the spool's files (only L{Spool.new_message} and
L{SpoolWriter.commit}, as smtpd does), delivery, configuration files.  A
C{202} is given only after the commit returned (house rule 1): any spool
error before that is a C{503} (C{507} when the disk is full) and nothing is
queued.

C{/metrics} and the status page need no token: the HTTP listener is meant
to bind loopback (C{tcp:8080:interface=127.0.0.1}) or sit behind a proxy.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import email.utils
import errno
import json
import re
from email.message import EmailMessage
from typing import Any, Callable, Collection, Sequence
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from . import address
from .envelope import Envelope, Recipient
from .maillog import mail_event
from .scheduler import FLUSHED, HELD
from .smtpproto import rfc5322_date, trace_header
from .spool import is_queue_id

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
    ("GET", "/v1/messages/{id}"),
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
        return getattr(self.channel.site, "max_body", DEFAULT_MAX_BODY)

    def gotLength(self, length: int | None) -> None:
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
        body = _error_body(413, f"request body larger than {self._limit()} bytes")
        head = (
            b"HTTP/1.1 413 Content Too Large\r\n"
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
        transport.write(head + body)
        self.channel.loseConnection()

    def process(self) -> None:
        if self._refused:
            return
        super().process()


class ApiSite(server.Site):
    """A L{server.Site} with a body limit (C{max_body}) and L{CappedRequest}s."""

    requestFactory = CappedRequest
    noisy = False  # no "Starting factory <...>" line; requests go to the site's access log

    def __init__(self, root: resource.IResource, max_body: int = DEFAULT_MAX_BODY, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.max_body = max_body


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
    for want, have in zip(p_parts, parts):
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
    ) -> None:
        """
        @param spool: L{mailhub.spool.Spool}.
        @param enqueue: C{scheduler.enqueue}, called after each commit.
        @param scheduler: for C{POST /v1/queue/flush} (C{flush(queue_id=None)}).
        @param users: L{mailhub.auth.UsersFile} (C{check_token}, C{may_send_as}).
        @param metrics: L{mailhub.metrics.MailMetrics} or C{None}.
        @param status_page: a L{mailhub.statuspage.StatusPage}, C{"default"} for
            one over C{metrics}, or C{None} to disable C{/} and C{/status}.
        @param run: how the blocking spool commit runs: C{deferToThread} in the
            daemon, synchronous (the default) in tests.
        @param resolve_recipient: alias/extension resolution of a recipient
            (e.g. C{lambda a: directory.resolve(parse_mailbox(a))} for local
            domains); C{None} queues recipients as given.
        @param admins: users allowed to list the whole queue and flush it.
        @param event_log: the JSON event log, to answer for messages that left the queue.
        """
        super().__init__()
        if status_page == "default":
            status_page = None
            if metrics is not None:
                from .statuspage import StatusPage

                status_page = StatusPage(metrics, hostname)
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
        self.clock = clock if clock is not None else getattr(metrics, "clock", None)
        self._handlers = {
            ("GET", "/"): self.get_status,
            ("GET", "/status"): self.get_status,
            ("GET", "/metrics"): self.get_metrics,
            ("POST", "/v1/messages"): self.post_message,
            ("GET", "/v1/messages/{id}"): self.get_message,
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
        handler = None
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
        log.failure("HTTP {method} {path} failed", failure, method=request.method.decode("latin-1"), path=request.path.decode("latin-1"))
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
        return (200, self.status_page.render_html(), "text/html; charset=utf-8", {"Content-Security-Policy": _CSP})

    def get_metrics(self, request: server.Request) -> Any:
        from .metrics import CONTENT_TYPE

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
        user = self._user(request)
        if not is_queue_id(id):
            raise HttpError(404, "no such message")
        try:
            env = self.spool.load(id)
        except KeyError:
            return self._from_event_log(user, id)
        except Exception as e:  # corrupt envelope
            raise HttpError(503, f"cannot read the envelope: {e}")
        if not self._visible(user, env):
            raise HttpError(404, "no such message")
        return (200, self._envelope_json(env))

    def _from_event_log(self, user: str, qid: str) -> Any:
        """A message that left the queue: its final states, from the event log if there is one."""
        if not self.event_log:
            raise HttpError(404, "no such message (not in the queue)")
        from .eventlog import story

        events = [e for e in story(self.event_log, qid) if e.get("queue_id") == qid]
        accepted = next((e for e in events if e.get("event") in ("accepted", "pickup")), None)
        if accepted is None or not (self._is_admin(user) or str(accepted.get("user", "")).lower() == user.lower()):
            raise HttpError(404, "no such message")
        recipients: dict[str, dict[str, Any]] = {}
        for e in events:
            if e.get("event") == "delivery" and e.get("to"):
                recipients[e["to"]] = {
                    "address": e["to"],
                    "original": e.get("orig_to", e["to"]),
                    "state": {"sent": "delivered", "bounced": "failed"}.get(e.get("status"), "pending"),
                    "attempts": e.get("attempts"),
                    "last_status": e.get("dsn", ""),
                    "last_text": e.get("text", ""),
                    "remote_mta": e.get("relay", ""),
                }
        bounces = [e.get("dsn_id") for e in events if e.get("event") == "bounce" and e.get("dsn_id")]
        return (
            200,
            {
                "queue_id": qid,
                "state": "done",
                "sender": accepted.get("sender", ""),
                "arrival": accepted.get("time"),
                "recipients": list(recipients.values()),
                "bounces": bounces,
            },
        )

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
        return self._queue(request, user, sender, checked, message)

    def _check_sender(self, sender: Any) -> str:
        if not isinstance(sender, str) or not sender:
            raise HttpError(400, "missing sender (from)")
        try:
            address.parse_mailbox(sender)
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
                mailbox = address.parse_mailbox(r)
            except address.AddressError as e:
                raise HttpError(400, f"invalid recipient {r!r}: {e}")
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
        message = _complete_header(message, self.hostname, rfc5322_date(self._now()))
        query = _query(request)
        sender = query.get("from", [None])[0]
        recipients: list[Any] = list(query.get("to", []))
        head_end = message.find(b"\r\n\r\n")
        head = message[: head_end + 2] if head_end >= 0 else message
        if sender is None or not recipients:
            parsed = email.message_from_bytes(head, policy=email.policy.compat32)
            if sender is None:
                froms = email.utils.getaddresses(parsed.get_all("From", []))
                sender = froms[0][1] if froms and froms[0][1] else None
            if not recipients:
                fields = parsed.get_all("To", []) + parsed.get_all("Cc", []) + parsed.get_all("Bcc", [])
                recipients = [a for _, a in email.utils.getaddresses(fields) if a]
        # Bcc never travels (sendmail -t does the same)
        message = _strip_header(message, b"bcc")
        return sender, recipients, message

    def _from_json(self, body: bytes) -> tuple[str, list[str], bytes]:
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise HttpError(400, f"malformed JSON: {e}")
        if not isinstance(data, dict):
            raise HttpError(400, "JSON body must be an object")
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise HttpError(400, "JSON strings must be valid Unicode (lone surrogate)")
        known = {"from", "to", "cc", "bcc", "subject", "text", "html", "attachments", "reply_to", "headers"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HttpError(400, f"unknown field(s): {', '.join(unknown)}")
        sender = data.get("from")
        lists = {}
        for key in ("to", "cc", "bcc"):
            value = data.get(key, [])
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise HttpError(400, f"{key} must be a list of addresses")
            lists[key] = value
        for key in ("subject", "text", "html", "reply_to"):
            if key in data and not isinstance(data[key], str):
                raise HttpError(400, f"{key} must be a string")
        if not isinstance(sender, str) or not sender:
            raise HttpError(400, "missing sender (from)")
        if "text" not in data and "html" not in data:
            raise HttpError(400, "give text or html")
        for key in ("subject", "reply_to"):
            if any(c in data.get(key, "") for c in "\r\n\0"):
                raise HttpError(400, f"{key} must be one line")
        for value in [sender] + lists["to"] + lists["cc"] + lists["bcc"]:
            if any(c in value for c in "\r\n\0,<>"):
                raise HttpError(400, f"invalid address {value!r}")
        msg = EmailMessage(policy=email.policy.SMTP)
        msg["From"] = sender
        if lists["to"]:
            msg["To"] = ", ".join(lists["to"])
        if lists["cc"]:
            msg["Cc"] = ", ".join(lists["cc"])
        if data.get("reply_to"):
            msg["Reply-To"] = data["reply_to"]
        msg["Subject"] = data.get("subject", "")
        msg["Date"] = rfc5322_date(self._now())
        msg["Message-ID"] = email.utils.make_msgid(domain=self.hostname)
        msg["MIME-Version"] = "1.0"
        if "text" in data:
            msg.set_content(data["text"])
            if "html" in data:
                msg.add_alternative(data["html"], subtype="html")
        else:
            msg.set_content(data["html"], subtype="html")
        attachments = data.get("attachments", [])
        if not isinstance(attachments, list):
            raise HttpError(400, "attachments must be a list")
        for i, att in enumerate(attachments):
            if not isinstance(att, dict):
                raise HttpError(400, f"attachments[{i}] must be an object")
            filename = att.get("filename")
            ctype = att.get("content_type", "application/octet-stream")
            content = att.get("content_base64")
            if not isinstance(filename, str) or not filename or any(c in filename for c in "\r\n\0/\\"):
                raise HttpError(400, f"attachments[{i}].filename missing or invalid")
            if not isinstance(ctype, str) or not re.fullmatch(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+", ctype):
                raise HttpError(400, f"attachments[{i}].content_type invalid")
            if not isinstance(content, str):
                raise HttpError(400, f"attachments[{i}].content_base64 missing")
            try:
                raw = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise HttpError(400, f"attachments[{i}].content_base64 is not base64")
            maintype, subtype = ctype.lower().split("/")
            if maintype == "text":
                try:
                    msg.add_attachment(raw.decode("utf-8"), subtype=subtype, filename=filename)
                except UnicodeDecodeError:
                    msg.add_attachment(raw, maintype="application", subtype="octet-stream", filename=filename)
            elif maintype in ("multipart", "message"):
                msg.add_attachment(raw, maintype="application", subtype="octet-stream", filename=filename)
            else:
                msg.add_attachment(raw, maintype=maintype, subtype=subtype, filename=filename)
        recipients = lists["to"] + lists["cc"] + lists["bcc"]
        return sender, recipients, msg.as_bytes()

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
                clauses = [f"from [{client_ip}] (user {user})", f"by {self.hostname} (mailhub) with HTTP id {writer.queue_id}"]
                if len(recipients) == 1:
                    clauses.append(f"for <{recipients[0]}>")
                writer.write(trace_header(clauses, rfc5322_date(now)))
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
                client=client_ip, proto="HTTP", user=user, listener="http", **{"from": env.sender},
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


#: a header field's first line (RFC 5322 field name, optional obsolete white space, colon)
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


def _complete_header(message: bytes, hostname: str, date: str) -> bytes:
    """
    C{message} (CRLF lines) with C{Date:} and C{Message-ID: <...@hostname>}
    added at the end of its header section when missing (RFC 5322 3.6
    requires Date; Postfix's cleanup and mailhub-sendmail add both).  Only
    the header section is looked at and only added to: the body stays byte
    for byte.  The header section ends at the empty line, or at the first
    line that is not a header field (the empty line is then inserted before
    it, as sendmail does), or at the end of a message without a body.
    """
    names: set[bytes] = set()
    pos = 0
    separator = False
    while pos < len(message):
        nl = message.find(b"\r\n", pos)
        end = len(message) if nl < 0 else nl + 2
        line = message[pos:end]
        if line == b"\r\n":
            separator = True
            break
        if line[:1] in (b" ", b"\t") and names:
            pass  # continuation of the field before
        elif _FIELD.match(line):
            names.add(line.split(b":", 1)[0].strip().lower())
        else:
            break  # not a header field: the body starts here
        pos = end
    added = b""
    if b"date" not in names:
        added += b"Date: " + date.encode("ascii") + b"\r\n"
    if b"message-id" not in names:
        added += b"Message-ID: " + email.utils.make_msgid(domain=hostname).encode("utf-8") + b"\r\n"
    rest = message[pos:]
    if not separator:
        rest = b"\r\n" + rest
    return message[:pos] + added + rest


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
    *args: Any, max_body: int = DEFAULT_MAX_BODY, status_page: Any = "default", **kwargs: Any
) -> ApiSite:
    """
    The HTTP site: API, C{/metrics} and the status page.

    @param args: L{ApiResource}'s arguments (spool, enqueue, scheduler,
        users, metrics, hostname); C{kwargs} its keywords, documented there.
    @param max_body: the largest request body accepted, in bytes.
    @param status_page: as for L{ApiResource}, but C{"default"} (one over
        C{metrics}) unless told otherwise.
    """
    root = ApiResource(*args, status_page=status_page, **kwargs)
    site = ApiSite(root, max_body=max_body)
    site.displayTracebacks = False
    return site
