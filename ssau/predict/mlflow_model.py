"""The MLflow model every training run logs (``name="model"``): a pyfunc whose artifact is the run's ``model.pt``.

- Input: a DataFrame with a string column ``image``, each a base64-encoded image file (JPEG, PNG, WebP), and an
  optional boolean column ``aligned``: True for a face already aligned the way the model's training shards were
  (a shard's stored face; it is then only resized and centre-cropped), False or missing for a photo or frame, where
  the face is found and aligned as ``ssau predict`` does (``ssau.predict.faces``).
- Output: one row per input row, its first face (dlib's largest, or the Haar box): ``success``, the face box,
  ``AU01``.. probabilities and ``AU01_c``.. presence at the model's thresholds, and ``problem``.
- Code: logged as "models from code" by ``mlflow_log.log_model`` (``mlflow_entry.py``, which calls
  ``mlflow.models.set_model``): no pickled Python object goes into the model, and loading it imports ssau from the
  environment (so serve it with ``--env-manager local`` from ssau's venv). The weights are read with
  ``weights_only=True`` like every ssau file.
- Signature and input example: the example is a mid-grey face-sized JPEG marked ``aligned``, so a model trained on
  licensed faces (BP4D, DISFA) carries none of them.
"""

from __future__ import annotations

import base64
import binascii
import math

import mlflow
import numpy as np
import pandas as pd
import torch

from ssau.data.decode import eval_image
from ssau.errors import DecodeError, SkipImage
from ssau.predict.faces import choose_detector, find_faces
from ssau.predict.model import load_recogniser
from ssau.predict.table import au_columns
from ssau.shard.images import decode_rgb


class AUModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.rec = load_recogniser(context.artifacts["model"])
        self.detector = choose_detector("auto", self.rec.card["preprocess"])[0]

    def _face(self, data: bytes, aligned: bool):
        """(network input or None, box, problem)."""
        pre = self.rec.card["preprocess"]
        nan4 = (math.nan,) * 4
        try:
            if aligned:
                return eval_image(data, pre["image_size"]), nan4, ""
            faces = find_faces(decode_rgb(data), pre, self.detector)
        except (SkipImage, DecodeError, OSError) as e:
            return None, nan4, f"unreadable image ({e})"
        return (faces[0].image, faces[0].box, "") if faces else (None, nan4, "no face")

    def predict(self, context, model_input, params=None):
        rows, images = [], []
        aligned = model_input["aligned"] if "aligned" in model_input else [False] * len(model_input)
        for text, flag in zip(model_input["image"], aligned):
            flag = isinstance(flag, (bool, np.bool_)) and bool(flag)  # a missing value (NaN) is not True
            try:
                data = base64.b64decode(str(text), validate=True)
            except (binascii.Error, ValueError):
                rows.append((None, (math.nan,) * 4, "image is not base64"))
                continue
            rows.append(self._face(data, flag))
        images = [r[0] for r in rows if r[0] is not None]
        probs = iter(self.rec.probabilities(torch.stack(images)).tolist() if images else [])
        out = []
        for image, (x, y, w, h), problem in rows:
            p = next(probs) if image is not None else None
            out.append({"success": int(p is not None), "face_x": x, "face_y": y, "face_width": w, "face_height": h}
                       | au_columns(self.rec.aus, p, self.rec.thresholds) | {"problem": problem})
        return pd.DataFrame(out)
