"""The catalog as inodes: `Tree` (its `Node`s and their `Attr`s), built whole from a loaded
catalog, and `changed_paths`, what a refresh changed. It holds names, sizes, modes and dates
only: it never touches storage, keys or plaintext, and runs on whichever thread builds it.

Invariants (kept by this module):
  * a reload builds a new tree, swapped in by one assignment (VaultFS), so a lookup never sees
    half a reload; between reloads only the mount's own writes change a tree, on the trio
    thread (`attach`, `detach`, `move`: writes.py), each change whole before the next request;
  * a path keeps its inode across a reload while its object is the same (`previous`), so a
    file this mount renamed or committed stays on its inode under open descriptors; any other
    inode is a keyed hash of (path, object), stable across lock/unlock, and a file replaced
    from elsewhere gets a new inode, so the kernel's cached pages of the old content are
    never served for the new one;
  * every value comes from a loaded catalog, whose ops were checked on load (catalog.py): no
    wrong-typed value reaches a FUSE handler.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from pqfs.errors import NotADirectory, NotFound
from pqfs.vault.catalog import Catalog, shown
from pqfs.vault.schema import Entry

if TYPE_CHECKING:
    from pqfs.mount.staging import Dirty

log = logging.getLogger("pqfs.mount")

ROOT_INO = 1


@dataclass
class Attr:
    ino: int
    mode: int
    size: int
    mtime_ns: int
    nlink: int


@dataclass(slots=True)
class Node:
    ino: int
    entry: Entry
    attr: Attr
    children: dict[str, int] | None = None  # directories: name -> inode
    names: list[str] = field(default_factory=list)  # directories: sorted, for readdir offsets
    # Content written through this mount and not yet committed (writes.py); `entry` is then
    # what the catalog holds (object "" for a file never committed).
    dirty: Dirty | None = None
    linked: bool = True  # False once unlinked or replaced: open handles may still hold it
    # A file with all-new content renamed over one the catalog holds: that entry, which the
    # catalog keeps at this path until this file's commit (writes.py, `_recorded`)
    kept: Entry | None = None
    # Directories open for listing (opendir): their entries as listed, in the order readdir's
    # offsets count them; a name removed meanwhile stays as None, one added goes to the end,
    # so that an entry nobody touched is listed exactly once (rm -r unlinks as it lists).
    listing: list[str | None] | None = None
    readers: int = 0
    handles: int = 0  # open handles of this file (writes.py)
    writers: int = 0  # of which may write
    _lock: trio.Lock | None = None

    def write_lock(self) -> trio.Lock:
        """Serializes writes to this file (made on first use: most nodes are never written)."""
        if self._lock is None:
            self._lock = trio.Lock()
        return self._lock


class Tree:
    """The catalog as inodes (the invariants: see the module docstring)."""

    def __init__(self, cat: Catalog, salt: bytes, previous: Tree | None = None) -> None:
        self.head = cat.head_seq
        self.warnings = tuple(cat.warnings)  # logged when the tree is swapped in
        self.nodes: dict[int, Node] = {}
        self._by_path: dict[str, int] = {}
        self._salt = salt
        # inodes to keep: a path whose object is unchanged since the tree before
        self._keep: dict[tuple[str, str], int] = {}
        if previous is not None:
            # (copies, each made in one step under the GIL: this runs on a thread while the
            # loop may change `previous`)
            old_nodes = previous.nodes.copy()
            for p, i in previous._by_path.copy().items():
                n = old_nodes.get(i)
                if n is not None and n.dirty is None:
                    self._keep[(p, n.entry.object)] = i
        self._usage: tuple[int, int, int] | None = None  # usage(): (block, blocks, entries)
        # The root, explicit or implied (dated by the newest entry below it, as every implied
        # directory is: never 1970).
        root = cat.get("") or Entry("", "dir", 0o755, 0)
        self._add_node("", root, ROOT_INO)
        for path in sorted(cat.entries):  # a directory before what is below it
            if path:
                self._ensure(path, cat.entries[path], cat)
        for node in self.nodes.values():
            if node.children is not None:
                node.names = sorted(node.children)
                node.attr.nlink = 2 + sum(
                    1 for i in node.children.values() if self.nodes[i].children is not None
                )

    def _ino(self, path: str, e: Entry) -> int:
        kept = self._keep.get((path, e.object))
        if kept is not None and kept not in self.nodes:
            return kept
        n = 0
        while True:
            h = hashlib.blake2b(
                f"{path}\0{e.object}\0{n}".encode("utf-8", "surrogateescape"),
                key=self._salt,
                digest_size=8,
            ).digest()
            ino = int.from_bytes(h, "big") >> 1
            if ino > ROOT_INO and ino not in self.nodes:
                return ino
            n += 1

    def _add_node(self, path: str, e: Entry, ino: int) -> int:
        is_dir = e.type == "dir"
        attr = Attr(ino, self._mode(e), e.size if not is_dir else 0, e.mtime_ns, 2 if is_dir else 1)
        self.nodes[ino] = Node(ino, e, attr, {} if is_dir else None)
        self._by_path[path] = ino
        return ino

    def _ensure(self, path: str, e: Entry, cat: Catalog) -> None:
        """Add `path` and each implied directory above it not added yet (iteratively: a path
        can be deeper than Python's recursion allows). An entry below a file cannot come from
        a loaded catalog, which ignores such puts; should one come, it is skipped and logged,
        never a reason to refuse the whole tree."""
        missing = []
        p = path
        while p not in self._by_path:
            missing.append(p)
            p = p.rpartition("/")[0]
        for q in reversed(missing):
            parent_path, _, name = q.rpartition("/")
            parent = self.nodes[self._by_path[parent_path]]
            if parent.children is None:
                log.warning(
                    "catalog lists %s below the file %s: skipped", shown(path), shown(parent_path)
                )
                return
            entry = e if q == path else (cat.get(q) or Entry(q, "dir", 0o755, 0))
            parent.children[name] = self._add_node(q, entry, self._ino(q, entry))

    # ------------------------------------------------------------- the mount's own writes ----

    def new_ino(self) -> int:
        """An inode number for a file or directory created on this mount: random, unused."""
        while True:
            ino = int.from_bytes(os.urandom(8), "big") >> 1
            if ino > ROOT_INO and ino not in self.nodes:
                return ino

    def path_of(self, parent: Node, name: str) -> str:
        return f"{parent.entry.path}/{name}" if parent.entry.path else name

    def attach(self, parent: Node, name: str, entry: Entry, ino: int | None = None) -> Node:
        """Add `entry` (its path is parent's path + name) as a new child of `parent`."""
        assert parent.children is not None and name not in parent.children
        node_ino = self._add_node(entry.path, entry, ino or self.new_ino())
        node = self.nodes[node_ino]
        self._link_child(parent, name, node)
        return node

    def _link_child(self, parent: Node, name: str, node: Node) -> None:
        assert parent.children is not None
        parent.children[name] = node.ino
        bisect.insort(parent.names, name)
        if parent.listing is not None:
            parent.listing.append(name)
        if node.children is not None:
            parent.attr.nlink += 1
        node.linked = True
        self._usage = None

    def detach(self, parent: Node, name: str) -> Node:
        """Remove `name` from `parent`, and everything below it from the tree; returns its
        node (open handles may still hold it: `linked` is then False)."""
        node = self._unlink_child(parent, name)
        for n in self._subtree(node):
            self._by_path.pop(n.entry.path, None)
            self.nodes.pop(n.ino, None)
            n.linked = False
        return node

    def _unlink_child(self, parent: Node, name: str) -> Node:
        assert parent.children is not None
        node = self.nodes[parent.children.pop(name)]
        i = bisect.bisect_left(parent.names, name)
        if i < len(parent.names) and parent.names[i] == name:
            del parent.names[i]
        if parent.listing is not None:
            for k in range(len(parent.listing) - 1, -1, -1):
                if parent.listing[k] == name:
                    parent.listing[k] = None
                    break
        if node.children is not None:
            parent.attr.nlink -= 1
        self._usage = None
        return node

    def move(self, node: Node, parent: Node, name: str, new_parent: Node, new_name: str) -> None:
        """Rename `node` (named `name` in `parent`) to `new_name` in `new_parent`, which has no
        such name (the caller detached what was there); every path below it follows, every
        inode stays."""
        self._unlink_child(parent, name)
        old_prefix = node.entry.path
        new_path = self.path_of(new_parent, new_name)
        for n in self._subtree(node):
            self._by_path.pop(n.entry.path, None)
        for n in self._subtree(node):
            p = new_path + n.entry.path[len(old_prefix) :]
            n.entry = dataclasses.replace(n.entry, path=p)
            self._by_path[p] = n.ino
        self._link_child(new_parent, new_name, node)

    def _subtree(self, node: Node) -> list[Node]:
        out, todo = [], [node]
        while todo:
            n = todo.pop()
            out.append(n)
            if n.children:
                todo.extend(self.nodes[i] for i in n.children.values() if i in self.nodes)
        return out

    def below(self, node: Node) -> list[Node]:
        """`node` and everything below it, a directory before what it holds."""
        return sorted(self._subtree(node), key=lambda n: n.entry.path)

    def reinode(self, node: Node, ino: int) -> None:
        """Give `node` the inode `ino` (an open handle's, after an unlock's fresh tree), if no
        other node has it."""
        if ino in self.nodes or node.ino == ino:
            return
        parent = self.parent(node)
        del self.nodes[node.ino]
        node.ino = node.attr.ino = ino
        self.nodes[ino] = node
        self._by_path[node.entry.path] = ino
        if parent is not None and parent.children is not None:
            parent.children[node.entry.path.rpartition("/")[2]] = ino

    def by_path(self, path: str) -> Node | None:
        ino = self._by_path.get(path)
        return None if ino is None else self.nodes[ino]

    def changed(self) -> None:
        """A file's size changed (writes.py): usage() counts again."""
        self._usage = None

    @staticmethod
    def _mode(e: Entry) -> int:
        """Permission bits only, whatever the entry says: nothing is served setuid or setgid;
        the owner can always list and control (xattrs) a directory they mounted."""
        is_dir = e.type == "dir"
        mode = (stat.S_IFDIR if is_dir else stat.S_IFREG) | (e.mode & 0o777 or 0o644)
        return mode | 0o700 if is_dir else mode

    def node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise NotFound(f"no inode {ino}")
        return node

    def parent(self, node: Node) -> Node | None:
        """The directory that holds `node` (the root holds itself); None if this tree has no
        such directory (`node` is from an older tree)."""
        ino = self._by_path.get(node.entry.path.rpartition("/")[0])
        return None if ino is None else self.nodes[ino]

    def _dir(self, ino: int) -> tuple[Node, dict[str, int]]:
        node = self.node(ino)
        if node.children is None:
            raise NotADirectory(f"not a directory: {node.entry.path}")
        return node, node.children

    def lookup(self, parent: int, name: str) -> Attr:
        node, children = self._dir(parent)
        if name == ".":
            return node.attr
        if name == "..":
            parent_path = node.entry.path.rpartition("/")[0]
            return self.node(ROOT_INO if not parent_path else self._by_path[parent_path]).attr
        ino = children.get(name)
        if ino is None:
            raise NotFound(f"no such file: {name}")
        return self.nodes[ino].attr

    def readdir(self, ino: int, start: int) -> list[tuple[str, Attr, int]]:
        """Entries from offset `start`: (name, attributes, offset of the next entry)."""
        node, children = self._dir(ino)
        names = node.listing if node.listing is not None else node.names
        return [
            (name, self.nodes[children[name]].attr, i + 1)
            for i, name in enumerate(names[start:], start)
            if name is not None and name in children
        ]

    def opened_dir(self, node: Node) -> None:
        if node.readers == 0:
            node.listing = list(node.names)
        node.readers += 1

    @staticmethod
    def released_dir(node: Node) -> None:
        node.readers = max(0, node.readers - 1)
        if node.readers == 0:
            node.listing = None

    def usage(self, block: int) -> tuple[int, int]:
        """(blocks of `block` bytes that its files take, entries): counted once per tree (it
        never changes; a reload builds a new one), not on every statfs of a file manager."""
        if self._usage is None or self._usage[0] != block:
            blocks = sum(-(-n.attr.size // block) for n in self.nodes.values())
            self._usage = (block, blocks, len(self.nodes))
        return self._usage[1], self._usage[2]

    def signatures(self) -> dict[str, tuple[object, ...]]:
        """Per path, what a change of it is (changed_paths): a file's object, size, mode and
        mtime; for a directory only that it is one (its date follows what is below it)."""
        out: dict[str, tuple[object, ...]] = {}
        nodes = self.nodes.copy()  # (one step under the GIL: see __init__)
        for path, ino in self._by_path.copy().items():
            node = nodes.get(ino)
            if node is None:
                continue
            e = node.entry
            file = (e.object, e.mac, e.size, e.mode, e.mtime_ns)
            out[path] = ("dir",) if e.type == "dir" else file
        return out


def changed_paths(old: Tree, new: Tree) -> list[str]:
    """The vault paths added, removed or replaced from `old` to `new`, sorted."""
    a, b = old.signatures(), new.signatures()
    return sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
