"""
syncfs(2): write back and flush one whole file system, called by ctypes
(the os module has no binding for it).

Owns: L{available} (whether this system has the call) and L{syncfs}.
Used by L{mailhub.queue.durable} when C{spool.sync = "syncfs"}, and by
the configuration check that refuses that value where the call is missing.

Must not touch: anything but the one system call.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from functools import cache

__all__ = ["available", "syncfs", "UNAVAILABLE"]

#: Why C{spool.sync = "syncfs"} is refused where the call is missing.
UNAVAILABLE = "syncfs() is not available on this system (it is a Linux system call)"


@cache
def _function() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int]
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]


def available() -> bool:
    """Whether the C library offers syncfs()."""
    return _function() is not None


def syncfs(fd: int) -> None:
    """
    Write back everything dirty on the file system that holds C{fd}, and
    wait for it (Linux 5.8 and later also report write-back errors here).

    @raise OSError: the call failed, or is not available.
    """
    call = _function()
    if call is None:
        raise OSError(UNAVAILABLE)
    if call(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
