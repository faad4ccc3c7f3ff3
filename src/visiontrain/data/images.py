"""Decoding image files into uint8 CHW tensors.

``torchvision.io.decode_image`` (libjpeg-turbo, libpng, libwebp) is tried first; formats
it does not read (BMP, TIFF, ...) fall back to PIL. Palette, alpha, grey, CMYK and 16-bit
images are converted to the requested channel count rather than refused.

Before any pixel is decoded the file is checked: it must be a non-empty regular file (a
directory named ``x.jpg``, a dangling link or a symlink loop is refused by name), and the
size its header declares must stay within :data:`MAX_PIXELS`, so a decompression bomb (a
few KB of file that declares 20000 x 20000 pixels) is refused before the decoder
allocates its pixels.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

from visiontrain.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Decompression-bomb guard: refuse images above this many pixels (about 16k x 16k).
MAX_PIXELS = 256_000_000
# Appended to every per-file decode error: how to go on without fixing the file now.
# How a training run skips unreadable files; predict offers its own option instead.
LOADER_SKIP = "data.on_error=skip to skip unreadable files"
SKIP_HINT = f"replace or delete it, or set {LOADER_SKIP}"


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file, or None when it is a non-empty file.

    Distinguishes the cases a user fixes differently: a missing file, a dangling link, a
    symlink loop (``os.stat`` fails with ELOOP; ``Path.is_file`` would only say False), a
    directory or device that merely has an image's name, and an empty file.

    Args:
        path: the file to check (links are followed).

    Returns:
        A clause such as ``"it is a directory, not an image file"``, or None.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return (
                "not a regular file but a symbolic link loop (the link leads back to itself); "
                "point the link at a real image or delete it"
            )
        if os.path.islink(path):
            return (
                "not a regular file but a broken symbolic link (its target does not exist); "
                "fix or delete the link"
            )
        if exc.errno == errno.ENOENT:
            return "not a regular file: it does not exist; fix the path or restore the file"
        return f"it cannot be read ({exc.strerror}); check its permissions"
    except ValueError as exc:  # an embedded NUL byte in the name
        return f"its name is not a valid path ({exc}); rename it"
    if stat.S_ISDIR(info.st_mode):
        return (
            "not a regular file but a directory; an image path must name a file (rename a "
            "folder whose name ends in an image extension)"
        )
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a device, pipe or socket); remove it"
    if info.st_size == 0:
        return "the file is empty (0 bytes); replace or delete it"
    return None


def refuse_oversized(path: Path, width: int, height: int, what: str = "image") -> None:
    """Raise when ``width`` x ``height`` is above :data:`MAX_PIXELS` (a decompression bomb).

    Raises:
        DataError: naming the file, its declared size and the limit.
    """
    if width * height > MAX_PIXELS:
        raise DataError(
            f"{what} {path} declares {width}x{height} = {width * height:,} pixels, above the "
            f"limit of {MAX_PIXELS:,} (a decompression-bomb guard); it was not decoded. "
            f"Downscale the image, or {SKIP_HINT}."
        )


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): the frame
# header holds the size. C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fast_header_size(data: bytearray) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG SOF header, or None for anything else.

    The fast path for the two common formats: PIL's ``Image.open`` costs about as much as
    decoding a small image. None (another format, or a header this walk does not follow)
    hands the decision to PIL's header parser.
    """
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # SOI again, EOI or scan data before a frame
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _JPEG_SOF:
            if length < 7 or pos + 9 > end:
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height
        if length < 2:
            return None
        pos += 2 + length
    return None


def _header_size(path: Path, data: bytearray) -> tuple[int, int]:
    """(width, height) as the file's header declares it, without decoding pixels.

    PNG and JPEG headers are read here directly; other formats through ``PIL.Image.open``,
    which parses only the header (WebP frame header, BMP info header, ...). Either way
    nothing is allocated per pixel.

    Raises:
        DataError: the header is not an image header PIL recognises, or it declares more
            than :data:`MAX_PIXELS`.
    """
    size = _fast_header_size(data)
    if size is None:
        size = _pil_header_size(path)
    refuse_oversized(path, *size)
    return size


def _pil_header_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    # PIL refuses above twice its global limit inside Image.open; tie that limit to ours
    # so that PIL's refusal only ever fires where ours would anyway.
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            # The size is judged by refuse_oversized against our limit, not PIL's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"image {path} declares more than the limit of {MAX_PIXELS:,} pixels (a "
            f"decompression-bomb guard; {exc}); it was not decoded. Downscale the image, or "
            f"{SKIP_HINT}."
        ) from None
    except Exception as exc:  # PIL raises many types for a broken header
        raise DataError(
            f"cannot decode image {path}: {type(exc).__name__}: {exc}. The file is corrupt or "
            f"not an image; {SKIP_HINT}."
        ) from None


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    if img.dtype == torch.uint8:
        return img
    if img.dtype == torch.uint16:
        return (img.to(torch.int32) >> 8).to(torch.uint8)
    return img.clamp(0, 255).to(torch.uint8)


