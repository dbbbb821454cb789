"""
The checks of the local delivery processes (mailhub.delivery.supervisor): the
request schema, the queue file a root process may read, and the
supervisor program over real pipes -- malformed JSON, wrong types,
unknown keys, path traversal, unknown or out-of-range accounts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from deliveryharness import DOMAIN, MESSAGE, directory_args, maildir_messages
from peers import wait_for

from mailhub.delivery import localproc
from mailhub.delivery import supervisor as localsuper
from mailhub.delivery.supervisor import BadRequest, check_request
from mailhub.envelope import Envelope, Recipient
from mailhub.queue.queuefile import queue_file_bytes

QID = "15NXAAAAAAAAAAAAA"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(localproc.__file__)))


def good(spool: str = "/var/spool/mailhub", **changes) -> dict:
    request = {
        "id": 3, "queue_id": QID, "arrival": 1700000000.25, "sender": "a@client.test",
        "addresses": [f"alice@{DOMAIN}"], "message_path": os.path.join(spool, "queue", QID), "crlf": True,
    }
    request.update(changes)
    return {k: v for k, v in request.items() if v is not ...}


def test_a_well_formed_request_passes():
    assert check_request(good(), "/var/spool/mailhub")["addresses"] == [f"alice@{DOMAIN}"]
    assert check_request(good(crlf=...))["crlf"] is False  # crlf is optional


@pytest.mark.parametrize("changes, why", [
    ({"id": True}, "no valid id"),
    ({"id": "3"}, "no valid id"),
    ({"id": -1}, "no valid id"),
    ({"headers": "x"}, "unknown keys"),
    ({"sender": ...}, "missing keys"),
    ({"queue_id": "../../etc/passwd"}, "queue_id is not a queue id"),
    ({"queue_id": 5}, "queue_id is not a queue id"),
    ({"arrival": "yesterday"}, "arrival is not a time"),
    ({"arrival": float("nan")}, "arrival is not a time"),
    ({"arrival": False}, "arrival is not a time"),
    ({"sender": 5}, "sender is not a string"),
    ({"sender": "a@b\r\nX-Injected: 1"}, "sender contains NUL, CR or LF"),
    ({"sender": "a" * 2000 + "@b"}, "sender is longer than 1024"),
    ({"addresses": f"alice@{DOMAIN}"}, "addresses is not a non-empty list"),
    ({"addresses": []}, "addresses is not a non-empty list"),
    ({"addresses": [5]}, "an address is not a string"),
    ({"addresses": ["alice\x00@example.test"]}, "an address contains NUL"),
    ({"addresses": ["alice"]}, "an address has no domain"),
    ({"message_path": "/var/spool/mailhub/queue/../../../etc/shadow"}, "message_path is not the queue file"),
    ({"message_path": "/etc/shadow"}, "message_path is not the queue file"),
    ({"message_path": "queue/" + QID}, "message_path is not absolute"),
    ({"crlf": "yes"}, "crlf is not a boolean"),
])
def test_anything_else_is_refused(changes, why):
    with pytest.raises(BadRequest) as e:
        check_request(good(**changes), "/var/spool/mailhub")
    assert why in str(e.value)
    assert e.value.id == (None if why == "no valid id" else 3)


def test_not_an_object_is_refused():
    for data in ([1, 2], "x", None, 5):
        with pytest.raises(BadRequest, match="not a JSON object"):
            check_request(data)


# -- a root delivery process's queue file --------------------------------------------------


def spool_with_message(tmp_path) -> str:
    spool = tmp_path / "spool"
    (spool / "queue").mkdir(parents=True)
    trailer = Envelope(QID, "a@client.test", [Recipient(f"alice@{DOMAIN}")], arrival=1700000000.25)
    (spool / "queue" / QID).write_bytes(queue_file_bytes(MESSAGE, trailer))
    return str(spool)


def test_open_queued_refuses_links_and_foreign_files(tmp_path):
    spool = spool_with_message(tmp_path)
    path = os.path.join(spool, "queue", QID)
    os.close(localsuper.open_queued(spool, os.geteuid(), QID))
    with pytest.raises(PermissionError):
        localsuper.open_queued(spool, os.geteuid() + 1, QID)  # not the spool user's file
    os.link(path, str(tmp_path / "second-link"))
    with pytest.raises(PermissionError):
        localsuper.open_queued(spool, os.geteuid(), QID)  # a hard link
    os.unlink(str(tmp_path / "second-link"))
    os.rename(path, str(tmp_path / "elsewhere"))
    os.symlink(str(tmp_path / "elsewhere"), path)
    with pytest.raises(OSError):
        localsuper.open_queued(spool, os.geteuid(), QID)  # never followed


# -- the processes, over real pipes ----------------------------------------------------------


def settings(tmp_path, spool: str, mode: str = "virtual") -> dict:
    s = localproc.settings_for(dict(directory_args(tmp_path), mode=mode, users=None if mode == "system" else ["alice"]),
                               "mx.example.test", False)
    s["spool"] = {"path": spool, "uid": os.geteuid()}
    return s


def worker(tmp_path, spool: str, mode: str = "virtual") -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", localproc._CHILD_MAIN, ROOT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path),
    )
    proc.stdin.write(json.dumps(settings(tmp_path, spool, mode)).encode() + b"\n")
    proc.stdin.flush()
    return proc


def ask(proc, line: bytes) -> dict:
    proc.stdin.write(line + b"\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def test_a_root_delivery_process_refuses_what_is_not_a_delivery_of_a_queued_message(tmp_path):
    spool = spool_with_message(tmp_path)
    proc = worker(tmp_path, spool)
    try:
        traversal = good(spool, message_path=os.path.join(spool, "queue", "..", "..", "mailboxes"))
        assert ask(proc, json.dumps(traversal).encode()) == {
            "id": 3, "refused": "message_path is not the queue file of queue_id"}
        assert ask(proc, json.dumps(good(spool, addresses=[1])).encode())["refused"] == "an address is not a string"
        [outcome] = ask(proc, json.dumps(good(spool)).encode())["outcomes"]
        assert (outcome["kind"], outcome["code"]) == ("delivered", 250)
        assert len(maildir_messages(tmp_path, "alice")) == 1
        # a line that is not JSON (no id to answer): the process ends
        proc.stdin.write(b"{not json\n")
        proc.stdin.flush()
        assert proc.wait(20) == 65
        assert b"refused a request: not JSON" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_root_delivery_process_refuses_a_symlinked_queue_file(tmp_path):
    spool = spool_with_message(tmp_path)
    path = os.path.join(spool, "queue", QID)
    os.rename(path, str(tmp_path / "secret"))
    os.symlink(str(tmp_path / "secret"), path)
    proc = worker(tmp_path, spool)
    try:
        [outcome] = ask(proc, json.dumps(good(spool)).encode())["outcomes"]
        assert (outcome["kind"], outcome["code"]) == ("temporary", 451)
        assert maildir_messages(tmp_path, "alice") == []
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("local, status", [
    ("no-such-account-here", "5.1.1"),  # unknown
    ("daemon", "5.1.1"),  # a system account: uid below min_uid
    ("nobody", "5.1.1"),  # above max_uid
    ("../../etc", "5.1.3"),  # not a safe account name
])
def test_system_mode_delivers_only_to_existing_accounts_in_range(tmp_path, local, status):
    spool = spool_with_message(tmp_path)
    proc = worker(tmp_path, spool, mode="system")
    try:
        [outcome] = ask(proc, json.dumps(good(spool, addresses=[f"{local}@{DOMAIN}"])).encode())["outcomes"]
        assert (outcome["kind"], outcome["status"]) == ("permanent", status), outcome
    finally:
        proc.kill()
        proc.wait()


def test_the_supervisor_refuses_bad_requests_and_keeps_serving(tmp_path):
    spool = spool_with_message(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", localsuper._SUPERVISOR_MAIN, ROOT, json.dumps(settings(tmp_path, spool)), "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path),
    )
    try:
        proc.stdin.write(b"{not json\n[1, 2]\n")  # no id: logged, nothing answered
        assert ask(proc, json.dumps(good(spool, id=5, queue_id="../x")).encode()) == {
            "id": 5, "refused": "queue_id is not a queue id"}
        [outcome] = ask(proc, json.dumps(good(spool, id=6)).encode())["outcomes"]
        assert outcome["kind"] == "delivered"
        proc.stdin.close()  # the daemon ended: the supervisor and its processes end
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert b"refused a request: not JSON" in err and b"refused a request: not a JSON object" in err
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: maildir_messages(tmp_path, "alice") or None, 5, "the delivered message")
