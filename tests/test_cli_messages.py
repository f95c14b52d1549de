"""What `pqfs` prints for an error with a known fix, as a transcript of stderr (the rules at the
top of pqfs/cli/main.py): the error line, then one `pqfs: hint:` line with the fix."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pqfs.vault.catalog import put_op
from pqfs.vault.vault import Vault
from tests.conftest import daemon_pid, mounted, run_pqfs, wait_gone


@pytest.mark.fuse
def test_a_stale_mount_is_an_error_with_the_fix_as_a_hint(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    (tmp_path / "f").write_bytes(b"x")
    pq_vault.commit([put_op(pq_vault.add_file(str(tmp_path / "f"), "f"))])
    mp = tmp_path / "mnt"
    with mounted(pq_vault.storage.describe(), mp, cli_env):
        pid = daemon_pid(mp)
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        for argv in (["stats", str(mp)], ["lock", str(mp)]):
            proc = run_pqfs(*argv, env=cli_env, input=b"", check=False)
            assert (proc.returncode, proc.stderr.decode()) == (
                1,
                f"pqfs: error: {mp}: the mount is stale (its daemon died)\n"
                f"pqfs: hint: run: pqfs umount {mp}\n",
            ), argv
        # and the hint's fix works: the stale mount is cleared
        assert b"cleared stale mount" in run_pqfs("umount", str(mp), env=cli_env).stderr
