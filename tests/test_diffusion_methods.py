"""Every registered method on the diffusion denoisers the contract examples do not cover.

The contract suite (tests/test_contract.py) runs every method on each backbone's
example: a text-conditioned cross-attention UNet for ``ddpm_unet`` and the prior stage
for ``unclip``. This file runs the same checks on the class-conditional UNet2DModel
(attention inside the block, group norm, no token site) and on unCLIP's decoder stage.
"""

from __future__ import annotations

import pytest
import torch

import adaptkit
from adaptkit.compat import check_spec


@torch.no_grad()
def loss_of(model, batch):
    """The task's loss in eval mode with a fixed seed (the noise and timesteps are drawn the same)."""
    model.eval()
    torch.manual_seed(1234)
    loss = model(batch).loss.detach().clone()
    model.train()
    return loss


def train_steps(model, steps):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    batch = batch_of(model)
    for step in range(steps):
        torch.manual_seed(step)
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()

VARIANTS = {
    "unet2d_class": {
        "backbone": {"name": "ddpm_unet", "model": "ddpm_unet_tiny", "conditioning": "class", "num_classes": 10},
        "data": {"name": "digits"},
    },
    "unclip_decoder": {
        "backbone": {"name": "unclip", "stage": "decoder", "prior": {"model": "unclip_prior_tiny"}, "decoder": {"model": "unclip_decoder_tiny"}},
        "data": {"name": "digits"},
    },
}
METHODS = {
    "lora_conv": {"name": "lora", "rank": 2, "targets": ["attn.q", "attn.v", "conv", "time"]},
    "full": {"name": "full"},
    "adapter_houlsby": {"name": "adapter", "reduction_factor": 4},
    "prefix": {"name": "prefix", "length": 3},
    "prefix_gated": {"name": "prefix", "length": 3, "gate": True},
    "prompt_deep": {"name": "prompt", "count": 2},
    "prompt_shallow": {"name": "prompt", "count": 2, "deep": False},
}


def spec_of(variant: str, method: str | None) -> dict:
    return {**VARIANTS[variant], "task": {"name": "text_to_image", "preview": 0}, "methods": [METHODS[method]] if method else []}


def build(variant: str, method: str | None):
    return adaptkit.build(spec_of(variant, method), keep_data=True)


def batch_of(model):
    return model.adaptkit.data.train.batch(range(4))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_method_trains_only_its_own_tensors_and_round_trips(variant, method, tmp_path):
    problems = check_spec(adaptkit.load_spec(spec_of(variant, method)), adaptkit.registry())
    if method == "prompt_shallow":  # VPT-shallow needs a token site, which neither denoiser has
        assert problems and "needs tokens sites" in problems[0] and VARIANTS[variant]["backbone"]["name"] in problems[0]
        return
    assert not problems
    base_loss = loss_of(base := build(variant, None), batch_of(base))
    model = build(variant, method)
    (applied,) = model.adaptkit.methods
    owned = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert owned
    assert sum(t.numel() for t in owned.values()) == applied.expected_parameters
    if applied.identity_at_init:
        torch.testing.assert_close(loss_of(model, batch_of(model)), base_loss, rtol=1e-5, atol=1e-6)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if n not in owned}
    train_steps(model, steps=2)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in frozen.items())
    now = dict(model.named_parameters())
    assert any(not torch.equal(now[n].detach(), t) for n, t in owned.items())
    trained = loss_of(model, batch_of(model))
    path = adaptkit.save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = adaptkit.build(model.adaptkit.spec, keep_data=True)
    adaptkit.load_adapter(fresh, path)
    assert torch.equal(loss_of(fresh, batch_of(fresh)), trained)


def test_prompt_tuning_of_a_cross_attention_unet_takes_the_context_token_route():
    spec = {
        "backbone": {"name": "ddpm_unet", "model": "ddpm_unet_cross_tiny", "conditioning": "class", "num_classes": 10},
        "methods": [{"name": "prompt", "count": 3, "deep": False}], "task": {"name": "text_to_image", "preview": 0},
        "data": {"name": "digits"},
    }
    model = adaptkit.build(spec)
    (applied,) = model.adaptkit.methods
    assert "unet: tokens" in applied.summary
    assert applied.expected_parameters == 3 * 16  # one shallow set of 16-d context tokens
