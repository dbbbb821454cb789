"""
The man pages mailhub(8), mailhub-sendmail(1) and mailhub.toml(5): built
from docs/man/*.rst by setup.py (docutils' manpage writer) and installed
under the environment's share/man.  Each renders with man(1) and groff
without a warning, has the sections a man page needs, and names every
command and option the code accepts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import require_tool

MAN = os.path.join(sys.prefix, "share", "man")
PAGES = {
    "mailhub.8": ("SYNOPSIS", "DESCRIPTION", "DAEMON OPTIONS", "COMMANDS", "SIGNALS", "EXIT STATUS", "FILES",
                  "SEE ALSO"),
    "mailhub-sendmail.1": ("SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "FILES", "SEE ALSO"),
    "mailhub.toml.5": ("SYNOPSIS", "DESCRIPTION", "Which file", "Keys", "FILES", "SEE ALSO"),
}


def installed(name: str) -> str:
    path = os.path.join(MAN, "man" + name.rsplit(".", 1)[1], name)
    assert os.path.isfile(path), f"{path} is not installed (pip install the package)"
    return path


def rendered(name: str) -> str:
    require_tool("man")
    result = subprocess.run(
        ["man", "-l", installed(name)], env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": ""},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return re.sub(r".\x08", "", result.stdout)


@pytest.mark.parametrize("name", sorted(PAGES))
def test_page_renders_without_warnings_and_has_its_sections(name):
    require_tool("groff")
    check = subprocess.run(
        ["groff", "-man", "-t", "-Tutf8", "-ww", "-z", installed(name)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and check.stderr == "", check.stderr
    text = rendered(name)
    headings = {line.strip() for line in text.splitlines() if line and not line.startswith("       ")}
    for section in PAGES[name]:
        assert section in headings, (section, sorted(headings))


def _commands(options_class, prefix: str = "") -> list[str]:
    found = []
    for name, _short, parser, _doc in options_class.subCommands:
        found.append(prefix + name)
        sub = parser()
        if getattr(sub, "subCommands", None):
            found.extend(_commands(type(sub), prefix + name + " "))
    return found


def _long_options(options_class) -> list[str]:
    opts = options_class()
    names = [p[0] for p in getattr(opts, "optParameters", [])] + [f[0] for f in getattr(opts, "optFlags", [])]
    return ["--" + n for n in names if n not in ("help", "version")]


def test_every_command_and_option_is_in_the_pages():
    from mailhub import tap
    from mailhub.cli import main as cli_main
    from mailhub.cli import sendmail_options

    page = re.sub(r"\s+", " ", rendered("mailhub.8").replace("\u2010", "-").replace("\u2212", "-"))
    for command in _commands(cli_main.Options):
        assert f"{command}" in page, command
        parser = dict((c[0], c[2]) for c in cli_main.Options.subCommands)[command.split()[0]]
        sub = parser()
        if " " in command:
            sub = dict((c[0], c[2]) for c in sub.subCommands)[command.split()[1]]()
        for option in _long_options(type(sub)):
            assert option in page, (command, option)
    for option in _long_options(tap.Options) + ["--smtp", "--domain"] + _long_options(cli_main.Options):
        assert option in page, option

    page = re.sub(r"\s+", " ", rendered("mailhub-sendmail.1").replace("\u2010", "-").replace("\u2212", "-"))
    for letter in sorted(sendmail_options._WITH_VALUE | sendmail_options._FLAGS | {"q", "t", "i", "v", "C", "f", "r", "F"}):
        assert re.search(rf"-{letter}\b", page), letter
    for mode in "mpsi":
        assert f"-b{mode}" in page, mode
    for option in ("--help", "--version"):
        assert option in page
