"""The contrastive task (CLIP's loss) and the captioned data sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import adaptkit
from adaptkit.builder import build
from adaptkit.errors import DataError
from adaptkit_plugins.clip._contrastive_impl import clip_loss
from adaptkit_plugins.clip.digits_captions import DIGIT_WORDS, WORDINGS, caption
from tests.cli_helpers import torchrun


def _pseudocode_loss(image: np.ndarray, text: np.ndarray, t: float) -> float:
    """CLIP's figure 3, in numpy: I_e, T_e = l2-normalised; logits = I_e T_e^T exp(t); mean of both axes' CE."""
    i_e = image / np.linalg.norm(image, axis=1, keepdims=True)
    t_e = text / np.linalg.norm(text, axis=1, keepdims=True)
    logits = i_e @ t_e.T * np.exp(t)
    n = len(logits)

    def cross_entropy(rows: np.ndarray) -> float:  # rows: each row scores every candidate; target = its own index
        top = rows.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
        return float(np.mean(log_z - rows[np.arange(n), np.arange(n)]))

    return (cross_entropy(logits) + cross_entropy(logits.T)) / 2


def test_clip_loss_matches_the_papers_pseudocode_and_open_clip():
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    t = np.log(1 / 0.07)
    ours = clip_loss(torch.tensor(image), torch.tensor(text), torch.tensor(np.exp(t))).item()
    assert ours == pytest.approx(_pseudocode_loss(image, text, t), rel=1e-9)
    from open_clip.loss import ClipLoss

    normed = [torch.nn.functional.normalize(torch.tensor(a), dim=-1) for a in (image, text)]
    assert ours == pytest.approx(ClipLoss()(*normed, torch.tensor(np.exp(t))).item(), rel=1e-9)


def test_digits_captions_name_the_right_digit_and_draw_wordings_per_sample():
    spec = {"backbone": {"name": "clip"}, "task": {"name": "contrastive"}, "data": {"name": "digits_captions", "classes": [3, 7]}}
    model = build(spec, keep_data=True)
    data = model.adaptkit.data
    assert data.info.kind == "captioned_images" and data.info.class_names == ["three", "seven"]
    batch = data.train.batch(range(40))
    for label, text, variants in zip(batch["labels"].tolist(), batch["captions"], batch["caption_variants"]):
        digit = (3, 7)[label]
        assert text in variants and variants == [caption(w, digit) for w in WORDINGS]
        assert DIGIT_WORDS[digit] in text or str(digit) in text
    rand = torch.linspace(0, 0.999, 40)[:, None]
    drawn = data.augment(batch, rand)["captions"]
    assert [v.index(c) for v, c in zip(batch["caption_variants"], drawn)] == [int(r * 8) for r in rand[:, 0].tolist()]
    assert batch["images"].shape == (40, 3, 8, 8)


def _write_listing(tmp_path, kind: str, rows: list[dict]) -> str:
    from PIL import Image

    for i, row in enumerate(rows):
        Image.fromarray(np.full((8, 8), 30 * i, dtype=np.uint8)).save(tmp_path / row["image"])
    if kind == "csv":
        path = tmp_path / "pairs.csv"
        keys = list(rows[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    else:
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_captions_files_load_with_labels(tmp_path, kind):
    rows = [{"image": f"{i}.png", "caption": f"picture number {i}", "label": "cat" if i % 2 else "dog"} for i in range(8)]
    spec = {
        "backbone": {"name": "clip"}, "task": {"name": "contrastive"},
        "data": {"name": "captions", "file": _write_listing(tmp_path, kind, rows), "label_key": "label", "split": [0.5, 0.25, 0.25]},
    }
    model = build(spec, keep_data=True)
    data = model.adaptkit.data
    assert data.info.class_names == ["cat", "dog"] and len(data.train) == 4
    batch = data.train.batch(range(4))
    for text, label, image in zip(batch["captions"], batch["labels"].tolist(), batch["images"]):
        i = int(text.split()[-1])
        assert label == (0 if i % 2 else 1)
        assert image[0, 0, 0].item() == pytest.approx(30 * i / 127.5 - 1, abs=1e-5)


def test_captions_file_errors_name_the_problem(tmp_path):
    rows = [{"image": f"{i}.png", "caption": f"c {i}"} for i in range(4)]
    listing = _write_listing(tmp_path, "jsonl", rows)

    def data(**params):
        return {"backbone": {"name": "clip"}, "task": {"name": "contrastive"}, "data": {"name": "captions", **params}}

    with pytest.raises(DataError, match="not found"):
        build(data(file=str(tmp_path / "none.jsonl")))
    with pytest.raises(DataError, match="needs class labels"):
        build(data(file=listing, shots=1))
    (tmp_path / "bad.jsonl").write_text('{"image": "0.png", "caption": "x"}\n{"image": "1.png"\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        build(data(file=str(tmp_path / "bad.jsonl")))
    (tmp_path / "gap.jsonl").write_text('{"image": "0.png", "caption": ""}\n')
    with pytest.raises(DataError, match="line 1: 'caption' is missing or empty"):
        build(data(file=str(tmp_path / "gap.jsonl")))
    (tmp_path / "cols.csv").write_text("path,text\n0.png,x\n")
    with pytest.raises(DataError, match="no column 'image'; columns: path, text"):
        build(data(file=str(tmp_path / "cols.csv")))
    (tmp_path / "ghost.jsonl").write_text('{"image": "ghost.png", "caption": "x"}\n')
    with pytest.raises(DataError, match="do not exist, e.g. .*ghost.png"):
        build(data(file=str(tmp_path / "ghost.jsonl")))


def test_contrastive_needs_captioned_data():
    from adaptkit.compat import check_spec

    spec = adaptkit.load_spec({"backbone": {"name": "clip"}, "task": {"name": "contrastive"}, "data": {"name": "digits"}})
    assert any("captioned_images" in p for p in check_spec(spec, adaptkit.registry()))


def test_contrastive_training_pulls_pairs_together(tmp_path):
    spec = {
        "name": "ct", "backbone": {"name": "clip"}, "methods": [{"name": "full"}],
        "task": {"name": "contrastive", "zero_shot_templates": ["a photo of the digit {label}.", "{label}"]},
        "data": {"name": "digits_captions", "classes": [0, 1, 2]},
        "train": {"max_steps": 4, "batch_size": 16, "eval_every": 2, "progress": False},
        "output": {"dir": str(tmp_path / "ct")},
    }
    model = build(spec, keep_data=True)
    assert model.primary_metric == "zero_shot_accuracy"
    batch = model.adaptkit.data.train.batch(range(16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(15):  # the same batch again and again: its loss must fall
        out = model.training_step(batch)
        losses.append(out.loss.item())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.1
    assert model.backbone.net.logit_scale.grad is None and model.backbone.net.logit_scale.requires_grad
    result = adaptkit.run(spec, log=lambda *_: None)
    test = result.metrics["test"]
    assert {"loss", "i2t_accuracy", "zero_shot_accuracy", "distinct_captions"} <= set(test)
    assert 0 <= test["zero_shot_accuracy"] <= 1 and test["count"] == 81
    correct = test["zero_shot_accuracy"] * 81  # a fraction of the 81 test images
    assert correct == pytest.approx(round(correct))
    assert [json.loads(line)["step"] for line in (tmp_path / "ct" / "metrics.jsonl").read_text().splitlines()] == [2, 4]


@pytest.mark.slow
def test_ddp_contrasts_the_global_batch(tmp_path):
    """torchrun x2 (gloo): each process's pairs meet the other's as negatives, as in one process."""
    from safetensors.torch import load_file

    spec = {
        "name": "single", "backbone": {"name": "clip"}, "methods": [{"name": "full"}],
        "task": {"name": "contrastive"}, "data": {"name": "digits_captions", "classes": [0, 1, 2]},
        "train": {"max_steps": 3, "batch_size": 16, "eval_every": 3, "grad_clip": None, "progress": False},
        "output": {"dir": str(tmp_path / "single")},
    }
    adaptkit.run(spec, log=lambda *_: None)
    ddp = {**spec, "name": "ddp", "output": {"dir": str(tmp_path / "ddp")}}
    done = torchrun(tmp_path, ddp)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    single, parallel = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("single", "ddp"))
    assert set(single) == set(parallel)
    for key, value in single.items():
        if key.endswith("attn.in_proj.bias"):
            # the key bias cannot change attention (softmax ignores q.b_k), so its gradient is 0 up to
            # rounding, and AdamW turns that rounding into +-lr steps: compare the q and v parts only
            value, other = torch.cat([value[:64], value[128:]]), torch.cat([parallel[key][:64], parallel[key][128:]])
        else:
            other = parallel[key]
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=key)
