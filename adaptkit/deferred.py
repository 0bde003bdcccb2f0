"""Base weights left on the meta device at build, filled in later: under ``train.strategy: fsdp``
each process reads only its own shard of every base weight from the weights files.

A deferred build creates every parameter of the backbone on the meta device (no memory, no
initialisation; buffers stay real, since libraries compute them in ``__init__``). A weights
file read through :func:`adaptkit.checkpoint.load_weights` then yields meta tensors that know
where their values lie (:class:`LazyWeight`: a safetensors file and key), and
:func:`load_base_state` records that source on the module owning each parameter instead of
copying. After FSDP has sharded the model, :func:`fill_shards` reads each process's rows with
safetensors' lazy slices, so no process ever holds a whole base weight beyond the one being read.

What cannot be deferred says so through :func:`unsourced` (a weight with no file behind it:
random initialisation, a checkpoint in pickle format, a converted tensor), and the builder then
builds the whole model as before.

Example::

    with deferring():
        backbone = make_backbone()   # its load_local calls load_weights + load_base_state
    unsourced(backbone)              # None: every meta parameter has a source
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
import torch
from torch import nn

_DEFERRING: ContextVar[bool] = ContextVar("adaptkit_deferring", default=False)
#: the attribute of a module holding {its parameter name: LazyWeight}
SOURCES = "adaptkit_weight_sources"


@dataclass(frozen=True)
class LazyWeight:
    """One tensor of a safetensors file, read whole or by rows only when asked."""

    path: Path
    key: str

    def read(self, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor, or its rows ``start:stop`` (only those bytes are read)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            if start is None:
                return handle.get_tensor(self.key)
            return handle.get_slice(self.key)[start:stop]


class CannotDefer(Exception):
    """Raised by a backbone inside :func:`deferring` for a base it cannot leave on the meta device;
    the build then builds the whole model on every process, logging the message."""


def active() -> bool:
    """Whether a deferred build is under way (weights files are then read lazily)."""
    return _DEFERRING.get()


@contextmanager
def deferring() -> Iterator[None]:
    """Inside the block, parameters are created on the meta device and weights files are read lazily.

    Parameters move to the meta device as modules register them (as ``accelerate``'s
    ``init_empty_weights`` does): ``torch.device("meta")`` would also empty the buffers that
    libraries compute in ``__init__`` (Swin's relative position index, CLIP's causal mask),
    which no file holds. A module moved to the CPU inside the block stays as it is.
    """
    original, original_to = nn.Module.register_parameter, nn.Module.to

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    def to(module: nn.Module, *args: object, **kwargs: object) -> nn.Module:
        # open_clip's create_model ends with model.to("cpu"): the real tensors are there already and
        # the meta ones wait for their shards; any other move or cast is done (meta stays meta)
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None and device is not None and device.type == "cpu":
            return module
        return original_to(module, *args, **kwargs)

    token = _DEFERRING.set(True)
    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    nn.Module.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        nn.Module.to = original_to  # type: ignore[method-assign]
        _DEFERRING.reset(token)


def new_parameter_device(reference: torch.Tensor) -> torch.device:
    """The device a method's new parameters go on beside ``reference`` (the weight they adapt):
    its device, or the CPU while the base is deferred on the meta device (what a method trains
    is created, and initialised, whole on every process)."""
    return torch.device("cpu") if reference.is_meta else reference.device


def lazy_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as meta tensors (shape and dtype from the header), each
    carrying its :class:`LazyWeight` as ``adaptkit_source``."""
    from safetensors import safe_open

    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            info = handle.get_slice(key)
            tensor = torch.empty(info.get_shape(), dtype=dtypes[info.get_dtype()], device="meta")
            tensor.adaptkit_source = LazyWeight(path, key)  # type: ignore[attr-defined]
            state[key] = tensor
    return state


