"""One source of truth: DDPM.py must be exactly the cells of DDPM.ipynb marked `#| export`."""

import ast
from pathlib import Path

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
