"""Several named adapters on one model: load, switch, disable, combine, save and load back."""

from __future__ import annotations

import pytest
import torch

import adaptkit
from adaptkit.adapters import AdapterSet
from adaptkit.cli import main as cli
from adaptkit.errors import CheckpointError, CompatibilityError
from adaptkit.native import load_trained
from tests.conftest import tiny_vit_spec

LORA_A = [{"name": "lora", "rank": 2, "targets": ["attn.q", "attn.v"]}]
LORA_B = [{"name": "lora", "rank": 3, "alpha": 4, "targets": ["attn.v", "mlp.in", "embed"]}]
BOTTLENECK = [{"name": "adapter", "bottleneck": 4}]


def trained(tmp_path, methods, seed, name):
    """A model with random trained tensors, saved as an adapter file (as a run would)."""
    model = adaptkit.build(tiny_vit_spec(tmp_path, methods=methods))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    return model, adaptkit.save_adapter(model, tmp_path / f"{name}.safetensors")


def images():
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def features(model):
    return model.backbone.encode_image(images())


def layer_delta(model, adapter_names, adapters):
    """The dense update each named adapter puts on block 0's qkv, summed."""
    total = torch.zeros_like(model.backbone.net.blocks[0].attn.qkv.weight)
    for name in adapter_names:
        for method in adapters.adapters[name].methods:
            for u in method.low_rank_updates():
                if u.layer == "backbone.net.blocks.0.attn.qkv":
                    start, stop = u.row_range
                    total[start:stop] += u.delta().detach()
    return total


@pytest.fixture
def three(tmp_path):
    a, a_file = trained(tmp_path, LORA_A, 0, "a")
    b, b_file = trained(tmp_path, LORA_B, 1, "b")
    c, c_file = trained(tmp_path, BOTTLENECK, 2, "c")
    adapters = AdapterSet.from_run(a_file, name="a")
    adapters.load("b", b_file)
    adapters.load("c", c_file)
    adapters.model.eval()
    return adapters, {"a": a, "b": b, "c": c}


def test_each_adapter_switched_on_alone_computes_its_own_model(three, tmp_path):
    adapters, originals = three
    assert adapters.active == ["a"]
    for name, original in originals.items():
        adapters.use(name)
        assert torch.equal(adapters.model.logits(images()), original.logits(images())), name
    adapters.disable()
    base = adaptkit.build(tiny_vit_spec(tmp_path, methods=[])).eval()
    assert torch.equal(features(adapters.model), features(base))
    # the modules of b and c sit beside a's; files keep the plain names
    qkv = adapters.model.backbone.net.blocks[0].attn.qkv
    assert {n for n, _ in qkv.named_children()} == {"lora", "lora_b"}
    assert "backbone.net.blocks.0.attn.qkv.lora.lora_a" in adapters.adapters["b"].parameters


def test_two_adapters_on_at_once_add_up_and_cat_reproduces_that(three):
    adapters, _ = three
    adapters.use("a", "b")
    both = features(adapters.model)
    adapters.combine("sum", ["a", "b"], how="cat")
    adapters.use("sum")
    torch.testing.assert_close(features(adapters.model), both, rtol=1e-5, atol=1e-5)
    assert adapters.adapters["sum"].params[0].rank_pattern  # per-layer ranks: 2 * 2 + 3 on qkv, 3 elsewhere


def test_weighted_cat_svd_and_linear_follow_their_formulas(three):
    adapters, _ = three
    weights = {"a": 0.3, "b": -0.7}
    expected = 0.3 * layer_delta(adapters.model, ["a"], adapters) - 0.7 * layer_delta(adapters.model, ["b"], adapters)
    adapters.combine("cat", weights, how="cat")
    torch.testing.assert_close(layer_delta(adapters.model, ["cat"], adapters), expected, rtol=1e-5, atol=1e-6)
    adapters.combine("svd_full", weights, how="svd", rank=7)  # the sum's rank is at most 2 + 2 + 3
    torch.testing.assert_close(layer_delta(adapters.model, ["svd_full"], adapters), expected, rtol=1e-4, atol=1e-6)
    adapters.combine("svd_2", weights, how="svd", rank=2)
    u, s, vh = torch.linalg.svd(expected.double())
    best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young: the best rank-2 approximation
    torch.testing.assert_close(layer_delta(adapters.model, ["svd_2"], adapters).double(), best, rtol=1e-4, atol=1e-6)
    # linear: one adapter alone is exact; a layer where ranks differ is refused
    adapters.combine("lin", {"a": 0.5}, how="linear")
    torch.testing.assert_close(layer_delta(adapters.model, ["lin"], adapters), 0.5 * layer_delta(adapters.model, ["a"], adapters), rtol=1e-5, atol=1e-6)
    with pytest.raises(CompatibilityError, match="needs one rank .*use cat or svd"):
        adapters.combine("lin2", weights, how="linear")
    assert "lin2" not in adapters.adapters


