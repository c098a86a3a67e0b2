"""Hot reload of the running bundle: a new bundle goes live only if it loads, type-checks and passes its tests.

Stages, in order: load (parse, validate, compile and type-check every CEL expression: ``load_bundle``), then
the bundle's own PolicyTest cases. Any problem in any stage refuses the whole bundle and the last good one
keeps deciding; the refusal lists every problem with its ``file:line``. Activation is one reference swap in
:class:`ActiveBundle`, so a request that already read ``current`` finishes on the bundle it started with.

Two triggers share one lock, so they never reload concurrently: an explicit :meth:`BundleReloader.reload`
(``pdp serve`` calls it on SIGHUP) and a watcher thread that polls the directory. Polling is portable and
needs no dependency; a bundle is a few dozen small files, so a fingerprint of their stat data is cheap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pdp.policy.bundle import ActiveBundle, PolicyBundle
from pdp.policy.loader import BundleError, load_bundle
from pdp.policy.source import _bundle_files
from pdp.policy.testing import failing_tests

log = logging.getLogger(__name__)

# (relative path, inode, mtime_ns, size) of every YAML file the loader would read.
Fingerprint = tuple[tuple[str, int, int, int], ...]


class ReloadStatus(Enum):
    ACTIVATED = "activated"
    UNCHANGED = "unchanged"  # the directory holds the bundle already active: nothing to do
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class ReloadResult:
    status: ReloadStatus
    reason: str  # what triggered the reload: "watch", "sighup", …
    # The version active before the reload, and the one active after it (equal unless ACTIVATED).
    previous_version: str
    policy_version: str
    # For REFUSED: every problem, one per line, each starting with file:line.
    error: str = ""


class BundleReloader:
    """Reloads ``directory`` into ``active`` on demand and, once started, whenever its files change.

    The server audits outcomes through two callbacks, run on the reloading thread with the lock held:

    - ``on_activated(previous, new, reason)`` runs once ``new`` passed every stage, *before* it is swapped in,
      so no decision by ``new`` precedes the record of its activation. If it raises, ``new`` is not
      activated: the reload counts as refused (no audit event, no decision made with that bundle).
    - ``on_refused(error, reason)`` runs after a refusal; an exception it raises is logged.

    ``activations`` and ``refusals`` count outcomes for metrics.
    """

    def __init__(
        self,
        directory: str | Path,
        active: ActiveBundle,
        *,
        on_activated: Callable[[PolicyBundle, PolicyBundle, str], None] | None = None,
        on_refused: Callable[[str, str], None] | None = None,
        interval: float = 1.0,
    ) -> None:
        self.directory = Path(directory)
        self._active = active
        self._on_activated = on_activated
        self._on_refused = on_refused
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.activations = 0
        self.refusals = 0

    # --- reloading -------------------------------------------------------------------------------------

    def reload(self, reason: str) -> ReloadResult:
        """Load, check and test the directory's bundle; activate it only if every stage passes."""
        with self._lock:
            current = self._active.current
            try:
                candidate = load_bundle(self.directory)
            except BundleError as exc:
                return self._refuse(reason, current, str(exc))
            except OSError as exc:  # a file removed or unreadable between listing and reading it
                return self._refuse(reason, current, f"{self.directory}: cannot read the bundle: {exc}")
            if candidate.policy_version == current.policy_version:
                return ReloadResult(ReloadStatus.UNCHANGED, reason, current.policy_version, current.policy_version)
            failures = failing_tests(candidate)
            if failures:
                return self._refuse(reason, current, "\n".join(failures))
            if not candidate.tests:
                # Allowed, as at startup; but a bundle that lost its tests also lost the safety net of reload.
                log.warning("policy bundle %s has no PolicyTest cases; activating it untested", self.directory)
            if self._on_activated is not None:
                try:
                    self._on_activated(current, candidate, reason)
                except Exception as exc:  # typically the database: the refusal below logs it
                    error = (
                        f"{self.directory}: the activation of {candidate.policy_version} could not be recorded: {exc}"
                    )
                    return self._refuse(reason, current, error)
            self._active.swap(candidate)
            self.activations += 1
            log.info(
                "policy bundle %s activated (%s): %s -> %s",
                self.directory,
                reason,
                current.policy_version,
                candidate.policy_version,
            )
            return ReloadResult(ReloadStatus.ACTIVATED, reason, current.policy_version, candidate.policy_version)

    def _refuse(self, reason: str, current: PolicyBundle, error: str) -> ReloadResult:
        self.refusals += 1
        log.error(
            "policy bundle %s refused (%s); policy %s stays active. Problems:\n%s",
            self.directory,
            reason,
            current.policy_version,
            error,
        )
        if self._on_refused is not None:
            try:
                self._on_refused(error, reason)
            except Exception:
                log.exception("recording the refusal of policy bundle %s failed", self.directory)
        return ReloadResult(ReloadStatus.REFUSED, reason, current.policy_version, current.policy_version, error)

    # --- watching --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Watch the directory in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        # Taken here, not in the thread, so a change made right after start() is not mistaken for the baseline.
        baseline = self.fingerprint()
        self._thread = threading.Thread(target=self._watch, args=(baseline,), name="pdp-policy-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            # A reload in progress finishes first (it holds no resources the server is closing before us).
            self._thread.join(30)

    def fingerprint(self) -> Fingerprint:
        """Stat data of the YAML files the loader reads (hidden directories skipped the same way)."""
        entries: list[tuple[str, int, int, int]] = []
        try:
            files = _bundle_files(self.directory)
        except OSError:  # the directory itself is gone or unreadable: an empty bundle, which will be refused
            return ()
        for path in files:
            try:
                st = path.stat()
            except OSError:  # removed since it was listed; the next poll sees the settled state
                continue
            entries.append((path.relative_to(self.directory).as_posix(), st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(sorted(entries))

    def _watch(self, seen: Fingerprint) -> None:
        while not self._stop.wait(self._interval):
            try:
                latest = self.fingerprint()
                if latest == seen:
                    continue
                # Editors and `git checkout` write a bundle in several steps: wait until a whole interval passes
                # without change, so a half-written bundle is not loaded (and refused) needlessly.
                while True:
                    if self._stop.wait(self._interval):
                        return
                    settled = self.fingerprint()
                    if settled == latest:
                        break
                    latest = settled
                # Remembered before reloading, so a refused bundle is reported once, not on every poll;
                # the next edit (or a SIGHUP) tries again.
                seen = latest
                self.reload("watch")
            except Exception:  # the watcher must outlive any surprise; the next change tries again
                log.exception("watching policy bundle %s failed", self.directory)
