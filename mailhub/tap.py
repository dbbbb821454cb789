"""
The twistd plugin's options and service: the one place everything is wired.

Owns: turning command-line options and the configuration into a running
service tree -- spool, directory, delivery agents, router, scheduler,
policy and one listener per configured endpoint -- and the first log lines
that say what mailhub listens on and where mail goes.  This is the only
module that imports the global reactor (inside L{makeService}), so every
other module gets its clock and reactor injected.

Must not touch: protocol details, delivery, the spool's files.  A
configuration problem stops startup with one line on stderr
(C{mailhub: FILE: key: problem}) and exit status 78 (EX_CONFIG), never a
traceback.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, LoggingFile
from twisted.python import usage

from .config import DEFAULTS_SOURCE, Config, ConfigError, find_config_file, load_config

__all__ = ["Options", "makeService", "EX_CONFIG", "EX_OSERR"]

log = Logger()

#: sysexits.h: configuration error, and "cannot create/bind".
EX_CONFIG = 78
EX_OSERR = 71


def fail(message: str, status: int = EX_CONFIG) -> NoReturn:
    """
    Stop startup with one clean line on stderr.  twistd and the console
    script let C{SystemExit} through, so there is no traceback.
    """
    stream = sys.stderr
    if isinstance(stream, LoggingFile) and sys.__stderr__ is not None:
        # twistd redirects stderr into the log once logging has begun (a
        # listener failing to bind); the operator still gets the line.
        stream = sys.__stderr__
    stream.write(f"mailhub: {message}\n")
    stream.flush()
    raise SystemExit(status)


class Options(usage.Options):
    """
    C{twistd mailhub} options.  Everything else is in the configuration
    file; these override it for quick starts and tests.
    """

    synopsis = "[--config FILE] [--smtp ENDPOINT]... [--data DIR] [--hostname NAME] [--domain DOMAIN]..."
    longdesc = (
        "Run the mailhub mail transfer agent.  The configuration file is --config FILE, "
        "else $MAILHUB_CONFIG, else /etc/mailhub/mailhub.toml if it exists, else the "
        "embedded defaults (SMTP on 127.0.0.1:8025, data under ./mailhub-data)."
    )
    optParameters = [
        ["config", "c", None, "Configuration file (TOML)."],
        ["data", "d", None, "Data directory: spool and mailboxes default to DIR/spool and DIR/mailboxes."],
        ["hostname", None, None, "Host name used in greetings, Received: and bounces (server.hostname)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["smtp"] = []
        self["domain"] = []
        self.config: Config | None = None

    def opt_smtp(self, endpoint: str) -> None:
        """SMTP listener endpoint, e.g. tcp:2525:interface=127.0.0.1 (repeatable; replaces server.smtp)."""
        self["smtp"].append(endpoint)

    def opt_domain(self, domain: str) -> None:
        """Local domain (repeatable; replaces local.domains)."""
        self["domain"].append(domain)

    def overrides(self) -> dict[str, Any]:
        """The dotted-key overrides these options stand for."""
        result: dict[str, Any] = {}
        if self["smtp"]:
            result["server.smtp"] = list(self["smtp"])
        if self["domain"]:
            result["local.domains"] = list(self["domain"])
        if self["hostname"]:
            result["server.hostname"] = self["hostname"]
        return result

    def postOptions(self) -> None:
        """Load and validate the configuration now, before anything starts."""
        self.config = self.loadConfig()

    def loadConfig(self) -> Config:
        try:
            return load_config(find_config_file(self["config"]), self.overrides(), self["data"])
        except ConfigError as e:
            fail(str(e))


class _StartupLog(service.Service):
    """Says, first thing after start, where mail goes and which configuration is in use."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def privilegedStartService(self) -> None:
        # privileged start runs before the listeners bind (they are later
        # children), so these are the first lines of mailhub's log.
        super().privilegedStartService()
        c = self.config
        log.info(
            "mailhub starting as {hostname}; configuration: {source}",
            hostname=c.server.hostname,
            source=c.source or DEFAULTS_SOURCE,
        )
        log.info(
            "mail goes to: spool {spool}; mailboxes {mailboxes}; local domains {domains}",
            spool=c.spool.path,
            mailboxes=c.local.mailboxes,
            domains=", ".join(c.local.domains),
        )