def test_a_combination_saves_and_loads_as_a_run_and_into_another_set(three, tmp_path):
    adapters, originals = three
    adapters.combine("mix", {"a": 0.5, "b": 0.5}, how="svd", rank=4, head="b")
    adapters.use("mix")
    expected = adapters.model.logits(images())
    assert torch.equal(adapters.model.head.weight, originals["b"].head.weight)
    adapters.save("mix", tmp_path / "mix_run")
    adapters.save("mix", tmp_path / "mix.safetensors")
    torch.testing.assert_close(load_trained(tmp_path / "mix_run").logits(images()), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(load_trained(tmp_path / "mix.safetensors").logits(images()), expected, rtol=1e-5, atol=1e-6)
    other = AdapterSet.from_run(tmp_path / "mix_run", name="mix")
    other.model.eval()
    torch.testing.assert_close(other.model.logits(images()), expected, rtol=1e-5, atol=1e-6)
    # and it merges like any run
    assert cli(["merge", str(tmp_path / "mix_run"), str(tmp_path / "merged")]) == 0


def test_what_a_set_refuses(three, tmp_path):
    adapters, _ = three
    with pytest.raises(CompatibilityError, match="already loaded"):
        adapters.load("a", tmp_path / "a.safetensors")
    with pytest.raises(CompatibilityError, match="no adapter named 'zz'"):
        adapters.use("zz")
    with pytest.raises(CompatibilityError, match="no adapter named 'zz'"):
        adapters.remove("zz")
    with pytest.raises(CompatibilityError, match="method 'adapter' is not a low-rank update"):
        adapters.combine("x", ["a", "c"])
    foreign = adaptkit.build(tiny_vit_spec(tmp_path, methods=LORA_A, seed=7))  # other random base weights
    adaptkit.save_adapter(foreign, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="other base weights"):
        adapters.load("f", tmp_path / "foreign.safetensors")
    _, prompt_file = trained(tmp_path, [{"name": "prompt", "count": 2}], 3, "p")
    with pytest.raises(CompatibilityError, match="method 'prompt' cannot be switched off"):
        adapters.load("p", prompt_file)
    with pytest.raises(CompatibilityError, match="unusable"):
        adapters.use("a")


def test_cli_combine_evaluates_and_writes_a_run(tmp_path, capsys):
    _, a_file = trained(tmp_path, LORA_A, 0, "a")
    _, b_file = trained(tmp_path, LORA_B, 1, "b")
    assert cli(["combine", str(tmp_path / "mix"), str(a_file), str(b_file), "--how", "svd", "--rank", "3",
                "--weights", "0.5", "0.5", "--evaluate"]) == 0
    out = capsys.readouterr().out
    assert "svd of 0.5 x a, 0.5 x b" in out and "combined: test accuracy" in out
    model = load_trained(tmp_path / "mix")
    assert model.adaptkit.spec.methods[0].rank == 3
    assert cli(["combine", str(tmp_path / "mix2"), str(a_file), str(b_file), "--weights", "1"]) == 2


def test_a_load_that_fails_leaves_the_set_as_it_was(tmp_path):
    from adaptkit.checkpoint import load_tensors, save_tensors

    a, a_file = trained(tmp_path, LORA_A, 0, "a")
    b, b_file = trained(tmp_path, LORA_B, 1, "b")
    tensors, metadata = load_tensors(b_file)
    broken = {**tensors, "backbone.net.blocks.0.mlp.fc1.lora.lora_b": torch.ones(1, 1)}  # the wrong shape
    save_tensors(tmp_path / "broken.safetensors", broken, metadata)
    adapters = AdapterSet.from_run(a_file, name="a")
    adapters.model.eval()
    with pytest.raises(CheckpointError, match="has shape"):
        adapters.load("broken", tmp_path / "broken.safetensors")
    assert "broken" not in adapters.adapters
    assert torch.equal(features(adapters.model), features(a))  # nothing of the failed adapter is switched on
    adapters.load("b", b_file)  # its modules get the usual names again, so its file's names fit
    adapters.use("b")
    assert torch.equal(adapters.model.logits(images()), b.logits(images()))


def test_merging_leaves_a_switched_off_lora_out_of_the_weights(tmp_path):
    a, a_file = trained(tmp_path, LORA_A, 0, "a")
    _, b_file = trained(tmp_path, LORA_B, 1, "b")
    adapters = AdapterSet.from_run(a_file, name="a")
    adapters.load("b", b_file)  # loaded, switched off
    adapters.model.eval()
    expected = features(a)
    for method in adapters.model.adaptkit.methods:
        method.merge()
    assert torch.allclose(features(adapters.model), expected, rtol=1e-5, atol=1e-5)
    for method in adapters.model.adaptkit.methods:
        method.unmerge()
    adapters.use("b")  # switched on after the round trip: its update is added once
    assert torch.allclose(adapters.model.logits(images()), trained(tmp_path, LORA_B, 1, "b2")[0].logits(images()), rtol=1e-5, atol=1e-5)


def test_switching_off_a_merged_lora_takes_its_update_out(tmp_path):
    a, _ = trained(tmp_path, LORA_A, 0, "a")
    base = adaptkit.build(tiny_vit_spec(tmp_path, methods=[])).eval()
    expected = features(a)
    (method,) = a.adaptkit.methods
    method.merge()
    method.set_enabled(False)  # the model computes what it did without the method, merged or not
    assert torch.allclose(features(a), features(base), rtol=1e-5, atol=1e-5)
    method.set_enabled(True)
    assert torch.allclose(features(a), expected, rtol=1e-5, atol=1e-5)
    method.unmerge()
    assert torch.allclose(features(a), expected, rtol=1e-5, atol=1e-5)
