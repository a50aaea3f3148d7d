"""AU regions for RTATL: two symmetric centres per AU from the 68 iBUG landmarks, and the boxes around them.

Rules (``method.regions``), each AU -> (landmark a, landmark b, vertical offset in units of the ruler r, the inner
eye-corner distance |x39 - x42|; image y grows downwards, so a negative offset is above the landmark):
- ``jaa`` (the default): JAA-Net's code (ZhiwenShao/JAANet, src/au_mask_based_land_layer.cpp; its 49-point indices
  mapped to 68 by +17 for brows, nose and eyes and onto the outer/inner lip for the mouth), checked line by line. It
  encodes the region descriptions of ROI-Nets / EAC-Net (Li et al. 2017), which RTATL follows ([17]: "1/2 scale
  above inner brow", "1 scale below eye bottom", "upper lip center", "1/2 scale below lower lip", "lip center").
- ``eac``: the EAC-Net pairs as ../shared/AU-DATA.md lists them; they differ from JAA-Net's code for AU10 (outer
  upper lip 49, 53 instead of the inner 61, 63), AU17 (51, 57, no offset) and AU23/AU24 (61, 63).
AUs neither paper's BP4D list covers (the choice named here): AU5 the upper lids (37, 44); AU9 (32, 34) - r/2,
AU25 (51, 57) and AU26 (56, 58) + r/2 as reported for JAA-Net on DISFA; AU20 the lip corners (48, 54); AU27 as
AU26; AU43 and AU45 as AU7. An AU outside the table is refused when the method is built.

A sample without landmarks gets the template from the stream (pushed through its crop and flip); every frame at
inference gets ``template_landmarks`` (the template's mean landmarks where evaluation's resize and centre crop put
them). A flipped image's landmarks are already mirror-permuted by the
stream, so its two centres per AU are the mirrored centres of the unflipped image, in swapped order.
"""

from __future__ import annotations

import torch

from ssau.data.decode import RESIZE_RATIO
from ssau.errors import ConfigError
from ssau.faces.template import mean_landmarks

_COMMON = {5: (37, 44, 0.0), 9: (32, 34, -1 / 2), 20: (48, 54, 0.0), 25: (51, 57, 0.0), 26: (56, 58, 1 / 2),
           27: (56, 58, 1 / 2)}
RULES = {
    "jaa": {1: (21, 22, -1 / 2), 2: (18, 25, -1 / 3), 4: (19, 24, 1 / 3), 6: (41, 46, 1.0), 7: (38, 43, 0.0),
            10: (61, 63, 0.0), 12: (48, 54, 0.0), 14: (48, 54, 0.0), 15: (48, 54, 0.0), 17: (56, 58, 1 / 2),
            23: (51, 57, 0.0), 24: (51, 57, 0.0), 43: (38, 43, 0.0), 45: (38, 43, 0.0)} | _COMMON,
    "eac": {1: (21, 22, -1 / 2), 2: (18, 25, -1 / 3), 4: (19, 24, 1 / 3), 6: (41, 46, 1.0), 7: (38, 43, 0.0),
            10: (49, 53, 0.0), 12: (48, 54, 0.0), 14: (48, 54, 0.0), 15: (48, 54, 0.0), 17: (51, 57, 0.0),
            23: (61, 63, 0.0), 24: (61, 63, 0.0), 43: (38, 43, 0.0), 45: (38, 43, 0.0)} | _COMMON,
}
REGION_FRACTION = 48 / 200  # the paper's 48 x 48 px regions on its 200 x 200 px faces


def rule_table(aus: tuple[int, ...], rule: str) -> torch.Tensor:
    """[J, 3] (landmark a, landmark b, offset) of the run's AUs; ConfigError naming the AUs without a rule."""
    if rule not in RULES:
        raise ConfigError(f"method.regions: {rule!r} is not one of {', '.join(RULES)}")
    missing = [a for a in aus if a not in RULES[rule]]
    if missing:
        raise ConfigError(f"method.regions={rule}: no region rule for AU{', AU'.join(map(str, missing))}")
    return torch.tensor([RULES[rule][a] for a in aus], dtype=torch.float64)


def au_centres(landmarks: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[B, J, 2, 2] (x, y) of each AU's two centres from [B, 68, 2] landmarks (pixels)."""
    lm = landmarks.double()
    ruler = (lm[:, 39, 0] - lm[:, 42, 0]).abs()  # [B]
    a, b = table[:, 0].long(), table[:, 1].long()
    centres = torch.stack([lm[:, a], lm[:, b]], dim=2)  # [B, J, 2, 2]
    shift = table[:, 2].to(lm.device)[None, :, None] * ruler[:, None, None]  # [B, J, 1]
    centres[..., 1] = centres[..., 1] + shift
    return centres.to(landmarks.dtype)


def template_landmarks(n: int, size: int, device=None) -> torch.Tensor:
    """[n, 68, 2] the template's mean landmarks where evaluation puts them on a ``size`` px input: the stored face
    resized to ``RESIZE_RATIO`` x ``size`` and centre-cropped (``ssau.data.decode.decode_eval``)."""
    big = round(size * RESIZE_RATIO)
    lm = mean_landmarks(big, big) - (big - size) // 2
    return torch.from_numpy(lm).to(device).expand(n, 68, 2).clone()


def boxes(centres: torch.Tensor, side: float) -> torch.Tensor:
    """[B, J, 2, 4] (x1, y1, x2, y2) squares of ``side`` px around each centre."""
    half = side / 2.0
    return torch.cat([centres - half, centres + half], dim=-1)


def roi_rows(b: torch.Tensor) -> torch.Tensor:
    """[B * K, 5] ``roi_align``'s rows (image index, x1, y1, x2, y2) for boxes [B, ..., 4] in pixels with centres
    at integers, shifted to continuous coordinates (pixel i spans [i, i + 1))."""
    flat = b.reshape(len(b), -1, 4)
    idx = torch.arange(len(b), device=b.device, dtype=b.dtype).repeat_interleave(flat.shape[1])[:, None]
    return torch.cat([idx, flat.reshape(-1, 4) + 0.5], dim=1)


def region_side(image_size: int) -> float:
    """A region's side on a ``image_size`` px input: 48/200 of the face, which the stream enlarges by
    ``RESIZE_RATIO`` before it crops (the paper crops 192 px from its 200 px faces without resizing)."""
    return REGION_FRACTION * RESIZE_RATIO * image_size


def overlaps(b: torch.Tensor, chosen: torch.Tensor, share: float) -> torch.Tensor:
    """[B, J] bool: whether one of AU j's two boxes is covered to at least ``share`` of its area by one of the boxes
    of the AU ``chosen`` [B] per sample (the chosen AU itself included)."""
    picked = b[torch.arange(len(b)), chosen]  # [B, 2, 4]
    x1 = torch.maximum(b[:, :, :, None, 0], picked[:, None, None, :, 0])
    y1 = torch.maximum(b[:, :, :, None, 1], picked[:, None, None, :, 1])
    x2 = torch.minimum(b[:, :, :, None, 2], picked[:, None, None, :, 2])
    y2 = torch.minimum(b[:, :, :, None, 3], picked[:, None, None, :, 3])
    inter = (x2 - x1).clamp_min(0) * (y2 - y1).clamp_min(0)
    area = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))[:, :, :, None]
    out = (inter / area.clamp_min(1e-9) >= share).flatten(2).any(-1)
    out[torch.arange(len(b)), chosen] = True
    return out
