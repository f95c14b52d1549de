"""What this host remembers of each vault it has used, so that a store cannot take it back
(docs/FORMAT.md §5.3): the vault id (the owner's signing key, pinned at first use or from
`--vault-id`), the highest config generation, and the highest catalog segment with its digest.

A store that now shows less (a config of an older generation, a catalog whose newest segment
is older than one seen here, a different segment at a position seen here, or another owner
key) is refused with `Rollback`, naming what went back; `pqfs trust VAULT --reset` accepts it
on purpose (a vault restored from a backup).

One JSON file per vault location in the state directory: $PQFS_STATE_DIR, else systemd's
$STATE_DIRECTORY, else /var/lib/pqfs for root (what the system unit's StateDirectory= is, so
the CLI and the unit's mount share their pins), else $XDG_STATE_HOME/pqfs or
~/.local/state/pqfs (a user unit's StateDirectory=). Updates are under an
exclusive lock and only ever move forward, so two commands on one host never lose a pin.
Nothing secret is in it (a location, a key id, numbers and a digest).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from pqfs.errors import VaultError
from pqfs.runtime.files import fsync_dir


class Rollback(VaultError):
    """The store shows an older state of the vault than this host has seen."""


class KeyChanged(VaultError):
    """The vault's config is signed by another owner key than the one pinned here."""


@dataclass
class Pin:
    location: str
    vault_id: str = ""
    generation: int = 0
    seq: int = 0  # the highest catalog segment seen
    digest: str = ""  # SHA-256 of that segment's stored bytes ("" if only its number is known)


def state_dir() -> str:
    env = os.environ.get("PQFS_STATE_DIR") or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/pqfs"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "pqfs")


def _path(location: str) -> str:
    name = hashlib.sha256(location.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return os.path.join(state_dir(), "vaults", f"{name}.json")


def load(location: str) -> Pin:
    try:
        with open(_path(location), "rb") as f:
            doc = json.load(f)
        pin = Pin(**{k: doc[k] for k in ("location", "vault_id", "generation", "seq", "digest")})
        types = (str, str, int, int, str)
        if not all(type(getattr(pin, f)) is t for f, t in zip(FIELDS, types, strict=True)):
            raise TypeError
    except FileNotFoundError:
        return Pin(location)
    except (ValueError, KeyError, TypeError):
        raise VaultError(f"the local state of this vault is damaged: {_path(location)}") from None
    return pin


FIELDS = ("location", "vault_id", "generation", "seq", "digest")


@contextlib.contextmanager
def _locked(location: str) -> Iterator[None]:
    path = _path(location)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _store(pin: Pin) -> None:
    path = _path(pin.location)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(asdict(pin), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def check_config(
    location: str,
    vault_id: str,
    generation: int,
    expected_id: str | None,
    succeeds: Callable[[str], bool] = lambda _id: False,
    first_use: bool = False,
) -> None:
    """Refuse a config signed by another key than the pinned one, unless the pinned key
    handed the vault on to it (`succeeds`: a rekey's signed rotation), and likewise for
    `expected_id` (--vault-id, a writer key file's id); refuse one older than seen here. Then
    move the pin forward. A host with no pin pins only with `first_use` (the caller has
    checked the key another way: the identity derives it, or `expected_id` named it), so
    that a forged config seen first is never what a host trusts from then on."""
    with _locked(location):
        pin = load(location)
        for want, how in (
            (pin.vault_id, "pinned on this host"),
            (expected_id, "given with --vault-id"),
        ):
            if want and want != vault_id and not succeeds(want):
                e = KeyChanged(
                    f"the vault's signing key changed: its config is signed by {vault_id}, not "
                    f"by {want} ({how}): pqfs.json was replaced"
                )
                if how.startswith("pinned"):
                    e.hint = (
                        "if another vault was created there on purpose, run: pqfs trust "
                        f"{location} --reset"
                    )
                raise e
        if pin.vault_id and generation < pin.generation:
            raise _rollback(
                location,
                f"the vault config went back from generation {pin.generation} to {generation}",
            )
        if not pin.vault_id and not (first_use or expected_id):
            return
        if pin.vault_id != vault_id or generation > pin.generation:
            pin.vault_id, pin.generation = vault_id, generation
            _store(pin)


def check_catalog(location: str, head: int, digests: dict[int, str]) -> None:
    """Refuse a catalog whose newest segment `head` is older than the one seen here, or whose
    segment at the pinned position has another digest; then pin the new head. `digests`: the
    stored-bytes SHA-256 of each segment the catalog was loaded from, by number."""
    with _locked(location):
        pin = load(location)
        if head < pin.seq:
            raise _rollback(
                location,
                f"the catalog went back from segment {pin.seq} to {head} (newer segments were "
                "deleted from the store)",
            )
        seen = digests.get(pin.seq)
        if pin.digest and seen is not None and seen != pin.digest:
            raise _rollback(
                location,
                f"catalog segment {pin.seq} is not the one this host saw (replaced in the store)",
            )
        if head > pin.seq or (head == pin.seq and not pin.digest):
            pin.seq, pin.digest = head, digests.get(head, "")
            _store(pin)


def check_tail(location: str, tail: int, digest: str | None) -> None:
    """For a writer that cannot read the catalog: refuse a tail older than the pinned one
    (or another segment at the pinned position, when `digest` is the tail's)."""
    pin = load(location)
    if tail < pin.seq:
        raise _rollback(
            location,
            f"the catalog went back from segment {pin.seq} to {tail} (newer segments were "
            "deleted from the store)",
        )
    if tail == pin.seq and digest is not None and pin.digest and digest != pin.digest:
        raise _rollback(
            location,
            f"catalog segment {pin.seq} is not the one this host saw (replaced in the store)",
        )


def pin_written(location: str, seq: int, digest: str) -> None:
    """A segment this host has just written is the newest it knows."""
    with _locked(location):
        pin = load(location)
        if seq > pin.seq:
            pin.seq, pin.digest = seq, digest
            _store(pin)


def reset(location: str) -> Pin:
    """Forget what this host knew of the vault at `location` (the next use pins it again)."""
    with _locked(location):
        old = load(location)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_path(location))
    return old


def _rollback(location: str, what: str) -> Rollback:
    e = Rollback(f"{what}; refusing to use it (a rollback by whoever can write to the store?)")
    e.hint = (
        f"if the vault was restored from a backup on purpose, run: pqfs trust {location} --reset"
    )
    return e
