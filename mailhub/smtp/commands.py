"""
The verbs of the SMTP grammar a session executes: HELO, EHLO, MAIL, RCPT,
DATA, BDAT, RSET, NOOP, QUIT, HELP, VRFY, EXPN (STARTTLS and AUTH are
L{mailhub.smtp.tlsauth.TLSAuth}'s).

Owns: L{Commands}, one per session: checking each command's syntax and
order (RFC 5321 4.1.4), asking the relay policy about the sender and each
recipient, opening the L{Transaction} at MAIL and filling it at RCPT,
starting DATA / BDAT, the EHLO keywords, and the canned replies of these
verbs.  Each verb either replies or raises L{CommandError}, whose reply
the session sends.

Must not touch: the input buffer and modes beyond C{start_data} /
C{start_bdat}, message bytes (L{Transaction}), timers, the relay rules
themselves (L{mailhub.smtp.policy.Policy}).  What it uses of its host,
the session protocol (L{mailhub.smtp.server.SMTPServer}): C{session},
C{settings}, C{config}, C{factory} (C{policy}, C{has_room},
C{may_send_as}), C{tlsauth}, C{transaction}, C{esmtp}, and the methods
C{reply}, C{write}, C{close}, C{reset_transaction}, C{open_message},
C{start_data}, C{start_bdat}; with milters, C{milter} and C{after_milter}
(HELO, MAIL and RCPT wait for the milters' verdict before their own reply).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailhub import address
from mailhub.envelope import Recipient
from mailhub.maillog import mail_event
from mailhub.smtp import sasl as auth
from mailhub.smtp.proto import (
    _DIGITS,
    NEED_HELO,
    CommandError,
    Reply,
    _fields,
    parse_mail_params,
    parse_params,
    parse_rcpt_params,
    split_path,
)
from mailhub.smtp.transaction import Transaction

__all__ = ["Commands", "OK", "NEED_MAIL", "NEED_RCPT", "NO_RECIPIENTS", "LINE_TOO_LONG", "NO_STORAGE"]

# Canned replies.
OK = Reply(250, "2.0.0", "Ok")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")


class Commands:
    """The verbs of one session (see the module docstring); C{handlers} maps each verb to its method."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.handlers: dict[str, Callable[[str], None]] = {
            "HELO": self.do_helo,
            "EHLO": self.do_ehlo,
            "MAIL": self.do_mail,
            "RCPT": self.do_rcpt,
            "DATA": self.do_data,
            "BDAT": self.do_bdat,
            "RSET": self.do_rset,
            "NOOP": self.do_noop,
            "QUIT": self.do_quit,
            "HELP": self.do_help,
            "VRFY": self.do_vrfy,
            "EXPN": self.do_expn,
            "STARTTLS": host.tlsauth.do_starttls,
            "AUTH": host.tlsauth.do_auth,
        }

    def _greet(self, arg: str, esmtp: bool) -> None:
        verb = "EHLO" if esmtp else "HELO"
        if not arg or " " in arg or not arg.isascii():
            raise CommandError(501, "5.5.4", f"Syntax: {verb} hostname")
        self.host.reset_transaction()
        self.host.session.helo = arg
        self.host.esmtp = esmtp

    def _milter(self, verdict: Callable[[Any], Any], go: Callable[[], None]) -> None:
        """Run C{go} now, or once the session's milters let the command through (C{verdict(milter)})."""
        milter = getattr(self.host, "milter", None)
        if milter is None:
            go()
        else:
            self.host.after_milter(verdict(milter), go)

    def do_helo(self, arg: str) -> None:
        self._greet(arg, False)
        self._milter(lambda m: m.helo(arg), lambda: self.host.reply(Reply(250, "", self.host.config.hostname)))

    def do_ehlo(self, arg: str) -> None:
        self._greet(arg, True)
        self._milter(lambda m: m.helo(arg), self._ehlo_reply)

    def _ehlo_reply(self) -> None:
        size = self.host.config.max_message_size
        lines = [
            self.host.config.hostname,
            "PIPELINING",
            f"SIZE {size}" if size else "SIZE",
        ]
        if self.host.tlsauth.starttls_offered():
            lines.append("STARTTLS")
        if self.host.tlsauth.auth_offered():
            lines.append("AUTH " + " ".join(auth.MECHANISMS))
        lines += [
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "DSN",
        ]
        self.host.write(250, "", lines)

    def _address_error(self, e: address.AddressError, what: str) -> Reply:
        code = 553 if e.enhanced == "5.6.7" else 501
        return Reply(code, e.enhanced, f"Error: bad {what} address: {e}")

    def _sender_error(self, e: address.AddressError) -> Reply:
        """
        A bad MAIL FROM path, with the sender codes of RFC 3463: X.1.7 bad
        sender mailbox syntax, X.1.8 bad sender system address (the domain);
        the recipient codes X.1.3 / X.1.2 are for RCPT.
        """
        if e.enhanced == "5.1.3":
            return Reply(501, "5.1.7", f"Bad sender address syntax: {e}")
        if e.enhanced == "5.1.2":
            return Reply(501, "5.1.8", f"Bad sender system address: {e}")
        return self._address_error(e, "sender")

    def _qualified(self, path: str) -> str:
        """C{<user>} as C{<user@qualify_domain>} where the listener qualifies bare names (local submission)."""
        domain = self.host.settings.qualify_domain
        inner = path.strip().removeprefix("<").removesuffix(">")
        if domain is None or not inner or "@" in inner or ":" in inner:
            return path
        return f"<{inner}@{domain}>"

    def do_mail(self, arg: str) -> None:
        if self.host.session.helo is None:
            raise CommandError(*_fields(NEED_HELO))
        if self.host.transaction is not None:
            raise CommandError(503, "5.5.1", "Error: nested MAIL command")
        refusal = self.host.factory.policy.check_mail(self.host.session)  # 530 on submission without AUTH
        if refusal is not None:
            raise CommandError(*_fields(refusal))
        if arg[:5].upper() != "FROM:":
            raise CommandError(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        try:
            path, words = split_path(arg[5:])
        except CommandError as e:
            if e.reply.enhanced == "5.1.3":
                raise CommandError(501, "5.1.7", "Bad sender address syntax") from None
            raise
        if not path:  # "MAIL FROM:" is not the null sender; "<>" is
            raise CommandError(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        esmtp = parse_mail_params(parse_params(words), self.host.config.max_message_size)
        try:
            sender = address.parse_path(self._qualified(path), allow_utf8=esmtp["smtputf8"])
        except address.AddressError as e:
            self.host.reply(self._sender_error(e))
            return
        sender_text = "" if sender is None else str(sender)
        if not self.host.factory.has_room(esmtp.get("declared_size", 0)):
            mail_event(
                "reject",
                "NOQUEUE: reject: MAIL from [{client}]: {code} {enhanced} {text}; from=<{sender}>",
                client=self.host.session.client_ip, code=NO_STORAGE.code, enhanced=NO_STORAGE.enhanced,
                text=NO_STORAGE.text, sender=sender_text, reason="insufficient_storage",
            )
            self.host.reply(NO_STORAGE)
            return
        refusal = self.host.factory.policy.check_sender(
            self.host.session, sender_text, self.host.factory.may_send_as, self.host.settings.sender_check
        )
        if refusal is not None:
            mail_event(
                "reject",
                "NOQUEUE: reject: MAIL from [{client}]: {code} {enhanced} {text}; from=<{sender}> sasl_username={user}",
                client=self.host.session.client_ip, code=refusal.code, enhanced=refusal.enhanced,
                text=refusal.text, sender=sender_text, user=self.host.session.authenticated_user, reason="sender_not_owned",
            )
            self.host.reply(refusal)
            return

        def accept() -> None:
            self.host.transaction = Transaction(sender=sender_text, esmtp=esmtp)
            self.host.reply(Reply(250, "2.1.0", "Ok"))

        self._milter(lambda m: m.mail(sender_text, words), accept)

    def do_rcpt(self, arg: str) -> None:
        tx = self.host.transaction
        if tx is None:
            raise CommandError(*_fields(NEED_MAIL))
        if tx.bdat:
            raise CommandError(503, "5.5.1", "Error: RCPT not allowed during BDAT")
        if arg[:3].upper() != "TO:":
            raise CommandError(501, "5.5.4", "Syntax: RCPT TO:<address>")
        path, words = split_path(arg[3:])
        if not path:
            raise CommandError(501, "5.5.4", "Syntax: RCPT TO:<address>")
        notify, orcpt = parse_rcpt_params(parse_params(words))
        if path.removeprefix("<").removesuffix(">").lower() == "postmaster":
            mailbox = self.host.factory.policy.postmaster()
        else:
            try:
                parsed = address.parse_path(self._qualified(path), allow_utf8=tx.smtputf8)
            except address.AddressError as e:
                self.host.reply(self._address_error(e, "recipient"))
                return
            if parsed is None:
                raise CommandError(501, "5.1.3", "Error: null recipient address")
            mailbox = parsed
        if len(tx.accepted) >= self.host.config.max_recipients:
            raise CommandError(452, "4.5.3", "Error: too many recipients")
        result, addresses = self.host.factory.policy.check_recipient(self.host.session, mailbox)
        if result.ok:

            def accept() -> None:
                tx.accepted.append(str(mailbox))
                for a in addresses:
                    if a not in tx.recipients:
                        tx.recipients[a] = Recipient(address=a, original=str(mailbox), notify=list(notify), orcpt=orcpt)
                self.host.reply(result)

            self._milter(lambda m: m.rcpt(str(mailbox), words), accept)
            return
        else:
            mail_event(
                "reject",
                "NOQUEUE: reject: RCPT from [{client}]: {code} {enhanced} {text}; from=<{sender}> to=<{rcpt}>",
                client=self.host.session.client_ip, code=result.code, enhanced=result.enhanced,
                text=result.text, sender=tx.sender, rcpt=str(mailbox),
            )
        self.host.reply(result)

    def do_data(self, arg: str) -> None:
        if arg:
            raise CommandError(501, "5.5.4", "Syntax: DATA")
        tx = self.host.transaction
        if tx is None:
            raise CommandError(*_fields(NEED_RCPT))
        if tx.bdat:
            raise CommandError(503, "5.5.1", "Error: DATA not allowed after BDAT")
        if not tx.recipients:
            raise CommandError(*_fields(NO_RECIPIENTS))
        trouble = self.host.open_message(tx)
        if trouble is not None:
            self.host.reply(trouble)
            return
        self.host.start_data()

    def do_bdat(self, arg: str) -> None:
        words = arg.split()
        if not 1 <= len(words) <= 2 or not _DIGITS.match(words[0]) or (len(words) == 2 and words[1].upper() != "LAST"):
            raise CommandError(501, "5.5.4", "Syntax: BDAT count [LAST]")
        error: Reply | None = None
        tx = self.host.transaction
        if tx is None:
            error = NEED_MAIL
        elif not tx.recipients:
            error = NEED_RCPT
        elif not tx.bdat:
            error = self.host.open_message(tx)
            if error is None:
                tx.bdat = True
        self.host.start_bdat(int(words[0]), len(words) == 2, error)

    def do_rset(self, arg: str) -> None:
        if arg:
            raise CommandError(501, "5.5.4", "Syntax: RSET")
        self.host.reset_transaction()
        self.host.reply(OK)

    def do_noop(self, arg: str) -> None:
        self.host.reply(OK)

    def do_quit(self, arg: str) -> None:
        self.host.reset_transaction()
        self.host.write(221, "2.0.0", "Bye")
        self.host.close()

    def do_help(self, arg: str) -> None:
        self.host.write(214, "2.0.0", ["Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY", "See RFC 5321"])

    def do_vrfy(self, arg: str) -> None:
        if not self.host.config.vrfy:
            raise CommandError(502, "5.5.1", "Error: VRFY command is disabled")
        if not arg:
            raise CommandError(501, "5.5.4", "Syntax: VRFY address")
        # Never reveal whether a user exists (RFC 5321 3.5.3).
        self.host.reply(Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"))

    def do_expn(self, arg: str) -> None:
        if not self.host.config.expn:
            raise CommandError(502, "5.5.1", "Error: EXPN command is disabled")
        if not arg:
            raise CommandError(501, "5.5.4", "Syntax: EXPN list")
        self.host.reply(Reply(252, "2.5.0", "Cannot EXPN list, but will accept message and attempt delivery"))
