"""
MTA-STS (RFC 8461): a recipient domain's published policy, found, fetched,
cached on disk and refreshed.

Owns: the C{_mta-sts} TXT record (L{parse_txt}), the policy file's format
(L{parse_policy}, L{STSPolicy}), MX pattern matching (L{mx_matches}), the
HTTPS fetch of C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt} with
twisted.web's Agent (certificate verified against the system trust store
or C{relay.tls_ca_file}, name resolved through the relay's resolver,
timeouts, a size limit, redirects refused), the on-disk cache (one JSON
file per domain under the TLS state directory, so a restart or a blocked
TXT lookup keeps the protection for C{max_age}) and its proactive refresh.

Must not touch: what a policy means for one connection
(L{mailhub.relay.tlspolicy}), connections to MX hosts, DANE.
"""

from __future__ import annotations

import json
import os
import re
import time as _time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer, ssl, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

__all__ = [
    "STSPolicy", "CachedPolicy", "PolicyError", "parse_txt", "parse_policy", "mx_matches", "MTASTS",
    "MAX_POLICY_SIZE", "MAX_AGE_LIMIT", "https_agent", "https_fetcher", "txt_lookup",
]

log = Logger()

#: Largest policy file read (RFC 8461 3.3 suggests 64 KB).
MAX_POLICY_SIZE = 65536
#: max_age is at most a year (RFC 8461 3.2).
MAX_AGE_LIMIT = 31557600
#: Most mx: lines kept.
MAX_MX_PATTERNS = 100
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_MODES = ("enforce", "testing", "none")
#: A cached policy is checked again (TXT, and fetched if its id changed) this often.
CHECK_AFTER = 86400.0


class PolicyError(Exception):
    """A policy or TXT record that does not follow RFC 8461, or a fetch that failed."""


@dataclass(frozen=True)
class STSPolicy:
    mode: str
    mx: tuple[str, ...]
    max_age: int

    def allows(self, host: str) -> bool:
        """C{host} matches one of the mx: patterns."""
        return any(mx_matches(p, host) for p in self.mx)


@dataclass(frozen=True)
class CachedPolicy:
    domain: str
    id: str
    policy: STSPolicy
    fetched: float
    checked: float

    @property
    def expires(self) -> float:
        return self.fetched + self.policy.max_age

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["policy"]["mx"] = list(self.policy.mx)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CachedPolicy:
        p = data["policy"]
        policy = STSPolicy(str(p["mode"]), tuple(str(m) for m in p["mx"]), int(p["max_age"]))
        if policy.mode not in _MODES:
            raise ValueError(f"mode {policy.mode!r}")
        return cls(str(data["domain"]), str(data["id"]), policy, float(data["fetched"]), float(data["checked"]))


def parse_txt(strings: list[list[bytes]]) -> str | None:
    """
    The policy id from the TXT records of C{_mta-sts.DOMAIN} (each record
    its list of character strings); None when no record starts with
    C{v=STSv1}, or more than one does (RFC 8461 3.1).

    @raise PolicyError: the one STSv1 record has no valid id.
    """
    found = []
    for parts in strings:
        text = b"".join(parts).decode("ascii", "replace")
        if text.startswith("v=STSv1"):
            found.append(text)
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for item in found[0].split(";"):
        k, eq, v = item.strip().partition("=")
        if eq:
            fields.setdefault(k.strip(), v.strip())
    ident = fields.get("id", "")
    if fields.get("v") != "STSv1" or not _ID.match(ident):
        raise PolicyError("malformed _mta-sts TXT record (no valid id)")
    return ident


def parse_policy(body: bytes) -> STSPolicy:
    """
    A policy file (RFC 8461 3.2): C{key: value} lines, CRLF or LF.

    @raise PolicyError: not STSv1, no or an unknown mode, no valid max_age,
        no mx: for enforce or testing.
    """
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise PolicyError("policy is not ASCII") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        k, colon, v = line.partition(":")
        if not colon:
            continue
        k, v = k.strip(), v.strip()
        if k == "mx":
            if len(mx) < MAX_MX_PATTERNS and v:
                mx.append(v.lower().rstrip("."))
        else:
            fields.setdefault(k, v)
    if fields.get("version") != "STSv1":
        raise PolicyError("policy version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in _MODES:
        raise PolicyError(f"policy mode is not enforce, testing or none ({mode[:20]!r})")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyError("policy has no valid max_age")
    if mode != "none" and not mx:
        raise PolicyError("policy has no mx")
    return STSPolicy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT))


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: C{*.example.com} matches exactly one more label; others match exactly."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, dot, rest = host.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return host == pattern


# -- the HTTPS fetch ---------------------------------------------------------------------


class _Body(Protocol):
    def __init__(self, done: Deferred, limit: int) -> None:
        self.done, self.limit, self.buf = done, limit, bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > self.limit and not self.done.called:
            self.done.errback(PolicyError(f"policy larger than {self.limit} bytes"))
            stop = getattr(self.transport, "stopProducing", None)
            if stop is not None:
                stop()

    def connectionLost(self, reason: Any = None) -> None:
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(bytes(self.buf))
        else:
            self.done.errback(reason)


