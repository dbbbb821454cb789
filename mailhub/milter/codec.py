"""
The milter protocol, version 6 (libmilter's C{mfdef.h}, Postfix's
C{milter8.c}): packets, options negotiation, macros, the milter's replies.

Owns: the wire format only -- encoding the MTA's commands, cutting the
milter's byte stream into packets (L{PacketReader}, bounded by
L{MAX_PACKET}), decoding each reply into a L{Response} or a L{Modification}.
Pure: no sockets, no clock, no knowledge of SMTP sessions or messages.

A packet is a 4-byte big-endian length (counting the command byte), one
command byte and its data; strings inside are NUL-terminated.  Anything a
milter sends that does not fit (a length beyond the limit, an unknown
command, a string without its NUL, a reply code outside 4xx/5xx) raises
L{MilterProtocolError}: the caller applies the milter's default action.

Must not touch: the network, timers, the message store.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "VERSION", "MAX_PACKET", "CHUNK", "MilterProtocolError", "PacketReader", "packet", "optneg",
    "parse_optneg", "Negotiated", "Response", "Modification", "parse_reply", "connect_data",
    "macro_packet", "strings", "MTA_ACTIONS", "MTA_PROTOCOL",
]

#: The protocol version mailhub speaks (libmilter 8.14+, Postfix 2.6+).
VERSION = 6
#: The largest packet accepted from a milter (libmilter's own limit is
#: 64 KiB for body chunks; replacement body chunks and headers stay below).
MAX_PACKET = 1024 * 1024
#: Body chunks sent to a milter (libmilter MILTER_CHUNK_SIZE).
CHUNK = 65535

# -- commands, MTA -> milter (SMFIC_*)
ABORT, BODY, CONNECT, MACRO, BODYEOB, HELO, QUIT_NC, HEADER, MAIL, EOH, OPTNEG, QUIT, RCPT, DATA, UNKNOWN = (
    b"A", b"B", b"C", b"D", b"E", b"H", b"K", b"L", b"M", b"N", b"O", b"Q", b"R", b"T", b"U",
)

# -- replies, milter -> MTA (SMFIR_*)
ADDRCPT, DELRCPT, ADDRCPT_PAR, SHUTDOWN = b"+", b"-", b"2", b"4"
ACCEPT, REPLBODY, CONTINUE, DISCARD, CHGFROM, CONN_FAIL = b"a", b"b", b"c", b"d", b"e", b"f"
ADDHEADER, INSHEADER, SETSYMLIST, CHGHEADER, PROGRESS, QUARANTINE = b"h", b"i", b"l", b"m", b"p", b"q"
REJECT, SKIP, TEMPFAIL, REPLYCODE = b"r", b"s", b"t", b"y"

# -- actions a milter may take at end of message (SMFIF_*)
F_ADDHDRS, F_CHGBODY, F_ADDRCPT, F_DELRCPT, F_CHGHDRS, F_QUARANTINE, F_CHGFROM, F_ADDRCPT_PAR, F_SETSYMLIST = (
    0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100,
)
#: Every action mailhub carries out.
MTA_ACTIONS = 0x1FF

# -- steps a milter may negotiate away (SMFIP_*)
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT, P_NOBODY, P_NOHDRS, P_NOEOH = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40
P_NR_HDR, P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x80, 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT, P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = (
    0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000,
)
P_HDR_LEADSPC = 0x100000
#: Every protocol flag mailhub honours (all of version 6's).
MTA_PROTOCOL = 0x1FFFFF

# -- the stages of macro lists (SMFIM_*), with the command each belongs to
STAGE_COMMANDS = {0: CONNECT, 1: HELO, 2: MAIL, 3: RCPT, 4: DATA, 5: BODYEOB, 6: EOH}

_KNOWN_REPLIES = frozenset(
    [ADDRCPT, DELRCPT, ADDRCPT_PAR, SHUTDOWN, ACCEPT, REPLBODY, CONTINUE, DISCARD, CHGFROM, CONN_FAIL,
     ADDHEADER, INSHEADER, SETSYMLIST, CHGHEADER, PROGRESS, QUARANTINE, REJECT, SKIP, TEMPFAIL, REPLYCODE, OPTNEG]
)


class MilterProtocolError(Exception):
    """The milter sent something that is not the protocol (the text is for the log, bounded)."""


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length (command byte included), command, data."""
    return struct.pack("!I", len(data) + 1) + command + data


def strings(*values: str | bytes) -> bytes:
    """NUL-terminated strings, UTF-8 for text."""
    return b"".join((v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v) + b"\0" for v in values)


