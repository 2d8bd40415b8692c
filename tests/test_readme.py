"""The README's library example runs and learns what it claims."""

import re
from pathlib import Path

import numpy as np


def test_readme_custom_flow_example(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(import gflow.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    traj = scope["traj"]
    assert traj.status == "completed"
    # β = u ⊙ v fits y = X β* with β* = (2, 1, 0, …): sparse, as from a small init.
    np.testing.assert_allclose(traj.observables["beta"][-1][:2], [2.0, 1.0], atol=1e-3)
    assert np.all(np.abs(traj.observables["beta"][-1][2:]) < 1e-3)
    t = traj.transitions["first_weight_learned"]
    assert 0 < t < 50
    assert (tmp_path / "runs" / "diagonal" / "summary.json").is_file()