@implementer(IStreamClientEndpoint)
class _ResolvedEndpoint:
    """TLS to C{host}:C{port}, the name resolved through the relay's resolver, addresses in order."""

    def __init__(self, reactor: Any, addresses: Callable[[str], Awaitable[list[str]]], host: str, port: int,
                 tls: Any, timeout: float) -> None:
        self._reactor, self._addresses, self._host, self._port = reactor, addresses, host, port
        self._tls, self._timeout = tls, timeout

    def connect(self, factory: Any) -> Deferred:
        async def go() -> Any:
            last: BaseException = PolicyError(f"{self._host} has no address")
            for ip in (await self._addresses(self._host))[:3]:
                cls = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
                ep = wrapClientTLS(self._tls, cls(self._reactor, ip, self._port, timeout=self._timeout))
                try:
                    return await ep.connect(factory)
                except Exception as e:
                    last = e
            raise last

        return Deferred.fromCoroutine(go())


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    def __init__(self, reactor: Any, addresses: Callable[[str], Awaitable[list[str]]], port: int | None,
                 trust: Any, timeout: float) -> None:
        self._reactor, self._addresses, self._port, self._trust, self._timeout = reactor, addresses, port, trust, timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        tls = ssl.optionsForClientTLS(host, trustRoot=self._trust)
        port = self._port if self._port is not None else uri.port
        return _ResolvedEndpoint(self._reactor, self._addresses, host, port, tls, self._timeout)


def https_agent(reactor: Any, addresses: Callable[[str], Awaitable[list[str]]], *, port: int | None = None,
                ca_file: str | None = None, timeout: float = 30.0) -> Agent:
    """
    twisted.web's Agent for HTTPS to mail domains' hosts: the certificate
    verified against the system trust store or C{ca_file}, the name
    resolved through the relay's resolver (C{addresses}), C{timeout}
    seconds to connect; C{port} replaces the URL's (tests).

    @raise OSError, ValueError: C{ca_file} cannot be read or holds no certificate.
    """
    if ca_file:
        from mailhub.relay.tls import trust_from_file

        trust = trust_from_file(ca_file)
    else:
        trust = ssl.platformTrust()
    return Agent.usingEndpointFactory(reactor, _EndpointFactory(reactor, addresses, port, trust, timeout))


def https_fetcher(reactor: Any, addresses: Callable[[str], Awaitable[list[str]]], *, port: int = 443,
                  ca_file: str | None = None, timeout: float = 30.0) -> Callable[[str], Deferred]:
    """
    C{fetch(domain)}: the bytes of C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt}.
    A 200 with C{text/plain} only (no redirects followed), at most
    L{MAX_POLICY_SIZE} bytes, within C{timeout} seconds in all.
    """
    agent = https_agent(reactor, addresses, port=port, ca_file=ca_file, timeout=timeout)

    def fetch(domain: str) -> Deferred:
        async def go() -> bytes:
            url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt".encode("ascii")
            response = await agent.request(b"GET", url)
            if response.code != 200:
                response.deliverBody(Protocol())
                raise PolicyError(f"HTTP status {response.code}")
            ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
            if ctype.split(b";")[0].strip().lower() != b"text/plain":
                response.deliverBody(Protocol())
                raise PolicyError("policy is not text/plain")
            done: Deferred = Deferred()
            response.deliverBody(_Body(done, MAX_POLICY_SIZE))
            return await done

        return Deferred.fromCoroutine(go()).addTimeout(timeout, reactor)

    return fetch


# -- discovery, cache and refresh -------------------------------------------------------


