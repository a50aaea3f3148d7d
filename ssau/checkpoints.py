"""Checkpoint files: written atomically and only when finite, read without executing anything, pruned.

- Reading: ``safe_load`` is ``torch.load(..., weights_only=True)``: tensors, numbers, strings and plain containers
  only, so a crafted (pickled) file cannot run code. What ssau writes is exactly that: RNG states are stored as
  lists and tensors (``ssau.dist.rng.rng_state``), never as numpy objects. A file that needs anything else is refused with
  one line. DeepSpeed's own loader is replaced by the same function (``ssau.dist.deepspeed.deepspeed_engine``), with three
  DeepSpeed classes allowed by name (its ZeRO stage enum, loss scaler and fragment address).
- Writing: ``atomic_save`` writes ``.<name>.tmp-<pid>``, fsyncs and renames, so a kill -9 or a full disk never leaves
  a half file under the real name; on failure the temporary file is removed and the previous checkpoint stays the
  newest. Non-finite floating tensors are refused before anything is written.
- Housekeeping: ``clean_partial`` removes what a killed save left (temporary files, step files and DeepSpeed tag
  folders newer than the ``last`` pointer); ``prune`` keeps the newest ``keep`` step checkpoints.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from ssau.errors import CheckpointError, ConfigError
from ssau.io import atomic_file, atomic_write

STEP_FILE = re.compile(r"step-(\d{7})\.pt")


def safe_load(path: str | Path, map_location: Any = "cpu", allow: Iterable[type] = ()) -> Any:
    """``torch.load`` that executes nothing: weights only (plus the classes in ``allow``)."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:[Uu]nsupported (?:global: )?GLOBAL|Trying to call reduce for) ?([\w.]*)",
                          str(e))
        if found is None:  # not a pickle ssau could have written at all
            raise CheckpointError(f"{path}: not a readable checkpoint (the unpickler stopped: "
                                  f"{str(e).strip().splitlines()[-1][:120]})") from None
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain containers "
                              f"({found.group(1) or 'a call'}); loading it could execute code") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the unpickler raise (KeyError on text)
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None


_TRAINING = {"method": dict, "step": int, "starts": int, "rng": list, "optimizers": dict, "schedulers": dict,
             "config": dict, "aus": list, "run_id": str, "skipped_updates": int}
_MODEL = {"method": dict, "config": dict, "aus": list}


def check_training_state(state: Any, path: Path, model_only: bool = False) -> dict:
    """``state`` if it has the keys and types ssau writes (a model.pt with ``model_only``), else CheckpointError:
    a damaged or foreign file fails with one line, not with whatever its first use would raise."""
    want = _MODEL if model_only else _TRAINING
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an ssau checkpoint (it holds a {type(state).__name__})")
    for key, tp in want.items():
        if key not in state:
            raise CheckpointError(f"{path}: not an ssau checkpoint (no {key!r})")
        if not isinstance(state[key], tp) or (tp is int and not 0 <= state[key] < 2**62):
            raise CheckpointError(f"{path}: {key!r} is a {type(state[key]).__name__}, not a valid {tp.__name__}")
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state["method"].items()):
        raise CheckpointError(f"{path}: 'method' is not a state_dict of named tensors")
    if not all(type(a) is int and 1 <= a <= 99 for a in state["aus"]) or not state["aus"]:
        raise CheckpointError(f"{path}: 'aus' is not a list of AU numbers")
    return state


