"""
C{mailhub dkim keygen} and C{mailhub dkim check}: DKIM keys and their DNS records.

Owns: the command lines around L{mailhub.auth.keys}: C{keygen DOMAIN
[--selector S] [--type rsa|ed25519] [--force]} writes
C{KEYS/DOMAIN/SELECTOR.key} (mode 0600, owned by the daemon's user when
run as root) and prints the TXT record to publish and the C{[dkim]} lines
to paste into the configuration; C{check DOMAIN} looks up the record of
each key of the domain (through C{relay.dns_servers}, else the system's
resolver) and says whether it matches, and why not.  The keys directory is
C{--keys DIR}, else C{dkim.keys}.

Exit codes: 0 ok; 1 a record is missing or does not match; 64 usage; 69
no key for the domain; 73 a key exists (without --force) or cannot be
written; 75 DNS failed temporarily; 78 configuration.

Must not touch: the daemon (it reads new key files without a reload).
"""

from __future__ import annotations

import datetime
import os
import pwd
import sys
from typing import Any, TextIO

from twisted.python import usage

from mailhub.auth.keys import ED25519, RSA, SELECTOR, KeyError_, KeyStore, generate, key_path, load_key, zone_line
from mailhub.cli import Command

__all__ = ["DKIMOptions", "run_dkim"]

EX_OK, EX_MISMATCH, EX_USAGE, EX_NOKEY, EX_CANTCREAT, EX_TEMPFAIL, EX_CONFIG = 0, 1, 64, 69, 73, 75, 78


def _domain(value: str) -> str:
    from mailhub.address import AddressError, normalize_domain

    try:
        domain = normalize_domain(value)
    except AddressError as e:
        raise usage.UsageError(f"{value!r} is not a domain: {e}") from e
    if domain.startswith("[") or "." not in domain:
        raise usage.UsageError(f"{value!r} is not a domain name")
    return domain.encode("idna").decode("ascii") if not domain.isascii() else domain


class _DomainCommand(Command):
    """Options may come before or after the domain (GNU style)."""

    def parseOptions(self, options: Any = None) -> None:
        import getopt

        try:
            opts, args = getopt.gnu_getopt(list(options or []), self.shortOpt, self.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e)) from e
        flat: list[str] = []
        for name, value in opts:
            flat += [name, value] if value else [name]
        super().parseOptions(flat + args)


class KeygenOptions(_DomainCommand):
    synopsis = "mailhub dkim keygen DOMAIN [--selector S] [--type rsa|ed25519] [--keys DIR] [--force]"
    optParameters = [
        ["selector", "s", None, "selector (default: TYPE-YYYYMM)"],
        ["type", "t", RSA, "key type: rsa (2048 bits) or ed25519"],
        ["keys", None, None, "keys directory (default: dkim.keys)"],
    ]
    optFlags = [["force", None, "replace an existing key"]]

    def parseArgs(self, domain: str) -> None:  # type: ignore[override]
        self["domain"] = _domain(domain)

    def postOptions(self) -> None:
        if self["type"] not in (RSA, ED25519):
            raise usage.UsageError("--type must be rsa or ed25519")
        if self["selector"] is None:
            self["selector"] = f"{self['type']}-{datetime.datetime.now(datetime.UTC):%Y%m}"
        if not SELECTOR.match(self["selector"]):
            raise usage.UsageError(f"--selector {self['selector']!r} is not a DNS label")


class CheckOptions(_DomainCommand):
    synopsis = "mailhub dkim check DOMAIN [--keys DIR]"
    optParameters = [["keys", None, None, "keys directory (default: dkim.keys)"]]

    def parseArgs(self, domain: str) -> None:  # type: ignore[override]
        self["domain"] = _domain(domain)


