"""The batch a method receives: one training step's data on one rank, as named fields (not a tuple). It lives
apart from the stream so that methods import it without the DataLoader machinery."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class Batch:
    """One training step's data on one rank. Images are uint8 NCHW; the model side normalises."""

    images: torch.Tensor  # [m1, 3, S, S] labelled
    targets: torch.Tensor  # [m1, J] 0/1 float
    mask: torch.Tensor  # [m1, J] 1 = label known
    keys: list[str]
    intensity: torch.Tensor | None = None  # [m1, J] float 0-5 where the corpus codes intensity (DISFA), else 0
    intensity_mask: torch.Tensor | None = None  # [m1, J] 1 = intensity known (coded, not hidden by label drop)
    unlabelled: torch.Tensor | None = None  # [m2, 3, S, S]
    unlabelled_keys: list[str] = field(default_factory=list)
    expr_images: torch.Tensor | None = None  # [m_expr, 3, S, S]
    expr_labels: torch.Tensor | None = None  # [m_expr] int64
    expr_keys: list[str] = field(default_factory=list)
    skipped: int = 0  # corrupt samples skipped by the workers since the previous batch
    read_bytes: int = 0  # bytes the workers read from remote shards (ssau.remote) since the previous batch
    val_images: torch.Tensor | None = None  # [val_batch, 3, S, S] from the AU validation set
    val_targets: torch.Tensor | None = None
    val_mask: torch.Tensor | None = None
    val_keys: list[str] = field(default_factory=list)
    # Geometry, in pixels of the augmented images (pixel centres at integers). None where a batch has no such part
    # (flow: also where data.flow is off).
    landmarks: torch.Tensor | None = None  # [m1, 68, 2] float32, iBUG order after the flip's mirror permutation
    landmarks_valid: torch.Tensor | None = None  # [m1] bool; False: the template stands in
    flow: torch.Tensor | None = None  # [m1, 2, S, S] float32: u, v (u negated by a flip)
    flow_valid: torch.Tensor | None = None  # [m1] bool; False: zeros (no flow.npy)
    unlabelled_landmarks: torch.Tensor | None = None  # [m2, 68, 2]
    unlabelled_landmarks_valid: torch.Tensor | None = None
    unlabelled_flow: torch.Tensor | None = None  # [m2, 2, S, S]
    unlabelled_flow_valid: torch.Tensor | None = None
    # data.decode=device: image field ("images", "unlabelled", "expr_images") -> its images still encoded
    # (ssau.data.device_decode.Encoded; the field is None until ``DeviceDecoder`` fills it on the device)
    encoded: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

