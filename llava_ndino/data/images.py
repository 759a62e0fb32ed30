"""Robust image loading: EXIF rotation, every PIL mode to RGB, a pixel limit against decompression bombs."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_ndino.data.conversation import SampleError

DEFAULT_MAX_PIXELS = 64_000_000


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (P, LA, RGBA, CMYK, 16-bit, float) to RGB; transparency goes on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.size else 1.0
        scaled = np.clip(array / (top if top > 0 else 1.0) * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("LA", "RGBA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageBytes:
    """An encoded image held in memory (e.g. read from a shard), named for error messages."""

    name: str
    data: bytes

    def open(self) -> Image.Image:
        """Open lazily with PIL (only the header is read until pixels are needed)."""
        return Image.open(io.BytesIO(self.data))


def is_file(path: Path, sample_id: str) -> bool:
    """``path.is_file()``, with a path the file system cannot take (too long, undecodable characters)
    raised as :class:`SampleError` (reason ``bad_image_path``) instead of a crash."""
    try:
        return Path(path).is_file()
    except (OSError, UnicodeError, ValueError) as err:
        raise SampleError(
            sample_id, "bad_image_path", f"image path {str(path)[:80]!r}... is unusable ({err})"
        ) from None


def image_path(root: Path, ref: str, sample_id: str, allow_outside: bool = False) -> Path:
    """``root / ref``, refused (reason ``outside_image_root``) when it resolves outside ``root``: an
    absolute ``ref`` elsewhere, ``..`` or a symbolic link leading out; ``allow_outside`` lifts the check."""
    if not isinstance(ref, str):
        raise SampleError(sample_id, "malformed", f"image reference {ref!r} must be a path")
    path = Path(root) / ref
    if allow_outside:
        return path
    try:
        resolved, base = path.resolve(), Path(root).resolve()
    except (OSError, UnicodeError, ValueError) as err:
        raise SampleError(
            sample_id, "bad_image_path", f"image path {ref[:80]!r} is unusable ({err})"
        ) from None
    if resolved != base and base not in resolved.parents:  # an absolute ref counts where it points
        raise SampleError(
            sample_id,
            "outside_image_root",
            f"image {ref!r} resolves to {resolved}, outside the image root {base}; keep images under the "
            "root, or set data.allow_images_outside_root=true if the data are trusted",
        )
    return path


@contextmanager
def decode_errors(path: Path | ImageBytes, sample_id: str) -> Iterator[None]:
    """Turn PIL's failures while reading ``path`` into :class:`SampleError`: ``image_too_large`` above
    PIL's own pixel limit, ``unreadable_image`` for anything it cannot decode (its text- and ICC-chunk
    limits raise ValueError)."""
    try:
        yield
    except SampleError:
        raise
    except Image.DecompressionBombError as err:  # above PIL's own limit (Image.MAX_IMAGE_PIXELS)
        raise SampleError(sample_id, "image_too_large", f"image {path} is too large for PIL ({err})") from err
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise SampleError(sample_id, "unreadable_image", f"image {path} cannot be decoded ({err})") from err


def open_image(path: Path | ImageBytes) -> Image.Image:
    """Open a file or :class:`ImageBytes` lazily with PIL (only the header is read)."""
    return path.open() if isinstance(path, ImageBytes) else Image.open(path)


def load_image(path: Path | ImageBytes, sample_id: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` (a file or :class:`ImageBytes`) as an upright RGB image, or raise
    :class:`SampleError` naming the sample and file."""
    if not isinstance(path, ImageBytes):
        path = Path(path)
        if not is_file(path, sample_id):
            raise SampleError(
                sample_id, "missing_image", f"image {path} does not exist; check data.image_root"
            )
    with decode_errors(path, sample_id), open_image(path) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise SampleError(
                sample_id,
                "image_too_large",
                f"image {path} has {width}x{height} pixels, above the limit of {max_pixels:,}",
            )
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))
