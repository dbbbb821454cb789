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
from collections.abc import Callable
from typing import Any, NoReturn

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, Logger, LoggingFile
from twisted.python import usage

from mailhub import __version__
from mailhub.config import DEFAULTS_SOURCE, Config, ConfigError, find_config_file, load_config
from mailhub.daemon.reload import Delegate, Live, install_sighup
from mailhub.loglevel import install as install_log_level
from mailhub.maillog import mail_publisher

__all__ = ["Options", "makeService", "EX_CONFIG", "EX_OSERR"]

log = Logger()

#: sysexits.h: configuration error, and "cannot create/bind".
EX_CONFIG = 78
EX_OSERR = 71


class StartupError(Exception):
    """
    Startup failed after twistd daemonized: raised (not C{SystemExit}) so
    that twistd reports it to the waiting launcher through its status pipe,
    removes the pid file and the launcher exits non-zero.
    """


#: The launching process: its pid and a copy of its stderr, taken before
#: twistd forks (L{remember_launcher}), so a daemonized start that fails
#: can still say why on the launcher's terminal.
_launcher: dict[str, Any] = {}


def remember_launcher(reactor: Any) -> None:
    """
    Keep the pid and a (close-on-exec) copy of stderr of the process that
    runs L{makeService}; the copy is closed once the reactor runs, so a
    started daemon holds nothing of its launcher.
    """
    try:
        fd = os.dup(2)
    except OSError:
        return
    _launcher.update(pid=os.getpid(), stderr=fd)

    def forget() -> None:
        fd = _launcher.pop("stderr", None)
        if fd is not None:
            os.close(fd)

    reactor.callWhenRunning(forget)


def _daemonized() -> bool:
    return "pid" in _launcher and os.getpid() != _launcher["pid"]


