"""``bedside keys generate`` and ``bedside keys show``: files, output, exit codes."""

from __future__ import annotations

import json
import os
import stat
import subprocess

from bedside.cli import main
from bedside.wire.signing import SigningKey, VerifyKey
from tests.conftest import bedside_exe


def test_generate_writes_a_key_pair(tmp_path, capsys):
    out = tmp_path / "keys"
    assert main(["keys", "generate", "--out", str(out), "--name", "aggregator"]) == 0
    text = capsys.readouterr().out
    key_path, pub_path = out / "aggregator.key", out / "aggregator.pub"
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    public = VerifyKey.load(pub_path)
    assert SigningKey.load(key_path).public == public
    assert public.fingerprint in text and str(key_path) in text and str(pub_path) in text


def test_generate_json_and_default_name(tmp_path, capsys):
    assert main(["keys", "generate", "--out", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "bedside"
    assert info["private_key"] == str(tmp_path / "bedside.key")
    public = VerifyKey.load(info["public_key"])
    assert info["fingerprint"] == public.fingerprint
    assert info["public_key_text"] == public.to_text()


def test_generate_refuses_to_overwrite_without_force(tmp_path, capsys):
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "dev", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["fingerprint"]
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "dev"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "Traceback" not in err
    assert VerifyKey.load(tmp_path / "dev.pub").fingerprint == first
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "dev", "--force",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"] != first


def test_generate_bad_name_is_bad_input(tmp_path, capsys):
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "../evil"]) == 2
    assert "key name" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_show_private_and_public(tmp_path, capsys):
    key = SigningKey.generate()
    key.save(tmp_path / "k.key")
    key.public.save(tmp_path / "k.pub")
    assert main(["keys", "show", str(tmp_path / "k.key"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "private" and info["fingerprint"] == key.public.fingerprint
    assert info["public_key_text"] == key.public.to_text()
    assert main(["keys", "show", str(tmp_path / "k.pub")]) == 0
    text = capsys.readouterr().out
    assert "public key" in text and key.public.to_text() in text
    assert key.public.fingerprint in text


def test_show_refuses_an_unsafe_private_key(tmp_path, capsys):
    path = SigningKey.generate().save(tmp_path / "k.key")
    os.chmod(path, 0o644)
    assert main(["keys", "show", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"chmod 600 {path}" in err and "Traceback" not in err


def test_show_missing_and_junk(tmp_path, capsys):
    assert main(["keys", "show", str(tmp_path / "nope.pub")]) == 1
    assert "no such key file" in capsys.readouterr().err
    (tmp_path / "junk.pub").write_text("hello")
    assert main(["keys", "show", str(tmp_path / "junk.pub")]) == 1
    assert "not a Bedside public key" in capsys.readouterr().err


def test_keys_without_action_prints_usage(capsys):
    assert main(["keys"]) == 2
    assert "generate" in capsys.readouterr().out


def test_console_script(tmp_path, clean_env):
    r = subprocess.run([bedside_exe(), "keys", "generate", "--out", str(tmp_path), "--name",
                        "clinic-1", "--json"], capture_output=True, text=True, env=clean_env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert stat.S_IMODE(os.stat(info["private_key"]).st_mode) == 0o600
    r = subprocess.run([bedside_exe(), "keys", "show", info["private_key"], "--json"],
                       capture_output=True, text=True, env=clean_env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["fingerprint"] == info["fingerprint"]
