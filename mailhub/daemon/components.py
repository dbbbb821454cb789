"""
The reloadable components of the daemon, built from a configuration: the
directory (local domains, users, aliases), the policy (trusted networks),
the users file (SMTP AUTH) and the outbound relay agent.

Owns: L{build_components}, used at startup by L{mailhub.tap.makeService}
and by every reload (L{mailhub.daemon.reload.Reloader}), so both build them the
same way, and L{tap_reloader}, the reload of the running daemon.  A
component whose settings did not change is kept as it runs (the relay
agent keeps its connections, the users file its cache).

Must not touch: listeners, the spool, the scheduler.  Problems raise
L{ConfigError} with one line naming the file and key, never exit: a
reload must survive them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger

from mailhub.config import DEFAULTS_SOURCE, Config, ConfigError, find_config_file, load_config, read_secret
from mailhub.daemon.reload import Live, Reloader
from mailhub.loglevel import set_level as set_log_level

__all__ = ["build_components", "tap_reloader", "smtp_factory"]

log = Logger()


def remote_delivery(config: Config, reactor: Any, ratelimit: Any = None) -> Any:
    """
    The outbound relay agent, from the [relay] keys (docs/relay.rst);
    C{ratelimit}: the daemon's rate limits (docs/ratelimits.rst), or None.
    """
    from mailhub.relay.agent import RemoteDelivery

    relay, server = config.relay, config.server
    source = config.source or DEFAULTS_SOURCE
    auth = None
    if relay.smarthost_user is not None and relay.smarthost_password_file is not None:
        auth = (relay.smarthost_user, read_secret(relay.smarthost_password_file, source))
    try:
        agent = RemoteDelivery(
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
            ratelimit=ratelimit,
        )
        tls_policies(config, reactor, agent)
        return agent
    except ValueError as e:  # config.py checked every value; this is a safety net
        raise ConfigError(f"{source}: relay: {e}") from e


def tls_policies(config: Config, reactor: Any, agent: Any, https_port: int = 443) -> None:
    """
    The relay agent's TLS policy sources from the [relay] keys: the
    [relay.tls_policy] table, DANE through the configured resolvers, MTA-STS
    cached under C{relay.tls_state}, and the TLS report counts (sent when
    C{relay.tls_reports} is on, through the pickup area).
    """
    from mailhub.relay.dane import DaneLookup, ValidatingResolver, resolv_conf_servers
    from mailhub.relay.mtasts import MTASTS, https_agent, https_fetcher, txt_lookup
    from mailhub.relay.nexthop import parse_dns_server
    from mailhub.relay.tlspolicy import TLSPolicy
    from mailhub.relay.tlsrpt import TLSReports, https_poster

    relay, server = config.relay, config.server
    state = relay.tls_state or os.path.join(config.spool.path, "tls")
    dane = None
    if relay.dane:
        servers = [parse_dns_server(s) for s in relay.dns_servers]

        def validating() -> ValidatingResolver:
            return ValidatingResolver(servers=servers or resolv_conf_servers() or [("127.0.0.1", 53)],
                                      reactor=reactor)

        dane = DaneLookup(validating)
    txt = txt_lookup(agent.resolver)
    mtasts = None
    if relay.mta_sts:
        try:
            fetch = https_fetcher(reactor, agent.mx_addresses, port=https_port, ca_file=relay.tls_ca_file,
                                  timeout=min(relay.connect_timeout * 2, 60.0))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{config.source or DEFAULTS_SOURCE}: relay.tls_ca_file: {e}") from e
        mtasts = MTASTS(reactor, os.path.join(state, "mta-sts"), txt, fetch)
    agent.tls_policy = TLSPolicy(relay.tls, relay.tls_policy, dane, mtasts)
    spool, fsync = config.spool.path, config.spool.fsync

    def submit(sender: str, to: str, message: bytes) -> Any:
        from twisted.internet import threads

        from mailhub.queue.pickupfile import write_pickup

        return threads.deferToThread(write_pickup, spool, sender, [to], [message], fsync=fsync)

    post = None
    if relay.tls_reports:
        try:
            web = https_agent(reactor, agent.mx_addresses, ca_file=relay.tls_ca_file, timeout=relay.connect_timeout)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{config.source or DEFAULTS_SOURCE}: relay.tls_ca_file: {e}") from e
        post = https_poster(web, reactor)
    agent.tls_reports = TLSReports(
        reactor, state, organization=server.hostname, sender=f"postmaster@{config.local.domains[0]}",
        txt=txt, submit=submit, send=relay.tls_reports, post=post,
    )


def build_components(config: Config, reactor: Any, live: Live, ratelimit: Any = None) -> dict[str, Any]:
    """
    The components for L{Live.swap}: C{directory}, C{policy}, C{users},
    C{remote}.  Those already in C{live} whose settings did not change
    are kept.  The policy reads the directory through C{live}.

    @raise ConfigError: one line (an aliases file error names FILE:LINE).
    """
    from mailhub.daemon.reload import Delegate
    from mailhub.delivery.aliases import AliasesError
    from mailhub.delivery.directory import Directory, directory_args
    from mailhub.smtp.policy import Policy
    from mailhub.users import UsersFile

    source = config.source or DEFAULTS_SOURCE
    try:
        directory = Directory(clock=reactor, **directory_args(config.local))
    except AliasesError as e:  # "FILE:LINE: problem"
        raise ConfigError(str(e)) from e
    except ValueError as e:  # config.py checked these; a safety net
        raise ConfigError(f"{source}: local: {e}") from e
    first = not hasattr(live, "directory")
    old = live.config
    if not first and old.relay == config.relay and old.server.hostname == config.server.hostname:
        remote = live.remote
    else:
        remote = remote_delivery(config, reactor, ratelimit)
    users = None
    if config.auth.users is not None:
        if not first and old.auth.users == config.auth.users and live.users is not None:
            users = live.users
        else:
            from mailhub.daemon.preflight import missing_users_file

            missing = missing_users_file(config)
            if missing is not None:  # the same line check-config gives; the file may come later
                log.error("{problem}", problem=missing.text)
            users = UsersFile(config.auth.users, clock=reactor)
    try:
        # The first configured domain (directory.domains is a set) receives <postmaster>.
        policy = Policy(Delegate.of(live, "directory"), config.server.trusted_networks,
                        postmaster_domain=config.local.domains[0])
    except ValueError as e:
        raise ConfigError(f"{source}: server.trusted_networks: {e}") from e
    return {"directory": directory, "policy": policy, "users": users, "remote": remote}


def smtp_factory(
    config: Config, live: Live, listener: str, spool: Any, enqueue: Any, reactor: Any, *,
    tls: Any = None, users: Any = None, throttle: Any = None, gate: Any = None, gate_name: str = "",
    checks: Sequence[Any] = (), ratelimit: Any = None, committer: Any = None,
) -> Any:
    """
    The SMTP factory of one listener (C{smtp}, C{submission}, C{smtps}),
    the same in the daemon (L{mailhub.tap}) and in an acceptor process
    (L{mailhub.daemon.acceptor}): the server settings, policy and users
    file read through C{live} (a reload reaches them); the commit (fsyncs)
    runs in a thread so other sessions are not stalled by the disk.
    Without a certificate no STARTTLS is offered; without a users file no
    AUTH.  C{gate}: where connections are admitted when several processes
    serve the listener.  C{users}: the users file (through C{live}),
    shared by the listeners of a process.  C{checks}: the end-of-data
    checks before the milters' (L{mailhub.auth.service.AuthService.checks});
    the listener's milters (C{config.milters}, in order) are asked at each
    stage and at the end of data.  C{ratelimit}: the process's
    L{mailhub.ratelimit.limits.RateLimits} or None; C{committer}: what
    makes a message durable (L{mailhub.delivery.direct.committer_for}), by
    default the spool path.  The PROXY gate of C{server.proxy_from} is read
    at start (a reload keeps it).
    """
    from twisted.internet import threads

    from mailhub.daemon.reload import Delegate
    from mailhub.smtp.factory import SMTPServerFactory
    from mailhub.smtp.proxyheader import ProxyGate
    from mailhub.smtp.settings import SMTPSettings

    specs = [m for m in config.milters if listener in m.listeners]
    milters = None
    all_checks = list(checks)
    if specs:
        from mailhub.milter.check import MilterCheck
        from mailhub.milter.client import endpoint as milter_endpoint
        from mailhub.milter.session import Milters

        milters = Milters(
            specs, reactor, lambda spec: milter_endpoint(reactor, spec.socket).connect,
            max_body=config.server.max_message_size, spill_dir=os.path.join(spool.path, "tmp"),
        )
        # authentication results are made on the message as received, then the milters see it
        all_checks.append(MilterCheck(run=threads.deferToThread))
    return SMTPServerFactory(
        SMTPSettings.of(config, listener, server=Delegate.of(live, "server")),
        spool,
        enqueue,
        Delegate.of(live, "policy"),
        reactor,
        run=threads.deferToThread,
        tls=tls,
        users=users,
        throttle=throttle if users is not None else None,
        gate=gate,
        gate_name=gate_name,
        milters=milters,
        checks=all_checks,
        ratelimit=ratelimit,
        proxy=ProxyGate(config.server.proxy_from, config.server.proxy_timeout, reactor),
        committer=committer,
    )


def smtps_factory(factory: Any, server_tls: Any, config: Config, reactor: Any) -> Any:
    """
    What an adopted C{smtps} socket serves: C{factory} under TLS, and,
    with C{server.proxy_from}, the PROXY header read beneath TLS
    (L{mailhub.smtp.proxytls}), as L{mailhub.tls.implicit_tls_endpoint} does.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from mailhub.smtp.proxyheader import ProxyGate
    from mailhub.smtp.proxytls import ProxyBeneathTLSFactory

    serving: Any = TLSMemoryBIOFactory(server_tls, False, factory)
    gate = ProxyGate(config.server.proxy_from, config.server.proxy_timeout, reactor)
    return ProxyBeneathTLSFactory(serving, gate, "smtps") if gate else serving


