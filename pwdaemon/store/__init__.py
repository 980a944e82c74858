"""The content-addressed artifact store on disk: keys, manifests, atomic files, claims, watcher.

Shared by every process of a host. Modules, one concern each: `keys` (what an
artifact's validity depends on, hashed), `manifest` (what is recorded next to an
artifact), `files` (atomic writes, locks), `paths` (where stores live), `safety` (who
may have written a store), `claims` (who is compiling what), `refusals` (compiles a
worker refused), `watcher` (artifacts other processes publish), `store`
(`ArtifactStore`: layout, publish, lookup, quarantine, profiles) and `maintenance` (ls,
verify, gc, clear). The names below are what other layers use.
"""

from pwdaemon.store.claims import Claim
from pwdaemon.store.keys import (
    ArtifactKey,
    detect_torch_version,
    detect_triton_version,
    device_fingerprint,
    make_key,
    options_hash,
)
from pwdaemon.store.manifest import Manifest, VerifyResult
from pwdaemon.store.paths import CACHE_DIR_ENV, SERVICE_CACHE_DIR, default_store_dir
from pwdaemon.store.safety import UnsafeStoreError
from pwdaemon.store.store import ArtifactStore
from pwdaemon.store.watcher import StoreWatcher

__all__ = (
    "CACHE_DIR_ENV",
    "SERVICE_CACHE_DIR",
    "ArtifactKey",
    "ArtifactStore",
    "Claim",
    "Manifest",
    "StoreWatcher",
    "UnsafeStoreError",
    "VerifyResult",
    "default_store_dir",
    "detect_torch_version",
    "detect_triton_version",
    "device_fingerprint",
    "make_key",
    "options_hash",
)
