"""
mailhub.smtp.proto.split_path (the path and parameters of MAIL FROM / RCPT
TO) against a reference implementation: every short input over a small
alphabet, odd inputs and long random ones give the same result or the
same error reply.
"""

from __future__ import annotations

import itertools
import random

import pytest

from mailhub.smtp.proto import CommandError, split_path


def reference_split_path(arg: str):
    """
    The reference implementation of split_path: the plain character loop
    over the path (quoted strings, backslash escapes, the closing ">").
    split_path finds the end of the path with a faster scan; this loop is
    kept as the oracle it must agree with on every input.
    """
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        path, _, rest = arg.partition(" ")
        return path, rest.split()
    i, quoted = 1, False
    while i < len(arg):
        c = arg[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            break
        i += 1
    else:
        raise CommandError(501, "5.1.3", "Error: bad address syntax")
    path, rest = arg[: i + 1], arg[i + 1 :]
    if rest and not rest.startswith(" "):
        raise CommandError(501, "5.5.4", "Error: bad parameter syntax")
    return path, rest.split()


def _outcome(f, arg):
    try:
        return ("ok", f(arg))
    except CommandError as e:
        return ("error", e.reply.code, e.reply.enhanced, e.reply.text)


def test_split_path_equals_the_reference_on_every_short_input():
    alphabet = ["<", ">", '"', "\\", " ", "a", "\u00e9", "\t"]
    n = 0
    for length in range(0, 7):
        for chars in itertools.product(alphabet, repeat=length):
            arg = "".join(chars)
            assert _outcome(split_path, arg) == _outcome(reference_split_path, arg), repr(arg)
            n += 1
    assert n == sum(8**k for k in range(7))


@pytest.mark.parametrize(
    "arg",
    [
        "", " ", "<>", "<> SIZE=10", " <> ", "<>x", "<", ">", "<a@b>", "<a@b> BODY=8BITMIME SMTPUTF8",
        '<"a>b"@c>', '<"a\\"> b"@c> SIZE=1', '<a@b> "x">', '<a@b>"', '<a"@b>', '<"a@b>', '<"\\', '<"a\\"',
        "<\u00fc\u00f1\u00ee@\u00e7\u00f8\u0111\u00e9.test> SMTPUTF8", '<"\u7528\u6237>"@\u4f8b\u5b50.test>',
        "<a@b>\tSIZE=1", "<a@b>\u00a0SIZE=1", "<\\>@b>", "<a@b> ", "<a@b>  SIZE=1  ", "a@b SIZE=1", "\u00e9",
        "<" + "a" * 5000 + ">", '<"' + "\\>" * 1000 + '"@b>', "<@r1,@r2:a@b>", "<a@[IPv6:::1]>",
        "<a@b\r\n>", "<a@b>\x00", "<\udcff@b>",
    ],
)
def test_split_path_equals_the_reference_on_odd_inputs(arg):
    assert _outcome(split_path, arg) == _outcome(reference_split_path, arg)


def test_split_path_equals_the_reference_on_random_long_inputs():
    rnd = random.Random(5671766)  # a fixed seed: the same inputs on every run
    pieces = ["<", ">", '"', "\\", " ", "a", "@", "\u00e9", "SIZE=1", "\u4f8b", "<>", '\\"', "\t"]
    for _ in range(20000):
        arg = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 30)))
        assert _outcome(split_path, arg) == _outcome(reference_split_path, arg), repr(arg)
