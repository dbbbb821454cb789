"""
mailhub dkim keygen/check and check-config on the keys directory (in
memory and as the console script); the end-to-end check of published
records is tests/test_e2e_dkim.py.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

from mailhub.auth.keys import ED25519, RSA, KeyStore
from mailhub.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MAILHUB_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "mailhub.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=30)


def conf(tmp_path, extra: str = "") -> str:
    path = tmp_path / "mailhub.toml"
    path.write_text(f'[spool]\npath = "spool"\n[local]\nmailboxes = "mb"\n[dkim]\nkeys = "dkim"\n{extra}')
    return str(path)


def test_keygen_rsa_and_ed25519_print_the_record_and_the_lines(tmp_path):
    c = conf(tmp_path)
    for kind in (RSA, ED25519):
        out, err = io.StringIO(), io.StringIO()
        assert main(["--config", c, "dkim", "keygen", "example.org", "-t", kind, "-s", kind], out, err) == 0, err.getvalue()
        text = out.getvalue()
        assert f"{kind}._domainkey.example.org. IN TXT " in text
        assert f'[dkim]\nkeys = "{tmp_path / "dkim"}"\n' in text
    keys = {k.selector: k for k in KeyStore(str(tmp_path / "dkim")).keys_for("example.org")}
    assert sorted(keys) == [ED25519, RSA]
    assert os.stat(keys[RSA].path).st_mode & 0o777 == 0o600


def test_keygen_usage_errors_are_one_line_and_64(tmp_path):
    c = conf(tmp_path)
    for args in (["keygen", "not a domain"], ["keygen", "example.org", "-t", "dsa"],
                 ["keygen", "example.org", "-s", "bad_selector!"], ["keygen"], ["frobnicate"]):
        out, err = io.StringIO(), io.StringIO()
        assert main(["--config", c, "dkim", *args], out, err) == 64, args
        assert err.getvalue().splitlines()[-1].startswith("mailhub: "), args
        assert "Traceback" not in err.getvalue()


def test_keygen_without_a_keys_directory_says_so(tmp_path):
    path = tmp_path / "mailhub.toml"
    path.write_text('[spool]\npath = "spool"\n')
    err = io.StringIO()
    assert main(["--config", str(path), "dkim", "keygen", "example.org"], io.StringIO(), err) == 78
    assert err.getvalue() == "mailhub: no keys directory: give --keys DIR or set dkim.keys\n"


def test_check_config_names_a_missing_keys_directory_and_a_bad_key(tmp_path):
    c = conf(tmp_path)
    r = run(["--config", c, "check-config"], tmp_path)
    assert r.returncode == 78
    assert f"dkim.keys: no such directory {tmp_path / 'dkim'}" in r.stderr
    os.makedirs(tmp_path / "dkim" / "example.org")
    (tmp_path / "dkim" / "example.org" / "s1.key").write_text("garbage\n")
    r = run(["--config", c, "check-config"], tmp_path)
    assert r.returncode == 78
    assert r.stderr == (f"mailhub: {c}: dkim.keys: {tmp_path / 'dkim' / 'example.org' / 's1.key'}: not an unencrypted "
                        "PEM private key (mail from example.org is deferred until it is fixed)\n")
    (tmp_path / "dkim" / "example.org" / "s1.key").unlink()
    assert run(["--config", c, "check-config"], tmp_path).returncode == 0
