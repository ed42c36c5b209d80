"""The notebooks: committed without outputs, generated from notebooks/_build.py, and running top to bottom on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_gallery", "03_training", "04_performance"]
# Seconds a single cell may run at the notebooks' CPU sizes before the test fails.
CELL_TIMEOUT_S = 300

by_name = pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)


def test_every_notebook_is_there():
    assert [path.stem for path in NOTEBOOKS] == EXPECTED


@by_name
def test_committed_without_outputs(path):
    notebook = json.loads(path.read_text())
    for number, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {number} has outputs"
            assert cell["execution_count"] is None, f"{path.name} cell {number} has an execution count"


def test_notebooks_match_their_source():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS_DIR / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert sorted(build.NOTEBOOKS) == EXPECTED
    assert build.main(["--check"]) == 0, "a notebook differs from notebooks/_build.py: run python notebooks/_build.py"


@by_name
def test_runs_top_to_bottom(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    # A kernel of this very interpreter (the project's environment), whatever kernels the machine has registered.
    kernel_dir = tmp_path / "kernels" / "flexattn-jax-tests"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "flexattn_jax tests",
                "language": "python",
            }
        )
    )
    kernels = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    manager = KernelManager(kernel_name="flexattn-jax-tests", kernel_spec_manager=kernels)

    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},  # the notebooks run in their folder, as in Jupyter
    )
    # The package of this checkout, whether or not the environment has it installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client.execute(cleanup_kc=True, env=env)
