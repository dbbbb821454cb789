"""
Delivery status notifications (RFC 3464): a bounce, a delay warning or a
success notice (RFC 3461 NOTIFY=SUCCESS: "delivered" or "relayed") -- what
it says and who gets it.

Owns: the text and structure of the DSN message (L{make_dsn}, pure) -- a
multipart/report with a human-readable part, the machine-readable
message/delivery-status part and the original message's headers (or, for
RET=FULL in a failure report, the whole original when it is small
enough); and its composition (L{Notifier}): which recipients a notice
covers (NOTIFY), to whom it goes (the sender, resolved like submitted
mail; the postmaster for a bounce that cannot be returned), and queueing
it as a new message from C{<>}.  Longer than most modules because both
halves are one job, the notice; L{make_dsn} touches no file but the
original it reads.

Must not touch: the clock (the time is given), the network, a message's
envelope (the scheduler decides I{when} to notify and what an outcome
means; L{Notifier} only reads the recipients it is given).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger

from mailhub.address import AddressError
from mailhub.delivery.directory import RecipientError
from mailhub.envelope import DELIVERED, Envelope, Outcome, Recipient
from mailhub.maillog import mail_event
from mailhub.queue.queuefile import QueueFileError, new_queue_id, open_message
from mailhub.queue.spool import Spool
from mailhub.rfc5322 import format_date

__all__ = [
    "Notifier",
    "make_dsn",
    "FAILED_ACTION",
    "DELAYED_ACTION",
    "DELIVERED_ACTION",
    "RELAYED_ACTION",
    "ACTIONS",
    "HEADERS_LIMIT",
    "FULL_LIMIT",
]

log = Logger()

#: RFC 3464 2.3.3 Action values mailhub reports.  "expanded" is not used:
#: aliases are expanded at RCPT time and each target reported on its own.
FAILED_ACTION = "failed"
DELAYED_ACTION = "delayed"
#: delivered to the recipient's mailbox (local delivery)
DELIVERED_ACTION = "delivered"
#: handed to a next hop that does not speak DSN (RFC 3461 5.2.2): no
#: further notice can be expected from it
RELAYED_ACTION = "relayed"
ACTIONS = (FAILED_ACTION, DELAYED_ACTION, DELIVERED_ACTION, RELAYED_ACTION)
_SUCCESS = (DELIVERED_ACTION, RELAYED_ACTION)

#: At most this many bytes of the original's header block are returned.
HEADERS_LIMIT = 64 * 1024
#: RET=FULL returns the whole original only up to this size (Postfix's
#: bounce_size_limit is 50000); a larger one gets its headers only, since a
#: truncated message/rfc822 part would be a lie (RFC 3462 section 3).
FULL_LIMIT = 50000
#: Longest diagnostic text copied into a header line (RFC 5322 allows 998).
_TEXT_LIMIT = 800

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\b")
#: how smtpclient words a peer's reply: "host H said: 550 5.1.1 text (in reply to RCPT TO command)"
_AGENT_REPLY = re.compile(r"host (\S+) said: (\d{3}) (.*?)(?: \(in reply to [^()]*\))?$", re.S)
#: the "[ip]:port" an agent's remote_mta ("mx.example[192.0.2.1]:25") adds to the host name
_MTA_ADDRESS = re.compile(r"\[[^\[\]]*\](?::\d+)?$")


def _clean(text: str, limit: int = _TEXT_LIMIT) -> str:
    """One safe header line: no CR, LF or other control characters."""
    text = _CONTROL.sub(" ", text).strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _addr_type(address: str) -> str:
    """RFC 3464 address type; RFC 6533 C{utf-8} for internationalized addresses."""
    return "rfc822" if address.isascii() else "utf-8"


def _read_original(original: bytes | str, limit: int) -> tuple[bytes, bool]:
    """
    The first C{limit} bytes of the original (bytes or a file path) and
    whether that was all of it.  Reading a path is bounded: a huge queued
    message is never loaded whole.
    """
    if isinstance(original, (bytes, bytearray, memoryview)):
        data = bytes(original)
        return data[:limit], len(data) <= limit
    try:
        with open_message(original) as f:
            data = f.read(limit + 1)
    except QueueFileError as e:
        return b"X-Mailhub-Note: original message unavailable: " + _clean(str(e)).encode() + b"\r\n", False
    except OSError as e:
        return b"X-Mailhub-Note: original message unavailable: " + _clean(os.strerror(e.errno or 0)).encode() + b"\r\n", False
    return data[:limit], len(data) <= limit


def _crlf(data: bytes) -> bytes:
    """Normalise bare LF (and existing CRLF) line ends to CRLF."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def _header_block(data: bytes) -> bytes:
    """The header block of a message: up to the first empty line, cut at a line end."""
    data = _crlf(data)
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return data[: end + 2]
    if data.startswith(b"\r\n"):
        return b""
    # no empty line within the limit: keep complete lines only
    cut = data.rfind(b"\r\n")
    return data[: cut + 2] if cut >= 0 else b""


