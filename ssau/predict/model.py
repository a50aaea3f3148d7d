"""A trained recogniser from what training left: a run directory, its ``model.pt``, or an MLflow model URI.

``model.pt`` (written by ``Trainer._finish``) holds the inference path's tensors, the run's config, its AU list and
its ``card`` (``ssau.train.model_card``): the preprocessing the training shards had (alignment template, margin,
size, JPEG quality, the network's input side) and the per-AU thresholds the run chose on its validation split. It is
read with ``weights_only=True`` (``ssau.checkpoints.safe_load``), whatever the source: an MLflow URI
(``runs:/<id>/model``, ``models:/<name>/<version>``) is downloaded and the ``model.pt`` inside it is read the same
way; the MLflow model's Python entry point is never run by ``ssau predict``. A model.pt written before the card
existed gets the card of its config (aligned faces if its shards' dataset.json says so, else whole frames).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ssau.checkpoints import check_training_state, load_into, safe_load
from ssau.config import Config, build, validate
from ssau.errors import CheckpointError, ConfigError
from ssau.methods.base import Method
from ssau.methods.registry import build_method, resolve_params
from ssau.train.model_card import card_of_config, check_card
from ssau.train.setup import check_method

MODEL_FILE = "model.pt"


@dataclass
class Recogniser:
    method: Method  # on ``device``, in eval mode
    cfg: Config
    aus: tuple[int, ...]
    card: dict  # preprocess, thresholds, ... (ssau.train.model_card)

    @property
    def thresholds(self) -> list[float]:
        return list(self.card.get("thresholds") or [0.5] * len(self.aus))

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] (the card's input side) -> float32 [B, J] AU probabilities, on the CPU."""
        device = next(self.method.parameters()).device
        return self.method.predict(images.to(device)).float().cpu()


def read_model(path: Path, data_changes: dict | None = None) -> tuple[Method, Config, tuple[int, ...], dict]:
    """(the method's inference path with the file's weights, on the CPU; its config; its AUs; the file's state)
    from a model.pt or a step checkpoint. A damaged or foreign file is one CheckpointError line."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    state = check_training_state(safe_load(path), path, model_only=True)  # weights only: a crafted file runs nothing
    try:
        tree = dict(state["config"])
        tree["method"] = resolve_params(tree.get("method") if isinstance(tree.get("method"), dict) else {})
        cfg: Config = build(Config, tree)
        if data_changes:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data_changes))
        check_method(validate(cfg))  # a damaged config (image_size=100000) fails here, not in the allocator
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config is not valid ({e})") from None
    aus = tuple(state["aus"])
    method = build_method(cfg.method, aus, cfg.model).for_inference()  # model.pt holds the inference path only
    if "au" not in method.tasks():
        raise ConfigError(f"{path}: a {cfg.method_name} model of the {'/'.join(method.tasks())} task has no AU "
                          f"output (its training run logged val/expr_acc)")
    load_into(method, method.inference_state(state["method"]), "model", path)  # a step checkpoint holds more
    return method.eval(), cfg, aus, state


def is_uri(spec: str) -> bool:
    return "://" in spec or spec.startswith(("runs:/", "models:/"))


def model_file(spec: str, scratch: Path) -> Path:
    """The model.pt that ``spec`` names: a file, a run directory holding one, or an MLflow model URI (downloaded
    into ``scratch``)."""
    if is_uri(spec):
        import mlflow  # lazy: only a URI needs it

        where = scratch
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(where)))
        except Exception as e:  # noqa: BLE001 - MLflow raises its own zoo (MlflowException, OSError, HTTP errors)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"{spec}: cannot download the model ({first}); is MLFLOW_TRACKING_URI set to the "
                              f"run's store?") from None
        found = sorted(local.rglob(MODEL_FILE)) if local.is_dir() else [local]
        if not found:
            raise ConfigError(f"{spec}: the MLflow model holds no {MODEL_FILE} (not an ssau model)")
        return found[0]
    path = Path(spec)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise ConfigError(f"{path}: a directory without {MODEL_FILE} (a run directory has one once it finished)")
        return path / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (MODEL: a run directory, a model.pt or an MLflow model URI)")
    return path


def load_recogniser(spec: str, device: str = "auto") -> Recogniser:
    """The recogniser ``spec`` names (see ``model_file``), on the GPU where there is one (``device="auto"``)."""
    with tempfile.TemporaryDirectory(prefix="ssau-model-") as scratch:  # a downloaded model is read, then removed
        path = model_file(spec, Path(scratch))
        method, cfg, aus, state = read_model(path)
    card = check_card(state["card"], aus, cfg.data.image_size, path) if "card" in state else card_of_config(cfg)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    return Recogniser(method.to(dev), cfg, aus, card)
