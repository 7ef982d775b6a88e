"""The package's shape (docs/architecture.md): rooms import only from rooms below them, no import
cycles, our modules imported at the top of a module (never inside a function, but for the few
that import megatron-core at their top), and no function
longer than 80 lines (docstrings not counted)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_opd"
MAX_FUNCTION_LINES = 80
# Bottom to top (docs/architecture.md); a module belongs to the longest prefix listed.
LAYERS = [
    ("megatron_opd.utils", "megatron_opd.cpu_compat", "megatron_opd.tasks"),
    ("megatron_opd.parallel",),
    ("megatron_opd.losses",),
    ("megatron_opd.models",),
    ("megatron_opd.rollout",),
    ("megatron_opd.checkpoint",),
    ("megatron_opd.teacher",),
    ("megatron_opd.train",),  # its building blocks
    ("megatron_opd.config",),
    ("megatron_opd.train.loop", "megatron_opd.train.dry_run"),
    ("megatron_opd.commands",),
    ("megatron_opd.cli", "megatron_opd.testing"),
]
# Our modules that subclass megatron-core's at import: imported where used, as megatron-core is
# (importing megatron.core costs seconds that `megatron-opd --help` or the config need not pay).
IMPORTED_WHERE_USED = {"megatron_opd.models.attention"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(f.read_text(), filename=str(f))
    return out


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            parts = parts if is_package else parts[:-1]
            base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]
    return []


def _import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """module -> our modules it imports (anywhere in it); and the imports made inside functions."""
    modules = _modules()

    def ours(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph, inside = {m: set() for m in modules}, []
    for module, tree in modules.items():
        is_package = (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()
        in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for n in ast.walk(f)}
        for node in ast.walk(tree):
            for target in filter(None, map(ours, _imported(node, module, is_package))):
                if target != module and target != "megatron_opd":
                    graph[module].add(target)
                    if id(node) in in_functions and target not in IMPORTED_WHERE_USED:
                        inside.append(f"{module} -> {target}")
    return graph, inside


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> int:
    matches = [(len(prefix), level) for level, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of {__file__}"
    return max(matches)[1]


def test_rooms_import_only_from_below():
    graph, _ = _import_graph()
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if _layer(b) > _layer(a)]
    assert upward == []


def test_no_import_cycles_and_no_imports_inside_functions():
    graph, inside = _import_graph()
    assert len(graph) > 40 and graph["megatron_opd.train.loop"]  # the walk saw the package
    assert _cycles(graph) == []
    assert inside == []


def test_no_function_longer_than_80_lines():
    long = []
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                doc = node.body[0]
                if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                    lines -= doc.end_lineno - doc.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert long == []
