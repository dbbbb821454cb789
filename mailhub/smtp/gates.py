"""
What a session passes before it is served: the PROXY header of a
connection from a proxy, and the rate limits at connect, MAIL and RCPT.

Owns: L{Gates}, one per session: reading the PROXY header when the peer
is in C{server.proxy_from} (L{mailhub.smtp.proxyheader}; on implicit-TLS
listeners it was read beneath TLS, L{mailhub.smtp.proxytls}), so that
everything after it -- the connection limits, the Received header, the
logs, the relay decision, the rate limits -- sees the client's address
and not the proxy's; closing a proxy's connection whose header is
missing, malformed or late (a log line and a C{reject} event, no reply:
the peer is a proxy, not an SMTP client); refusing a PROXY header from
anyone else (C{554 5.7.1}, then close); holding the greeting, a MAIL or
a RCPT until the rate limits answer (L{mailhub.ratelimit.limits.RateLimits}:
the session reads nothing meanwhile) and sending their verdict
(C{421 4.7.0} and close at connect, C{450 4.7.1} at MAIL and RCPT).

Must not touch: the commands' own checks (they run after a gate lets
them through), the counting (L{mailhub.ratelimit}), the input buffer.
What it uses of its host, the session (L{mailhub.smtp.server.SMTPServer}):
C{factory} (C{proxy}, C{ratelimit}), C{session}, C{config}, C{pacer},
C{closed}, C{transport}, and its methods C{begin}, C{greet},
C{run_command}, C{reply}, C{write}, C{close}, C{process},
C{dataReceived}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from mailhub.maillog import mail_event
from mailhub.ratelimit.limits import Verdict
from mailhub.smtp.proto import Reply
from mailhub.smtp.proxyheader import ProxyHeaderReader, log_header_failure

__all__ = ["Gates", "PROXY_REFUSED"]

log = Logger()

#: The reply to a PROXY header from a peer outside C{server.proxy_from}.
PROXY_REFUSED = Reply(554, "5.7.1", "Error: PROXY header not accepted from your address")


class Gates:
    def __init__(self, host: Any) -> None:
        self.host = host
        self._reader: ProxyHeaderReader | None = None
        self._peer = ""

    @property
    def reading_header(self) -> bool:
        """The PROXY header is still being read: received bytes go to L{feed}."""
        return self._reader is not None

    # -- connect -------------------------------------------------------------------

    def connection_made(self, peer: str, proxied_by: str | None = None) -> None:
        """
        A connection from C{peer}: read its PROXY header first if it is a
        proxy, else begin.  C{proxied_by}: the header was read beneath TLS
        (L{mailhub.smtp.proxytls}), C{peer} is the client it named.
        """
        if proxied_by is not None:
            self.host.begin(peer, proxy=proxied_by)
            return
        proxy = self.host.factory.proxy
        if proxy is not None and proxy.expects(peer):
            self._peer = peer
            self._reader = proxy.reader(peer, self._proxied, self._proxy_failed)
            return
        self.host.begin(peer)

    def feed(self, data: bytes) -> None:
        assert self._reader is not None
        self._reader.feed(data)

    def _proxied(self, client: str, rest: bytes) -> None:
        self._reader = None
        log.debug("PROXY header from [{proxy}]: client [{client}]", proxy=self._peer, client=client)
        self.host.begin(client, proxy=self._peer)
        if rest:
            self.host.dataReceived(rest)

    def _proxy_failed(self, why: str) -> None:
        self._reader = None
        log_header_failure(self._peer, why, self.host.session.listener)
        transport = self.host.transport
        if transport is not None:
            transport.loseConnection()

    def greet(self) -> None:
        """Greet the client, once the connection rate limit let it in."""
        host = self.host
        limits = host.factory.ratelimit
        if limits is None:
            host.greet()
            return
        host.pacer.busy = True
        d = limits.connection(host.session.client_ip)
        d.addErrback(self._check_failed)
        d.addCallback(self._connection_checked)

    def _connection_checked(self, verdict: Verdict | None) -> None:
        host = self.host
        if host.closed:
            return
        host.pacer.busy = False
        if verdict is not None:
            code = 421 if verdict.code == 451 else verdict.code
            host.write(code, verdict.enhanced, f"{host.config.hostname} {verdict.text}")
            host.close()
            return
        host.greet()
        host.process()

    def stop(self) -> None:
        """The connection is gone."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop()

    # -- commands -------------------------------------------------------------------

    def refuse_proxy(self) -> None:
        """A PROXY line from a peer not in C{server.proxy_from}."""
        host = self.host
        mail_event(
            "reject",
            "NOQUEUE: reject: PROXY from [{client}]: {code} {enhanced} {text}; listener={listener}",
            client=host.session.client_ip, code=PROXY_REFUSED.code, enhanced=PROXY_REFUSED.enhanced,
            text=PROXY_REFUSED.text, listener=host.session.listener, reason="proxy_refused",
        )
        host.write(PROXY_REFUSED.code, PROXY_REFUSED.enhanced, PROXY_REFUSED.text)
        host.close()

    def hold(self, verb: str, handler: Callable[[str], None], arg: str) -> bool:
        """
        Whether the command waits for the rate limits (MAIL, RCPT with
        limits set): then it runs, or is refused, when they answer.
        """
        limits = self.host.factory.ratelimit
        if limits is None or verb not in ("MAIL", "RCPT"):
            return False
        session = self.host.session
        check = limits.mail if verb == "MAIL" else limits.rcpt
        self.host.pacer.busy = True
        d = check(session.client_ip, session.authenticated_user)
        d.addErrback(self._check_failed)
        d.addCallback(self._command_checked, handler, arg)
        return True

    @staticmethod
    def _check_failed(failure: Any) -> Verdict:
        """The limits never fail; if they did, the client hears a temporary error, not silence."""
        log.failure("rate limit check failed", failure)
        return Verdict("unavailable", 451, "4.3.0", "Error: rate limit service unavailable; try again later", 60)

    def _command_checked(self, verdict: Verdict | None, handler: Callable[[str], None], arg: str) -> None:
        host = self.host
        if host.closed:
            return
        host.pacer.busy = False
        if verdict is None:
            host.run_command(handler, arg)
        elif verdict.code == 421:
            host.write(verdict.code, verdict.enhanced, f"{host.config.hostname} {verdict.text}")
            host.close()
            return
        else:
            host.reply(Reply(verdict.code, verdict.enhanced, verdict.text))
        host.process()
