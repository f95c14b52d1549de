"""The random exerciser (tests/fsx.py) against real mounts: a seeded run with remounts on a
local vault and on SeaweedFS, and a Hypothesis state machine that shrinks a failing sequence.

Sizes: the default runs are short (CI's budget); PQFS_FSX_OPS sets the seeded runs' length
(the slow tier's acceptance run is 100,000: `PQFS_FSX_OPS=100000 pytest tests/test_fsx.py`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from tests.conftest import examples, mount_stats, mounted, run_pqfs
from tests.fsx import Exerciser, run_seeded

pytestmark = pytest.mark.fuse

OPS = int(os.environ.get("PQFS_FSX_OPS", "600"))
ARGS = ("--commit-delay", "0.3")


class Remounter:
    """A mount that the exerciser can take down and bring back (the commits happen then)."""

    def __init__(self, vault: str, mp: Path, env: dict[str, str]) -> None:
        self.vault, self.mp, self.env = vault, mp, env
        self.stack = ExitStack()
        self.remounts = 0

    def __enter__(self) -> Remounter:
        self.stack.enter_context(mounted(self.vault, self.mp, self.env, *ARGS))
        return self

    def remount(self) -> None:
        self.stack.close()
        self.stack = ExitStack()
        self.stack.enter_context(mounted(self.vault, self.mp, self.env, *ARGS))
        self.remounts += 1

    def __exit__(self, *exc: object) -> None:
        self.stack.close()


def _exercise(vault: str, tmp_path: Path, env: dict[str, str], seed: int) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    with Remounter(vault, tmp_path / "mnt", env) as m:
        ex = Exerciser(m.mp, ref, random.Random(seed))
        ex.on_remount = m.remount
        run_seeded(ex, OPS, remount_every=max(100, OPS // 4))
        assert m.remounts >= 1
        stats = mount_stats(m.mp, env)
        assert stats["commit_failures"] == 0
    assert b"every chunk authentic" in run_pqfs("verify", vault, env=env).stdout


@pytest.mark.parametrize("seed", [1, 2])
def test_seeded_exerciser_local(seed: int, tmp_path: Path, cli_env: dict[str, str]) -> None:
    vault = tmp_path / "vault"
    run_pqfs("init", str(vault), env=cli_env)
    _exercise(str(vault), tmp_path, cli_env, seed)


def test_seeded_exerciser_s3(
    s3_bucket: str, seaweed: Any, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    env = {**cli_env, **seaweed.env()}
    loc = f"s3://{s3_bucket}/vault"
    run_pqfs("init", loc, env=env)
    _exercise(loc, tmp_path, env, 3)


# ------------------------------------------------------------------ Hypothesis ----


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """One mount for every Hypothesis example (each works in a fresh directory of its own):
    (mount's work root, reference root)."""
    from tests.conftest import PASSPHRASE

    base = tmp_path_factory.mktemp("fsxh")
    env = dict(os.environ)
    env["PQFS_PASSPHRASE"] = PASSPHRASE.decode()
    env["PQFS_SCRYPT_LOG_N"] = "10"
    env["PQFS_STATE_DIR"] = str(base / "state")
    vault = base / "vault"
    run_pqfs("init", str(vault), env=env)
    with mounted(vault, base / "mnt", env, *ARGS) as mp:
        yield mp, base / "ref"


class FsMachine(RuleBasedStateMachine):
    """Rules are the exerciser's ops, each drawing its choices from Hypothesis (so that a
    failure shrinks to the fewest, smallest ops)."""

    roots: tuple[Path, Path] | None = None
    counter = 0

    @initialize(seed=st.integers(0, 2**32 - 1))
    def start(self, seed: int) -> None:
        assert self.roots is not None
        FsMachine.counter += 1
        name = f"ex{FsMachine.counter}"
        mnt, ref = self.roots[0] / name, self.roots[1] / name
        os.makedirs(mnt)
        os.makedirs(ref)
        self.ex = Exerciser(mnt, ref, random.Random(seed))

    @rule()
    def open(self) -> None:
        self.ex.open()

    @rule()
    def write(self) -> None:
        self.ex.write()

    @rule()
    def read(self) -> None:
        self.ex.read()

    @rule()
    def truncate(self) -> None:
        self.ex.truncate()

    @rule()
    def fsync(self) -> None:
        self.ex.fsync()

    @rule()
    def close(self) -> None:
        self.ex.close()

    @rule()
    def rename(self) -> None:
        self.ex.rename()

    @rule()
    def unlink(self) -> None:
        self.ex.unlink()

    @rule()
    def mkdir(self) -> None:
        self.ex.mkdir()

    @rule()
    def rmdir(self) -> None:
        self.ex.rmdir()

    def teardown(self) -> None:
        if hasattr(self, "ex"):
            self.ex.compare_tree()
            self.ex.close_all()


def test_state_machine(shared_mount: tuple[Path, Path]) -> None:
    FsMachine.roots = shared_mount
    shared_mount[1].mkdir(exist_ok=True)
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        FsMachine,
        settings=settings(
            max_examples=examples(8),
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        ),
    )
