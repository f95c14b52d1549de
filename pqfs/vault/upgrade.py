"""`pqfs upgrade`: a version-1 vault becomes a version-2 one in place (FORMAT.md §7).

Steps, each one safe to be interrupted after, and a second run finishes the job:
1. the owner's signing key is derived from the identity and a signed version-2 config naming
   it replaces the unsigned one (from here on, readers check signatures);
2. the catalog, read under version-1 rules, is written as one owner-signed snapshot (until it
   is, readers refuse the vault with "no snapshot signed by the vault owner", and a run of
   upgrade resumes here);
3. the version-1 segments it supersedes are deleted.
Content objects are not touched: they are age files either way.
"""

from __future__ import annotations

from pqfs.errors import Locked, VaultError
from pqfs.format.keys import HybridIdentity
from pqfs.vault import bounds
from pqfs.vault import catalog as cat_mod
from pqfs.vault.config import CURRENT, VaultConfig
from pqfs.vault.signing import SigningKey
from pqfs.vault.vault import Vault


def upgrade(v: Vault) -> bool:
    """Bring `v` (unlocked) to the current version; False if it was already there."""
    if not v.unlocked:
        raise Locked("upgrading a vault needs its identity")
    changed = False
    if not v.config.signed:
        # The vault's own identity (pqfs init puts its recipient first), not another that
        # opens it (a backup recipient's given with --identity): the owner key is derived from
        # it, and identity.age must go on deriving the same one.
        own = [
            i
            for i in v.identities
            if isinstance(i, HybridIdentity) and i.recipient().encode() == v.config.recipients[0]
        ]
        if not own:
            raise VaultError(
                "upgrade needs the vault's own post-quantum identity (unlock it with the "
                "passphrase)"
            )
        owner = SigningKey.owner_of(own[0])
        old = v.config
        config = VaultConfig(
            CURRENT,
            list(old.recipients),
            owner=owner.verify_key,
            generation=1,
            kem_backend=old.kem_backend,
            extra=dict(old.extra),
        )
        v.adopt_config(config, owner)
        changed = True
    try:
        v.read_catalog()
        return changed
    except cat_mod.NoSignedSnapshot:
        pass
    for _ in range(bounds.BOUNDS.append_attempts):
        cat = cat_mod.load(v.storage, v.identities, None)  # the version-1 chain
        written = v.append(cat_mod.snapshot_ops(cat), snapshot=True, expect_prev=cat.head_digest)
        if written is not None:
            cat_mod.delete_through(v.storage, cat.head_seq)
            v.forget_catalog()
            return True
    raise VaultError("could not write the signed snapshot (too many concurrent writers)")
