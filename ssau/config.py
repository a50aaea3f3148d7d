"""Typed run configuration: YAML file + dotted ``key=value`` overrides -> dataclasses, strictly.

An unknown key, a value of the wrong type or a choice outside its allowed set raises ConfigError naming the key and
what is allowed; nothing falls back to a default silently. Each component receives only its own section.
The ``method`` section holds ``name`` plus the chosen method's own hyper-parameters; it is checked against that
method's ``Params`` where a run is built (``ssau.train.setup``), so loading a config imports no method and no torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Callable, Literal

import yaml

from ssau.errors import ConfigError
from ssau.remote import has_credentials, public


@dataclass
class ModelConfig:
    backbone: Literal["tiny", "resnet18", "resnet34", "resnet50"] = "resnet18"
    pretrained: str = "none"  # none | imagenet (torchvision weights enum, cached) | path to a state_dict file
    dropout: float = 0.0
    sync_bn: bool = False  # BatchNorm statistics over the global batch (all ranks), as one process would compute


@dataclass
class DataConfig:
    labelled: list[str] = field(default_factory=list)  # shard directories (ssau shard --out)
    labelled_weights: list[float] | None = None
    unlabelled: list[str] = field(default_factory=list)
    unlabelled_weights: list[float] | None = None
    expression: list[str] = field(default_factory=list)
    fold: int = 1  # held-out fold for evaluation; training reads the others. 0: train on all, no evaluation
    folds: int = 3
    aus: list[int] | None = None  # None: the first labelled directory's AU list
    image_size: int = 64
    m1: int = 32
    m2: int = 32
    m_expr: int = 32
    label_drop: float = 0.0
    label_drop_mode: Literal["image", "au"] = "image"
    split_seed: int = 0  # which images label drop hides and validation holds (not train.seed: one T1/T2 split for all)
    workers: int = 2
    shuffle_buffer: int = 500
    eval_batch: int = 64
    validation: float = 0.0  # fraction of each subject's labelled training images reserved as the AU validation set
    val_batch: int = 256  # AU validation images per step and rank (MAL's meta-test batch)
    source_timeout: float = 600.0  # seconds a training source may yield no readable sample before the run stops
    cache_dir: str | None = None  # remote shards (s3://, gs://, https://) kept here whole for the next epoch or run
    cache_gb: float = 50.0  # the cache's size cap: the least recently read shards are removed above it
    remote_retry: float = 60.0  # seconds a remote read retries transient errors before its shard counts as skipped
    eval_incomplete: Literal["fail", "warn"] = "fail"  # evaluation scored fewer samples than the index holds
    flow: bool = False  # stream each sample's optical flow (ssau shard --flow) as Batch.flow; off: None
    decode: Literal["worker", "device"] = "worker"  # device: JPEGs decoded (nvjpeg on CUDA), augmented on train.device
    labelled_subjects: float = 0.0  # label-scarce regime: K >= 1 training subjects (or a fraction in (0, 1)) keep
    # their labels, chosen by split_seed and balanced over folds; the others' images stream as unlabelled. 0: all


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    clip_grad: float = 5.0  # max global grad norm per update; 0 = off
    accumulate: int = 1  # micro-batches per update
    fused: Literal["auto", "on", "off"] = "auto"  # fused optimisers, plain groups (auto: CUDA; ssau/train/updates.py)
    groups: dict = field(default_factory=dict)  # per optimiser group: {name: {name, lr, weight_decay, momentum,
    # betas}} over the method's own defaults and the settings above (optim.groups.meta.name=sgd)


@dataclass
class TrainConfig:
    steps: int = 1000
    log_every: int = 20
    eval_every: int = 0  # 0: evaluate at the end only
    evaluate_on: Literal["fold", "val"] = "fold"  # val: score on the AU validation split (data.validation) instead
    # of the held-out fold, whose shards are then never opened (hyper-parameters chosen before the test is seen)
    thresholds: Literal["fixed", "val"] = "fixed"  # val: also score at per-AU F1-best validation thresholds (*_valthr)
    checkpoint_every: int = 500
    out: str = "runs"
    name: str = ""  # run directory name; empty: <method>-fold<k>-<time>
    resume: str = "never"  # never | auto (the run directory's last checkpoint) | a checkpoint path
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"
    deepspeed: str = ""  # a DeepSpeed JSON config (launch/deepspeed/zero2.json); empty: plain data parallel
    rank_report: bool = False  # each rank writes ranks/rank<r>.json (world size, keys seen, parameter digest)
    progress: bool = True
    init_from: str = ""  # warm start: a model.pt or step checkpoint whose parameters and persistent buffers of
    # matching name and shape initialise this run's (BatchNorm statistics, large margin's centroids and counts,
    # MLCR's classifiers; the optimiser starts fresh; a method's setup then decides what it keeps, e.g. MLCR's W^0
    # and stage, large margin's balance; a resumed run ignores it)
    keep_checkpoints: int = 3  # the newest N step checkpoints are kept; older ones are pruned (0 = keep all)
    collapse_share: float = 0.6  # a step metric *largest_share (the largest class's share of the global batch's
    # assignments) averaging above this over collapse_window steps warns once (stderr, MLflow tag collapse_warning)
    collapse_window: int = 50
    bucket_mb: float = 25.0  # gradients are all-reduced in buckets of this size while backward runs (as DDP)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "ssau"
    run_name: str = ""
    parent_run_id: str = ""  # set by `ssau cv` for fold runs
    tags: dict = field(default_factory=dict)  # extra tags of a fresh run (`ssau compare` names its cell here)
    flush_timeout: float = 60.0  # seconds the end of a run waits for an unreachable server before leaving the journal
    log_model: bool = True  # log model.pt as the run's MLflow pyfunc model `model` (ssau/predict/mlflow_model.py)
    register_as: str = ""  # also register that model under this name in the model registry


@dataclass
class Config:
    method: dict = field(default_factory=lambda: {"name": "supervised"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def method_name(self) -> str:
        """The method the run trains (``method.name``)."""
        return self.method["name"]


# ---------------------------------------------------------------------------------------------------- building
def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        value = ("on" if value else "off") if type(value) is bool else value  # YAML 1.1 reads on/off as booleans
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _looks_float(value):  # YAML 1.1 reads `lr: 1e-3` in a file as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # inf/nan (also 1e39, which YAML reads as inf) never make sense in a config
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def build(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping; unknown keys and bad values raise ConfigError."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown key {where!r}; allowed: {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = (),
                resolve_method: Callable[[dict], dict] | None = None) -> Config:
    """YAML file (optional) + ``key=value`` overrides (values parsed as YAML: 3, 1e-3, true, [a, b]).

    ``resolve_method`` checks and completes the method section before the cross-field checks (where a run is built,
    ``ssau.train.setup`` passes the registry's; this module imports no method)."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _looks_float(raw):  # YAML 1.1 reads 1e-3 as a string
            value = float(raw)
        _set_dotted(tree, key.strip(), value)
    if isinstance(tree.get("method"), dict):
        tree["method"].setdefault("name", "supervised")
    cfg = build(Config, tree)
    if resolve_method is not None:
        cfg.method = resolve_method(cfg.method)
    return validate(cfg)


def _looks_float(raw: str) -> bool:
    try:
        return float(raw) is not None
    except ValueError:
        return False


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a directory inside its root (absolute, '..', NUL, a part over 255 bytes), or None."""
    p = PurePath(name)
    bad = ("is empty or holds a NUL byte" if "\0" in name or not name.strip() else "is an absolute path"
           if p.is_absolute() or name.startswith("~") or p.drive else "holds '..'" if ".." in p.parts else
           "has a part over 255 bytes" if any(len(x.encode()) > 255 for x in p.parts) else None)
    return bad and f"{bad}; give a name inside the output directory"


def validate(cfg: Config) -> Config:
    """Cross-field checks that a type alone cannot express; returns ``cfg``."""
    d, t, o = cfg.data, cfg.train, cfg.optim
    if not d.labelled:
        raise ConfigError("data.labelled: name at least one shard directory (ssau shard --out)")
    for key, name in (("train.name", t.name), ("tracking.run_name", cfg.tracking.run_name)):  # run directories
        if name and (problem := name_problem(name)):
            raise ConfigError(f"{key}: {name!r} {problem}")
    if not 0 <= d.fold <= d.folds:
        raise ConfigError(f"data.fold: {d.fold} is not in 0..{d.folds}")
    if not 0.0 <= d.label_drop < 1.0:
        raise ConfigError(f"data.label_drop: {d.label_drop} is not a fraction in [0, 1)")
    for key, v in (("train.steps", t.steps), ("data.m1", d.m1), ("optim.accumulate", o.accumulate),
                   ("data.eval_batch", d.eval_batch), ("train.log_every", t.log_every)):
        if v < 1:
            raise ConfigError(f"{key}: must be at least 1, got {v}")
    for key, v in (("data.m2", d.m2), ("data.m_expr", d.m_expr), ("data.workers", d.workers),
                   ("data.shuffle_buffer", d.shuffle_buffer), ("train.eval_every", t.eval_every),
                   ("train.checkpoint_every", t.checkpoint_every), ("train.keep_checkpoints", t.keep_checkpoints),
                   ("optim.warmup_steps", o.warmup_steps)):
        if v < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {v}")
    # Upper bounds: far beyond any real run, far below what overflows or asks the allocator for terabytes.
    for key, v, hi in (("data.m1", d.m1, 65536), ("data.m2", d.m2, 65536), ("data.m_expr", d.m_expr, 65536),
                       ("data.eval_batch", d.eval_batch, 65536), ("data.val_batch", d.val_batch, 65536),
                       ("data.workers", d.workers, 256), ("data.shuffle_buffer", d.shuffle_buffer, 1_000_000),
                       ("train.steps", t.steps, 10**9), ("train.seed", t.seed, 2**32 - 1),
                       ("optim.accumulate", o.accumulate, 4096), ("data.folds", d.folds, 100)):
        if v > hi:
            raise ConfigError(f"{key}: {v} is above the limit of {hi}")
    if t.seed < 0:
        raise ConfigError(f"train.seed: must be 0 or more, got {t.seed}")
    if not 0.0 < t.collapse_share <= 1.0:
        raise ConfigError(f"train.collapse_share: {t.collapse_share:g} is not a share in (0, 1]")
    if not 1 <= t.collapse_window <= 100_000:
        raise ConfigError(f"train.collapse_window: {t.collapse_window} is not a number of steps in 1..100000")
    if d.source_timeout > 10**6:
        raise ConfigError(f"data.source_timeout: {d.source_timeout:g} s is above the limit of 1e6 s (11 days)")
    for key, ws in (("data.labelled_weights", d.labelled_weights), ("data.unlabelled_weights", d.unlabelled_weights)):
        if ws is not None and not all(w > 0 for w in ws):
            raise ConfigError(f"{key}: every mixing weight must be positive, got {ws}")
    if d.aus is not None and not all(1 <= a <= 99 for a in d.aus):
        raise ConfigError(f"data.aus: {d.aus} holds a number that is no AU (1..99)")
    if not 16 <= d.image_size <= 1024:
        raise ConfigError(f"data.image_size: {d.image_size} px is outside 16..1024")
    # Ranges outside which a run can only diverge or do nothing: refused here rather than found at step 1.
    if o.lr <= 0:
        raise ConfigError(f"optim.lr: must be positive, got {o.lr}")
    for key, v, lo, hi in (("optim.lr", o.lr, 0.0, 10.0), ("optim.weight_decay", o.weight_decay, 0.0, 1.0),
                           ("optim.momentum", o.momentum, 0.0, 1.0), ("model.dropout", cfg.model.dropout, 0.0, 0.99),
                           ("optim.clip_grad", o.clip_grad, 0.0, 1e6), ("train.bucket_mb", t.bucket_mb, 0.01, 1e5)):
        if not lo <= v <= hi:
            raise ConfigError(f"{key}: {v:g} is outside {lo:g}..{hi:g}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas: {o.betas} must be two numbers in [0, 1)")
    if d.source_timeout <= 0 or d.cache_gb <= 0 or d.remote_retry < 0:
        raise ConfigError(f"data.source_timeout {d.source_timeout:g}, data.cache_gb {d.cache_gb:g}: must be positive; "
                          f"data.remote_retry {d.remote_retry:g}: 0 or more")
    for x in (*d.labelled, *d.unlabelled, *d.expression):
        if has_credentials(x):  # they would reach config.yaml, checkpoints and MLflow
            raise ConfigError(f"{public(x)}: the URL carries credentials (user info or a query); give them "
                              f"to the store's library instead (environment, ~/.aws, gcloud), never in a path")
    if cfg.tracking.flush_timeout < 0:
        raise ConfigError(f"tracking.flush_timeout: must be 0 or more, got {cfg.tracking.flush_timeout:g}")
    if t.resume not in ("never", "auto") and not Path(t.resume).exists():
        raise ConfigError(f"train.resume: {t.resume} is neither never, auto nor an existing checkpoint")
    if t.deepspeed and not Path(t.deepspeed).is_file():
        raise ConfigError(f"train.deepspeed: {t.deepspeed} does not exist")
    if not 0.0 <= d.validation <= 0.5:
        raise ConfigError(f"data.validation: {d.validation} is not a fraction in [0, 0.5]")
    for key, v in (("train.evaluate_on", t.evaluate_on), ("train.thresholds", t.thresholds)):
        if v == "val" and d.validation <= 0:
            raise ConfigError(f"{key}=val needs an AU validation split: set data.validation above 0 (e.g. 0.1)"
                              + ("; ssau compare --select-on val sets it" if key == "train.evaluate_on" else ""))
    if t.thresholds == "val" and (t.evaluate_on == "val" or not d.fold):
        raise ConfigError("train.thresholds=val applies thresholds chosen on the AU validation split to the held-out "
                          "fold: it needs train.evaluate_on=fold and data.fold above 0")
    if d.labelled_subjects < 0 or (d.labelled_subjects >= 1 and not d.labelled_subjects.is_integer()):
        raise ConfigError(f"data.labelled_subjects: {d.labelled_subjects:g} is neither a count of subjects (1, 2, ...) "
                          f"nor a fraction in (0, 1)")
    if d.val_batch < 1:
        raise ConfigError(f"data.val_batch: must be at least 1, got {d.val_batch}")
    if not isinstance(cfg.method.get("name"), str):
        raise ConfigError(f"method.name: {cfg.method.get('name')!r} is not a method name")
    return cfg


def to_dict(cfg: Any) -> dict:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
