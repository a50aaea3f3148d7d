"""The grid of `ssau compare`: its cells, the parsing and checking of --methods/--seeds/--label-drop/--folds and of
per-method overrides, the settings a named compare must keep, and each cell's run config (see ssau/compare/command.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ssau.config import Config, to_dict, validate
from ssau.errors import ConfigError, UserError
from ssau.methods.registry import METHODS, resolve_params
from ssau.train.setup import resolve_method

LABEL = re.compile(r"(?P<method>[a-z][a-z_]*)(-[A-Za-z0-9_]+)?")  # large_margin-center
# Keys the grid sets for each cell; giving them as key=value as well would be silently overwritten.
RESERVED = ("method.name", "train.seed", "data.label_drop", "data.fold", "train.name", "train.resume",
            "tracking.parent_run_id", "tracking.run_name")


@dataclass(frozen=True)
class Cell:
    method: str  # the label (a method name, or method-variant); "supervised" for a warm cell
    seed: int
    drop: float
    fold: int
    warm: bool = False

    @property
    def id(self) -> str:
        return f"{'warm' if self.warm else self.method}-s{self.seed}-d{self.drop:g}-f{self.fold}"


@dataclass(frozen=True)
class Grid:
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    drops: tuple[float, ...]
    folds: tuple[int, ...]
    baseline: str
    warm: bool = False
    warm_steps: int = 0

    def cells(self) -> list[Cell]:
        out = []
        for p in self.drops:
            for s in self.seeds:
                for k in self.folds:
                    if self.warm:
                        out.append(Cell("supervised", s, p, k, warm=True))
                    out.extend(Cell(m, s, p, k) for m in self.methods)
        return out


# ---------------------------------------------------------------------------------------------------- parsing
def parse_seeds(text: str) -> tuple[int, ...]:
    """``0-4``, ``0,2,5`` or both (``0-2,7``)."""
    seeds: list[int] = []
    for part in text.split(","):
        if not (m := re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)):
            raise UserError(f"--seeds: {text!r} is not a seed list (e.g. 0-4 or 0,2,5)")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo or hi > 2**32 - 1:
            raise UserError(f"--seeds: {part.strip()!r} is not a range of seeds in 0..{2**32 - 1}")
        seeds.extend(range(lo, hi + 1))
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: {text!r} names a seed twice")
    return tuple(seeds)


def parse_drops(text: str) -> tuple[float, ...]:
    try:
        drops = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--label-drop: {text!r} is not a list of fractions (e.g. 0.5 or 0.5,0.3)") from None
    if bad := [p for p in drops if not 0.0 <= p < 1.0]:
        raise UserError(f"--label-drop: {bad[0]:g} is not a fraction in [0, 1)")
    if len({f"{p:g}" for p in drops}) != len(drops):
        raise UserError(f"--label-drop: {text!r} names a fraction twice")
    return drops


def parse_folds(text: str, folds: int) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        out = ()
    if not out or not all(1 <= k <= folds for k in out) or len(set(out)) != len(out):
        raise UserError(f"--folds: {text!r} must name distinct folds in 1..{folds} (data.folds)")
    return out


def parse_methods(text: str) -> tuple[str, ...]:
    labels = tuple(x.strip() for x in text.split(",") if x.strip())
    for label in labels:
        if not (m := LABEL.fullmatch(label)) or m["method"] not in METHODS:
            raise UserError(f"--methods: {label!r} is not a method; choose from {', '.join(METHODS)} "
                            f"(or <method>-<variant>)")
    if not labels or len(set(labels)) != len(labels):
        raise UserError(f"--methods: {text!r} must name one or more distinct methods")
    return labels


def method_of(label: str) -> str:
    return LABEL.fullmatch(label)["method"]


def split_overrides(overrides: list[str], labels: tuple[str, ...]) -> tuple[list[str], dict[str, dict]]:
    """key=value overrides for every cell, and ``<label>.<key>=value`` ones for one compared method (values read as
    load_config reads them)."""
    base, per_label = [], {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        head, dot, rest = key.strip().partition(".")
        if sep and dot and (m := LABEL.fullmatch(head)) and m["method"] in METHODS:
            if head not in labels:
                raise UserError(f"override {item!r}: {head} is not in --methods")
            per_label.setdefault(head, {})[rest] = _value(raw)
        elif sep and key.strip() in RESERVED:
            raise UserError(f"override {item!r}: {key.strip()} is set per cell by ssau compare")
        else:
            base.append(item)
    return base, per_label


def _value(raw: str):
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(raw)
        except ValueError:
            pass
    return value


def method_sections(cfg: Config, labels: tuple[str, ...], overrides: dict[str, dict]) -> dict[str, dict]:
    """Each label's method section: the config's own for the method it names, else that method's defaults (a
    section written for one method is meaningless for another); then the label's ``<label>.<key>=value``."""
    out = {}
    for label in labels:
        name = method_of(label)
        base = dict(cfg.method) if cfg.method_name == name else {}
        try:
            out[label] = resolve_params({**base, **overrides.get(label, {}), "name": name})
            resolve_method(validate(dataclasses.replace(cfg, method=out[label])))  # what the method needs (MAL:
            # data.validation)
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}") from None
    return out


def digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def settings(cfg: Config, grid: Grid) -> dict:
    """What decides a cell's result besides its grid position and method section (checked per cell): a named
    compare refuses to mix other settings into its parent."""
    tree = to_dict(cfg)
    del tree["tracking"], tree["method"], tree["data"]["fold"], tree["data"]["label_drop"]
    for k in ("name", "resume", "progress", "out", "seed", "log_every", "checkpoint_every", "keep_checkpoints",
              "rank_report"):
        del tree["train"][k]
    return {"config": tree, "warm_steps": grid.warm_steps}


def same_section(params: dict, section: dict) -> bool:
    """A finished child's logged method.* params (the trainer logs the flattened config) against a section."""
    return all(params.get(f"method.{k}") == str(v)[:6000] for k, v in section.items())


# ---------------------------------------------------------------------------------------------------- cells
def _trained_to_end(run_dir: Path, steps: int) -> bool:
    """The run directory's training reached its last step (model.pt, or a step file of the last step)."""
    ckpts = sorted(run_dir.glob("checkpoints/step-*.pt"))
    last = int(m.group(1)) if ckpts and (m := re.fullmatch(r"step-(\d+)\.pt", ckpts[-1].name)) else 0
    return (run_dir / "model.pt").exists() or last >= steps


def train_name(out: Path, base: str, steps: int) -> str:
    """The run directory a cell (re)runs in: the first of base, base-r2, ... not trained to its end already."""
    for k in range(1, 1000):
        name = base if k == 1 else f"{base}-r{k}"
        if not _trained_to_end(out / name, steps):
            return name
    raise UserError(f"{out / base}: 999 attempts of this cell trained to the end; use another --name")


def cell_config(cfg: Config, cell: Cell, section: dict, name: str, steps: int, parent_id: str,
                init_from: str) -> Config:
    out = Path(cfg.train.out).resolve()
    train = dataclasses.replace(cfg.train, seed=cell.seed, steps=steps, out=str(out), resume="auto",
                                name=train_name(out, f"{name}-{cell.id}", steps),
                                init_from=init_from or cfg.train.init_from)
    c = dataclasses.replace(cfg, method=section, train=train,
                            data=dataclasses.replace(cfg.data, label_drop=cell.drop, fold=cell.fold),
                            tracking=dataclasses.replace(cfg.tracking, parent_run_id=parent_id, run_name=cell.id,
                                                         tags={**cfg.tracking.tags, **cell_tags(cell, name)}))
    return resolve_method(validate(c))


def cell_tags(cell: Cell, name: str) -> dict:
    return {"compare": name, "compare_cell": cell.id, "compare_role": "warm" if cell.warm else "cell",
            "compare_method": cell.method, "seed": cell.seed, "label_drop": cell.drop, "fold": cell.fold}
