"""
A milter's changes to a message's header section and body, and the
header fields and body chunks as a milter is shown them.

Owns: cutting a header section into fields (L{Header}), the values a
milter sees (folds as C{"\\n"}, the leading space removed unless it
negotiated SMFIP_HDR_LEADSPC), carrying out SMFIR_ADDHEADER,
SMFIR_INSHEADER and SMFIR_CHGHEADER (a change to an empty value deletes
the field) the way libmilter documents them, and the new content as
chunks: the edited header section, then the old body or the milter's
replacement (bare LF made CRLF).  Values a milter adds are made into
well-formed lines: CR/LF only as folds, each followed by white space.

Must not touch: the spool (the caller writes the chunks), the envelope,
the network.  Pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import IO

from mailhub.milter import codec
from mailhub.milter.codec import Modification

__all__ = ["Header", "body_chunks", "skip_bytes", "crlf_body"]

_FOLD = re.compile(rb"\r?\n")
_CHUNK = 64 * 1024


class Header:
    """The header fields of a message, in order, as raw lines (each ending in CRLF, folds kept)."""

    def __init__(self, section: bytes) -> None:
        self.fields: list[bytes] = []
        text = section[:-2] if section.endswith(b"\r\n\r\n") else section
        for line in text.split(b"\r\n"):
            if not line:
                continue
            if line[:1] in (b" ", b"\t") and self.fields:
                self.fields[-1] += line + b"\r\n"
            else:
                self.fields.append(line + b"\r\n")

    @staticmethod
    def name(raw: bytes) -> str:
        """The field's name, or C{""} for a line that is no field."""
        name, colon, _ = raw.partition(b":")
        if not colon or not name or any(c <= 32 or c > 126 for c in name):
            return ""
        return name.decode("ascii")

    @staticmethod
    def value(raw: bytes, leadspc: bool) -> str:
        """The field's value as a milter sees it: folds as C{"\\n"}, no final CRLF."""
        value = raw.partition(b":")[2]
        if value.endswith(b"\r\n"):
            value = value[:-2]
        value = value.replace(b"\r\n", b"\n")
        if not leadspc:
            value = value.lstrip(b" \t")
        return value.decode("utf-8", "surrogateescape")

    def for_milter(self, leadspc: bool) -> list[tuple[str, str]]:
        """C{(name, value)} of every field (lines that are no field are not shown)."""
        return [(self.name(f), self.value(f, leadspc)) for f in self.fields if self.name(f)]

    @staticmethod
    def line(name: str, value: str, leadspc: bool) -> bytes:
        """A field line from a milter's name and value."""
        raw = value.encode("utf-8", "surrogateescape").replace(b"\0", b" ")
        lines = [p.replace(b"\r", b" ") for p in _FOLD.split(raw)]  # a CR is a line break only before LF
        first, rest = lines[0], lines[1:]
        folded = b"".join(b"\r\n" + (p if p[:1] in (b" ", b"\t") else b"\t" + p) for p in rest if p.strip())
        sep = b":" if leadspc else b": "
        return name.encode("ascii") + sep + first + folded + b"\r\n"

    def apply(self, change: Modification, leadspc: bool) -> None:
        """Carry out a header change (add, insert at an index, change or delete the Nth of a name)."""
        if change.kind == codec.ADDHEADER:
            self.fields.append(self.line(change.name, change.value, leadspc))
        elif change.kind == codec.INSHEADER:
            self.fields.insert(min(change.index, len(self.fields)), self.line(change.name, change.value, leadspc))
        elif change.kind == codec.CHGHEADER:
            wanted = change.name.lower()
            nth = max(change.index, 1)
            for i, raw in enumerate(self.fields):
                if self.name(raw).lower() == wanted:
                    nth -= 1
                    if nth == 0:
                        if change.value.strip():
                            self.fields[i] = self.line(change.name, change.value, leadspc)
                        else:
                            del self.fields[i]
                        return
            if change.value.strip():
                self.fields.append(self.line(change.name, change.value, leadspc))
        else:
            raise ValueError(f"not a header change: {change.kind!r}")

    def bytes(self) -> bytes:
        """The header section, with its empty line."""
        return b"".join(self.fields) + b"\r\n"


def skip_bytes(chunks: Iterable[bytes], count: int) -> Iterator[bytes]:
    """C{chunks} without their first C{count} bytes."""
    for chunk in chunks:
        if count >= len(chunk):
            count -= len(chunk)
            continue
        yield chunk[count:] if count else chunk
        count = 0


def body_chunks(chunks: Iterable[bytes], size: int = codec.CHUNK) -> Iterator[bytes]:
    """Re-cut C{chunks} into pieces of at most C{size} bytes (SMFIC_BODY's limit)."""
    for chunk in chunks:
        for start in range(0, len(chunk), size):
            yield chunk[start : start + size]


def crlf_body(file: IO[bytes]) -> Iterator[bytes]:
    """A replacement body from its file, bare LF made CRLF."""
    file.seek(0)
    previous = b""
    while True:
        chunk = file.read(_CHUNK)
        if not chunk:
            if previous:
                yield previous
            return
        data = previous + chunk
        previous = b""
        if data.endswith(b"\r"):
            data, previous = data[:-1], b"\r"
        yield re.sub(rb"(?<!\r)\n", b"\r\n", data)
