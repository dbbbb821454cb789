"""
C{mailhub make-cert}: write a self-signed TLS certificate and key.

Owns: the command line around L{mailhub.tls.make_self_signed}.  Must not
touch: configuration files or the daemon (after replacing the files of a
running daemon, send it SIGHUP).

Exit codes: 0 ok; 64 usage; 73 a file exists (without --force) or cannot
be written.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from twisted.python import usage

from mailhub.cli import Command
from mailhub.tls import make_self_signed

__all__ = ["MakeCertOptions", "run_make_cert"]

EX_OK = 0
EX_USAGE = 64
EX_CANTCREAT = 73


class MakeCertOptions(Command):
    """C{mailhub make-cert --hostname H --cert F --key F [--days N] [--force]}."""

    synopsis = "mailhub make-cert --hostname HOST --cert CERT.pem --key KEY.pem [--days N] [--force]"
    optParameters = [
        ["hostname", None, None, "host name for the certificate (CN and subjectAltName)"],
        ["cert", None, None, "certificate file to write (PEM)"],
        ["key", None, None, "private key file to write (PEM, mode 0600)"],
        ["days", None, 365, "validity in days", int],
    ]
    optFlags = [["force", None, "replace existing files"]]

    def postOptions(self) -> None:
        for name in ("hostname", "cert", "key"):
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")
        if self["days"] < 1:
            raise usage.UsageError("--days must be at least 1")


def run_make_cert(options: MakeCertOptions, stderr: TextIO | None = None) -> int:
    """Write the files; returns the exit code."""
    stderr = stderr if stderr is not None else sys.stderr
    if not options["force"]:
        for name in ("cert", "key"):
            if os.path.exists(options[name]):
                print(f"mailhub: {options[name]} exists (use --force to replace it)", file=stderr)
                return EX_CANTCREAT
    try:
        make_self_signed(options["hostname"], options["cert"], options["key"], options["days"])
    except OSError as e:
        print(f"mailhub: cannot write certificate: {e}", file=stderr)
        return EX_CANTCREAT
    print(
        f"mailhub: wrote {options['cert']} and {options['key']} for {options['hostname']}, "
        f"valid {options['days']} days",
        file=stderr,
    )
    return EX_OK
