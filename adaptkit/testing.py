"""The backbone x method contract suite, for adaptkit's own tests and for plugin packages.

:func:`contract_tests` returns pytest test functions parametrised over registered
backbone x method pairs; a test module puts them in its globals::

    # tests/test_contract.py of a plugin package
    from adaptkit.testing import contract_tests

    globals().update(contract_tests(backbones=["convnext"], methods=["ia3"]))

Each backbone's record carries a tiny working spec (``BackboneRecord.example``:
backbone, task, data) and each method's record small params (``MethodRecord.example``).
A pair is skipped only where the static check (:func:`adaptkit.compat.check_spec`)
says the combination cannot work, and then the check's message must name the method,
the backbone and the missing site. Imports torch and pytest.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from adaptkit.compat import check_spec
from adaptkit.errors import CompatibilityError
from adaptkit.records import SITE_KINDS

BATCH = 4


def contract_tests(
    backbones: Sequence[str] | None = None, methods: Sequence[str] | None = None, registry: Any = None
) -> dict[str, Callable[..., None]]:
    """Test functions over every pair with a named backbone or a named method (all pairs when neither is given).

    The checks: every backbone's example builds and gives a finite loss, and the towers its
    record declares (sites, roles) are those of its built surface; one training
    step changes only the parameters the method owns and leaves every frozen tensor
    bit-identical; the trainable count equals the method's formula
    (``AppliedMethod.expected_parameters``); save, fresh build and load reproduce
    outputs exactly; merged equals unmerged (and unmerge restores the weights) for
    mergeable methods, and merging a non-mergeable one is a clear error; identity at
    initialisation where the method promises it (``AppliedMethod.identity_at_init``);
    gradient checkpointing of the surface blocks keeps the loss and every gradient and
    keeps fewer activations.
    """
    import adaptkit

    reg = registry or adaptkit.registry()
    all_backbones, all_methods = reg.records("backbone"), reg.records("method")
    for kind, names, known in (("backbone", backbones, all_backbones), ("method", methods, all_methods)):
        missing = sorted(set(names or ()) - {r.name for r in known})
        if missing:
            raise ValueError(f"contract_tests: no registered {kind} {', '.join(missing)}; is its package installed?")
    everything = backbones is None and methods is None
    chosen_backbones = [b for b in all_backbones if everything or b.name in (backbones or ())]
    pairs = [
        pytest.param(b, m, id=f"{b.name}-{m.name}")
        for b in all_backbones
        for m in all_methods
        if everything or b.name in (backbones or ()) or m.name in (methods or ())
    ]
    suite = _Suite(reg)
    over_pairs = pytest.mark.parametrize("backbone, method", pairs)
    over_backbones = pytest.mark.parametrize("backbone", chosen_backbones, ids=lambda b: b.name)

    @over_backbones
    def test_every_backbone_has_a_working_example(backbone: Any) -> None:
        suite.example_works(backbone)

    @over_backbones
    def test_static_towers_equal_the_built_surface(backbone: Any) -> None:
        suite.static_towers(backbone)

    @over_pairs
    def test_one_step_changes_only_what_the_method_owns(backbone: Any, method: Any) -> None:
        suite.one_step(backbone, method)

    @over_pairs
    def test_trainable_count_matches_the_method_formula(backbone: Any, method: Any) -> None:
        suite.count(backbone, method)

    @over_pairs
    def test_save_build_fresh_load_reproduces_outputs(backbone: Any, method: Any, tmp_path: Any) -> None:
        suite.save_load(backbone, method, tmp_path)

    @over_pairs
    def test_merged_equals_unmerged(backbone: Any, method: Any) -> None:
        suite.merge(backbone, method)

    @over_pairs
    def test_identity_at_initialisation_where_promised(backbone: Any, method: Any) -> None:
        suite.identity(backbone, method)

    @over_pairs
    def test_gradient_checkpointing_keeps_loss_and_gradients(backbone: Any, method: Any) -> None:
        suite.checkpointing(backbone, method)

    tests = [
        test_every_backbone_has_a_working_example, test_static_towers_equal_the_built_surface,
        test_one_step_changes_only_what_the_method_owns,
        test_trainable_count_matches_the_method_formula, test_save_build_fresh_load_reproduces_outputs,
        test_merged_equals_unmerged, test_identity_at_initialisation_where_promised,
        test_gradient_checkpointing_keeps_loss_and_gradients,
    ]
    return {test.__name__: test for test in tests}


def assert_clear(problems: list[str], backbone: str, methods: Sequence[str]) -> None:
    """Each problem names one of the methods, the backbone, and a site kind or role."""
    for problem in problems:
        assert any(f"method '{m}'" in problem for m in methods), problem
        assert f"'{backbone}'" in problem, problem
        assert any(f"{kind} sites" in problem for kind in SITE_KINDS) or "role" in problem, problem


class _Suite:
    """The checks themselves; caches the method-less facts of each backbone."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self._base: dict[str, tuple[set[str], int, torch.Tensor]] = {}

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def spec_for(backbone: Any, methods: list[dict[str, Any]]) -> dict[str, Any]:
        spec = copy.deepcopy(dict(backbone.example))
        spec["methods"] = copy.deepcopy(methods)
        spec.setdefault("seed", 0)
        return spec

    @staticmethod
    def params_of(method: Any) -> dict[str, Any]:
        return {"name": method.name, **copy.deepcopy(dict(method.example))}

    def build(self, spec: Any) -> torch.nn.Module:
        import adaptkit

        return adaptkit.build(spec, registry=self.registry, keep_data=True)

    def build_or_skip(self, backbone: Any, method: Any) -> torch.nn.Module:
        """Build the pair; skip (after checking the message) where the static check rules it out."""
        import adaptkit

        spec = self.spec_for(backbone, [self.params_of(method)])
        problems = check_spec(adaptkit.load_spec(spec, registry=self.registry), self.registry)
        if problems:
            assert_clear(problems, backbone.name, [method.name])
            with pytest.raises(CompatibilityError):
                self.build(spec)
            pytest.skip(f"impossible by the static check: {problems[0]}")
        return self.build(spec)

    @staticmethod
    def batch_of(model: torch.nn.Module) -> dict[str, Any]:
        return model.adaptkit.data.train.batch(range(BATCH))

    @staticmethod
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

    def train_steps(self, model: torch.nn.Module, steps: int = 1, lr: float = 1e-2) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:  # a parameter-free method on a task without a head (CLIP zero-shot + templates)
            return
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()
        batch = self.batch_of(model)
        for step in range(steps):
            torch.manual_seed(step)
            optimizer.zero_grad()
            model(batch).loss.backward()
            optimizer.step()

    @staticmethod
    def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every persistent tensor that is not trained (norm running statistics aside)."""
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        skip = ("running_mean", "running_var", "num_batches_tracked")
        return {n: t.detach().clone() for n, t in model.state_dict().items() if n not in trainable and not n.endswith(skip)}

    def base_facts(self, backbone: Any) -> tuple[set[str], int, torch.Tensor]:
        """Of the backbone's example with no method: trainable names (the task's own), their count, the loss."""
        if backbone.name not in self._base:
            model = self.build(self.spec_for(backbone, []))
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            count = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self._base[backbone.name] = (names, count, self.loss_of(model, self.batch_of(model)))
        return self._base[backbone.name]

    # ----------------------------------------------------------------- checks
    def example_works(self, backbone: Any) -> None:
        assert backbone.example, f"backbone '{backbone.name}' registers no example spec; the contract tests need one"
        assert {"backbone", "task", "data"} <= set(backbone.example)
        model = self.build(self.spec_for(backbone, []))
        assert torch.isfinite(self.loss_of(model, self.batch_of(model)))

    def static_towers(self, backbone: Any) -> None:
        """What validation reads (the record's TowerInfo) is what methods meet at build: the
        towers, their site kinds and their roles, on the surface methods see (the task's own
        sites included)."""
        import adaptkit

        spec = adaptkit.load_spec(self.spec_for(backbone, []), registry=self.registry)
        static = {name: (set(info.sites), set(info.roles)) for name, info in backbone.towers_for(spec.backbone).items()}
        surface = self.build(spec).surface
        built = {name: ({kind for kind in SITE_KINDS if tower.has(kind)}, tower.roles()) for name, tower in surface.towers.items()}
        assert built == static, f"backbone '{backbone.name}': record says {static}, the built surface has {built}"

    def one_step(self, backbone: Any, method: Any) -> None:
        model = self.build_or_skip(backbone, method)
        task_owned, _, _ = self.base_facts(backbone)
        trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        owned = set(trainable_before) - task_owned
        (applied,) = model.adaptkit.methods
        if not owned:  # a method that trains nothing (text templates) must say so in its formula
            assert applied.expected_parameters == 0, f"method '{method.name}' on '{backbone.name}' trains nothing"
        frozen = self.frozen_state(model)
        self.train_steps(model)
        state = model.state_dict()
        changed_frozen = [n for n, t in frozen.items() if not torch.equal(state[n], t)]
        assert not changed_frozen, f"frozen tensors changed: {changed_frozen[:5]}"
        now = dict(model.named_parameters())
        changed_owned = [n for n in owned if not torch.equal(now[n].detach(), trainable_before[n])]
        assert changed_owned or not owned, f"one step changed none of the method's {len(owned)} tensors"

    def count(self, backbone: Any, method: Any) -> None:
        model = self.build_or_skip(backbone, method)
        _, task_count, _ = self.base_facts(backbone)
        (applied,) = model.adaptkit.methods
        expected = applied.expected_parameters
        assert expected is not None, f"method '{method.name}' gives no parameter formula (AppliedMethod.expected_parameters)"
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable - task_count == expected

    def save_load(self, backbone: Any, method: Any, tmp_path: Any) -> None:
        import adaptkit

        model = self.build_or_skip(backbone, method)
        self.train_steps(model, steps=2)
        batch = self.batch_of(model)
        trained = self.loss_of(model, batch)
        path = adaptkit.save_adapter(model, tmp_path / "adapter.safetensors")
        fresh = self.build(model.adaptkit.spec)
        if adaptkit.trainable_state(model):  # else there is nothing to save: the file must still load
            assert not torch.equal(self.loss_of(fresh, batch), trained), "training changed nothing the test could see"
        adaptkit.load_adapter(fresh, path)
        assert torch.equal(self.loss_of(fresh, batch), trained)
        fresh_state = adaptkit.trainable_state(fresh)
        for name, tensor in adaptkit.trainable_state(model).items():
            assert torch.equal(fresh_state[name], tensor), name

    def merge(self, backbone: Any, method: Any) -> None:
        model = self.build_or_skip(backbone, method)
        (applied,) = model.adaptkit.methods
        if not applied.mergeable:
            with pytest.raises(CompatibilityError, match=f"method '{method.name}' cannot be merged"):
                applied.merge()
            return
        self.train_steps(model, steps=2)
        batch = self.batch_of(model)
        unmerged = self.loss_of(model, batch)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        applied.merge()
        torch.testing.assert_close(self.loss_of(model, batch), unmerged, rtol=1e-4, atol=1e-5)
        applied.unmerge()
        torch.testing.assert_close(self.loss_of(model, batch), unmerged, rtol=1e-4, atol=1e-5)
        for name, tensor in model.state_dict().items():
            # relative as well as absolute: a multiplicative merge (IA3) and its inverse round
            # large weights (StyleGAN stores its mapping weights as randn / 0.01) by a few ulps
            torch.testing.assert_close(tensor, before[name], rtol=1e-6, atol=1e-5, msg=name)

    def identity(self, backbone: Any, method: Any) -> None:
        model = self.build_or_skip(backbone, method)
        (applied,) = model.adaptkit.methods
        _, _, base_loss = self.base_facts(backbone)
        loss = self.loss_of(model, self.batch_of(model))
        assert torch.isfinite(loss)
        if applied.identity_at_init:
            torch.testing.assert_close(loss, base_loss, rtol=1e-5, atol=1e-6)

    def checkpointing(self, backbone: Any, method: Any) -> None:
        from adaptkit.blocks import checkpoint_blocks

        model = self.build_or_skip(backbone, method)
        batch = self.batch_of(model)
        plain = _loss_grads_saved(model, batch)
        assert checkpoint_blocks(model) > 0, f"backbone '{backbone.name}' lists no blocks to checkpoint"
        checkpointed = _loss_grads_saved(model, batch)
        torch.testing.assert_close(checkpointed[0], plain[0], rtol=1e-6, atol=1e-7)
        assert checkpointed[1].keys() == plain[1].keys()
        for name, grad in plain[1].items():
            torch.testing.assert_close(checkpointed[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
        if plain[1]:
            assert checkpointed[2] < plain[2], f"checkpointing kept {checkpointed[2]} activation values, the plain model {plain[2]}"


def _loss_grads_saved(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One seeded training forward and backward: the loss, every gradient, and how many values autograd
    kept for backward (outside checkpointed blocks; inside them ``torch.utils.checkpoint`` keeps its own)."""
    saved = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[0] += tensor.numel()
        return tensor

    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(4321)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(batch).loss
    if loss.requires_grad:
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads, saved[0]
