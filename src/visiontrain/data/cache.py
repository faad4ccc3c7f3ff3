"""``data.cache``: every file image decoded and resized once, kept as uint8 arrays.

A :class:`~visiontrain.data.sources.PreparedSplit` decodes a file and resizes it to the
working resolution (the *prepare* step) before the random augmentation. With
``data.cache=memory`` or ``disk`` that prepared output (image, and mask for segmentation)
is computed once per image when the bundle is built and read back on every access, so
neither decoding nor the resize happens per epoch. The augmentation that follows is the
same either way, so cached and uncached runs give identical batches for the same seed.

Storage: one flat uint8 buffer of all prepared images (each image's bytes back to back
in (H, W, C) order, which the augmentation kernels read in place), ``offsets`` and
``shapes`` (C, H, W) to find them, plus the decoded (H, W) of each image
(detection boxes are scaled from it) and, for segmentation, a second flat buffer of masks.

* ``memory``: the buffer is one torch tensor built in the main process, so fork-started
  loader workers share its pages (and spawn-started ones receive it through shared memory)
  instead of each holding a copy. Every run decodes once.
* ``disk``: the buffer is a file memory-mapped read-only, in
  ``<cache_root>/images/<key>/`` where the key hashes the format version, the prepare
  settings (split kind, fit, channels, working size, class count) and every file's
  resolved path, size and mtime. Any change gives a new key and so a new cache; the old
  folder is left in place (delete ``<cache_root>/images`` to reclaim the space). A cache
  is written into a temporary folder beside it, fsynced and renamed into place, so a
  crash never leaves a half-written cache under the final name. On open it is verified:
  the header's format and key, every file's byte length, the sha256 of the index, and a
  sampled sha256 of each buffer (64 evenly spaced 64 KiB blocks plus the last one; the
  whole file when under 4 MiB) — a truncated or damaged cache is noted and rebuilt, at a
  cost of a few milliseconds instead of hashing gigabytes.

A file that cannot be decoded raises at build time (``data.on_error=raise``), or, with
``data.on_error=skip``, is recorded and raises the same DataError each time it is loaded,
so the loader skips it exactly as the uncached loader does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from visiontrain.config import DataConfig
from visiontrain.data.sources import PreparedSplit, cache_key, cache_root
from visiontrain.errors import DataError

# 2: pixels stored channels-last (H, W, C).
FORMAT_VERSION = 2
IMAGES_FILE = "images.u8"
MASKS_FILE = "masks.u8"
INDEX_FILE = "index.npz"
META_FILE = "meta.json"
_BLOCK = 64 * 1024
_BLOCKS = 64
# Decode threads at build time: decoding and resizing release the GIL.
_THREADS = min(8, os.cpu_count() or 1)
_CHUNK = 256


class CacheDamagedError(Exception):
    """A disk cache folder that fails verification (the message says what is wrong)."""


class ImageStore:
    """Prepared samples of one split: flat uint8 buffers, offsets, shapes, decoded sizes."""

    def __init__(
        self,
        index: dict[str, np.ndarray],
        errors: dict[int, str],
        images: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        folder: Path | None = None,
    ) -> None:
        self.index = index
        self.errors = errors
        self.folder = folder
        # Memory stores hold tensors; disk stores open their memmaps lazily (per process).
        self._images = images
        self._masks = masks
        self._maps: dict[str, np.memmap] | None = None

    def __len__(self) -> int:
        return len(self.index["shapes"])

    @property
    def nbytes(self) -> int:
        """Bytes of prepared pixels (images and masks)."""
        total = int(self.index["offsets"][-1])
        if "mask_offsets" in self.index:
            total += int(self.index["mask_offsets"][-1])
        return total

    def __getstate__(self) -> dict[str, object]:
        # A memmap would pickle as a full in-memory copy; a worker reopens the file instead.
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def _buffer(self, name: str) -> np.ndarray:
        if self._maps is None:
            assert self.folder is not None
            self._maps = {}
            for file in (IMAGES_FILE, MASKS_FILE):
                path = self.folder / file
                if path.exists() and path.stat().st_size > 0:
                    # Copy-on-write: read straight from the page cache, and a write
                    # (there is none) could never reach the file.
                    self._maps[file] = np.memmap(path, dtype=np.uint8, mode="c")
        return self._maps[name]

    def _slice(self, memory: torch.Tensor | None, file: str, start: int, end: int) -> torch.Tensor:
        # A view, not a copy: no transform writes into its input (the pipeline's transforms
        # all return new tensors; tests/test_cache.py checks the store is unchanged after
        # training with every preset).
        if memory is not None:
            return memory[start:end]
        return torch.from_numpy(self._buffer(file)[start:end])

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Prepared uint8 (C, H, W) image, uint8 (H, W) mask or None, and decoded (H, W).

        Raises:
            DataError: the file of this sample could not be decoded when the cache was built.
        """
        if index in self.errors:
            raise DataError(self.errors[index])
        offsets, shape = self.index["offsets"], self.index["shapes"][index]
        image = self._slice(self._images, IMAGES_FILE, int(offsets[index]), int(offsets[index + 1]))
        c, h, w = (int(v) for v in shape)
        image = image.view(h, w, c).permute(2, 0, 1)
        mask = None
        if "mask_offsets" in self.index:
            mo = self.index["mask_offsets"]
            mask = self._slice(self._masks, MASKS_FILE, int(mo[index]), int(mo[index + 1]))
            mask = mask.view(int(shape[1]), int(shape[2]))
        h, w = self.index["decoded_hw"][index]
        return image, mask, (int(h), int(w))


