"""The notebooks in notebooks/ run top to bottom without error: CI executes them here.

Each notebook runs in a fresh kernel of the interpreter running pytest (the venv), so it
sees the same fedsp, the same environment (simulated devices, ``FEDSP_DATA_DIR``) and the
default model asset that ``make test`` fetched. Executed copies are not written back.
"""

from __future__ import annotations

import json
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# The slowest cell (compiling the sampler on a loaded 2-core CPU) takes about a minute;
# a cell 5x slower than that is stuck.
CELL_TIMEOUT_S = 300
KERNEL_NAME = "python3"


def test_notebooks_are_present_and_clean():
    names = {path.name for path in NOTEBOOKS}
    assert {"01_core_functions.ipynb", "02_one_federated_round.ipynb", "03_results.ipynb"} <= names
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == KERNEL_NAME, path.name
        errors = [
            cell.id
            for cell in nb.cells
            if cell.cell_type == "code"
            for out in cell.get("outputs", [])
            if out.output_type == "error"
        ]
        assert not errors, f"{path.name} is committed with errors in cells {errors}"


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> pathlib.Path:
    """A JUPYTER_PATH whose python3 kernel is this interpreter, so a python3 kernelspec
    installed elsewhere (user or system Jupyter) cannot take its place."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (fedsp tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path, kernel_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # silences jupyter_core's path notice
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    # Raises CellExecutionError (with the cell's source and traceback) at the first error.
    client.execute()
    ran = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert ran and all(cell.get("execution_count") for cell in ran)
