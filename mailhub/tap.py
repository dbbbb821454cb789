"""
The twistd plugin's options and service: the one place everything is wired.

Owns: turning command-line options and the configuration into a running
service tree -- spool, directory, delivery agents (local and remote),
router, scheduler, pickup, control socket, TLS, users file, AUTH throttle,
policy, one listener per configured endpoint (smtp, submission, smtps,
http), the log observers that feed the metrics and the event log -- and
the first log lines that say what mailhub listens on and where mail goes.
This is the only module that imports the global reactor (inside
L{makeService}), so every other module gets its clock and reactor
injected.

Must not touch: protocol details, delivery, the spool's files.  A
configuration problem stops startup with one line on stderr
(C{mailhub: FILE: key: problem}) and exit status 78 (EX_CONFIG), never a
traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, NoReturn

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger, LoggingFile
from twisted.python import usage

from .config import DEFAULTS_SOURCE, Config, ConfigError, find_config_file, load_config
from .maillog import mail_publisher

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
            return load_config(find_config_file(self["config"]), self.overrides(), self["data"], check_files=True)
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
        if c.local.mode == "system":
            mailboxes = f"~ACCOUNT/{c.local.home_maildir} (system accounts)"
        else:
            mailboxes = c.local.mailboxes
        log.info(
            "mail goes to: spool {spool}; mailboxes {mailboxes}; local domains {domains}",
            spool=c.spool.path,
            mailboxes=mailboxes,
            domains=", ".join(c.local.domains),
        )
        if c.server.event_log:
            log.info("event log: {path}", path=c.server.event_log)
        if c.server.mail_log:
            log.info("mail log: {path}", path=c.server.mail_log)

    def startService(self) -> None:
        # Runs after twistd has dropped privileges (--uid): this euid writes the mail.
        super().startService()
        euid = os.geteuid()
        if self.config.local.mode == "system" and euid != 0:
            log.warn(
                'local.mode = "system" but mailhub runs as uid {euid}, not root: it can deliver '
                "only into Maildirs it may create and own (its own account); mail for other "
                "accounts stays queued with 451 4.3.x (docs/delivery.rst)",
                euid=euid,
            )


class _Observer(service.Service):
    """
    A log observer (metrics, event log) on the mail events' publisher
    (L{mailhub.maillog.mail_publisher}: they only use mail events, and it
    has them whether or not C{server.mail_log} keeps them out of twistd's
    log) while the service runs.  Started before the scheduler (spool
    recovery logs mail events) and stopped after it, so no mail event is
    missed; C{close} (the event log's file) runs when it stops.
    """

    def __init__(self, observer: ILogObserver, close: Callable[[], None] | None = None) -> None:
        self.observer = observer
        self.close = close

    def startService(self) -> None:
        super().startService()
        mail_publisher.addObserver(self.observer)

    def stopService(self) -> Any:
        mail_publisher.removeObserver(self.observer)
        if self.close is not None:
            self.close()
        return super().stopService()


class _Listener(StreamServerEndpointService):
    """
    A listener that fails startup cleanly when it cannot bind, and logs the
    address it really got (the real port when the endpoint says port 0).
    """

    _raiseSynchronously = True

    def __init__(
        self, description: str, endpoint: Any, factory: Any, kind: str,
        drain: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self.kind = kind
        self.port: Any = None
        self.drain = drain

    def stopService(self) -> Any:
        """
        Stop listening first, then (SMTP listeners) wait, bounded, until the
        commits in flight have answered 250 or 451: twistd waits for this
        Deferred before the reactor drops the connections.
        """
        from twisted.internet import defer

        d = defer.maybeDeferred(super().stopService)
        if self.drain is not None:
            drain = self.drain
            d.addBoth(lambda _: drain())
        return d

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
            name = getattr(host, "name", host)  # a UNIX socket's path is bytes
            where = os.fsdecode(name) if isinstance(name, bytes) else str(name)
        log.info(
            "listening for {kind} on {description} ({where})",
            kind=self.kind.upper(),
            description=self.description,
            where=where,
        )
        return port


def _pickup_resolver(directory: Any) -> Any:
    """
    The C{resolve_recipient} of the pickup service: local recipients are
    expanded like the SMTP server's policy does (aliases, extensions);
    anything else is returned as is.  A RecipientError (unknown user) is
    raised on purpose: the pickup service then queues the address as
    written and the delivery outcome bounces it to the local sender.
    """
    from .address import parse_mailbox

    def resolve(address: str) -> list[str]:
        mailbox = parse_mailbox(address)
        if not directory.is_local(mailbox.domain_key):
            return [address]
        return list(directory.resolve(mailbox)) or [address]

    return resolve


def _remote_delivery(config: Config, reactor: Any) -> Any:
    """The outbound relay agent, from the [relay] keys (docs/relay.rst)."""
    from .config import read_secret
    from .remote import RemoteDelivery

    relay, server = config.relay, config.server
    auth = None
    if relay.smarthost_user is not None and relay.smarthost_password_file is not None:
        try:
            auth = (relay.smarthost_user, read_secret(relay.smarthost_password_file, config.source or DEFAULTS_SOURCE))
        except ConfigError as e:
            fail(str(e))
    try:
        return RemoteDelivery(
            reactor,
            relay.helo_name or server.hostname,
            smarthost=relay.smarthost,
            smarthost_auth=auth,
            routes=dict(relay.routes),
            dns_servers=list(relay.dns_servers) or None,
            port=relay.port,
            tls=relay.tls,
            destination_concurrency=relay.destination_concurrency,
            total_concurrency=relay.concurrency,
            local_addresses=list(relay.local_addresses),
            local_names=[server.hostname],
            client_options={
                "tls_ca_file": relay.tls_ca_file,
                "connect_timeout": relay.connect_timeout,
                "greeting_timeout": relay.greeting_timeout,
                "command_timeout": relay.command_timeout,
                "data_init_timeout": relay.data_init_timeout,
                "data_xfer_timeout": relay.data_xfer_timeout,
                "data_done_timeout": relay.data_done_timeout,
            },
            idle_timeout=relay.connection_cache_time,
        )
    except ValueError as e:  # config.py checked every value; this is a safety net
        fail(f"{config.source or DEFAULTS_SOURCE}: relay: {e}")


def makeService(options: Options | dict[str, Any]) -> service.MultiService:
    """
    Build the service tree.  Children start in order: the startup log, the
    log observers (metrics, event log, mail log file) and the status page sampler, the
    remote delivery agent, the scheduler (whose startService recovers the
    spool and queues everything pending), the pickup service and the
    control socket (both feed the scheduler), and then the SMTP listeners
    (smtp, submission, smtps) and the HTTP listeners, so recovery always
    finishes before the first client is accepted.  Stopping runs the other way round; stopping
    the remote agent QUITs its idle connections.
    """
    from twisted.application.internet import TimerService
    from twisted.internet import reactor, threads

    from .auth import AuthThrottle, UsersFile
    from .control import control_service, socket_path
    from .directory import AliasesError, Directory
    from .eventlog import EventLogObserver
    from .httpapi import make_http_site
    from .local import LocalDelivery
    from .localproc import LocalDeliveryProcesses, settings_for
    from .metrics import MailMetrics, MetricsObserver, spool_queue_stats
    from .pickup import PickupService
    from .policy import Policy
    from .router import Router
    from .scheduler import RetryPolicy, Scheduler
    from .smtpd import SMTPServerFactory
    from .spool import Spool
    from .tls import ServerTLS, implicit_tls_endpoint, install_sighup_reload

    config = getattr(options, "config", None)
    if config is None:
        if isinstance(options, Options):
            config = options.loadConfig()
        else:
            try:
                config = load_config(
                    find_config_file(options.get("config")), None, options.get("data"), check_files=True
                )
            except ConfigError as e:
                fail(str(e))

    from twisted.internet.endpoints import serverFromString

    source = config.source or DEFAULTS_SOURCE
    top = service.MultiService()
    _StartupLog(config).setServiceParent(top)
    try:
        spool = Spool(config.spool.path, config.spool.fsync)
    except OSError as e:
        fail(f"cannot create spool {config.spool.path}: {e.strerror or e}", EX_OSERR)

    # Observability: fed from the mail log (maillog events), so these observe
    # before anything that emits mail events starts (scheduler recovery).
    metrics = MailMetrics(reactor, spool_queue_stats(spool))
    _Observer(MetricsObserver(metrics)).setServiceParent(top)
    event_log = config.server.event_log
    if event_log:
        try:
            event_observer = EventLogObserver(event_log)
        except OSError as e:
            fail(f"{source}: server.event_log: cannot open {event_log}: {e.strerror or e}")
        _Observer(event_observer, event_observer.close).setServiceParent(top)
    if config.server.mail_log:
        # Mail lines to a file of mailhub's own instead of twistd's log
        # (docs/performance.rst, "mail log"); the observers above still see them.
        from .maillog import MailLogFile, MailLogService

        try:
            mail_log_file = MailLogFile(config.server.mail_log, reactor)
        except OSError as e:
            fail(f"{source}: server.mail_log: cannot open {config.server.mail_log}: {e.strerror or e}")
        MailLogService(mail_log_file).setServiceParent(top)
    sampler = TimerService(60, metrics.sample)  # queue size history of the status page
    sampler.clock = reactor
    sampler.setServiceParent(top)

    local_cfg = config.local
    try:
        # Also the settings of the local delivery processes, which build
        # their own Directory from them.
        directory_args = {
            "domains": list(local_cfg.domains),
            "mailboxes": local_cfg.mailboxes,
            "users": None if local_cfg.users is None else list(local_cfg.users),
            "aliases_path": local_cfg.aliases,
            "separator": local_cfg.extension_separator,
            "mode": local_cfg.mode,
            "home_maildir": local_cfg.home_maildir,
            "min_uid": local_cfg.min_uid,
            "max_uid": local_cfg.max_uid,
        }
        directory = Directory(clock=reactor, **directory_args)
    except AliasesError as e:  # "FILE:LINE: problem"
        fail(str(e))
    except ValueError as e:  # config.py checked these; a safety net
        fail(f"{source}: local: {e}")
    # spool.fsync is the one durability switch: it covers the Maildir files too.
    local: Any
    if local_cfg.delivery_processes:
        # Maildir delivery in processes of their own (docs/delivery.rst):
        # its file work and Python run beside the SMTP sessions, not
        # against them for the interpreter lock.
        local = LocalDeliveryProcesses(
            settings_for(directory_args, config.server.hostname, config.spool.fsync),
            local_cfg.delivery_processes,
            reactor,
        )
        local.setServiceParent(top)
    else:
        local = LocalDelivery(directory, config.server.hostname, fsync=config.spool.fsync)
    remote = _remote_delivery(config, reactor)
    remote.setName("remote")
    remote.setServiceParent(top)
    router = Router(spool, directory, local, remote)
    relay = config.relay
    retry = RetryPolicy(
        min_backoff=relay.min_backoff,
        max_backoff=relay.max_backoff,
        max_queue_lifetime=relay.max_queue_lifetime,
        delay_warning=relay.delay_warning,
    )
    # One resolver for every address that enters the queue without an SMTP
    # RCPT: bounces and notices, local submissions, HTTP submissions.
    resolve_recipient = _pickup_resolver(directory)
    scheduler = Scheduler(
        spool,
        router,
        reactor,
        retry,
        concurrency=relay.concurrency,
        destination_concurrency=relay.destination_concurrency,
        hostname=config.server.hostname,
        postmaster=f"postmaster@{local_cfg.domains[0]}",
        resolve=resolve_recipient,
        is_local=directory.is_local,
    )
    scheduler.setName("scheduler")
    scheduler.setServiceParent(top)
    # From now on the queue gauges come from the scheduler's memory, not a
    # listing of the spool (which stays for the moments before it exists).
    metrics.queue_stats = scheduler.queue_stats

    # Local submission (mailhub-sendmail) and the queue tools.
    pickup_mode: dict[str, Any] = {}
    if config.spool.pickup_group is not None:
        import grp

        from .pickup import GROUP_DIR_MODE

        pickup_mode = {"dir_mode": GROUP_DIR_MODE, "gid": grp.getgrnam(config.spool.pickup_group).gr_gid}
    pickup = PickupService(
        spool,
        scheduler.enqueue,
        reactor,
        config.server.max_message_size,
        resolve_recipient=resolve_recipient,
        hostname=config.server.hostname,
        **pickup_mode,
    )
    pickup.setServiceParent(top)
    control = control_service(scheduler, spool.path, reactor)
    # Through _Listener: a socket that cannot be bound stops startup cleanly.
    _Listener(socket_path(spool.path), control.endpoint, control.factory, "control").setServiceParent(top)

    # TLS and AUTH, shared by every listener.
    server_cfg, auth_cfg = config.server, config.auth
    server_tls = None
    if server_cfg.tls_cert is not None and server_cfg.tls_key is not None:
        try:
            server_tls = ServerTLS(server_cfg.tls_cert, server_cfg.tls_key)
        except ValueError as e:  # names the file
            fail(f"{source}: server.tls_cert: {e}")
        install_sighup_reload(server_tls, reactor)
    users = UsersFile(auth_cfg.users, clock=reactor) if auth_cfg.users is not None else None
    throttle = AuthThrottle(  # one per daemon: failures count across listeners
        reactor,
        delay=auth_cfg.failure_delay,
        max_failures=auth_cfg.max_failures,
        window=auth_cfg.failure_window,
    )

    # The first configured domain (directory.domains is a set) receives <postmaster>.
    policy = Policy(directory, server_cfg.trusted_networks, postmaster_domain=local_cfg.domains[0])

    def factory(listener: str) -> Any:
        # The commit (fsyncs) runs in a thread so other sessions are not
        # stalled by the disk; the session reads nothing until it is done.
        # Without a certificate no STARTTLS is offered; without a users
        # file no AUTH (a plain MX listener).
        return SMTPServerFactory(
            server_cfg,
            spool,
            scheduler.enqueue,
            policy,
            reactor,
            listener,
            run=threads.deferToThread,
            tls=server_tls,
            users=users,
            throttle=throttle,
            sender_check=config.submission.sender_check,
            allow_plaintext_loopback=auth_cfg.allow_plaintext_loopback,
            hide_client_ip=server_cfg.hide_client_ip,
            extension_separator=local_cfg.extension_separator,
        )

    for description in server_cfg.smtp:
        endpoint = serverFromString(reactor, description)
        smtp_factory = factory("smtp")
        _Listener(description, endpoint, smtp_factory, "smtp", smtp_factory.drain).setServiceParent(top)
    for description in server_cfg.submission:
        endpoint = serverFromString(reactor, description)
        smtp_factory = factory("submission")
        _Listener(description, endpoint, smtp_factory, "submission", smtp_factory.drain).setServiceParent(top)
    for description in server_cfg.smtps:
        assert server_tls is not None  # config.py requires the certificate for smtps
        try:
            endpoint = implicit_tls_endpoint(reactor, description, server_tls)
        except ValueError as e:
            fail(f"{source}: server.smtps: {e}")
        smtp_factory = factory("smtps")
        _Listener(description, endpoint, smtp_factory, "smtps", smtp_factory.drain).setServiceParent(top)

    # HTTP: API, /metrics, status page (docs/http.rst); one site for every listener.
    if server_cfg.http:
        site = make_http_site(
            spool,
            scheduler.enqueue,
            scheduler,
            users,
            metrics,
            server_cfg.hostname,
            max_body=server_cfg.http_max_body,
            run=threads.deferToThread,
            resolve_recipient=resolve_recipient,
            admins=server_cfg.http_admins,
            max_recipients=server_cfg.max_recipients,
            event_log=event_log or None,
            clock=reactor,
        )
        for description in server_cfg.http:
            endpoint = serverFromString(reactor, description)
            _Listener(description, endpoint, site, "http").setServiceParent(top)
    return top