def _split_strings(data: bytes, what: str) -> list[bytes]:
    if not data.endswith(b"\0"):
        raise MilterProtocolError(f"{what}: string without its NUL")
    return data[:-1].split(b"\0")


class PacketReader:
    """Cuts a byte stream into C{(command, data)} packets; a length over L{MAX_PACKET} is an error."""

    def __init__(self, limit: int = MAX_PACKET) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Add C{data}; return every complete packet in it.  Raises L{MilterProtocolError}."""
        self._buf += data
        out: list[tuple[bytes, bytes]] = []
        while len(self._buf) >= 4:
            (length,) = struct.unpack_from("!I", self._buf)
            if length < 1 or length > self.limit:
                raise MilterProtocolError(f"packet length {length} out of range")
            if len(self._buf) < 4 + length:
                break
            command = bytes(self._buf[4:5])
            data_ = bytes(self._buf[5 : 4 + length])
            del self._buf[: 4 + length]
            if command not in _KNOWN_REPLIES:
                raise MilterProtocolError(f"unknown reply {command!r}")
            out.append((command, data_))
        return out


def optneg(version: int = VERSION, actions: int = MTA_ACTIONS, protocol: int = MTA_PROTOCOL) -> bytes:
    """The MTA's options negotiation packet."""
    return packet(OPTNEG, struct.pack("!III", version, actions, protocol))


@dataclass(frozen=True)
class Negotiated:
    """What a milter asked for: its version, the actions it may take, the steps it skips, its macro lists."""

    version: int
    actions: int
    protocol: int
    macros: dict[bytes, tuple[str, ...]]

    def skips(self, flag: int) -> bool:
        return bool(self.protocol & flag)


def parse_optneg(data: bytes) -> Negotiated:
    """The milter's answer to OPTNEG (version 2..6; actions and steps must be ones mailhub offered)."""
    if len(data) < 12:
        raise MilterProtocolError("options negotiation reply too short")
    version, actions, protocol = struct.unpack_from("!III", data)
    if not 2 <= version <= VERSION:
        raise MilterProtocolError(f"unsupported milter protocol version {version}")
    if actions & ~MTA_ACTIONS:
        raise MilterProtocolError(f"milter asks for unknown actions 0x{actions:x}")
    if protocol & ~MTA_PROTOCOL:
        raise MilterProtocolError(f"milter asks for unknown protocol steps 0x{protocol:x}")
    macros: dict[bytes, tuple[str, ...]] = {}
    rest = data[12:]
    while rest:
        if len(rest) < 5:
            raise MilterProtocolError("truncated macro list")
        (stage,) = struct.unpack_from("!I", rest)
        end = rest.find(b"\0", 4)
        if end < 0:
            raise MilterProtocolError("macro list without its NUL")
        command = STAGE_COMMANDS.get(stage)
        if command is None:
            raise MilterProtocolError(f"macro list for unknown stage {stage}")
        names = rest[4:end].decode("ascii", "replace").split()
        macros[command] = tuple(n for n in names if n)
        rest = rest[end + 1 :]
    return Negotiated(version, actions, protocol, macros)


def connect_data(hostname: str, address: str, port: int) -> bytes:
    """SMFIC_CONNECT data: host name, family, port, address."""
    if not address:
        return strings(hostname) + b"U"  # unknown family: nothing follows
    family = b"6" if ":" in address else b"4"
    return strings(hostname) + family + struct.pack("!H", port & 0xFFFF) + strings(address)


def macro_packet(command: bytes, names: Iterable[str] | None, values: dict[str, str]) -> bytes | None:
    """
    SMFIC_MACRO for C{command}: the C{values} the milter asked for
    (C{names}, or all when it gave no list), or C{None} when none apply.
    Names are matched with and without braces (C{{client_addr}}, C{j}).
    """
    pairs: list[bytes] = []
    wanted = list(values) if names is None else list(names)
    for name in wanted:
        bare = name[1:-1] if name.startswith("{") and name.endswith("}") else name
        for spelled in (name, bare, "{" + bare + "}"):
            if spelled in values:
                pairs.append(strings(name, values[spelled]))
                break
    if not pairs:
        return None
    return packet(MACRO, command + b"".join(pairs))


@dataclass(frozen=True)
class Response:
    """
    A milter's verdict on one step: C{kind} is C{continue}, C{accept},
    C{reject}, C{tempfail}, C{discard}, C{skip} or C{replycode}; a
    C{replycode} carries the milter's C{code} (4xx/5xx), enhanced code and
    text (sanitized and bounded), a C{shutdown} the milter's wish to stop
    (treated as a tempfail, as Postfix does).
    """

    kind: str
    code: int = 0
    enhanced: str = ""
    text: str = ""