# ------------------------------------------------------------------------------ building


def _prepared_samples(
    split: PreparedSplit, on_error: str
) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]] | str]]:
    """Decode and prepare every sample in order (threads, bounded), or its error message."""
    saved, split.store = split.store, None  # decode the files, not a previous store

    def one(i: int) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]] | str:
        try:
            return split.prepared(i)
        except DataError as exc:
            if on_error == "skip":
                return str(exc)
            raise

    try:
        with ThreadPoolExecutor(_THREADS) as pool:
            n = len(split)
            for start in range(0, n, _CHUNK):
                indices = range(start, min(n, start + _CHUNK))
                yield from zip(indices, pool.map(one, indices), strict=True)
    finally:
        split.store = saved


class _Writer:
    """Appends prepared samples to flat buffers (in memory or a file) and indexes them."""

    def __init__(self, n: int, folder: Path | None, masks: bool) -> None:
        self.offsets = np.zeros(n + 1, np.int64)
        self.mask_offsets = np.zeros(n + 1, np.int64) if masks else None
        self.shapes = np.zeros((n, 3), np.int32)
        self.decoded_hw = np.zeros((n, 2), np.int32)
        self.errors: dict[int, str] = {}
        self.folder = folder
        self.parts: list[torch.Tensor] = []
        self.mask_parts: list[torch.Tensor] = []
        self.fh = open(folder / IMAGES_FILE, "wb") if folder else None  # noqa: SIM115
        self.mfh = open(folder / MASKS_FILE, "wb") if folder and masks else None  # noqa: SIM115

    def add(self, i: int, item: tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]] | str):
        """Append sample ``i`` (samples come in index order)."""
        if isinstance(item, str):
            self.errors[i] = item
            self.offsets[i + 1] = self.offsets[i]
            if self.mask_offsets is not None:
                self.mask_offsets[i + 1] = self.mask_offsets[i]
            return
        image, mask, decoded_hw = item
        self.shapes[i] = image.shape
        self.decoded_hw[i] = decoded_hw
        self.offsets[i + 1] = self.offsets[i] + image.numel()
        hwc = image.permute(1, 2, 0).contiguous()
        if self.fh is not None:
            self.fh.write(hwc.numpy().tobytes())
        else:
            self.parts.append(hwc.flatten())
        if self.mask_offsets is not None:
            if mask is None or tuple(mask.shape) != tuple(image.shape[-2:]):
                raise DataError(f"sample {i}: a segmentation sample needs a mask of its size")
            self.mask_offsets[i + 1] = self.mask_offsets[i] + mask.numel()
            if self.mfh is not None:
                self.mfh.write(mask.to(torch.uint8).contiguous().numpy().tobytes())
            else:
                self.mask_parts.append(mask.to(torch.uint8).contiguous().flatten())

    def index(self) -> dict[str, np.ndarray]:
        """The index arrays of the samples written."""
        out = {"offsets": self.offsets, "shapes": self.shapes, "decoded_hw": self.decoded_hw}
        if self.mask_offsets is not None:
            out["mask_offsets"] = self.mask_offsets
        return out

    def close(self) -> None:
        """Flush and fsync the buffer files (disk)."""
        for fh in (self.fh, self.mfh):
            if fh is not None:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()


def _fill(writer: _Writer, split: PreparedSplit, on_error: str) -> None:
    try:
        for i, item in _prepared_samples(split, on_error):
            writer.add(i, item)
    finally:
        writer.close()


def _has_masks(split: PreparedSplit) -> bool:
    return bool(getattr(split, "has_masks", False))


def build_memory_store(split: PreparedSplit, on_error: str) -> ImageStore:
    """Decode and prepare every sample of ``split`` into one in-memory uint8 tensor."""
    writer = _Writer(len(split), None, _has_masks(split))
    _fill(writer, split, on_error)
    empty = torch.empty(0, dtype=torch.uint8)
    images = torch.cat(writer.parts) if writer.parts else empty
    masks = torch.cat(writer.mask_parts) if writer.mask_parts else None
    if writer.mask_offsets is not None and masks is None:
        masks = empty
    return ImageStore(writer.index(), writer.errors, images=images, masks=masks)


