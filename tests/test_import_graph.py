"""The import graph of edgeres's own modules, read from the source (every import, function-level ones too).

- no cycle: a cycle hidden behind function-level imports still makes the modules one unit nobody can read alone;
- no upward arrow: a module imports only modules of its own layer or below (LAYERS);
- edgeres's own modules are imported at the top of a file, unless importing one would load a heavy third-party
  package (torch, numpy, onnx, ...) that the importing module itself does not need at import time: `edgeres
  --help` must not load torch.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "edgeres"
HEAVY = {"torch", "numpy", "onnx", "onnxruntime", "nncf", "openvino", "tensorrt", "polygraphy", "matplotlib",
         "yaml", "sklearn", "PIL", "tqdm", "scipy", "onnxslim", "cryptography"}

# lowest first; a module may import its own layer (acyclically) and the layers below, never one above
LAYERS = [
    ("foundation", ["errors", "io", "env", "metrics", "stats", "suggest", "numbers", "progress", "device", "dist",
                    "runner_base", "__init__",
                    "tensorrt.versions", "tensorrt.dla"]),
    ("formats", ["recipe", "settings", "records", "checkpoint", "models", "data", "check", "onnx_info", "pretrained",
                 "memory",
                 "nncf_kernels", "nncf_patches", "tensorrt.options", "tensorrt.trtexec", "tensorrt.engine_build",
                 "tensorrt.status", "tensorrt.sidecar", "tensorrt.__init__"]),
    ("runtimes", ["evaluate", "loop", "tensorrt.runner"]),
    # the stages, and what opens any stage's artifact (runners loads folded and INT8 checkpoints, so it sits here)
    ("stages", ["train", "fold", "quantize", "export", "cpu", "verify", "tensorrt.calib_cache", "tensorrt.compile",
                "tensorrt.targets", "runners", "bench", "compare", "predict", "report", "summary", "deploy"]),
    ("pipeline", ["build", "experiment"]),
    ("cli", ["cli", "__main__"]),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts)] = p
    return mods


def _name(mod: str, mods: dict[str, Path]) -> str | None:
    """The module file a dotted name (below edgeres.) loads: itself, or its package's __init__."""
    if mod in mods:
        return mod
    return f"{mod}.__init__" if f"{mod}.__init__" in mods else None


def _imports(mods: dict[str, Path]):
    """module -> [(imported module, is_top_level, line)] for imports of edgeres modules; module -> top-level
    third-party roots it imports."""
    edges: dict[str, list[tuple[str, bool, int]]] = {m: [] for m in mods}
    third: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        top |= {id(c) for n in tree.body if isinstance(n, (ast.If, ast.Try)) for c in ast.walk(n)}
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "edgeres" or node.module.startswith("edgeres."):
                    base = node.module[len("edgeres."):] if node.module != "edgeres" else "__init__"
                    for a in node.names:
                        sub = _name(f"{base}.{a.name}" if base != "__init__" else a.name, mods)
                        names.append(sub or _name(base, mods) or base)
                elif id(node) in top:
                    third[m].add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("edgeres."):
                        names.append(_name(a.name[len("edgeres."):], mods) or a.name)
                    elif id(node) in top:
                        third[m].add(a.name.split(".")[0])
            for n in names:
                if n != m:
                    edges[m].append((n, id(node) in top, node.lineno))
    return edges, third


def _layer(mod: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"edgeres.{mod} is in no layer of tests/test_import_graph.py: place it")
    return rank


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    return mods, *_imports(mods)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out, counter = set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle(graph):
    mods, edges, _ = graph
    cycles = _cycles({m: {t for t, _, _ in e} for m, e in edges.items()})
    assert not cycles, f"import cycles among edgeres modules: {cycles}"


def test_no_upward_import(graph):
    mods, edges, _ = graph
    bad = [f"edgeres.{m} (layer {LAYERS[_layer(m)][0]}) imports edgeres.{t} (layer {LAYERS[_layer(t)][0]}), "
           f"line {line}" for m, e in edges.items() for t, _, line in e if _layer(t) > _layer(m)]
    assert not bad, "\n".join(bad)


def _heavy_closure(mods, edges, third) -> dict[str, bool]:
    """Whether importing a module (top-level imports, transitively) loads a HEAVY third-party package."""
    memo: dict[str, bool] = {}

    def heavy(m: str, seen: frozenset) -> bool:
        if m in memo:
            return memo[m]
        if m in seen:
            return False
        parents = [".".join(m.split(".")[:i]) + ".__init__" for i in range(1, m.count(".") + 1)]
        parents = [p for p in parents if p in mods and p != m]   # importing a.b.c runs a/__init__ and a/b/__init__
        h = bool(third.get(m, set()) & HEAVY) or any(heavy(t, seen | {m}) for t, top, _ in edges.get(m, ()) if top) \
            or any(heavy(p, seen | {m}) for p in parents)
        memo[m] = h
        return h

    return {m: heavy(m, frozenset()) for m in mods}


def test_own_modules_are_imported_at_the_top(graph):
    """A function-level import of an edgeres module is there only to keep a heavy package out of import time."""
    mods, edges, third = graph
    heavy = _heavy_closure(mods, edges, third)
    bad = [f"edgeres/{mods[m].relative_to(ROOT)}:{line}: import edgeres.{t} at the top (it loads nothing heavy)"
           for m, e in edges.items() for t, top, line in e if not top and not heavy.get(t, False)]
    assert not bad, f"{len(bad)} function-level imports to move:\n" + "\n".join(bad)


def test_cli_starts_without_heavy_packages():
    """`edgeres --help` imports the CLI and every command module, and none of torch, numpy, onnx..."""
    import subprocess
    import sys

    code = ("import sys, edgeres.cli; loaded = {m.split('.')[0] for m in sys.modules}; "
            f"print(sorted(loaded & set({sorted(HEAVY)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing edgeres.cli loads {out}"
