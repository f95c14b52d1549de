"""The hosts allowed to append to a version-2 vault (FORMAT.md §3.1): adding one (the owner
signs a config that names its key) and revoking one.

Revoking takes the key out of the signed config and then writes an owner-signed snapshot of
the catalog as it stands, so that from then on no segment the revoked key signs (before or
after) is part of the chain readers accept: whatever it added stays only as the owner's
snapshot now holds it.
"""

from __future__ import annotations

import copy

from pqfs.errors import Locked, VaultError
from pqfs.vault import maintenance
from pqfs.vault.config import MAX_WRITERS, Writer, check_writer_name
from pqfs.vault.signing import SigningKey, VerifyKey
from pqfs.vault.vault import Vault


def add(v: Vault, name: str) -> SigningKey:
    """A new writer key, authorized under `name` in the vault's signed config."""
    key = SigningKey.generate()
    authorize(v, name, key.verify_key)
    return key


def check_new(v: Vault, name: str) -> None:
    """VaultError unless a writer `name` could be added (before its key is made)."""
    _owner_only(v)
    check_writer_name(name)
    if any(w.name == name for w in v.config.writers):
        raise VaultError(f"the vault already has a writer named {name} (pqfs writer rm it first)")
    if len(v.config.writers) >= MAX_WRITERS:
        raise VaultError(f"the vault has {MAX_WRITERS} writers already; revoke one first")


def authorize(v: Vault, name: str, key: VerifyKey) -> None:
    """Name `key` as writer `name` in the vault's signed config."""
    check_new(v, name)
    config = copy.copy(v.config)
    config.writers = [*v.config.writers, Writer(name, key)]
    v.write_config(config)


def remove(v: Vault, name: str) -> Writer:
    """Revoke the writer `name`: the catalog is compacted into an owner-signed snapshot (which
    keeps what the writer added), then its key leaves the config, so that nothing it signs is
    read again. Interrupted, it is run again: the writer is still named until the last step."""
    _owner_only(v)
    gone = [w for w in v.config.writers if w.name == name]
    if not gone:
        raise VaultError(f"the vault has no writer named {name} (see: pqfs writer ls VAULT)")
    maintenance.compact_now(v, v.catalog(reload=True))
    config = copy.copy(v.config)
    config.writers = [w for w in v.config.writers if w.name != name]
    v.write_config(config)
    return gone[0]


def _owner_only(v: Vault) -> None:
    if not v.config.signed:
        raise VaultError("a version 1 vault has no writers (run: pqfs upgrade VAULT first)")
    if not v.unlocked:
        raise Locked("only the vault owner (with the identity) changes its writers")
