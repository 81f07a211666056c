"""Image calibration data for ``pixel_values`` models (ViT / DeiT).

Sources:

* a folder of images (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.gif``, ``.webp``,
  ``.tif``, ``.tiff``; searched recursively, sorted by path) read with Pillow and
  preprocessed with the model's ``preprocessor_config.json``;
* an ``.npz`` whose array ``pixel_values`` already holds preprocessed
  ``[N, 3, H, W]`` float arrays (delegated to :func:`onnxq.calibration.data.npz_batches`).

The preprocessing is the ViT/DeiT image processor's math, done here in numpy so that
no torchvision (which transformers' fast processors want) is needed:

1. convert to RGB;
2. ``do_resize``: resize to ``size`` — ``{"height", "width"}``, or ``{"shortest_edge"}``
   (keep the aspect ratio) — with Pillow's ``resample`` filter (2 = bilinear, the ViT
   default; 3 = bicubic, DeiT);
3. ``do_center_crop``: crop ``crop_size`` from the centre (DeiT);
4. ``do_rescale``: multiply by ``rescale_factor`` (1/255);
5. ``do_normalize``: ``(x − image_mean) / image_std`` per channel;
6. HWC → CHW, float32.

Images are decoded lazily, one batch at a time.  User errors raise
:class:`~onnxq.errors.CalibrationDataError` with a one-line message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.calibration.data import (
    Batch,
    CalibrationData,
    InputSpec,
    _batch_count,
    _check_positive,
    _effective_batch_size,
    _error,
    _limit_samples,
    npz_batches,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageProcessorConfig",
    "image_batches",
    "list_images",
    "load_processor_config",
    "preprocess",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
)

PIXEL_INPUT = "pixel_values"


class ImageProcessorConfig:
    """The fields of ``preprocessor_config.json`` that ViT/DeiT preprocessing reads."""

    def __init__(self, raw: dict[str, Any], source: str = "") -> None:
        self.source = source
        self.do_resize = bool(raw.get("do_resize", True))
        self.size = raw.get("size", {"height": 224, "width": 224})
        if isinstance(self.size, int):
            self.size = {"height": self.size, "width": self.size}
        self.resample = int(raw.get("resample", 2))
        self.do_center_crop = bool(raw.get("do_center_crop", False))
        crop = raw.get("crop_size")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        self.crop_size = crop
        self.do_rescale = bool(raw.get("do_rescale", True))
        self.rescale_factor = float(raw.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(raw.get("do_normalize", True))
        self.image_mean = np.asarray(raw.get("image_mean", [0.5, 0.5, 0.5]), np.float32)
        self.image_std = np.asarray(raw.get("image_std", [0.5, 0.5, 0.5]), np.float32)
        if not isinstance(self.size, dict) or not (
            {"height", "width"} <= set(self.size) or "shortest_edge" in self.size
        ):
            raise _error(f"image processor config {source}: unsupported size {self.size!r}")
        if self.do_center_crop and not (isinstance(crop, dict) and {"height", "width"} <= set(crop)):
            raise _error(f"image processor config {source}: unsupported crop_size {crop!r}")
        if np.any(self.image_std == 0):
            raise _error(f"image processor config {source}: image_std has a zero")

    @property
    def output_hw(self) -> tuple[int, int] | None:
        """The (H, W) the preprocessing produces, when it is fixed."""
        if self.do_center_crop:
            return int(self.crop_size["height"]), int(self.crop_size["width"])
        if self.do_resize and "height" in self.size:
            return int(self.size["height"]), int(self.size["width"])
        return None


def load_processor_config(path: str | os.PathLike[str]) -> ImageProcessorConfig:
    """Read ``preprocessor_config.json`` (a file or the folder that holds it)."""
    path = Path(path)
    file = path / "preprocessor_config.json" if path.is_dir() else path
    if not file.is_file():
        raise _error(f"image processor config {file} does not exist")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _error(f"image processor config {file} cannot be read: {exc}") from exc
    if not isinstance(raw, dict):
        raise _error(f"image processor config {file} is not a JSON object")
    return ImageProcessorConfig(raw, str(file))


def preprocess(image: Any, config: ImageProcessorConfig) -> np.ndarray:
    """Preprocess one image (PIL image or uint8 ``[H, W, 3]`` array) to float32 CHW."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image.astype(np.uint8)))
    image = image.convert("RGB")
    if config.do_resize:
        if "height" in config.size:
            h, w = int(config.size["height"]), int(config.size["width"])
        else:
            short = int(config.size["shortest_edge"])
            iw, ih = image.size
            if iw <= ih:
                w, h = short, max(1, int(round(short * ih / iw)))
            else:
                h, w = short, max(1, int(round(short * iw / ih)))
        image = image.resize((w, h), Image.Resampling(config.resample))
    arr = np.asarray(image, dtype=np.float32)
    if config.do_center_crop:
        ch, cw = int(config.crop_size["height"]), int(config.crop_size["width"])
        h, w = arr.shape[:2]
        if ch > h or cw > w:  # the HF processor pads; images this small are rare
            pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
            arr = np.pad(arr, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                               (0, 0)))
            h, w = arr.shape[:2]
        top, left = (h - ch) // 2, (w - cw) // 2
        arr = arr[top: top + ch, left: left + cw]
    if config.do_rescale:
        arr = arr * np.float32(config.rescale_factor)
    if config.do_normalize:
        arr = (arr - config.image_mean) / config.image_std
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); errors when there are none."""
    folder = Path(folder)
    if not folder.exists():
        raise _error(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise _error(f"image calibration source {folder} is not a folder or an .npz file")
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise _error(
            f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _read(path: Path, config: ImageProcessorConfig) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return preprocess(img, config)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _error(f"image {path} cannot be read: {reason}") from exc


def _check_header(path: Path) -> None:
    """Fail early (Pillow only reads the header here) on files that are not images."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _error(f"image {path} cannot be read: {reason}") from exc


