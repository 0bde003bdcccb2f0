"""Shared fixtures: tiny specs on the bundled digits, fast and seeded."""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any

import pytest

os.environ.setdefault("ADAPTKIT_TEST", "1")
# no network here: make hub look-ups fail at once instead of retrying
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the base-fingerprint cache of the tests' builds, never the user's
os.environ.setdefault("ADAPTKIT_CACHE_DIR", tempfile.mkdtemp(prefix="adaptkit-test-cache-"))


def tiny_vit_spec(tmp_path, **overrides) -> dict:
    """A spec that trains the tiny digits ViT for a few steps (seconds on a CPU)."""
    spec = {
        "name": "tiny",
        "seed": 0,
        "backbone": {"name": "vit", "model": "vit_tiny_digits"},
        "methods": [{"name": "lora", "rank": 2}],
        "task": {"name": "classification"},
        "data": {"name": "digits"},
        "train": {"max_steps": 6, "batch_size": 32, "eval_every": 3, "progress": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    for key, value in overrides.items():
        spec[key] = value
    return copy.deepcopy(spec)


def crash_run_after(step: int, run: Any) -> None:
    """Call ``run()`` with the trainer stopped by a KeyboardInterrupt right after it checkpoints ``step``."""
    from adaptkit.train import Trainer

    original = Trainer._save_state

    def crash(self, optimizer, done, *args):
        original(self, optimizer, done, *args)
        if done == step:
            raise KeyboardInterrupt("simulated crash")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_save_state", crash)
        with pytest.raises(KeyboardInterrupt):
            run()


@pytest.fixture
def vit_spec(tmp_path):
    return tiny_vit_spec(tmp_path)


def pytest_configure(config):
    config.addinivalue_line("markers", "real_plots: matplotlib lays out and rasterises figures for real (see _quick_plots)")


def _blank_png(figure, fname, *args, dpi=None, format=None, **kwargs):
    """``Figure.savefig`` stand-in: a white PNG of the figure's size in pixels."""
    from matplotlib import rcParams
    from PIL import Image

    dpi = figure.dpi if dpi in (None, "figure") and rcParams["savefig.dpi"] == "figure" else dpi or rcParams["savefig.dpi"]
    width, height = (max(1, int(inches * dpi)) for inches in figure.get_size_inches())
    Image.new("RGB", (width, height), "white").save(fname, format="PNG")


@pytest.fixture(autouse=True)
def _quick_plots(request):
    """Runs write figures (training curves, confusion matrices, edit strips) with matplotlib; laying
    one out and rasterising it costs 1-2 s on a loaded CPU, most of a tiny run's time. Our code
    still builds every figure (axes, images, labels, texts); only ``tight_layout`` and the
    rasterising in ``savefig`` are skipped, the file written being a blank PNG of the figure's size.
    tests/test_plots.py draws each kind of figure for real (marker ``real_plots``)."""
    if request.node.get_closest_marker("real_plots"):
        yield
        return
    from matplotlib.figure import Figure

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "tight_layout", lambda figure, *args, **kwargs: None)
        patch.setattr(Figure, "savefig", _blank_png)
        yield


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(1)
    yield


# --------------------------------------------------------------------- CLIP
@pytest.fixture(scope="session")
def clip_run(tmp_path_factory):
    """A finished zero-shot run directory of the tiny CLIP (templates only, nothing trained)."""
    import adaptkit

    out = tmp_path_factory.mktemp("clip") / "run"
    spec = {
        "name": "clip_zero_shot",
        "backbone": {"name": "clip", "model": "clip_tiny_digits"},
        "methods": [{"name": "system_prompt", "templates": ["a photo of the digit {label}."]}],
        "task": {"name": "zero_shot"},
        "data": {"name": "digits", "classes": [0, 1, 2]},
        "train": {"progress": False},
        "output": {"dir": str(out)},
    }
    adaptkit.run(spec, log=lambda *_: None)
    return out
