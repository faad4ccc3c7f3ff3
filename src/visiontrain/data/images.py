"""Decoding image files into uint8 CHW tensors.

``torchvision.io.decode_image`` (libjpeg-turbo, libpng, libwebp) is tried first; formats
it does not read (BMP, TIFF, ...) fall back to PIL. Palette, alpha, grey and 16-bit
images are converted to the requested channel count rather than refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from visiontrain.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Decompression-bomb guard: refuse images above this many pixels (about 16k x 16k).
MAX_PIXELS = 256_000_000


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    if img.dtype == torch.uint8:
        return img
    if img.dtype == torch.uint16:
        return (img.to(torch.int32) >> 8).to(torch.uint8)
    return img.clamp(0, 255).to(torch.uint8)


def _decode_pil(path: Path, channels: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            arr = (arr / max(arr.max(), 1.0) * 255.0).astype(np.uint8)
            im = Image.fromarray(arr)
        im = im.convert("L" if channels == 1 else "RGB")
        arr = np.array(im, dtype=np.uint8)
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def decode_file(path: str | Path, channels: int = 3) -> torch.Tensor:
    """Decode an image file into a uint8 tensor of shape (channels, H, W).

    Raises:
        DataError: the file is missing, empty, not an image, or too large.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"cannot read image {path}: it is not a regular file.")
    if path.stat().st_size == 0:
        raise DataError(
            f"cannot read image {path}: the file is empty (0 bytes). Replace or delete it, "
            "or set data.on_error=skip to skip unreadable files."
        )
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        img = decode_image(read_file(str(path)), mode=mode)
    except (RuntimeError, ValueError):
        try:
            img = _decode_pil(path, channels)
        except Exception as exc:  # PIL raises many types for broken files
            raise DataError(
                f"cannot decode image {path}: {type(exc).__name__}: {exc}. The file is "
                "corrupt or not an image; replace or delete it, or set data.on_error=skip."
            ) from None
    img = _to_uint8(img)
    if img.shape[-1] * img.shape[-2] > MAX_PIXELS:
        raise DataError(f"image {path} has more than {MAX_PIXELS} pixels; refusing to use it.")
    return img


def prepared_size(height: int, width: int, size: int, fit: str) -> tuple[int, int]:
    """The (height, width) an image of ``height`` x ``width`` is prepared to.

    Args:
        height: decoded height.
        width: decoded width.
        size: the working size (``data.image_size``).
        fit: ``short`` puts the shorter side at ``size`` (aspect kept), as
            ``v2.Resize(size)`` does; ``long`` puts the longer side at ``size``, as the
            detection/segmentation square fit does before it pads.
    """
    if fit == "short":
        from torchvision.transforms.v2.functional._geometry import _compute_resized_output_size

        new_h, new_w = _compute_resized_output_size((height, width), size=[size])
        return int(new_h), int(new_w)
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def prepare_image(
    image: torch.Tensor, size: int, fit: str, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize a decoded uint8 CHW image (and its uint8 HW mask) to the working resolution.

    This is the deterministic step done once per image, before any random augmentation:
    the uncached loader runs it on every access and ``data.cache`` stores its output, so
    both feed the augmentation the same pixels. The training transforms resize to the same
    size again, which torchvision skips when the size already matches.

    Args:
        image: uint8 (C, H, W) as decoded.
        size: the working size.
        fit: ``short`` or ``long`` (see :func:`prepared_size`).
        mask: an optional uint8 (H, W) class-index mask, resized with nearest neighbours.

    Returns:
        The resized image (contiguous) and mask (or None).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    h, w = image.shape[-2:]
    new = list(prepared_size(h, w, size, fit))
    if new != [h, w]:
        # Antialiased bilinear on uint8, exactly what v2.Resize(antialias=True) runs.
        image = F.resize(image, new, antialias=True)
        if mask is not None:
            mask = F.resize(mask[None], new, interpolation=InterpolationMode.NEAREST)[0]
    return image.contiguous(), None if mask is None else mask.contiguous()
