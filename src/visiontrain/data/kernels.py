"""OpenCV kernels for the per-image augmentation hot path (uint8, channels-last).

The random resized crop, flip and colour jitter of the ``standard`` family run here on
uint8 ``(H, W, C)`` arrays, with parameters drawn exactly as ``torchvision.transforms.v2``
draws them (:class:`visiontrain.data.transforms.CropFlipJitter`). Why OpenCV, measured on
224 px outputs of 256-512 px photos, one thread (``docs/data.md`` has the table):

* the resized crop: ``cv2.resize`` with ``INTER_LINEAR`` is 2-3x faster than torch's
  antialiased bilinear kernel. Enlarging, the two are the same filter (1 grey level apart:
  OpenCV's fixed-point weights round differently). Shrinking, bilinear without
  antialiasing reads fewer source pixels; up to a 1.5x reduction it stays within about 1.3
  grey levels on average of the antialiased result, so beyond :data:`LINEAR_MAX_SHRINK`
  torch's antialiased kernel runs instead (``INTER_AREA``, the usual antialiased choice,
  measured 3-5x *slower* than torch's for non-integer factors in OpenCV 5.1);
* the colour jitter: brightness, contrast and saturation compose into one 3x4 colour
  matrix per image, applied by ``cv2.transform`` in one saturating pass: about 15x faster
  than the same arithmetic in float torch ops;
* the flip: ``cv2.flip`` on the small output.

The images come as CHW tensors whose memory is HWC (``decode_jpeg``'s own output, and
what :func:`visiontrain.data.images.prepare_image` and the cache keep), so no layout
copy is made on the way in or out.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

# Per-image work on small images: OpenCV's own thread pool would only add hand-offs (and
# oversubscribe the cores the loader workers already fill).
cv2.setNumThreads(1)

# The largest reduction (source/output side) resized without antialiasing.
LINEAR_MAX_SHRINK = 1.5
# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
LUMA_R, LUMA_G, LUMA_B = 0.299, 0.587, 0.114


def hwc_view(image: torch.Tensor) -> np.ndarray:
    """A uint8 (C, H, W) tensor as an (H, W, C) array, copied only if its memory is not HWC."""
    array = image.permute(1, 2, 0).numpy()
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return array


def as_chw(array: np.ndarray) -> torch.Tensor:
    """An (H, W, C) or (H, W) uint8 array as a (C, H, W) tensor over the same memory."""
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)


def resized_crop(
    image: np.ndarray, top: int, left: int, height: int, width: int, size: tuple[int, int]
) -> np.ndarray:
    """The ``height`` x ``width`` crop at (``top``, ``left``), resized to ``size`` (H, W).

    Bilinear (``cv2.INTER_LINEAR``, half-pixel centres as torch's) unless the crop shrinks
    by more than :data:`LINEAR_MAX_SHRINK` on a side; then torch's antialiased bilinear,
    which is what ``v2.RandomResizedCrop(antialias=True)`` runs.

    Returns:
        A new (H, W, C) array ((H, W, 1) for one channel).
    """
    crop = image[top : top + height, left : left + width]
    out_h, out_w = size
    if max(height / out_h, width / out_w) > LINEAR_MAX_SHRINK:
        # The crop as a strided view: torch's uint8 kernel reads it without a copy.
        resized = F.resize(torch.from_numpy(crop).permute(2, 0, 1), [out_h, out_w], antialias=True)
        return hwc_view(resized)
    out = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    return out.reshape(out_h, out_w, image.shape[2])


def colour_matrix(
    image: np.ndarray, brightness: float, contrast: float, saturation: float
) -> np.ndarray:
    """The jitter of :func:`visiontrain.data.transforms.jitter_colour` as one affine map.

    ``out = s·c·b·x + c·b·(1 - s)·grey(x) + (1 - c)·b·mean(grey(x))`` is linear in the
    pixel ``x`` because grey is: a C x (C + 1) matrix (the last column the offset).
    """
    b, c, s = brightness, contrast, saturation
    means = cv2.mean(image)  # per channel, padded to 4 with zeros
    # Plain floats and one array build: this runs per image, and numpy's small-array
    # operations would cost more than the pass over the pixels.
    if image.shape[2] == 3:
        mean_grey = LUMA_R * means[0] + LUMA_G * means[1] + LUMA_B * means[2]
        diag, mix = s * c * b, c * b * (1 - s)
        offset = (1 - c) * b * mean_grey
        row = [mix * LUMA_R, mix * LUMA_G, mix * LUMA_B]
        return np.array(
            [
                [row[0] + diag, row[1], row[2], offset],
                [row[0], row[1] + diag, row[2], offset],
                [row[0], row[1], row[2] + diag, offset],
            ],
            np.float32,
        )
    # One channel: no saturation to change.
    return np.array([[c * b, (1 - c) * b * means[0]]], np.float32)


def jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> None:
    """Brightness, contrast and saturation of an (H, W, 3 or 1) uint8 array, in place.

    One pass, rounded and saturated to 0-255 once (``cv2.transform``).
    """
    matrix = colour_matrix(image, brightness, contrast, saturation)
    plane = image if image.shape[2] > 1 else image[:, :, 0]
    cv2.transform(plane, matrix, dst=plane)


def hflip(image: np.ndarray) -> np.ndarray:
    """The image mirrored left to right (a new array of the same shape)."""
    return cv2.flip(image, 1).reshape(image.shape)


def copy_planes(image: torch.Tensor, out: torch.Tensor) -> None:
    """Copy a uint8 (C, H, W) image into the contiguous (C, H, W) ``out``.

    A channels-last image is split into ``out``'s planes by ``cv2.split``: about 10x
    faster than torch's strided copy, which dominates stacking a batch otherwise.
    """
    array = image.permute(1, 2, 0).numpy()
    if image.shape[0] > 1 and array.flags.c_contiguous:
        target = out.numpy()
        cv2.split(array, [target[c] for c in range(image.shape[0])])
    else:
        out.copy_(image)
