"""The method registry: config name -> Method class. One file per method, named as the papers' readers know it."""

from __future__ import annotations

import dataclasses

from ssau.config import build
from ssau.errors import ConfigError
from ssau.methods.adversarial import Adversarial
from ssau.methods.base import Method
from ssau.methods.fixmatch import FixMatch
from ssau.methods.large_margin import LargeMargin
from ssau.methods.mal import MAL
from ssau.methods.mean_teacher import MeanTeacher
from ssau.methods.mlcr import MLCR
from ssau.methods.mtl import MultiTask
from ssau.methods.pseudo_label import PseudoLabel
from ssau.methods.rtatl.method import RTATL
from ssau.methods.supervised import Supervised

METHODS: dict[str, type[Method]] = {
    Supervised.name: Supervised,
    MultiTask.name: MultiTask,
    Adversarial.name: Adversarial,
    MAL.name: MAL,
    MLCR.name: MLCR,
    LargeMargin.name: LargeMargin,
    PseudoLabel.name: PseudoLabel,  # the field's generic semi-supervised baselines (USB's implementations)
    MeanTeacher.name: MeanTeacher,
    FixMatch.name: FixMatch,
    RTATL.name: RTATL,
}


def resolve_params(section: dict) -> dict:
    """Validate a ``method:`` config section against its method's Params; returns it with defaults filled in."""
    section = dict(section)
    name = section.pop("name", None)
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"method.name: {name!r} is not a method; choose one of {', '.join(METHODS)}")
    params = build(METHODS[name].Params, section, "method")
    return {"name": name, **dataclasses.asdict(params)}


def check_groups(name: str, groups: dict) -> None:
    """Every parameter in at most one optimiser group (one optimiser steps it)."""
    seen = {}
    for group, g in groups.items():
        for p in g.params:
            if id(p) in seen:
                raise ValueError(f"{name}: a parameter is in groups {seen[id(p)]} and {group}")
            seen[id(p)] = group


def scores_au(section: dict) -> bool:
    """Whether a method section's runs are scored by AU F1 (``ssau cv`` and ``ssau compare`` read it)."""
    return "au" in METHODS[section["name"]].eval_tasks(method_params(section))


def method_params(section: dict):
    """The method section as its method's typed ``Params`` (the section was resolved by ``resolve_params``)."""
    return METHODS[section["name"]].Params(**{k: v for k, v in section.items() if k != "name"})


def build_method(section: dict, aus: tuple[int, ...], model) -> Method:
    """The method a run trains: its class from the registry, its ``Params`` built once, here."""
    return METHODS[section["name"]](method_params(section), aus, model)


