"""Logging a run's model.pt as its MLflow pyfunc model ``model`` (the model itself: ``mlflow_model``). MLflow is
imported only when a model is logged, so a run without tracking never loads it."""

from __future__ import annotations

import base64
import io
import os
import warnings
from pathlib import Path

import numpy as np

from ssau.aus import au_name

ENTRY = Path(__file__).with_name("mlflow_entry.py")  # the model's code: it builds mlflow_model.AUModel


def grey_example(side: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(buf, format="JPEG", quality=95)
    return base64.b64encode(buf.getvalue()).decode()


def signature(aus: tuple[int, ...]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    names = [au_name(a) for a in aus]
    inputs = Schema([ColSpec("string", "image"), ColSpec("boolean", "aligned", required=False)])
    outputs = Schema([ColSpec("long", "success")] + [ColSpec("double", c) for c in
                                                     ("face_x", "face_y", "face_width", "face_height")]
                     + [ColSpec("double", n) for n in names] + [ColSpec("double", f"{n}_c") for n in names]
                     + [ColSpec("string", "problem")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """The serving environment's packages, pinned to this one's (given, so MLflow does not infer them by running the
    model in a subprocess); ssau itself is installed from its checkout (``pip install -e .``)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "torchvision", "mlflow", "numpy", "pandas", "pillow", "opencv-contrib-python-headless",
                 "pyarrow", "pyyaml"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def log_model(model_pt: Path, card: dict, aus: tuple[int, ...], run_id: str, uri: str, register_as: str = "") -> str:
    """Log ``model_pt`` as the run's MLflow model ``model``; returns its model URI."""
    import pandas as pd

    pre = card["preprocess"]
    side = (pre["align"] or {}).get("size") or pre["image_size"]
    example = pd.DataFrame({"image": [grey_example(side)], "aligned": [True]})
    import mlflow  # lazy: only a logged model needs it

    from mlflow.tracking._tracking_service import utils as tracking_utils  # lazy, as mlflow above

    # The fluent API needs the global URI; the process gets its own back afterwards: unset if it was unset (as
    # MLflow's own _use_tracking_uri does), and MLFLOW_TRACKING_URI as it was (setting None also deletes that
    # variable from the environment).
    previous, env = getattr(tracking_utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        return _log(mlflow, model_pt, card, aus, run_id, register_as, example)
    finally:
        mlflow.set_tracking_uri(previous)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _log(mlflow, model_pt: Path, card: dict, aus: tuple[int, ...], run_id: str, register_as: str, example) -> str:
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # MLflow asks for type hints on predict (its data validation: the signature below does that job) and
        # pandas warns inside MLflow's example check; neither is the user's to act on
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(ENTRY), artifacts={"model": str(model_pt)}, signature=signature(aus),
            input_example=example, registered_model_name=register_as or None, pip_requirements=requirements(),
            metadata={"ssau_card": card, "aus": [au_name(a) for a in aus]} | (
                {"licence": card["landmarks_licence"]} if card.get("landmarks_licence") else {}))
    return info.model_uri
