"""
DKIM signing of the mail that is ours, once per message, with dkimpy.

Owns: what is signed (L{is_ours}: mail from an authenticated user, a
trusted network, mailhub-sendmail, the HTTP API, and mailhub's own
bounces and notices -- never mail merely relayed for others), which keys
sign it (the C{From:} domain's, L{mailhub.auth.keys.KeyStore}), the header
fields signed (L{SIGNED_HEADERS}, C{From} signed twice so none can be
added, relaxed/relaxed), and L{SigningDelivery}: the remote delivery agent
as the router sees it, which signs a message on its first way out and
keeps the signatures in its envelope (L{Envelope.dkim}).

Sign once: the signatures are computed the first time the message goes to
another host and stored in the envelope, which the scheduler writes back
after the attempt, so a retry sends the same bytes.  Two forms are signed:
the message as queued (C{original}) and, when it has 8-bit data that a
peer without 8BITMIME would get converted, the deterministic 7-bit form
L{mailhub.relay.downgrade.downgrade} makes of it (C{7bit}).
L{mailhub.relay.prepare} puts the signatures of the form it sends above
the message, so what leaves always carries a signature over its own
bytes.  A message whose From domain has no key leaves unsigned; a key
that cannot be read makes the attempt a temporary failure (4.7.0), so mail
of a domain that publishes DMARC never leaves unsigned by mistake.

Must not touch: the wire (prepare adds the fields), the spool (the
scheduler persists the envelope), DNS.  The CPU work (reading, hashing,
RSA) runs in the auth thread pool.
"""

from __future__ import annotations

from collections.abc import Callable
from email import message_from_bytes
from email.policy import compat32
from email.utils import getaddresses
from typing import Any

import dkim
from twisted.internet import defer
from twisted.logger import Logger

from mailhub.auth.keys import DKIMKey, KeyError_, KeyStore
from mailhub.envelope import Envelope, Outcome, Recipient, ReportFunction
from mailhub.maillog import mail_event
from mailhub.queue.queuefile import QueueFileError, open_message
from mailhub.relay.downgrade import ConversionError, downgrade, split_header

__all__ = ["SIGNED_HEADERS", "is_ours", "from_domain", "sign_bytes", "Signer", "SigningDelivery"]

log = Logger()

#: Header fields signed when present (RFC 6376 5.4.1's list, with the
#: MIME and List-* fields); From is signed once more than it occurs.
SIGNED_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "message-id", "in-reply-to", "references",
    "mime-version", "content-type", "content-transfer-encoding", "content-id", "content-description",
    "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc", "resent-message-id",
    "list-id", "list-help", "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-unsubscribe",
    "list-post", "list-owner", "list-archive", "sender",
)

#: Protocols of mail that enters without an SMTP client (envelope.client["protocol"]).
_OUR_PROTOCOLS = ("HTTP", "local", "dsn")


def is_ours(envelope: Envelope) -> bool:
    """
    Whether the message comes from us: an authenticated user (SMTP AUTH,
    the HTTP API), a client in the trusted networks (marked at the end of
    DATA), mailhub-sendmail, or mailhub itself (bounces, notices).
    """
    c = envelope.client
    return bool(
        c.get("user") or c.get("relay_allowed") or c.get("protocol") in _OUR_PROTOCOLS
        or c.get("pickup") or c.get("bounce_of")
    )


def from_domain(header: bytes) -> str | None:
    """The domain of the (first) C{From:} address of a header section, lower case; None without one."""
    msg = message_from_bytes(header, policy=compat32)
    values = [str(v) for v in (msg.get_all("From") or [])]
    for _name, addr in getaddresses(values):
        local, at, domain = addr.rpartition("@")
        if at and local and domain:
            domain = domain.strip().strip("[]").lower().rstrip(".")
            try:
                return domain.encode("idna").decode("ascii") if not domain.isascii() else domain
            except UnicodeError:
                return None
    return None


def _headers_to_sign(header: bytes) -> list[bytes]:
    msg = message_from_bytes(header, policy=compat32)
    present = {k.lower() for k in msg.keys()}
    names = [h for h in dict.fromkeys(SIGNED_HEADERS) if h in present]
    count = sum(1 for k in msg.keys() if k.lower() == "from")
    return [n.encode() for n in names] + [b"from"] * count  # "from" once more than it occurs


