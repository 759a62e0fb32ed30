"""Image loading: EXIF orientation, every PIL mode to RGB, broken files and the pixel limit."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llava_ndino.data.conversation import SampleError
from llava_ndino.data.images import load_image

EXIF_ORIENTATION = 0x0112


def two_halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(array)


def colour_at(image: Image.Image, x: int, y: int) -> str:
    r, g, b = image.getpixel((x, y))
    assert max(r, g, b) > 200
    return "red" if r > b else "blue"


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [(6, "red", "blue"), (8, "blue", "red")],  # 6: rotate 90° clockwise to display, 8: counter-clockwise
)
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, orientation, top, bottom):
    stored = two_halves()  # stored landscape 40x20
    exif = stored.getexif()
    exif[EXIF_ORIENTATION] = orientation
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    image = load_image(path, "exif")
    assert image.mode == "RGB"
    assert image.size == (20, 40)  # displayed portrait
    assert colour_at(image, 10, 5) == top
    assert colour_at(image, 10, 35) == bottom


def test_jpeg_without_exif_is_unchanged(tmp_path):
    path = tmp_path / "plain.jpg"
    two_halves().save(path, quality=95)
    image = load_image(path, "noexif")
    assert image.size == (40, 20)
    assert colour_at(image, 5, 10) == "red" and colour_at(image, 35, 10) == "blue"


def _palette(path):
    image = Image.new("P", (6, 4), 1)
    image.putpalette([0, 0, 0] + [10, 20, 30] * 255)
    image.save(path)


def _palette_transparent(path):
    image = Image.new("P", (6, 4), 0)
    image.putpalette([0, 0, 0] + [10, 20, 30] * 255)
    image.save(path, transparency=0)


def _i16(path):
    array = np.full((4, 6), 1000, np.uint16)
    array[0, 0] = 4000
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    image.save(path)


@pytest.mark.parametrize(
    ("name", "write", "mode", "pixel"),  # transparent pixels come out white
    [
        ("cmyk.jpg", lambda p: Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(p), "CMYK", (255, 0, 0)),
        ("la.png", lambda p: Image.new("LA", (6, 4), (0, 0)).save(p), "LA", (255, 255, 255)),
        ("la_opaque.png", lambda p: Image.new("LA", (6, 4), (80, 255)).save(p), "LA", (80, 80, 80)),
        ("p.png", _palette, "P", (10, 20, 30)),
        ("p_transparent.png", _palette_transparent, "P", (255, 255, 255)),
        ("rgba.png", lambda p: Image.new("RGBA", (6, 4), (0, 0, 255, 0)).save(p), "RGBA", (255, 255, 255)),
        ("l.png", lambda p: Image.new("L", (6, 4), 77).save(p), "L", (77, 77, 77)),
        ("i16.png", _i16, "I;16", (255, 255, 255)),
    ],
)
def test_modes_convert_to_rgb(tmp_path, name, write, mode, pixel):
    path = tmp_path / name
    write(path)
    with Image.open(path) as raw:
        assert raw.mode == mode
    image = load_image(path, "modes")
    assert image.mode == "RGB"
    assert image.size == (6, 4)
    assert np.abs(np.asarray(image, dtype=int)[0, 0] - np.array(pixel)).max() <= 2


def test_i16_keeps_relative_brightness(tmp_path):
    path = tmp_path / "i16.png"
    _i16(path)
    array = np.asarray(load_image(path, "i16"))
    assert array[0, 0, 0] == 255
    assert 0 < array[1, 1, 0] < 255  # 1000 of 4000: darker but not black
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()


def test_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(full, quality=90)
    data = full.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError) as err:
        load_image(path, "cut-1")
    assert err.value.reason == "unreadable_image"
    assert "cut-1" in str(err.value) and "truncated.jpg" in str(err.value)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(SampleError) as err:
        load_image(path, "junk-1")
    assert err.value.reason == "unreadable_image"
    assert "junk-1" in str(err.value) and "notes.png" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(SampleError) as err:
        load_image(tmp_path / "nowhere.jpg", "gone-1")
    assert err.value.reason == "missing_image"
    assert "gone-1" in str(err.value) and "nowhere.jpg" in str(err.value)


def test_pixel_limit(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (100, 50)).save(path)
    assert load_image(path, "ok", max_pixels=5000).size == (100, 50)
    with pytest.raises(SampleError) as err:
        load_image(path, "big-1", max_pixels=4999)
    assert err.value.reason == "image_too_large"
    assert "big-1" in str(err.value) and "wide.png" in str(err.value)


def test_float_image_with_negative_values_clips_to_black(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[-1.0, 0.0], [0.5, 1.0]], np.float32)).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "F"
    array = np.asarray(load_image(path, "float"))[..., 0]
    assert array.tolist() == [[0, 0], [128, 255]]  # -1 must not wrap around to a bright value


def test_pil_decompression_bomb_limit_is_too_large(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (30, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses above twice this
    with pytest.raises(SampleError) as err:
        load_image(path, "bomb-1", max_pixels=10**9)
    assert err.value.reason == "image_too_large"
    assert "bomb-1" in str(err.value) and "bomb.png" in str(err.value)
