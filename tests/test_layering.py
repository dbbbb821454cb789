"""
The direction of the house: which parts of mailhub may import which.

Every import in every module under ``mailhub/`` (module level and inside
functions alike) is read with ``ast`` and checked against the layers of
docs/architecture.rst: the core modules at the bottom, then the parts that
handle a message (``smtp``, ``queue``, ``delivery``, ``relay``), then the
daemon as a whole (``daemon``: its components, reload, start-up checks and
user), then the faces (``web``, ``cli``), and ``tap``, the one module that
wires everything, at the top.  A lower layer never imports a higher one.
"""

from __future__ import annotations

import ast
import os

import pytest

import mailhub

PACKAGE_DIR = os.path.dirname(os.path.abspath(mailhub.__file__))

#: Each part of the package and the rank of its layer (higher may import lower).
CORE, MESSAGE, DAEMON, FACE, WIRING = 0, 1, 2, 3, 4
MESSAGE_PARTS = ("smtp", "queue", "delivery", "relay", "milter", "ratelimit", "auth")
DAEMON_PARTS = ("daemon", "history")
FACE_PARTS = ("web", "cli")

#: Modules of a message part that the core may use: pure functions without
#: I/O, which loading a configuration needs to validate values.
PURE_FOR_CORE = {"mailhub.relay.nexthop"}


def part_of(module: str) -> str:
    """``mailhub.smtp.server`` -> ``smtp``; ``mailhub.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def rank(module: str) -> int:
    part = part_of(module)
    if part in MESSAGE_PARTS:
        return MESSAGE
    if part in DAEMON_PARTS:
        return DAEMON
    if part in FACE_PARTS:
        return FACE
    if part == "tap":
        return WIRING
    return CORE


def modules() -> list[tuple[str, str]]:
    found = []
    for dirpath, _dirs, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
                found.append((rel.removesuffix(".__init__"), path))
    return sorted(found)


def imports_of(module: str, path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    known = {name for name, _path in modules()}
    seen: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            seen.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from mailhub.relay import nexthop" imports the module
            # mailhub.relay.nexthop, not names of the package mailhub.relay
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            seen |= submodules
            if len(submodules) < len(node.names):
                seen.add(target)
    return {name for name in seen if name in known}


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _p in modules()])
def test_no_module_imports_a_higher_layer(module: str, path: str) -> None:
    wrong = sorted(
        target
        for target in imports_of(module, path)
        if rank(target) > rank(module) and target not in PURE_FOR_CORE
    )
    assert wrong == [], f"{module} (layer {rank(module)}) imports a higher layer: {wrong}"


def test_the_layers_are_as_documented() -> None:
    """Every part of the package is one the layers above know, so a new one is placed deliberately."""
    parts = {part_of(name) for name, _path in modules() if name != "mailhub"}
    subpackages = {p for p in parts if os.path.isdir(os.path.join(PACKAGE_DIR, p))}
    assert subpackages == set(MESSAGE_PARTS) | set(DAEMON_PARTS) | set(FACE_PARTS)
