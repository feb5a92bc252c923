"""The package's layers point one way (docs/ARCHITECTURE.md): the argument checks and the trie below the ops, the ops
below decoding, model, train and rl, and no package reaching into another's private (underscore) names. Read from
the source with ``ast`` (every import, function-level ones included), so nothing is imported."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Source folder of each package: onerec_fast.kernels ships from the top-level kernels/ folder (setup.py).
SOURCES = {"onerec_fast": ROOT / "onerec_fast", "onerec_fast.kernels": ROOT / "kernels"}
ABOVE_OPS = ("decoding", "model", "train", "rl")


def _modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file of every module of the package."""
    out = {}
    for base, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((base, *parts))] = path
    return out


MODULES = _modules()


def _package(dotted: str) -> str:
    """The subpackage a dotted name belongs to ("ops", "decoding", ...; "" for the top-level modules)."""
    parts = dotted.split(".")
    if len(parts) < 2 or parts[0] != "onerec_fast":
        return "<outside>"
    sub = ".".join(parts[:2])
    return parts[1] if sub in SOURCES or (SOURCES["onerec_fast"] / parts[1]).is_dir() else ""


def _private(dotted: str) -> bool:
    return any(p.startswith("_") and not p.startswith("__") for p in dotted.split(".")[1:])


def _imports(module: str) -> list[tuple[str, int]]:
    """``(imported dotted name, line)`` of every import in ``module``: ``from a.b import c`` gives ``a.b.c``."""
    path = MODULES[module]
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            src = ".".join(base + ([node.module] if node.module else []))
            out += [(f"{src}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return out


def _violations(modules, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{m}:{line} imports {name}" for m in modules for name, line in _imports(m)
            if name.startswith("onerec_fast.") and _package(name) in forbidden]


def test_the_scan_sees_the_layers():
    assert {"onerec_fast.ops.beam_step", "onerec_fast.decoding.beam_search", "onerec_fast.trie",
            "onerec_fast.checks", "onerec_fast.kernels.lm_head"} <= set(MODULES)
    assert "onerec_fast.checks.check_tensor" in {name for name, _ in _imports("onerec_fast.ops.moe_routing")}
    assert "onerec_fast.kernels.moe_routing.cdiv" in {name for name, _ in _imports("onerec_fast.kernels.moe_gemm")}
    assert _package("onerec_fast.ops.beam_step.beam_step") == "ops" and _package("onerec_fast.trie") == ""
    assert _private("onerec_fast.ops._checks.check_tensor") and not _private("onerec_fast.checks.check_tensor")


def test_ops_import_nothing_above_them():
    ops = [m for m in MODULES if _package(m) == "ops"]
    assert len(ops) >= 5
    assert _violations(ops, ABOVE_OPS) == []


def test_trie_and_checks_sit_below_the_ops():
    assert _violations(["onerec_fast.trie"], ("ops", "decoding", "modules", *ABOVE_OPS)) == []
    assert [name for name, _ in _imports("onerec_fast.checks") if name.startswith("onerec_fast")] == []


def test_no_private_imports_across_packages():
    bad = [f"{m}:{line} imports {name}" for m in MODULES for name, line in _imports(m)
           if name.startswith("onerec_fast.") and _private(name) and _package(name) != _package(m)]
    assert bad == []


def _private_defs(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.name.startswith("_") and not n.name.startswith("__")}


def test_no_private_attributes_across_packages():
    """``obj._name`` where ``_name`` is a function, method or class defined only in another package (such as a
    trie method called from the ops): that package's internals, not its interface."""
    defined: dict[str, set[str]] = {}
    for m in MODULES:
        for name in _private_defs(m):
            defined.setdefault(name, set()).add(_package(m))
    bad = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr in defined and _package(m) not in defined[node.attr]
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                bad.append(f"{m}:{node.lineno} uses {ast.unparse(node)} (defined in {sorted(defined[node.attr])})")
    assert bad == []
