"""
C{mailhub user add|passwd|del|list|token}: manage the SMTP AUTH users file.

Owns: the command line of user management, password prompting and the
exit codes (sysexits.h).  The file itself is edited by
L{mailhub.users.UsersFile} (atomic rewrite, mode 0600), which a running
daemon re-reads by itself within a second: no reload needed.

Must not touch: configuration files (cli/main.py finds C{auth.users} and
passes it to L{run_user}), the daemon.

Exit codes: 0 ok; 64 usage (no terminal to prompt on, no users file);
65 invalid address, bad/empty/mismatched password, user already exists;
67 unknown user (passwd, del); 73 the file cannot be written.
"""

from __future__ import annotations

import getpass as _getpass
import sys
from collections.abc import Callable
from typing import TextIO

from twisted.python import usage

from mailhub.cli import Command
from mailhub.users import UnknownUser, UserExists, UsersFile, UsersFileError, check_password_acceptable, normalize_user

__all__ = ["UserOptions", "run_user", "EX_OK", "EX_USAGE", "EX_DATAERR", "EX_NOUSER", "EX_CANTCREAT"]

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_CANTCREAT = 73


class _AddressOptions(Command):
    def parseOptions(self, options: list[str] | None = None) -> None:
        # usage.Options stops at the first argument (POSIX getopt); allow
        # "add ADDRESS --password-stdin" as well by moving options first.
        args = list(sys.argv[1:] if options is None else options)
        if "--" in args:
            cut = args.index("--")
            head, tail = args[:cut], args[cut:]
        else:
            head, tail = args, []
        flags = [a for a in head if a.startswith("-") and a != "-"]
        rest = [a for a in head if not (a.startswith("-") and a != "-")]
        super().parseOptions(flags + rest + tail)

    def parseArgs(self, address: str) -> None:  # type: ignore[override]
        self["address"] = address


class _PasswordOptions(_AddressOptions):
    optFlags = [["password-stdin", None, "read the password from the first line of standard input"]]


class AddOptions(_PasswordOptions):
    synopsis = "mailhub user add ADDRESS [--password-stdin]"


class PasswdOptions(_PasswordOptions):
    synopsis = "mailhub user passwd ADDRESS [--password-stdin]"


class DelOptions(_AddressOptions):
    synopsis = "mailhub user del ADDRESS"


class ListOptions(Command):
    synopsis = "mailhub user list"


class TokenOptions(_AddressOptions):
    synopsis = "mailhub user token ADDRESS"


class UserOptions(Command):
    """C{mailhub user}: the subcommand's options; run with L{run_user}."""

    synopsis = "mailhub user [--file USERS] add|passwd|del|list ..."
    optParameters = [
        ["file", "f", None, "users file (default: auth.users from the configuration)"],
    ]
    subCommands = [
        ["add", None, AddOptions, "add a user (password prompted twice, or --password-stdin)"],
        ["passwd", None, PasswdOptions, "change a user's password"],
        ["del", None, DelOptions, "delete a user"],
        ["list", None, ListOptions, "list user addresses"],
        ["token", None, TokenOptions, "create an HTTP API token for a user and print it (shown once)"],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a subcommand: add, passwd, del, list or token")


def _read_password(
    options: usage.Options,
    stdin: TextIO,
    stderr: TextIO,
    getpass: Callable[[str], str],
    is_tty: bool,
) -> str:
    """The new password, from stdin or prompted twice; raises ValueError."""
    if options["password-stdin"]:
        line = stdin.readline()
        if line.endswith("\n"):
            line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
        return line
    if not is_tty:
        raise _UsageError("no terminal to prompt for a password; use --password-stdin")
    first = getpass("New password: ")
    second = getpass("Retype new password: ")
    if first != second:
        raise ValueError("passwords do not match")
    return first


class _UsageError(Exception):
    pass


def run_user(
    options: UserOptions,
    users_path: str | None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    getpass: Callable[[str], str] = _getpass.getpass,
    is_tty: bool | None = None,
) -> int:
    """
    Run a parsed C{mailhub user} command against C{users_path} (or the
    C{--file} option, which wins).  Returns the exit code; messages go to
    C{stderr} as C{mailhub: ...}.
    """
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    if is_tty is None:
        is_tty = stdin.isatty()

    def fail(code: int, message: str) -> int:
        print(f"mailhub: {message}", file=stderr)
        return code

    path = options["file"] or users_path
    if not path:
        return fail(EX_USAGE, "no users file: set auth.users in the configuration or use --file")
    users = UsersFile(path)
    command = options.subCommand
    sub = options.subOptions

    if command == "list":
        for address in users.addresses():
            print(address, file=stdout)
        return EX_OK

    address = sub["address"]
    try:
        key = normalize_user(address)
    except ValueError as e:
        return fail(EX_DATAERR, f"invalid address: {address}: {e}")

    try:
        if command == "del":
            users.remove(key)
            print(f"mailhub: deleted user {key}", file=stderr)
            return EX_OK
        if command == "token":
            if key not in users:
                return fail(EX_NOUSER, f"no such user: {key}")
            print(users.add_token(key), file=stdout)
            print(f"mailhub: created an API token for {key}; it is shown only once", file=stderr)
            return EX_OK
        if command == "passwd" and key not in users:
            # Say so before asking for a password that would be thrown away.
            return fail(EX_NOUSER, f"no such user: {key}")
        if command == "add" and key in users:
            return fail(EX_DATAERR, f"user exists: {key} (use 'mailhub user passwd')")
        try:
            password = _read_password(sub, stdin, stderr, getpass, is_tty)
            check_password_acceptable(password)
        except _UsageError as e:
            return fail(EX_USAGE, str(e))
        except ValueError as e:
            return fail(EX_DATAERR, str(e))
        if command == "add":
            users.add(key, password)
            print(f"mailhub: added user {key}", file=stderr)
        else:
            users.set_password(key, password)
            print(f"mailhub: changed password of {key}", file=stderr)
        return EX_OK
    except UnknownUser:
        return fail(EX_NOUSER, f"no such user: {key}")
    except UserExists:
        return fail(EX_DATAERR, f"user exists: {key} (use 'mailhub user passwd')")
    except UsersFileError as e:
        return fail(EX_CANTCREAT, str(e))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (C{python -m mailhub.cli.user --file F ...})."""
    options = UserOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"mailhub: {e}", file=sys.stderr)
        print(options, file=sys.stderr)
        return EX_USAGE
    return run_user(options, None)


if __name__ == "__main__":
    sys.exit(main())
