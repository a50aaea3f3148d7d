"""The shape of the package, checked from its source: no import circle among ssau's modules (imports inside
functions count, and so does the package ``__init__`` that Python runs before a submodule), every exception class
in ``ssau/errors.py``, no module over 400 lines, and a config that loads without torch or any method."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import ssau

ROOT = Path(ssau.__file__).parent
# A function-level import of an ssau module is allowed only here, each for the reason given (the test below asks
# every such import to say so in a comment on its line).
LAZY_OK = {
    "ssau.cli": "a command imports only what it runs: `ssau shard` and `ssau --help` never import torch",
    "ssau.__main__": "python -m ssau",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path, mods: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported ssau module, line, inside a function) for every import statement of ``path``."""
    me = module_name(path)
    tree = ast.parse(path.read_text())
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    pkg = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - child.level + 1] + ([child.module] if child.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in child.names]
            for t in targets:
                if t.split(".")[0] == "ssau":
                    out.append((t, child.lineno, inner))
            visit(child, inner)

    visit(tree, False)
    return out


def graph() -> dict[str, set[str]]:
    """module -> the ssau modules importing it runs: the imported module and every package above it."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _, _ in imports(path, mods):
            parts = target.split(".")
            for k in range(2, len(parts) + 1):  # `import ssau.a.b` runs ssau/a/__init__.py, then ssau/a/b.py
                name = ".".join(parts[:k])
                if name in mods and name != m:
                    edges[m].add(name)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_no_import_circle():
    assert circles(graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_only_where_allowed_and_said():
    mods = modules()
    found = []
    for m, path in mods.items():
        lines = path.read_text().splitlines()
        for target, line, inner in imports(path, mods):
            if inner and (m not in LAZY_OK or "#" not in lines[line - 1]):
                found.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} inside a function")
    assert found == []


def test_every_exception_class_lives_in_errors():
    defined = []
    for info in pkgutil.walk_packages(ssau.__path__, "ssau."):
        if info.name == "ssau.__main__":
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                defined.append(f"{info.name}.{name}")
    assert defined and all(d.startswith("ssau.errors.") for d in defined), [d for d in defined
                                                                           if not d.startswith("ssau.errors.")]


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_a_config_loads_without_torch_or_any_method(tmp_path):
    code = ("import sys; from ssau.config import load_config; "
            "cfg = load_config(None, ['data.labelled=[x]', 'method.name=mal', 'method.lambda_m=0.5']); "
            "assert cfg.method == {'name': 'mal', 'lambda_m': 0.5}, cfg.method; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('ssau.methods')); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("package", ["faces", "shard", "data", "methods", "dist", "train", "tracking", "compare",
                                     "synth"])
def test_each_layer_is_a_package_that_says_what_it_holds(package):
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
    assert doc and len(doc) > 20


def test_opencv_loads_only_where_faces_are_aligned_or_rendered():
    """A plain `ssau shard` forks its workers, and `ssau train` runs, without OpenCV: it is imported inside the
    functions that align, detect, warp or compute flow, and by the renderer (`ssau synth`, `ssau demo`)."""
    code = ("import sys, ssau.shard.plan, ssau.train.commands, ssau.train.trainer, ssau.compare.command; "
            "assert 'cv2' not in sys.modules; import ssau.train.demo; assert 'cv2' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_readme_import_of_the_hugging_face_features_still_works():
    """The README told users `from ssau.data.shardwrite import hf_features`; the name stays (one-line re-export)."""
    from ssau.data.shardwrite import hf_features, sample_arrow_type
    from ssau.shard import schema

    assert hf_features is schema.hf_features and sample_arrow_type is schema.sample_arrow_type
