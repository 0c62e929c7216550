"""Structure rules that keep one piece of code per piece of logic: checked on the source tree."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> list[Path]:
    return sorted(p for pkg in ("gpu_ops", "flows") for p in (REPO / pkg).rglob("*.py"))


def test_no_private_name_is_imported_from_another_module() -> None:
    offenders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module not in (None, "__future__"):
                offenders += [f"{path.relative_to(REPO)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_gpu_ops_never_imports_prefect() -> None:
    offenders = []
    for path in sorted((REPO / "gpu_ops").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "prefect"]
    assert offenders == []


def test_the_registry_imports_no_backend_through_a_function() -> None:
    """Op modules register in the backend table at import; the registry imports the ops packages
    at its top, so no call imports a plugin behind the reader's back (no hidden import cycle)."""
    tree = ast.parse((REPO / "gpu_ops" / "registry.py").read_text())
    hidden = [node.lineno for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
              for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert hidden == []
    table = ast.parse((REPO / "gpu_ops" / "backend_table.py").read_text())
    imported = {a.name for n in ast.walk(table) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(table) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.startswith(("gpu_ops.cluster", "gpu_ops.reduce", "gpu_ops.registry"))}
