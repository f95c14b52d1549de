"""vault/rebase.py: a delta made against an old view of the catalog, rebased onto what other
writers appended meanwhile, loses nothing of either side (a property test over random trees
and random ops), and its conflict copies have clear, valid, distinct names."""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pqfs.format.encoding import b64encode
from pqfs.vault.catalog import Catalog, ConflictingOp, del_op, put_op
from pqfs.vault.rebase import Foreign, conflict_path, rebase
from pqfs.vault.schema import NAME_MAX, Entry, path_problem

NAMES = ["a", "b", "c.txt", "d.mkv"]
LABEL = "2026-12-02 174500 host"


def _paths() -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)


_counter = [0]


def _put(path: str, kind: str) -> dict[str, Any]:
    _counter[0] += 1
    if kind == "dir":
        return put_op(Entry(path, "dir", 0o755, 1))
    obj = f"{_counter[0]:032x}"
    return put_op(Entry(path, "file", 0o644, 1, 1, obj, 100, b64encode(bytes(32))))


@st.composite
def _ops(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    return draw(
        st.lists(
            st.tuples(
                st.sampled_from(["put", "put", "del"]), st.sampled_from(["file", "dir"]), _paths()
            ),
            max_size=8,
        )
    )


def _valid(cat: Catalog, spec: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """The ops of `spec` that apply to `cat` (applied to it), as a writer with a view makes
    them: only what its view allows."""
    out = []
    for kind, type_, path in spec:
        op = _put(path, type_) if kind == "put" else del_op(path)
        if kind == "del" and cat.get(path) is None:
            continue
        try:
            cat.apply(op)
        except ConflictingOp:
            continue
        out.append(op)
    return out


def _copy(cat: Catalog) -> Catalog:
    new = Catalog()
    for e in sorted(cat.entries.values(), key=lambda e: e.path.count("/")):
        new.apply(put_op(e))
    return new


def _objects(cat: Catalog) -> set[str]:
    return {e.object for e in cat.entries.values() if e.type == "file"}


@settings(max_examples=1500, deadline=None)
@given(base=_ops(), theirs=_ops(), ours=_ops())
def test_rebased_delta_loses_nothing_of_either_side(
    base: list[tuple[str, str, str]],
    theirs: list[tuple[str, str, str]],
    ours: list[tuple[str, str, str]],
) -> None:
    start = Catalog()
    _valid(start, base)
    their_view, our_view = _copy(start), _copy(start)
    their_ops = _valid(their_view, theirs)
    our_ops = _valid(our_view, ours)
    foreign = Foreign()
    foreign.apply(their_ops, writer=False, holds_file=lambda p: False)

    final = _copy(their_view)
    r = rebase(our_ops, foreign, lambda p: our_view.get(p) is not None, LABEL)
    for op in r.ops:
        if op["op"] == "put" and op["type"] == "file":
            final.apply(op)  # never ignored: a file put readers ignore is a lost file
        else:
            with contextlib.suppress(ConflictingOp):
                final.apply(op)
    before = _objects(start)
    # what they wrote is all there, and what we wrote (and kept) is there too
    assert _objects(their_view) - before <= _objects(final)
    assert _objects(our_view) - before <= _objects(final)
    # a file is moved only when they touched its path, and to a valid, free name
    for old, new in r.moved.items():
        assert path_problem(new) is None and "(conflict " in new
        assert new not in foreign.put and our_view.get(new) is None
        parents = [old.rsplit("/", k)[0] for k in range(1, old.count("/") + 1)]
        assert (
            old in foreign.put
            or foreign.put_below(old)
            or foreign.file_above(old)
            or any(a in foreign.put or foreign.put_below(a) for a in parents)  # below a kept del
        )
    assert len(set(r.moved.values())) == len(r.moved)
    if not foreign:
        assert r.ops == our_ops and not r.notes


def test_conflict_copy_names() -> None:
    free = lambda p: False  # noqa: E731
    assert conflict_path("Films/Heat.mkv", LABEL, free, False) == (
        f"Films/Heat (conflict {LABEL}).mkv"
    )
    assert conflict_path("Films/.nfo", LABEL, free, False) == f"Films/.nfo (conflict {LABEL})"
    assert conflict_path("a/b/notes", LABEL, free, True) == f"notes (conflict {LABEL})"
    taken = {f"x (conflict {LABEL}).txt"}
    assert conflict_path("x.txt", LABEL, taken.__contains__, False) == (
        f"x (conflict {LABEL} 2).txt"
    )
    long = "é" * 127 + ".flac"  # 259 bytes: cut to fit NAME_MAX, whole characters only
    got = conflict_path(long, LABEL, free, False)
    assert path_problem(got) is None and len(got.encode()) <= NAME_MAX
    assert got.endswith(f" (conflict {LABEL}).flac")


def test_rules_one_by_one() -> None:
    f = Foreign()
    their = [_put("Films/Heat.mkv", "file"), del_op("Old"), _put("Music/x.flac", "file")]
    f.apply(their, writer=False, holds_file=lambda p: False)
    ours = [
        _put("Films/Heat.mkv", "file"),  # they changed it: a conflict copy
        _put("Old/keep.txt", "file"),  # they deleted its directory: kept (an edit wins)
        del_op("Music"),  # they put something below: not deleted
        _put("New/y.txt", "file"),  # untouched
    ]
    r = rebase(ours, f, lambda p: False, LABEL)
    paths = [(op["op"], op["path"]) for op in r.ops]
    assert paths == [
        ("put", f"Films/Heat (conflict {LABEL}).mkv"),
        ("put", "Old/keep.txt"),
        ("put", "New/y.txt"),
    ]
    assert len(r.notes) == 3 and r.moved == {"Films/Heat.mkv": f"Films/Heat (conflict {LABEL}).mkv"}


def test_a_writers_puts_over_files_and_deletes_change_nothing() -> None:
    """An ingest host's segment may only add (FORMAT.md §4.6): readers ignore its deletes and
    its puts over files, so a rebase does not take them for changes."""
    f = Foreign()
    f.apply(
        [_put("a.txt", "file"), del_op("b.txt"), _put("new.txt", "file")],
        writer=True,
        holds_file=lambda p: p == "a.txt",
    )
    assert f.put == {"new.txt": "file"} and not f.deleted
    r = rebase([_put("a.txt", "file"), del_op("b.txt")], f, lambda p: False, LABEL)
    assert [op["path"] for op in r.ops] == ["a.txt", "b.txt"] and not r.notes


def test_one_path_put_twice_in_a_delta_goes_to_one_copy() -> None:
    f = Foreign()
    f.apply([_put("x", "file")], writer=False, holds_file=lambda p: False)
    e = _put("x", "file")  # (a rename's put of it, then its content's)
    r = rebase([e, dict(e)], f, lambda p: False, LABEL)
    assert len({op["path"] for op in r.ops}) == 1 and len(r.moved) == 1
