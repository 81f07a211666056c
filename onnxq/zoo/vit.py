"""Tiny random ViT / DeiT image classifiers and real-ish test images, built at run time.

The models (:func:`tiny_vit_dir`) are small enough to build and export in a couple of
seconds (32×32 images, 8×8 patches, hidden 64, 2 layers, 4 heads, 10 labels) and carry
the structured outliers trained ViTs show in their *post-LayerNorm* activations:

* every ``layernorm_before`` / ``layernorm_after`` gives a few channels a large γ and a
  large, one-signed β (as in ViT-B/DeiT-B, where a handful of LayerNorm output channels
  are 10-50x wider than the median and sit far from zero).  These are exactly the
  tensors MOSF (:mod:`onnxq.passes.mosf`) reparameterises: per-tensor INT8 on them
  loses the ordinary channels;
* the Q/K/V and fc1 weights that read those channels are scaled down (and their biases
  corrected) so the FP32 function is the one of the model without outliers, as in trained
  models, whose next-layer weights are small on the outlier channels.  Only the
  quantization difficulty of the post-LN activations changes.

:func:`sample_images` makes deterministic natural-looking images without any download:
random crops (with flips, scale and colour jitter) of the photographs and rasters that
matplotlib ships in ``mpl-data/sample_data`` (``grace_hopper.jpg``, a DEM and a
topography/bathymetry grid rendered through colour maps, a logo), resized with Pillow.

torch and transformers are imported only inside the functions.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "OUTLIER_CHANNELS",
    "sample_images",
    "tiny_vit_dir",
    "tiny_vit_onnx",
]

OUTLIER_CHANNELS: tuple[int, ...] = (5, 21, 42)
"""Hidden channels with planted post-LayerNorm outliers (the first is the strongest)."""

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# (gamma factor, beta offset) per outlier channel, for layernorm_before and layernorm_after.
_PLAN_BEFORE = {5: (12.0, 30.0), 21: (6.0, -14.0), 42: (3.0, 8.0)}
_PLAN_AFTER = {5: (16.0, 45.0), 21: (8.0, -20.0), 42: (3.0, 10.0)}
_HEAD_IMAGES = 256
_HEAD_SEED = 10_000
_LOGIT_STD = 3.0


def _write_processor(folder: pathlib.Path, kind: str, image_size: int) -> None:
    config: dict[str, Any] = {
        "image_processor_type": "ViTImageProcessor" if kind == "vit" else "DeiTImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
    }
    if kind == "deit":
        # DeiT resizes larger, then centre-crops (like facebook/deit-*: 256 -> 224).
        config["size"] = {"height": image_size + image_size // 8, "width": image_size + image_size // 8}
        config["do_center_crop"] = True
        config["crop_size"] = {"height": image_size, "width": image_size}
        config["resample"] = 3
    (folder / "preprocessor_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _plant_outliers(model: Any, hidden: int) -> None:
    """Plant post-LayerNorm outliers that leave the FP32 function unchanged.

    LayerNorm output channel ``c`` becomes ``g·X_c + o`` (γ_c ← g·γ_c, β_c ← g·β_c + o);
    the linears that read it (Q/K/V after ``layernorm_before``, fc1 after
    ``layernorm_after``) get weight column ``c`` divided by ``g`` and ``o`` times the new
    column taken out of their bias.  That is how trained ViTs carry such channels: the
    next layer's weights are small on them.  Only the quantization difficulty changes.
    """
    base = model.vit if hasattr(model, "vit") else model.deit
    for layer in base.layers:
        attn = layer.attention
        sites = (
            (layer.layernorm_before, _PLAN_BEFORE, (attn.q_proj, attn.k_proj, attn.v_proj)),
            (layer.layernorm_after, _PLAN_AFTER, (layer.mlp.fc1,)),
        )
        for ln, plan, linears in sites:
            for channel, (gain, offset) in plan.items():
                if channel >= hidden:
                    continue
                ln.weight[channel] *= gain
                ln.bias[channel] = ln.bias[channel] * gain + offset
                for lin in linears:
                    lin.weight[:, channel] /= gain
                    lin.bias -= lin.weight[:, channel] * offset


def _perturb(model: Any, generator: Any) -> None:
    """Non-trivial LayerNorm γ/β and biases (trained-model-like, avoids shared constants)."""
    import torch

    for name, param in model.named_parameters():
        if "layernorm" in name and name.endswith(".weight"):
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
        elif name.endswith(".bias"):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _fit_head(model: Any, folder: pathlib.Path, generator: Any) -> None:
    """Give the random classifier head(s) a spread of classes over natural images.

    A random ViT maps all images to nearly the same class-token feature, so a random
    head predicts one class for everything and "top-1 agreement" would be trivial.  The
    head is instead a random mix of the principal directions of the features of
    :func:`sample_images` (another seed than tests use), whitened and centred, so the
    argmax varies from image to image and the margins are realistic.
    """
    import torch

    from onnxq.calibration.images import load_processor_config, preprocess

    config = load_processor_config(folder)
    pixels = np.stack([preprocess(img, config) for img in sample_images(_HEAD_IMAGES, _HEAD_SEED)])
    base = model.vit if hasattr(model, "vit") else model.deit
    feats = base(pixel_values=torch.from_numpy(pixels)).last_hidden_state[:, 0].double()
    mean = feats.mean(0)
    _, sv, vh = torch.linalg.svd(feats - mean, full_matrices=False)
    heads = [m for name, m in model.named_children() if "classifier" in name]
    for head in heads:
        labels = head.weight.shape[0]
        k = min(labels, vh.shape[0])
        std = (sv[:k] / max(len(feats) - 1, 1) ** 0.5).clamp_min(1e-6)
        basis = vh[:k] / std[:, None].sqrt()  # principal directions, half-whitened
        mix = torch.randn(labels, k, generator=generator, dtype=torch.float64)
        weight = mix @ basis
        weight *= _LOGIT_STD / (weight @ (feats - mean).T).std()
        head.weight.copy_(weight.float())
        head.bias.copy_((-(weight @ mean)).float())


def tiny_vit_dir(
    dest: os.PathLike[str] | str,
    *,
    seed: int = 0,
    kind: str = "vit",
    outliers: bool = True,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    num_labels: int = 10,
    teacher: bool = True,
    init_range: float = 0.05,
) -> pathlib.Path:
    """Write a tiny random ViT or DeiT image classifier as a Hugging Face folder.

    Args:
        dest: Folder to write into (created if missing).
        seed: Random seed; the same arguments give the same weights.
        kind: ``"vit"`` (``ViTForImageClassification``) or ``"deit"``
            (``DeiTForImageClassificationWithTeacher`` when ``teacher``, else
            ``DeiTForImageClassification``).
        outliers: Plant post-LayerNorm outlier channels (see the module docstring).
            The classifier head is fitted to spread natural images over the labels
            (see :func:`_fit_head`) either way.
        image_size, patch_size, hidden, layers, heads, intermediate, num_labels: shape.
        teacher: DeiT only: save the distilled (two-head) classifier.
        init_range: std of the random weights (transformers' default 0.02 gives a
            near-identity network whose class token hardly depends on the image).

    Returns:
        The folder, holding ``config.json``, ``model.safetensors`` and
        ``preprocessor_config.json``.
    """
    import torch
    import transformers

    if kind not in ("vit", "deit"):
        raise ValueError(f"kind must be 'vit' or 'deit', not {kind!r}")
    folder = pathlib.Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    common = dict(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
        num_labels=num_labels, hidden_act="gelu", initializer_range=init_range,
    )
    if kind == "vit":
        config = transformers.ViTConfig(**common)
        model_class = transformers.ViTForImageClassification
    else:
        config = transformers.DeiTConfig(**common)
        model_class = (transformers.DeiTForImageClassificationWithTeacher if teacher
                       else transformers.DeiTForImageClassification)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    model = model_class(config).eval()
    with torch.no_grad():
        _perturb(model, generator)
        if outliers:
            _plant_outliers(model, hidden)
        _write_processor(folder, kind, image_size)
        _fit_head(model, folder, generator)
    tf_logging = transformers.utils.logging
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        if bars:
            tf_logging.enable_progress_bar()
    return folder


def tiny_vit_onnx(dest_dir: os.PathLike[str] | str, *, opset: int = 21, **kw: Any) -> pathlib.Path:
    """Build a tiny ViT/DeiT with :func:`tiny_vit_dir` and export it to ``model.onnx``.

    Args:
        dest_dir: Folder for the Hugging Face files and ``model.onnx`` (single file).
        opset: ONNX opset.
        **kw: Passed to :func:`tiny_vit_dir`.

    Returns:
        Path of the written ``model.onnx``.
    """
    import onnx_ir as ir

    from onnxq.exporters.vit import export_vit

    folder = tiny_vit_dir(dest_dir, **kw)
    result = export_vit(folder, opset=opset)
    path = folder / "model.onnx"
    ir.save(result.model, path)
    return path


# --------------------------------------------------------------------------- images


def _source_images() -> list[np.ndarray]:
    """Natural-ish RGB uint8 images from matplotlib's bundled sample data."""
    import matplotlib
    import matplotlib.cbook as cbook
    from PIL import Image

    sources: list[np.ndarray] = []
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        sources.append(np.asarray(Image.open(fh).convert("RGB")))
    for name, cmap in (("jacksboro_fault_dem.npz", "gist_earth"), ("topobathy.npz", "terrain")):
        data = cbook.get_sample_data(name)
        arrays = dict(data.items()) if hasattr(data, "items") else {}
        grid = next((np.asarray(a, np.float64) for a in arrays.values()
                     if np.asarray(a).ndim == 2 and min(np.asarray(a).shape) >= 64), None)
        if grid is None:
            continue
        grid = np.nan_to_num(grid, nan=float(np.nanmean(grid)))
        lo, hi = np.percentile(grid, [1, 99])
        norm = np.clip((grid - lo) / max(hi - lo, 1e-9), 0, 1)
        rgb = matplotlib.colormaps[cmap](norm)[..., :3]
        sources.append((rgb * 255).round().astype(np.uint8))
    with cbook.get_sample_data("Minduka_Present_Blue_Pack.png") as fh:
        sources.append(np.asarray(Image.open(fh).convert("RGB")))
    return sources


def sample_images(n: int, seed: int = 0, *, size: int = 48) -> np.ndarray:
    """``n`` deterministic natural-looking RGB images, built offline at run time.

    Each image is a random crop (position, size 25-90 % of the shorter side, horizontal
    flip, brightness/contrast/saturation jitter) of one of the photographs and rasters
    that matplotlib ships, resized with Pillow (bicubic) to ``size``×``size``.

    Args:
        n: Number of images.
        seed: Random seed.
        size: Side length of the square output images.

    Returns:
        uint8 array ``[n, size, size, 3]``.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = _source_images()
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        src = sources[int(rng.integers(len(sources)))] if i % 3 else sources[0]
        h, w = src.shape[:2]
        side = int(min(h, w) * rng.uniform(0.25, 0.9))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = src[top: top + side, left: left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        img = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(
            (size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        gray = img.mean(axis=2, keepdims=True)
        img = gray + (img - gray) * rng.uniform(0.6, 1.4)  # saturation
        img = (img - img.mean()) * rng.uniform(0.7, 1.3) + img.mean()  # contrast
        img = img * rng.uniform(0.75, 1.25)  # brightness
        out[i] = np.clip(img, 0, 255).round().astype(np.uint8)
    return out
