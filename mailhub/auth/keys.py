"""
DKIM keys: the key directory, new keys, and the DNS records that publish them.

Owns: the layout of C{dkim.keys} (one directory per signing domain, one
file per selector: C{KEYS/example.com/s2026.key}, PEM, mode 0600), reading
it (L{KeyStore}: the keys of a domain, or of its nearest parent when
C{dkim.sign_subdomains} is on), making keys (L{generate}: RSA 2048 or
Ed25519, with the cryptography package), and the TXT record of a key
(L{dns_record}, RFC 6376 3.6.1 and RFC 8463 4) and comparing a published
record with it (L{compare_record}).

Must not touch: signing (L{mailhub.auth.sign}), the network, the daemon.
Reading runs in a worker thread (the signer's) or a command.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import InvalidTagValueList, parse_tag_value

__all__ = [
    "DKIMKey",
    "KeyStore",
    "KeyError_",
    "generate",
    "dns_record",
    "compare_record",
    "key_path",
    "key_problems",
    "RSA",
    "ED25519",
    "SELECTOR",
]

RSA = "rsa"
ED25519 = "ed25519"
#: a selector as a file name: one or more DNS labels
SELECTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
#: largest key file read (an RSA 4096 PEM is about 3.3 kB)
MAX_KEY_FILE = 16 * 1024
#: most keys used for one domain (one signature each)
MAX_KEYS_PER_DOMAIN = 4


class KeyError_(Exception):
    """A key file is missing, unreadable or not a key we can sign with; the text says which."""


@dataclass(frozen=True)
class DKIMKey:
    """
    One signing key.

    @ivar domain: the d= domain (lower case, ASCII).
    @ivar selector: the s= selector.
    @ivar kind: L{RSA} or L{ED25519}.
    @ivar private: what dkimpy signs with: the PEM for RSA, the base64 seed for Ed25519.
    @ivar public: the p= value of the DNS record (base64).
    @ivar path: the file it came from.
    """

    domain: str
    selector: str
    kind: str
    private: bytes
    public: str
    path: str

    @property
    def algorithm(self) -> bytes:
        """dkimpy's name of the signature algorithm (the a= tag)."""
        return b"rsa-sha256" if self.kind == RSA else b"ed25519-sha256"

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def key_path(keys_dir: str, domain: str, selector: str) -> str:
    return os.path.join(keys_dir, domain.lower(), selector + ".key")


def _public(kind: str, key: object) -> str:
    if kind == RSA:
        assert isinstance(key, rsa.RSAPrivateKey)
        der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        der = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(der).decode("ascii")


