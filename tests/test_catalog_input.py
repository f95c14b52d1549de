"""Catalog input and names (issue 15: findings 3, 4, 5, 8 and 9).

A catalog segment is input, not trusted data: even a signed one comes from a writer host that
can be buggy or compromised, so the segments here are appended and signed as an authorized
writer would (a forger with only the public keys is test_trust.py's). Every malformed op
must be ignored with one warning line naming its segment (FORMAT.md §4), never an internal
error; `ls`, `cat`, `verify`, `rm` and `gc` keep working, and a running mount keeps serving.
Names: a backslash is an ordinary character, a file below a file or in place of a directory
is refused (or, when the writer could not know, ignored on load, the first entry winning),
a name that is not UTF-8 is stored losslessly, `ls` escapes control characters, implied
directories are dated by what is below them, and `mount --on-change` tells a media server
what changed.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import shlex
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqfs.cli.main import main
from pqfs.errors import FormatError, PqfsError, VaultError
from pqfs.format.agefile import encrypt_stream
from pqfs.format.encoding import b64decode, b64encode
from pqfs.mount.options import MountOptions
from pqfs.mount.tree import ROOT_INO, Tree
from pqfs.mount.vfs import VaultFS
from pqfs.vault import bounds, maintenance, schema
from pqfs.vault import catalog as cat_mod
from pqfs.vault.catalog import Catalog, put_op
from pqfs.vault.schema import Entry
from pqfs.vault.vault import Vault

from .conftest import PASSPHRASE, daemon_pid, mount_type, mounted, run_pqfs, sha_file

Body = Callable[[int, str], bytes]  # (seq, prev) -> a segment's JSON text

# ---------------------------------------------------------------------------- helpers ----


def root_of(v: Vault) -> Path:
    return Path(v.storage.root)  # type: ignore[attr-defined]


def source(tmp: Path, data: bytes, mtime_ns: int | None = None) -> Path:
    src = tmp / f"src-{os.urandom(4).hex()}"
    src.write_bytes(data)
    if mtime_ns is not None:
        os.utime(src, ns=(mtime_ns, mtime_ns))
    return src


def add_api(v: Vault, tmp: Path, dest: str, data: bytes, mtime_ns: int | None = None) -> None:
    v.commit([put_op(v.add_file(str(source(tmp, data, mtime_ns)), dest))])


def staged(v: Vault, tmp: Path, dest: str, data: bytes) -> dict[str, Any]:
    """A valid put op for a new content object, not recorded: what a forger would append."""
    return put_op(v.add_file(str(source(tmp, data)), dest))


def ops_body(ops: Any) -> Body:
    def body(seq: int, prev: str) -> bytes:
        doc = {"pqfs_catalog": 2, "seq": seq, "kind": "delta", "prev": prev, "generation": 1}
        doc["ops"] = ops
        return json.dumps(doc).encode()

    return body


def op_text_body(op_text: str) -> Body:
    """A segment holding one op given as JSON text (for what json.dumps cannot write)."""

    def body(seq: int, prev: str) -> bytes:
        head = (
            f'{{"pqfs_catalog":2,"seq":{seq},"kind":"delta","prev":"{prev}","generation":1,"ops":['
        )
        return (head + op_text + "]}").encode()

    return body


def append_raw(root: Path, body: Body, kind: str = "delta", seq: int | None = None) -> int:
    """Append a segment whose JSON is `body(seq, prev)`, chained after the tail, encrypted to
    the public recipients and signed with the owner's key: what a writer host that is buggy or
    compromised can do."""
    v = Vault.open(str(root))
    v.unlock(PASSPHRASE)
    signer = v.signer()
    assert signer is not None
    segs = cat_mod.list_segments(v.storage)
    prev = hashlib.sha256(v.storage.read_bytes(segs[-1].key)).hexdigest() if segs else ""
    seq = segs[-1].seq + 1 if seq is None else seq
    out = io.BytesIO()
    plain = cat_mod.seal(body(seq, prev), signer.key, signer.vault_id)
    encrypt_stream(io.BytesIO(plain), out.write, v.recipients)
    v.storage.put_bytes(f"catalog/{seq:016d}.{kind}.age", out.getvalue(), exclusive=True)
    return seq


def export_identity(root: Path, tmp: Path) -> Path:
    pw, key = tmp / "pw", tmp / "vault.key"
    pw.write_bytes(PASSPHRASE)
    assert main(["identity", str(root), "-o", str(key), "--passphrase-file", str(pw)]) == 0
    return key


def cli(capfd: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, list[str]]:
    """`pqfs ARGV` in-process: (exit status, stdout, stderr lines). Never an internal error,
    never a traceback; a failure is exactly one `pqfs: error:` line."""
    capfd.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert rc in (0, 1), (argv, rc, err)
    assert "internal error" not in err and "Traceback" not in err, err
    errors = [ln for ln in lines if ln.startswith("pqfs: error:")]
    assert len(errors) == (rc == 1), (argv, err)
    for ln in lines:
        if ln.startswith("pqfs: warning: catalog"):
            assert ln.startswith("pqfs: warning: catalog segment "), ln
    return rc, out, lines


def catalog_warnings(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith("pqfs: warning: catalog segment ")]


def wait_for(cond: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def no_pass(env: dict[str, str]) -> dict[str, str]:
    e = dict(env)
    e.pop("PQFS_PASSPHRASE", None)
    return e


def segment_keys(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "catalog").iterdir())


def objects(root: Path) -> list[Path]:
    return sorted((root / "objects").rglob("*.age"))


# ----------------------------------------------------------- each malformed-op kind ----

DEEP = 50_000  # far past Python's recursion limit (~1000)


def kinds(good: dict[str, Any]) -> dict[str, tuple[Body, bool]]:
    """Name -> (segment, whether the op's path is then served). `good` is a valid put op of
    a real object; each kind spoils it (or the segment) one way."""
    text = json.dumps(good)[:-1]  # the op's JSON without its closing brace
    spoiled = {k: v for k, v in good.items() if k != "mac"}
    return {
        "extra key": (ops_body([{**good, "added_by_v9": {"x": [1, None]}}]), True),
        "missing key": (ops_body([spoiled]), False),
        "path is a number": (ops_body([{**good, "path": 7}]), False),
        "ops is an object": (ops_body({"0": good}), False),
        "op is not an object": (ops_body([7, [good], "put"]), False),
        "unknown op": (ops_body([{**good, "op": "chmod"}]), False),
        "a del of the root": (ops_body([{"op": "del", "path": ""}]), False),
        "bool for a number": (ops_body([{**good, "hlen": True}]), False),
        "mtime_ns 1e30": (ops_body([{**good, "mtime_ns": 1e30}]), False),
        "size is a string": (ops_body([{**good, "size": str(good["size"])}]), False),
        "setuid mode": (ops_body([{**good, "mode": 0o104777}]), True),
        "deep nesting in an unknown key": (
            op_text_body(text + ',"future":' + "[" * DEEP + "]" * DEEP + "}"),
            True,
        ),
        "deep nesting as a field": (
            op_text_body(text + ',"size":' + "[" * DEEP + "]" * DEEP + "}"),
            False,
        ),
        "deep nesting as the op": (op_text_body("[" * DEEP + "]" * DEEP), False),
        "a number of 5000 digits": (
            op_text_body(text + ',"mtime_ns":' + "9" * 5000 + "}"),
            False,
        ),
    }


KINDS = list(kinds({"size": 0, "mac": ""}))


@pytest.fixture
def library(pq_vault: Vault, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    files = {"keep/a.bin": os.urandom(35_000).hex().encode(), "keep/b.bin": b"bee\n"}
    for name, data in files.items():
        add_api(pq_vault, tmp_path, name, data)
    return root_of(pq_vault), files


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_op_is_ignored_with_one_warning_and_every_command_works(
    kind: str,
    pq_vault: Vault,
    library: tuple[Path, dict[str, bytes]],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    root, files = library
    key = export_identity(root, tmp_path)
    good = staged(pq_vault, tmp_path, "keep/forged.bin", b"forged content\n")
    body, served = kinds(good)[kind]
    seq = append_raw(root, body)

    rc, out, err = cli(capfd, "ls", "-lR", root, "-i", key)
    names = [ln.split(None, 4)[-1] for ln in out.splitlines()]
    assert rc == 0 and "keep/a.bin" in names and "keep/b.bin" in names, out
    assert ("keep/forged.bin" in names) == served, out
    warnings = catalog_warnings(err)
    if served:
        assert warnings == [], err
    else:
        assert len(warnings) == 1 and warnings[0].startswith(
            f"pqfs: warning: catalog segment {seq}: "
        ), err
    for ln in out.splitlines():
        assert not set(ln[:10].lower()) & {"s", "t"}, f"setuid, setgid or sticky: {ln}"
    if kind == "setuid mode":
        assert any(ln.startswith("-rwxrwxrwx ") and "forged.bin" in ln for ln in out.splitlines())

    rc, out, _ = cli(capfd, "cat", root, "keep/a.bin", "-i", key)
    assert rc == 0 and out.encode() == files["keep/a.bin"]
    assert cli(capfd, "verify", root, "-i", key)[0] == 0
    assert cli(capfd, "rm", root, "keep/b.bin", "-i", key)[0] == 0
    if served:  # the user can remove what a forged op put there
        assert cli(capfd, "rm", root, "keep/forged.bin", "-i", key)[0] == 0
    assert cli(capfd, "gc", root, "-i", key)[0] == 0
    rc, out, err = cli(capfd, "ls", "-R", root, "-i", key)
    assert rc == 0 and out.splitlines() == ["keep/", "keep/a.bin"], out
    assert catalog_warnings(err) == [], "gc compacts the ignored ops away"


def test_warning_names_the_segment_and_its_first_problem(
    pq_vault: Vault, library: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, _ = library
    good = staged(pq_vault, tmp_path, "keep/x.bin", b"x")
    seq = append_raw(root, ops_body([good, {**good, "size": "47"}, {**good, "path": 7}]))
    nops = append_raw(root, ops_body({}))
    v = Vault.open(str(root))
    v.unlock(PASSPHRASE)
    seen: list[str] = []
    v.on_warning = seen.append
    cat = v.catalog()
    assert seen == [
        f"catalog segment {seq}: 2 malformed op(s) ignored (op 2: size is not a whole number)",
        f"catalog segment {nops}: ops is not a list; no op of it applied",
    ]
    assert cat.get("keep/x.bin") is not None  # op 1 of the segment was fine, and applied
    v.catalog(reload=True)
    assert len(seen) == 2, "each warning is reported once"


def test_undecryptable_segment_stays_one_error_naming_it(
    library: tuple[Path, dict[str, bytes]], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root, _ = library
    key = export_identity(root, tmp_path)
    bad = root / "catalog" / f"{4:016d}.delta.age"
    bad.write_bytes(b"age-encryption.org/v1\n-> X25519 garbage\n--- AAAA\n")
    rc, _, err = cli(capfd, "ls", root, "-i", key)
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("pqfs: error: catalog segment 4 (catalog/0000000000000004.delta.age)")


# ----------------------------------------------------------------- property / fuzz ----

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = ["op", "path", "type", "mode", "mtime_ns", "size", "object", "hlen", "mac", "extra"]
PATHS = st.sampled_from(["keep/a.bin", "keep", "", "keep/a.bin/x", "x.bin", "a//b", "../x"])


@st.composite
def fuzzed_op(draw: st.DrawFn, good: dict[str, Any]) -> Any:
    how = draw(st.sampled_from(["spoiled", "keys", "del", "anything"]))
    if how == "spoiled":
        op = dict(good)
        for key in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3)):
            if draw(st.booleans()):
                op[key] = draw(JSON | PATHS)
            else:
                op.pop(key, None)
        return op
    if how == "keys":
        return draw(st.dictionaries(st.sampled_from(FIELDS), JSON | PATHS, max_size=9))
    if how == "del":
        return {"op": "del", "path": draw(JSON | PATHS)}
    return draw(JSON)


@pytest.fixture(scope="module")
def fuzz_base(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, Path, dict[str, Any]]]:
    """A vault with two files, an exported identity and a valid put op for a staged object."""
    tmp = tmp_path_factory.mktemp("fuzz")
    v = Vault.create(str(tmp / "vault"), PASSPHRASE, log_n=10)
    add_api(v, tmp, "keep/a.bin", b"a" * 1000)
    add_api(v, tmp, "keep/b.bin", b"b")
    good = staged(v, tmp, "keep/c.bin", b"c" * 10)
    yield tmp / "vault", export_identity(tmp / "vault", tmp), good


def check_tree(cat: Catalog) -> None:
    """What a FUSE handler will see: ints that are ints, no setuid bit, a tree that builds."""
    for e in cat.entries.values():
        for value in (e.mode, e.mtime_ns, e.size, e.hlen):
            assert type(value) is int
        assert 0 <= e.mode <= 0o777 and -(2**63) <= e.mtime_ns < 2**63 and 0 <= e.size < 2**63
        assert isinstance(e.path, str) and e.type in ("file", "dir")
    tree = Tree(cat, b"salt" * 4)
    for node in tree.nodes.values():
        assert node.attr.mode & 0o7000 == 0
        assert type(node.attr.size) is int and type(node.attr.mtime_ns) is int


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_json_ops_never_break_loading_or_the_cli(
    fuzz_base: tuple[Path, Path, dict[str, Any]],
    capfd: pytest.CaptureFixture[str],
    data: st.DataObject,
) -> None:
    base, key, good = fuzz_base
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "vault"
        shutil.copytree(base, root)
        v = Vault.open(str(root))
        for _ in range(data.draw(st.integers(1, 3), label="segments")):
            ops = data.draw(st.lists(fuzzed_op(good), max_size=5), label="ops")
            if data.draw(st.booleans(), label="as written by pqfs.vault.catalog.append"):
                assert cat_mod.append(v.storage, v.recipients, ops) is not None
            else:  # a segment whose "ops" is any JSON value, with extra keys
                value = data.draw(JSON | st.just(ops), label="ops value")
                append_raw(root, ops_body(value))
        try:
            v.unlock(PASSPHRASE)
            cat = v.catalog()
        except PqfsError as e:  # the segments themselves are valid: nothing may fail here
            raise AssertionError(f"loading failed: {e}") from None
        check_tree(cat)
        commands: list[list[str | Path]] = [
            ["ls", "-lR", root],
            ["cat", root, "keep/a.bin"],
            ["verify", root],
            ["rm", "-r", root, "keep/b.bin"],
            ["gc", root],
            ["ls", "-R", root],
        ]
        for argv in commands:
            cli(capfd, *argv, "-i", key)


B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@st.composite
def mac_texts(draw: st.DrawFn) -> str:
    """Valid MACs, MACs with one character changed, other lengths, padding, stray text."""
    text = b64encode(draw(st.binary(min_size=31, max_size=33)))
    i = draw(st.integers(0, len(text) - 1))
    how = draw(st.sampled_from(["as is", "changed", "padded", "anything"]))
    if how == "changed":
        return text[:i] + draw(st.sampled_from(B64 + "=-_ \n")) + text[i + 1 :]
    if how == "padded":
        return text + "="
    if how == "anything":
        return draw(st.text(alphabet=B64 + "=\n", min_size=40, max_size=46))
    return text


@settings(max_examples=500, deadline=None)
@given(mac_texts())
def test_the_mac_rule_is_what_b64decode_accepts_for_32_bytes(text: str) -> None:
    try:
        ok = len(b64decode(text)) == 32
    except FormatError:
        ok = False
    assert bool(schema._MAC.fullmatch(text)) == ok


class _NoScan(dict[str, Entry]):
    """The entries of a catalog that may be looked up, never walked: a walk of a 100,000-file
    tree inside one op is what made every delete of a big library cost seconds."""

    def _walked(self, *args: object) -> NoReturn:
        raise AssertionError("an op walked every entry of the catalog")

    __iter__ = keys = values = items = _walked  # type: ignore[assignment]


def test_catalog_ops_cost_the_path_depth_not_the_tree_size() -> None:
    """Deleting a path, putting one and asking whether a path is free look at the entries on
    that path only, never at every entry of the tree."""
    cat = Catalog()
    file = {
        "type": "file",
        "mode": 0o644,
        "size": 1,
        "object": "0" * 32,
        "hlen": 9,
        "mac": "A" * 43,
    }

    def path(i: int) -> str:
        return f"lib/d{i % 100}/f{i}.bin"

    for i in range(10_000):
        cat.apply({"op": "put", "path": path(i), "mtime_ns": i, **file})
    cat.entries = _NoScan(cat.entries)
    for i in range(0, 10_000, 10):
        cat.apply({"op": "del", "path": path(i)})
        assert cat.get(path(i + 1)) is not None
        cat.apply({"op": "put", "path": path(i) + ".new", "mtime_ns": i, **file})
    with pytest.raises(cat_mod.ConflictingOp):  # a file below a file
        cat.apply({"op": "put", "path": path(1) + "/below", "mtime_ns": 1, **file})
    assert dict.__len__(cat.entries) == 10_000
    assert cat.get(path(1) + "/below") is None


# --------------------------------------------------------------------------- names ----


def test_backslash_is_an_ordinary_character(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = root_of(pq_vault)
    src = tmp_path / "tree"
    src.mkdir()
    (src / "back\\slash.txt").write_bytes(b"one file\n")
    run_pqfs("add", str(root), str(src), "d", env=cli_env)
    v = Vault.open(str(root))
    v.unlock(PASSPHRASE)
    assert sorted(v.catalog().entries) == ["d", "d/back\\slash.txt"]
    assert run_pqfs("cat", str(root), "d/back\\slash.txt", env=cli_env).stdout == b"one file\n"
    out = run_pqfs("ls", str(root), "d", env=cli_env).stdout.decode()
    assert out == "back\\\\slash.txt\n"  # escaped as ls -b does


def test_file_below_a_file_or_in_place_of_a_directory_is_refused(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = root_of(pq_vault)
    one = tmp_path / "one.bin"
    one.write_bytes(b"1")
    run_pqfs("add", str(root), str(one), "abs/one.bin", env=cli_env)
    before = (segment_keys(root), objects(root))
    cases = [
        (["add", str(root), str(one), "abs/one.bin/sub"], "abs/one.bin is a file in the vault"),
        (["add", str(root), str(one), "abs"], "it is a directory in the vault"),
    ]
    tree = tmp_path / "tree"
    (tree / "one.bin").mkdir(parents=True)  # a directory where the vault has a file
    (tree / "one.bin" / "x").write_bytes(b"x")
    cases.append((["add", str(root), str(tree), "abs"], "it is a file in the vault"))
    age = tmp_path / "f.age"
    encrypted = io.BytesIO()
    encrypt_stream(io.BytesIO(b"age"), encrypted.write, pq_vault.recipients)
    age.write_bytes(encrypted.getvalue())
    cases.append((["import", str(root), str(age), "abs/one.bin/f"], "is a file in the vault"))
    for argv, msg in cases:
        proc = run_pqfs(*argv, env=cli_env, input=b"", check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and err.count("\n") == 1, (argv, err)
        assert err.startswith("pqfs: error: cannot add ") and msg in err, (argv, err)
        assert (segment_keys(root), objects(root)) == before, "nothing written"
    out = run_pqfs("ls", "-R", str(root), env=cli_env).stdout.decode()
    assert out.splitlines() == ["abs/", "abs/one.bin"]


@pytest.mark.fuse
def test_without_the_identity_a_conflicting_put_is_ignored_on_load_first_one_wins(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """An ingest host cannot load the catalog, so it cannot refuse: readers apply the rule."""
    root = root_of(pq_vault)
    one = tmp_path / "one.bin"
    one.write_bytes(b"first\n")
    key = tmp_path / "ingest.key"
    run_pqfs("writer", "add", str(root), "ingest", "-o", str(key), env=cli_env)
    for dest in ("abs/one.bin", "abs/one.bin/sub", "abs"):
        run_pqfs("add", "--writer-key", str(key), str(root), str(one), dest, env=no_pass(cli_env))
    proc = run_pqfs("ls", "-R", str(root), env=cli_env)
    assert proc.stdout.decode().splitlines() == ["abs/", "abs/one.bin"]
    warnings = proc.stderr.decode().splitlines()
    assert warnings == [
        "pqfs: warning: catalog segment 3: 1 conflicting op(s) ignored "
        "(op 1: abs/one.bin/sub: abs/one.bin is a file in the vault)",
        "pqfs: warning: catalog segment 4: 1 conflicting op(s) ignored "
        "(op 1: abs: it is a directory in the vault)",
    ]
    log = tmp_path / "mount.log"
    with mounted(root, tmp_path / "mnt", cli_env, "--log-file", str(log)) as mp:
        assert (mp / "abs" / "one.bin").read_bytes() == b"first\n"
    assert "catalog segment 3: 1 conflicting op(s) ignored" in log.read_text()


BAD = b"b_bad\xff.txt"


@pytest.mark.fuse
def test_a_name_that_is_not_utf8_is_stored_losslessly(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = root_of(pq_vault)
    src = tmp_path / "old"
    src.mkdir()
    with open(os.path.join(os.fsencode(src), BAD), "wb") as f:
        f.write(b"latin-1 era\n")
    (src / "good.txt").write_bytes(b"good\n")
    proc = run_pqfs("add", str(root), str(src), env=cli_env)
    assert b"added 2 file(s)" in proc.stderr
    name = "old/" + os.fsdecode(BAD)
    assert run_pqfs("cat", str(root), name, env=cli_env).stdout == b"latin-1 era\n"
    out = tmp_path / "got"
    run_pqfs("get", str(root), name, str(out), env=cli_env)
    assert out.read_bytes() == b"latin-1 era\n"
    ls = run_pqfs("ls", str(root), "old", env=cli_env).stdout.decode()
    assert ls.splitlines() == ["b_bad\\377.txt", "good.txt"]
    again = run_pqfs("add", str(root), str(src), env=cli_env)
    assert b"2 unchanged skipped" in again.stderr
    # The segment is valid JSON: the byte is the escape \udcff, read back as the same name.
    v = Vault.open(str(root))
    v.unlock(PASSPHRASE)
    assert name in v.catalog().entries
    with mounted(root, tmp_path / "mnt", cli_env) as mp:
        assert sorted(os.listdir(os.fsencode(mp / "old"))) == [BAD, b"good.txt"]
        with open(os.path.join(os.fsencode(mp / "old"), BAD), "rb") as f:
            assert f.read() == b"latin-1 era\n"


def test_ls_escapes_control_characters(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    names = {
        "red\x1b[31mtext\x1b[0m": "red\\033[31mtext\\033[0m",
        "two\nlines": "two\\nlines",
        "tab\there": "tab\\there",
        "bell\x07del\x7f": "bell\\adel\\177",
        "naïve café.mkv": "naïve café.mkv",
    }
    for name in names:
        add_api(pq_vault, tmp_path, f"ctl/{name}", b"x")
    out = run_pqfs("ls", str(root_of(pq_vault)), "ctl", env=cli_env).stdout.decode()
    assert sorted(out.splitlines()) == sorted(names.values())
    long = run_pqfs("ls", "-lR", str(root_of(pq_vault)), env=cli_env).stdout.decode()
    assert "\x1b" not in long and "\x07" not in long and "ctl/two\\nlines" in long


@pytest.mark.fuse
def test_implied_directories_are_dated_by_the_newest_entry_below(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    t1, t2 = 1_500_000_000_000_000_000, 1_600_000_123_000_000_000
    add_api(pq_vault, tmp_path, "music/album/01.flac", b"1", t1)
    add_api(pq_vault, tmp_path, "music/album/02.flac", b"2", t2)
    add_api(pq_vault, tmp_path, "music/old.txt", b"0", t1 - 10**12)
    root = root_of(pq_vault)
    day = datetime.fromtimestamp(t2 / 1e9, UTC).strftime("%Y-%m-%d %H:%M")
    lines = run_pqfs("ls", "-l", str(root), env=cli_env).stdout.decode().splitlines()
    assert lines == [f"drwxr-xr-x {0:>14} {day} music/"]
    lines = run_pqfs("ls", "-l", str(root), "music", env=cli_env).stdout.decode().splitlines()
    assert lines[0].endswith(f"{day} album/")
    with mounted(root, tmp_path / "mnt", cli_env) as mp:
        for d in (mp, mp / "music", mp / "music" / "album"):
            assert os.stat(d).st_mtime_ns == t2, d


def test_forged_last_sequence_number_is_refused_before_any_work(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = root_of(pq_vault)

    def empty_snapshot(seq: int, prev: str) -> bytes:
        doc = {"pqfs_catalog": 2, "seq": seq, "kind": "snap", "prev": "", "generation": 1}
        doc["ops"] = []
        return json.dumps(doc).encode()

    append_raw(root, empty_snapshot, kind="snap", seq=10**16 - 1)
    f = tmp_path / "film.mkv"
    f.write_bytes(b"film")
    before = (segment_keys(root), objects(root))
    for env in (cli_env, no_pass(cli_env)):
        proc = run_pqfs("add", str(root), str(f), env=env, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and err.count("\n") == 1, err
        assert "sequence numbers are exhausted" in err and "tampered" in err, err
        assert (segment_keys(root), objects(root)) == before
    assert all(len(k.split(".")[0]) == 16 for k in segment_keys(root))


def test_a_lost_race_is_blamed_on_other_writers_only_when_there_are_some(
    pq_vault: Vault,
) -> None:
    """The next segment's key is taken by something the listing does not show (here a
    directory): retrying cannot help, and no other writer is involved."""
    root = root_of(pq_vault)
    (root / "catalog" / f"{2:016d}.delta.age").mkdir()
    with pytest.raises(VaultError) as exc:
        cat_mod.append(pq_vault.storage, pq_vault.recipients, [])
    assert "concurrent" not in str(exc.value)
    assert "exists but is not listed" in str(exc.value)


def test_a_writer_that_loses_a_race_backs_off_then_lands_after_the_winner(
    pq_vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer creates the segment this one was about to: the loser waits a random
    time within the first backoff step, reads the tail again, and appends after the winner."""
    storage, recipients, signer = pq_vault.storage, pq_vault.recipients, pq_vault.signer()
    waits: list[float] = []
    monkeypatch.setattr(cat_mod, "_pause", waits.append)
    real_put = storage.put_bytes
    winner: list[cat_mod.Written | None] = []
    raced = []

    def put(key: str, data: bytes, exclusive: bool = False) -> None:
        if not raced and key.startswith("catalog/"):  # the other writer gets there first
            raced.append(key)
            winner.append(cat_mod.append(storage, recipients, [], signer=signer))
        real_put(key, data, exclusive)

    monkeypatch.setattr(storage, "put_bytes", put)
    mine = cat_mod.append(storage, recipients, [], signer=signer)
    assert winner[0] is not None and mine is not None
    assert mine.seq == winner[0].seq + 1
    first = bounds.BOUNDS.append_backoff_first
    assert len(waits) == 1 and 0 <= waits[0] <= first * 2
    pq_vault.forget_catalog()
    assert pq_vault.catalog().head_seq == mine.seq  # the chain verifies, both segments in it


