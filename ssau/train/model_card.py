"""What travels with a trained model beside its weights (``model.pt``'s ``card``): how to make its input from a
photo or a frame, and where to cut its outputs.

- ``preprocess``: the face geometry of the labelled training shards, read from their dataset.json at the end of
  training (``ssau shard --align``'s size, template margin and fitted points, and the JPEG quality faces were stored
  at; ``align`` is None for shards of whole frames; ``faces_from``: whether most of their faces were aligned by
  landmarks (a file's or dlib's) or by a box (Haar's or a sidecar's), which ``ssau predict --detector auto``
  follows), the network's input side ``image_size`` and the eval-time resize ratio (``ssau.data.decode``: resize
  the stored face to ``round(image_size * ratio)`` px, centre crop).
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
from ssau.errors import CheckpointError, InputError
from ssau.readfile import read_json
from ssau.remote import meta_dir

DEFAULT_QUALITY = 95


def _shard_faces(labelled: list[str]) -> dict:
    """The first labelled directory's faces from its dataset.json: {align: {size, margin, points} or None, quality,
    faces_from, licence}; whole frames when it cannot be read (a damaged dataset.json costs the card, not the run:
    ``ssau predict`` then says the model carries no alignment)."""
    whole = {"align": None, "quality": DEFAULT_QUALITY, "faces_from": "frames", "licence": None}
    for d in labelled:
        try:
            doc = read_json(meta_dir(d) / "dataset.json", "dataset.json")
            faces, quality = doc.get("faces") or {}, int((doc.get("settings") or {}).get("quality") or DEFAULT_QUALITY)
            align = faces.get("align")
            if not isinstance(align, dict):
                return whole | {"quality": quality}
            by = faces.get("aligned_by") or {}
            landmarked = int(by.get("landmarks", 0)) + int(by.get("detector-landmarks", 0))
            boxed = int(by.get("detector", 0)) + int(by.get("bbox", 0))
            return {"align": {"size": int(align["size"]), "margin": float(align["margin"]),
                              "points": str(align["points"])}, "quality": quality,
                    "faces_from": "landmarks" if landmarked >= boxed else "box",
                    "licence": align.get("landmarks_licence")}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, InputError):
            continue
    return whole


def card_of_config(cfg: Config, metrics: dict | None = None) -> dict:
    """The card of a run with config ``cfg`` and final ``metrics`` (``valthr`` holds validation thresholds)."""
    faces = _shard_faces(list(cfg.data.labelled))
    thresholds = (metrics or {}).get("valthr", {}).get("values")
    card = {"preprocess": {"align": faces["align"], "quality": faces["quality"], "faces_from": faces["faces_from"],
                           "image_size": int(cfg.data.image_size), "resize_ratio": RESIZE_RATIO},
            "thresholds": [float(t) for t in thresholds] if thresholds is not None else None,
            "thresholds_from": "validation split (train.thresholds=val)" if thresholds is not None else "0.5"}
    if faces["licence"]:
        card["landmarks_licence"] = faces["licence"]
    return card


def model_state(method_state: dict, cfg: Config, aus: tuple[int, ...], card: dict) -> dict:
    """What model.pt holds: the inference path's tensors, the run's config, its AUs and its card."""
    return {"method": method_state, "config": to_dict(cfg), "aus": list(aus), "card": card}


def check_card(card: object, aus: tuple[int, ...], image_size: int, path: Path) -> dict:
    """The card rebuilt from ``card`` when it is one ssau could have written for ``aus`` and a network of input side
    ``image_size`` (exact types, values in range), else one CheckpointError line: a crafted file's values must not
    reach the decoder or the allocator."""
    def is_int(v) -> bool:
        return type(v) is int

    def is_float(v) -> bool:
        return type(v) is float and math.isfinite(v)

    try:
        pre, t = card["preprocess"], card["thresholds"]
        a = pre["align"]
        ok = (is_int(pre["image_size"]) and pre["image_size"] == image_size and is_float(pre["resize_ratio"])
              and pre["resize_ratio"] == RESIZE_RATIO and is_int(pre["quality"]) and 1 <= pre["quality"] <= 100
              and pre.get("faces_from", "landmarks") in ("landmarks", "box", "frames")
              and (a is None or is_int(a["size"]) and 16 <= a["size"] <= 1024 and is_float(a["margin"])
                   and 0.0 <= a["margin"] < 0.45 and a["points"] in ("five", "all"))
              and (t is None or isinstance(t, list) and len(t) == len(aus) and all(is_float(v) and 0 <= v <= 1
                                                                                   for v in t)))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: its model card is damaged ({type(e).__name__}: {str(e)[:80]})") from None
    if not ok:
        raise CheckpointError(f"{path}: its model card holds values out of range or of the wrong type (sizes, "
                              f"quality, resize ratio or thresholds), or an input side other than its config's")
    out = {"preprocess": {"align": None if a is None else {"size": a["size"], "margin": a["margin"],
                                                           "points": a["points"]},
                          "quality": pre["quality"], "faces_from": pre.get("faces_from", "landmarks"),
                          "image_size": image_size, "resize_ratio": RESIZE_RATIO},
           "thresholds": None if t is None else list(t), "thresholds_from": str(card.get("thresholds_from", ""))}
    if card.get("landmarks_licence"):
        out["landmarks_licence"] = str(card["landmarks_licence"])
    return out
