"""`adaptkit classify`: ranked labels per image, JSON output, and clear errors with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adaptkit.cli import main


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory):
    """Three of scikit-learn's digits (0, 1, 2) saved as 8x8 grey PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for digit in (0, 1, 2):
        image = digits.images[list(digits.target).index(digit)]
        path = folder / f"digit_{digit}.png"
        Image.fromarray((image * 255 / 16).round().astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_classify_prints_ranked_labels_with_probabilities(clip_run, digit_pngs, capsys):
    assert main(["classify", str(clip_run), "--labels", "zero,one,two", "--top", "2", *digit_pngs]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == digit_pngs[0] and len(lines) == 3 * 3
    ranked = lines[1:3]
    assert ranked[0].startswith("  ") and ranked[0].endswith("%, ranked 1 of 3")
    assert ranked[1].endswith("%, ranked 2 of 3")
    first = [float(line.split()[1].rstrip("%,")) for line in ranked]
    assert first[0] >= first[1]


def test_classify_json_matches_the_zero_shot_task(clip_run, digit_pngs, capsys):
    """The CLI's probabilities equal the zero_shot model's on the same pixels (templates applied)."""
    from adaptkit.builder import build
    from adaptkit.commands.classify import load_image
    from adaptkit.spec import load_spec

    assert main(["classify", str(clip_run), "--json", *digit_pngs]) == 0  # labels: the run's class names
    report = json.loads(capsys.readouterr().out)
    model = build(load_spec(clip_run / "spec.yaml")).eval()
    images = torch.stack([load_image(p, 3, (8, 8)) for p in digit_pngs])
    expected = model.probabilities(images)
    for entry, row in zip(report, expected):
        probabilities = {item["label"]: item["probability"] for item in entry["ranking"]}
        assert set(probabilities) == {"0", "1", "2"}
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        for name, value in zip(["0", "1", "2"], row.tolist()):
            assert probabilities[name] == pytest.approx(value, abs=1e-5)
        assert [item["rank"] for item in entry["ranking"]] == [1, 2, 3]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--labels", "zero"], "at least two labels"),
        (["--labels", "zero,,two"], "empty label"),
        (["--labels", "a,b,a"], "'a' is given more than once"),
        (["--top", "0"], "--top must be at least 1"),
    ],
)
def test_classify_refuses_bad_options(clip_run, digit_pngs, capsys, args, message):
    assert main(["classify", str(clip_run), *args, digit_pngs[0]]) == 2
    assert message in capsys.readouterr().err


def test_classify_refuses_missing_inputs_and_image_only_models(clip_run, digit_pngs, tmp_path, capsys):
    assert main(["classify", str(clip_run), str(tmp_path / "nothing.png")]) == 2
    assert "nothing.png: image not found" in capsys.readouterr().err
    (tmp_path / "fake.png").write_text("not an image")
    assert main(["classify", str(clip_run), str(tmp_path / "fake.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["classify", str(tmp_path / "no_run"), digit_pngs[0]]) == 2
    assert "no such run directory or spec file" in capsys.readouterr().err
    assert main(["classify", str(tmp_path), digit_pngs[0]]) == 2
    assert "has no spec.yaml" in capsys.readouterr().err
    vit = tmp_path / "vit.yaml"
    vit.write_text("backbone: vit\ntask: classification\ndata: {name: digits}\n")
    assert main(["classify", str(vit), "--labels", "a,b", digit_pngs[0]]) == 2
    assert "does not encode text" in capsys.readouterr().err
