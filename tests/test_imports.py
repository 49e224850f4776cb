"""The package's import graph: no cycles inside fcot/, and every import inside a function (a heavy library, or
one only a Ray worker needs) with its reason in a comment; fcot's own modules are imported at module level."""

import ast
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "fcot"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, here: str, is_package: bool):
    """(node, imported module, at module level) for every import in a module."""
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.split(".") if is_package else here.split(".")[:-1]
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            yield node, base, id(node) in top
            for alias in node.names:  # `from fcot.teacher import plan` imports fcot.teacher.plan
                yield node, f"{base}.{alias.name}", id(node) in top


def _graph():
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    edges, local = {m: set() for m in modules}, []
    for name, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        for node, target, at_top in _imports(ast.parse(source), name, path.name == "__init__.py"):
            # Importing fcot.a.b runs fcot/a/__init__.py first: the package is imported too.
            parents = [".".join(target.split(".")[:i]) for i in range(2, target.count(".") + 1)]
            for parent in parents:
                if parent in modules and parent != name and not name.startswith(parent + "."):
                    edges[name].add(parent)
            if target in modules and target != name:
                edges[name].add(target)
            # fcot's own modules at module level, unless heavy themselves (model code importing torch): then a
            # local import with its reason, as for torch, vllm, deepspeed, ray or transformers.
            if not at_top and not _explained(lines, node.lineno - 1):
                local.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target} locally without a reason")
    return edges, sorted(set(local))


def _explained(lines: list[str], i: int) -> bool:
    """A local import explains itself: a comment on a line of its run of import lines, or on the line above it."""
    start = i
    while start > 0 and lines[start - 1].strip().startswith(("import ", "from ")):
        start -= 1
    end = i
    while end + 1 < len(lines) and lines[end + 1].strip().startswith(("import ", "from ")):
        end += 1
    return any("#" in ln for ln in lines[start:end + 1]) or (start > 0 and "#" in lines[start - 1])


def test_no_import_cycle_inside_fcot():
    edges, _ = _graph()
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_fcot_modules_are_imported_at_module_level_and_local_imports_say_why():
    _, local = _graph()
    assert not local, "\n".join(local)


def test_the_check_finds_a_cycle(tmp_path, monkeypatch):
    """The graph check is not vacuous: two modules importing each other are found."""
    pkg = tmp_path / "fcot"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from fcot.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from fcot.a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    edges, local = _graph()
    assert edges["fcot.a"] == {"fcot.b"} and edges["fcot.b"] == {"fcot.a"}
    assert local and "locally without a reason" in local[0]


# a stage: a module, or a package whole
STAGES = ("fcot.teacher", "fcot.curate", "fcot.train", "fcot.evaluate", "fcot.rollout")
LONGEST = 80  # lines of a function in fcot/


def _stage(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


def _stage_crossings(edges: dict) -> list[str]:
    return sorted(f"{m} imports {n}" for m, targets in edges.items() for n in targets
                  if _stage(m) and _stage(n) and _stage(m) != _stage(n))


def test_no_stage_imports_another_stage():
    """What two stages share lives below them (fcot.contracts, fcot.predict, ...): the stages stand side by side."""
    edges, _ = _graph()
    assert all(any(_stage(m) == s for m in edges) for s in STAGES), "a stage in STAGES is not a module of fcot/"
    crossings = _stage_crossings(edges)
    assert not crossings, "stage modules importing another stage:\n" + "\n".join(crossings)


def test_the_stage_check_finds_a_crossing():
    edges = {"fcot.train.trainer": {"fcot.evaluate", "fcot.contracts.records"}, "fcot.evaluate": {"fcot.predict"}}
    assert _stage_crossings(edges) == ["fcot.train.trainer imports fcot.evaluate"]


def test_no_function_in_fcot_is_longer_than_80_lines():
    """A reader sees a flow in one screen or two: long functions are split at their seams."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > LONGEST:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions longer than {LONGEST} lines:\n" + "\n".join(long)