class _Listener(StreamServerEndpointService):
    """
    A listener that fails startup cleanly when it cannot bind, and logs the
    address it really got (the real port when the endpoint says port 0).
    """

    _raiseSynchronously = True

    def __init__(self, description: str, endpoint: Any, factory: Any, kind: str) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self.kind = kind
        self.port: Any = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = e.socketError.strerror if getattr(e.socketError, "strerror", None) else e.socketError
            fail(f"cannot listen on {self.description}: {reason}", EX_OSERR)
        except Exception as e:  # e.g. a UNIX socket path in a missing directory
            fail(f"cannot listen on {self.description}: {e}", EX_OSERR)

    def startService(self) -> None:
        super().startService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        host = port.getHost()
        if hasattr(host, "port"):
            where = f"{host.host}:{host.port}"
        else:
            where = str(getattr(host, "name", host))
        log.info(
            "listening for {kind} on {description} ({where})",
            kind=self.kind.upper(),
            description=self.description,
            where=where,
        )
        return port


def makeService(options: Options | dict[str, Any]) -> service.MultiService:
    """
    Build the service tree.  Children start in order: the startup log, the
    scheduler (whose startService recovers the spool and queues everything
    pending) and then the listeners, so recovery always finishes before the
    first client is accepted.
    """
    from twisted.internet import reactor, threads

    from .directory import AliasesError, Directory
    from .local import LocalDelivery
    from .policy import Policy
    from .router import Router
    from .scheduler import RetryPolicy, Scheduler
    from .smtpd import SMTPServerFactory
    from .spool import Spool

    config = getattr(options, "config", None)
    if config is None:
        if isinstance(options, Options):
            config = options.loadConfig()
        else:
            try:
                config = load_config(find_config_file(options.get("config")), None, options.get("data"))
            except ConfigError as e:
                fail(str(e))

    from twisted.internet.endpoints import serverFromString

    top = service.MultiService()
    _StartupLog(config).setServiceParent(top)
    try:
        spool = Spool(config.spool.path, config.spool.fsync)
    except OSError as e:
        fail(f"cannot create spool {config.spool.path}: {e.strerror or e}", EX_OSERR)
    local_cfg = config.local
    try:
        directory = Directory(
            local_cfg.domains,
            local_cfg.mailboxes,
            local_cfg.users,
            local_cfg.aliases,
            local_cfg.extension_separator,
            clock=reactor,
        )
    except AliasesError as e:  # "FILE:LINE: problem"
        fail(str(e))
    # spool.fsync is the one durability switch: it covers the Maildir files too.
    local = LocalDelivery(directory, config.server.hostname, fsync=config.spool.fsync)
    router = Router(spool, directory, local)
    relay = config.relay
    retry = RetryPolicy(
        min_backoff=relay.min_backoff,
        max_backoff=relay.max_backoff,
        max_queue_lifetime=relay.max_queue_lifetime,
        delay_warning=relay.delay_warning,
    )
    scheduler = Scheduler(
        spool, router, reactor, retry, concurrency=relay.concurrency, hostname=config.server.hostname
    )
    scheduler.setName("scheduler")
    scheduler.setServiceParent(top)
    # The first configured domain (directory.domains is a set) receives <postmaster>.
    policy = Policy(directory, config.server.trusted_networks, postmaster_domain=local_cfg.domains[0])
    for description in config.server.smtp:
        # The commit (fsyncs) runs in a thread so other sessions are not
        # stalled by the disk; the session reads nothing until it is done.
        factory = SMTPServerFactory(
            config.server, spool, scheduler.enqueue, policy, reactor, "smtp", run=threads.deferToThread
        )
        endpoint = serverFromString(reactor, description)
        _Listener(description, endpoint, factory, "smtp").setServiceParent(top)
    return top