@dataclass(frozen=True)
class Modification:
    """One end-of-message action: C{kind} is the SMFIR_ byte; the fields it uses."""

    kind: bytes
    name: str = ""
    value: str = ""
    index: int = 0
    data: bytes = b""


_RESPONSES = {ACCEPT: "accept", CONTINUE: "continue", DISCARD: "discard", REJECT: "reject",
              TEMPFAIL: "tempfail", SKIP: "skip", SHUTDOWN: "tempfail", CONN_FAIL: "tempfail"}
#: Longest reply text kept from a milter (one SMTP reply line, RFC 5321 4.5.3.1.5).
MAX_TEXT = 400


def clean(raw: bytes) -> str:
    """Printable ASCII only, bounded: a milter's text never reaches the client raw."""
    text = raw.decode("ascii", "replace")
    text = "".join(c if " " <= c <= "~" else " " for c in text)
    return " ".join(text.split())[:MAX_TEXT]


def parse_replycode(data: bytes) -> Response:
    """SMFIR_REPLYCODE: C{"550 5.7.1 text"} (possibly multi-line, C{"550-..."}); 4xx or 5xx only."""
    parts = _split_strings(data, "reply code")
    raw = parts[0]
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    first = lines[0]
    if len(first) < 3 or not first[:3].isdigit() or first[0:1] not in (b"4", b"5") or first[3:4] not in (b"", b" ", b"-"):
        raise MilterProtocolError(f"bad reply code {clean(first[:40])!r}")
    code = int(first[:3])
    texts = []
    enhanced = ""
    for line in lines:
        body = line[4:] if line[:3] == first[:3] else line
        words = body.split(b" ", 1)
        if words and _is_enhanced(words[0], code):
            enhanced = enhanced or words[0].decode("ascii")
            body = words[1] if len(words) > 1 else b""
        texts.append(clean(body))
    if not enhanced:
        enhanced = "5.7.1" if code >= 500 else "4.7.1"
    text = " ".join(t for t in texts if t)[:MAX_TEXT] or ("Command rejected" if code >= 500 else "Try again later")
    return Response("replycode", code, enhanced, text)


def _is_enhanced(word: bytes, code: int) -> bool:
    pieces = word.split(b".")
    return (
        len(pieces) == 3
        and all(p.isdigit() and 0 < len(p) <= 3 for p in pieces)
        and pieces[0] == str(code // 100).encode()
    )


def parse_reply(command: bytes, data: bytes) -> Response | Modification | None:
    """
    One packet from a milter: a L{Response} (a verdict), a
    L{Modification} (end of message only; the caller checks that the
    action was negotiated), or C{None} for SMFIR_PROGRESS (keep waiting).
    """
    if command == PROGRESS:
        return None
    if command in _RESPONSES:
        return Response(_RESPONSES[command])
    if command == REPLYCODE:
        return parse_replycode(data)
    if command in (ADDHEADER,):
        name, value = _pair(data, "header")
        return Modification(command, name=name, value=value)
    if command in (INSHEADER, CHGHEADER):
        if len(data) < 4:
            raise MilterProtocolError("header change too short")
        (index,) = struct.unpack_from("!I", data)
        name, value = _pair(data[4:], "header")
        return Modification(command, name=name, value=value, index=index)
    if command in (ADDRCPT, DELRCPT, QUARANTINE):
        parts = _split_strings(data, "argument")
        return Modification(command, value=parts[0].decode("utf-8", "replace"))
    if command in (ADDRCPT_PAR, CHGFROM):
        parts = _split_strings(data, "argument")
        args = parts[1].decode("utf-8", "replace") if len(parts) > 1 else ""
        return Modification(command, value=parts[0].decode("utf-8", "replace"), name=args)
    if command == REPLBODY:
        return Modification(command, data=data)
    raise MilterProtocolError(f"unexpected reply {command!r}")


def _pair(data: bytes, what: str) -> tuple[str, str]:
    parts = _split_strings(data, what)
    if len(parts) < 2:
        raise MilterProtocolError(f"{what}: name without value")
    name = parts[0].decode("utf-8", "replace")
    if not name or any(c <= " " or c == ":" or c > "~" for c in name):
        raise MilterProtocolError(f"{what}: bad field name {clean(parts[0][:40])!r}")
    return name, parts[1].decode("utf-8", "surrogateescape")


def header_packets(fields: Sequence[tuple[str, str]]) -> list[bytes]:
    """SMFIC_HEADER packets for C{(name, value)} pairs."""
    return [packet(HEADER, strings(name, value)) for name, value in fields]