def _reason(r: Recipient, action: str) -> str:
    """
    The human-readable line about one recipient.  Only a reply a server
    really gave is written "host X said: ..."; anything else (connection
    refused or lost, DNS, TLS) is the agent's own text, as in the mail log.
    """
    if not r.replied:
        text = r.last_text or "unknown error"
    elif r.last_text.startswith(f"host {r.remote_mta}"):
        text = r.last_text  # the agent already said who answered what
    else:
        reply = r.last_text
        if r.last_status and not _STATUS.match(reply):
            reply = f"{r.last_status} {reply}"
        text = f"host {r.remote_mta} said: {r.last_code} {reply}"
    if action == FAILED_ACTION and r.last_status == "4.4.7":
        text = f"delivery time expired; last error: {text}"
    return _clean(text)


def _diagnostic(r: Recipient) -> str | None:
    """RFC 3464 2.3.6: the SMTP reply itself ("smtp; 550 5.1.1 text"), not our wording of it."""
    if not r.last_text and not r.last_code:
        return None
    if not r.last_code:
        return "X-Mailhub; " + _clean(r.last_text)
    text = _clean(r.last_text)
    m = _AGENT_REPLY.match(text)
    if m and int(m.group(2)) == r.last_code:
        text = m.group(3)
    if r.last_status and not _STATUS.match(text):
        text = f"{r.last_status} {text}"
    return _clean(f"smtp; {r.last_code} {text}")


def _original_recipient(r: Recipient) -> tuple[str, str] | None:
    """
    (address type, address) for Original-Recipient (RFC 3464 2.3.1): the
    ORCPT given at RCPT, stored as C{"type;decoded-address"}; else the
    address before alias expansion when it differs (as Postfix does).
    """
    if r.orcpt:
        kind, sep, addr = r.orcpt.partition(";")
        kind = _clean(kind, 32)
        if sep and kind and addr.strip():
            return kind, _clean(addr, 512)
        return _addr_type(r.orcpt), _clean(r.orcpt, 512)
    orig = _clean(r.original, 512)
    if orig and orig != _clean(r.address, 512):
        return _addr_type(orig), orig
    return None


