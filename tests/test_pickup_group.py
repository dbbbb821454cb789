"""
spool.pickup_group: only members of the submission group may drop mail
into the pickup area (Postfix's postdrop model).  The permission tests run
real processes under another uid, so they need root.
"""

from __future__ import annotations

import grp
import io
import os
import shutil
import stat
import tempfile

import pytest
from twisted.internet.task import Clock

from mailhub.config import ConfigError, load_config
from mailhub.queue.pickup import PickupService
from mailhub.queue.pickupfile import GROUP_DIR_MODE, pickup_dirs, write_pickup
from mailhub.queue.spool import Spool


def _some_group() -> grp.struct_group:
    """A group that is neither root's nor nogroup, so ownership changes show."""
    return next(g for g in sorted(grp.getgrall(), key=lambda g: g.gr_gid) if g.gr_gid not in (0, os.getgid(), 65534))


def test_config_accepts_existing_group(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[spool]\npickup_group = "{_some_group().gr_name}"\n')
    assert load_config(str(cfg)).spool.pickup_group == _some_group().gr_name


def test_config_rejects_unknown_group(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('[spool]\npickup_group = "no-such-group-mailhub"\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg))
    assert str(e.value) == f"{cfg}: spool.pickup_group: no such group: 'no-such-group-mailhub'"


def test_default_is_unrestricted(tmp_path):
    assert load_config(None, data_dir=str(tmp_path)).spool.pickup_group is None


@pytest.fixture
def shared_spool():
    """A spool under a directory other uids can traverse (pytest's tmp_path is 0700)."""
    root = tempfile.mkdtemp(prefix="mailhub-pickup-")
    os.chmod(root, 0o755)
    try:
        yield Spool(os.path.join(root, "spool"), fsync=False)
    finally:
        shutil.rmtree(root)


def _start(spool: Spool, **kw) -> PickupService:
    service = PickupService(spool, lambda env: None, Clock(), 10_000_000, notifier_factory=lambda clock: None, **kw)
    service.startService()
    return service


def test_group_mode_and_owner(shared_spool):
    gid = _some_group().gr_gid
    service = _start(shared_spool, dir_mode=GROUP_DIR_MODE, gid=gid)
    try:
        for path in pickup_dirs(shared_spool.path):
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o1730
            assert st.st_gid == gid
    finally:
        service.stopService()


def _submit_as(spool_path: str, uid: int, gid: int, groups: list[int]) -> int:
    """Fork, drop to uid/gid/groups, try write_pickup; 0 = written, 13 = EACCES."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            write_pickup(spool_path, "a@localhost", ["b@localhost"], io.BytesIO(b"Subject: x\r\n\r\nhi\r\n"), fsync=False)
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")
def test_only_group_members_may_submit(shared_spool):
    nobody_uid = 65534
    member_gid = _some_group().gr_gid
    other_gid = next(g.gr_gid for g in grp.getgrall() if g.gr_gid not in (member_gid, 0, os.getgid()))
    service = _start(shared_spool, dir_mode=GROUP_DIR_MODE, gid=member_gid)
    try:
        assert _submit_as(shared_spool.path, nobody_uid, other_gid, []) == 13
        assert _submit_as(shared_spool.path, nobody_uid, other_gid, [member_gid]) == 0
        assert len(os.listdir(pickup_dirs(shared_spool.path)[1])) == 1
    finally:
        service.stopService()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")
def test_without_group_everyone_may_submit(shared_spool):
    service = _start(shared_spool)
    try:
        other_gid = next(g.gr_gid for g in grp.getgrall() if g.gr_gid != 0)
        assert _submit_as(shared_spool.path, 65534, other_gid, []) == 0
    finally:
        service.stopService()
