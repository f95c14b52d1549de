"""The `pqfs` command line, run as a real subprocess (`python -m pqfs`).

Vaults are mostly created through the API (fast, low scrypt cost) and then driven through the
CLI; every user error must be one line on stderr, a non-zero exit, no traceback, and no change
on disk. `--help` of every subcommand is checked in-process (same parser, no subprocess cost).
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
from pathlib import Path

import pytest

from pqfs.cli.main import build_parser, main
from pqfs.format.agefile import AgeReader
from pqfs.format.keys import HybridIdentity, X25519Identity, parse_identity_file
from pqfs.format.stream import CHUNK, CT_CHUNK, NONCE_SIZE
from pqfs.storage.local import FileSource
from pqfs.vault.catalog import put_op
from pqfs.vault.objects import object_key
from pqfs.vault.vault import Vault
from tests.conftest import PASSPHRASE, run_pqfs, tree_snapshot

SUBCOMMANDS = [
    "add",
    "cat",
    "gc",
    "get",
    "identity",
    "import",
    "info",
    "init",
    "keygen",
    "lock",
    "ls",
    "mount",
    "passwd",
    "rekey",
    "rm",
    "share",
    "stats",
    "sync",
    "trust",
    "umount",
    "unlock",
    "unshare",
    "upgrade",
    "verify",
    "writer",
]


# ----------------------------------------------------------------------------- helpers ----


def pqfs(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """A successful run. stdin is an empty pipe, never a terminal: nothing may prompt."""
    return run_pqfs(*map(str, args), env=env, input=b"")


def failing(
    *args: str | Path, env: dict[str, str], usage: bool = False
) -> tuple[str, subprocess.CompletedProcess[bytes]]:
    """Run a command that must fail as a user error: non-zero exit (1, or 2 for a usage error),
    exactly one line on stderr, no traceback. Returns that line and the process."""
    proc = run_pqfs(*map(str, args), env=env, input=b"", check=False)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, f"pqfs {args} succeeded: {err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    if usage:
        assert "error:" in lines[0], err
        assert proc.returncode == 2, err
    else:
        assert lines[0].startswith("pqfs: error:"), err
        assert proc.returncode == 1, err
    return lines[0], proc


def user_error(*args: str | Path, env: dict[str, str], usage: bool = False) -> str:
    return failing(*args, env=env, usage=usage)[0]


def root_of(v: Vault) -> Path:
    return Path(v.storage.root)  # type: ignore[attr-defined]


def no_pass(env: dict[str, str]) -> dict[str, str]:
    e = dict(env)
    e.pop("PQFS_PASSPHRASE", None)
    e.pop("PQFS_NEW_PASSPHRASE", None)
    return e


def add_api(v: Vault, tmp_path: Path, dest: str, data: bytes) -> Path:
    src = tmp_path / f"src-{os.urandom(4).hex()}"
    src.write_bytes(data)
    e = v.add_file(str(src), dest)
    v.commit([put_op(e)])
    return root_of(v) / object_key(e.object)


def objects(root: Path) -> list[Path]:
    return sorted((root / "objects").rglob("*.age"))


# ---------------------------------------------------------------------- happy paths ----


def test_init_and_info(tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = tmp_path / "v"
    proc = pqfs("init", root, env=cli_env)
    err = proc.stderr.decode()
    assert "created vault" in err
    assert err.count("recipient: age1pq1") == 1
    vault_id = err.split("vault id: ")[1].split()[0]
    assert (root / "pqfs.json").is_file()
    assert (root / "identity.age").read_bytes().startswith(b"age-encryption.org/v1\n-> scrypt ")
    assert len(list((root / "catalog").glob("*.snap.age"))) == 1

    out = pqfs("info", root, env=cli_env).stdout.decode()
    assert "format: pqfs-vault v2" in out
    assert "signed: True" in out
    assert f"vault_id: {vault_id}" in out
    assert "post_quantum: True" in out
    assert "files: 0" in out
    assert "objects: 0" in out

    before = tree_snapshot(root)
    assert "already" in user_error("init", root, env=cli_env)
    assert tree_snapshot(root) == before


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    src = tmp_path / "src"
    files = {
        "top.txt": b"hello\n",
        "sub/big.bin": os.urandom(2 * CHUNK + 5),
        "sub/zero": b"",
        "sub/deeper/leaf.txt": b"leaf\n",
    }
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (src / "empty").mkdir()
    os.chmod(src / "sub/big.bin", 0o640)
    os.chmod(src / "sub/zero", 0o600)
    os.chmod(src / "sub/deeper", 0o750)
    return src, files


def test_add_tree_ls_cat_get_verify_rm(
    pq_vault: Vault, tree: tuple[Path, dict[str, bytes]], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = root_of(pq_vault)
    src, files = tree
    big = files["sub/big.bin"]

    err = pqfs("add", root, src, env=cli_env).stderr.decode()
    assert "added 4 file(s)" in err
    assert len(objects(root)) == 4

    assert pqfs("ls", root, env=cli_env).stdout == b"src/\n"
    assert pqfs("ls", "-R", root, env=cli_env).stdout.decode().splitlines() == [
        "src/",
        "src/empty/",
        "src/sub/",
        "src/sub/big.bin",
        "src/sub/deeper/",
        "src/sub/deeper/leaf.txt",
        "src/sub/zero",
        "src/top.txt",
    ]
    assert pqfs("ls", root, "src/sub", env=cli_env).stdout.decode().splitlines() == [
        "big.bin",
        "deeper/",
        "zero",
    ]
    listing = pqfs("ls", "-l", root, "src/sub", env=cli_env).stdout.decode()
    long = [ln.split() for ln in listing.splitlines()]
    assert [(f[0], f[1], f[-1]) for f in long] == [
        ("-rw-r-----", str(len(big)), "big.bin"),
        ("drwxr-x---", "0", "deeper/"),
        ("-rw-------", "0", "zero"),
    ], listing

    assert pqfs("cat", root, "src/sub/big.bin", env=cli_env).stdout == big

    out = tmp_path / "out.bin"
    pqfs("get", root, "src/sub/big.bin", out, env=cli_env)
    assert out.read_bytes() == big
    st = out.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == (src / "sub/big.bin").stat().st_mtime_ns

    out.write_bytes(b"precious")
    before = tree_snapshot(root)
    assert "--force" in user_error("get", root, "src/sub/big.bin", out, env=cli_env)
    assert out.read_bytes() == b"precious"
    assert tree_snapshot(root) == before
    pqfs("get", "--force", root, "src/sub/big.bin", out, env=cli_env)
    assert out.read_bytes() == big
    assert not list(tmp_path.glob("out.bin.pqfs-partial-*"))

    v = pqfs("verify", root, env=cli_env).stdout.decode()
    assert "verified 4 file(s)" in v

    assert "removed 1 file(s)" in pqfs("rm", root, "src/top.txt", env=cli_env).stderr.decode()
    assert len(objects(root)) == 3
    before = tree_snapshot(root)
    assert "-r" in user_error("rm", root, "src/sub", env=cli_env)
    assert tree_snapshot(root) == before
    assert "removed 3 file(s)" in pqfs("rm", "-r", root, "src/sub", env=cli_env).stderr.decode()
    assert objects(root) == []
    assert pqfs("ls", "-R", root, env=cli_env).stdout.decode().splitlines() == [
        "src/",
        "src/empty/",
    ]


def test_ls_long_recursive_names_with_spaces(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """`ls -lR` must print each path once, intact, after the mode/size/date columns."""
    add_api(pq_vault, tmp_path, "dir/my holiday video.mkv", b"x" * 1234)
    lines = pqfs("ls", "-lR", root_of(pq_vault), env=cli_env).stdout.decode().splitlines()
    files = [ln.split(None, 4) for ln in lines if ln.startswith("-")]
    assert len(files) == 1, lines
    _mode, size, _day, _time, name = files[0]
    assert size == "1234", lines
    assert name == "dir/my holiday video.mkv", f"ls -lR mangles the name: {lines}"


def test_cat_byte_ranges(pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = root_of(pq_vault)
    data = os.urandom(3 * CHUNK + 100)
    size = len(data)
    add_api(pq_vault, tmp_path, "f", data)
    cases = [
        ((65535, 2), data[65535:65537]),  # across the first chunk boundary
        ((0, 1), data[:1]),
        ((size - 1, None), data[-1:]),  # the last byte (no --length: to the end)
        ((size + 1000, 5), b""),  # beyond the end
        ((100, 0), b""),  # empty range
        ((CHUNK - 10, CHUNK + 20), data[CHUNK - 10 : 2 * CHUNK + 10]),  # spans two boundaries
        ((2 * CHUNK, None), data[2 * CHUNK :]),
    ]
    for (offset, length), want in cases:
        args = ["cat", root, "f", "--offset", str(offset)]
        if length is not None:
            args += ["--length", str(length)]
        got = pqfs(*args, env=cli_env).stdout
        assert got == want, f"cat --offset {offset} --length {length}: {len(got)} bytes"


def test_add_needs_no_passphrase(pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """An ingest host holds a writer key, not the passphrase; without either, add refuses
    before it encrypts anything."""
    root = root_of(pq_vault)
    f = tmp_path / "song.flac"
    f.write_bytes(os.urandom(CHUNK + 3))
    refused = user_error("add", root, f, "music/", env=no_pass(cli_env))
    assert "needs a signature" in refused and "--writer-key FILE" in refused
    assert objects(root) == []
    key = tmp_path / "ingest.key"
    pqfs("writer", "add", root, "ingest", "-o", key, env=cli_env)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    proc = pqfs("add", "--writer-key", key, root, f, "music/", env=no_pass(cli_env))
    assert "added 1 file(s)" in proc.stderr.decode()
    out = pqfs("ls", "-l", root, "music", env=cli_env).stdout.decode().split()
    assert out[1] == str(CHUNK + 3) and out[-1] == "song.flac"


def test_passwd(pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = root_of(pq_vault)
    add_api(pq_vault, tmp_path, "f", b"data")
    config = (root / "pqfs.json").read_bytes()
    env = dict(cli_env, PQFS_NEW_PASSPHRASE="a new passphrase")
    assert "passphrase changed" in pqfs("passwd", root, env=env).stderr.decode()
    assert (root / "pqfs.json").read_bytes() == config  # same identity, same recipients

    before = tree_snapshot(root)
    assert "wrong passphrase" in user_error("ls", root, env=cli_env)  # the old one
    assert tree_snapshot(root) == before

    pw = tmp_path / "pw.txt"
    pw.write_text("a new passphrase\n")
    assert pqfs("ls", "--passphrase-file", pw, root, env=no_pass(cli_env)).stdout == b"f\n"


def test_keygen(tmp_path: Path, cli_env: dict[str, str]) -> None:
    key = tmp_path / "key.txt"
    proc = pqfs("keygen", "-o", key, env=cli_env)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    idents = parse_identity_file(key.read_text())
    assert len(idents) == 1 and isinstance(idents[0], HybridIdentity)
    pub = idents[0].recipient().encode()
    assert f"Public key: {pub}" in proc.stderr.decode()
    assert pub.startswith("age1pq1")

    content = key.read_bytes()
    assert "refusing to overwrite" in user_error("keygen", "-o", key, env=cli_env)
    assert key.read_bytes() == content


def test_identity_file_unlock_and_mode_check(
    vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = root_of(vault)
    add_api(vault, tmp_path, "f", b"data")
    ident = tmp_path / "vault.key"
    pqfs("identity", root, "-o", ident, env=cli_env)
    assert stat.S_IMODE(ident.stat().st_mode) == 0o600
    kinds = {type(i) for i in parse_identity_file(ident.read_text())}
    assert kinds == {HybridIdentity, X25519Identity}

    assert pqfs("ls", "--identity", ident, root, env=no_pass(cli_env)).stdout == b"f\n"

    os.chmod(ident, 0o644)
    before = tree_snapshot(root)
    line = user_error("ls", "--identity", ident, root, env=no_pass(cli_env))
    assert "chmod 600" in line
    assert tree_snapshot(root) == before


def test_share_and_gc(pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = root_of(pq_vault)
    old_a = os.urandom(5000)
    data_a = os.urandom(CHUNK + 10)
    add_api(pq_vault, tmp_path, "a", old_a)
    add_api(pq_vault, tmp_path, "a", data_a)  # supersedes the first object (garbage now)
    add_api(pq_vault, tmp_path, "b", b"bee")
    assert len(objects(root)) == 3

    friend = HybridIdentity.generate()
    err = pqfs("share", root, "a", "-r", friend.recipient().encode(), env=cli_env).stderr.decode()
    assert "added 1 recipient(s)" in err
    v = Vault.open(str(root))
    v.unlock(PASSPHRASE)
    obj = root / object_key(v.entry("a").object)
    src = FileSource(obj)
    try:
        r = AgeReader(src, identities=[friend])
        assert r.read(0, r.size) == data_a
    finally:
        src.close()
    assert len(objects(root)) == 3  # share replaced a's object; the superseded one remains

    err = pqfs("gc", root, "--grace", "0", env=cli_env).stderr.decode()
    assert "deleted 1 unreferenced object(s)" in err
    assert len(objects(root)) == 2
    segs = sorted(p.name for p in (root / "catalog").iterdir())
    assert len(segs) == 1 and segs[0].endswith(".snap.age")

    assert pqfs("cat", root, "a", env=cli_env).stdout == data_a
    assert "verified 2 file(s)" in pqfs("verify", root, env=cli_env).stdout.decode()


# ------------------------------------------------------------------------ user errors ----


def test_wrong_passphrase(pq_vault: Vault, cli_env: dict[str, str]) -> None:
    root = root_of(pq_vault)
    before = tree_snapshot(root)
    line = user_error("ls", root, env=dict(cli_env, PQFS_PASSPHRASE="not it"))
    assert "wrong passphrase" in line
    assert tree_snapshot(root) == before


def test_missing_vault_directory(tmp_path: Path, cli_env: dict[str, str]) -> None:
    missing = tmp_path / "nowhere"
    assert "no pqfs vault" in user_error("ls", missing, env=cli_env)
    assert not missing.exists()


def test_directory_that_is_not_a_vault(tmp_path: Path, cli_env: dict[str, str]) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8 not a vault")
    before = tree_snapshot(d)
    assert "no pqfs vault" in user_error("ls", d, env=cli_env)
    assert tree_snapshot(d) == before


def test_corrupt_object_cat_get_verify(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = root_of(pq_vault)
    data = {"a.bin": os.urandom(3 * CHUNK + 10), "b.bin": os.urandom(2 * CHUNK + 3), "c.txt": b"ok"}
    paths = {name: add_api(pq_vault, tmp_path, name, d) for name, d in data.items()}
    hlen = {name: pq_vault.entry(name).hlen for name in data}
    # a: a byte in the middle of the object (chunk 1); b: a byte of chunk 0's tag
    for name, pos in (("a.bin", NONCE_SIZE + CT_CHUNK + 500), ("b.bin", NONCE_SIZE + CHUNK + 3)):
        raw = bytearray(paths[name].read_bytes())
        raw[hlen[name] + pos] ^= 0x40
        paths[name].write_bytes(bytes(raw))
    before = tree_snapshot(root)

    line, proc = failing("cat", root, "a.bin", env=cli_env)
    assert "chunk 1" in line
    assert data["a.bin"].startswith(proc.stdout), "cat released bytes that are not the original"
    assert len(proc.stdout) <= CHUNK, "cat released data of (or after) the damaged chunk"

    out = tmp_path / "a.out"
    assert "chunk 1" in user_error("get", root, "a.bin", out, env=cli_env)
    assert not out.exists()
    assert not list(tmp_path.glob("a.out*"))

    proc = run_pqfs("verify", str(root), env=cli_env, input=b"", check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    failed = [ln for ln in lines if ln.startswith("FAILED")]
    assert len(failed) == 2, lines
    assert failed[0].startswith("FAILED a.bin (chunk 1)"), failed
    assert failed[1].startswith("FAILED b.bin (chunk 0)"), failed
    assert not any("c.txt" in ln for ln in lines)
    assert proc.stderr.decode() == "pqfs: error: 2 of 3 file(s) failed verification\n"

    assert "verified 1 file(s)" in pqfs("verify", root, "c.txt", env=cli_env).stdout.decode()
    assert tree_snapshot(root) == before


def test_import_non_age_file(pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = root_of(pq_vault)
    f = tmp_path / "notes.txt"
    f.write_text("just some text\n")
    before = tree_snapshot(root)
    assert "not an age file" in user_error("import", root, f, env=cli_env)
    assert tree_snapshot(root) == before


@pytest.mark.parametrize("cmd", ["cat", "get", "rm", "ls"])
def test_unknown_path(cmd: str, pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = root_of(pq_vault)
    add_api(pq_vault, tmp_path, "dir/real", b"real")
    before = tree_snapshot(root)
    args = ["dir/nope"] + ([str(tmp_path / "out")] if cmd == "get" else [])
    line = user_error(cmd, root, *args, env=cli_env)
    assert "no such file in the vault: dir/nope" in line
    assert tree_snapshot(root) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("offset", ["-1", "abc"])
def test_bad_offset(offset: str, pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = root_of(pq_vault)
    add_api(pq_vault, tmp_path, "f", b"data")
    before = tree_snapshot(root)
    line = user_error("cat", root, "f", "--offset", offset, env=cli_env, usage=True)
    assert "--offset" in line
    assert tree_snapshot(root) == before


def test_missing_passphrase_without_tty(pq_vault: Vault, cli_env: dict[str, str]) -> None:
    root = root_of(pq_vault)
    before = tree_snapshot(root)
    line = user_error("ls", root, env=no_pass(cli_env))
    assert "--passphrase-file" in line and "PQFS_PASSPHRASE" in line
    assert tree_snapshot(root) == before


def test_add_nonexistent_source(pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = root_of(pq_vault)
    before = tree_snapshot(root)
    assert "no such file" in user_error("add", root, tmp_path / "missing.mkv", env=cli_env)
    assert tree_snapshot(root) == before


# ------------------------------------------------------------------------------ help ----


def test_top_level_help(cli_env: dict[str, str]) -> None:
    out = pqfs("--help", env=cli_env).stdout.decode()
    for cmd in SUBCOMMANDS:
        assert cmd in out


def test_subcommand_list_is_complete() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == SUBCOMMANDS


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main([cmd, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pqfs {cmd}")
