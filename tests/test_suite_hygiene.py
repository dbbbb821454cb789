"""
The suite's shape and the words around the code.

Test files share fakes through helper modules (smtpharness, tlsauthharness,
httpharness, deliveryharness, dnszone, daemon, peers, accounts, fuzzing),
never by importing another test file: a test file imported by another runs
its module-level code twice and ties the two files' fixtures together.

Comments, docstrings and documentation describe the software, not how it
was written: no "review", "session N", "round N" or "house rule" (the
invariants are cited by name), no files outside the repository (a
C{../shared} directory, C{GUIDE.md}), no re-exports kept "for older
imports"; test files, tests and classes are named after behaviour.  In
Python only comments and docstrings are prose: an SMTP session, a retry
round or a string a test sends are product terms and code.  The project's
own changelog (CHANGES.rst) tells the history and is not checked, and
neither is this file, which has to name the words it looks for.
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELF = os.path.relpath(os.path.abspath(__file__), ROOT)

#: Trees and files whose prose is checked (relative to the repository).
PROSE_TREES = ("mailhub", "tests", "docs", "bench", "etc")
PROSE_FILES = ("README.rst",)

#: Words that tell how the code was written rather than what it does.
FORBIDDEN = {
    "review": re.compile(r"\breview(?:s|ed|er|ers|ing)?\b", re.IGNORECASE),
    "session N": re.compile(r"\bsession\s+(?:#\s*)?\d", re.IGNORECASE),
    "round N": re.compile(r"\bround\s+(?:#\s*)?\d", re.IGNORECASE),
    "house rule": re.compile(r"\bhouse[\s-]+rules?\b", re.IGNORECASE),
    "file outside the repository": re.compile(r"\.\./shared\b|\bGUIDE\.md\b|\.\./[\w./-]*\.md\b"),
    "re-export for older imports": re.compile(r"\bolder imports\b", re.IGNORECASE),
}

#: Names (test files, functions, classes) that tell the history.
FORBIDDEN_NAME = re.compile(r"review|house_?rule|(?:^|_)(?:round|session)_?\d", re.IGNORECASE)

#: (path relative to the repository, finding) pairs a product text needs; each says why.
ALLOWED: dict[tuple[str, str], str] = {}


# -- the scanner ---------------------------------------------------------------------------


def docstrings(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of the module's, every class's and every function's docstring."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                yield body[0].lineno, body[0].value.value


def comments(source: str) -> Iterator[tuple[int, str]]:
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def python_prose(source: str) -> Iterator[tuple[int, str]]:
    """The prose of a Python source: its comments and docstrings, with the line each starts on."""
    yield from comments(source)
    yield from docstrings(ast.parse(source))


def text_prose(source: str) -> Iterator[tuple[int, str]]:
    """A documentation or configuration file is prose throughout, line by line."""
    yield from enumerate(source.splitlines(), 1)


def findings(source: str, python: bool) -> list[tuple[int, str, str]]:
    """(line, what, matched text) for every forbidden word in the prose of C{source}."""
    found = []
    for start, text in (python_prose(source) if python else text_prose(source)):
        for what, pattern in FORBIDDEN.items():
            # a docstring is one text: "session\n    3" is found where the line wraps
            found += [(start + text.count("\n", 0, m.start()), what, " ".join(m.group(0).split()))
                      for m in pattern.finditer(text)]
    return sorted(found)


def files(trees: tuple[str, ...] = PROSE_TREES, extra: tuple[str, ...] = PROSE_FILES) -> list[str]:
    out = [f for f in extra if os.path.exists(os.path.join(ROOT, f))]
    for tree in trees:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, tree)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith((".pyc", ".pyo")):
                    continue
                relpath = os.path.relpath(os.path.join(dirpath, name), ROOT)
                if relpath != SELF:
                    out.append(relpath)
    return out


def findings_in(relpath: str) -> list[str]:
    path = os.path.join(ROOT, relpath)
    with open(path, encoding="utf-8", errors="replace") as f:
        source = f.read()
    python = relpath.endswith(".py")
    return [
        f"{relpath}:{line}: {what}: {text!r}"
        for line, what, text in findings(source, python)
        if (relpath, text.lower()) not in ALLOWED
    ]


def imports_of_test_files(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import of a test_* module, at any depth of the file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + ([alias.name for alias in node.names] if node.level or not node.module
                                           or node.module == "tests" else [])
        else:
            continue
        for name in names:
            if any(part.startswith("test_") for part in name.split(".")):
                found.append((node.lineno, name))
    return found



# -- the scanner finds what it must and nothing else ---------------------------------------------


def test_the_scanner_reads_comments_and_docstrings_only():
    source = (
        '"""Module docstring: as the review asked."""\n'
        "x = 'review'  # a string is code: never prose\n"
        "def f():\n"
        '    """A house rule 4 cited by number, and a session\n    3 wrapped over two lines."""\n'
        "    return 'session 1 round 2'\n"
        "# one SMTP session, one retry round, a reviewer\n"
        "# see ../shared/GUIDE.md\n"
    )
    assert findings(source, python=True) == [
        (1, "review", "review"),
        (4, "house rule", "house rule"),
        (4, "session N", "session 3"),
        (7, "review", "reviewer"),
        (8, "file outside the repository", "../shared"),
        (8, "file outside the repository", "GUIDE.md"),
    ]


def test_the_scanner_reads_documentation_line_by_line():
    text = "Delivery\n========\n\nThe SMTP session ends.\nReviewed in round 3.\n"
    assert findings(text, python=False) == [(5, "review", "Reviewed"), (5, "round N", "round 3")]


def test_the_import_check_sees_every_form():
    source = (
        "import test_a\n"
        "from test_b import X\n"
        "from tests.test_c import Y\n"
        "from tests import test_d\n"
        "from . import test_e\n"
        "import smtpharness, testing_tools\n"
        "def f():\n"
        "    from test_f import Z\n"
    )
    assert sorted(imports_of_test_files(source)) == [
        (1, "test_a"), (2, "test_b"), (3, "tests.test_c"), (4, "test_d"), (5, "test_e"), (8, "test_f"),
    ]


# -- the repository ------------------------------------------------------------------------------


def python_files_under_tests() -> list[str]:
    return [f for f in files(("tests",), ()) if f.endswith(".py")]


@pytest.mark.parametrize("relpath", python_files_under_tests())
def test_no_test_file_imports_another_test_file(relpath):
    """Shared fakes live in helper modules; a test file (or helper) never imports a test_*.py file."""
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
        imported = imports_of_test_files(f.read())
    assert [f"{relpath}:{line}: imports {name}" for line, name in imported] == []


@pytest.mark.parametrize("tree", [*PROSE_TREES, *PROSE_FILES])
def test_prose_describes_the_software(tree):
    """Comments, docstrings and docs: no review, session N, round N, house rule, outside files."""
    chosen = [f for f in files() if f == tree or f.startswith(tree + os.sep)]
    assert chosen, f"nothing to check under {tree}"
    assert [finding for f in chosen for finding in findings_in(f)] == []


def test_names_describe_behaviour():
    """No test file, test, function or class named after a review, a round or a session number."""
    bad = []
    for relpath in files(("tests", "mailhub", "bench"), ()):
        if not relpath.endswith(".py"):
            continue
        if FORBIDDEN_NAME.search(os.path.basename(relpath)):
            bad.append(relpath)
        with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        bad += [f"{relpath}:{node.lineno}: {node.name}" for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and FORBIDDEN_NAME.search(node.name)]
    assert bad == []
