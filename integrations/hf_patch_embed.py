"""The fused patch-embed patch for Hugging Face vision embeddings, and its specs.

What Hugging Face does (``CLIPVisionEmbeddings.forward``; SigLIP without the class row)::

    patch_embeds = self.patch_embedding(pixel_values.to(dtype=target_dtype))  # Conv2d, stride == kernel
    patch_embeds = patch_embeds.flatten(2).transpose(1, 2)                    # (B, N, D)
    embeddings = torch.cat([class_embeds, patch_embeds], dim=1)               # another pass
    embeddings = embeddings + self.position_embedding(self.position_ids)      # and another

and Qwen2-VL's ``PatchEmbed`` (a ``Conv3d`` over pre-flattened ``(N, C*T*P*P)`` patches)::

    hidden_states = self.proj(hidden_states.view(-1, C, T, P, P).to(dtype=target_dtype)).view(-1, D)

The patched ``forward`` makes ONE call of :func:`mmkernels.ops.patch_embed` with the
module's own parameters (projection weight and bias, class embedding) and its own position
table: ``self.position_embedding(self.position_ids)``, which with arange ids (what CLIP
and SigLIP register) is the embedding weight's first rows, passed as a view and so always
current (:func:`_position_rows`; other ids are looked up on every call), or with
``interpolate_pos_encoding=True`` what the module's own ``interpolate_pos_encoding``
returns, computed once per image size and kept while its sources are unchanged
(:class:`PositionTables`: an in-place write through ``.data`` is not seen, drop the
tables with :func:`mmkernels.integrations.clear_caches`). Nothing of the model's code is
copied: a spec names the submodules and the method; every call the op does not cover
goes to the original ``forward`` untouched:

* an argument the spec does not know, pixels that are not a floating tensor of the
  expected rank, or on another device than the weight (the original raises its own error);
* a projection that is no longer a plain ``Conv2d`` / ``Conv3d`` with stride == kernel
  (wrapped by an adapter, or carrying hooks, such as accelerate's offloading);
* parameters of mixed dtypes (the original's type promotion decides the output dtype);
* an image size the module rejects (CLIP without interpolation) or a position table whose
  length does not match the patches (the original raises).

BLIP-2's ``Blip2VisionEmbeddings`` and ViT's ``ViTEmbeddings`` keep the class token as a
``(1, 1, D)`` parameter and the position table as a ``(1, 1+N, D)`` parameter
(``position_table``); BLIP-2 adds the table's first rows (``position_prefix``), ViT checks
the image size, runs its conv inside ``ViTPatchEmbeddings`` (a dotted ``projection``),
takes ``bool_masked_pos`` (mask tokens: the original runs) and ends with a dropout (the op
runs while it is the identity).

Pixtral and Mllama add their positions in the tower's own ``forward`` (rotary, gated
tile tables), and so do the NaViT-style towers (Idefics2/3, SmolVLM, Phi-4-multimodal,
MiniCPM-V, Ovis2: positions bucketed per image), the towers fed pre-cut patches (Kimi
K2.5's MoonViT, PaddleOCR-VL, LLaVA-OneVision-1.5, HunYuan-VL and others) and the
SAM-style encoders (GOT-OCR2, PP-FormulaNet, the SAM towers of DeepSeek-OCR2,
Unlimited-OCR and DeepSeek-VL-hybrid: a position grid added to the conv's
``(B, H/P, W/P, D)`` output): ``CONV_PATCH_SPECS``. Only their bare patch ``Conv2d`` is
replaced (:class:`ConvPatchRule`; where the tower has other convs the conv checks would
accept, a 1x1 neck conv or a patch merger's, the spec names the patch conv's path):
the conv's ``forward`` returns the op's rows viewed in the conv's ``(B, D, H/P, W/P)``
layout, which the tower's ``flatten(2).transpose(1, 2)`` (SAM's ``permute(0, 2, 3, 1)``)
turns back without a copy.
Llama 4 writes its patch embedding as ``nn.Unfold`` + ``nn.Linear``
(``Llama4UnfoldConvolution``): the same product, one op call with the Linear's weight viewed
as a conv weight (:class:`UnfoldPatchRule`).

Matching: CLIP, SigLIP and BLIP-2 embeddings carry their vision config
(``clip_vision_model``, ``siglip_vision_model``, ``blip_2_vision_model``); ViT's embeddings
and Qwen2-VL's ``PatchEmbed`` have none and are matched under their tower's (``vit``,
``qwen2_vl_vision``), see :mod:`.engine`.

GIT's and Kosmos-2's embeddings are CLIP's, Granite Docling's SigLIP's, InstructBLIP's and
InstructBLIP-Video's BLIP-2's, Qianfan-OCR's InternViT's: the same source under other names
(compared apart from the names, 5.17 to 5.25), listed as copies of those specs.

Read against ``transformers/models/{clip,siglip,blip_2,vit,qwen2_vl,qwen2_5_vl}/modeling_*.py``,
versions 5.17 to 5.24 (the forwards are the same in that range); the newer towers against
5.25 (each table row says which release first has it: ``coverage_versions.json``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import weakref
from typing import Any, Callable

import torch

from mmkernels.ops.patch_embed import CAPABILITIES as PATCH_EMBED_CAPABILITIES

from .engine import Call, PatchOptions, SpecRule, backend_note, bind_call, forward_signature, original_method

__all__ = ["CONV_PATCH_SPECS", "ConvPatchRule", "ConvPatchSpec", "PATCH_EMBED_SPECS", "PatchEmbedRule", "PatchEmbedSpec",
           "PositionTables", "UNFOLD_PATCH_SPECS", "UnfoldPatchRule", "UnfoldPatchSpec", "clear_position_caches",
           "position_tables"]  # fmt: skip

PATCH_EMBED_OP = "patch_embed"
IMAGE_FORM = "image"  # (B, C, H, W) pixels, Conv2d
FLAT_FORM = "flat"  # (N, C*T*P*P) pre-flattened patches, Conv3d (Qwen2-VL)


@dataclasses.dataclass(frozen=True)
class PatchEmbedSpec:
    """The patch-embed patch for one embeddings class, as data: attribute names only.

    ``form``: :data:`IMAGE_FORM` (``Conv2d`` over ``(B, C, H, W)``) or :data:`FLAT_FORM`
    (``Conv3d`` over pre-flattened patches; the module's ``in_channels``,
    ``temporal_patch_size``, ``patch_size`` and ``embed_dim`` must match the weight).
    ``pixels``: the forward argument carrying the pixels; ``flag_arguments``: the other
    arguments the forward takes (only ``interpolate_pos_encoding`` here).
    ``projection``: the conv submodule (a dotted path through plain modules, such as ViT's
    ``patch_embeddings.projection``); ``class_embedding``: a parameter of ``D`` elements
    (``(D,)`` or ``(1, 1, D)``) prepended as row 0; ``position_embedding`` /
    ``position_ids``: the table module and the ids it is looked up with, or
    ``position_table``: a ``(1, positions, D)`` parameter added as is (BLIP-2, ViT);
    ``position_prefix``: the forward adds the table's first rows only (BLIP-2 slices
    ``[:, :rows]``; a smaller image takes a prefix); ``interpolation``: the module's method
    ``(embeddings, height, width)`` that returns the position table when
    ``interpolate_pos_encoding`` is true (it reads only the shape of ``embeddings``);
    ``image_size``: the attribute (an int or ``(height, width)``) the forward checks the
    image size against when not interpolating (None: no check). ``none_arguments``: forward
    arguments the op covers only when they are None (ViT's ``bool_masked_pos``: mask
    tokens run the original); ``dropout``: a ``Dropout`` submodule applied to the result,
    covered only while it is the identity (eval mode or ``p == 0``). ``always_interpolates``:
    the forward takes no ``interpolate_pos_encoding`` flag and always adds the table its
    ``interpolation`` method returns (InternViT, DINO-style: the stored table where the
    grid matches it, else interpolated); a ``position_table`` that is None (the tower built
    without one) runs the original.
    """

    family: str
    model_type: str
    model_class: str
    form: str
    pixels: str
    projection: str
    flag_arguments: tuple[str, ...] = ()
    class_embedding: str | None = None
    position_embedding: str | None = None
    position_ids: str | None = None
    interpolation: str | None = None
    image_size: str | None = None
    position_table: str | None = None
    position_prefix: bool = False
    none_arguments: tuple[str, ...] = ()
    dropout: str | None = None
    always_interpolates: bool = False

    def __post_init__(self):
        if self.form not in (IMAGE_FORM, FLAT_FORM):
            raise ValueError(f"{self.family}: form {self.form!r} not in {(IMAGE_FORM, FLAT_FORM)}")
        if (self.position_embedding is None) != (self.position_ids is None):
            raise ValueError(f"{self.family}: position_embedding and position_ids come together")
        if self.position_embedding is not None and self.position_table is not None:
            raise ValueError(f"{self.family}: position_embedding (a module) or position_table (a tensor), not both")
        if self.position_prefix and self.position_table is None:
            raise ValueError(f"{self.family}: position_prefix slices a position_table")
        if self.form == FLAT_FORM and (self.class_embedding or self.has_position or self.interpolation):
            raise ValueError(f"{self.family}: the flat form takes no class or position embedding")
        if self.always_interpolates and (self.interpolation is None or self.flag_arguments):
            raise ValueError(f"{self.family}: always_interpolates takes an interpolation method and no flag")

    @property
    def has_position(self) -> bool:
        return self.position_embedding is not None or self.position_table is not None

    @property
    def arguments(self) -> tuple[str, ...]:
        """Every forward argument the patched forward may see and still run the op."""
        return (self.pixels, *self.flag_arguments, *self.none_arguments)


# --------------------------------------------------------------------------------------
# What the op can stand in for


def _conv_reasons(conv: Any, form: str, *, patched_self: bool = False) -> list[str]:
    """Why ``conv`` is not a projection the op computes (empty when it is).
    ``patched_self``: ``conv`` is the module whose forward mmkernels replaced (the
    instance ``forward`` is ours, not a reason)."""
    conv_type = torch.nn.Conv2d if form == IMAGE_FORM else torch.nn.Conv3d
    if not isinstance(conv, conv_type):
        return [f"projection is {type(conv).__name__}, not a {conv_type.__name__}"]
    reasons = []
    if type(conv).forward is not conv_type.forward or ("forward" in conv.__dict__ and not patched_self):
        reasons.append(f"projection {type(conv).__name__} has its own forward")
    if conv._forward_hooks or conv._forward_pre_hooks:
        reasons.append("projection has forward hooks")
    kernel = tuple(conv.kernel_size)
    if tuple(conv.stride) != kernel:
        reasons.append(f"stride {tuple(conv.stride)} != kernel {kernel}")
    if kernel[-1] != kernel[-2]:
        reasons.append(f"kernel {kernel} is not square")
    if conv.padding != "valid" and any(conv.padding):
        reasons.append(f"padding {conv.padding}")
    if any(d != 1 for d in conv.dilation):
        reasons.append(f"dilation {tuple(conv.dilation)}")
    if conv.groups != 1:
        reasons.append(f"groups {conv.groups}")
    return reasons


def _projection(module: torch.nn.Module, spec: PatchEmbedSpec) -> Any:
    """The conv at ``spec.projection`` (a dotted path), or None."""
    try:
        return module.get_submodule(spec.projection)
    except AttributeError:
        return None


def _path_reasons(module: torch.nn.Module, spec: PatchEmbedSpec) -> list[str]:
    """Why the modules between the embeddings and the conv (ViT's ``ViTPatchEmbeddings``)
    do not just run their class ``forward``: the op stands in for them too."""
    reasons = []
    path = ""
    for part in spec.projection.split(".")[:-1]:
        path = f"{path}.{part}" if path else part
        inner = getattr(module, part, None)
        if not isinstance(inner, torch.nn.Module):
            return reasons + [f"no module {path}"]
        if "forward" in inner.__dict__ or inner._forward_hooks or inner._forward_pre_hooks:
            reasons.append(f"{path} has forward hooks or its own forward")
        module = inner
    return reasons


def _dropout_reasons(module: torch.nn.Module, spec: PatchEmbedSpec, *, now: bool) -> list[str]:
    """Why the dropout after the embeddings is not one the op may leave out (``now``: also
    whether it is the identity at this moment: eval mode or ``p == 0``)."""
    if spec.dropout is None:
        return []
    dropout = getattr(module, spec.dropout, None)
    if not isinstance(dropout, torch.nn.Dropout) or type(dropout).forward is not torch.nn.Dropout.forward:
        return [f"{spec.dropout} is {type(dropout).__name__}, not a plain Dropout"]
    if "forward" in dropout.__dict__ or dropout._forward_hooks or dropout._forward_pre_hooks:
        return [f"{spec.dropout} has forward hooks or its own forward"]
    if now and dropout.training and dropout.p > 0:
        return [f"{spec.dropout} is active (training, p={dropout.p})"]
    return []


def _image_size(value: Any) -> tuple[int, int] | None:
    """``image_size`` as (height, width): an int or a pair of ints (ViT's ``to_2tuple``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _flat_shape_reasons(module: torch.nn.Module, conv: torch.nn.Conv3d) -> list[str]:
    dim, channels, frames, patch, _ = conv.weight.shape
    reasons = []
    for name, want in (("in_channels", channels), ("temporal_patch_size", frames), ("patch_size", patch),
                       ("embed_dim", dim)):  # fmt: skip
        value = getattr(module, name, None)
        if value != want:
            reasons.append(f"{name} is {value!r}, the weight says {want}")
    return reasons


def _pixel_dtype_ok(pixels: torch.Tensor) -> bool:
    # uint8 only reaches the op with normalization (the replacement adds it, or declines).
    return pixels.is_floating_point() or pixels.dtype == torch.uint8


def _normalization_tensors(normalization, channels: int, device) -> dict | None:
    """The op's ``pixel_norm`` for ``patch(pixel_normalization=...)``: one ``(3, C)`` device
    tensor (scale, mean, std), made once per device and passed as it is on every forward."""
    if normalization is None or len(normalization[0]) != channels:
        return None
    return dict(pixel_norm=_constants_on(normalization, torch.device(device)))


@functools.lru_cache(maxsize=32)
def _constants_on(normalization, device: torch.device) -> torch.Tensor:
    # Made once per device: building it per call would stack three vectors and copy the
    # scale host-to-device on every forward (a copy that blocks the host on CUDA).
    from mmkernels.ops.patch_embed import pixel_norm_table

    mean, std, scale = normalization
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor whatever mode the first call ran in
        return pixel_norm_table(torch.tensor(mean, dtype=torch.float32, device=device),
                                torch.tensor(std, dtype=torch.float32, device=device), float(scale),
                                channels=len(mean), device=device)  # fmt: skip


# --------------------------------------------------------------------------------------
# Position tables: rows of the embedding read in place, or interpolated once per size


class PositionTables:
    """The interpolated position tables one patched module's forward computes (its
    ``interpolate_pos_encoding`` for an image size), kept and reused while what they are
    made from is unchanged: the same tensors (identity, storage, in-place version counter,
    dtype, device) and the same size. Hugging Face recomputes them on every call (a bicubic
    interpolation of several kernels); here each is computed once per resolution. (The
    plain table, ``position_embedding(position_ids)``, is not kept: with ``position_ids``
    = arange it is rows of the embedding's weight, read in place on every call; see
    :func:`_position_rows`.)

    What the key cannot see: an in-place write through ``tensor.data`` (for example
    ``emb.position_embedding.weight.data.mul_(2)``). ``.data`` is an alias with a version
    counter of its own, so such a write leaves the kept table stale. After one, drop the
    tables with :func:`mmkernels.integrations.clear_caches` (or ``unpatch`` and ``patch``
    again); updates through the parameter itself (``weight.mul_(2)`` under ``no_grad``,
    an optimizer step, ``load_state_dict``) are seen.

    Always recomputed, never stored: when autograd records (grad enabled and a source
    requires grad: training must see the table's graph), when a source is an inference
    tensor (made under ``inference_mode``: no version counter tells an in-place update),
    under ``torch.compile`` (the compiled graph makes its own), while a CUDA graph is
    being captured (the table would live in the graph's memory). Tables made under
    ``inference_mode`` are kept apart from the others. At most ``MAX_TABLES`` sizes, the
    least recently used dropped first. Safe to share between threads (one lock around the
    dictionary; a table is computed outside it, so two threads may both compute the same
    new table and the last one is kept). One instance per patched module: it lives in the
    patched forward and goes with ``unpatch``; a copy or an unpickled model gets its own."""

    MAX_TABLES = 8

    def __init__(self):
        self._tables: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.made = 0  # tables computed (for tests and debugging)

    def get(self, sources: tuple[torch.Tensor, ...], size: tuple, make: Callable[[], Any]):
        """``make()``, or the table kept for ``sources`` and ``size``."""
        if not self._reusable(sources):
            return make()
        key = (size, torch.is_inference_mode_enabled(),
               tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in sources))  # fmt: skip
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
                return table
        table = make()
        with self._lock:
            self.made += 1
            self._tables[key] = table
            self._tables.move_to_end(key)
            while len(self._tables) > self.MAX_TABLES:
                self._tables.popitem(last=False)
        return table

    def clear(self) -> int:
        """Drop every kept table; returns how many there were."""
        with self._lock:
            count = len(self._tables)
            self._tables.clear()
        return count

    @staticmethod
    def _reusable(sources) -> bool:
        if torch.compiler.is_compiling():
            return False
        if any(t.is_inference() for t in sources):
            return False  # inference tensors keep no version counter: an in-place update would not show
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return False
        return not _capturing(sources)


def _capturing(tensors) -> bool:
    return any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing()


class _ArangeIds:
    """Whether a ``position_ids`` tensor holds ``0, 1, ..., n-1``, remembered per tensor
    while its identity, storage and version counter are unchanged. CLIP and SigLIP
    register ``torch.arange(num_positions)`` as a non-persistent buffer (no checkpoint
    loads it), and their ``interpolate_pos_encoding`` reads the weight directly, as if it
    were: then ``position_embedding(position_ids)`` is the weight's first n rows.

    Reading the values is one host sync. :meth:`PatchEmbedRule.notes` does it when
    ``patch`` reports on the module; a patched forward does it only for a tensor not seen
    before (the model moved to another device after patching, or unpickled), and never
    while compiling or capturing a CUDA graph (the lookup runs instead, as it does for
    inference tensors, which keep no version counter). Like any version-keyed memo it
    cannot see a write through ``position_ids.data``; :func:`clear_position_caches`
    forgets a module's verdict. Thread-safe (one lock)."""

    MAX_TENSORS = 64

    def __init__(self):
        self._verdicts: collections.OrderedDict = collections.OrderedDict()  # id -> (weakref, state, verdict)
        self._lock = threading.Lock()

    def __call__(self, ids: torch.Tensor) -> bool:
        if torch.compiler.is_compiling() or not isinstance(ids, torch.Tensor) or ids.is_inference():
            return False
        if ids.dim() not in (1, 2) or (ids.dim() == 2 and ids.shape[0] != 1):
            return False  # one row of ids per image: a per-image table, looked up
        if ids.dtype not in (torch.int64, torch.int32) or ids.requires_grad:
            return False
        state = (ids.data_ptr(), ids._version, tuple(ids.shape), ids.device)
        with self._lock:
            entry = self._verdicts.get(id(ids))
            if entry is not None and entry[0]() is ids and entry[1] == state:
                self._verdicts.move_to_end(id(ids))
                return entry[2]
        if _capturing([ids]):
            return False
        n = ids.shape[-1]
        verdict = bool(torch.equal(ids.reshape(n), torch.arange(n, dtype=ids.dtype, device=ids.device)))
        with self._lock:
            self._verdicts[id(ids)] = (weakref.ref(ids), state, verdict)
            self._verdicts.move_to_end(id(ids))
            while len(self._verdicts) > self.MAX_TENSORS:
                self._verdicts.popitem(last=False)
        return verdict

    def forget(self, ids) -> bool:
        with self._lock:
            return self._verdicts.pop(id(ids), None) is not None


_ARANGE_IDS = _ArangeIds()


def _plain_embedding(lookup) -> bool:
    """An ``nn.Embedding`` whose forward is a plain gather of its weight rows (max_norm
    would renormalize the weight in place; padding_idx and sparse change the gradient)."""
    return (
        isinstance(lookup, torch.nn.Embedding)
        and type(lookup).forward is torch.nn.Embedding.forward
        and "forward" not in lookup.__dict__
        and not _hooked(lookup)
        and lookup.max_norm is None
        and lookup.padding_idx is None
        and not lookup.sparse
    )


def _rows_of_weight(lookup, ids) -> bool:
    """Whether ``lookup(ids)`` is ``lookup.weight[:n]``: a plain embedding and arange ids."""
    return (
        _plain_embedding(lookup)
        and isinstance(ids, torch.Tensor)
        and ids.device == lookup.weight.device
        and 0 < ids.shape[-1] <= lookup.weight.shape[0]
        and _ARANGE_IDS(ids)
    )


def _position_rows(lookup, ids):
    """``lookup(ids)``, the table the original forward adds. With a plain embedding and ids
    = arange that is ``weight[:n]``: a view, so always the weight's current values (an
    in-place update through ``.data`` included), no gather and nothing kept; gradients
    reach the weight through the view as through the gather. Otherwise the module's own
    lookup on every call (its hooks run)."""
    if _rows_of_weight(lookup, ids):
        return lookup.weight[: ids.shape[-1]]
    return lookup(ids)


def position_tables(module: torch.nn.Module) -> PositionTables | None:
    """The :class:`PositionTables` of ``module``'s patched forward (None when it has none)."""
    forward = module.__dict__.get("forward")
    tables = getattr(getattr(forward, "__func__", None), "position_tables", None)
    return tables if isinstance(tables, PositionTables) else None


def clear_position_caches(module: torch.nn.Module) -> int:
    """Drop what a patched vision embeddings module keeps between calls: its interpolated
    position tables and the arange verdict on its ``position_ids``. Returns how many were
    dropped (0 for any other module)."""
    tables = position_tables(module)
    if tables is None:
        return 0
    count = tables.clear()
    name = module.__dict__["forward"].__func__.position_ids
    ids = getattr(module, name, None) if name else None
    if isinstance(ids, torch.Tensor):
        count += _ARANGE_IDS.forget(ids)
    return count


def _hooked(module) -> bool:
    return bool(getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None))