def tap_reloader(
    options: Any, live: Live, top: Any, factories: list[Any], reactor: Any,
    server_tls: Any = None, mail_log: Any = None, processes: Any = None, processes_fixed: bool = False,
    ratelimit: Any = None,
) -> Reloader:
    """
    The reload of the daemon C{makeService} built: the same file, command
    line overrides and data directory as at start.  Besides the swap it
    updates the SMTP factories' per-listener settings, re-reads the TLS
    certificate (new paths too), sets the log level (C{server.log_level})
    and makes the mail log look for rotation.
    C{processes_fixed}: the local delivery processes run as root behind a
    supervisor started before the daemon gave up root, so their settings
    (the C{local.} keys) are kept until a restart and reported as such.
    """

    def load() -> Config:
        if hasattr(options, "overrides"):
            path, overrides, data = options["config"], options.overrides(), options["data"]
        else:
            path, overrides, data = options.get("config"), None, options.get("data")
        return load_config(find_config_file(path), overrides, data, check_files=True)

    def build(config: Config, running: Live) -> dict[str, Any]:
        components = build_components(config, reactor, running, ratelimit)
        if server_tls is not None and config.server.tls_cert is not None and config.server.tls_key is not None:
            from mailhub.tls import load_certificate_options

            try:  # checked by load_config already; a new path must load before anything changes
                load_certificate_options(config.server.tls_cert, config.server.tls_key)
            except ValueError as e:
                raise ConfigError(f"{config.source or DEFAULTS_SOURCE}: server.tls_cert: {e}") from e
            server_tls.cert_path, server_tls.key_path = config.server.tls_cert, config.server.tls_key
        for factory in factories:
            factory.sender_check = config.submission.sender_check
            factory.allow_plaintext_loopback = config.auth.allow_plaintext_loopback
            factory.hide_client_ip = config.server.hide_client_ip
            factory.max_hops = config.server.max_hops
            factory.min_data_rate = config.server.min_data_rate
            factory.soft_error_limit = config.server.soft_error_limit
        from mailhub.delivery.directory import directory_args

        if processes is not None and directory_args(config.local) != directory_args(running.config.local):
            from mailhub.delivery.localproc import settings_for

            processes.reconfigure(
                settings_for(directory_args(config.local), config.server.hostname, config.spool.fsync, config.spool.sync)
            )
        set_log_level(config.server.log_level)
        return components

    def also() -> None:
        if server_tls is not None:
            server_tls.reload()
        if mail_log is not None:
            mail_log.reopen()

    def retire(replaced: dict[str, Any]) -> None:
        old = replaced.get("remote")
        if old is not None:
            # the old agent finishes what it has in flight and quits its idle connections
            old.disownServiceParent()
            live.remote.setName("remote")
            live.remote.setServiceParent(top)

    return Reloader(live, load, build, also, retire, fixed=("local.",) if processes_fixed else ())