def load_key(path: str, domain: str, selector: str) -> DKIMKey:
    """The key in C{path}. @raise KeyError_: it cannot be used."""
    try:
        with open(path, "rb") as f:
            pem = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyError_(f"{path}: {e.strerror or e}") from e
    if len(pem) > MAX_KEY_FILE:
        raise KeyError_(f"{path}: larger than {MAX_KEY_FILE} bytes: not a key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise KeyError_(f"{path}: not an unencrypted PEM private key") from e
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise KeyError_(f"{path}: RSA key of {key.key_size} bits is too small (RFC 8301: at least 1024)")
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        return DKIMKey(domain, selector, RSA, private, _public(RSA, key), path)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        return DKIMKey(domain, selector, ED25519, base64.b64encode(seed), _public(ED25519, key), path)
    raise KeyError_(f"{path}: neither an RSA nor an Ed25519 key")


class KeyStore:
    """
    The keys under C{keys_dir}, read when asked (a new key file is used
    without a reload; a file is parsed again only when it changed).

    @param sign_subdomains: a domain without keys of its own is signed
        with the keys of its nearest parent that has some.
    """

    def __init__(self, keys_dir: str, sign_subdomains: bool = False) -> None:
        self.keys_dir = keys_dir
        self.sign_subdomains = sign_subdomains
        self._parsed: dict[str, tuple[float, int, DKIMKey]] = {}

    def keys_for(self, domain: str) -> list[DKIMKey]:
        """
        The keys to sign mail from C{domain} with: its own, else (with
        C{sign_subdomains}) its nearest parent's; [] when none.  Selectors
        in name order, at most L{MAX_KEYS_PER_DOMAIN}.

        @raise KeyError_: a key file of that domain cannot be used.
        """
        domain = domain.lower().rstrip(".")
        labels = domain.split(".")
        candidates = [domain]
        if self.sign_subdomains:
            candidates += [".".join(labels[i:]) for i in range(1, len(labels) - 1)]
        for name in candidates:
            if not name or name.startswith(".") or "/" in name or name in (".", ".."):
                continue
            found = self._domain_keys(name)
            if found:
                return found
        return []

    def _domain_keys(self, domain: str) -> list[DKIMKey]:
        where = os.path.join(self.keys_dir, domain)
        try:
            names = sorted(os.listdir(where))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise KeyError_(f"{where}: {e.strerror or e}") from e
        out = []
        for name in names:
            selector = name[:-4]
            if not name.endswith(".key") or not SELECTOR.match(selector):
                continue
            path = os.path.join(where, name)
            try:
                st = os.stat(path)
            except OSError as e:
                raise KeyError_(f"{path}: {e.strerror or e}") from e
            cached = self._parsed.get(path)
            if cached is not None and cached[:2] == (st.st_mtime, st.st_size):
                out.append(cached[2])
            else:
                key = load_key(path, domain, selector)
                self._parsed[path] = (st.st_mtime, st.st_size, key)
                out.append(key)
            if len(out) >= MAX_KEYS_PER_DOMAIN:
                break
        return out


def key_problems(keys_dir: str) -> list[str]:
    """
    What is wrong with the keys directory, one line each: missing, or a key
    file that cannot be used (mail from its domain would be deferred).
    Read at start by the daemon and by C{mailhub check-config}.
    """
    if not os.path.isdir(keys_dir):
        return [f"dkim.keys: no such directory {keys_dir} (nothing is signed until 'mailhub dkim keygen' makes a key)"]
    store = KeyStore(keys_dir)
    problems = []
    try:
        domains = sorted(os.listdir(keys_dir))
    except OSError as e:
        return [f"dkim.keys: cannot read {keys_dir}: {e.strerror or e}"]
    for domain in domains:
        if os.path.isdir(os.path.join(keys_dir, domain)):
            try:
                store.keys_for(domain)
            except KeyError_ as e:
                problems.append(f"dkim.keys: {e} (mail from {domain} is deferred until it is fixed)")
    return problems


def generate(kind: str) -> bytes:
    """A new private key as PEM: RSA 2048 (PKCS#1) or Ed25519 (PKCS#8)."""
    if kind == RSA:
        rkey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return rkey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    if kind == ED25519:
        ekey = ed25519.Ed25519PrivateKey.generate()
        return ekey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    raise ValueError(f"unknown key type {kind!r}")


def dns_record(key: DKIMKey) -> str:
    """The TXT record's text (one string; the caller splits it for its zone file)."""
    return f"v=DKIM1; k={key.kind}; p={key.public}"


def zone_line(key: DKIMKey) -> str:
    """The record as a zone-file line, its text in strings of at most 255 characters."""
    text = dns_record(key)
    parts = " ".join(f'"{text[i:i + 250]}"' for i in range(0, len(text), 250))
    return f"{key.record_name}. IN TXT ( {parts} )" if len(text) > 250 else f"{key.record_name}. IN TXT {parts}"


def compare_record(key: DKIMKey, records: list[bytes]) -> str | None:
    """
    Whether the published TXT C{records} (each one's strings joined) are
    C{key}'s record: None when one of them is, else why not.
    """
    if not records:
        return f"no TXT record at {key.record_name}"
    if len(records) > 1:
        return f"{len(records)} TXT records at {key.record_name}: a verifier cannot choose (publish one)"
    try:
        tags = parse_tag_value(records[0])
    except InvalidTagValueList as e:
        return f"the record at {key.record_name} is not a DKIM key record ({e})"
    version = tags.get(b"v", b"DKIM1")
    if version != b"DKIM1":
        return f"the record at {key.record_name} has v={version.decode('ascii', 'replace')}, not DKIM1"
    kind = tags.get(b"k", b"rsa").decode("ascii", "replace").lower()
    if kind != key.kind:
        return f"the record at {key.record_name} has k={kind}, the key is {key.kind}"
    published = re.sub(rb"\s+", b"", tags.get(b"p", b"")).decode("ascii", "replace")
    if not published:
        return f"the record at {key.record_name} has an empty p= (the key is revoked)"
    if published != key.public:
        return f"the record at {key.record_name} publishes another public key (p= does not match {key.path})"
    return None
