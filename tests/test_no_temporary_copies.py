"""A secret copied between buffers must not pass through a temporary: CPython's
`bytearray[i:j] = <anything but a bytearray>` (a memoryview included) first copies the source
into a new bytearray, which it frees unwiped (bytearray_ass_subscript). Copies go through
memoryviews on both sides, `memoryview(dst)[i:j] = memoryview(src)[k:l]`, which copy in place."""

from __future__ import annotations

import ast
from pathlib import Path

import pqfs

PACKAGE = Path(pqfs.__file__).parent


def _bytearray_slice_stores(tree: ast.AST) -> list[int]:
    """Lines of `name[...] = ...` where `name` is bound to `bytearray(...)` in the same
    function and the value is not a bytearray of its own (a call to bytearray, a literal)."""
    lines = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        arrays = {
            t.id
            for node in ast.walk(fn)
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "bytearray"
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(fn):
            if not isinstance(node, ast.Assign):
                continue
            for t in node.targets:
                if (
                    isinstance(t, ast.Subscript)
                    and isinstance(t.slice, ast.Slice)
                    and isinstance(t.value, ast.Name)
                    and t.value.id in arrays
                    and "memoryview" in ast.unparse(node.value)
                ):
                    lines.append(node.lineno)
    return lines


def test_no_secret_copy_through_a_temporary_bytearray() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line in _bytearray_slice_stores(ast.parse(path.read_text()))
    ]
    assert not found, f"bytearray[...] = memoryview(...) copies through a temporary: {found}"