class DKIMOptions(Command):
    synopsis = "mailhub dkim keygen|check DOMAIN [options]"
    subCommands = [
        ["keygen", None, KeygenOptions, "Make a key and print its DNS record and configuration lines."],
        ["check", None, CheckOptions, "Check that the DNS publishes the domain's keys."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("keygen or check?")


def _owner(config: Any) -> tuple[int, int] | None:
    """The daemon's user when we run as root (it must read the key after dropping root)."""
    if os.geteuid() != 0:
        return None
    name = config.server.user if config is not None and config.server.user else "mailhub"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def keygen(opts: KeygenOptions, keys_dir: str, config: Any, out: TextIO, err: TextIO) -> int:
    domain, selector = opts["domain"], opts["selector"]
    path = key_path(keys_dir, domain, selector)
    if os.path.exists(path) and not opts["force"]:
        err.write(f"mailhub: {path} exists (use --force to replace it)\n")
        return EX_CANTCREAT
    owner = _owner(config)
    try:
        for d in (keys_dir, os.path.dirname(path)):
            os.makedirs(d, 0o750, exist_ok=True)
            if owner is not None:
                os.chown(d, 0, owner[1])
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(generate(opts["type"]))
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except OSError as e:
        err.write(f"mailhub: cannot write {path}: {e.strerror or e}\n")
        return EX_CANTCREAT
    key = load_key(path, domain, selector)
    out.write(f"# Wrote {path} ({opts['type']}).\n")
    out.write("# 1. Publish this DNS record:\n")
    out.write(zone_line(key) + "\n")
    out.write("# 2. Add these lines to the configuration file (then restart mailhub):\n")
    out.write(f'[dkim]\nkeys = "{os.path.abspath(keys_dir)}"\n')
    out.write(f"# 3. Check the record once published: mailhub dkim check {domain}\n")
    return EX_OK


def check(opts: CheckOptions, keys_dir: str, config: Any, out: TextIO, err: TextIO) -> int:
    from twisted.internet import task

    from mailhub.auth.dns import AuthDNS, DNSTempError, make_resolver
    from mailhub.auth.keys import compare_record
    from mailhub.relay.nexthop import parse_dns_server

    try:
        keys = KeyStore(keys_dir).keys_for(opts["domain"])
    except KeyError_ as e:
        err.write(f"mailhub: {e}\n")
        return EX_NOKEY
    if not keys:
        err.write(f"mailhub: no key for {opts['domain']} in {keys_dir}\n")
        return EX_NOKEY
    servers = [parse_dns_server(s) for s in config.relay.dns_servers] if config is not None else []
    status = [EX_OK]

    async def run(reactor: Any) -> None:
        dns = AuthDNS(reactor, make_resolver(reactor, servers or None), timeout=10)
        for key in keys:
            try:
                records = await dns.txt(key.record_name)
            except DNSTempError as e:
                err.write(f"mailhub: {key.record_name}: DNS lookup failed: {e}\n")
                status[0] = max(status[0], EX_TEMPFAIL)
                continue
            problem = compare_record(key, records)
            if problem is None:
                out.write(f"{key.record_name}: ok ({key.kind}, {key.path})\n")
            else:
                out.write(f"{key.record_name}: {problem}\n  publish: {zone_line(key)}\n")
                status[0] = max(status[0], EX_MISMATCH)

    from twisted.internet import defer

    def main(reactor: Any) -> Any:
        return defer.Deferred.fromCoroutine(run(reactor))

    try:
        task.react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return status[0]


def run_dkim(options: DKIMOptions, config: Any, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the sub-command; C{config} is the loaded configuration or None (then --keys is needed)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    sub = options.subOptions
    keys_dir = sub["keys"] or (config.dkim.keys if config is not None else None)
    if not keys_dir:
        err.write("mailhub: no keys directory: give --keys DIR or set dkim.keys\n")
        return EX_CONFIG
    try:
        if options.subCommand == "keygen":
            return keygen(sub, keys_dir, config, out, err)
        return check(sub, keys_dir, config, out, err)
    except KeyError_ as e:
        err.write(f"mailhub: {e}\n")
        return EX_NOKEY
