"""Routes: the ways an op can compute one call, and the per-GPU tables that choose among them.

An op declares its candidate routes next to itself (:class:`Route`: its Triton forms and
the standard PyTorch path, which is a candidate too) and a shape bucket for a call
(``bucket(args)``: a short string; lengths that change every batch fall into a few
buckets). Which route runs for a CUDA call is, in this order:

1. the user's table, written by ``mmkernels tune`` on this machine
   (``$MMKERNELS_CACHE_DIR/routes.json``, default ``~/.cache/mmkernels/routes.json``);
2. the table shipped inside the package (``mmkernels/tables/routes.json``), written by
   the project's GPU suite;
3. the route the op names as its default for the call, where it states one (quantized_linear:
   dequantize + cuBLAS from 2048 rows, where the H200 run found its kernels slower than
   cuBLAS alone);
4. the op's heuristic (its launcher's own choice of tiles and forms).

An entry holds the GPU (name and compute capability), the torch and triton versions it
was measured with, the op (with its variant: ``quantized_linear[w4a16]``), the bucket,
the winning route and every candidate's median; only an entry whose GPU and versions are
this process's is used. A table that cannot be read, or is of another format, is ignored
with one warning. ``mmkernels tune`` (:mod:`mmkernels.tune`) writes tables ahead of time;
with ``MMKERNELS_AUTOTUNE=1`` a call whose bucket no table holds tunes it first
(:func:`autotune`), under the table's file lock, and never while ``torch.compile``
traces or a CUDA graph is captured.

What ran, and why, is on the backend decision (:func:`mmkernels.backend.recent_decisions`:
``route`` and ``route_source``: "measured" for the user's table, "shipped", "default",
"forced").
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = [
    "FORMAT",
    "HEURISTIC",
    "TABLE_DEVICE_TYPES",
    "DeviceIdentity",
    "Route",
    "TableEntry",
    "autotune",
    "autotune_enabled",
    "describe",
    "device_identity",
    "force_route",
    "lookup",
    "read_table",
    "reload_tables",
    "routes_forced",
    "shipped_table_path",
    "user_table_path",
    "write_entries",
]

FORMAT = {"format": "mmkernels-routes", "version": 1}
# The route name of an op's own launcher (its heuristic tiles and forms): a table entry may
# name it when it won, so the op keeps its launcher for that bucket.
HEURISTIC = "heuristic"


@dataclasses.dataclass(frozen=True)
class Route:
    """One way to compute a call of an op.

    ``run(args)``: the result for validated arguments (the op's arguments object).
    ``standard``: the standard PyTorch path, the one the op must never be slower than.
    ``applies(args)``: why the route cannot take this call (a string), or None.
    ``capturable``: its launches can be captured in a CUDA graph (tuning times it from
    graph replays; otherwise eagerly, and the table says so)."""

    name: str
    run: Callable[[Any], torch.Tensor]
    standard: bool = False
    applies: Callable[[Any], str | None] | None = None
    capturable: bool = True

    def reason_not(self, args) -> str | None:
        return self.applies(args) if self.applies is not None else None


@dataclasses.dataclass(frozen=True)
class TableEntry:
    gpu: str
    cc: str  # "9.0"
    torch: str
    triton: str
    op: str
    bucket: str
    winner: str
    medians_ms: dict  # route name -> median milliseconds
    timing: str = "cuda-graph"  # or "eager" (a route that cannot be captured)

    @property
    def key(self) -> tuple:
        return (self.gpu, self.cc, self.torch, self.triton, self.op, self.bucket)


def user_table_path() -> Path:
    root = os.environ.get("MMKERNELS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mmkernels")
    return Path(root) / "routes.json"


def shipped_table_path() -> Path:
    return Path(__file__).resolve().parent / "tables" / "routes.json"


def read_table(path: Path) -> list[TableEntry]:
    """The entries of the table at ``path``; [] when it does not exist. Raises ValueError
    for a file that is not such a table (the caller decides whether to warn)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    if not isinstance(data, dict) or {k: data.get(k) for k in FORMAT} != FORMAT:
        got = {k: data.get(k) for k in FORMAT} if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a table of format {FORMAT}, got {got}")
    entries = []
    fields = {f.name for f in dataclasses.fields(TableEntry)}
    for i, raw in enumerate(data.get("entries", [])):
        if not isinstance(raw, dict) or not fields >= set(raw) or not {f for f in fields if f != "timing"} <= set(raw):
            raise ValueError(f"{path}: entry {i} is not a route table entry: {raw!r}"[:300])
        entries.append(TableEntry(**raw))
    return entries


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside ``path`` (``path.lock``): processes that tune the same table
    (vLLM's workers) take turns, each reading what the other wrote."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_entries(path: Path, entries: Iterable[TableEntry]) -> int:
    """Add ``entries`` to the table at ``path`` (an entry replaces one with the same key),
    under the lock; written to a temporary file and renamed, so a reader never sees half
    a table. A corrupt table at ``path`` is replaced, with a warning. Returns the number
    of entries in the table."""
    path = Path(path)
    with _locked(path):
        current = _read_for_update(path)
        for entry in entries:
            current[entry.key] = entry
        _write(path, current)
    reload_tables()
    return len(current)


def _read_for_update(path: Path) -> dict[tuple, TableEntry]:
    try:
        return {e.key: e for e in read_table(path)}
    except ValueError as error:
        warnings.warn(f"mmkernels: replacing an unreadable route table: {error}", stacklevel=3)
        return {}


def _write(path: Path, entries: dict[tuple, TableEntry]) -> None:
    """Write the table (the caller holds the lock)."""
    data = {**FORMAT, "entries": [dataclasses.asdict(e) for e in sorted(entries.values(), key=lambda e: e.key)]}
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Lookup


class _Tables:
    """The user's and the shipped table, read on the first lookup (and again after
    :func:`reload_tables`), as {key: (route, source)}."""

    def __init__(self):
        self.lock = threading.Lock()
        self.index: dict[tuple, tuple[str, str]] | None = None
        self.warned: set[str] = set()

    def get(self) -> dict[tuple, tuple[str, str]]:
        index = self.index
        if index is None:
            with self.lock:
                index = self.index
                if index is None:
                    index = {}
                    # Shipped first, so the user's entries override them.
                    for source, path in (("shipped", shipped_table_path()), ("measured", user_table_path())):
                        try:
                            entries = read_table(path)
                        except (ValueError, OSError) as error:
                            if str(path) not in self.warned:
                                self.warned.add(str(path))
                                warnings.warn(f"mmkernels: ignoring the route table {error}", stacklevel=4)
                            continue
                        for entry in entries:
                            index[entry.key] = (entry.winner, source)
                    self.index = index
        return index


_TABLES = _Tables()
# Devices whose calls read the tables (tests add "cpu" with a stand-in device_identity).
TABLE_DEVICE_TYPES = {"cuda"}
_CHOICES: dict[tuple, tuple[str, str] | None] = {}  # (device, op, bucket) -> (route, source) or None


def reload_tables() -> None:
    """Read the tables again at the next lookup (after ``mmkernels tune`` wrote one, or
    ``MMKERNELS_CACHE_DIR`` or ``MMKERNELS_AUTOTUNE`` changed), and drop the call plans
    recorded under the old choices."""
    _AUTOTUNE[0] = None
    _TRIED.clear()
    _forget_choices()


def _forget_choices() -> None:
    from mmkernels.backend import clear_call_plans

    _TABLES.index = None
    _CHOICES.clear()
    clear_call_plans()


@dataclasses.dataclass(frozen=True)
class DeviceIdentity:
    """What a table entry is keyed by: the GPU's name and compute capability, and the
    torch and triton versions of this process."""

    gpu: str
    cc: str
    torch: str
    triton: str


_IDENTITIES: dict[int, DeviceIdentity] = {}


def device_identity(device: torch.device) -> DeviceIdentity:
    """What a table entry is keyed by for ``device`` (a CUDA device): its name, compute
    capability, and the torch and triton versions of this process."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    identity = _IDENTITIES.get(index)
    if identity is None:
        import triton

        major, minor = torch.cuda.get_device_capability(index)
        identity = DeviceIdentity(torch.cuda.get_device_name(index), f"{major}.{minor}", torch.__version__,
                                  triton.__version__)  # fmt: skip
        _IDENTITIES[index] = identity
    return identity


class _ForcedRoutes(threading.local):
    routes: dict | None = None


_FORCED = _ForcedRoutes()


@contextlib.contextmanager
def force_route(op: str, route: str):
    """Within the block (this thread), calls of ``op`` (its decision name, e.g.
    ``quantized_linear[w8a16]``, or the op name for all its variants) take ``route``
    wherever the kernel backend runs (CUDA, or the interpreter on CPU): how tests check
    every route against the reference. A forced route that cannot take a call (or does
    not exist) is a ``ValueError`` naming why; call plans stand aside in the block."""
    previous = _FORCED.routes
    _FORCED.routes = {**(previous or {}), op: route}
    try:
        yield
    finally:
        _FORCED.routes = previous


def describe(device: torch.device) -> str:
    """One line on what chooses routes for calls on ``device`` (for the patch report)."""
    if device.type not in TABLE_DEVICE_TYPES:
        return "routes: the op's heuristic (route tables are read for CUDA calls)"
    identity = device_identity(device)
    counts = {"measured": 0, "shipped": 0}
    for key, (_, source) in _TABLES.get().items():
        if key[:4] == (identity.gpu, identity.cc, identity.torch, identity.triton):
            counts[source] += 1
    if not any(counts.values()):
        return (f"routes: the op's heuristic (no route table entry for {identity.gpu} with torch {identity.torch} "
                f"and triton {identity.triton}: `mmkernels tune MODEL` measures them)")  # fmt: skip
    return (f"routes: {counts['measured']} buckets measured on this GPU, {counts['shipped']} shipped; "
            f"other shapes: the op's heuristic")  # fmt: skip


def routes_forced() -> bool:
    """Whether a :func:`force_route` scope is open on this thread (call plans then stand aside)."""
    return _FORCED.routes is not None


def lookup(op: str, variant_op: str, device: torch.device, bucket: str) -> tuple[str, str] | None:
    """(route name, source) for a call of ``variant_op`` (``op`` with its variant) in
    ``bucket`` on ``device``: forced, else from the tables (CUDA only), else None (the
    heuristic)."""
    forced = _FORCED.routes
    if forced is not None:
        name = forced.get(variant_op) or forced.get(op)
        if name is not None:
            return name, "forced"
    if device.type not in TABLE_DEVICE_TYPES:
        return None
    key = (device, variant_op, bucket)
    try:
        return _CHOICES[key]
    except KeyError:
        pass
    identity = device_identity(device)
    choice = _TABLES.get().get((identity.gpu, identity.cc, identity.torch, identity.triton, variant_op, bucket))
    if len(_CHOICES) >= 4096:
        _CHOICES.clear()
    _CHOICES[key] = choice
    return choice


# --------------------------------------------------------------------------------------
# Tuning a bucket at its first call (MMKERNELS_AUTOTUNE=1)

_AUTOTUNE: list = [None]  # the environment variable, read at the first call that needs it
_TRIED: set = set()  # (device, op, bucket) tuned (or tried) by this process


def autotune_enabled() -> bool:
    """``MMKERNELS_AUTOTUNE=1``: a call whose bucket no table holds tunes it first."""
    value = _AUTOTUNE[0]
    if value is None:
        value = _AUTOTUNE[0] = os.environ.get("MMKERNELS_AUTOTUNE", "0").lower() in ("1", "true", "yes", "on")
    return value


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def autotune(op, args, variant_op: str, bucket: str, device: torch.device) -> tuple[str, str] | None:
    """Tune the bucket of this call of ``op`` now, with its own arguments, into the user's
    table, and return the table's choice (as :func:`lookup`). Under the table's lock: a
    process that waited finds the entry another wrote and times nothing. Never while
    ``torch.compile`` traces or a CUDA graph is captured (the call then takes the
    heuristic, and a later eager call tunes); once per bucket and process."""
    if torch.compiler.is_compiling() or _capturing():
        return None
    if (device, variant_op, bucket) in _TRIED:
        return None
    _TRIED.add((device, variant_op, bucket))
    from mmkernels import tune

    identity = device_identity(device)
    key = (identity.gpu, identity.cc, identity.torch, identity.triton, variant_op, bucket)
    path = user_table_path()
    with _locked(path):
        current = _read_for_update(path)
        if key not in current:
            winner, medians, _rejected, timing = tune.measure(op, args, timer=tune.default_timer(device),
                                                              reduction_length=op.reduction_length(args))  # fmt: skip
            if winner is None:
                return None
            current[key] = TableEntry(*key[:4], variant_op, bucket, winner, medians, timing)
            _write(path, current)
    _forget_choices()  # read the table again (with what another process may have added)
    return lookup(op.decision_name, variant_op, device, bucket)