def make_dsn(
    envelope: Envelope,
    recipients: list[Recipient],
    original: bytes | str,
    reporting_mta: str,
    now: float,
    action: str = FAILED_ACTION,
    queue_id: str | None = None,
    *,
    to: str | None = None,
    retry_until: float | None = None,
    actions: Mapping[str, str] | None = None,
) -> bytes:
    """
    Build the DSN for C{recipients} of C{envelope}.

    @param original: the original message, as bytes or the path of its
        queue file (L{mailhub.queue.queuefile.open_message}: read bounded, never whole).
    @param reporting_mta: this host's name (Reporting-MTA, From domain).
    @param now: the time of the report (Date, Message-ID).
    @param action: C{"failed"} (a bounce), C{"delayed"} (a warning), or
        C{"delivered"} / C{"relayed"} (a success notice).  It chooses the
        subject and text; only a failure report returns the full message
        for RET=FULL (RFC 3461 4.3: a DSN without failures returns headers).
    @param actions: per-recipient Action where it differs from C{action}
        (one success notice lists both delivered and relayed recipients);
        keys are L{Recipient.address}.
    @param queue_id: the original's queue id; defaults to the envelope's.
    @param to: the notification's recipient; defaults to the envelope
        sender (a double bounce goes to the postmaster instead).
    @param retry_until: for a delay warning, when retrying stops.
    @return: the whole message, CRLF line ends, ready to spool.
    """
    actions = dict(actions or {})
    if action not in ACTIONS or any(a not in ACTIONS for a in actions.values()):
        raise ValueError(f"unknown DSN action {action!r}")
    qid = queue_id or envelope.queue_id
    host = _clean(reporting_mta, 255)
    rcpt_to = _clean(envelope.sender if to is None else to, 512)
    failed = action == FAILED_ACTION
    success = action in _SUCCESS

    ret_full = failed and str(envelope.esmtp.get("ret", "")).upper() == "FULL"
    data, whole = _read_original(original, FULL_LIMIT if ret_full else HEADERS_LIMIT)
    if ret_full and whole:
        returned = _crlf(data)
        if returned and not returned.endswith(b"\r\n"):
            returned += b"\r\n"
        returned_type = "message/rfc822"
        returned_desc = "Undelivered Message" if failed else "Delayed Message"
    else:
        returned = _header_block(data)
        returned_type = "text/rfc822-headers"
        returned_desc = (
            "Undelivered Message Headers" if failed else "Message Headers" if success else "Delayed Message Headers"
        )

    utf8 = not all(
        r.address.isascii() and r.original.isascii() and r.orcpt.isascii() for r in recipients
    ) or not rcpt_to.isascii() or not envelope.sender.isascii()
    try:
        returned.decode("ascii")
    except UnicodeDecodeError:
        utf8_returned = True
    else:
        utf8_returned = False
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    if utf8_returned and returned_type == "text/rfc822-headers":
        returned_type = "message/global-headers"
    elif utf8_returned and returned_type == "message/rfc822" and envelope.esmtp.get("smtputf8"):
        returned_type = "message/global"

    # -- human-readable part ------------------------------------------------
    lines = [f"This is the mail system at host {host}.", ""]
    if failed and returned_type in ("message/rfc822", "message/global"):
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. The original message",
            "is attached.",
            "",
            "For further assistance, please send mail to postmaster.",
            "",
            "If you do so, please include this problem report. You can",
            "delete your own text from the attached returned message.",
        ]
    elif failed:
        # RET=HDRS, no RET, or a message too large to return whole
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. The message headers",
            "are attached.",
            "",
            "For further assistance, please send mail to postmaster.",
            "",
            "If you do so, please include this problem report.",
        ]
    elif success:
        lines += [
            "Your message was successfully delivered to the destination(s)",
            "listed below. If the message was delivered to mailbox you will",
            "receive no further notifications. Otherwise you may still receive",
            "notifications of mail delivery errors from other systems.",
        ]
    else:
        hours = max(0, int((now - envelope.arrival) // 3600))
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            f"Your message could not be delivered for more than {hours} hour(s).",
        ]
        if retry_until is not None:
            lines.append(f"It will be retried until {format_date(retry_until)}.")
    lines += ["", "                   The mail system", ""]
    for r in recipients:
        expanded = f" (expanded from <{_clean(r.original, 512)}>)" if r.original != r.address else ""
        what = actions.get(r.address, action)
        if what == DELIVERED_ACTION:
            reason = _clean(f"delivered: {r.last_text}" if r.last_text else "delivered")
        elif what == RELAYED_ACTION:
            reason = _clean(
                f"relayed to a host that does not support delivery notifications: {r.last_text}"
                if r.last_text else "relayed to a host that does not support delivery notifications"
            )
        else:
            reason = _reason(r, what)
        lines.append(f"<{_clean(r.address, 512)}>{expanded}: {reason}")
    human = "\r\n".join(lines) + "\r\n"

    # -- machine-readable part --------------------------------------------------
    fields = [f"Reporting-MTA: dns; {host}", f"X-Mailhub-Queue-ID: {_clean(qid, 64)}"]
    envid = envelope.esmtp.get("envid")
    if envid:
        fields.append(f"Original-Envelope-Id: {_clean(str(envid), 100)}")
    sender = _clean(envelope.sender, 512)
    fields.append(f"X-Mailhub-Sender: {_addr_type(sender)}; {sender}")
    fields.append(f"Arrival-Date: {format_date(envelope.arrival)}")
    status = "\r\n".join(fields) + "\r\n"
    for r in recipients:
        addr = _clean(r.address, 512)
        block = []
        orig = _original_recipient(r)
        if orig:
            block.append(f"Original-Recipient: {orig[0]}; {orig[1]}")
        block.append(f"Final-Recipient: {_addr_type(addr)}; {addr}")
        what = actions.get(r.address, action)
        block.append(f"Action: {what}")
        default_status = {FAILED_ACTION: "5.0.0", DELAYED_ACTION: "4.0.0"}.get(what, "2.0.0")
        block.append(f"Status: {_clean(r.last_status or default_status, 16)}")
        if r.replied:
            # RFC 3464 2.3.5: the MTA that gave the Diagnostic-Code, so only
            # a server that replied; a host name, as Postfix writes it, not "name[ip]:port"
            mta_name = _MTA_ADDRESS.sub("", r.remote_mta) or r.remote_mta
            block.append(f"Remote-MTA: dns; {_clean(mta_name, 255)}")
        diagnostic = _diagnostic(r)
        if diagnostic:
            block.append(f"Diagnostic-Code: {diagnostic}")
        if r.last_attempt:
            block.append(f"Last-Attempt-Date: {format_date(r.last_attempt)}")
        if what == DELAYED_ACTION and retry_until is not None:
            block.append(f"Will-Retry-Until: {format_date(retry_until)}")
        status += "\r\n" + "\r\n".join(block) + "\r\n"

    # -- assembly ----------------------------------------------------------------
    body_parts = [
        ("Notification", "text/plain; charset=utf-8", human.encode("utf-8")),
        ("Delivery report", status_type, status.encode("utf-8")),
        (returned_desc, returned_type, returned),
    ]
    stamp = int(now * 1_000_000)
    boundary = f"{qid}.{stamp}/{host}"
    n = 0
    while any(boundary.encode("utf-8", "replace") in p[2] for p in body_parts):
        n += 1
        boundary = f"{qid}.{stamp}.{n}/{host}"
    eight_bit = utf8 or utf8_returned or not human.isascii()
    subject = (
        "Undelivered Mail Returned to Sender" if failed
        else "Successful Mail Delivery Report" if success
        else "Delayed Mail (still being retried)"
    )
    head = [
        f"Date: {format_date(now)}",
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: {rcpt_to}" if rcpt_to else "To: undisclosed-recipients:;",
        f"Subject: {subject}",
        f"Message-ID: <{qid}.{stamp}.{action}@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    out = ["\r\n".join(head).encode("utf-8") + b"\r\n"]
    for desc, ctype, payload in body_parts:
        out.append(
            f"--{boundary}\r\nContent-Description: {desc}\r\nContent-Type: {ctype}\r\n"
            f"Content-Transfer-Encoding: {'8bit' if not payload.isascii() else '7bit'}\r\n\r\n".encode()
        )
        out.append(payload)
        if payload and not payload.endswith(b"\r\n"):
            out.append(b"\r\n")
        # the CRLF before a delimiter belongs to the delimiter (RFC 2046 5.1.1)
        out.append(b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


class _Unresolved(Exception):
    """A notification recipient the resolver refused; C{temporary} for a 4xx."""

    def __init__(self, text: str, temporary: bool) -> None:
        super().__init__(text)
        self.text = text
        self.temporary = temporary


class Notifier:
    """
    Composes and queues the notices of a delivery round: bounces, delay
    warnings and success notices, each a new message from C{<>} built by
    L{make_dsn}, committed to C{spool} and handed to C{enqueue}.  Decides
    who gets one (RFC 3461 NOTIFY; a bounce of a bounce goes to the
    postmaster once, never to C{<>}; a double bounce is discarded) and
    addresses it through C{resolve}, the recipient resolver submitted mail
    goes through (aliases, extensions).

    @param expires: the time a message's pending recipients are given up
        (the Retry-Until of a delay warning).
    """

    def __init__(
        self,
        spool: Spool,
        enqueue: Callable[[Envelope], None],
        hostname: str,
        postmaster: str,
        expires: Callable[[Envelope], float],
        resolve: Callable[[str], list[str]] | None = None,
    ) -> None:
        self.spool = spool
        self.enqueue = enqueue
        self.hostname = hostname
        self.postmaster = postmaster
        self.expires = expires
        self.resolve = resolve


    _KEYWORD = {
        FAILED_ACTION: "FAILURE",
        DELAYED_ACTION: "DELAY",
        DELIVERED_ACTION: "SUCCESS",
        RELAYED_ACTION: "SUCCESS",
    }

    @classmethod
    def _wants(cls, r: Recipient, action: str) -> bool:
        """
        RFC 3461 4.1 NOTIFY: NEVER means nothing; no keywords means the
        default (failures and delays, never success); otherwise the keyword
        that names the event.
        """
        notify = {n.upper() for n in r.notify}
        if "NEVER" in notify:
            return False
        if not notify:
            return action in (FAILED_ACTION, DELAYED_ACTION)
        return cls._KEYWORD[action] in notify

    def success(self, env: Envelope, recipients: list[Recipient], outcomes: list[Outcome], now: float) -> None:
        """
        RFC 3461 NOTIFY=SUCCESS: one notice for the recipients delivered in
        this round.  "delivered" for a local delivery (no remote MTA);
        "relayed" for a hand-over to a next hop that did not offer DSN
        (RFC 3461 5.2.2); nothing for a next hop that took NOTIFY with the
        message -- the success notice is then its job.  The delivery itself
        is done whatever happens here, so a notice that cannot be queued is
        logged and lost, never a reason to deliver again.
        """
        if not env.sender:
            return
        passed = {o.recipient for o in outcomes if o.dsn_passed}
        actions: dict[str, str] = {}
        for r in recipients:
            if r.state != DELIVERED or not any(n.upper() == "SUCCESS" for n in r.notify):
                continue
            if not r.remote_mta:
                actions[r.address] = DELIVERED_ACTION
            elif r.address not in passed:
                actions[r.address] = RELAYED_ACTION
        if not actions:
            return
        chosen = [r for r in recipients if r.address in actions]
        kind = DELIVERED_ACTION if DELIVERED_ACTION in actions.values() else RELAYED_ACTION
        self.notify(env, chosen, now, kind, actions)

    def notify(
        self,
        env: Envelope,
        recipients: list[Recipient],
        now: float,
        action: str,
        actions: dict[str, str] | None = None,
    ) -> bool:
        """
        Queue a DSN about C{recipients}.  Returns False only when it could
        not be queued (spool error), so the caller keeps the recipients.

        @param actions: per-recipient Action where it differs from C{action}.
        """
        qid = env.queue_id
        actions = actions or {}
        recipients = [r for r in recipients if self._wants(r, actions.get(r.address, action))]
        if not recipients:
            return True
        to = env.sender
        client: dict[str, Any] = {"protocol": "dsn", "bounce_of": qid}
        if not env.sender:
            if action != FAILED_ACTION:
                return True
            if env.client.get("double_bounce"):
                mail_event("bounce", "{queue_id}: undeliverable postmaster notification discarded", queue_id=qid)
                return True
            postmaster = self.postmaster.lower()
            if all(postmaster in (r.address.lower(), r.original.lower()) for r in recipients):
                mail_event("bounce", "{queue_id}: undeliverable bounce to postmaster discarded", queue_id=qid)
                return True
            to = self.postmaster
            client["double_bounce"] = True
        addressed = self._address_notice(qid, to, client, action)
        if isinstance(addressed, bool):
            return addressed  # False: try again later; True: discarded
        to, finals = addressed
        try:
            message = make_dsn(
                env,
                recipients,
                self.spool.message_path(qid),
                self.hostname,
                now,
                action,
                qid,
                to=to,
                retry_until=self.expires(env),
                actions=actions,
            )
            esmtp: dict[str, Any] = {}
            if not message.isascii():
                esmtp["body"] = "8BITMIME"
            if not all(a.isascii() for a in [to, *finals]):
                esmtp["smtputf8"] = True
            dsn = Envelope(
                queue_id=new_queue_id(now),
                sender="",
                recipients=[Recipient(final, original=to) for final in finals],
                arrival=now,
                next_attempt=now,
                esmtp=esmtp,
                client=client,
            )
            self.spool.add(dsn, message)
        except OSError as e:
            log.error("{queue_id}: cannot queue a {action} notification: {error}", queue_id=qid, action=action, error=e)
            return False
        if action == DELAYED_ACTION:
            kind = "delay notification"
        elif action in (DELIVERED_ACTION, RELAYED_ACTION):
            kind = "sender delivery status notification"
        elif client.get("double_bounce"):
            kind = "postmaster non-delivery notification"
        else:
            kind = "sender non-delivery notification"
        mail_event("bounce", "{queue_id}: {kind}: {dsn_id}", queue_id=qid, kind=kind, dsn_id=dsn.queue_id)
        self.enqueue(dsn)
        return True

    def _address_notice(
        self, qid: str, to: str, client: dict[str, Any], action: str
    ) -> tuple[str, list[str]] | bool:
        """
        (recipient, its final addresses) of a notification to C{to}.  A
        sender that no longer resolves gets no notice: a bounce goes to
        the postmaster instead (C{client} is marked a double bounce), other
        notices are dropped (C{True}); a postmaster that does not resolve
        gets it unexpanded -- its own mailbox, the postmaster rule, is the
        last place left.  C{False}: a temporary error, try again later.
        """
        while True:
            try:
                return to, self._resolve(to)
            except _Unresolved as e:
                if e.temporary:
                    log.warn(
                        "{queue_id}: cannot resolve the notification recipient {to} now: {error}",
                        queue_id=qid, to=to, error=e.text,
                    )
                    return False
                if client.get("double_bounce"):
                    log.error(
                        "{queue_id}: cannot resolve the notification recipient {to}: {error}; sending to it unexpanded",
                        queue_id=qid, to=to, error=e.text,
                    )
                    return to, [to]
                if action != FAILED_ACTION:
                    log.warn(
                        "{queue_id}: {action} notification for {to} discarded: {error}",
                        queue_id=qid, action=action, to=to, error=e.text,
                    )
                    return True
                log.warn(
                    "{queue_id}: cannot resolve the sender {to}: {error}; notifying the postmaster",
                    queue_id=qid, to=to, error=e.text,
                )
                to = self.postmaster
                client["double_bounce"] = True

    def _resolve(self, to: str) -> list[str]:
        """
        The final addresses of a notification's recipient, as local delivery
        expects them (an alias or C{user+tag} address has no Maildir of its
        own).

        @raise _Unresolved: the resolver refused it (temporary for a 4xx).
        """
        if self.resolve is None:
            return [to]
        try:
            finals = [a for a in self.resolve(to) if a]
        except RecipientError as e:
            raise _Unresolved(str(e), 400 <= e.code < 500) from e
        except AddressError as e:
            raise _Unresolved(f"bad address: {e}", False) from e
        except Exception as e:  # a bug: never lose the round for it
            log.failure("cannot resolve the notification recipient {to}", to=to)
            raise _Unresolved(f"{type(e).__name__}: {e}", False) from e
        return finals or [to]
