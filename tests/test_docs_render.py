"""
README.rst and every page under docs/ are valid reStructuredText: docutils
reads each one and a warning or error (a malformed table, a broken
reference, a title underline too short) fails the test, as it would break
the page on PyPI and in a rendered copy.
"""

from __future__ import annotations

import glob
import io
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.rst", "CHANGES.rst", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.rst")))]


@pytest.mark.parametrize("page", PAGES)
def test_page_is_valid_restructuredtext(page: str) -> None:
    import docutils.core

    warnings = io.StringIO()
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        docutils.core.publish_doctree(
            f.read(),
            source_path=os.path.join(ROOT, page),
            settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": warnings},
        )
    assert warnings.getvalue() == ""
