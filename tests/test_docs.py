"""The API reference: every public name documented, and the site builds with `--strict`."""

import importlib
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gflow

ROOT = Path(__file__).resolve().parents[1]
SUBMODULES = ("models", "tasks", "theory", "observers", "measures", "presets", "figures")


def public_names(module) -> list[str]:
    """`__all__` where a module defines it; else the functions and classes of gflow that it
    binds to a public name (its own definitions and its re-exports)."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return sorted(
        name for name, value in vars(module).items()
        # callable: functions, classes and jitted functions (eqx.filter_jit wrappers)
        if not name.startswith("_") and callable(value) and not inspect.ismodule(value)
        and (getattr(value, "__module__", None) or "").startswith("gflow")
    )


def _undocumented(module) -> list[str]:
    missing = []
    for name in public_names(module):
        value = getattr(module, name)
        if inspect.ismodule(value):
            continue
        if not (inspect.getdoc(value) or "").strip():
            missing.append(f"{module.__name__}.{name}")
        if inspect.isclass(value):  # and its public methods and properties
            for attr, member in vars(value).items():
                if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(
                        member, (property, classmethod, staticmethod))):
                    continue
                doc = getattr(member, "__doc__", None) or getattr(
                    getattr(member, "__func__", None), "__doc__", None)
                if not (doc or "").strip():
                    missing.append(f"{module.__name__}.{name}.{attr}")
    return missing


def test_all_lists_the_package_namespace():
    # Names are imported on first use: `dir` lists them all, and each resolves.
    public = {n for n in dir(gflow) if not n.startswith("_")}
    # Submodules (observers, models, ...) and the re-exported names are all in __all__; the
    # CLI modules (`gflow.solve` as a module, `gflow.plot`) are not names of the package API.
    assert set(gflow.__all__) <= public
    for name in gflow.__all__:
        assert getattr(gflow, name) is not None
    assert public - set(gflow.__all__) <= {"plot", "sweep_cli"}, public - set(gflow.__all__)


@pytest.mark.parametrize("name", ("gflow", "gflow.plot") + tuple(f"gflow.{m}" for m in SUBMODULES))
def test_every_public_name_has_a_docstring(name):
    module = importlib.import_module(name)
    assert _undocumented(module) == []


@pytest.mark.skipif(shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (pip install -e .[docs])")
def test_docs_build_strict(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "solving" / "index.html").is_file()