def image_batches(
    source: str | os.PathLike[str],
    inputs: Sequence[InputSpec],
    *,
    processor_dir: str | os.PathLike[str] | None = None,
    samples: int | None = None,
    batch_size: int = 32,
) -> CalibrationData:
    """Calibration batches of ``pixel_values`` from a folder of images or an ``.npz``.

    Args:
        source: A folder of images, or an ``.npz`` holding a ``pixel_values`` array.
        inputs: The model's graph inputs (must include ``pixel_values``).
        processor_dir: Folder with ``preprocessor_config.json`` (or the file itself);
            needed for image folders (the exporter stores it in the model's
            ``onnxq.image_processor`` metadata).
        samples: Use only the first ``samples`` images.
        batch_size: Images per batch (overridden by a fixed batch axis in the graph).

    Returns:
        Lazily built batches ``{"pixel_values": float32 [b, 3, H, W]}``.

    Raises:
        CalibrationDataError: Missing / empty folder, unreadable image, no processor
            config, an image size that does not fit the graph, a model without a
            ``pixel_values`` input.
    """
    source = Path(source)
    _check_positive("batch_size", batch_size)
    if source.suffix.lower() == ".npz" and not source.is_dir():
        return npz_batches(source, inputs, batch_size=batch_size, samples=samples)
    specs = {spec.name: spec for spec in inputs}
    if PIXEL_INPUT not in specs or len(specs) != 1:
        raise _error(
            f"image calibration needs a model with the single input {PIXEL_INPUT!r} "
            f"(inputs: {', '.join(specs) or 'none'})"
        )
    files = list_images(source)
    if processor_dir is None:
        raise _error(
            f"image folder {source} needs the model's preprocessor_config.json "
            "(pass the Hugging Face model folder as the image processor)"
        )
    config = load_processor_config(processor_dir)
    spec = specs[PIXEL_INPUT]
    fixed = (spec.fixed_dim(2), spec.fixed_dim(3))
    out_hw = config.output_hw
    if out_hw is not None and all(d is not None for d in fixed) and tuple(fixed) != out_hw:
        raise _error(
            f"image processor {config.source} makes {out_hw[0]}x{out_hw[1]} images but the "
            f"model input {PIXEL_INPUT!r} is {fixed[0]}x{fixed[1]}"
        )
    count = _limit_samples(samples, len(files))
    for path in files[:count]:
        _check_header(path)
    size = _effective_batch_size(inputs, batch_size, f"image folder {source}")
    fixed_batch = spec.fixed_dim(0) is not None
    num_batches, used = _batch_count(count, size, fixed_batch, f"image folder {source}")
    dtype = spec.dtype if np.issubdtype(spec.dtype, np.floating) else np.dtype(np.float32)

    def make_batch(index: int) -> Batch:
        start, stop = index * size, min((index + 1) * size, used)
        arrays = [_read(path, config) for path in files[start:stop]]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise _error(
                f"images in {source} preprocess to different sizes {sorted(shapes)}; "
                "the processor config must fix the output size"
            )
        return {PIXEL_INPUT: np.stack(arrays).astype(dtype, copy=False)}

    return CalibrationData(make_batch, num_batches, used, str(source))


def default_image_batches(
    inputs: Sequence[InputSpec],
    *,
    processor_dir: str | os.PathLike[str],
    samples: int = 256,
    batch_size: int = 32,
    split: str = "calib",
) -> CalibrationData:
    """Built-in image calibration data: crops of the photographs matplotlib ships.

    Nothing is downloaded. ``split`` "calib" and "heldout" use different seeds, so the
    held-out images are other crops than the calibration ones.
    """
    from onnxq.zoo.vit import sample_images

    config = load_processor_config(processor_dir)
    images = sample_images(samples, seed=0 if split == "calib" else 1)
    pixels = np.stack([preprocess(img, config) for img in images]).astype(np.float32)
    return _array_batches(pixels, batch_size, f"{samples} built-in {split} images")


def _array_batches(pixels: np.ndarray, batch_size: int, description: str) -> CalibrationData:
    n = pixels.shape[0]
    count = -(-n // batch_size)

    def make(i: int) -> dict[str, np.ndarray]:
        return {"pixel_values": pixels[i * batch_size:(i + 1) * batch_size]}

    return CalibrationData(make, count, n, description)


def split_image_calibration(
    source: str | os.PathLike[str],
    inputs: Sequence[InputSpec],
    *,
    processor_dir: str | os.PathLike[str] | None,
    samples: int | None = None,
    validate_samples: int = 256,
    batch_size: int = 32,
) -> tuple[CalibrationData, CalibrationData | None]:
    """A user's images (folder or .npz) split into calibration and held-out parts.

    The held-out part is the last fifth (at most ``validate_samples``) in file order.
    """
    full = image_batches(source, inputs, processor_dir=processor_dir, batch_size=1)
    arrays = [b["pixel_values"] for b in full]
    pixels = np.concatenate(arrays, axis=0) if arrays else np.zeros((0,), np.float32)
    n = pixels.shape[0]
    n_val = min(n // 5, validate_samples) if validate_samples else 0
    cal = pixels[: n - n_val]
    if samples is not None:
        cal = cal[:samples]
    val = _array_batches(pixels[n - n_val:], batch_size, f"{n_val} held-out images") if n_val else None
    return _array_batches(cal, batch_size, f"{cal.shape[0]} calibration images"), val
