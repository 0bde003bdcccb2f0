"""The figures runs write, drawn for real: everywhere else conftest's ``_quick_plots`` saves a blank
PNG in place of matplotlib's layout and rasterising (the slowest part of a tiny run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from adaptkit.plots import plot_curves
from adaptkit_plugins.stylegan.images import save_strips
from adaptkit_plugins.tasks.classification_model import _plot_confusion

pytestmark = pytest.mark.real_plots


def drawn(path, size):
    """The PNG at ``path``, of ``size`` pixels (width, height), with something drawn on it."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size, (image.format, image.size)
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 128).mean() > 0.002, "the figure is blank"
    return pixels


def test_curves_with_a_metric_panel_and_loss_only(tmp_path):
    history = [{"step": s, "train_loss": 2.0 / s, "val_loss": 2.2 / s, "val_accuracy": 0.1 * s} for s in (1, 2, 3)]
    both = drawn(plot_curves(history, tmp_path / "both.png", "accuracy"), (1100, 396))
    # a task whose primary metric is its loss, no validation: one panel, train loss only
    alone = drawn(plot_curves([{"step": s, "train_loss": 1.0 / s} for s in (1, 2)], tmp_path / "loss.png", "loss"), (550, 396))
    assert both.shape[1] == 2 * alone.shape[1]
    assert plot_curves([], tmp_path / "none.png", "accuracy") is None and not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("classes", [13, 25])  # rotated class names past 12 classes; no cell counts past 20
def test_confusion_matrix(tmp_path, classes):
    matrix = (torch.eye(classes, dtype=torch.long) * 5 + 1).tolist()
    names = [f"class {i}" for i in range(classes)]
    side = int(max(3.5, 0.45 * classes + 1.5) * 110)
    _plot_confusion(matrix, names, tmp_path / "cm.png", "val: accuracy 0.500")
    drawn(tmp_path / "cm.png", (side, side))


def test_labelled_strips(tmp_path):
    rows = [torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8), torch.zeros(1, 1, 8, 8)]  # a short second row
    path = save_strips(rows, tmp_path / "strips.png", column_titles=["a", "b"], row_titles=["x", "y"], title="edit")
    drawn(path, (int((1.25 * 2 + 1.2) * 100), int((1.3 * 2 + 0.5) * 100)))
