"""``data.decode=device``: training JPEGs decoded and augmented on the training device (issue 26).

Who does what. A DataLoader worker does everything but the pixels (``decode_sample(pixels=False)``): it reads the
json and landmarks, checks the JPEG header (the same size limit, the same PIL cases), draws crop, flip and jitter
from the sample's generator in the order the worker path draws them, and transforms landmarks and flow with the
same geometry; ``encode`` packs a batch part's JPEG bytes end to end with those parameters (``Encoded``). The main
process (``DeviceDecoder``, between the stream and the trainer's ``_to_device``) decodes the part with
``torchvision.io.decode_jpeg(list, device=...)``: nvjpeg on CUDA, libjpeg-turbo on the CPU, one code path for both.
Then, on the device, in float32: replicate-pad the full-size decode to the span the worker's 1/k DCT-scaled decode
covers (so the geometry is the worker's to the last pixel, and the landmarks are exactly the worker's), antialiased
bilinear resize to the worker's size, rounding to whole grey levels (the worker resizes uint8), crop, flip, the same
brightness / contrast / saturation formula, truncation to uint8. The result is the worker path's uint8
[B, 3, S, S] within ``TOLERANCE``: decode_jpeg has no DCT scaling, so where the stored image is twice the training
size or more (k > 1), a k x k mean stands in for libjpeg's 1/k decode and the difference is larger.

What stays on the worker: images the worker path leaves to PIL (PNG, WebP, CMYK/YCCK, headers libjpeg-turbo
refuses) are decoded and augmented there as before and travel as pixels (``Encoded.ready``). The AU validation
part and evaluation stay on the worker path.

A JPEG decode_jpeg refuses on the device (truncated data; a file nvjpeg does not support) is decoded again on the
CPU by the worker path's decoder (``_image``: simplejpeg, then PIL), whose geometry is the same, and augmented on
the device as the others (counted in ``fallbacks``). One that decoder refuses too is dropped from its part, its
labels and geometry with it, and counted in ``Batch.skipped`` as the worker path counts an unreadable sample (the
part is one sample shorter for that step). A batch of which a part lost every sample is passed over; its samples
count as skipped.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ssau.data.batch import Batch
from ssau.data.decode import _GRAY, TrainSample, _image

# |worker path - this one| per channel value, (max, mean) in grey levels, measured on face-like JPEGs (smooth colour
# and grain) at 32, 64 and 112 px (tests/test_device_decode.py). "full": the worker decodes at full scale (k = 1: a
# stored image under twice the training size, as aligned shards are): only the resize differs (float against torch's
# uint8 kernel; none at all where no resize is needed), amplified by the jitter; measured max 2, mean 0.22. "scaled"
# (k > 1): a k x k mean of the full decode against libjpeg's scaled IDCT: measured max 14, mean 1.58 at 32 px
# (grain at the scale of a DCT block), max 6, mean 0.66 from 64 px up.
TOLERANCE = {"full": (2, 0.25), "scaled": (16, 2.0)}
# Each image field of a Batch and the per-sample fields that go with it (dropped with a sample nobody can decode).
PARTS = {"images": ("keys", "targets", "mask", "intensity", "intensity_mask", "landmarks", "landmarks_valid", "flow",
                    "flow_valid"),
         "unlabelled": ("unlabelled_keys", "unlabelled_landmarks", "unlabelled_landmarks_valid", "unlabelled_flow",
                        "unlabelled_flow_valid"),
         "expr_images": ("expr_keys", "expr_labels")}


@dataclass
class Encoded:
    """One batch part's images as the workers send them with ``data.decode=device``."""

    data: torch.Tensor  # uint8: the part's JPEG files end to end (none for samples in ``ready``)
    offsets: list[int]  # sample i's file is data[offsets[i]:offsets[i + 1]]
    params: torch.Tensor  # float64 [B, 9]: resized w, h; DCT scale k; crop x, y; flipped; brightness, contrast, sat.
    keys: list[str]
    size: int
    ready: dict[int, torch.Tensor] = field(default_factory=dict)  # sample -> uint8 [3, S, S] the worker decoded

    def pin_memory(self) -> "Encoded":  # DataLoader(pin_memory=True) calls it: nvjpeg reads page-locked bytes faster
        return replace(self, data=self.data.pin_memory())


def encode(examples: list[TrainSample], keys: list[str], size: int) -> Encoded:
    """In the worker: a batch part's pending images (and the few it decoded itself) packed for the device."""
    files, offsets, params, ready = [], [0], [], {}
    for i, ex in enumerate(examples):
        p = ex.pending
        if p is None:
            ready[i] = ex.image
            params.append([0.0] * 9)
        else:
            files.append(p.data)
            params.append([*p.resized, p.dct, *p.crop, float(p.flipped), *p.jitter])
        offsets.append(offsets[-1] + (len(p.data) if p is not None else 0))
    joined = bytearray(b"".join(files))
    data = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
    return Encoded(data, offsets, torch.tensor(params, dtype=torch.float64), keys, size, ready)