def _match_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """``img`` with exactly ``channels`` channels.

    torchvision's WebP decoder ignores ``ImageReadMode.GRAY`` (it warns and returns RGB),
    so the requested count is enforced here rather than trusted.
    """
    if img.shape[0] == channels:
        return img
    if channels == 1:
        from torchvision.transforms.v2.functional import rgb_to_grayscale

        return rgb_to_grayscale(img[:3]).contiguous()
    return img[:1].expand(3, -1, -1).contiguous() if img.shape[0] < 3 else img[:3].contiguous()


def _decode_pil(path: Path, channels: int, draft: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode with PIL; ``draft`` (width, height) lets a JPEG decode at reduced scale."""
    import numpy as np
    from PIL import Image

    with warnings.catch_warnings():
        # The declared size was already checked against MAX_PIXELS by _header_size.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if draft is not None:
                im.draft("L" if channels == 1 else "RGB", draft)
            im.load()
            if im.mode.startswith("I;16"):
                # The high byte, as the torchvision path keeps it for 16-bit PNGs.
                arr = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
                im = Image.fromarray(arr)
            elif im.mode in ("I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                arr = (arr / max(float(np.nanmax(arr, initial=0.0)), 1.0) * 255.0).clip(0, 255)
                im = Image.fromarray(np.nan_to_num(arr).astype(np.uint8))
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.array(im, dtype=np.uint8)
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


# A JPEG is decoded at reduced scale (libjpeg's DCT scaling: 1/2, 1/4 or 1/8) when it is
# at least this many times the prepared size on both sides.
DRAFT_FACTOR = 2


def decode_file(
    path: str | Path, channels: int = 3, target: tuple[int, str] | None = None
) -> torch.Tensor:
    """Decode an image file into a uint8 tensor of shape (channels, H, W).

    The file is checked first (:func:`file_problem`), then its header's size against
    :data:`MAX_PIXELS`; only then are pixels decoded. CMYK JPEGs, palette, alpha, grey and
    16-bit images are converted to ``channels`` (alpha is dropped; 16-bit keeps the high
    byte).

    Decode less: with ``target`` (the working size and fit of :func:`prepare_image`), a
    JPEG at least :data:`DRAFT_FACTOR` times larger than its prepared size on both sides
    is decoded by libjpeg at the smallest power-of-two reduction that still covers that
    size (PIL's ``draft``), which skips most of the decoding work; the exact resize that
    follows is unchanged. After that resize the pixels differ from a full decode by about
    one grey level on average (tested bound: mean 1.5, in ``tests/test_data.py``).

    Args:
        path: the image file.
        channels: 1 (grey) or 3 (RGB).
        target: ``(size, fit)`` the image will be prepared to, or None for full size.

    Raises:
        DataError: the file is missing, not a regular file, empty, not an image, corrupt,
            or declares more than :data:`MAX_PIXELS` pixels. The message names the file.
    """
    path = Path(path)
    problem = file_problem(path)
    if problem is not None:
        raise DataError(f"cannot read image {path}: {problem}. Or set {LOADER_SKIP}.")
    try:
        with open(path, "rb") as fh:
            # One read into a writable buffer: the header check and the decoder share it.
            data = bytearray(os.fstat(fh.fileno()).st_size)
            got = fh.readinto(data)
    except OSError as exc:  # removed or made unreadable since the check above
        raise DataError(f"cannot read image {path}: {exc.strerror}; {SKIP_HINT}.") from None
    if got < len(data):  # the file shrank since fstat
        del data[got:]
    width, height = _header_size(path, data)
    if target is not None and data[:3] == b"\xff\xd8\xff":
        need_h, need_w = prepared_size(height, width, *target)
        if width >= DRAFT_FACTOR * need_w and height >= DRAFT_FACTOR * need_h:
            try:
                img = _decode_pil(path, channels, draft=(need_w, need_h))
            except Exception:  # a broken file: the full decode below names the problem
                pass
            else:
                return _match_channels(img, channels)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        # The WebP decoder has no grey mode (it warns and returns RGB); ask for RGB and
        # let _match_channels convert.
        mode = ImageReadMode.RGB
    try:
        img = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError):
        try:
            img = _decode_pil(path, channels)
        except Exception as exc:  # PIL raises many types for broken files
            raise DataError(
                f"cannot decode image {path}: {type(exc).__name__}: {exc}. The file is "
                f"corrupt or not an image; {SKIP_HINT}."
            ) from None
    img = _match_channels(_to_uint8(img), channels)
    # The decoder agrees with the header in every format we read; checked anyway, as the
    # pixels are already there and a disagreement means the file lies about its size.
    refuse_oversized(path, img.shape[-1], img.shape[-2])
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
        The resized image, a (C, H, W) tensor whose memory is (H, W, C) (channels-last:
        what the decoder returns, torch's uint8 resize runs fastest on and the OpenCV
        augmentation kernels read without a copy), and the contiguous mask (or None).
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
    return channels_last(image), None if mask is None else mask.contiguous()


def channels_last(image: torch.Tensor) -> torch.Tensor:
    """A (C, H, W) tensor with (H, W, C) memory: a view when it already is, else one copy."""
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
