"""The layers of pqfs/ are imported one way only (import-linter's contracts in pyproject.toml,
also run by ./test.sh): the tree as it is keeps them, and an upward import breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LINT = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(package_parent))
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_tree_keeps_its_layers(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "pqfs", tmp_path / "pqfs")
    proc = _lint(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BROKEN" not in proc.stdout


def test_an_upward_import_breaks_them(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "pqfs", tmp_path / "pqfs")
    header = tmp_path / "pqfs" / "format" / "header.py"
    header.write_text(header.read_text() + "\nfrom pqfs.mount import vfs  # noqa\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "pqfs.format.header -> pqfs.mount.vfs" in proc.stdout
