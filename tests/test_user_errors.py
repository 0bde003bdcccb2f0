"""Exit 2 and one message for every user error: output directories the machine refuses, kwargs the
library rejects, seeds beyond 64 bits, data that cannot be split, `validate` arguments."""

from __future__ import annotations

import errno

import pytest
import yaml
from PIL import Image

from adaptkit.cli import main
from tests.cli_helpers import digest, user_error
from tests.conftest import tiny_vit_spec


def spec_file(tmp_path, spec=None):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec or tiny_vit_spec(tmp_path)))
    return path


# ----------------------------------------------------------------------------- output.dir
def test_output_dirs_that_cannot_hold_a_run(tmp_path, capsys):
    path = spec_file(tmp_path)
    (tmp_path / "a_file").write_text("mine")
    cases = [
        (tmp_path / "a_file", "exists and is not a directory"),
        (tmp_path / "a_file" / "run", "a_file"),
        ("/proc/adaptkit_run", "kernel file system"),
        ("/sys/adaptkit_run", "kernel file system"),
        (tmp_path / ("x" * 300), "name too long"),
    ]
    for out, fragment in cases:
        user_error(capsys, ["run", path, f"output.dir={out}"], str(fragment) if fragment == "a_file" else fragment)
    assert (tmp_path / "a_file").read_text() == "mine"


@pytest.mark.parametrize("code, fragment", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
                                            (errno.EDQUOT, "quota")])
def test_a_full_or_read_only_disk_is_a_user_error(tmp_path, capsys, monkeypatch, code, fragment):
    import os

    import safetensors.torch

    path = spec_file(tmp_path)
    assert main(["run", str(path)]) == 0
    before = digest(tmp_path / "run")

    def refuse(tensors, filename, metadata=None):
        raise OSError(code, os.strerror(code), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    err = user_error(capsys, ["run", path, "--overwrite"], fragment)
    assert ".state.safetensors" in err or "adapter.safetensors" in err
    assert digest(tmp_path / "run") == before  # the run it would have replaced is intact


# ----------------------------------------------------------------------------- spec values the libraries refuse
@pytest.mark.parametrize("override, fragment", [
    ("backbone.kwargs.dpeth=2", "dpeth"), ("backbone.kwargs.depth=abc", "depth"),
])
def test_backbone_kwargs_the_library_rejects(tmp_path, capsys, override, fragment):
    user_error(capsys, ["run", spec_file(tmp_path), "--dry-run", override], "backbone", fragment)


def test_generate_refuses_a_seed_beyond_64_bits(tmp_path, capsys):
    user_error(capsys, ["generate", tmp_path / "run", "--seed", str(2**64), "--out", tmp_path / "g.png"], "--seed", "2**63")


def test_latent_seeds_that_run_past_64_bits_are_refused(tmp_path, capsys):
    spec = {"backbone": {"name": "stylegan2", "preset": "tiny"}, "task": {"name": "stylegan2_gan"},
            "data": {"name": "latent_seeds", "first": 2**63 - 100}, "output": {"dir": str(tmp_path / "run")}}
    user_error(capsys, ["validate", spec_file(tmp_path, spec)], "data", "2**63")


def image_folder(root, counts):
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (8, 8), color=10 * i).save(root / label / f"{i}.png")
    return root


@pytest.mark.parametrize("counts", [{"a": 6, "b": 1}, {"a": 2, "b": 2}])
def test_data_that_cannot_be_split_is_a_user_error(tmp_path, capsys, counts):
    spec = tiny_vit_spec(tmp_path)
    spec["data"] = {"name": "image_folder", "root": str(image_folder(tmp_path / "images", counts))}
    user_error(capsys, ["run", spec_file(tmp_path, spec), "--dry-run"], "data 'image_folder'")


# ----------------------------------------------------------------------------- validate's arguments
def test_validate_treats_an_existing_file_with_an_equals_sign_as_a_file(tmp_path, capsys):
    odd = tmp_path / "a=b.yaml"
    odd.write_text(yaml.safe_dump(tiny_vit_spec(tmp_path)))
    assert main(["validate", str(odd)]) == 0
    assert f"ok: {odd}" in capsys.readouterr().out
    odd.write_text("backbone: {name: vit}\n")
    user_error(capsys, ["validate", odd], "required but missing")


def test_validate_refuses_overrides_without_a_file(tmp_path, capsys):
    user_error(capsys, ["validate", "a=b.yaml"], "no spec file to validate", "a=b.yaml")
    user_error(capsys, ["validate", "train.lr=1", "seed=2"], "no spec file to validate")
    good = spec_file(tmp_path)
    assert main(["validate", str(good), "train.lr=1"]) == 0
    user_error(capsys, ["validate", good, "train.lr=inf"], "train.lr")
