"""The brief's layering rule, checked on the source: lower layers never import higher ones."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ember"

# Lowest first. A module may import from its own layer and the layers before it. Entries are
# packages or dotted sub-packages; the longest matching entry decides a module's layer, so the
# compiled CPU backend (``backends.cpu``, which needs the compiler) sits above the backend
# interface and the NumPy reference backend that the core itself runs on.
LAYERS = [
    ["errors", "dtypes"],
    ["ir", "io"],
    ["backends"],
    ["core"],
    ["ops"],
    ["numpy", "tree"],
    ["transforms", "lax", "random"],
    ["compiler"],
    ["backends.cpu"],
    ["parallel"],
    ["nn", "optim"],
    ["models"],
    ["cli"],
]


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "ember" or len(parts) < 2:
        return None
    best, best_len = None, 0
    for i, names in enumerate(LAYERS):
        for name in names:
            n = name.split(".")
            if parts[1:1 + len(n)] == n and len(n) > best_len:
                best, best_len = i, len(n)
    return best


def test_no_module_imports_a_higher_layer():
    violations = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts)
        own = layer_of(module)
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                target = layer_of(name)
                if target is not None and target > own:
                    violations.append(f"{module} imports {name}")
    assert not violations, "\n".join(violations)
