"""The docs' figures (docs/figures.py) are drawn from the stored result files; a bad file is named."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))

import figures  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_every_figure_is_drawn_from_the_stored_results(tmp_path):
    from PIL import Image

    drawn = figures.build_all(tmp_path)
    assert sorted(p.name for p in drawn) == sorted(figures.figures())
    for path in drawn:
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path
        with Image.open(path) as image:
            width, height = image.size
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert width >= 800 and height >= 400, (path.name, image.size)
        # a blank or single-line picture has a handful of colours; plots with several series have hundreds
        assert colours is None or len(colours) > 200, (path.name, len(colours))
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"
    # up to date: nothing is redrawn until a source changes
    assert figures.build_all(tmp_path) == []


def test_figures_draw_what_the_files_hold():
    points = figures.kernel_points(figures.KERNELS_JSON)
    panels = figures.kernel_panels(points)
    # a (loss, D) measured at one N only draws no line: it is left to the tables
    assert panels and all(len({p["n"] for p in points if (p["loss"], p["d"]) == key}) >= 2 for key in panels)
    single = {(p["loss"], p["d"]) for p in points} - set(panels)
    assert all(len({p["n"] for p in points if (p["loss"], p["d"]) == key}) == 1 for key in single)
    for folder in figures.ROSMAP_GRIDS:
        grid = figures.rosmap_grid(folder)
        stored = json.loads((folder / "m3col.json").read_text())
        assert grid["acc"]["m3col"]["final"] == (stored["protocols"]["final"]["acc"]["mean"], stored["protocols"]["final"]["acc"]["std"])
        assert grid["published"]["M3CoL (paper, 5 runs)"] == (0.887, 0.0094)
    run = figures.rosmap_histories(figures.ROSMAP_CURVES)
    results = json.loads((figures.ROSMAP_CURVES / "results.json").read_text())
    assert len(run["seeds"]) == len(results["seeds"]) and len(run["seeds"][0]["epoch"]) == results["config"]["epochs"]


def _stored_copy(root: Path) -> Path:
    """The result files the figures read, copied under ``root`` (for corrupting one)."""
    for folder in (*figures.ROSMAP_GRIDS, figures.ROSMAP_CURVES):
        shutil.copytree(folder, root / folder.relative_to(ROOT))
    kernels = root / figures.KERNELS_JSON.relative_to(ROOT)
    kernels.parent.mkdir(parents=True)
    shutil.copy(figures.KERNELS_JSON, kernels)
    return root


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


KERNELS = figures.KERNELS_JSON.relative_to(ROOT)
GRID = figures.ROSMAP_GRIDS[0].relative_to(ROOT)
CURVES = figures.ROSMAP_CURVES.relative_to(ROOT)
CASES = {
    "kernels: not JSON": (KERNELS, lambda p: p.write_text('{"results": ['), "kernels", "not a readable JSON file"),
    "kernels: a figure without N": (KERNELS, lambda p: _edit_json(p, lambda d: d["results"][0].pop("n")), "kernels", "missing field results/0/n"),
    "kernels: a time that is text": (KERNELS, lambda p: _edit_json(p, lambda d: d["results"][0].update(times_s=["fast"])), "kernels",
                                     "results/0/times_s must be a finite number"),
    "grid: a protocol without its mean": (GRID / "m3col.json", lambda p: _edit_json(p, lambda d: d["protocols"]["final"]["acc"].pop("mean")), "grid",
                                          "missing field protocols/final/acc/mean"),
    "grid: a listed method without its file": (GRID / "concat.json", lambda p: p.unlink(), "grid", "result file not found"),
    "curves: a seed without history": (CURVES / "seeds" / "seed1.json", lambda p: _edit_json(p, lambda d: d.pop("history")), "curves",
                                       "missing field history"),
    "curves: ragged history": (CURVES / "seeds" / "seed0.json", lambda p: _edit_json(p, lambda d: d["history"]["val_acc"].pop()), "curves",
                               "must be lists of one common, non-zero length"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_result_file_is_named(tmp_path, case):
    relative, corrupt, reader, message = CASES[case]
    root = _stored_copy(tmp_path)
    corrupt(root / relative)
    read = {
        "kernels": lambda: figures.kernel_points(root / KERNELS),
        "grid": lambda: figures.rosmap_grid(root / GRID),
        "curves": lambda: figures.rosmap_histories(root / CURVES),
    }[reader]
    with pytest.raises(figures.ResultFileError, match=message) as caught:
        read()
    assert str(root / relative) in str(caught.value)


def test_build_all_names_every_bad_file_and_keeps_no_stale_picture(tmp_path):
    root = tmp_path / "tree"
    kernels = root / KERNELS
    kernels.parent.mkdir(parents=True)
    kernels.write_text("not json")
    out = tmp_path / "figures"
    out.mkdir()
    stale = out / "kernels_time.png"
    stale.write_bytes(PNG_SIGNATURE)  # drawn from an earlier, sound version of the file
    os.utime(stale, (kernels.stat().st_mtime - 60,) * 2)
    with pytest.raises(figures.ResultFileError) as caught:
        figures.build_all(out, root=root)
    text = str(caught.value)
    assert f"{kernels}: not a readable JSON file" in text
    assert f"{root / GRID}: result folder not found" in text
    assert f"{root / CURVES / 'results.json'}: result file not found" in text
    assert not stale.exists(), "a picture of results that no longer read was kept"
