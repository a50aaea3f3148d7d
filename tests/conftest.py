"""Test tiers and the shared corpora.

Tiers are applied from what a test uses (its own source and, transitively, its fixtures'), never by hand:
  ranks        starts ranks: run_ranks, torchrun, accelerate launch
  integration  puts shards or runs on disk, or starts a process: sharding, the CLI, the trainer, subprocesses
  unit         neither: in-memory tensors, tiny nets, parsers, hand-worked arithmetic (`pytest -m unit`, < 1 min)
  slow         marked by hand: fault-injection tests over 30 s (real servers, killed processes)
`pytest -m unit` is the inner loop; README command 2 and CI run everything.

The corpora are session fixtures: sharding is byte-identical, so one copy of each (frames, shard size) serves every
test that reads it. A test that must damage shards copies them first (``corpora.copy``); a digest taken when each
corpus is made is checked at the end of the session, so a test that writes into a shared corpus fails the run.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/corpora.py, helpers.py, ranks.py, nets.py

from corpora import shard_bp4d, shard_bp4d_flow, shard_rafdb  # noqa: E402

RANKS = re.compile(r"\brun_ranks\(|torchrun|accelerate\.commands\.launch|debug_launcher|_launch\(|init_process_group")
ON_DISK = re.compile(r"\bshard_bp4d\(|\bshard_rafdb\(|\bcorpora\.|\bwrite_bp4d\(|\bwrite_tar\(|\bmain\(|\bTrainer\("
                     r"|\brun_shard\(|\bshard\(|\bsubprocess\b|\bPopen\(|\bmp\.|\bmultiprocessing\b|\brender_corpus\("
                     r"|\bTracker\(|\bmlflow\b|\bTarWriter\(|\btarfile\.open\(|\btrain\(|\bfork\b|\bProcess\("
                     r"|\bworkers=[1-9]|\.tar\b")


TESTS = Path(__file__).parent.resolve()
CALL = re.compile(r"\b([A-Za-z_]\w*)\s*\(")


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _sources(item: pytest.Item) -> str:
    """The test function's source, that of every fixture it uses (fixtures' own fixtures included), and that of
    every function of the test tree they call (helpers of the module, tests/helpers.py, corpora.py), transitively."""
    texts = [_source(item.function)]
    info = getattr(item, "_fixtureinfo", None)
    for name in (info.names_closure if info else ()):
        for fixturedef in info.name2fixturedefs.get(name, ()):
            if fixturedef.baseid == "" and name != "corpora":
                continue  # pytest's own fixtures (tmp_path, monkeypatch, capsys) put nothing of ssau on disk
            texts.append(_source(fixturedef.func))
    names = vars(item.module)
    seen: set[str] = set()
    todo = [t for t in texts]
    while todo:
        for called in CALL.findall(todo.pop()):
            fn = names.get(called)
            if called in seen or not inspect.isfunction(fn):
                continue
            seen.add(called)
            where = inspect.getsourcefile(fn)
            if where and Path(where).resolve().is_relative_to(TESTS):
                texts.append(_source(fn))
                todo.append(texts[-1])
    return "\n".join(texts)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        text = _sources(item)
        if RANKS.search(text):
            item.add_marker(pytest.mark.ranks)
            item.add_marker(pytest.mark.integration)
        elif ON_DISK.search(text):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


class Corpora:
    """Look-alike corpora sharded once per session (per xdist worker), one per set of arguments."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.made: dict[tuple, tuple[Path, str]] = {}

    def _get(self, key: tuple, make) -> Path:
        if key not in self.made:
            out = make(self.factory.mktemp("-".join(map(str, key))))
            self.made[key] = (out, _digest(out))
        return self.made[key][0]

    def bp4d(self, frames: int = 6, shard_size: int = 4) -> Path:
        """The BP4D look-alike (6 subjects, two per standard fold), sharded with the standard folds. Read only."""
        return self._get(("bp4d", frames, shard_size), lambda tmp: shard_bp4d(tmp, frames=frames,
                                                                              shard_size=shard_size))

    def bp4d_flow(self, size: int = 32, shard_size: int = 3) -> Path:
        """Three subjects' faces with OpenFace landmarks, aligned to ``size`` px, TV-L1 flow to frame t + 3.
        Read only."""
        return self._get(("bp4d-flow", size, shard_size), lambda tmp: shard_bp4d_flow(tmp, size, shard_size))

    def rafdb(self, images: int = 24, shard_size: int = 8) -> Path:
        """The RAF-DB look-alike (aligned images, train/test split). Read only."""
        return self._get(("rafdb", images, shard_size), lambda tmp: shard_rafdb(tmp, images=images,
                                                                               shard_size=shard_size))

    @staticmethod
    def copy(shards: Path, to: Path) -> Path:
        """A private copy of shared shards, for a test that damages them."""
        shutil.copytree(shards, to)
        return to

    def check_untouched(self) -> list[str]:
        return [str(out) for out, digest in self.made.values() if _digest(out) != digest]


@pytest.fixture(scope="session")
def corpora(tmp_path_factory: pytest.TempPathFactory):
    c = Corpora(tmp_path_factory)
    yield c
    changed = c.check_untouched()
    assert not changed, f"a test wrote into the shared corpora {changed}: copy them first (corpora.copy)"