def load_base_state(net: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """``net.load_state_dict(state, strict=strict)``; in a deferred build, each meta parameter
    remembers where its values lie instead (buffers are copied: they are small and real).
    With ``strict=False`` (a file holding part of a model) what the file lacks stays as it is:
    on the meta device without a source, which :func:`unsourced` then names.

    Backbones call this after mapping a file's names to their own (``state`` may come from
    :func:`adaptkit.checkpoint.load_weights`)."""
    with torch.no_grad():
        if not active():
            net.load_state_dict(state, strict=strict)
            return
        params, buffers = dict(net.named_parameters()), dict(net.named_buffers())
        expected = set(params) | {key for key in buffers if _persistent(net, key)}
        missing = sorted(expected - set(state)) if strict else []
        unexpected = sorted(set(state) - set(params) - set(buffers))
        if missing or unexpected:
            raise RuntimeError(f"load_base_state: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for key, value in state.items():
            source = getattr(value, "adaptkit_source", None) if value.is_meta else None
            if key in params:
                module_name, _, leaf = key.rpartition(".")
                module = net.get_submodule(module_name)
                module.__dict__.setdefault(SOURCES, {})[leaf] = source
            else:
                buffers[key].copy_(source.read() if source is not None else value)


def _persistent(net: nn.Module, key: str) -> bool:
    module_name, _, leaf = key.rpartition(".")
    return leaf not in net.get_submodule(module_name)._non_persistent_buffers_set


def sources(model: nn.Module) -> dict[str, LazyWeight]:
    """{qualified parameter name: where its values lie} of a deferred model's meta parameters."""
    found: dict[str, LazyWeight] = {}
    for prefix, module in model.named_modules():
        for leaf, source in module.__dict__.get(SOURCES, {}).items():
            if source is not None and leaf in module._parameters:
                found[f"{prefix}.{leaf}" if prefix else leaf] = source
    return found


def is_deferred(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is still on the meta device."""
    return any(p.is_meta for p in model.parameters())


def unsourced(model: nn.Module) -> str | None:
    """Why ``model`` cannot be filled in from its weights files: the first meta tensor without a
    source (a parameter no file holds, a buffer computed from meta weights), or None."""
    known = sources(model)
    for name, param in model.named_parameters():
        if param.is_meta and name not in known:
            return f"{name} is not read from a safetensors weights file"
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            return f"buffer {name} is computed from weights not yet read"
    return None


class WholeValues(Mapping[str, torch.Tensor]):
    """A state dict whose meta values are read from their files one at a time when looked up
    (fingerprinting a deferred base holds one weight at a time)."""

    def __init__(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        self.state, self.sources = state, sources(model)

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.state[key]
        if not value.is_meta:
            return value
        return self.sources[key].read().to(value.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def keep_real(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of a deferred model's real parameters and buffers (trained tensors, heads, buffers),
    to put back after the model is emptied onto its device."""
    kept = {name: p.detach().clone() for name, p in model.named_parameters() if not p.is_meta}
    kept.update({f"buffer:{name}": b.detach().clone() for name, b in model.named_buffers()})
    return kept


@torch.no_grad()
def fill_shards(model: nn.Module, kept: dict[str, torch.Tensor], found: dict[str, LazyWeight], rank: int, world: int) -> None:
    """Fill a sharded model just emptied onto its device (``to_empty``): each parameter's local
    rows from its file (``found``) or from ``kept``, each buffer from ``kept``. A weight holding
    NaN or infinity is refused as a whole build refuses it."""
    from torch.distributed.tensor import DTensor, Shard

    from adaptkit.checkpoint import refuse_non_finite

    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        start, stop = None, None
        if isinstance(param, DTensor) and param.ndim and any(isinstance(p, Shard) for p in param.placements):
            (placement,) = [p for p in param.placements if isinstance(p, Shard)]
            if placement.dim != 0:  # pragma: no cover - FSDP2 shards dim 0 unless told otherwise
                raise NotImplementedError(f"{name}: sharded on dim {placement.dim}")
            chunk = math.ceil(param.shape[0] / world)
            start = min(rank * chunk, param.shape[0])
            stop = start + local.shape[0]
        if name in kept:
            whole = kept[name]
            values = whole if start is None else whole[start:stop]
        else:
            source = found[name]
            values = source.read(start, stop) if start is not None else source.read()
            refuse_non_finite({source.key: values}, source.path)
        local.copy_(values.reshape(local.shape))
    for name, buffer in model.named_buffers():
        buffer.copy_(kept[f"buffer:{name}"])


@torch.no_grad()
def fill_whole(model: nn.Module) -> None:
    """Read every meta parameter of a deferred model whole from its file (a deferred model used
    without sharding); a no-op for a model built whole."""
    from adaptkit.checkpoint import refuse_non_finite

    for name, source in sources(model).items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        param = module._parameters[leaf]
        if param is not None and param.is_meta:
            values = source.read().to(param.dtype)
            refuse_non_finite({source.key: values}, source.path)
            module._parameters[leaf] = nn.Parameter(values, requires_grad=param.requires_grad)
