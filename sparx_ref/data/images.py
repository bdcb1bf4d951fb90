"""Loading and preprocessing real photographs as the released models expect.

The released SparX-Mamba checkpoints use timm's evaluation transform: resize the shorter
side to ``int(224 / crop_pct)`` with bicubic interpolation, centre-crop 224x224, scale to
[0, 1], normalise with the ImageNet mean and std (``sparx_ref.models.configs``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..models.configs import SPARX_MAMBA_RELEASE


def sample_image_path() -> Path:
    """A real photograph that ships with matplotlib (Grace Hopper, 512x600 RGB)."""
    import matplotlib.cbook as cbook
    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def preprocess(image, variant: str = "sparx_mamba_t", dtype=np.float32) -> np.ndarray:
    """Turn a PIL image or a path into a (1, 3, 224, 224) array, as the variant expects.

    image: a path or a PIL.Image. variant: a key of configs.SPARX_MAMBA_RELEASE.
    """
    from PIL import Image
    if variant not in SPARX_MAMBA_RELEASE:
        raise ValueError(f"variant must be one of {sorted(SPARX_MAMBA_RELEASE)}, got {variant!r}")
    cfg = SPARX_MAMBA_RELEASE[variant]
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    size = cfg["input_size"][-1]
    scale_size = math.floor(size / cfg["crop_pct"])
    w, h = image.size
    if w < h:
        new_w, new_h = scale_size, int(scale_size * h / w)
    else:
        new_w, new_h = int(scale_size * w / h), scale_size
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = np.asarray(image, dtype=np.float64) / 255.0               # (H, W, 3)
    x = (x - np.array(cfg["mean"])) / np.array(cfg["std"])
    return x.transpose(2, 0, 1)[None].astype(dtype)               # (1, 3, H, W)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (sparx_ref/data/imagenet_classes.txt)."""
    path = Path(__file__).with_name("imagenet_classes.txt")
    names = path.read_text().splitlines()
    if len(names) != 1000:
        raise RuntimeError(f"{path.name} must hold 1000 class names, found {len(names)}")
    return names
