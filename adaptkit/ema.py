"""One exponential moving average (EMA) of trained weights, for every task that keeps one.

The average lives in float32 buffers of a module, so it moves with the task model
(``.to(device)``) and stays out of the adapter file; the task puts it into its checkpoint
through :meth:`WeightAverage.state` (see :class:`adaptkit.capabilities.KeepsTrainingState`).

Example::

    self.ema = WeightAverage(decay=0.999)
    self.ema.start(trainable)                       # at the first training step
    self.ema.update(trainable, step)                # after every optimizer step
    with self.ema.swapped_in(trainable):            # evaluate the averaged weights
        ...
    self.ema.copy_to(trainable)                     # at the end: the run's model is the average
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn


class WeightAverage(nn.Module):
    """EMA of named tensors: ``avg = decay_at(step) * avg + (1 - decay_at(step)) * value``.

    ``decay_at(step) = min(decay, (ramp_start + step) / (10 + step))`` averages over roughly
    the steps so far until ``decay`` takes over. ``ramp_start`` keeps each task's published
    warm-up: 1 for diffusers' ``EMAModel`` ((1 + s) / (10 + s)), 0 for StyleGAN's (s / (s + 10)).
    Reads like a mapping of the names it averages (``ema[name]``, ``keys()``, ``items()``).
    """

    def __init__(self, decay: float, ramp_start: float = 1.0) -> None:
        super().__init__()
        self.decay = float(decay)
        self.ramp_start = float(ramp_start)
        self._names: list[str] = []

    # -- a mapping of the averaged tensors -----------------------------------
    @staticmethod
    def _buffer_name(name: str) -> str:
        return name.replace(".", "__")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self.get_buffer(self._buffer_name(name))

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def keys(self):  # noqa: ANN201 - dict_keys, comparable with a dict's
        return dict.fromkeys(self._names).keys()

    def values(self) -> list[torch.Tensor]:
        return [self[name] for name in self._names]

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, self[name]) for name in self._names]

    @property
    def started(self) -> bool:
        return bool(self._names)

    # -- the average ---------------------------------------------------------
    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step ``step`` (1-based)."""
        return min(self.decay, (self.ramp_start + step) / (10.0 + step))

    @torch.no_grad()
    def start(self, values: Mapping[str, torch.Tensor]) -> None:
        """Average from ``values`` on (copies; the weights training starts with, or a checkpoint's)."""
        for name in self._names:
            delattr(self, self._buffer_name(name))
        self._names = list(values)
        for name, value in values.items():
            self.register_buffer(self._buffer_name(name), value.detach().float().clone(), persistent=False)

    @torch.no_grad()
    def _place_like(self, params: Mapping[str, torch.Tensor]) -> None:
        """Averages restored whole (a checkpoint's) placed as their parameters are: sharded the
        same way when those are (``train.strategy: fsdp``); a no-op otherwise."""
        from torch.distributed.tensor import DTensor

        from adaptkit.distributed import like

        for name in self._names:
            average, param = self[name], params[name]
            if isinstance(param, DTensor) and not isinstance(average, DTensor):
                self.register_buffer(self._buffer_name(name), like(average, param).float(), persistent=False)

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.Tensor], step: int) -> None:
        """Move the average towards ``params`` after optimizer step ``step`` (no-op before :meth:`start`)."""
        self._place_like(params)
        decay = self.decay_at(step)
        for name in self._names:
            self[name].lerp_(params[name].detach().float(), 1 - decay)

    def state(self, prefix: str = "ema.") -> dict[str, torch.Tensor]:
        """The averaged tensors by ``prefix + name``, for a checkpoint."""
        return {f"{prefix}{name}": tensor for name, tensor in self.items()}

    @staticmethod
    def from_state(tensors: Mapping[str, torch.Tensor], prefix: str = "ema.") -> dict[str, torch.Tensor]:
        """The averaged tensors of a checkpoint's ``tensors`` (what :meth:`state` wrote), by name."""
        return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}

    @torch.no_grad()
    def copy_to(self, params: Mapping[str, torch.Tensor]) -> None:
        """Put the average into ``params`` for good (the end of training)."""
        self._place_like(params)
        for name in self._names:
            params[name].copy_(self[name].to(params[name].dtype))

    @contextlib.contextmanager
    def swapped_in(self, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Put the average into ``params`` for the duration, then restore them bit for bit
        (no-op before :meth:`start`)."""
        saved = {name: params[name].detach().clone() for name in self._names}
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)
