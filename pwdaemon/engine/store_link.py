"""How the engine uses the artifact store: keys, warm restarts, profiles, peer pickup.

The store itself (`pwdaemon.store`) knows nothing of graph pieces; this module maps a
(piece, target) to an `ArtifactKey`, finds what a previous run or another process left
for this model's pieces, and turns store events into targets the engine can publish.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pwdaemon.serving.piece import GraphPiece
from pwdaemon.serving.range_table import Target, TargetKind
from pwdaemon.serving.strategy import ShapeStrategy
from pwdaemon.store import ArtifactKey, ArtifactStore, Manifest, UnsafeStoreError, make_key
from pwdaemon.store.refusals import load_refusal, save_refusal
from pwdaemon.workers.compiler import CPU_THREADS_OPTION, SIZE_OBLIVIOUS_OPTION
from pwdaemon.workers.sdpa import SDPA_OFF_OPTION, sdpa_backends_off

log = logging.getLogger(__name__)


def parse_target(label: str) -> Target | None:
    """A stored manifest's target label -> Target; None for labels this engine skips."""
    try:
        target = Target.parse(label)
    except ValueError:
        return None
    return None if target.kind is TargetKind.GRAPH else target


def compile_options(options: Mapping[str, Any], piece: GraphPiece) -> dict[str, Any]:
    """The options a compile of `piece` is sent with, and its store key hashes: the
    configured ones, plus the shape configuration the piece was traced under, the
    attention backends this process turned off (`SDPA_OFF_OPTION`) and, for a CPU
    piece, this process's torch thread count (`CPU_THREADS_OPTION` says why)."""
    out = dict(options)
    if piece.strategy is ShapeStrategy.BACKED_OBLIVIOUS:
        out[SIZE_OBLIVIOUS_OPTION] = True
    if piece.device.startswith("cpu"):
        out[CPU_THREADS_OPTION] = torch.get_num_threads()
    off = sdpa_backends_off()
    if off:
        out[SDPA_OFF_OPTION] = off
    return out


def model_id(model: torch.nn.Module, dynamic: Mapping[str, int] | None) -> str:
    """What a model's strategy failures are remembered under, known before any trace:
    its class and package version, torch's version, the size marks, and every
    parameter's and buffer's name, shape, dtype and device (not the values: a restart
    loads new weights into the same model). ~1 ms for the issue-sized BERT's 101 tensors."""
    cls = type(model)
    package = sys.modules.get(cls.__module__.partition(".")[0])
    parts = [
        f"{cls.__module__}.{cls.__qualname__} {getattr(package, '__version__', '')}",
        f"torch {torch.__version__}",
        f"dynamic {sorted(dynamic.items()) if dynamic else None} training {model.training}",
    ]
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        parts.append(f"{name} {tuple(t.shape)} {t.dtype} {t.device.type}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class StoreLink:
    """The engine's view of one `ArtifactStore` (shared by all pieces of a model)."""

    def __init__(self, store: ArtifactStore, options: Mapping[str, Any]) -> None:
        self.store = store
        self.options = dict(options)
        self.enabled = True

    def key(self, piece: GraphPiece, target: Target) -> ArtifactKey:
        """The store key of (piece, target): graph, target, device, torch, options."""
        options = compile_options(self.options, piece)
        return make_key(piece.fingerprint, target.label, device=piece.device, options=options)

    def lookup(self, key: ArtifactKey) -> Path | None:
        """The verified artifact for `key`, or None (also once the store is refused)."""
        if not self.enabled:
            return None
        try:
            return self.store.lookup(key)
        except UnsafeStoreError as exc:
            # Loading code from a directory others can write is refused once, loudly;
            # serving and compiling go on without the store.
            log.error("pwdaemon: not loading from the artifact store: %s", exc)
            self.enabled = False
            return None

    def publish(
        self, key: ArtifactKey, src: str, seconds: float, extra: dict[str, Any]
    ) -> Path | None:
        """Put a compiled artifact into the store; its path there, or None."""
        if not self.enabled:
            return None
        return self.store.publish(key, src, compile_seconds=seconds, extra=extra)

    def refusal(self, key: ArtifactKey) -> str | None:
        """Why a worker refused to compile `key` in an earlier run, or None."""
        return load_refusal(self.store, key) if self.enabled else None

    def remember_refusal(self, key: ArtifactKey, reason: str) -> None:
        """Remember a worker's refusal of `key` for later runs (`pwdaemon.store.refusals`)."""
        if self.enabled:
            save_refusal(self.store, key, reason)

    def stored_targets(self, piece: GraphPiece) -> list[Target]:
        """Targets the store already holds for this piece (same torch, device, options)."""
        if not self.enabled:
            return []
        probe = self.key(piece, Target.general())
        found: list[Target] = []
        try:
            manifests = self.store.entries()
        except OSError as exc:
            log.warning("pwdaemon: could not list the artifact store: %s", exc)
            return []
        for m in manifests:
            if self.matches(probe, m):
                t = parse_target(m.key.target)
                if t is not None:
                    found.append(t)
        return found

    @staticmethod
    def matches(probe: ArtifactKey, m: Manifest) -> bool:
        """Whether manifest `m` was compiled for the same graph, device, versions, options."""
        k = m.key
        return (
            k.graph_hash == probe.graph_hash
            and k.device == probe.device
            and k.torch_version == probe.torch_version
            and k.triton_version == probe.triton_version
            and k.options_hash == probe.options_hash
        )

    def profile_id(self, piece: GraphPiece) -> str:
        """The store id of the piece's size profile (a hash of its fingerprint)."""
        return hashlib.sha256(f"profile:{piece.fingerprint}".encode()).hexdigest()[:32]

    def load_profile(self, piece: GraphPiece) -> dict[int, int]:
        """Calls per size the last run saw for this piece ({} when none or unreadable)."""
        try:
            return self.store.load_profile(self.profile_id(piece))
        except (OSError, ValueError) as exc:
            log.warning("pwdaemon: could not read the size profile: %s", exc)
            return {}

    def save_profile(self, piece: GraphPiece, counts: Mapping[int, int]) -> None:
        """Save calls per size for the next run (nothing when there were no calls)."""
        if counts:
            self.store.save_profile(self.profile_id(piece), counts)

    def failed_strategies(self, model: str) -> dict[ShapeStrategy, str]:
        """Strategies that failed to trace the model `model_id` names in an earlier run."""
        try:
            failed = self.store.load_strategy_failures(model)
        except (OSError, ValueError) as exc:
            log.warning("pwdaemon: could not read the failed strategies: %s", exc)
            return {}
        known = {s.value: s for s in ShapeStrategy}
        return {known[k]: why for k, why in failed.items() if k in known}

    def remember_failed_strategy(self, model: str, strategy: ShapeStrategy, why: str) -> None:
        """Add `strategy` to the model's failed strategies, for its next start."""
        failed = {s.value: r for s, r in self.failed_strategies(model).items()}
        failed[strategy.value] = why[:2000]  # dynamo's reason can carry a long stack
        self.store.save_strategy_failures(model, failed)

    def extra(self, piece: GraphPiece, model: str) -> dict[str, Any]:
        """What a manifest records about who compiled it: graph index, model, pid."""
        return {"graph": piece.index, "model": model, "pid": os.getpid()}
