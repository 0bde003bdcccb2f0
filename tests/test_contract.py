"""Contract tests: every registered backbone x every registered method.

Parametrised over the registry, so a backbone or method that registers later is
tested the moment it does. Each backbone's record carries a tiny working spec
(``BackboneRecord.example``: backbone, task, data) and each method's record small
params (``MethodRecord.example``). A pair is skipped only where the static check
(:func:`adaptkit.compat.check_spec`) says the combination cannot work, and then
the check's message must name the method, the backbone and the missing site.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import adaptkit
from adaptkit.compat import check_spec
from adaptkit.errors import CompatibilityError
from adaptkit.records import SITE_KINDS

REGISTRY = adaptkit.registry()
BACKBONES = REGISTRY.records("backbone")
METHODS = REGISTRY.records("method")
PAIRS = [pytest.param(b, m, id=f"{b.name}-{m.name}") for b in BACKBONES for m in METHODS]
BATCH = 4


def spec_for(backbone: Any, methods: list[dict[str, Any]]) -> dict[str, Any]:
    spec = copy.deepcopy(dict(backbone.example))
    spec["methods"] = copy.deepcopy(methods)
    spec.setdefault("seed", 0)
    return spec


def method_params(method: Any) -> dict[str, Any]:
    return {"name": method.name, **copy.deepcopy(dict(method.example))}


def build_or_skip(backbone: Any, methods: list[dict[str, Any]]) -> torch.nn.Module:
    """Build the pair; skip (after checking the message) where the static check rules it out."""
    spec = spec_for(backbone, methods)
    problems = check_spec(adaptkit.load_spec(spec), REGISTRY)
    if problems:
        assert_clear(problems, backbone.name, [m["name"] for m in methods])
        with pytest.raises(CompatibilityError):
            adaptkit.build(spec, keep_data=True)
        pytest.skip(f"impossible by the static check: {problems[0]}")
    return adaptkit.build(spec, keep_data=True)


def assert_clear(problems: list[str], backbone: str, methods: list[str]) -> None:
    for problem in problems:
        assert any(f"method '{m}'" in problem for m in methods), problem
        assert f"'{backbone}'" in problem, problem
        assert any(f"{kind} sites" in problem for kind in SITE_KINDS) or "role" in problem, problem


def batch_of(model: torch.nn.Module) -> dict[str, Any]:
    return model.adaptkit.data.train.batch(range(BATCH))


@torch.no_grad()
def loss_of(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The task's loss in eval mode with a fixed seed (tasks that sample noise sample the same)."""
    was = model.training
    model.eval()
    torch.manual_seed(1234)
    try:
        return model(batch).loss.detach().clone()
    finally:
        model.train(was)


def train_steps(model: torch.nn.Module, steps: int = 1, lr: float = 1e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    batch = batch_of(model)
    for step in range(steps):
        torch.manual_seed(step)
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every persistent tensor that is not trained (norm running statistics aside)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n not in trainable and not n.endswith(skip)}


_BASE: dict[str, tuple[set[str], int, torch.Tensor]] = {}


def base_facts(backbone: Any) -> tuple[set[str], int, torch.Tensor]:
    """Of the backbone's example with no method: trainable names (the task's own), their count, the loss."""
    if backbone.name not in _BASE:
        model = adaptkit.build(spec_for(backbone, []), keep_data=True)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _BASE[backbone.name] = (names, count, loss_of(model, batch_of(model)))
    return _BASE[backbone.name]


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backbone", BACKBONES, ids=lambda b: b.name)
def test_every_backbone_has_a_working_example(backbone):
    assert backbone.example, f"backbone '{backbone.name}' registers no example spec; the contract tests need one"
    assert {"backbone", "task", "data"} <= set(backbone.example)
    model = adaptkit.build(spec_for(backbone, []), keep_data=True)
    assert torch.isfinite(loss_of(model, batch_of(model)))


@pytest.mark.parametrize("backbone, method", PAIRS)
def test_one_step_changes_only_what_the_method_owns(backbone, method):
    model = build_or_skip(backbone, [method_params(method)])
    task_owned, _, _ = base_facts(backbone)
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    owned = set(trainable_before) - task_owned
    (applied,) = model.adaptkit.methods
    if not owned:  # a method that trains nothing (text templates) must say so in its formula
        assert applied.expected_parameters() == 0, f"method '{method.name}' on '{backbone.name}' trains nothing"
    frozen = frozen_state(model)
    train_steps(model)
    state = model.state_dict()
    changed_frozen = [n for n, t in frozen.items() if not torch.equal(state[n], t)]
    assert not changed_frozen, f"frozen tensors changed: {changed_frozen[:5]}"
    now = dict(model.named_parameters())
    changed_owned = [n for n in owned if not torch.equal(now[n].detach(), trainable_before[n])]
    assert changed_owned or not owned, f"one step changed none of the method's {len(owned)} tensors"


@pytest.mark.parametrize("backbone, method", PAIRS)
def test_trainable_count_matches_the_method_formula(backbone, method):
    model = build_or_skip(backbone, [method_params(method)])
    _, task_count, _ = base_facts(backbone)
    (applied,) = model.adaptkit.methods
    expected = applied.expected_parameters()
    assert expected is not None, f"method '{method.name}' gives no parameter formula (AppliedMethod.expected)"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable - task_count == expected


@pytest.mark.parametrize("backbone, method", PAIRS)
def test_save_build_fresh_load_reproduces_outputs(backbone, method, tmp_path):
    model = build_or_skip(backbone, [method_params(method)])
    train_steps(model, steps=2)
    batch = batch_of(model)
    trained = loss_of(model, batch)
    path = adaptkit.save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = adaptkit.build(model.adaptkit.spec, keep_data=True)
    assert not torch.equal(loss_of(fresh, batch), trained), "training changed nothing the test could see"
    adaptkit.load_adapter(fresh, path)
    assert torch.equal(loss_of(fresh, batch), trained)
    for name, tensor in adaptkit.trainable_state(model).items():
        assert torch.equal(adaptkit.trainable_state(fresh)[name], tensor), name


@pytest.mark.parametrize("backbone, method", PAIRS)
def test_merged_equals_unmerged(backbone, method):
    model = build_or_skip(backbone, [method_params(method)])
    (applied,) = model.adaptkit.methods
    if not applied.mergeable:
        with pytest.raises(CompatibilityError, match=f"method '{method.name}' cannot be merged"):
            applied.merge()
        return
    train_steps(model, steps=2)
    batch = batch_of(model)
    unmerged = loss_of(model, batch)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    applied.merge()
    torch.testing.assert_close(loss_of(model, batch), unmerged, rtol=1e-4, atol=1e-5)
    applied.unmerge()
    torch.testing.assert_close(loss_of(model, batch), unmerged, rtol=1e-4, atol=1e-5)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("backbone, method", PAIRS)
def test_identity_at_initialisation_where_promised(backbone, method):
    model = build_or_skip(backbone, [method_params(method)])
    (applied,) = model.adaptkit.methods
    _, _, base_loss = base_facts(backbone)
    loss = loss_of(model, batch_of(model))
    assert torch.isfinite(loss)
    if applied.identity_at_init:
        torch.testing.assert_close(loss, base_loss, rtol=1e-5, atol=1e-6)
