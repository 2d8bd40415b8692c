"""The API reference: every public name documented, and the site builds with `--strict`."""

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    assert public - set(gflow.__all__) <= {"plot", "sweep_cli", "internal"}, public - set(gflow.__all__)


@pytest.mark.parametrize("name", ("gflow", "gflow.plot") + tuple(f"gflow.{m}" for m in SUBMODULES))
def test_every_public_name_has_a_docstring(name):
    module = importlib.import_module(name)
    assert _undocumented(module) == []


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e .[docs])")
    site = tmp_path_factory.mktemp("docs") / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return site


def test_docs_build_strict(site):
    for page in ("api/solving", "getting-started", "science", "bibliography", "results",
                 "notebooks/saxe_modes"):
        assert (site / page / "index.html").is_file(), page
    # Build code is not published.
    assert not list(site.rglob("hooks.py")) and not list(site.rglob("mkdocs_hooks*"))


def _text_outside_maths_and_code(html: str) -> str:
    for pattern in (r'<span class="arithmatex">.*?</span>', r'<div class="arithmatex">.*?</div>',
                    r"<code.*?</code>", r"<pre.*?</pre>", r"<script.*?</script>"):
        html = re.sub(pattern, "", html, flags=re.S)
    return html


def test_mathematics_is_rendered(site):
    for page in ("presets", "science"):
        html = (site / page / "index.html").read_text()
        assert re.search(r'<script src="[^"]*mathjax[^"]*tex-mml-chtml\.js"', html), page
        assert html.count('class="arithmatex"') >= 20, page  # formulas handed to MathJax
        raw = re.findall(r"\$[^$\s][^$<]*\$", _text_outside_maths_and_code(html))
        assert raw == [], (page, raw[:5])


def test_no_private_path_in_the_site_or_its_inventory(site):
    import zlib

    private = re.compile(r"gflow(\.[a-z]+)*\._[a-z]")  # gflow._solve, gflow.models._attention
    for file in site.rglob("*"):
        if file.suffix in (".html", ".json", ".xml"):
            found = private.search(file.read_text(encoding="utf-8"))
            assert found is None, (file, found)
    data = (site / "objects.inv").read_bytes()
    start = 0
    for _ in range(4):
        start = data.index(b"\n", start) + 1
    entries = zlib.decompress(data[start:]).decode().splitlines()
    names = {line.split()[0] for line in entries}
    assert {"gflow.solve", "gflow.sweep", "gflow.Trajectory", "gflow.observers.stable_rank"} <= names
    assert not [name for name in names if "._" in name]


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.stdout.splitlines()]


def test_the_science_is_cited_from_the_docs_only():
    # The science the code cites lives in docs/science.md; no reference points outside the
    # repository.
    name = "papers" + ".md"
    for path in _tracked_files():
        if path.is_file() and path.suffix in (".py", ".md", ".toml", ".yml", ".txt", ".cff",
                                              ".ipynb", ".json"):
            assert name not in path.read_text(encoding="utf-8", errors="replace"), path
    science = (ROOT / "docs" / "science.md").read_text()
    bibliography = (ROOT / "docs" / "bibliography.md").read_text()
    for arxiv in ("2510.06954", "2410.09605", "2405.05409", "1312.6120"):
        assert f"arXiv:{arxiv}" in bibliography
    for section in ("## 1.", "## 1b.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert section in science


def test_a_citable_package():
    import tomllib

    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()
    citation = (ROOT / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in citation and f"version: {gflow.__version__}" in citation
    assert (ROOT / "gflow" / "py.typed").is_file()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["authors"]
    assert "Typing :: Typed" in project["classifiers"]
    assert any(dep.startswith("scipy>=") for dep in project["dependencies"])


def test_home_page_snippet_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "index.md").read_text(), re.S)[1]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/index.md", "exec"), scope)
    traj = scope["traj"]
    assert traj.status == "completed"
    # The product a·w grows from 1e-6 to the target (3, 2, 1): the loss falls from 7 through
    # 3 once, and the rank-one product has stable rank 1.
    assert 0 < traj.transitions["escape"] < 20
    np.testing.assert_allclose(traj.observables["rank"][-1], 1.0, rtol=1e-6)


@pytest.mark.slow
def test_notebook_executes(tmp_path):
    """The notebook rendered in the docs runs from top to bottom and finds Saxe's times."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "docs" / "notebooks" / "saxe_modes.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", ()))
    diffs = [float(x) for x in re.findall(r"rel\. diff ([0-9.e+-]+)", printed)]
    assert len(diffs) == 2 and max(diffs) < 1e-7, printed