def sign_bytes(raw: bytes, keys: list[DKIMKey]) -> bytes:
    """The DKIM-Signature fields (one per key, CRLF line ends) for the message C{raw}."""
    head, _sep, _body, _complete = split_header(raw)
    include = _headers_to_sign(head)
    out = b""
    for key in keys:
        out += dkim.sign(
            raw, key.selector.encode(), key.domain.encode(), key.private,
            canonicalize=(b"relaxed", b"relaxed"), include_headers=include,
            signature_algorithm=key.algorithm, linesep=b"\r\n",
        )
    return out


class Signer:
    """
    Signs messages that are ours with the keys of C{keys}.

    @param run: runs a function in a worker thread (the auth pool), a Deferred of its result.
    """

    def __init__(self, keys: KeyStore, run: Callable[..., defer.Deferred[Any]]) -> None:
        self.keys = keys
        self.run = run

    def signatures(self, envelope: Envelope, path: str) -> dict[str, str]:
        """
        The signatures for the queued message at C{path} (in a worker
        thread): C{{"original": fields, "7bit": fields}}, the second only
        when it differs; {} when the From domain has no key.

        @raise KeyError_: a key cannot be used.  @raise OSError, QueueFileError: unreadable.
        """
        with open_message(path) as f:
            raw = f.read()
        head, _sep, _body, _complete = split_header(raw)
        domain = from_domain(head)
        if domain is None:
            return {}
        keys = self.keys.keys_for(domain)
        if not keys:
            return {}
        out = {"original": sign_bytes(raw, keys).decode("ascii")}
        if not raw.isascii():
            try:
                converted = downgrade(raw)
            except ConversionError:
                converted = raw  # prepare refuses to send it to a 7-bit peer anyway
            if converted != raw:
                out["7bit"] = sign_bytes(converted, keys).decode("ascii")
        return out

    async def ensure(self, envelope: Envelope, path: str) -> None:
        """Sign the message once when it is ours and has no signatures yet."""
        if envelope.dkim or not is_ours(envelope):
            return
        sigs = await self.run(self.signatures, envelope, path)
        if sigs:
            envelope.dkim = sigs
            for line in sigs["original"].split("DKIM-Signature:")[1:]:
                tags = dkim.util.parse_tag_value(line.encode())
                mail_event(
                    "dkim_sign", "{queue_id}: dkim: signed d={d} s={s} a={a}",
                    queue_id=envelope.queue_id, d=tags[b"d"].decode(), s=tags[b"s"].decode(),
                    a=tags[b"a"].decode(),
                )


class SigningDelivery:
    """
    The remote delivery agent with signing in front: a message that is
    ours is signed (once) before C{remote} sends it.

    @param remote: the relay agent (a L{mailhub.envelope.DeliveryAgent}).
    """

    def __init__(self, remote: Any, signer: Signer) -> None:
        self.remote = remote
        self.signer = signer

    def deliver(
        self, envelope: Envelope, recipients: list[Recipient], message_path: str, report: ReportFunction
    ) -> defer.Deferred[list[Outcome]]:
        return defer.Deferred.fromCoroutine(self._deliver(envelope, recipients, message_path, report))

    async def _deliver(
        self, envelope: Envelope, recipients: list[Recipient], message_path: str, report: ReportFunction
    ) -> list[Outcome]:
        try:
            await self.signer.ensure(envelope, message_path)
        except (KeyError_, OSError, QueueFileError, dkim.DKIMException) as e:
            text = f"DKIM signing failed: {e}"[:300]
            log.error("{queue_id}: {text}", queue_id=envelope.queue_id, text=text)
            failed = [Outcome.temporary(r.address, text, 0, "4.7.0") for r in recipients]
            try:
                report(list(failed))
            except Exception:
                log.failure("{queue_id}: error reporting outcomes", queue_id=envelope.queue_id)
            return failed
        result: list[Outcome] = await self.remote.deliver(envelope, recipients, message_path, report)
        return result