def fail(message: str, status: int = EX_CONFIG) -> NoReturn:
    """
    Stop startup with one clean line on stderr.  twistd and the console
    script let C{SystemExit} through, so there is no traceback.  After
    twistd has daemonized (the launcher waits on its status pipe) the line
    goes to the launcher's stderr and to the log, and L{StartupError}
    tells twistd that the start failed.
    """
    if _daemonized():
        log.critical("mailhub: {message}", message=message)
        fd = _launcher.pop("stderr", None)
        if fd is not None:
            try:
                os.write(fd, f"mailhub: {message}\n".encode("utf-8", "replace"))
            finally:
                os.close(fd)
        previous = sys.excepthook

        def quiet(kind: Any, value: Any, tb: Any) -> None:
            # twistd re-raises the error it reported: said already, no traceback
            if not isinstance(value, StartupError):
                previous(kind, value, tb)

        sys.excepthook = quiet
        raise StartupError(message)
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

    synopsis = (
        "[--config FILE] [--smtp ENDPOINT]... [--data DIR] [--hostname NAME] [--domain DOMAIN]... "
        "[--user NAME] [--log-level LEVEL]"
    )
    longdesc = (
        "Run the mailhub mail transfer agent.  The configuration file is --config FILE, "
        "else $MAILHUB_CONFIG, else /etc/mailhub/mailhub.toml if it exists, else the "
        "embedded defaults (SMTP on 127.0.0.1:8025, data under ./mailhub-data)."
    )
    optParameters = [
        ["config", "c", None, "Configuration file (TOML)."],
        ["data", "d", None, "Data directory: spool and mailboxes default to DIR/spool and DIR/mailboxes."],
        ["hostname", None, None, "Host name used in greetings, Received: and bounces (server.hostname)."],
        ["user", None, None, "User to run as once the ports are bound, when started as root (server.user)."],
        ["log-level", None, None, "Least level of twistd's log: debug, info, warn or error (server.log_level)."],
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
        if self["user"]:
            result["server.user"] = self["user"]
        if self["log-level"]:
            result["server.log_level"] = self["log-level"]
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

    def __init__(self, config: Config, privileged_delivery: bool = False) -> None:
        self.config = config
        self.privileged_delivery = privileged_delivery

    def privilegedStartService(self) -> None:
        # privileged start runs before the listeners bind (they are later
        # children), so these are the first lines of mailhub's log.
        super().privilegedStartService()
        c = self.config
        log.info(
            "mailhub {version} starting as {hostname}; configuration: {source}",
            version=__version__,
            hostname=c.server.hostname,
            source=c.source or DEFAULTS_SOURCE,
        )
        if c.local.transport != "maildir":
            mailboxes = f"LMTP {c.local.transport.removeprefix('lmtp:')}"
        elif c.local.mode == "system":
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
        if self.config.local.mode == "system" and euid != 0 and not self.privileged_delivery:
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


class _SharedListener(_Listener):
    """
    A listening socket this process binds (perhaps as root, for port 25)
    and never reads: the acceptor processes adopt it and accept on it.
    """

    def privilegedStartService(self) -> None:
        super().privilegedStartService()

        def quiet(port: Any) -> Any:
            port.stopReading()
            return port

        self._waitingForPort.addCallback(quiet)


class _NoSessions(Factory):
    """The factory of a L{_SharedListener}: this process serves no session on it."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


class _ForwardingReload:
    """The daemon's reload, then the acceptor processes' (when it was applied)."""

    def __init__(self, reloader: Any, pool: Any) -> None:
        self.reloader = reloader
        self.pool = pool

    def reload(self) -> Any:
        outcome = self.reloader.reload()
        if outcome.applied:
            self.pool.reload()
        return outcome


def _pickup_resolver(directory: Any) -> Any:
    """
    The C{resolve_recipient} of the pickup service: local recipients are
    expanded like the SMTP server's policy does (aliases, extensions);
    anything else is returned as is.  A RecipientError (unknown user) is
    raised on purpose: the pickup service then queues the address as
    written and the delivery outcome bounces it to the local sender.
    """
    from mailhub.address import parse_mailbox

    def resolve(address: str) -> list[str]:
        mailbox = parse_mailbox(address)
        if not directory.is_local(mailbox.domain_key):
            return [address]
        return list(directory.resolve(mailbox)) or [address]

    return resolve


# -- privilege separation (docs/architecture.rst, "Processes and users") ----------------------


def _run_as(config: Config, options: Any) -> Any:
    """
    The L{mailhub.daemon.privileges.RunAs} the daemon switches to, or None; twistd's
    C{--uid/--gid} (on the parent options) win.  One line and exit on a problem.

    The one exception is a trial run: started as root with the embedded
    defaults (no configuration file: loopback port 8025, data in the
    current directory) on a machine without a C{mailhub} account, the
    daemon keeps root and says so in a warning.  With a configuration file,
    a missing account stops the start.
    """
    from mailhub.daemon.privileges import NoDefaultUser, PrivilegeError, run_as

    parent = getattr(options, "parent", None)
    twistd_uid = twistd_gid = None
    if parent is not None and not parent.get("euid"):
        twistd_uid, twistd_gid = parent.get("uid"), parent.get("gid")
    try:
        return run_as(config.server.user, twistd_uid, twistd_gid)
    except NoDefaultUser as e:
        if config.source is not None:
            fail(f"{config.source}: {e}")
        log.warn(
            "mailhub runs as root: {problem}; with the embedded defaults it keeps root, "
            "with a configuration file it would not start",
            problem=str(e),
        )
        return None
    except PrivilegeError as e:
        fail(f"{config.source or DEFAULTS_SOURCE}: {e}")


def _prepare_for(config: Config, user: Any) -> None:
    """L{mailhub.daemon.privileges.prepare_for}, one line and exit on a problem."""
    from mailhub.daemon.privileges import PrivilegeError, prepare_for

    try:
        prepare_for(config, user)
    except PrivilegeError as e:
        fail(f"{config.source or DEFAULTS_SOURCE}: {e}")


def makeService(options: Options | dict[str, Any]) -> service.MultiService:
    """
    Build the service tree.  Children start in order: the startup log, the
    log observers (metrics, event log, mail log file) and the status page sampler, the
    remote delivery agent, the authentication service (DKIM signing and the
    SPF/DKIM/DMARC checks, their thread pool), the scheduler (whose startService recovers the
    spool and queues everything pending), the pickup service and the
    control socket (both feed the scheduler), and then the SMTP listeners
    (smtp, submission, smtps) and the HTTP listeners, so recovery always
    finishes before the first client is accepted.  Stopping runs the other way round; stopping
    the remote agent QUITs its idle connections.
    """
    from twisted.application.internet import TimerService
    from twisted.internet import reactor, threads

    from mailhub.daemon.acceptors import processes_for
    from mailhub.daemon.components import build_components, smtp_factory, tap_reloader
    from mailhub.delivery.direct import committer_for
    from mailhub.delivery.directory import directory_args as directory_args_of
    from mailhub.delivery.local import LocalDelivery
    from mailhub.delivery.localproc import LocalDeliveryProcesses, settings_for
    from mailhub.delivery.router import Router
    from mailhub.eventlog import EventLogObserver
    from mailhub.metrics import MailMetrics, MetricsObserver, spool_queue_stats
    from mailhub.queue.control import control_service, socket_path
    from mailhub.queue.pickup import PickupService
    from mailhub.queue.scheduler import RetryPolicy, Scheduler
    from mailhub.queue.spool import Spool
    from mailhub.smtp.proxyheader import ProxyGate
    from mailhub.smtp.proxytls import ProxyBeneathTLSFactory
    from mailhub.smtp.sasl import AuthThrottle
    from mailhub.tls import ServerTLS, implicit_tls_endpoint
    from mailhub.web.api import make_http_site

    config = getattr(options, "config", None)
    if config is None:
        if isinstance(options, Options):
            config = options.loadConfig()
        else:
            try:
                config = load_config(
                    find_config_file(options.get("config")),
                    {"server.user": options["user"]} if options.get("user") else None,
                    options.get("data"),
                    check_files=True,
                )
            except ConfigError as e:
                fail(str(e))

    from twisted.internet.endpoints import serverFromString

    source = config.source or DEFAULTS_SOURCE
    # before twistd starts its log observer, so it is filtered from the first line
    install_log_level(config.server.log_level)
    remember_launcher(reactor)
    top = service.MultiService()
    user = _run_as(config, options)
    # LMTP (local.transport) hands local mail to another server: no delivery processes
    privileged_delivery = user is not None and config.local.mode == "system" and config.local.transport == "maildir"
    if privileged_delivery and not config.local.delivery_processes:
        fail(
            f'{source}: local.delivery_processes: must be at least 1 with local.mode = "system" '
            f"when mailhub switches to user {user.name} (the delivery processes keep root)"
        )
    _StartupLog(config, privileged_delivery).setServiceParent(top)
    if user is not None:
        _prepare_for(config, user)
    try:
        spool = Spool(config.spool.path, config.spool.fsync, config.spool.sync)
    except OSError as e:
        fail(f"cannot create spool {config.spool.path}: {e.strerror or e}", EX_OSERR)

    # Observability: fed from the mail log (maillog events), so these observe
    # before anything that emits mail events starts (scheduler recovery).
    metrics = MailMetrics(reactor, spool_queue_stats(spool))
    _Observer(MetricsObserver(metrics)).setServiceParent(top)
    event_log = config.server.event_log
    if event_log:
        try:
            os.makedirs(os.path.dirname(event_log), 0o750, exist_ok=True)
            event_observer = EventLogObserver(
                event_log, max_size=config.server.event_log_max_size, keep=config.server.event_log_keep
            )
        except OSError as e:
            fail(f"{source}: server.event_log: cannot open {event_log}: {e.strerror or e}")
        _Observer(event_observer, event_observer.close).setServiceParent(top)
    mail_log_service = None
    if config.server.mail_log:
        # Mail lines to a file of mailhub's own instead of twistd's log
        # (docs/performance.rst, "mail log"); the observers above still see them.
        from mailhub.maillog import MailLogFile, MailLogService

        try:
            mail_log_file = MailLogFile(config.server.mail_log, reactor)
        except OSError as e:
            fail(f"{source}: server.mail_log: cannot open {config.server.mail_log}: {e.strerror or e}")
        mail_log_service = MailLogService(mail_log_file)
        mail_log_service.setServiceParent(top)
    history: tuple[Any, Any] | None = None
    if config.history.enabled:
        # every mail event into the history database (docs/history.rst)
        from mailhub.history.recorder import HistoryCollector, recorder_for
        from mailhub.history.store import StoreError

        try:
            recorder = recorder_for(config.history, config.server.hostname, reactor, mail_publisher)
        except StoreError as e:
            fail(f"{source}: history.database: {e}")
        recorder.setServiceParent(top)
        metrics.registry.register(HistoryCollector(recorder))
        history = (recorder.store, recorder.flush)
    sampler = TimerService(60, metrics.sample)  # queue size history of the status page
    sampler.clock = reactor
    sampler.setServiceParent(top)

    local_cfg = config.local
    # The reloadable components: every consumer reads them through live
    # (mailhub/daemon/reload.py), so a reload (SIGHUP, mailhub reload) reaches it.
    live = Live(config)
    # Rate limits ([limits], docs/ratelimits.rst): fixed until a restart.
    from mailhub.ratelimit.limits import build_rate_limits

    ratelimit, ratelimit_store = build_rate_limits(config, reactor)
    if ratelimit_store is not None:
        ratelimit_store.setServiceParent(top)
    try:
        live.swap(config, **build_components(config, reactor, live, ratelimit))
    except ConfigError as e:
        fail(str(e))
    directory = Delegate.of(live, "directory")
    # Also the settings of the local delivery processes, which build
    # their own Directory from them.
    directory_args = directory_args_of(config.local)
    # spool.fsync is the one durability switch: it covers the Maildir files too.
    local: Any
    supervisor = None
    if local_cfg.transport != "maildir":
        # LMTP to Dovecot (or another LMTP server) does the local delivery (docs/delivery.rst, LMTP).
        from mailhub.delivery.lmtp import LMTPDelivery

        local = LMTPDelivery(reactor, local_cfg.transport, config.server.hostname)
        local.setServiceParent(top)
    elif privileged_delivery:
        # Root delivery processes behind a supervisor started before the
        # switch (mailhub.delivery.supervisor); their settings are fixed now.
        from mailhub.delivery.supervisor import PrivilegedDelivery

        settings = settings_for(directory_args, config.server.hostname, config.spool.fsync, config.spool.sync)
        settings["spool"] = {"path": spool.path, "uid": user.uid}
        local = supervisor = PrivilegedDelivery(settings, local_cfg.delivery_processes, reactor)
        local.setServiceParent(top)
    elif local_cfg.delivery_processes:
        # Maildir delivery in processes of their own (docs/delivery.rst):
        # its file work and Python run beside the SMTP sessions, not
        # against them for the interpreter lock.
        local = LocalDeliveryProcesses(
            settings_for(directory_args, config.server.hostname, config.spool.fsync, config.spool.sync),
            local_cfg.delivery_processes,
            reactor,
        )
        local.setServiceParent(top)
    else:
        local = LocalDelivery(directory, config.server.hostname, fsync=config.spool.fsync, sync=config.spool.sync)
    live.remote.setName("remote")
    live.remote.setServiceParent(top)
    # SPF/DKIM/DMARC checks and DKIM signing (docs/authentication.rst):
    # signing sits in front of the remote agent, the checks at the end of DATA.
    from mailhub.auth.service import AuthService

    auth_service = AuthService(config, reactor)
    auth_service.setServiceParent(top)
    remote = auth_service.wrap(Delegate.of(live, "remote"))
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
        is_local=lambda domain: directory.is_local(domain),  # the live directory's
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

        from mailhub.queue.pickupfile import GROUP_DIR_MODE

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
    reloader: list[Any] = []  # set below, once every component exists
    control = control_service(scheduler, spool.path, reactor, reload=lambda: reloader[0].reload())
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
    users = Delegate.of(live, "users") if auth_cfg.users is not None else None
    throttle = AuthThrottle(  # one per daemon: failures count across listeners
        reactor,
        delay=auth_cfg.failure_delay,
        max_failures=auth_cfg.max_failures,
        window=auth_cfg.failure_window,
    )

    factories: list[Any] = []
    # What makes an accepted message durable before its 250: straight into
    # the Maildirs when every recipient is local (local.deliver_on_accept),
    # else the spool; one writer thread for every listener.
    committer = committer_for(config, directory, reactor, threads.deferToThread, scheduler.enqueue)

    def factory(listener: str) -> Any:
        # the same as an acceptor process builds (daemon.components.smtp_factory)
        made = smtp_factory(
            config, live, listener, spool, scheduler.enqueue, reactor, tls=server_tls, users=users, throttle=throttle,
            checks=auth_service.checks, ratelimit=ratelimit, committer=committer,
        )
        factories.append(made)
        return made

    # server.processes > 1: this process binds the SMTP sockets and the
    # acceptor processes serve them (mailhub/daemon/acceptors.py).
    processes = processes_for(server_cfg.processes)
    shared: list[_SharedListener] = []

    def smtp_listener(description: str, endpoint: Any, kind: str) -> None:
        if processes > 1:
            listener: _Listener = _SharedListener(description, endpoint, _NoSessions(), kind)
            shared.append(listener)  # type: ignore[arg-type]
        else:
            smtp_factory = factory(kind)
            listener = _Listener(description, endpoint, smtp_factory, kind, smtp_factory.drain)
        listener.setServiceParent(top)

    for description in server_cfg.smtp:
        smtp_listener(description, serverFromString(reactor, description), "smtp")
    for description in server_cfg.submission:
        smtp_listener(description, serverFromString(reactor, description), "submission")
    # smtps: the PROXY header comes before the TLS handshake, so it is read beneath TLS.
    smtps_gate = ProxyGate(server_cfg.proxy_from, server_cfg.proxy_timeout, reactor)
    for description in server_cfg.smtps:
        assert server_tls is not None  # config.py requires the certificate for smtps
        try:
            endpoint = implicit_tls_endpoint(
                reactor, description, server_tls,
                beneath=(lambda f: ProxyBeneathTLSFactory(f, smtps_gate, "smtps")) if smtps_gate else None,
            )
        except ValueError as e:
            fail(f"{source}: server.smtps: {e}")
        if processes > 1:  # the acceptors add the TLS layer
            endpoint = serverFromString(reactor, description)
        smtp_listener(description, endpoint, "smtps")
    pool = None
    if shared:
        from mailhub.daemon.acceptors import AcceptorPool
        from mailhub.daemon.anvil import Anvil

        def limits() -> tuple[int, int]:
            server = live.config.server
            return server.max_connections, server.max_connections_per_ip

        def unannounced() -> list[Any]:
            found = []
            for queue_id in spool.queue_ids():
                if queue_id not in scheduler:
                    try:
                        found.append(spool.load(queue_id))
                    except (KeyError, ValueError):
                        continue
            return found

        if isinstance(options, Options):
            overrides, data = options.overrides(), options["data"]
        else:
            overrides = {"server.user": options["user"]} if options.get("user") else {}
            data = options.get("data")
        pool = AcceptorPool(
            reactor, processes, shared,
            {"config": config.source, "overrides": overrides, "data": data},
            Anvil(reactor, limits, throttle, counter=ratelimit.counter if ratelimit is not None else None),
            scheduler.enqueue, spool.load, unannounced, server_tls,
        )
        pool.setServiceParent(top)
        metrics.sessions = pool.sessions
    else:
        metrics.sessions = lambda: {str(os.getpid()): sum(f.connections for f in factories)}

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
            history=history,
            clock=reactor,
            header_timeout=server_cfg.http_header_timeout,
            request_timeout=server_cfg.http_request_timeout,
            max_connections=server_cfg.http_max_connections,
            max_connections_per_ip=server_cfg.http_max_connections_per_ip,
            ratelimit=ratelimit,
        )
        for description in server_cfg.http:
            endpoint = serverFromString(reactor, description)
            _Listener(description, endpoint, site, "http").setServiceParent(top)

    reloader.append(tap_reloader(
        options, live, top, factories, reactor, server_tls,
        mail_log_service.observer if mail_log_service is not None else None,
        local if local_cfg.delivery_processes and not privileged_delivery and local_cfg.transport == "maildir" else None,
        processes_fixed=privileged_delivery, ratelimit=ratelimit,
    ))
    if pool is not None:
        reloader.append(_ForwardingReload(reloader[0], pool))
        reloader.pop(0)
    install_sighup(reloader[0].reload, reactor)
    if user is not None:
        # last: its privileged start runs once everything above is bound
        from mailhub.daemon.privileges import DropPrivileges

        DropPrivileges(user, socket_path(spool.path), supervisor, fail).setServiceParent(top)
    return top
