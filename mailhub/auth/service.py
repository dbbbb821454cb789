"""
The authentication part of the daemon, built from C{[dkim]} and C{[mailauth]}.

Owns: L{AuthService} -- the worker thread pool the checks and the signer
run in (its own, so slow DNS answers never hold the threads the commits
use), the DNS adapter on the relay's servers, the key store and signer,
the end-of-data check, and L{AuthService.wrap}, which puts signing in
front of the remote delivery agent.  The settings are read at start; a
change needs a restart (docs/authentication.rst).

Must not touch: listeners, the spool, the scheduler (the tap hands each
its part).
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailhub.auth.check import AuthCheck, AuthSettings
from mailhub.auth.dns import AuthDNS, make_resolver
from mailhub.auth.keys import KeyStore, key_problems
from mailhub.auth.sign import Signer, SigningDelivery
from mailhub.config import DEFAULTS_SOURCE, Config
from mailhub.relay.nexthop import parse_dns_server

__all__ = ["AuthService"]

log = Logger()


class AuthService(service.Service):
    """
    @param resolver: a twisted.names resolver to use instead of the
        configured servers' (tests).
    """

    name = "auth"  # type: ignore[assignment]  # Twisted says name = None, unannotated

    def __init__(self, config: Config, reactor: Any, resolver: Any = None) -> None:
        self.reactor = reactor
        m = config.mailauth
        self.pool = ThreadPool(minthreads=0, maxthreads=m.threads, name="mailhub-auth")
        self.dns: AuthDNS | None = None
        if m.verify:
            if resolver is None:
                servers = [parse_dns_server(s) for s in config.relay.dns_servers] or None
                resolver = make_resolver(reactor, servers)
            self.dns = AuthDNS(reactor, resolver, timeout=m.dns_timeout)
        self.signer: Signer | None = None
        self.keys_dir = config.dkim.keys
        self.source = config.source or DEFAULTS_SOURCE
        if config.dkim.keys is not None:
            self.signer = Signer(KeyStore(config.dkim.keys, config.dkim.sign_subdomains), self.run)
        settings = AuthSettings(
            m.authserv_id or config.server.hostname, m.verify, m.dmarc_enforce, m.temperror, m.spf_reject
        )
        self.check = AuthCheck(settings, self.dns, self.run)

    def run(self, f: Any, *args: Any) -> Any:
        """C{f(*args)} in the auth thread pool: a Deferred of its result."""
        return threads.deferToThreadPool(self.reactor, self.pool, f, *args)

    @property
    def checks(self) -> list[Any]:
        """The end-of-data checks for the SMTP listeners: [] when neither signing nor checking is on."""
        return [self.check] if self.signer is not None or self.check.settings.verify else []

    def wrap(self, remote: Any) -> Any:
        """The remote delivery agent the router should use: signing in front when keys are configured."""
        return SigningDelivery(remote, self.signer) if self.signer is not None else remote

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        if self.keys_dir is not None:
            for text in key_problems(self.keys_dir):
                log.error("{source}: {problem}", source=self.source, problem=text)

    def stopService(self) -> Any:
        super().stopService()
        return threads.deferToThread(self.pool.stop) if self.pool.started else None
