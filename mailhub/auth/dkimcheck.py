"""
DKIM verification (RFC 6376, RFC 8463) of every signature of a message, with dkimpy.

Owns: running dkimpy on each C{DKIM-Signature} (at most L{MAX_SIGNATURES})
with its key lookups answered by L{mailhub.auth.dns.AuthDNS}, and turning
what dkimpy says into RFC 8601 results: C{pass}; C{fail} (bad signature,
body hash mismatch, expired C{x=}, revoked key); C{permerror} (no key
record, a key or signature that cannot be parsed); C{temperror} (the key
could not be looked up now); C{none} when the message has no signature.

Must not touch: the reactor thread (this runs in a worker thread; the DNS
bridge waits there), canonicalization and cryptography (dkimpy's).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from mailhub.auth.dns import DNSTempError

__all__ = ["DKIMResult", "verify_dkim", "MAX_SIGNATURES"]

#: Signatures verified per message at most (the rest are not looked at).
MAX_SIGNATURES = 5

#: A blocking TXT lookup: name -> the records' texts, raising DNSTempError.
TXTLookup = Callable[[str], list[bytes]]


@dataclass(frozen=True)
class DKIMResult:
    """One signature's result: C{result}, its C{d=}, C{s=}, C{a=}, the start of C{b=}, and why."""

    result: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""
    reason: str = ""


class _Temporary(Exception):
    pass


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors.append(record.getMessage())


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


def verify_dkim(raw: bytes, txt: TXTLookup) -> list[DKIMResult]:
    """The results of the message C{raw}'s signatures, top first; [DKIMResult("none")] without any."""
    recorder = _Recorder()
    logger = logging.getLogger(f"mailhub.auth.dkim.{id(recorder)}")
    logger.propagate = False
    logger.addHandler(recorder)
    try:
        d = dkim.DKIM(raw, logger=logger, minkey=1024)
        headers = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
        if not headers:
            return [DKIMResult("none")]
        return [_one(d, i, v, txt, recorder) for i, v in enumerate(headers[:MAX_SIGNATURES])]
    except dkim.MessageFormatError as e:
        return [DKIMResult("permerror", reason=f"message: {e}"[:120])]
    finally:
        logger.removeHandler(recorder)
        logging.Logger.manager.loggerDict.pop(logger.name, None)


def _one(d: dkim.DKIM, idx: int, value: bytes, txt: TXTLookup, recorder: _Recorder) -> DKIMResult:
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList as e:
        return DKIMResult("permerror", reason=f"signature syntax: {e}"[:120])
    domain, selector = _text(tags.get(b"d", b"")), _text(tags.get(b"s", b""))
    algorithm = _text(tags.get(b"a", b""))
    b = _text(b"".join(tags.get(b"b", b"").split()))[:8]
    fetched: list[bytes | None] = []

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        qname = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            records = txt(qname)
        except DNSTempError as e:
            raise _Temporary(str(e)) from e
        record = records[0] if len(records) == 1 else None
        fetched.append(record)
        return record

    recorder.errors.clear()

    def made(result: str, reason: str = "") -> DKIMResult:
        return DKIMResult(result, domain, selector, algorithm, b, reason[:120])

    try:
        ok = d.verify(idx=idx, dnsfunc=dnsfunc)
    except _Temporary as e:
        return made("temperror", f"key lookup: {e}")
    except dkim.ValidationError as e:
        text = str(e)
        if text.startswith("x= value is past"):
            return made("fail", f"signature expired ({text})")
        return made("fail" if "mismatch" in text else "permerror", text)
    except dkim.KeyFormatError as e:
        return made("permerror", f"key: {e}")
    except dkim.DKIMException as e:
        return made("permerror", str(e))
    except Exception as e:  # dkimpy on input it did not expect
        return made("permerror", f"{type(e).__name__}: {e}")
    if ok:
        return made("pass")
    if fetched and fetched[-1] is None:
        return made("permerror", "no key record")
    if fetched:
        try:
            key = parse_tag_value(fetched[-1] or b"")
        except InvalidTagValueList:
            return made("permerror", "key record syntax")
        if not b"".join(key.get(b"p", b"").split()):
            return made("fail", "key revoked")
    if recorder.errors:
        return made("permerror", recorder.errors[-1])
    return made("fail", "signature did not verify")
