"""Artifact keys: everything that decides whether a compiled artifact is valid, hashed.

A key covers the graph (code and placeholder specs), the compile target, the device
(fingerprinted so that every GPU of one kind shares artifacts), torch and triton versions
and the Inductor options, so the same key means the same artifact in any process. Its
`digest` names the artifact's files on disk.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = (
    "DIGEST_RE",
    "ArtifactKey",
    "canonical_json",
    "detect_torch_version",
    "detect_triton_version",
    "device_fingerprint",
    "digest_of",
    "make_key",
    "options_hash",
    "sha256_text",
)

log = logging.getLogger(__name__)

# Bumped when the meaning of a key or the artifact format changes, so old entries
# stop matching instead of being loaded under new assumptions.
_KEY_SCHEMA = "pwdaemon-artifact-key-v1"

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
# A device string that is already a fingerprint ("cuda:sm90", "rocm:gfx942") rather than
# a torch device spec ("cuda", "cuda:0").
_FINGERPRINT_RE = re.compile(r"^[a-z_]+:(sm\d+|gfx\w+)$")


def canonical_json(obj: object) -> str:
    """JSON with a single spelling for equal values, so hashes do not depend on dict order.

    Raises TypeError for values that have no such spelling (non-str keys, NaN, objects).
    """
    try:
        return json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise TypeError(f"value is not canonical JSON (str keys, finite numbers): {exc}") from exc


def sha256_text(text: str) -> str:
    """sha256 hex digest of `text` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def options_hash(options: Mapping[str, object] | None) -> str:
    """Hash of Inductor/compiler options; None and {} are the same (no options)."""
    return sha256_text(canonical_json(dict(options or {})))


@functools.cache
def detect_torch_version() -> str:
    """The running torch version (imports torch on first use)."""
    import torch

    return str(torch.__version__)


@functools.cache
def detect_triton_version() -> str:
    """The installed triton version, or "none"; read from package metadata so that
    computing a key does not pay for importing triton."""
    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    # A triton built into the environment without dist metadata.
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            return str(getattr(triton, "__version__", "unknown"))
        except Exception:  # a broken triton install must not break keying
            log.debug("triton is installed but cannot be imported", exc_info=True)
            return "unknown"
    return "none"


def device_fingerprint(device: torch.device | str) -> str:
    """What about a device decides whether an artifact runs on it.

    "cpu" for the CPU; "cuda:sm90" (compute capability) for an NVIDIA GPU, so every GPU of
    the same kind shares artifacts whatever its index; "rocm:gfx942" on ROCm. A string that
    is already a fingerprint is returned unchanged.
    """
    if isinstance(device, str) and (device == "cpu" or _FINGERPRINT_RE.match(device)):
        return device  # without importing torch: the CLI and helper processes stay light
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if torch.version.hip:
            arch = str(torch.cuda.get_device_properties(index).gcnArchName).split(":")[0]
            return f"rocm:{arch}"
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:sm{major}{minor}"
    return dev.type


@dataclass(frozen=True)
class ArtifactKey:
    """Everything an artifact's validity depends on. `digest` names it on disk."""

    graph_hash: str
    target: str
    device: str
    torch_version: str
    triton_version: str
    options_hash: str

    def fields(self) -> dict[str, str]:
        """The key's fields by name, as stored in a manifest."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @functools.cached_property
    def digest(self) -> str:
        """sha256 hex of all fields (and the key schema version)."""
        return sha256_text(canonical_json({"schema": _KEY_SCHEMA, **self.fields()}))

    @property
    def short(self) -> str:
        """The first 12 hex digits of the digest, for logs and tables."""
        return self.digest[:12]

    @classmethod
    def from_fields(cls, data: Mapping[str, object]) -> ArtifactKey:
        """Rebuild a key from `fields()` output; ValueError when a field is missing or not a str."""
        values: dict[str, str] = {}
        for f in dataclasses.fields(cls):
            value = data.get(f.name)
            if not isinstance(value, str):
                raise ValueError(f"key field {f.name!r} missing or not a string")
            values[f.name] = value
        return cls(**values)


def make_key(
    graph_fingerprint: str,
    target: str,
    *,
    device: torch.device | str,
    options: Mapping[str, object] | None = None,
    torch_version: str | None = None,
    triton_version: str | None = None,
) -> ArtifactKey:
    """Key for compiling `graph_fingerprint` (graph code + placeholder specs, any string)
    for `target` ("general", "size:8", "range:1-16", "graph:8") on `device`.

    `device` is a fingerprint ("cpu", "cuda:sm90") or a torch device, which is
    fingerprinted. Versions default to the running process's; pass them to compute a key
    for another process (e.g. a client of the host service).
    """
    if not target:
        raise ValueError("target must be a non-empty string")
    return ArtifactKey(
        graph_hash=sha256_text(graph_fingerprint),
        target=target,
        device=device_fingerprint(device),
        torch_version=torch_version if torch_version is not None else detect_torch_version(),
        triton_version=triton_version if triton_version is not None else detect_triton_version(),
        options_hash=options_hash(options),
    )


def digest_of(key: ArtifactKey | str) -> str:
    """The digest of a key, or a digest given directly after checking its shape.

    A digest becomes a file name, so anything that could walk out of the store (or is
    not a digest at all) raises ValueError.
    """
    digest = key.digest if isinstance(key, ArtifactKey) else key
    if not DIGEST_RE.match(digest):
        raise ValueError(f"not an artifact digest (64 lowercase hex chars): {digest!r}")
    return digest