def _sampled_digest(path: Path) -> str:
    """sha256 of a file's length and of 64 evenly spaced blocks plus its last block."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= _BLOCK * _BLOCKS:
            h.update(fh.read())
        else:
            step = (size - _BLOCK) // _BLOCKS
            for start in [k * step for k in range(_BLOCKS)] + [size - _BLOCK]:
                fh.seek(start)
                h.update(fh.read(_BLOCK))
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_key(split: PreparedSplit) -> str:
    """Cache key of a split: format, prepare settings, and every file's path, size, mtime."""
    files = []
    for i in range(len(split)):
        for path in split.files(i):
            try:
                st = path.stat()
            except OSError as exc:
                raise DataError(f"cannot read {path} to build data.cache: {exc}") from None
            files.append((str(path.resolve()), st.st_size, st.st_mtime_ns))
    return cache_key(FORMAT_VERSION, split.prepare_settings(), files)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not every platform opens folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_disk_store(split: PreparedSplit, folder: Path, key: str, on_error: str) -> None:
    """Build the cache of ``split`` in a temporary folder and rename it to ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = _Writer(len(split), tmp, _has_masks(split))
        _fill(writer, split, on_error)
        with open(tmp / INDEX_FILE, "wb") as fh:
            np.savez(fh, **writer.index())
            fh.flush()
            os.fsync(fh.fileno())
        buffers = [IMAGES_FILE] + ([MASKS_FILE] if writer.mask_offsets is not None else [])
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "samples": len(split),
            "settings": repr(split.prepare_settings()),
            "errors": {str(i): msg for i, msg in writer.errors.items()},
            "index_sha256": _file_digest(tmp / INDEX_FILE),
            "files": {
                name: {
                    "bytes": (tmp / name).stat().st_size,
                    "sampled_sha256": _sampled_digest(tmp / name),
                }
                for name in buffers
            },
        }
        with open(tmp / META_FILE, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished the same cache first: keep theirs if it verifies.
            if not folder.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(folder.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def open_disk_store(folder: Path, key: str, n: int) -> ImageStore:
    """Open and verify a disk cache.

    Raises:
        CacheDamagedError: a file is missing, has the wrong length or checksum, or the header
            does not match.
    """
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheDamagedError(f"its header {META_FILE} is unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
        raise CacheDamagedError(
            f"its header {META_FILE} is not of format {FORMAT_VERSION} with key {key}"
        )
    if meta.get("samples") != n:
        raise CacheDamagedError(f"it holds {meta.get('samples')} samples, the split has {n}")
    try:
        if _file_digest(folder / INDEX_FILE) != meta["index_sha256"]:
            raise CacheDamagedError(f"{INDEX_FILE} does not match its checksum")
        for name, info in meta["files"].items():
            path = folder / name
            size = path.stat().st_size if path.is_file() else None
            if size != info["bytes"]:
                raise CacheDamagedError(f"{name} is {size} bytes, expected {info['bytes']}")
            if _sampled_digest(path) != info["sampled_sha256"]:
                raise CacheDamagedError(f"{name} does not match its checksum")
        with np.load(folder / INDEX_FILE) as z:
            index = {k: z[k] for k in z.files}
        errors = {int(i): str(msg) for i, msg in meta["errors"].items()}
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CacheDamagedError(f"it is incomplete ({type(exc).__name__}: {exc})") from None
    if int(index["offsets"][-1]) != meta["files"][IMAGES_FILE]["bytes"]:
        raise CacheDamagedError(f"its index does not describe {IMAGES_FILE}")
    return ImageStore(index, errors, folder=folder)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def attach_store(split: PreparedSplit, cfg: DataConfig) -> str:
    """Give ``split`` its ``data.cache`` store (building it when needed); the note to print."""
    n = len(split)
    start = time.perf_counter()
    if cfg.cache == "memory":
        split.store = build_memory_store(split, cfg.on_error)
        took = time.perf_counter() - start
        return (
            f"data.cache=memory: decoded and resized {n} images once "
            f"({_mb(split.store.nbytes)}) in {took:.1f} s"
        )
    key = split_key(split)
    folder = cache_root(cfg) / "images" / key
    damaged = ""
    if folder.is_dir():
        try:
            split.store = open_disk_store(folder, key, n)
            took = time.perf_counter() - start
            return (
                f"data.cache=disk: opened {folder} ({n} images, {_mb(split.store.nbytes)}) "
                f"in {took:.2f} s, nothing decoded"
            )
        except CacheDamagedError as exc:
            damaged = f"the cache {folder} was damaged ({exc}); rebuilt it. "
            # Move it aside first, so that the rename of the new one cannot collide.
            trash = folder.parent / f".trash-{key}-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(OSError):
                os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
    write_disk_store(split, folder, key, cfg.on_error)
    try:
        split.store = open_disk_store(folder, key, n)
    except CacheDamagedError as exc:
        raise DataError(
            f"data.cache=disk: the cache just written to {folder} fails verification ({exc}). "
            f"Check the disk under {folder.parent} (free space, a network filesystem), "
            "or use data.cache=memory."
        ) from None
    took = time.perf_counter() - start
    return (
        f"data.cache=disk: {damaged}decoded and resized {n} images once "
        f"({_mb(split.store.nbytes)}) in {took:.1f} s into {folder}"
    )