# ------------------------------------------------------------------- a running mount ----


@pytest.mark.fuse
def test_running_mount_survives_every_malformed_op_kind(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = root_of(pq_vault)
    data = {"keep/a.bin": os.urandom(200_000), "keep/b.bin": b"bee\n", "top.txt": b"top\n"}
    for name, content in data.items():
        add_api(pq_vault, tmp_path, name, content)
    log = tmp_path / "mount.log"
    with mounted(root, tmp_path / "mnt", cli_env, "--refresh", "1", "--log-file", str(log)) as mp:
        pid = daemon_pid(mp)
        for i, kind in enumerate(KINDS):
            name = f"keep/k{i}.bin"
            good = staged(pq_vault, tmp_path, name, f"kind {i}\n".encode())
            body, served = kinds(good)[kind]
            seq = append_raw(root, body)
            if served:
                wait_for((mp / name).exists, f"{kind}: {name} served")
            else:
                warning = f"catalog segment {seq}: "
                wait_for(lambda: warning in log.read_text(), f"{kind}: {warning}")  # noqa: B023
            assert mount_type(mp) == "fuse.pqfs", f"the mount ended after: {kind}"
            listing = set(os.listdir(mp / "keep"))
            assert {"a.bin", "b.bin"} <= listing, f"{kind}: listing emptied: {listing}"
            assert (name.split("/")[1] in listing) == served, kind
        new = tmp_path / "new.mkv"
        new.write_bytes(b"valid after all that\n")
        run_pqfs("add", str(root), str(new), "keep/new.mkv", env=cli_env)
        wait_for(lambda: (mp / "keep" / "new.mkv").exists(), "the valid file")
        assert (mp / "keep" / "new.mkv").read_bytes() == b"valid after all that\n"
        os.kill(pid, 0)  # the same daemon, still serving
        for name, content in data.items():
            assert (mp / name).read_bytes() == content
        assert sha_file(mp / "keep" / "a.bin") == hashlib.sha256(data["keep/a.bin"]).hexdigest()
        for dirpath, dirnames, filenames in os.walk(mp):
            for n in dirnames + filenames:
                mode = os.stat(os.path.join(dirpath, n)).st_mode
                assert mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) == 0, n
        setuid = KINDS.index("setuid mode")
        assert stat.S_IMODE(os.stat(mp / f"keep/k{setuid}.bin").st_mode) == 0o777
    assert "Traceback" not in log.read_text()