def load_into(target: Any, state: Any, what: str, path: Path) -> None:
    """``target.load_state_dict(state)`` with a mismatch (shapes, keys, types) as one CheckpointError line."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: its {what} does not fit this run ({first})") from None


def warm_start(module: torch.nn.Module, path: Path) -> tuple[int, int]:
    """``train.init_from``: ``module``'s tensors of matching name and shape from a model.pt or step checkpoint (the
    backbone and AU head of a supervised run, for any method; ``warm_aliases`` name further places for a tensor)
    -> (tensors taken, tensors of the module)."""
    if not path.is_file():
        raise ConfigError(f"train.init_from: {path} does not exist")
    state = check_training_state(safe_load(path), path, model_only=True)  # weights only: runs nothing
    own = module.state_dict()
    aliases = getattr(module, "warm_aliases", ())
    take = {}
    for k, v in state["method"].items():
        for name in [k] + [mine + k[len(theirs):] for theirs, mine in aliases if k.startswith(theirs)]:
            if name in own and tuple(own[name].shape) == tuple(v.shape):
                take[name] = v
    if not any(k in take for k, _ in module.named_parameters()):
        raise ConfigError(f"train.init_from: {path} holds no parameter of this model (names and shapes differ)")
    module.load_state_dict(take, strict=False)
    return len(take), len(own)


def nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating tensors in a nested state that hold NaN or inf."""
    bad = []
    if torch.is_tensor(state):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(state, dict):
        for k, v in state.items():
            bad += nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            bad += nonfinite_tensors(v, f"{prefix}[{i}]")
    return bad


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` through a temporary name; raises CheckpointError (and leaves nothing) on failure."""
    bad = nonfinite_tensors(obj)
    if bad:
        raise CheckpointError(f"{path.name}: not written, {len(bad)} tensors hold NaN or inf (e.g. {bad[0]})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:160]
        raise CheckpointError(f"cannot write {path} ({reason})") from None


def writable_dir(path: Path, key: str) -> str | None:
    """Create ``path`` and write a probe file in it: None, or one line saying why not (root ignores permission
    bits, so only a real write tells)."""
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        return f"{key}: cannot write the run directory {path} ({e.strerror or e})"
    return None


def write_pointer(ckpt_dir: Path, name: str) -> None:
    """Point ``last`` at ``name`` atomically (the step file must already be complete)."""
    try:
        atomic_write(ckpt_dir / "last", (name + "\n").encode())
    except OSError as e:
        raise CheckpointError(f"cannot write {ckpt_dir / 'last'} ({e.strerror or e})") from None


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``last`` points at; None when there is no pointer. A pointer that names no checkpoint is a
    CheckpointError (it is never guessed around: the user decides)."""
    pointer = ckpt_dir / "last"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_bytes()[:64].decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer} is unreadable ({type(e).__name__}); remove it to resume from the newest "
                              f"step file") from None
    if not STEP_FILE.fullmatch(name) or not (ckpt_dir / name).is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint in {ckpt_dir}")
    return ckpt_dir / name


def newest_step_file(ckpt_dir: Path) -> Path | None:
    """The highest-numbered complete step file (the pointer was lost): what resume falls back to."""
    steps = sorted(p for p in ckpt_dir.glob("step-*.pt") if STEP_FILE.fullmatch(p.name)) if ckpt_dir.is_dir() else []
    return steps[-1] if steps else None


def _step(name: str) -> int | None:
    m = re.fullmatch(r"step-(\d{7})(\.pt)?", name)
    return int(m.group(1)) if m else None


def _deepspeed_tags(ckpt_dir: Path) -> list[Path]:
    root = ckpt_dir / "deepspeed"
    return [tag for group in root.iterdir() if group.is_dir() for tag in group.iterdir()
            if tag.is_dir() and _step(tag.name) is not None] if root.is_dir() else []


def clean_partial(ckpt_dir: Path) -> list[str]:
    """Remove what an interrupted save left behind; returns the names removed. Rank 0, before any save."""
    if not ckpt_dir.is_dir():
        return []
    last = last_checkpoint(ckpt_dir)
    removed = []
    for p in list(ckpt_dir.glob(".*.tmp-*")) + list(ckpt_dir.glob(".last.tmp*")):
        p.unlink(missing_ok=True)
        removed.append(p.name)
    if last is None:  # no pointer (lost, or deleted by hand): complete step files stay, resume takes the newest
        return removed
    newest = _step(last.name)
    for p in ckpt_dir.glob("step-*.pt"):  # written, but the pointer never moved to it: its DeepSpeed part may be partial
        if (_step(p.name) or -1) > newest:
            p.unlink()
            removed.append(p.name)
    for tag in _deepspeed_tags(ckpt_dir):
        if (_step(tag.name) or -1) > newest:
            shutil.rmtree(tag, ignore_errors=True)
            removed.append(f"deepspeed/{tag.parent.name}/{tag.name}")
    return removed


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Keep the newest ``keep`` step checkpoints (and their DeepSpeed tags); 0 keeps all. Never the current one."""
    if keep <= 0:
        return []
    last = last_checkpoint(ckpt_dir)
    steps = sorted({s for p in ckpt_dir.glob("step-*.pt") if (s := _step(p.name)) is not None}, reverse=True)
    keep_steps = set(steps[:keep]) | ({_step(last.name)} if last else set())
    removed = []
    for s in steps:
        if s not in keep_steps:
            (ckpt_dir / f"step-{s:07d}.pt").unlink(missing_ok=True)
            removed.append(f"step-{s:07d}.pt")
    for tag in _deepspeed_tags(ckpt_dir):
        if _step(tag.name) not in keep_steps:
            shutil.rmtree(tag, ignore_errors=True)
    return removed
