"""The README's result tables are the stored results: each table pasted or typed into it is checked
against the file or the notebook output it was taken from, so that a re-run which changes a number
fails here until the README shows the new one. (The speed tables are checked in test_benchmark.py.)"""

import json
import re
from pathlib import Path

import pytest

import experiment

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def table_lines(lines, start):
    """The lines of the Markdown table whose header row is lines[start]: up to the first line that
    is not a table row."""
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def readme_table(header_start):
    """The body rows of the one README table whose header row starts with `header_start`, each a list
    of its cells with the bold and code markup removed."""
    lines = README.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header_start)]
    assert len(starts) == 1, f"{len(starts)} README tables start with {header_start!r}"
    body = table_lines(lines, starts[0])[2:]  # past the header and its |---| rule
    return [[re.sub(r"[*`]", "", cell).strip() for cell in line.strip().strip("|").split("|")] for line in body]


def agrees(shown, value, source_places=None):
    """A number as the README shows it ("1,240", "98.0%", "46.8") equals `value` to the digits shown:
    within half a unit of its last digit, plus half a unit of the source's last printed digit when the
    source was itself rounded (`source_places` decimals)."""
    text = shown.replace(",", "").rstrip("%")
    places = len(text.split(".")[1]) if "." in text else 0
    slack = 0.5 * 10.0 ** -places + (0.5 * 10.0 ** -source_places if source_places is not None else 0)
    return abs(float(text) - value) <= slack + 1e-9


def test_agrees_reads_the_shown_digits():
    assert agrees("70.9", 70.85, source_places=2) and agrees("70.8", 70.85, source_places=2)
    assert not agrees("70.7", 70.85, source_places=2)
    assert agrees("1,240", 1240) and not agrees("1,240", 1241)
    assert agrees("100%", 99.96) and not agrees("100.0%", 99.9)
    assert agrees("12.66", 12.664) and not agrees("12.66", 12.67)


@pytest.mark.parametrize("kept", ["data/DDPM_sampler_frontier.json", "data/fmnist_sampler_frontier.json"])
def test_the_readme_shows_each_stored_frontier_as_frontier_table_writes_it(kept):
    table = experiment.frontier_table(json.loads((REPO / kept).read_text())).strip()
    assert table in README, f"the README's frontier table for {kept} is not frontier_table's"


def test_the_readme_shows_the_fashion_mnist_study_table_as_the_notebook_wrote_it():
    assert (REPO / "data" / "fmnist_results.md").read_text().strip() in README


def test_the_readme_lever_table_is_the_kept_lever_study():
    """Steps, FID, confident share and the class shares of each run, against data/fmnist_levers.md
    (which holds 4 significant digits)."""
    kept = {r["run"]: r for r in experiment.read_table(REPO / "data" / "fmnist_levers.md")}
    rows = readme_table("| run | change | steps | FID | confident | class share min / max |")
    assert sorted(r[0] for r in rows) == sorted(kept), "the README's lever table has other runs than the kept study"
    for run, _change, steps, fid, confident, shares in rows:
        r = kept[run]
        low, high = shares.split(" / ")
        assert agrees(steps, r["steps"]), (run, "steps", steps)
        assert agrees(fid, r["fid"], source_places=2), (run, "FID", fid)
        assert agrees(confident, 100 * r["confident_share"], source_places=1), (run, "confident", confident)
        assert agrees(low, 100 * r["class_share_min"], source_places=1), (run, "class share min", low)
        assert agrees(high, 100 * r["class_share_max"], source_places=1), (run, "class share max", high)


SWEEP_LINE = re.compile(r"^(mnist|fashion_mnist)\s+w=(\S+)\s+requested ([\d.]+)\s+FID\s+([\d.]+) \(floor ([\d.]+)\)")


def stored_guidance_sweep():
    """{(dataset, w): (requested share, FID, floor)} as printed by the guidance sweep cell of
    conditional_diffusion.ipynb in its stored (full-budget) run."""
    notebook = json.loads((REPO / "conditional_diffusion.ipynb").read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith("W_SWEEP =")]
    assert len(cells) == 1, "conditional_diffusion.ipynb has no single guidance sweep cell"
    text = "".join("".join(out.get("text", "")) for out in cells[0]["outputs"])
    sweep = {}
    for match in map(SWEEP_LINE.match, text.splitlines()):
        if match:
            dataset, w, requested, fid, floor = match.groups()
            sweep[dataset, float(w)] = (float(requested), float(fid), float(floor))
    return sweep


def test_the_readme_guidance_sweep_table_is_the_notebooks_stored_sweep():
    sweep = stored_guidance_sweep()
    assert len(sweep) == 20, f"the stored sweep has {len(sweep)} lines, not 10 scales for each dataset"
    header = "| w | MNIST requested | MNIST FID (floor "
    floors = re.search(re.escape(header) + r"([\d.]+)\) \| Fashion requested \| Fashion FID \(floor ([\d.]+)\) \|", README)
    assert floors, "the README's guidance sweep table has another header"
    for dataset, shown in zip(("mnist", "fashion_mnist"), floors.groups()):
        assert agrees(shown, sweep[dataset, 0.0][2], source_places=2), (dataset, "floor", shown)
    rows = readme_table(header)
    assert len(rows) >= 5
    for w, mnist_requested, mnist_fid, fashion_requested, fashion_fid in rows:
        for dataset, requested, fid in (("mnist", mnist_requested, mnist_fid), ("fashion_mnist", fashion_requested, fashion_fid)):
            stored_requested, stored_fid, _ = sweep[dataset, float(w)]
            assert agrees(requested, 100 * stored_requested, source_places=1), (dataset, w, "requested", requested)
            assert agrees(fid, stored_fid, source_places=2), (dataset, w, "FID", fid)
