"""Property test: random specs never produce a traceback from `validate` or `run --dry-run`."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptkit.cli import main

BASE = {
    "name": "fuzz",
    "backbone": {"name": "vit", "model": "vit_tiny_digits"},
    "methods": [{"name": "lora", "rank": 2}],
    "task": {"name": "classification"},
    "data": {"name": "digits"},
    "train": {"max_steps": 2, "progress": False},
}

PATHS = [
    ("backbone",), ("backbone", "name"), ("backbone", "model"), ("backbone", "pretrained"), ("backbone", "img_size"),
    ("backbone", "in_chans"), ("backbone", "bogus"), ("methods",), ("methods", 0), ("methods", 0, "name"),
    ("methods", 0, "rank"), ("methods", 0, "targets"), ("methods", 0, "tower"), ("methods", 0, "dropout"),
    ("methods", 0, "target_modules"), ("task",), ("task", "name"), ("task", "num_classes"), ("task", "label_smoothing"),
    ("data",), ("data", "name"), ("data", "classes"), ("data", "image_size"), ("data", "channels"), ("data", "split"),
    ("data", "root"), ("data", "shots"), ("train",), ("train", "lr"), ("train", "batch_size"), ("train", "grad_accum"),
    ("train", "schedule"), ("train", "device"), ("seed",), ("output",), ("extra_top_level",),
]

values = st.one_of(
    st.none(), st.booleans(), st.sampled_from([-2, -1, 0, 1, 2, 3, 7, 64, 10**4]),
    st.sampled_from([-0.5, 0.0, 1e-3, 0.5, 1.0, float("nan"), float("inf")]),
    st.sampled_from(["vit", "lora", "full", "classification", "digits", "image_folder", "vit_tiny_32", "attn.q",
                     "mlp.in", "text", "all", "cosine", "cpu", "cuda", "nonexistent.safetensors", "", "(", "vit_tiny_digits"]),
    st.lists(st.sampled_from([0, 1, 5, 9, 11, "attn.q", "x"]), max_size=4),
    st.dictionaries(st.sampled_from(["name", "rank", "zzz"]), st.sampled_from(["lora", 1, None]), max_size=2),
)


def mutate(spec: dict, path: tuple, value: object) -> dict:
    spec = copy.deepcopy(spec)
    node = spec
    for part in path[:-1]:
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                return spec
            node = node[part]
        elif isinstance(node, dict):
            node = node.setdefault(part, {}) if not isinstance(node.get(part), (list, str)) else node[part]
        else:
            return spec
        if isinstance(node, str):
            return spec
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    return spec


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(PATHS), values), min_size=1, max_size=3))
def test_random_specs_never_give_a_traceback(tmp_path, capsys, changes):
    spec = BASE
    for path, value in changes:
        spec = mutate(spec, path, value)
    spec.setdefault("output", {})
    if isinstance(spec["output"], dict):
        spec["output"]["dir"] = str(tmp_path / "out")
    file = tmp_path / "spec.yaml"
    file.write_text(yaml.safe_dump(spec))
    for args in (["validate", str(file)], ["run", str(file), "--dry-run"]):
        code = main(args)
        err = capsys.readouterr().err
        assert code in (0, 2), (args, spec, err)
        assert "Traceback" not in err and "internal error" not in err, (spec, err)
        if code == 2:
            assert err.startswith("error: "), err
