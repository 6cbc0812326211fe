"""The notebooks' first code cell sets them up on Google Colab: it clones the repository, installs its
requirements and works from there; anywhere else it does nothing. Run here with the Colab detection
forced on, against a clone of this repository on disk and pip without an index: no network needed."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The notebooks that open with the badge and the set-up cell: all of them.
COLAB_NOTEBOOKS = ["DDPM.ipynb", "toy_diffusion.ipynb", "conditional_diffusion.ipynb", "fmnist_experiments.ipynb"]
BADGE = re.compile(r"\(https://colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/main/([^)]+)\)")


def cells(name):
    return json.loads((REPO / name).read_text())["cells"]


def setup_cell(name):
    return "".join(next(c for c in cells(name) if c["cell_type"] == "code")["source"])


def default_repository(source):
    return re.search(r'"PLAYGROUND_REPOSITORY", "https://github\.com/([^"]+)"', source).group(1)


@pytest.mark.parametrize("name", COLAB_NOTEBOOKS)
def test_notebook_opens_with_a_colab_badge_for_itself_and_the_repository_the_cell_clones(name):
    first = "".join(cells(name)[0]["source"])
    repository, path = BADGE.search(first).groups()
    assert path == name
    assert repository == default_repository(setup_cell(name))


def test_every_notebook_has_the_same_setup_cell():
    sources = {name: setup_cell(name) for name in COLAB_NOTEBOOKS}
    assert len(sources) > 1 and len(set(sources.values())) == 1, "the Colab set-up cells differ between notebooks"


def run_setup_cell(workdir, force_colab, then=""):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYGROUND_")}
    if force_colab:
        # pip without an index (everything is installed already) and with a log: that it ran, and on what
        env.update(PLAYGROUND_FORCE_COLAB="1", PLAYGROUND_REPOSITORY=REPO.as_uri(), PIP_NO_INDEX="1",
                   PIP_LOG=str(Path(workdir) / "pip.log"))
    return subprocess.run([sys.executable, "-c", setup_cell("DDPM.ipynb") + "\n" + then], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


def test_setup_cell_on_colab_clones_the_repository_installs_its_requirements_and_imports_from_it(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("needs the repository's git history to clone from")
    done = run_setup_cell(tmp_path, force_colab=True,
                          then="import experiment, DDPM; print('imported', experiment.__file__)")
    assert done.returncode == 0, done.stderr
    clone = tmp_path / "diffusion-playground"
    for needed in ("DDPM.py", "experiment.py", "data.py", "requirements.txt", "data/ddpm_mnist_ema.pt"):
        assert (clone / needed).exists(), needed
    assert f"imported {clone / 'experiment.py'}" in done.stdout
    assert f"Colab: the repository's code and data/ are in {clone}" in done.stdout
    assert "requirements.txt" in (tmp_path / "pip.log").read_text()  # pip ran on the clone's requirements
    again = run_setup_cell(clone, force_colab=True)   # run a second time: it stays where it is
    assert again.returncode == 0 and not (clone / "diffusion-playground").exists()


def test_setup_cell_elsewhere_changes_nothing(tmp_path):
    done = run_setup_cell(tmp_path, force_colab=False)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []
    assert done.stdout.startswith("local:")
