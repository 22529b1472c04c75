"""Which layer may import which: the rules docs/architecture.md states, checked on the source (imports anywhere in a
file, function-level ones included, except those under ``if TYPE_CHECKING:``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "optimum_recon"


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ["optimum_recon", *path.relative_to(PACKAGE).parent.parts]
    skipped = {id(node) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for node in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _files(sub: str) -> list[Path]:
    root = PACKAGE / sub
    return sorted(root.rglob("*.py")) if root.is_dir() else [root]


@pytest.mark.parametrize("sub, forbidden", [
    ("masks", ("torch.distributed", "optimum_recon.distributed", "optimum_recon.engine", "accelerate")),
    ("hub", ("optimum_recon.cli",)),
    ("evaluation", ("optimum_recon.pruner", "accelerate")),
    ("engine", ("optimum_recon.pruner", "optimum_recon.cli", "accelerate")),
    ("pruner.py", ("accelerate",)),
    ("engine/state.py", ("optimum_recon.engine.sequential",)),  # the state knows nothing of the steps
    ("engine/checkpoint.py", ("optimum_recon.engine.sequential", "optimum_recon.engine.state")),
    ("data", ("optimum_recon.engine", "optimum_recon.pruner", "optimum_recon.cli")),
    ("recipe.py", ("optimum_recon.cli", "optimum_recon.pruner", "torch")),
])
def test_layers_import_only_what_they_may(sub, forbidden):
    found = {f"{path.relative_to(PACKAGE)} imports {name}" for path in _files(sub) for name in _imports(path)
             if any(name == f or name.startswith(f + ".") for f in forbidden)}
    assert not found, sorted(found)


def test_accelerate_hooks_live_in_modeling_only():
    users = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if any(n.split(".")[0] == "accelerate" for n in _imports(p))}
    assert users <= {"modeling/offload.py", "modeling/loading.py"}, users


def test_configuration_imports_no_registry_at_import_time():
    # (it validates names against the registries when a config is built: a call-time import, not an import-time one)
    code = ("import sys, optimum_recon.configuration; "
            "print(sorted(m for m in sys.modules if m.startswith('optimum_recon')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == ("['optimum_recon', 'optimum_recon.calibration_config', 'optimum_recon.configuration', "
                              "'optimum_recon.sparse_loading', 'optimum_recon.version']"
                              ), loaded  # (sparse_loading: a cheap import hook)
