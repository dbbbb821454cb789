"""mailhub.daemon.components: what the daemon builds at start and at a reload says what check-config says."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogLevel

from mailhub.config import load_config
from mailhub.daemon.components import build_components
from mailhub.daemon.reload import Live


def test_a_missing_users_file_is_logged_with_check_configs_line(tmp_path, events):
    users = tmp_path / "users"
    config = load_config(None, {"local.domains": ["example.test"], "auth.users": str(users)}, str(tmp_path))
    live = Live(config)
    components = build_components(config, Clock(), live)
    assert components["users"] is not None  # the daemon starts; 'mailhub user add' may create the file later
    errors = [e for e in events if e.get("log_level") == LogLevel.error and "problem" in e]
    assert [e["problem"] for e in errors] == [
        f"embedded defaults: auth.users: no such file {users} (nobody can log in until 'mailhub user add' creates it)"
    ]
