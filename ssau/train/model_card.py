"""What travels with a trained model beside its weights (``model.pt``'s ``card``): how to make its input from a
photo or a frame, and where to cut its outputs.

- ``preprocess``: the face geometry of the labelled training shards, read from their dataset.json at the end of
  training (``ssau shard --align``'s size, template margin and fitted points, and the JPEG quality faces were stored
  at; ``align`` is None for shards of whole frames), the network's input side ``image_size`` and the eval-time
  resize ratio (``ssau.data.decode``: resize the stored face to ``round(image_size * ratio)`` px, centre crop).
  ``ssau predict`` and the MLflow model repeat exactly this on new media.
- ``thresholds``: per AU, the threshold the run chose on its AU validation split (``train.thresholds=val``), else
  0.5 for every AU. ``AU01_c`` and the like are ``probability >= threshold``.
- ``landmarks_licence``: set when the training faces were landmarked by dlib's 68-point model (research use only).

Everything here is plain numbers and strings, so model.pt stays readable with ``weights_only=True``.
"""

from __future__ import annotations

import math
from pathlib import Path

from ssau.config import Config, to_dict
from ssau.data.decode import RESIZE_RATIO
from ssau.errors import CheckpointError

DEFAULT_QUALITY = 95


def _shard_faces(labelled: list[str]) -> tuple[dict | None, int, str | None]:
    """(the first labelled directory's alignment {size, margin, points} or None, its JPEG quality, its landmark
    licence) from dataset.json; whole frames when it cannot be read."""
    import json

    for d in labelled:
        try:
            doc = json.loads((Path(d) / "dataset.json").read_text())
        except (OSError, ValueError):
            continue
        align = (doc.get("faces") or {}).get("align")
        quality = int((doc.get("settings") or {}).get("quality") or DEFAULT_QUALITY)
        if isinstance(align, dict):
            return ({"size": int(align["size"]), "margin": float(align["margin"]), "points": str(align["points"])},
                    quality, align.get("landmarks_licence"))
        return None, quality, None
    return None, DEFAULT_QUALITY, None


def card_of_config(cfg: Config, metrics: dict | None = None) -> dict:
    """The card of a run with config ``cfg`` and final ``metrics`` (``valthr`` holds validation thresholds)."""
    align, quality, licence = _shard_faces(list(cfg.data.labelled))
    thresholds = (metrics or {}).get("valthr", {}).get("values")
    card = {"preprocess": {"align": align, "quality": quality, "image_size": int(cfg.data.image_size),
                           "resize_ratio": RESIZE_RATIO},
            "thresholds": [float(t) for t in thresholds] if thresholds is not None else None,
            "thresholds_from": "validation split (train.thresholds=val)" if thresholds is not None else "0.5"}
    if licence:
        card["landmarks_licence"] = licence
    return card


def model_state(method_state: dict, cfg: Config, aus: tuple[int, ...], card: dict) -> dict:
    """What model.pt holds: the inference path's tensors, the run's config, its AUs and its card."""
    return {"method": method_state, "config": to_dict(cfg), "aus": list(aus), "card": card}


def check_card(card: object, aus: tuple[int, ...], path: Path) -> dict:
    """``card`` if it is one ssau could have written for ``aus``, else one CheckpointError line (a crafted file's
    sizes must not reach the allocator)."""
    try:
        pre = card["preprocess"]
        size, ratio, quality = int(pre["image_size"]), float(pre["resize_ratio"]), int(pre["quality"])
        ok = 8 <= size <= 1024 and 1.0 <= ratio <= 2.0 and 1 <= quality <= 100
        if pre["align"] is not None:
            a = pre["align"]
            ok &= 16 <= int(a["size"]) <= 1024 and 0.0 <= float(a["margin"]) < 0.45 and a["points"] in ("five", "all")
        t = card["thresholds"]
        if t is not None:
            ok &= len(t) == len(aus) and all(isinstance(v, float) and 0.0 <= v <= 1.0 and not math.isnan(v) for v in t)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model card is damaged ({type(e).__name__}: {str(e)[:80]})") from None
    if not ok:
        raise CheckpointError(f"{path}: its model card holds values out of range (sizes, quality or thresholds)")
    return card