# --------------------------------------------------------------------------------------
# The op's arguments for one call (None: the original runs)


def _image_arguments(module: torch.nn.Module, spec: PatchEmbedSpec, call: Call,
                     tables: PositionTables | None = None) -> dict | None:  # fmt: skip
    pixels = call.get(spec.pixels)
    interpolate = spec.always_interpolates or bool(call.get("interpolate_pos_encoding", False))
    conv = _projection(module, spec)
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or not _pixel_dtype_ok(pixels):
        return None
    if any(call.get(name) is not None for name in spec.none_arguments):
        return None  # ViT's mask tokens: the original
    if _conv_reasons(conv, IMAGE_FORM) or _path_reasons(module, spec) or _dropout_reasons(module, spec, now=True):
        return None
    weight, bias = conv.weight, conv.bias
    if pixels.device != weight.device or pixels.shape[1] != weight.shape[1]:
        return None
    batch, _, height, width = pixels.shape
    if spec.image_size is not None and not interpolate:
        if (height, width) != _image_size(getattr(module, spec.image_size)):
            return None  # the original raises its own error
    dim, patch = weight.shape[0], weight.shape[-1]
    class_embedding = getattr(module, spec.class_embedding) if spec.class_embedding else None
    if class_embedding is not None:
        if class_embedding.numel() != dim or class_embedding.shape[-1] != dim:
            return None
        class_embedding = class_embedding.reshape(dim)  # BLIP-2 and ViT keep it as (1, 1, D)
    parameters = [t for t in (bias, class_embedding) if t is not None]
    if any(t.dtype != weight.dtype for t in parameters):
        return None
    rows = (height // patch) * (width // patch) + (class_embedding is not None)

    position = None
    tables = tables if tables is not None else PositionTables()
    if spec.has_position:
        if spec.position_table is not None and getattr(module, spec.position_table, None) is None:
            return None  # InternViT without absolute positions (the original adds none)
        if interpolate:
            if spec.interpolation is None:
                return None
            method = getattr(module, spec.interpolation)
            # The method reads only the shape of the embeddings: a zero-stride stand-in. It
            # reads the module's tables: any of the module's tensors changing remakes it.
            sources = tuple(module.parameters()) + tuple(module.buffers())
            position = tables.get(sources, ("interpolated", rows, dim, height, width),
                                  lambda: method(weight.new_zeros(()).expand(batch, rows, dim), height, width))  # fmt: skip
        elif spec.position_table is not None:
            position = getattr(module, spec.position_table)
        else:
            position = _position_rows(getattr(module, spec.position_embedding), getattr(module, spec.position_ids))
        if not isinstance(position, torch.Tensor):
            return None
        if position.dtype != weight.dtype or position.device != weight.device:
            return None
        if position.dim() == 3 and position.shape[0] == 1:
            position = position[0]
        if spec.position_prefix and position.shape[-2] > rows:
            position = position[..., :rows, :]  # BLIP-2 adds table[:, :rows]
        if position.shape not in ((rows, dim), (batch, rows, dim)):
            return None  # a table that does not fit the patches: the original raises
    return dict(pixels=pixels, weight=weight, bias=bias, class_embedding=class_embedding,
                position_embedding=position)  # fmt: skip


def _flat_arguments(module: torch.nn.Module, spec: PatchEmbedSpec, call: Call) -> dict | None:
    patches = call.get(spec.pixels)
    conv = _projection(module, spec)
    if not isinstance(patches, torch.Tensor) or patches.dim() != 2 or not _pixel_dtype_ok(patches):
        return None
    if _conv_reasons(conv, FLAT_FORM) or _flat_shape_reasons(module, conv):
        return None
    weight, bias = conv.weight, conv.bias
    if patches.device != weight.device or patches.shape[1] != weight[0].numel():
        return None
    if bias is not None and bias.dtype != weight.dtype:
        return None
    return dict(pixels=patches, weight=weight, bias=bias)


# --------------------------------------------------------------------------------------
# The rule


class PatchEmbedRule(SpecRule):
    """The patch-embed patch of one :class:`PatchEmbedSpec`: replaces the embeddings'
    ``forward`` on the live instance."""

    kernel = "patch_embed"
    method = "forward"
    op = f"mmkernels.ops.{PATCH_EMBED_OP}"

    def not_applicable_reasons(self, module: torch.nn.Module) -> list[str]:
        reasons = super().not_applicable_reasons(module)
        if reasons:
            return reasons
        spec = self.spec
        signature = _bind_signature(module)
        if signature is None or spec.pixels not in signature:
            return [f"forward has no {spec.pixels!r} argument"]
        unknown = [name for name in signature if name not in spec.arguments]
        if unknown:
            reasons.append(f"forward takes arguments the spec does not know: {', '.join(unknown)}")
        reasons += _path_reasons(module, spec)
        conv = _projection(module, spec)
        reasons += [f"{spec.projection}: {r}" for r in _conv_reasons(conv, spec.form)]
        reasons += _dropout_reasons(module, spec, now=False)
        if reasons:
            return reasons
        if spec.form == FLAT_FORM:
            reasons += _flat_shape_reasons(module, conv)
        dim = conv.weight.shape[0]
        if spec.class_embedding is not None:
            cls = getattr(module, spec.class_embedding, None)
            if not isinstance(cls, torch.Tensor) or cls.numel() != dim or cls.shape[-1] != dim:
                reasons.append(f"{spec.class_embedding} is not a ({dim},) or (1, 1, {dim}) tensor")
        if spec.position_embedding is not None:
            if not callable(getattr(module, spec.position_embedding, None)):
                reasons.append(f"no {spec.position_embedding} module")
            if not isinstance(getattr(module, spec.position_ids, None), torch.Tensor):
                reasons.append(f"no {spec.position_ids} tensor")
        if spec.position_table is not None:
            table = getattr(module, spec.position_table, None)
            if not isinstance(table, torch.Tensor) or table.dim() not in (2, 3) or table.shape[-1] != dim:
                reasons.append(f"{spec.position_table} is not a (1, positions, {dim}) tensor")
        if spec.image_size is not None and _image_size(getattr(module, spec.image_size, None)) is None:
            reasons.append(f"no integer (or (height, width)) {spec.image_size}")
        return reasons

    def notes(self, module: torch.nn.Module, options: PatchOptions) -> list[str]:
        spec = self.spec
        weight = _projection(module, spec).weight
        notes = [backend_note(PATCH_EMBED_CAPABILITIES, weight, routed=True)]
        if options.pixel_normalization is not None:
            mean, std, scale = options.pixel_normalization
            notes.append(f"raw pixels normalized in the kernel: (x * {scale:g} - mean {list(mean)}) / std {list(std)}")
        if spec.form == IMAGE_FORM:
            fused = ["bias" if _projection(module, spec).bias is not None else None,
                     "class row" if spec.class_embedding else None,
                     "position-embedding add" if spec.has_position else None]  # fmt: skip
            fused = [f for f in fused if f]
            if fused:
                notes.append("fused into the projection: " + ", ".join(fused))
        if spec.position_embedding is not None:
            lookup, ids = getattr(module, spec.position_embedding), getattr(module, spec.position_ids)
            if _rows_of_weight(lookup, ids):  # reads the ids now: the host sync at patch time, not in a forward
                notes.append(f"position table: the first rows of {spec.position_embedding}.weight, read in place "
                             f"every call ({spec.position_ids} = arange: no lookup, nothing kept)")  # fmt: skip
            else:
                notes.append(f"position table: {spec.position_embedding}({spec.position_ids}) looked up every call")
        if spec.interpolation is not None:
            if callable(getattr(module, spec.interpolation, None)):
                notes.append(f"interpolate_pos_encoding=True: the table from the module's own {spec.interpolation} "
                             "(kept per image size; see mmkernels.integrations.clear_caches)")  # fmt: skip
            else:
                notes.append("interpolate_pos_encoding=True: original path")
        for name in spec.none_arguments:
            notes.append(f"{name} given (not None): original path")
        if spec.dropout is not None:
            notes.append(f"{spec.dropout} active (training with p > 0): original path")
        return notes

    def make_replacement(self, options: PatchOptions) -> Callable:
        spec = self.spec
        tables = PositionTables()  # this patch's: gone with unpatch

        def arguments(module, spec, call):
            if spec.form == IMAGE_FORM:
                return _image_arguments(module, spec, call, tables)
            return _flat_arguments(module, spec, call)

        def forward(module, *args, **kwargs):
            original = original_method(module, "forward")
            call = bind_call(original, args, kwargs)
            if call is None or call.extra or any(n not in spec.arguments for n in call.named):
                return original(*args, **kwargs)
            found = arguments(module, spec, call)
            if found is not None:
                channels = found["weight"].shape[1]
                norm = _normalization_tensors(options.pixel_normalization, channels, found["weight"].device)
                if norm is not None:
                    found.update(norm)
                elif found["pixels"].dtype == torch.uint8 or options.pixel_normalization is not None:
                    found = None  # raw pixels without usable constants: the original decides
            if found is None:
                return original(*args, **kwargs)
            from mmkernels.ops import patch_embed

            return patch_embed(**found)

        forward.__name__ = "forward"
        forward.position_tables = tables
        forward.position_ids = spec.position_ids  # for clear_position_caches
        forward.__qualname__ = f"mmkernels_patch_embed_forward[{spec.family}]"
        forward.__doc__ = (
            f"mmkernels: {spec.model_class}.forward computed by mmkernels.ops.{PATCH_EMBED_OP}; "
            "see mmkernels.integrations.hf_patch_embed."
        )
        return forward


@dataclasses.dataclass(frozen=True)
class ConvPatchSpec:
    """A bare patch ``Conv2d`` (stride == kernel) inside a tower whose class token and
    position embeddings are added by code the op cannot stand in for without copying the
    tower's ``forward`` (Pixtral adds rotary positions later; Mllama adds gated tile and
    position embeddings inline in ``MllamaVisionModel.forward``). The conv module's own
    ``forward`` is replaced: one op call returning the conv's ``(B, D, H/P, W/P)`` layout
    as a view of the op's ``(B, N, D)`` rows.

    ``conv``: the patch conv's dotted attribute path below a module whose own
    ``config.model_type`` is ``model_type`` (the tower: ``patch_embed.projection`` below
    GOT-OCR2's ``GotOcr2VisionEncoder``); only the ``Conv2d`` found there matches, so a tower
    whose other convs :func:`_conv_reasons` would accept too (a 1x1 stride-1 neck conv, a
    stride == kernel patch merger) can be listed. None: every ``Conv2d`` the ``model_type``
    governs matches, so such a spec is listed only where the patch conv is the only one
    ``_conv_reasons`` accepts (see :class:`ConvPatchRule` for how the path is checked)."""

    family: str
    model_type: str
    model_class: str = "Conv2d"
    conv: str | None = None

    def __post_init__(self):
        if self.conv is not None and (not self.conv or any(not part.isidentifier() for part in self.conv.split("."))):
            raise ValueError(f"{self.family}: conv {self.conv!r} is not a dotted attribute path")


class ConvPatchRule(SpecRule):
    """The patch-embed patch of a bare patch ``Conv2d`` (:class:`ConvPatchSpec`).

    A spec with a ``conv`` path covers a ``Conv2d`` only where it sits at that path below
    the module whose own config has the spec's ``model_type`` (:meth:`located_at`, from the
    path the engine walks): a 1x1 neck conv or a patch merger's conv is neither matched nor
    reported."""

    kernel = "patch_embed"
    method = "forward"
    op = f"mmkernels.ops.{PATCH_EMBED_OP}"

    def located_at(self, below: tuple[str, ...]) -> bool:
        return self.spec.conv is None or self.spec.conv in below

    def not_applicable_reasons(self, module: torch.nn.Module) -> list[str]:
        reasons = super().not_applicable_reasons(module)
        return reasons or _conv_reasons(module, IMAGE_FORM)

    def notes(self, module: torch.nn.Module, options: PatchOptions) -> list[str]:
        notes = [backend_note(PATCH_EMBED_CAPABILITIES, module.weight, routed=True)]
        if options.pixel_normalization is not None:
            mean, std, scale = options.pixel_normalization
            notes.append(f"raw pixels normalized in the kernel: (x * {scale:g} - mean {list(mean)}) / std {list(std)}")
        notes.append("the conv alone (its tower adds class and position embeddings in its own forward)")
        return notes

    def make_replacement(self, options: PatchOptions) -> Callable:
        def forward(conv, *args, **kwargs):
            original = original_method(conv, "forward")
            if len(args) + len(kwargs) != 1 or set(kwargs) - {"input"}:
                return original(*args, **kwargs)
            pixels = args[0] if args else kwargs["input"]
            if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
                return original(*args, **kwargs)
            weight, bias = conv.weight, conv.bias
            if _conv_reasons(conv, IMAGE_FORM, patched_self=True):
                return original(*args, **kwargs)
            rows = _patch_rows(pixels, weight, bias, options)
            if rows is None:
                return original(*args, **kwargs)
            patch = weight.shape[-1]
            batch, height, width = pixels.shape[0], pixels.shape[2] // patch, pixels.shape[3] // patch
            # (B, N, D) rows in row-major patch order == conv(x).flatten(2).transpose(1, 2).
            return rows.view(batch, height, width, weight.shape[0]).permute(0, 3, 1, 2)

        forward.__name__ = "forward"
        forward.__qualname__ = f"mmkernels_patch_conv_forward[{self.spec.family}]"
        forward.__doc__ = (
            "mmkernels: Conv2d.forward (stride == kernel) computed by mmkernels.ops.patch_embed; "
            "see mmkernels.integrations.hf_patch_embed."
        )
        return forward


def _patch_rows(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                options: PatchOptions) -> torch.Tensor | None:  # fmt: skip
    """The op's ``(B, N, D)`` rows of a bare patch projection with the ``(D, C, P, P)``
    ``weight`` over ``(B, C, H, W)`` pixels (normalized in the kernel when the patch
    asked for it), or None where the original must run (another device, channel count or
    dtype: the original computes or raises as it does)."""
    if pixels.device != weight.device or pixels.shape[1] != weight.shape[1]:
        return None
    if bias is not None and bias.dtype != weight.dtype:
        return None
    found = dict(pixels=pixels, weight=weight, bias=bias)
    norm = _normalization_tensors(options.pixel_normalization, weight.shape[1], weight.device)
    if norm is not None and _pixel_dtype_ok(pixels):
        found.update(norm)  # the tower cast raw pixels to the weight dtype: 0..255 survive exactly
    elif options.pixel_normalization is not None or pixels.dtype != weight.dtype:
        return None  # the original raises on a dtype mix: let it
    from mmkernels.ops import patch_embed

    return patch_embed(**found)


@dataclasses.dataclass(frozen=True)
class UnfoldPatchSpec:
    """A patch embedding written as ``nn.Unfold`` (stride == kernel) then an
    ``nn.Linear`` over the ``C * P * P`` values of each patch (Llama 4's
    ``Llama4UnfoldConvolution``): the same product as a patch conv whose weight is the
    Linear's ``(D, C * P * P)`` viewed as ``(D, C, P, P)`` (Unfold orders a patch's values
    channel, then row, then column, as a conv weight does). The module's ``forward`` is
    replaced; it returns the op's ``(B, N, D)`` rows, which are the module's output."""

    family: str
    model_type: str
    model_class: str
    unfold: str = "unfold"
    linear: str = "linear"


def _unfold_reasons(module: torch.nn.Module, spec: UnfoldPatchSpec) -> list[str]:
    unfold, linear = getattr(module, spec.unfold, None), getattr(module, spec.linear, None)
    if type(unfold) is not torch.nn.Unfold or type(linear) is not torch.nn.Linear:
        return [f"expected {spec.unfold} an nn.Unfold and {spec.linear} an nn.Linear, got "
                f"{type(unfold).__name__} and {type(linear).__name__}"]  # fmt: skip
    kernel, stride = (torch.nn.modules.utils._pair(v) for v in (unfold.kernel_size, unfold.stride))
    reasons = []
    if stride != kernel or kernel[0] != kernel[1]:
        reasons.append(f"unfold kernel {kernel} / stride {stride}: not square patches without overlap")
    if any(torch.nn.modules.utils._pair(unfold.padding)) or torch.nn.modules.utils._pair(unfold.dilation) != (1, 1):
        reasons.append(f"unfold padding {unfold.padding} / dilation {unfold.dilation}")
    if linear.in_features % (kernel[0] * kernel[1]):
        reasons.append(f"linear in_features {linear.in_features} is not channels x {kernel[0]} x {kernel[1]}")
    if unfold._forward_hooks or unfold._forward_pre_hooks or linear._forward_hooks or linear._forward_pre_hooks:
        reasons.append("the unfold or the linear has forward hooks")
    return reasons


class UnfoldPatchRule(SpecRule):
    """The patch-embed patch of an unfold + linear patch embedding (:class:`UnfoldPatchSpec`)."""

    kernel = "patch_embed"
    method = "forward"
    op = f"mmkernels.ops.{PATCH_EMBED_OP}"

    def not_applicable_reasons(self, module: torch.nn.Module) -> list[str]:
        reasons = super().not_applicable_reasons(module)
        if not reasons and _bind_signature(module) != ["hidden_states"]:
            reasons.append("forward does not take (hidden_states) alone")
        return reasons or _unfold_reasons(module, self.spec)

    def notes(self, module: torch.nn.Module, options: PatchOptions) -> list[str]:
        linear = getattr(module, self.spec.linear)
        return [backend_note(PATCH_EMBED_CAPABILITIES, linear.weight, routed=True),
                "unfold + linear as one patch GEMM (the tower adds its class and position embeddings)"]  # fmt: skip

    def make_replacement(self, options: PatchOptions) -> Callable:
        spec = self.spec

        def forward(module, *args, **kwargs):
            original = original_method(module, "forward")
            call = bind_call(original, args, kwargs)
            pixels = call.get("hidden_states") if call is not None else None
            if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or _unfold_reasons(module, spec):
                return original(*args, **kwargs)
            linear = getattr(module, spec.linear)
            patch = torch.nn.modules.utils._pair(getattr(module, spec.unfold).kernel_size)[0]
            weight = linear.weight.view(linear.out_features, -1, patch, patch)  # a view: always the live weight
            rows = _patch_rows(pixels, weight, linear.bias, options)
            return original(*args, **kwargs) if rows is None else rows

        forward.__name__ = "forward"
        forward.__qualname__ = f"mmkernels_unfold_patch_forward[{spec.family}]"
        forward.__doc__ = (
            f"mmkernels: {spec.model_class}.forward (unfold + linear) computed by mmkernels.ops.patch_embed; "
            "see mmkernels.integrations.hf_patch_embed."
        )
        return forward


def _bind_signature(module: torch.nn.Module) -> list[str] | None:
    """The names of the original forward's parameters (None when it takes ``*args`` or
    ``**kwargs``)."""
    signature, _ = forward_signature(original_method(module, "forward"))
    parameters = signature.parameters.values()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return None
    return [p.name for p in parameters]


# --------------------------------------------------------------------------------------
# The specs


_CLIP = PatchEmbedSpec(
    family="CLIP vision",
    model_type="clip_vision_model",
    model_class="CLIPVisionEmbeddings",
    form=IMAGE_FORM,
    pixels="pixel_values",
    flag_arguments=("interpolate_pos_encoding",),
    projection="patch_embedding",
    class_embedding="class_embedding",
    position_embedding="position_embedding",
    position_ids="position_ids",
    interpolation="interpolate_pos_encoding",
    image_size="image_size",
)
_SIGLIP = PatchEmbedSpec(
    family="SigLIP vision",
    model_type="siglip_vision_model",
    model_class="SiglipVisionEmbeddings",
    form=IMAGE_FORM,
    pixels="pixel_values",
    flag_arguments=("interpolate_pos_encoding",),
    projection="patch_embedding",
    position_embedding="position_embedding",
    position_ids="position_ids",
    interpolation="interpolate_pos_encoding",
)
_BLIP_2 = PatchEmbedSpec(
    family="BLIP-2 vision",
    model_type="blip_2_vision_model",
    model_class="Blip2VisionEmbeddings",
    form=IMAGE_FORM,
    pixels="pixel_values",
    flag_arguments=("interpolate_pos_encoding",),
    projection="patch_embedding",
    class_embedding="class_embedding",
    position_table="position_embedding",
    position_prefix=True,
    interpolation="interpolate_pos_encoding",
)
_VIT = PatchEmbedSpec(
    family="ViT",
    model_type="vit",
    model_class="ViTEmbeddings",
    form=IMAGE_FORM,
    pixels="pixel_values",
    flag_arguments=("interpolate_pos_encoding",),
    none_arguments=("bool_masked_pos",),
    projection="patch_embeddings.projection",
    class_embedding="cls_token",
    position_table="position_embeddings",
    interpolation="interpolate_pos_encoding",
    image_size="image_size",
    dropout="dropout",
)
# InternViT (InternVL): ViT's embeddings without the flag and the size check: the table
# always comes from its interpolate_pos_encoding (the stored one where the grid fits).
_INTERNVL = dataclasses.replace(_VIT, family="InternVL vision", model_type="internvl_vision",
                                model_class="InternVLVisionEmbeddings", flag_arguments=(), image_size=None,
                                always_interpolates=True)  # fmt: skip


def _copy(spec: PatchEmbedSpec, family: str, model_type: str, model_class: str) -> PatchEmbedSpec:
    """``spec`` for a class whose source is ``spec``'s own apart from the names (transformers
    ``# Copied from`` / modular copies: each read against its model_type's config, 5.17 to 5.25)."""
    return dataclasses.replace(spec, family=family, model_type=model_type, model_class=model_class)


PATCH_EMBED_SPECS: tuple[PatchEmbedSpec, ...] = (
    _CLIP,
    # CLIP's embeddings under GIT's and Kosmos-2's own classes and vision configs.
    _copy(_CLIP, "GIT vision", "git_vision_model", "GitVisionEmbeddings"),
    _copy(_CLIP, "Kosmos-2 vision", "kosmos_2_vision_model", "Kosmos2VisionEmbeddings"),
    _SIGLIP,
    # SigLIP's embeddings, under Janus's and Granite Docling's own classes.
    _copy(_SIGLIP, "Janus vision", "janus_vision_model", "JanusVisionEmbeddings"),
    _copy(_SIGLIP, "Granite Docling vision", "granite_docling_vision", "GraniteDoclingVisionEmbeddings"),
    _BLIP_2,
    # BLIP-2's embeddings under InstructBLIP's and InstructBLIP-Video's.
    _copy(_BLIP_2, "InstructBLIP vision", "instructblip_vision_model", "InstructBlipVisionEmbeddings"),
    _copy(_BLIP_2, "InstructBLIP-Video vision", "instructblipvideo_vision_model", "InstructBlipVideoVisionEmbeddings"),
    _VIT,
    PatchEmbedSpec(
        family="Qwen2-VL vision",
        model_type="qwen2_vl_vision",
        model_class="PatchEmbed",
        form=FLAT_FORM,
        pixels="hidden_states",
        projection="proj",
    ),
    PatchEmbedSpec(
        family="Qwen2.5-VL vision",
        model_type="qwen2_5_vl_vision",
        model_class="Qwen2_5_VisionPatchEmbed",
        form=FLAT_FORM,
        pixels="hidden_states",
        projection="proj",
    ),
    _INTERNVL,
    # InternViT's embeddings (and patch embeddings) under Qianfan-OCR's classes.
    _copy(_INTERNVL, "Qianfan-OCR vision", "qianfan_ocr_vision", "QianfanOCRVisionEmbeddings"),
    # The towers that kept Qwen2-VL's patch embed (a biased Conv3d over flattened patches).
    *(
        PatchEmbedSpec(family=family, model_type=model_type, model_class=model_class, form=FLAT_FORM,
                       pixels="hidden_states", projection="proj")  # fmt: skip
        for family, model_type, model_class in (
            ("Qwen3-VL vision", "qwen3_vl_vision", "Qwen3VLVisionPatchEmbed"),
            ("Qwen3-VL-MoE vision", "qwen3_vl_moe_vision", "Qwen3VLMoeVisionPatchEmbed"),
            ("Qwen3.5 vision", "qwen3_5_vision", "Qwen3_5VisionPatchEmbed"),
            ("Qwen3.5-MoE vision", "qwen3_5_moe_vision", "Qwen3_5MoeVisionPatchEmbed"),
            ("GLM-4.1V vision", "glm4v_vision", "Glm4vVisionPatchEmbed"),
            ("GLM-4.5V vision", "glm4v_moe_vision", "Glm4vMoeVisionPatchEmbed"),
            ("GLM-OCR vision", "glm_ocr_vision", "GlmOcrVisionPatchEmbed"),
            ("Qwen2.5-Omni vision", "qwen2_5_omni_vision_encoder", "Qwen2_5_VisionPatchEmbed"),
            ("Qwen3-Omni-MoE vision", "qwen3_omni_moe_vision_encoder", "Qwen3OmniMoeVisionPatchEmbed"),
        )
    ),
)

# Patch embeddings written as unfold + linear.
UNFOLD_PATCH_SPECS: tuple[UnfoldPatchSpec, ...] = (
    UnfoldPatchSpec(family="Llama 4 vision", model_type="llama4_vision_model", model_class="Llama4UnfoldConvolution"),
)

# Towers whose patch conv is the only part the op can take over without a copied forward
# (read against transformers 5.25; ConvPatchSpec says which towers may be listed).
CONV_PATCH_SPECS: tuple[ConvPatchSpec, ...] = (
    ConvPatchSpec(family="Pixtral vision (patch conv)", model_type="pixtral"),
    ConvPatchSpec(family="Mllama vision (patch conv)", model_type="mllama_vision_model"),
    # NaViT-style positions bucketed from patch_attention_mask (embeddings.patch_embedding).
    ConvPatchSpec(family="Idefics2 vision (patch conv)", model_type="idefics2_vision"),
    ConvPatchSpec(family="Idefics3 vision (patch conv)", model_type="idefics3_vision"),
    ConvPatchSpec(family="SmolVLM vision (patch conv)", model_type="smolvlm_vision"),
    ConvPatchSpec(family="Phi-4-multimodal vision (patch conv)", model_type="phi4_multimodal_vision"),
    # Nearest-bucket positions from target_sizes over patches laid in one row (embeddings.patch_embedding).
    ConvPatchSpec(family="MiniCPM-V 4.6 vision (patch conv)", model_type="minicpmv4_6_vision"),
    ConvPatchSpec(family="MiniCPM-V 4.7 vision (patch conv)", model_type="minicpmv4_7_vision"),
    ConvPatchSpec(family="MiniCPM-OCR vision (patch conv)", model_type="minicpm_ocr_vision"),
    # An RMSNorm between the conv and the position table (transformer.embeddings.patch_embedding).
    ConvPatchSpec(family="Ovis2 vision (patch conv)", model_type="ovis2_vision"),
    # Patches already cut to (L, C, P, P): H == W == P, one row per patch; positions interpolated
    # per grid_thw, rotary, or none (Kimi patch_embed.proj, Ovis2.5 and PaddleOCR-VL
    # [vision_model.]embeddings.patch_embedding, LLaVA-OV-1.5 / GLM-Image / dots3-note patch_embed.proj,
    # VideoLLaMA3 embeddings.patch_embedding).
    ConvPatchSpec(family="Kimi K2.5 vision (patch conv)", model_type="kimi_k25_vision"),
    ConvPatchSpec(family="Ovis2.5 vision (patch conv)", model_type="ovis2_5_vision"),
    ConvPatchSpec(family="PaddleOCR-VL vision (patch conv)", model_type="paddleocr_vl_vision"),
    ConvPatchSpec(family="LLaVA-OneVision-1.5 vision (patch conv)", model_type="llava_onevision1_5_vision"),
    ConvPatchSpec(family="VideoLLaMA3 vision (patch conv)", model_type="video_llama_3_vision"),
    ConvPatchSpec(family="GLM-Image vision (patch conv)", model_type="glm_image_vision"),
    ConvPatchSpec(family="dots3-note vision (patch conv)", model_type="dots3_note_vision_encoder"),
    # Named by path: towers with other convs _conv_reasons accepts. SAM-style encoders (the patch
    # conv's (B, H/P, W/P, D) output plus a pos_embed grid in the encoder's forward) with a 1x1
    # stride-1 neck conv1: GOT-OCR2, the SAM towers of DeepSeek-OCR2 and Unlimited-OCR (and their
    # stride-2 padded downsampling convs), PP-FormulaNet, SAM itself (DeepSeek-VL-hybrid's
    # high-res tower, whose own DeepseekVLSamVisionNeck carries the same config).
    *(
        ConvPatchSpec(family=family, model_type=model_type, conv="patch_embed.projection")
        for family, model_type in (
            ("GOT-OCR2 vision (patch conv)", "got_ocr2_vision"),
            ("DeepSeek-OCR2 SAM vision (patch conv)", "deepseek_ocr2_sam_vision_model"),
            ("Unlimited-OCR SAM vision (patch conv)", "unlimited_ocr_sam_vision_model"),
            ("PP-FormulaNet vision (patch conv)", "pp_formulanet_vision"),
            ("SAM vision (patch conv)", "sam_vision_model"),
        )
    ),
    # Flat (L, C * P * P) patches, positions interpolated per grid_thw in the patch embed's forward;
    # the patch merger's proj_conv (stride == kernel == the merge size) and 1x1 proj_out come after.
    ConvPatchSpec(family="HunYuan-VL vision (patch conv)", model_type="hunyuan_vl_vision",
                  conv="embeddings.patch_embedding"),  # fmt: skip
    ConvPatchSpec(family="HY-V4-VL vision (patch conv)", model_type="hy_v4_vl_vision",
                  conv="embeddings.patch_embedding"),  # fmt: skip
)
