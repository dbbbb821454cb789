"""
docs/architecture.rst is the index of the package: every module and every
subpackage of mailhub/ is named there, so a new module is placed and
described when it is added.
"""

from __future__ import annotations

import os

import mailhub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(mailhub.__file__))


def test_every_module_is_in_the_architecture_page() -> None:
    with open(os.path.join(ROOT, "docs", "architecture.rst"), encoding="utf-8") as f:
        page = f.read()
    missing = []
    for dirpath, _dirs, files in os.walk(PACKAGE):
        sub = os.path.relpath(dirpath, PACKAGE)
        if sub != "." and "__pycache__" not in sub and f"``{sub}/``" not in page:
            missing.append(f"{sub}/")
        for name in files:
            if name.endswith(".py") and name != "__init__.py" and f"``{name[:-3]}``" not in page:
                missing.append(os.path.join(sub, name))
    assert sorted(missing) == []