def _decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 [3, H, W] on ``device`` per file, None where decode_jpeg refuses it. One batched call; one call per file
    only when the batch raised (decode_jpeg raises for the whole list)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not files:
        return []
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec, on each call
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision")
        try:
            return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out = []
            for f in files:
                try:
                    out.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def _resize(x: torch.Tensor, k: int, resized: tuple[int, int]) -> torch.Tensor:
    """float [n, 3, H, W] full-size decodes -> float [n, 3, rh, rw] in whole grey levels, as the worker makes them.
    Where the worker decodes at 1/k, a k x k mean stands in for libjpeg's scaled IDCT, over the image padded to
    ceil(w / k) blocks (libjpeg's last block reaches past the edge: the worker's geometry to the last pixel)."""
    h, w = x.shape[-2:]
    if k > 1:
        x = F.pad(x, (0, k * -(-w // k) - w, 0, k * -(-h // k) - h), mode="replicate")
        x = F.avg_pool2d(x, k).round_()  # the worker resizes the decoder's uint8
    if tuple(x.shape[-2:]) != (resized[1], resized[0]):
        x = F.interpolate(x, size=(resized[1], resized[0]), mode="bilinear", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255)  # the worker resizes uint8: the crop starts from whole grey levels
    return x


def _jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Flip and colour jitter of float [n, 3, S, S] crops, ``decode._augment``'s formula, to uint8."""
    dev = x.device
    x = torch.where(params[:, 5].to(dev).bool()[:, None, None, None], x.flip(-1), x)
    b, c, s = (params[:, j].to(dev)[:, None, None, None] for j in (6, 7, 8))  # float64, as the worker's Python floats
    mean = x.double().mean((1, 2, 3), keepdim=True) * b
    x = x * (b * c).float() + (mean * (1 - c)).float()
    gray = (x * torch.as_tensor(_GRAY, device=dev)[None, :, None, None]).sum(1, keepdim=True)
    x = x * s.float() + gray * (1 - s).float()
    return x.clamp_(0, 255).to(torch.uint8)  # truncation, as numpy's astype


class DeviceDecoder:
    """Batches from a ``data.decode=device`` stream -> the same batches with their images on ``device``."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.fallbacks = 0  # images decode_jpeg refused and the worker decoder read on the CPU
        self.dropped = 0  # images neither could read (also counted in Batch.skipped)

    def __call__(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        passed = 0  # samples of batches passed over (a part lost every sample)
        for batch in batches:
            out = self.decode(batch)
            if out is None:
                passed += batch.skipped + sum(len(getattr(batch, PARTS[p][0])) for p in batch.encoded)
                continue
            out.skipped += passed
            passed = 0
            yield out

    def decode(self, batch: Batch) -> Batch | None:
        """``batch`` with every encoded part decoded on the device; None when a part has no readable sample."""
        changes, skipped = {"encoded": {}}, 0
        for part, enc in batch.encoded.items():
            images, keep = self.part(enc)
            if not keep:
                return None
            changes[part] = images
            if len(keep) < len(enc.keys):
                skipped += len(enc.keys) - len(keep)
                index = torch.tensor(keep)
                for name in PARTS[part]:
                    v = getattr(batch, name)
                    changes[name] = v if v is None else [v[i] for i in keep] if isinstance(v, list) else v[index]
        return replace(batch, skipped=batch.skipped + skipped, **changes)

    def part(self, enc: Encoded) -> tuple[torch.Tensor, list[int]]:
        """uint8 [n, 3, S, S] on the device, and which of the part's samples they are (in order)."""
        S, p = enc.size, enc.params
        geom = [(tuple(int(v) for v in p[i, 0:2]), int(p[i, 2]), tuple(int(v) for v in p[i, 3:5]))
                for i in range(len(enc.keys))]  # (resized, k, crop)
        todo = [i for i in range(len(enc.keys)) if i not in enc.ready]
        files = [enc.data[enc.offsets[i]:enc.offsets[i + 1]] for i in todo]
        groups, crops = defaultdict(list), {}  # images of one size resize in one call (an aligned corpus: all)
        for i, f, img in zip(todo, files, _decode_jpegs(files, self.device)):
            if img is None:
                img = self._fallback(f, enc, i, geom[i][0])
                if img is None:
                    self.dropped += 1
                    continue
                self.fallbacks += 1
                groups[("cpu", i)].append((i, img))  # already resized by the worker decoder
            else:
                groups[(tuple(img.shape), geom[i][0], geom[i][1])].append((i, img))
        for key, members in groups.items():
            x = torch.stack([m for _, m in members]).float()
            if key[0] != "cpu":
                x = _resize(x, key[2], key[1])
            for (i, _), r in zip(members, x):
                cx, cy = geom[i][2]
                crops[i] = r[:, cy:cy + S, cx:cx + S]
        keep = sorted([*crops, *enc.ready])
        if not keep:
            return torch.empty(0, 3, S, S, dtype=torch.uint8, device=self.device), []
        out = torch.empty(len(keep), 3, S, S, dtype=torch.uint8, device=self.device)
        made = sorted(crops)
        if made:
            rows = torch.tensor([keep.index(i) for i in made], device=self.device)
            out[rows] = _jitter(torch.stack([crops[i] for i in made]), p[made])
        for i, img in enc.ready.items():
            out[keep.index(i)] = img.to(self.device)
        return out, keep

    def _fallback(self, f: torch.Tensor, enc: Encoded, i: int, resized: tuple) -> torch.Tensor | None:
        """uint8 [3, rh, rw] on the device by the worker path's decoder, or None where it refuses the bytes too."""
        try:
            arr = _image(f.numpy().tobytes(), enc.keys[i], enc.size)[0]
        except Exception:  # noqa: BLE001 - DecodeError, or the decoders' zoo of errors on crafted bytes (decode._load)
            return None
        if (arr.shape[1], arr.shape[0]) != resized:  # not the geometry the worker drew for: the landmarks would lie
            return None
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(self.device)