@pytest.mark.fuse
def test_on_change_hook_gets_the_changed_paths(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = root_of(pq_vault)
    add_api(pq_vault, tmp_path, "films/old.mkv", b"old")
    out = tmp_path / "hook.jsonl"
    script = (
        "import json, os, sys; "
        f"open({str(out)!r}, 'a').write(json.dumps({{'args': sys.argv[1:], "
        "'pw': os.environ.get('PQFS_PASSPHRASE'), "
        "'creds': os.environ.get('CREDENTIALS_DIRECTORY')}) + '\\n')"
    )
    cmd = shlex.join([sys.executable, "-c", script, "--"])
    log = tmp_path / "mount.log"
    args = ("--refresh", "1", "--on-change", cmd, "--log-file", str(log))
    creds = tmp_path / "credentials"  # as systemd sets it, here without a passphrase in it
    creds.mkdir()
    env = dict(cli_env, CREDENTIALS_DIRECTORY=str(creds))
    with mounted(root, tmp_path / "mnt", env, *args) as mp:
        new = tmp_path / "new.mkv"
        new.write_bytes(b"new")
        run_pqfs("add", str(root), str(new), "films/new.mkv", env=cli_env)
        # A whole line, not just the file: the hook opens it before it writes.
        wait_for(lambda: out.exists() and out.read_text().endswith("\n"), "the hook's first run")
        run = json.loads(out.read_text().splitlines()[0])
        assert run["args"] == ["--", "films/new.mkv"]
        assert run["pw"] is None, "the hook gets no passphrase"
        assert run["creds"] is None, "nor where systemd keeps it"
        assert (mp / "films" / "new.mkv").read_bytes() == b"new"
        run_pqfs("rm", str(root), "films/old.mkv", env=cli_env)
        wait_for(lambda: out.read_text().count("\n") == 2, "the hook's second run")
        assert json.loads(out.read_text().splitlines()[1])["args"] == ["--", "films/old.mkv"]


def test_mount_options_refresh_and_on_change_are_checked(
    cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, msg in [
        (["--refresh", "0"], "must be at least"),
        (["--refresh", "soon"], "not a number of seconds"),
        (["--on-change", ""], "empty command"),
        (["--on-change", "notify 'unclosed"], "cannot split"),
    ]:
        proc = run_pqfs("mount", "v", "m", *argv, env=cli_env, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and err.count("\n") == 1 and msg in err, (argv, err)
    with pytest.raises(SystemExit):
        main(["mount", "--help"])
    mount_help = " ".join(capsys.readouterr().out.split())
    refresh = mount_help.split("--refresh SECONDS")[-1].split(" --", 1)[0]
    assert f"(default: {MountOptions.catalog_poll:g})" in refresh, refresh


# -------------------------------------------------- the mount's core, driven directly ----


def test_tree_skips_an_entry_below_a_file_instead_of_refusing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """load() never yields one (it ignores such puts), but the mount must not depend on it."""
    cat = Catalog()
    file = {"type": "file", "mode": 0o644, "mtime_ns": 1, "size": 0, "hlen": 9, "mac": "A" * 43}
    cat.apply({"op": "put", "path": "a", "object": "1" * 32, **file})
    cat.entries["a/b"] = Entry("a/b", "file", 0o644, 1, 0, "2" * 32, 9, "A" * 43)
    with caplog.at_level("WARNING", logger="pqfs.mount"):
        tree = Tree(cat, b"salt" * 4)
    assert sorted(tree._by_path) == ["", "a"]
    assert "catalog lists a/b below the file a: skipped" in caplog.text


def test_deep_paths_list_and_mount_without_recursion(
    pq_vault: Vault, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A path may have ~2000 components (4095 bytes), deeper than Python's recursion."""
    root = root_of(pq_vault)
    deep = "/".join(["d"] * 1500) + "/leaf.bin"
    append_raw(root, ops_body([staged(pq_vault, tmp_path, deep, b"deep")]))
    key = export_identity(root, tmp_path)
    rc, out, _ = cli(capfd, "ls", "-R", root, "-i", key)
    assert rc == 0 and out.splitlines()[-1] == deep
    assert cli(capfd, "cat", root, deep, "-i", key)[1] == "deep"
    v = Vault.open(str(root))
    v.unlock(PASSPHRASE)
    tree = Tree(v.catalog(), b"salt" * 4)
    assert deep in tree._by_path


def run_polling(v: Vault, body: Callable[[VaultFS], Awaitable[None]]) -> None:
    """Run `body` against a started VaultFS of `v` that polls the catalog every 50 ms."""

    async def scenario() -> None:
        fs = VaultFS(v, MountOptions.for_storage(v.storage, catalog_poll=0.05))
        try:
            async with trio.open_nursery() as nursery:
                await fs.start(nursery)
                await body(fs)
                nursery.cancel_scope.cancel()
        finally:
            fs.close()
            gc.unfreeze()

    trio.run(scenario)


async def until(cond: Callable[[], object]) -> None:
    with trio.fail_after(60):
        while not cond():
            await trio.sleep(0.05)


async def read_back(fs: VaultFS, name: str) -> bytes:
    fh = await fs.open(fs.lookup(ROOT_INO, name).ino, os.O_RDONLY)
    return bytes(await fs.read(fh, 0, 100))


def test_failed_refresh_keeps_the_tree_and_is_logged_once(
    pq_vault: Vault, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_api(pq_vault, tmp_path, "keep.bin", b"kept")
    root = root_of(pq_vault)

    async def body(fs: VaultFS) -> None:
        (root / "catalog" / f"{3:016d}.delta.age").write_bytes(b"not an age file")
        await until(lambda: "catalog refresh failed" in caplog.text)
        await trio.sleep(0.5)  # ten more polls, each failing the same way
        assert await read_back(fs, "keep.bin") == b"kept"

    with caplog.at_level("WARNING", logger="pqfs.mount"):
        run_polling(pq_vault, body)
    failures = [r.getMessage() for r in caplog.records if "refresh failed" in r.getMessage()]
    assert len(failures) == 1, failures
    assert failures[0].startswith(
        "catalog refresh failed (still serving the catalog as of segment 2): catalog segment 3 "
    ), failures


def test_a_refresh_the_store_refused_is_tried_again(
    pq_vault: Vault, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A new segment the store will not give (here a FIFO in its place: refused as not a
    regular file) fails the refresh; once the store gives it, the next poll loads it. Only a
    segment that is itself damaged waits for a newer head (the test above)."""
    add_api(pq_vault, tmp_path, "keep.bin", b"kept")
    root = root_of(pq_vault)
    other = tmp_path / "other"  # the same vault, one segment ahead: its new segment's bytes
    shutil.copytree(root, other)
    v2 = Vault.open(str(other))
    v2.unlock(PASSPHRASE)
    add_api(v2, tmp_path, "new.bin", b"new")
    (name,) = set(os.listdir(other / "catalog")) - set(os.listdir(root / "catalog"))
    for obj in (other / "objects").rglob("*.age"):
        dest = root / obj.relative_to(other)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(obj, dest)

    async def body(fs: VaultFS) -> None:
        os.mkfifo(root / "catalog" / name)
        await until(lambda: "catalog refresh failed" in caplog.text)
        shutil.copyfile(other / "catalog" / name, root / "catalog" / ".tmp-segment")
        os.replace(root / "catalog" / ".tmp-segment", root / "catalog" / name)
        await until(lambda: "new.bin" in fs.tree._by_path)  # type: ignore[union-attr]
        assert await read_back(fs, "new.bin") == b"new"

    with caplog.at_level("INFO", logger="pqfs.mount"):
        run_polling(pq_vault, body)
    assert "not a regular file" in caplog.text
    assert "catalog refresh works again" in caplog.text


def test_refresh_names_what_was_added_replaced_and_removed(pq_vault: Vault, tmp_path: Path) -> None:
    add_api(pq_vault, tmp_path, "a/old.bin", b"old")

    async def scenario() -> list[list[str]]:
        fs = VaultFS(pq_vault, MountOptions.for_storage(pq_vault.storage))
        seen = []
        try:
            async with trio.open_nursery() as nursery:
                await fs.start(nursery)
                seen.append(await fs.refresh())
                add_api(pq_vault, tmp_path, "b/c/new.bin", b"new")
                seen.append(await fs.refresh())
                add_api(pq_vault, tmp_path, "a/old.bin", b"replaced")
                seen.append(await fs.refresh())
                maintenance.remove(pq_vault, "b")
                seen.append(await fs.refresh())
                assert fs.lookup(ROOT_INO, "a").mtime_ns > 0
                nursery.cancel_scope.cancel()
        finally:
            fs.close()
            gc.unfreeze()  # the daemon freezes for its whole life; this test process goes on
        return seen

    assert trio.run(scenario) == [
        [],
        ["b", "b/c", "b/c/new.bin"],
        ["a/old.bin"],
        ["b", "b/c", "b/c/new.bin"],
    ]


HOOK = """
import json, sys, time
out = sys.argv[1]
start = time.time()
time.sleep(float(sys.argv[2]))
print("hook output line")
with open(out, "a") as f:
    f.write(json.dumps({"args": sys.argv[3:], "start": start, "end": time.time()}) + "\\n")
sys.exit(int(sys.argv[3]) if sys.argv[3:] and sys.argv[3].isdigit() else 0)
"""


def test_hook_runs_one_at_a_time_gathering_what_changed_meanwhile(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pqfs.mount.onchange import ChangeHook

    opts = MountOptions(workers=1, jobs_per_file=1, job_chunks=1)
    out = tmp_path / "runs.jsonl"
    argv = [sys.executable, "-c", HOOK, str(out), "0.5"]

    def runs() -> list[dict[str, Any]]:
        return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            hook = ChangeHook(argv, nursery, opts)
            hook.notify(["a.mkv"])
            await trio.sleep(0.1)  # it is running (sleeping 0.5 s): the next ones must wait
            hook.notify(["b.mkv"])
            hook.notify(["c.mkv", "b.mkv"])
            with trio.fail_after(60):
                while len(runs()) < 2:
                    await trio.sleep(0.05)
            hook.notify(["3"])  # this run exits with status 3
            with trio.fail_after(60):
                while "exited with status 3" not in caplog.text:
                    await trio.sleep(0.05)
            ChangeHook(["/nonexistent/hook"], nursery, opts).notify(["x"])
            with trio.fail_after(60):
                while "could not run" not in caplog.text:
                    await trio.sleep(0.05)

    with caplog.at_level("INFO", logger="pqfs.mount"):
        trio.run(scenario)
    first, second, third = runs()
    assert first["args"] == ["a.mkv"] and second["args"] == ["b.mkv", "c.mkv"]
    assert third["args"] == ["3"]
    assert second["start"] >= first["end"] and third["start"] >= second["end"]
    assert "on-change hook: hook output line" in caplog.text


def test_hook_is_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A hook that hangs is killed at `hook_timeout` (shortened here); one that exits leaving a
    child with its output open is done when it exits; too many paths are passed as none; its
    output is logged up to `hook_output_bytes`."""
    from pqfs.mount import onchange

    opts = MountOptions(workers=1, jobs_per_file=1, job_chunks=1, hook_timeout=2.0)
    limit = opts.hook_path_bytes
    assert onchange.hook_args(["x" * 1000] * 100, limit) == []
    assert onchange.hook_args(["a", "b"], limit) == ["a", "b"]

    async def scenario() -> tuple[float, float, int]:
        t0 = trio.current_time()
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        code, _ = await onchange.execute(argv, opts)
        assert code is None
        hung = trio.current_time() - t0
        chatty = [sys.executable, "-c", "print('y' * 100000)"]
        code, output = await onchange.execute(chatty, opts)
        assert code == 0 and output == b"y" * opts.hook_output_bytes
        t0 = trio.current_time()
        code, output = await onchange.execute(["sh", "-c", "sleep 60 & echo $!; exit 0"], opts)
        assert code == 0
        return hung, trio.current_time() - t0, int(output)

    hung, left_child, child = trio.run(scenario)
    os.kill(child, 9)  # the sleep this test started
    assert hung < 30 and left_child < 30
