"""Host syncs: counted apart from timing, around one call (:func:`count_host_syncs`), and
the mmkernels backend decisions recorded meanwhile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


def _host_sync_counter_class():
    try:
        from mmkernels.testing import HostSyncCounter
    except Exception as exc:  # not landed, or broken: rows say so
        return None, f"mmkernels.testing.HostSyncCounter unavailable ({type(exc).__name__}: {exc})"
    return HostSyncCounter, ""


def mmkernels_decision_mark():
    """A mark of the newest recorded mmkernels backend decision (its sequence number:
    decisions are cached, so the same object is recorded call after call)."""
    try:
        from mmkernels.backend import decision_mark
    except Exception:
        return None
    return decision_mark()


def mmkernels_decisions_since(mark) -> str:
    """The distinct backend decisions recorded after ``mark``, joined by "; "."""
    if mark is None:
        return ""
    from mmkernels.backend import decisions_since

    return "; ".join(dict.fromkeys(str(d) for d in decisions_since(mark)))


def unexpected_backends(decisions: str, expected: str) -> list[str]:
    """The recorded decisions (``"op: backend[ via route (source)][ (reasons)]"``) whose
    backend is not ``expected`` (the route a table chose is not the backend)."""
    return [d for d in decisions.split("; ") if d and d.split(": ", 1)[-1].split(" ", 1)[0] != expected]


@dataclass(frozen=True)
class SyncCount:
    count: int | None
    ops: dict
    note: str = ""


def count_host_syncs(fn: Callable[[Any], Any], inputs: Any, counter_class=None) -> SyncCount:
    """Host syncs of one ``fn(inputs)`` call, with ``HostSyncCounter`` (or ``counter_class``:
    a context manager with ``.count`` and ``.ops``)."""
    note = ""
    if counter_class is None:
        counter_class, note = _host_sync_counter_class()
        if counter_class is None:
            return SyncCount(None, {}, note)
    try:
        with counter_class() as counter:
            fn(inputs)
    except Exception as exc:
        return SyncCount(None, {}, f"counting raised {type(exc).__name__}: {exc}")
    return SyncCount(int(counter.count), dict(counter.ops))
