"""The import arrows the guide fixes: baselines -> mosaic, never back; the method registry imports nothing above it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports count), as absolute dotted names."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def test_imports_of_resolves_relative_imports():
    """The helper itself: `from .mkd import ...` in mosaic/anomaly/method.py is mosaic.anomaly.mkd."""
    assert {"mosaic.anomaly.mkd", "mosaic.methods", "torch"} <= imports_of(ROOT / "mosaic/anomaly/method.py")
    assert "mosaic.methods.context" in imports_of(ROOT / "mosaic/methods/__init__.py")


def test_mosaic_never_imports_baselines():
    bad = {str(p.relative_to(ROOT)): sorted(m for m in imports_of(p) if m.split(".")[0] == "baselines")
           for p in (ROOT / "mosaic").rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_method_registry_imports_nothing_above_it():
    """mosaic/methods imports no engine, CLI, anomaly package or baselines (they import it)."""
    above = ("mosaic.engine", "mosaic.cli", "mosaic.anomaly", "baselines", "experiments")
    bad = {}
    for p in (ROOT / "mosaic/methods").rglob("*.py"):
        hits = sorted(m for m in imports_of(p) if any(m == a or m.startswith(a + ".") for a in above))
        if hits:
            bad[str(p.relative_to(ROOT))] = hits
    assert not bad


def test_mkd_registers_through_the_entry_point_and_the_registry_loads_no_anomaly_module_until_asked():
    code = ("import sys; import mosaic.methods as m; assert 'mosaic.anomaly' not in sys.modules; "
            "assert m.get_method('mkd').__module__ == 'mosaic.anomaly.method'; print(sorted(m.list_methods()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "'mkd'" in out.stdout and "'mosaic'" in out.stdout and "'kd_ood'" in out.stdout


def test_unknown_method_without_entry_points_says_the_package_is_not_installed(monkeypatch):
    import pytest

    import mosaic.methods as m
    from mosaic.config import ConfigError
    m.list_methods()
    monkeypatch.setattr(m, "_PLUGIN_NAMES", [])
    with pytest.raises(ConfigError, match=r"unknown method 'mkd_x'.*pip install -e \."):
        m.get_method("mkd_x")
