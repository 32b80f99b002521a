"""The shape of the package: imports flow one way through written-down layers, with no cycles; model families are
known inside ``memdetect/models/`` only.

Every ``import`` statement counts, also the ones inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "memdetect"

#: Lowest first. A module may import from its own layer or a lower one, never from a higher one. An entry names a
#: top-level module, a folder (all its modules), or ``folder.module`` where a folder spans consecutive layers.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "_version", "text", "progress"),  # words: exceptions, version, escaping, what a terminal shows
    ("speed", "core"),     # speed/: runtime, winograd; core/: hooks, scores, p-values, metrics, similarity, hub
    ("settings",),         # the score-determining settings record and one validator per option
    ("store",),            # where inputs live and rows go: io, sources, journal, state, report, strict_json
    ("models",),           # the families (and EDM's checkpoint loaders and restricted unpickler)
    ("rows",),             # one item (path, tar member, URL, bytes, Pillow image) -> one report row, for every engine
    ("detector", "config"),  # the library API: images -> rows; the settings a run is made of
    ("integrations",),     # engines past one process (torchrun, Ray): rows from memdetect.rows, no workflow
    ("workflows.run_context", "workflows.html_report", "workflows.merge", "workflows.evidence"),  # a scan's outputs
    ("workflows.scan",),   # a whole scan
    ("workflows.calibrate", "workflows.ci", "workflows.guarding"),  # thresholds; audit; guard
    ("workflows.select",),  # choosing layer, timestep and metric from labelled images
    ("bench",),            # benchmarks and baselines
    ("cli", "__main__", "memdetect"),  # entry points and the facade
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """memdetect module -> the memdetect modules it imports (``from pkg import submodule`` resolved)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if _exists(f"{base}.{a.name}") else base for a in node.names]
            graph[name].update(t for t in targets if t == "memdetect" or t.startswith("memdetect."))
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")[1:] or [module]
    for n in (2, 1):
        if ".".join(parts[:n]) in LAYER_OF:
            return LAYER_OF[".".join(parts[:n])]
    spread = [layer for name, layer in LAYER_OF.items() if name.startswith(parts[0] + ".")]
    if len(parts) == 1 and spread:  # a folder's own __init__ sits at its lowest layer
        return min(spread)
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def test_imports_flow_down_the_layers():
    upward = [f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
              for src, dsts in sorted(import_graph().items()) for dst in sorted(dsts) if _layer(dst) > _layer(src)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_every_module_is_in_a_layer_and_the_graph_is_read():
    graph = import_graph()
    for module in graph:
        _layer(module)
    assert "memdetect.store.journal" in graph["memdetect.workflows.scan"]
    assert "memdetect.detector" in graph["memdetect.workflows.scan"]
    assert "memdetect.models.base" in graph["memdetect.models.sd"]


def _family_dispatch(path: Path) -> list[str]:
    """Comparisons on a ``family`` value, and dict literals indexed by one: choosing code by family name; and a
    preset or model name (a name ending in ``preset`` or ``model``) compared with a string literal (``preset ==
    "sd14"``, ``model in ("sd14", "sd15")``): choosing code by preset name."""
    found = []

    def is_family(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id.endswith("family")) or (
            isinstance(node, ast.Attribute) and node.attr.endswith("family"))

    def is_preset(node: ast.AST) -> bool:
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        return name.lower().endswith(("preset", "model"))

    def is_text(node: ast.AST) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str)) or (
            isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(is_text(e) for e in node.elts))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare) and any(is_family(n) for n in [node.left, *node.comparators]):
            found.append(f"{path.name}:{node.lineno}")
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(is_preset(n) for n in sides) and any(is_text(n) for n in sides):
                found.append(f"{path.name}:{node.lineno}")
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict) and is_family(node.slice):
            found.append(f"{path.name}:{node.lineno}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and isinstance(node.func.value, ast.Dict) and node.args and is_family(node.args[0])):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_dispatch_on_family_names_outside_models():
    outside = [p for p in PACKAGE.rglob("*.py") if "models" not in p.relative_to(PACKAGE).parts]
    hits = [hit for p in outside for hit in _family_dispatch(p)]
    assert not hits, f"family- or preset-specific code belongs in memdetect/models/ (an adapter, a preset): {hits}"


def test_family_dispatch_check_sees_preset_names(tmp_path):
    """The check above is not blind to dispatch on a preset or model name (the old ``preset == "sd14"``)."""
    code = tmp_path / "dispatch.py"
    code.write_text('if preset == "sd14":\n    pass\nif det.model in ("sd14", "sd15"):\n    pass\n'
                    'ok = preset == other_preset\n')
    assert _family_dispatch(code) == ["dispatch.py:1", "dispatch.py:3"]


def test_each_folder_is_one_stretch_of_layers():
    """A folder shows where its modules sit: the layers of its modules are consecutive (a band of the stack, not a
    scatter)."""
    by_folder: dict[str, set[int]] = defaultdict(set)
    for module in import_graph():
        parts = module.split(".")
        if len(parts) > 2 and (PACKAGE / parts[1]).is_dir():
            by_folder[parts[1]].add(_layer(module))
    assert {"core", "store", "speed", "workflows", "models", "cli"} <= set(by_folder)
    for folder, layers in by_folder.items():
        assert layers == set(range(min(layers), max(layers) + 1)), f"{folder}/ skips layers: {sorted(layers)}"


def test_cli_modules_stay_short():
    """The command line is a package of small modules (one per command group, the renderers, the error table): a
    module that grows past 300 lines is doing more than parsing and rendering."""
    modules = sorted((PACKAGE / "cli").glob("*.py"))
    assert len(modules) >= 10, [p.name for p in modules]  # the package, not one file
    long = {p.name: n for p in modules if (n := len(p.read_text().splitlines())) > 300}
    assert not long, f"memdetect/cli/ modules over 300 lines (split them): {long}"
