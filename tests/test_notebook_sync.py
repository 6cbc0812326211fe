"""One source of truth: DDPM.py must be exactly the cells of DDPM.ipynb marked `#| export`; and every
stored notebook is one clean top-to-bottom run."""

import ast
import json
import re
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


def test_ddpm_py_is_the_notebooks_export_cells_in_order_and_nothing_else():
    """Read without export_module: DDPM.py's `# from DDPM.ipynb, cell N` headers are exactly the code
    cells that start with `#| export`, in order, each cell's code is in DDPM.py as written, and every
    top-level definition of DDPM.py comes from one of them."""
    cells = json.loads((REPO / "DDPM.ipynb").read_text())["cells"]
    sources = {i: "".join(c["source"]) for i, c in enumerate(cells) if c["cell_type"] == "code"}
    exported = {i: s.split("\n", 1)[1].strip("\n") for i, s in sources.items() if s.startswith("#| export\n")}
    module = (REPO / "DDPM.py").read_text()
    assert [int(n) for n in re.findall(r"^# from DDPM\.ipynb, cell (\d+)", module, flags=re.M)] == sorted(exported)
    for index, code in exported.items():
        assert code in module, f"cell {index} of DDPM.ipynb is not in DDPM.py as written"
    names = {node.name for node in ast.parse(module).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert {"linear_beta_schedule", "cosine_beta_schedule", "Unet", "GaussianDiffusion"} <= names
    for name in names:
        assert any(f"def {name}(" in code or f"class {name}(" in code for code in exported.values()), name


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
