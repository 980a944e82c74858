"""Watching a store for artifacts that other processes publish.

A watchdog observer (inotify, or polling where inotify is unavailable) reports manifest
events from its own thread; a second thread debounces them per digest and calls back
once a digest has been quiet. A manifest appears only after its artifact is complete,
so a reported digest can be looked up and loaded at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pwdaemon.store.files import MANIFEST_SUFFIX, is_manifest_name

if TYPE_CHECKING:
    from watchdog.events import FileSystemEvent
    from watchdog.observers.api import BaseObserver

    from pwdaemon.store.store import ArtifactStore

__all__ = ("StoreWatcher",)

log = logging.getLogger(__name__)


class StoreWatcher:
    """Calls `callback(digest, artifact_path)` when a complete artifact appears in the store.

    A watchdog observer reports manifest events from its own thread; a second thread
    debounces them per digest (a publish produces several events) and calls the callback
    once the digest has been quiet for `debounce_s`. Manifest rewrites that do not change
    the artifact (last-used updates by lookups) are not reported again.
    """

    def __init__(
        self,
        store: ArtifactStore,
        callback: Callable[[str, Path], None],
        *,
        polling: bool = False,
        debounce_s: float = 0.2,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.store = store
        self._callback = callback
        self._debounce_s = debounce_s
        self._poll_interval_s = poll_interval_s
        self._cond = threading.Condition()
        self._pending: dict[str, float] = {}  # digest -> monotonic deadline
        self._reported: dict[str, str] = {}  # digest -> sha256 last reported
        self._stopping = False
        store.ensure_layout()  # the observer needs the directory to exist
        self._observer = self._make_observer(polling)
        self.polling = polling
        self._thread = threading.Thread(
            target=self._run, name="pwdaemon-store-watcher", daemon=True
        )

    def _make_observer(self, polling: bool) -> BaseObserver:
        # Imported here: watchdog starts nothing at import, but processes that never
        # watch (workers, the CLI) need not load it.
        from watchdog.events import (
            DirCreatedEvent,
            DirMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileMovedEvent,
            FileSystemEventHandler,
        )
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                watcher._on_event(event)

        observer = PollingObserver(timeout=self._poll_interval_s) if polling else Observer()
        observer.schedule(
            _Handler(),
            str(self.store.artifacts_dir),
            recursive=True,
            # Opens and no-write closes (every lookup reads manifests) are not wanted.
            event_filter=[
                FileCreatedEvent,
                FileMovedEvent,
                FileClosedEvent,
                FileDeletedEvent,
                DirCreatedEvent,
                DirMovedEvent,
            ],
        )
        return observer

    def start(self) -> StoreWatcher:
        """Start the observer (falling back to polling if inotify is refused) and the
        debounce thread; returns self."""
        try:
            self._observer.start()
        except OSError as exc:
            if self.polling:
                raise
            # Typically the inotify watch or instance limit: polling still works.
            log.warning(
                "cannot watch %s with inotify (%s); polling every %.1f s instead",
                self.store.artifacts_dir,
                exc,
                self._poll_interval_s,
            )
            self.polling = True
            self._observer = self._make_observer(polling=True)
            self._observer.start()
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop watching and join both threads; pending (not yet quiet) events are dropped."""
        self._observer.stop()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._observer.is_alive():
            self._observer.join(timeout)
        # A callback may stop its own watcher; a thread cannot join itself.
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> StoreWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Called on the observer thread.
    def _on_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        src = os.path.basename(os.fsdecode(event.src_path))
        dest = os.path.basename(os.fsdecode(event.dest_path)) if event.dest_path else ""
        kind = event.event_type
        if kind in ("deleted", "moved") and is_manifest_name(src):
            # Quarantined or removed: forget it, so a republish is reported even when it
            # has the same checksum as before.
            with self._cond:
                digest = src[: -len(MANIFEST_SUFFIX)]
                self._pending.pop(digest, None)
                self._reported.pop(digest, None)
        name = dest if kind == "moved" else src
        if kind in ("created", "moved", "closed") and is_manifest_name(name):
            with self._cond:
                self._pending[name[: -len(MANIFEST_SUFFIX)]] = time.monotonic() + self._debounce_s
                self._cond.notify_all()

    # The debounce thread.
    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    due = [d for d, t in self._pending.items() if t <= now]
                    if due:
                        for digest in due:
                            del self._pending[digest]
                        break
                    wait = min(self._pending.values()) - now if self._pending else None
                    self._cond.wait(wait)
            for digest in due:
                self._fire(digest)

    def _fire(self, digest: str) -> None:
        manifest = self.store.manifest(digest)
        if manifest is None:
            return  # unreadable or gone: a later event (if any) tries again
        with self._cond:
            if self._reported.get(digest) == manifest.sha256:
                return
            self._reported[digest] = manifest.sha256
        try:
            self._callback(digest, manifest.artifact)
        except Exception:
            log.exception("artifact watcher callback failed for %s", digest[:12])
