"""
Helpers for the configuration tests: write a configuration file, and the
one-line error that loading it gives.
"""

from __future__ import annotations

import pytest

from mailhub.config import ConfigError, load_config


def write(tmp_path, text: str, name: str = "mailhub.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(*args, **kwargs)
    return str(e.value)
