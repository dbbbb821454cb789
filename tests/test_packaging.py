"""
What ``pip install .`` installs: every package of the source tree is named
in setup.cfg's ``packages`` (the tests import from the checkout, so a
package missing there passes every other test and breaks the installed
daemon at start).
"""

from __future__ import annotations

import configparser
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_packages() -> set[str]:
    found = set()
    for top, dirs, files in os.walk(os.path.join(ROOT, "mailhub")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if "__init__.py" in files:
            found.add(os.path.relpath(top, ROOT).replace(os.sep, "."))
    return found


def test_every_package_is_installed() -> None:
    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, "setup.cfg"))
    listed = {line.strip() for line in setup["options"]["packages"].splitlines() if line.strip()}
    assert source_packages() <= listed, sorted(source_packages() - listed)
