"""The [[milter]] tables of the configuration: read in order, checked key by key, shown by check-config."""

from __future__ import annotations

import pytest

from mailhub.config import ConfigError, format_config, load_config
from mailhub.configschema import MilterConfig


def load(tmp_path, text: str):
    path = tmp_path / "mailhub.toml"
    path.write_text(text)
    return load_config(str(path), data_dir=str(tmp_path / "data"))


def test_milter_tables_in_order_with_their_defaults(tmp_path) -> None:
    config = load(tmp_path, """
[[milter]]
socket = "unix:/run/opendkim/opendkim.sock"
listeners = ["submission"]

[[milter]]
socket = "inet:127.0.0.1:11332"
default_action = "accept"
content_timeout = "2m"
""")
    assert config.milters == (
        MilterConfig(socket="unix:/run/opendkim/opendkim.sock", listeners=("submission",)),
        MilterConfig(socket="inet:127.0.0.1:11332", default_action="accept", content_timeout=120.0),
    )
    assert config.milters[0].default_action == "tempfail" and config.milters[0].command_timeout == 30.0
    shown = format_config(config)
    assert '[[milter]]\nsocket = "inet:127.0.0.1:11332"\ndefault_action = "accept"' in shown
    assert load(tmp_path, "").milters == ()


@pytest.mark.parametrize("text, error", [
    ('[[milter]]\nsocket = "tcp:1.2.3.4:5"', 'milter[1].socket: must be "unix:/path" or "inet:host:port"'),
    ('[[milter]]\nsocket = "unix:relative.sock"', "milter[1].socket: unix: needs an absolute path"),
    ('[[milter]]\nsocket = "inet:127.0.0.1:99999"', "milter[1].socket: must be inet:host:port"),
    ('[[milter]]\nsocket = "inet:127.0.0.1:1"\ndefault_action = "discard"', "milter[1].default_action: must be one of"),
    ('[[milter]]\nsocket = "inet:127.0.0.1:1"\nlisteners = ["http"]', "milter[1].listeners: unknown listener"),
    ('[[milter]]\nsocket = "inet:127.0.0.1:1"\nsokcet = 1', "milter[1].sokcet: unknown key"),
    ("[[milter]]\ndefault_action = \"accept\"", "milter[1]: socket is required"),
    ('[milter]\nsocket = "inet:127.0.0.1:1"', "milter: must be tables ([[milter]])"),
])
def test_bad_milter_tables_are_one_line_errors(tmp_path, text: str, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert error in str(e.value) and "\n" not in str(e.value)


def test_changed_milters_need_a_restart(tmp_path) -> None:
    import dataclasses

    from mailhub.daemon.reload import changed_keys, needs_restart

    old = load(tmp_path, "")
    new = dataclasses.replace(old, milters=(MilterConfig(socket="inet:127.0.0.1:8891"),))
    assert changed_keys(old, new) == ["milter"]
    assert needs_restart("milter", old, new)
