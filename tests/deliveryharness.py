"""
The virtual-mode local delivery set-up the delivery-process tests share
(not a test file): one domain, the directory arguments that serve it from
tmp_path/mailboxes (users alice and bob, no aliases file), a message with
a dot line, and a reader of what a user's Maildir holds.

Used by the tests of mailhub.delivery.localproc (the processes and their
pool) and mailhub.delivery.supervisor (the privileged supervisor's
checks).  Holds no assertions.
"""

from __future__ import annotations

import mailbox

__all__ = ["DOMAIN", "MESSAGE", "directory_args", "maildir_messages"]

DOMAIN = "example.test"
MESSAGE = b"From: a@client.test\r\nSubject: hello\r\n\r\nbody line\r\n.dot line\r\n"


def directory_args(tmp_path) -> dict:
    return {
        "domains": [DOMAIN],
        "mailboxes": str(tmp_path / "mailboxes"),
        "users": ["alice", "bob"],
        "aliases_path": None,
        "separator": "+",
        "mode": "virtual",
        "home_maildir": "Maildir",
        "min_uid": 1000,
        "max_uid": 60000,
    }


def maildir_messages(tmp_path, user: str) -> list[bytes]:
    path = tmp_path / "mailboxes" / DOMAIN / user
    if not path.exists():
        return []
    box = mailbox.Maildir(str(path), factory=None, create=False)
    return [box.get_bytes(k) for k in sorted(box.keys())]
