"""Image augmentations of the generic semi-supervised baselines, on the model side (uint8 NCHW tensors on any device).

The stream has already augmented every unlabelled image once (``ssau.data.decode``: random crop, flip, colour
jitter): that is the weak view FixMatch and pseudo-labelling predict from and Mean Teacher's teacher sees. What is
added here is drawn per image from (seed, step, key, view), so an image is augmented the same however the global
batch is split over ranks (2 ranks x B = 1 process x 2B) and a resumed run draws what the first one would have.

- ``weak``: Mean Teacher's student noise: a horizontal flip (p = 0.5) and a shift of up to ``shift`` of the image
  side (reflect padding), USB's weak transform (flip + pad-and-crop 12.5 %) at half its reach: on a 64 px aligned face
  8 px moves the brow and lip corners out of their regions.
- ``strong``: FixMatch's RandAugment as USB's ``fixmatch`` list has it (``n`` = 3 operations drawn with replacement,
  each at a uniformly drawn magnitude in USB's range, then Cutout of side up to ``cutout`` of the image) with its
  geometric operations removed: Rotate (+-30 deg), ShearX/Y (+-0.3) and TranslateX/Y (+-30 %) move AU regions by up
  to a third of the face, so the aligned crop an AU label refers to is gone. Kept (photometric, alignment-preserving):
  AutoContrast, Brightness, Color, Contrast, Equalize, Identity, Posterize, Sharpness, Solarize. Cutout's side is
  drawn up to ``cutout`` (USB: 0.5; here 0.25 by default: a half-face square hides whole AU regions, whose labels the
  pseudo-label then asserts); it fills with USB's grey (125, 123, 114).
"""

from __future__ import annotations

import random

import torch
import torchvision.transforms.v2.functional as F

# name -> (operation on a uint8 [3, H, W] tensor, low, high): USB's ranges (semilearn randaugment.augment_list)
OPS = {
    "autocontrast": (lambda x, v: F.autocontrast(x), 0.0, 1.0),
    "brightness": (F.adjust_brightness, 0.05, 0.95),
    "color": (F.adjust_saturation, 0.05, 0.95),
    "contrast": (F.adjust_contrast, 0.05, 0.95),
    "equalize": (lambda x, v: F.equalize(x), 0.0, 1.0),
    "identity": (lambda x, v: x, 0.0, 1.0),
    "posterize": (lambda x, v: F.posterize(x, max(1, int(v))), 4.0, 8.0),
    "sharpness": (F.adjust_sharpness, 0.05, 0.95),
    "solarize": (lambda x, v: F.solarize(x, min(v, 255.0)), 0.0, 256.0),
}
DROPPED = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")  # geometric: they break the alignment
GREY = (125, 123, 114)


def image_rng(seed: int, step: int, key: str, view: str) -> random.Random:
    """The draws of one image's augmentation: a function of (seed, step, key, view) alone."""
    return random.Random(f"{view}:{seed}:{step}:{key}")


def _keys(keys: list[str], n: int) -> list[str]:
    if len(keys) != n:  # an index would do on one process, but not on ranks holding other parts of the batch
        raise ValueError(f"{n} images but {len(keys)} keys: augmentations are drawn per image key")
    return keys


def weak(images: torch.Tensor, keys: list[str], seed: int, step: int, shift: float = 0.0625,
         view: str = "weak") -> torch.Tensor:
    """A flip and a shift of up to ``shift`` x side per image (reflect padding), drawn per image."""
    n, _, h, w = images.shape
    pad = int(round(shift * max(h, w)))
    padded = torch.nn.functional.pad(images.float(), (pad, pad, pad, pad), mode="reflect") if pad else images
    out = torch.empty_like(images)
    for i, key in enumerate(_keys(keys, n)):
        rng = image_rng(seed, step, key, view)
        flip, dx, dy = rng.random() < 0.5, rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
        x = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = (x.flip(-1) if flip else x).to(images.dtype)
    return out


def strong(images: torch.Tensor, keys: list[str], seed: int, step: int, n_ops: int = 3, cutout: float = 0.25,
           ops: tuple[str, ...] = tuple(OPS), view: str = "strong") -> torch.Tensor:
    """RandAugment without geometric operations, then Cutout, drawn per image (see the module docstring)."""
    n, _, h, w = images.shape
    out = torch.empty_like(images)
    grey = torch.tensor(GREY, dtype=images.dtype, device=images.device).view(3, 1, 1)
    for i, key in enumerate(_keys(keys, n)):
        rng = image_rng(seed, step, key, view)
        x = images[i]
        for name in rng.choices(ops, k=n_ops):
            op, lo, hi = OPS[name]
            x = op(x, lo + (hi - lo) * rng.random())
        side = rng.random() * cutout * w
        if side > 0:
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            x0, y0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
            x = x.clone()
            x[:, y0:min(h, int(y0 + side)), x0:min(w, int(x0 + side))] = grey
        out[i] = x
    return out
