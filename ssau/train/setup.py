"""Where a run is built: the YAML-level ``Config`` (``ssau.config``, which imports no method) is checked against
the method it names. The method section gets every hyper-parameter with its default filled in (what config.yaml
and the MLflow params show), then the method's own cross-section checks run. ``build_method`` turns the section into
the method's typed ``Params`` once, when the method is built.
"""

from __future__ import annotations

from pathlib import Path

from ssau.config import Config, load_config
from ssau.errors import ConfigError
from ssau.methods.registry import METHODS, resolve_params, scores_au


def resolve_method(cfg: Config) -> Config:
    """``cfg`` with its method section validated and completed (ConfigError, one line, otherwise); idempotent."""
    cfg.method = resolve_params(cfg.method)
    return check_method(cfg)


def check_method(cfg: Config) -> Config:
    """What the method needs of the other sections (MAL: an expression corpus and a validation split), and its own
    cross-section checks."""
    name, d = cfg.method_name, cfg.data
    needs = METHODS[name].needs
    if "expression" in needs and not d.expression:
        raise ConfigError(f"data.expression: method {name} needs an expression corpus (shard one with `ssau shard rafdb`)")
    if "validation" in needs and d.validation <= 0:
        raise ConfigError(f"data.validation: method {name} needs an AU validation fraction above 0 (the paper's: 0.02)")
    unlabelled = d.unlabelled or (d.label_drop > 0 and d.label_drop_mode == "image") or d.labelled_subjects
    if "unlabelled" in needs and not (unlabelled and d.m2 > 0):  # else it would quietly train as supervised
        raise ConfigError(f"data.unlabelled: method {name} needs unlabelled images (data.unlabelled, image-mode label "
                          f"drop or data.labelled_subjects) and data.m2 > 0")
    for key, v in (("train.evaluate_on", cfg.train.evaluate_on), ("train.thresholds", cfg.train.thresholds)):
        if v == "val" and not scores_au(cfg.method):  # the AU validation split serves the AU task only
            raise ConfigError(f"{key}=val: method {name} as configured is scored on expressions, not AUs")
    METHODS[name].check(cfg)
    return cfg


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """A run's configuration: YAML file + overrides, the method section checked against its method's ``Params``
    before the cross-field checks (so errors come in the order they always did), then the method's own checks."""
    return check_method(load_config(path, overrides, resolve_params))
