"""Manifests: what the store records about one artifact, next to it, as JSON.

A manifest is written after its artifact, so its appearance means the artifact is
complete; it carries the checksum and size that loading verifies, and the times that gc
orders entries by.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pwdaemon.store.keys import DIGEST_RE, ArtifactKey

__all__ = ("MANIFEST_FORMAT", "Manifest", "VerifyResult")

# Bumped when the manifest's fields change meaning; other formats are refused, not guessed.
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Manifest:
    """What the store knows about one artifact. `artifact` is where its bytes live."""

    key: ArtifactKey
    sha256: str
    size: int
    compile_seconds: float
    created: float
    last_used: float
    artifact: Path
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """The key's digest, which names the artifact on disk."""
        return self.key.digest

    def to_json(self) -> dict[str, object]:
        """The manifest as a JSON object (the artifact's path is implied by where it lies)."""
        return {
            "format": MANIFEST_FORMAT,
            "digest": self.digest,
            "key": self.key.fields(),
            "sha256": self.sha256,
            "size": self.size,
            "compile_seconds": self.compile_seconds,
            "created": self.created,
            "last_used": self.last_used,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: object, artifact: Path) -> Manifest:
        """Parse and validate; ValueError says what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("manifest is not a JSON object")
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {data.get('format')!r}")
        key_data = data.get("key")
        if not isinstance(key_data, dict):
            raise ValueError("manifest has no key")
        key = ArtifactKey.from_fields(key_data)
        if data.get("digest") != key.digest:
            raise ValueError("manifest digest does not match its key fields")
        sha = data.get("sha256")
        if not isinstance(sha, str) or not DIGEST_RE.match(sha):
            raise ValueError("manifest sha256 missing or malformed")
        size = data.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("manifest size missing or malformed")
        numbers: dict[str, float] = {}
        for name in ("compile_seconds", "created", "last_used"):
            value = data.get(name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"manifest {name} missing or not a number")
            numbers[name] = float(value)
        extra = data.get("extra", {})
        if not isinstance(extra, dict):
            raise ValueError("manifest extra is not an object")
        return cls(key=key, sha256=sha, size=size, artifact=artifact, extra=extra, **numbers)


class VerifyResult(NamedTuple):
    """One row of `ArtifactStore.verify()`; `manifest` is None when it could not be read."""

    digest: str
    manifest: Manifest | None
    ok: bool
    reason: str
