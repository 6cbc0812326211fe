"""One source of truth: DDPM.py must be exactly the cells of DDPM.ipynb marked `#| export`; and every
stored notebook is one clean top-to-bottom run."""

import ast
import json
from pathlib import Path

import pytest

import experiment

REPO = Path(__file__).resolve().parent.parent


def test_ddpm_py_is_the_notebook_export():
    generated = experiment.export_module(write=False)
    on_disk = (REPO / "DDPM.py").read_text()
    assert generated == on_disk, (
        "DDPM.py and the exported cells of DDPM.ipynb differ: edit the notebook, then run its last "
        "cell or `python experiment.py export`"
    )


def test_every_public_definition_of_ddpm_py_comes_from_an_exported_cell():
    names = {node.name for node in ast.parse((REPO / "DDPM.py").read_text()).body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert {"linear_beta_schedule", "cosine_beta_schedule", "Unet", "GaussianDiffusion"} <= names
    exported = experiment.export_module(write=False)
    for name in names:
        assert f"def {name}(" in exported or f"class {name}(" in exported, name


NOTEBOOKS = ["toy_diffusion.ipynb", "DDPM.ipynb", "fmnist_experiments.ipynb", "conditional_diffusion.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_notebook_is_one_clean_top_to_bottom_run(name):
    """The stored outputs are one run in a fresh kernel: execution counts 1..N, no errors, and no
    per-cell timestamps (they change on every run and say nothing to a reader)."""
    cells = json.loads((REPO / name).read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not [i for i, c in enumerate(cells) if "execution" in c["metadata"]]
