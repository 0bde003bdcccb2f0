"""Options for real sizes: gradient checkpointing, torch.compile per block (tiny models here)."""

from __future__ import annotations

import pytest
import torch

import adaptkit
from adaptkit.blocks import checkpoint_blocks, compile_blocks, surface_blocks
from adaptkit.checkpoint import load_tensors
from tests.conftest import tiny_vit_spec


def _adapter(run_dir) -> dict:
    return load_tensors(run_dir / "adapter.safetensors")[0]


def test_a_run_with_gradient_checkpointing_trains_the_same_adapter(tmp_path):
    spec = tiny_vit_spec(tmp_path, backbone={"name": "vit", "model": "vit_tiny_digits", "drop_path_rate": 0.1})
    spec["methods"] = [{"name": "lora", "rank": 2, "dropout": 0.1}]
    adaptkit.run(spec, log=lambda line: None)
    checkpointed = tiny_vit_spec(tmp_path, backbone=spec["backbone"], methods=spec["methods"])
    checkpointed["train"]["gradient_checkpointing"] = True
    checkpointed["output"] = {"dir": str(tmp_path / "checkpointed")}
    adaptkit.run(checkpointed, log=lambda line: None)
    plain, other = _adapter(tmp_path / "run"), _adapter(tmp_path / "checkpointed")
    assert plain.keys() == other.keys()
    for name, tensor in plain.items():
        torch.testing.assert_close(other[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_is_idempotent_and_off_in_eval(tmp_path):
    model = adaptkit.build(tiny_vit_spec(tmp_path), keep_data=True)
    assert checkpoint_blocks(model) == checkpoint_blocks(model) == len(surface_blocks(model)) == 4
    block = surface_blocks(model)[0]
    assert block.forward.forward.__self__ is block  # wrapped once, around the block's own forward
    batch = model.adaptkit.data.train.batch(range(4))
    model.eval()
    with torch.no_grad():
        model(batch)  # no checkpoint (and its warning) without gradients


def test_compiled_blocks_keep_loss_and_gradients(tmp_path):
    """train.compile compiles each block; the eager-backend compile checks the wiring in seconds
    (inductor itself is exercised by benchmarks/gpu_check.py)."""
    spec = tiny_vit_spec(tmp_path, methods=[{"name": "lora", "rank": 2}, {"name": "prompt", "deep": True}])
    model = adaptkit.build(spec, keep_data=True)
    batch = model.adaptkit.data.train.batch(range(4))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = model(batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    loss, grads = loss_and_grads()
    torch._dynamo.reset()
    assert compile_blocks(model, backend="aot_eager") == 4
    compiled_loss, compiled_grads = loss_and_grads()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the parameters keep their names: saving and merging see the same model
    assert all("_orig_mod" not in name for name in adaptkit.trainable_state(model))


@pytest.mark.parametrize("option", ["gradient_checkpointing", "compile"])
def test_options_are_validated(tmp_path, option):
    from adaptkit.errors import SpecError
    from adaptkit.spec import load_spec

    assert getattr(load_spec(tiny_vit_spec(tmp_path), [f"train.{option}=true"]).train, option) is True
    with pytest.raises(SpecError, match=option):
        load_spec(tiny_vit_spec(tmp_path), [f"train.{option}=sometimes"])


# ----------------------------------------------------------------- backbone.dtype
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_every_backbone_stores_its_frozen_base_in_the_dtype_and_trains_fp32(dtype):
    import copy

    from adaptkit.precision import TORCH_DTYPES, compute_context

    for record in adaptkit.registry().records("backbone"):
        spec = copy.deepcopy(dict(record.example))
        spec["backbone"] = {**spec["backbone"], "dtype": dtype}
        spec["methods"] = [{"name": "lora"}]
        model = adaptkit.build(spec, keep_data=True)
        frozen = {p.dtype for p in model.backbone.parameters() if not p.requires_grad and p.is_floating_point()}
        assert frozen == {TORCH_DTYPES[dtype]}, record.name
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}, record.name
        model.train()
        with compute_context(model, "cpu"):
            loss = model(model.adaptkit.data.train.batch(range(4))).loss
        loss.backward()
        assert torch.isfinite(loss), record.name
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.dtype == torch.float32 for g in grads), record.name


def test_bf16_base_trains_lora_in_fp32_loads_onto_fp32_and_merges(tmp_path):
    from adaptkit.native import load_trained

    spec = tiny_vit_spec(tmp_path, backbone={"name": "vit", "model": "vit_tiny_digits", "dtype": "bf16"})
    adaptkit.run(spec, log=lambda line: None)
    tensors = _adapter(tmp_path / "run")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    full = adaptkit.build(tiny_vit_spec(tmp_path))
    half = adaptkit.build(spec)
    # the fingerprint is taken before the cast: one base, whatever dtype it is stored in
    assert half.adaptkit.base_fingerprint == full.adaptkit.base_fingerprint
    adaptkit.load_adapter(full, tmp_path / "run" / "adapter.safetensors")
    trained = load_trained(tmp_path / "run")  # merging builds the base at fp32
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    x = torch.randn(4, 1, 8, 8)
    unmerged = trained.logits(x)
    torch.testing.assert_close(full.eval().logits(x), unmerged)
    (lora,) = trained.adaptkit.methods
    lora.merge()
    torch.testing.assert_close(trained.logits(x), unmerged, rtol=1e-4, atol=1e-5)
    adaptkit.load_adapter(half, tmp_path / "run" / "adapter.safetensors")
    from adaptkit.precision import compute_context

    with compute_context(half.eval(), "cpu"):
        torch.testing.assert_close(half.logits(x).float(), unmerged, rtol=0.05, atol=0.05)


def test_dtype_is_validated(tmp_path):
    from adaptkit.errors import SpecError
    from adaptkit.spec import load_spec

    with pytest.raises(SpecError, match="backbone.dtype"):
        load_spec(tiny_vit_spec(tmp_path), ["backbone.dtype=int8"])
