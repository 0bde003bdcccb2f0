"""Data source ``latent_seeds``: integer seeds that a generator turns into latents (z = randn(seed)).

Generator editing and adaptation train on sampled latents rather than on images:
StyleGAN-NADA adapts a generator over random z's, and latent edits are evaluated
over a fixed set of sources. Seeds make those z's reproducible everywhere: seed 3
is the same face (or digit) in a run, in ``adaptkit edit --seed 3`` and on another
machine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from adaptkit.hookspecs import hookimpl
from adaptkit.params import ComponentParams
from adaptkit.records import DataRecord


class LatentSeedsParams(ComponentParams):
    """Consecutive seeds: ``train`` from ``first``, then ``val``, then ``test``."""

    name: Literal["latent_seeds"] = "latent_seeds"
    first: int = Field(0, ge=0, description="the first training seed")
    train: int = Field(512, gt=0, description="number of training seeds")
    val: int = Field(16, ge=0, description="number of validation seeds (after the training ones)")
    test: int = Field(16, ge=0, description="number of test seeds (after the validation ones)")

    @model_validator(mode="after")
    def _seeds_fit(self) -> LatentSeedsParams:
        last = self.first + self.train + self.val + self.test - 1
        if last >= 2**63:  # a torch.long seed, the same bound as ``adaptkit edit --seed``
            raise ValueError(f"the seeds run from first={self.first} to {last}, past 2**63 - 1; choose a smaller first")
        return self


def load_latent_seeds(params: LatentSeedsParams, ctx: Any) -> Any:
    import torch

    from adaptkit.data import DataBundle, DataInfo, TensorDataset

    start = params.first
    splits = []
    for count in (params.train, params.val, params.test):
        splits.append(TensorDataset(seeds=torch.arange(start, start + count, dtype=torch.long)))
        start += count
    return DataBundle(DataInfo(kind="latent_seeds"), *splits)


@hookimpl
def adaptkit_data_sources() -> list[DataRecord]:
    return [
        DataRecord(
            name="latent_seeds",
            params=LatentSeedsParams,
            factory=load_latent_seeds,
            summary="integer seeds for generator latents (z = randn(style_dim) seeded), split train/val/test",
            provides="latent_seeds",
        )
    ]
