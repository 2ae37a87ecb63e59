"""The layering of docs/architecture.md, checked on the import statements of the pack's modules
(module-level and inside functions): no import cycles, and no import from a lower layer to a
higher one (nodes -> comfy_adapter -> redi_core -> kb_tools.storage)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("nodes", "comfy_adapter", "redi_core", "kb_tools")
# higher number = higher layer; a module may import only modules of its own layer or below
LAYERS = {
    "kb_tools.errors": 0, "kb_tools.version": 0, "kb_tools.storage": 0,
    "redi_core": 1,
    "kb_tools.distributed": 2, "kb_tools.measure": 2, "kb_tools.builder": 2, "kb_tools.library": 2,
    "comfy_adapter": 3,
    "nodes": 4, "kb_tools.cli": 4, "kb_tools.__main__": 4,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(mod: str) -> int:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports_of(path: Path, mod: str, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:  # `from pkg import module` names a module
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return {t for t in out if t in known and t != mod}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, module_name(p), known) for p in files}


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    g = graph()
    bad = [f"{m} -> {n}" for m, deps in g.items() for n in deps if layer(n) > layer(m)]
    assert not bad, f"imports that go up a layer: {bad}"


def test_pure_packages_never_import_comfyui():
    bad = []
    for pkg in ("kb_tools", "redi_core"):
        for p in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                bad += [f"{p.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("comfy", "comfy_api", "comfy_extras", "nodes", "folder_paths", "server")]
    assert not bad, bad
