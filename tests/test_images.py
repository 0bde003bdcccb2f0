"""Reading images: adaptkit.images.open_image turns what Pillow refuses into one DataError."""

from __future__ import annotations

import pytest
from PIL import Image

from adaptkit.errors import DataError
from adaptkit.images import open_image


@pytest.fixture
def bomb(tmp_path, monkeypatch):
    """A small PNG that is over Pillow's decompression-bomb limit (the limit lowered for the test)."""
    path = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # > 2x the limit: DecompressionBombError
    return path


def test_a_decompression_bomb_is_a_data_error(bomb, monkeypatch):
    with pytest.raises(DataError, match="decompression-bomb limit") as caught:
        open_image(bomb, "data.root")
    assert str(caught.value).startswith(f"data.root {bomb}")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # just over: Pillow only warns
    with pytest.raises(DataError, match="decompression-bomb limit"):
        open_image(bomb)


def test_unreadable_images_are_data_errors(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:40])
    for name, fragment in [("text.png", "cannot read the image"), ("truncated.png", "cannot read the image"), ("missing.png", "file not found")]:
        with pytest.raises(DataError, match=fragment):
            open_image(tmp_path / name)
    assert open_image(good).size == (8, 8)


def test_an_input_image_over_the_limit_is_refused_by_the_commands(bomb, tmp_path, capsys):
    from adaptkit.commands.outputs import check_image_file

    with pytest.raises(DataError, match="decompression-bomb limit"):
        check_image_file(bomb, "--image", 1, (8, 8))