class MTASTS(service.Service):
    """
    The MTA-STS policies of recipient domains.  L{policy} gives the policy
    in force for a domain (None: none); policies are cached under
    C{cache_dir} and, while the service runs, refreshed before they expire.

    @param txt: C{txt(name)} -> the TXT records (lists of strings) of name:
        [] when there are none; raises on a DNS failure.
    @param fetch: C{fetch(domain)} -> Deferred policy bytes (L{https_fetcher}).
    """

    def __init__(self, reactor: Any, cache_dir: str, txt: Callable[[str], Awaitable[list[list[bytes]]]],
                 fetch: Callable[[str], Deferred], refresh_interval: float = 3600.0) -> None:
        self._reactor = reactor
        self._dir = cache_dir
        self._txt = txt
        self._fetch = fetch
        self._inflight: dict[str, Deferred] = {}
        self._cache: dict[str, CachedPolicy] = {}
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = reactor
        self._interval = refresh_interval
        #: False: policies are not written to the cache (C{mailhub tls check}).
        self.persist = True
        self._load()

    def _now(self) -> float:
        return float(self._reactor.seconds())

    def _path(self, domain: str) -> str:
        return os.path.join(self._dir, domain + ".json")

    def _load(self) -> None:
        if not os.path.isdir(self._dir):
            return
        for name in sorted(os.listdir(self._dir)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self._dir, name), encoding="utf-8") as f:
                    entry = CachedPolicy.from_json(json.load(f))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warn("ignoring unreadable MTA-STS cache file {name}: {error}", name=name, error=str(e))
                continue
            self._cache[entry.domain] = entry

    def _store(self, entry: CachedPolicy | None, domain: str) -> None:
        if not self.persist or "/" in domain or domain.startswith("."):
            if entry is None:
                self._cache.pop(domain, None)
            else:
                self._cache[domain] = entry
            return
        if entry is None:
            self._cache.pop(domain, None)
            try:
                os.unlink(self._path(domain))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warn("cannot remove MTA-STS cache of {domain}: {error}", domain=domain, error=str(e))
            return
        self._cache[domain] = entry
        try:
            os.makedirs(self._dir, mode=0o750, exist_ok=True)
            tmp = self._path(domain) + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:  # small; written when a policy changes
                json.dump(entry.to_json(), f)
            os.replace(tmp, self._path(domain))
        except OSError as e:
            log.warn("cannot cache MTA-STS policy of {domain}: {error}", domain=domain, error=str(e))

    def cached(self, domain: str) -> CachedPolicy | None:
        """The cached entry of C{domain}, even expired (for C{mailhub tls check})."""
        return self._cache.get(domain)

    def _valid(self, domain: str) -> CachedPolicy | None:
        entry = self._cache.get(domain)
        if entry is not None and entry.expires > self._now():
            return entry
        return None

    def policy(self, domain: str) -> Deferred:
        """
        Fires with the L{CachedPolicy} in force for C{domain} (mode enforce or
        testing), or None; never errbacks.  A valid cached policy is used
        when the TXT lookup or the fetch fails (RFC 8461 5.1).
        """
        entry = self._valid(domain)
        if entry is not None and self._now() - entry.checked < CHECK_AFTER:
            return defer.succeed(entry)
        return self._discover(domain)

    def _discover(self, domain: str) -> Deferred:
        if domain in self._inflight:
            d: Deferred = Deferred()

            def share(result: Any) -> Any:
                d.callback(result)
                return result

            self._inflight[domain].addBoth(share)
            return d
        d = Deferred.fromCoroutine(self._check(domain))
        self._inflight[domain] = d

        def done(result: Any) -> Any:
            self._inflight.pop(domain, None)
            return result

        return d.addBoth(done)

    async def _check(self, domain: str) -> CachedPolicy | None:
        cached = self._valid(domain)
        try:
            ident = parse_txt(await self._txt(f"_mta-sts.{domain}"))
        except Exception as e:
            log.info("MTA-STS TXT lookup for {domain} failed ({error}); {what}", domain=domain,
                     error=str(e) or type(e).__name__, what="using the cached policy" if cached else "no policy")
            return cached
        if ident is None:
            return cached  # RFC 8461 5.1: a cached policy stays valid until it expires
        now = self._now()
        if cached is not None and cached.id == ident and cached.expires - now > cached.policy.max_age / 2:
            self._store(CachedPolicy(domain, ident, cached.policy, cached.fetched, now), domain)
            return self._cache[domain]
        try:
            body = await self._fetch(domain)
            policy = parse_policy(body)
        except Exception as e:
            log.info("MTA-STS policy of {domain} not fetched: {error}", domain=domain,
                     error=str(e) or type(e).__name__)
            return cached
        if policy.mode == "none":
            self._store(None, domain)
            return None
        entry = CachedPolicy(domain, ident, policy, now, now)
        self._store(entry, domain)
        log.info("MTA-STS policy of {domain}: mode={mode} mx={mx} max_age={age}", domain=domain,
                 mode=policy.mode, mx=",".join(policy.mx), age=policy.max_age)
        return entry

    def refresh(self) -> Deferred:
        """Check every cached policy that is due (proactive refresh, RFC 8461 10.2)."""
        now = self._now()
        due = [d for d, e in self._cache.items() if now - e.checked >= CHECK_AFTER or e.expires - now < CHECK_AFTER]
        return defer.DeferredList([self._discover(d) for d in due], consumeErrors=True)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop.running:
            self._loop.stop()


def txt_lookup(resolver: Callable[[], Any]) -> Callable[[str], Awaitable[list[list[bytes]]]]:
    """C{txt(name)} through the twisted.names resolver C{resolver()}: [] for NXDOMAIN or no records."""
    from twisted.names import dns
    from twisted.names import error as dnserror

    async def txt(name: str) -> list[list[bytes]]:
        try:
            answers, _auth, _add = await resolver().lookupText(name)
        except (dnserror.DNSNameError, dnserror.AuthoritativeDomainError):
            return []
        owner = name.lower().rstrip(".")
        return [list(rr.payload.data) for rr in answers
                if rr.type == dns.TXT and str(rr.name).lower().rstrip(".") == owner]

    return txt


def wall_clock() -> float:
    """Seconds since the epoch (for the CLI, which has no reactor)."""
    return _time.time()
