"""The systemd units: valid for systemd, and their ExecStart, run as systemd would run it (config
file environment, passphrase as a credential, NOTIFY_SOCKET), mounts and stops cleanly."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import (
    PASSPHRASE,
    ROOT,
    foreground_mount,
    notify_socket,
    run_pqfs,
    stop_with_sigterm,
)

UNITS = [ROOT / "systemd" / "pqfs@.service", ROOT / "systemd" / "user" / "pqfs@.service"]


def unit_value(text: str, key: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(key + "=")]
    return line.split("=", 1)[1]


@pytest.mark.parametrize("unit", UNITS, ids=["system", "user"])
def test_unit_is_valid_and_keeps_the_passphrase_off_command_lines(
    unit: Path, tmp_path: Path
) -> None:
    instance = tmp_path / "pqfs@media.service"
    # ExecStart names the installed entry point (scripts/install.sh links it); verify checks
    # that it is executable, so point it at this checkout's.
    installed = str(Path(sys.executable).with_name("pqfs"))
    instance.write_text(unit.read_text().replace("/usr/local/bin/pqfs", installed))
    user = "user" in unit.parts
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    proc = subprocess.run(
        ["systemd-analyze", "verify", *(["--user"] if user else []), str(instance)],
        capture_output=True,
        text=True,
        env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)),
    )
    assert proc.returncode == 0, proc.stderr
    text = unit.read_text()
    assert unit_value(text, "Type") == "notify"
    assert unit_value(text, "LoadCredential").startswith("passphrase:")
    exec_start = unit_value(text, "ExecStart")
    assert "mount --foreground" in exec_start
    assert "passphrase" not in exec_start.lower() and "PQFS_PASSPHRASE" not in text
    assert unit_value(text, "KillSignal") == "SIGTERM"
    assert unit_value(text, "LimitCORE") == "0"  # a core dump would hold plaintext and keys


@pytest.mark.fuse
def test_exec_start_runs_as_systemd_would(tmp_path: Path, cli_env: dict[str, str]) -> None:
    vault, mp, conf = tmp_path / "vault", tmp_path / "media", tmp_path / "media.conf"
    run_pqfs("init", str(vault), env=cli_env)
    (tmp_path / "f.txt").write_text("hello")
    run_pqfs("add", str(vault), str(tmp_path / "f.txt"), env=cli_env)
    mp.mkdir()
    conf.write_text(f"PQFS_VAULT={vault}\nPQFS_MOUNTPOINT={mp}\nPQFS_OPTIONS=--cache-size 16M\n")
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "passphrase").write_bytes(PASSPHRASE + b"\n")
    env = {k: v for k, v in cli_env.items() if k != "PQFS_PASSPHRASE"}
    for line in conf.read_text().splitlines():
        k, v = line.split("=", 1)
        env[k] = v
    env.update(CREDENTIALS_DIRECTORY=str(creds), NOTIFY_SOCKET=str(tmp_path / "notify"))
    exec_start = unit_value(UNITS[0].read_text(), "ExecStart")
    # systemd's rules: ${VAR} is one word, $VAR is split on whitespace.
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: shlex.quote(env[m.group(1)]), exec_start)
    expanded = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], expanded)
    argv = shlex.split(expanded)
    assert argv[0] == "/usr/local/bin/pqfs"
    with (
        notify_socket(tmp_path / "notify") as sock,
        foreground_mount(argv[1:], env, mp) as proc,
    ):
        assert "READY=1" in sock.recv(4096).decode().splitlines()
        assert (mp / "f.txt").read_text() == "hello"
        assert os.path.ismount(mp)
        stop_with_sigterm(proc, sock, mp)
