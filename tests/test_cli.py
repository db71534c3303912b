"""The `dali-ba` command line, run for real (in-process through main, and once as a subprocess)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from dali_ba.cli import main


def test_show_writes_a_grid_with_a_row_per_image_and_a_column_per_view(image_folder, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["show", "--root", str(image_folder), "--views", "3", "--images", "2", "--image-size", "32",
                 "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    grid = Image.open(out)
    # scale 3 (96 // 32) → 96-px cells; 1 eval column + 3 views; 2 rows
    assert grid.size == (110 + 4 * (96 + 4), 20 + 2 * (96 + 4))


def test_user_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["show", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image folder not found" in err[0] and "missing" in err[0]


def test_console_script_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "dali_ba.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("data", "show", "train"):
        assert command in result.stdout


def _cells(grid, row: int, columns: int, cell: int = 96):
    """The (eval + views) cells of one grid row as uint8 arrays."""
    import numpy as np

    pixels = np.asarray(grid.convert("RGB"))
    y = 20 + row * (cell + 4)
    return [pixels[y:y + cell, 110 + c * (cell + 4):110 + c * (cell + 4) + cell] for c in range(columns)]


def test_show_draws_cutout_holes_and_rand_augment_differently_in_every_view(tmp_path):
    import numpy as np

    root = tmp_path / "flat"
    for i in range(4):
        (root / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), (60 + 30 * i, 120, 200 - 30 * i), np.uint8)).save(
            root / f"class_{i % 2}" / f"{i}.jpg", quality=95)
    common = ["show", "--root", str(root), "--views", "4", "--images", "2", "--image-size", "32", "--augment",
              "cifar", "--pad", "0"]
    assert main([*common, "--cutout", "12", "--out", str(tmp_path / "cutout.png")]) == 0
    grid = Image.open(tmp_path / "cutout.png")
    for row in range(2):
        eval_cell, *views = _cells(grid, row, 5)
        assert not (eval_cell.max(axis=2) < 8).any()  # no hole in the reference column
        holes = []
        for view in views:
            black = view.max(axis=2) < 8  # the hole, filled with 0 (black at mean 0 / std 1)
            rows, cols = np.nonzero(black)
            assert black.sum() >= (6 * 3) ** 2  # at least a quarter of a 12-px hole, 3× upscaled
            holes.append((rows.min(), cols.min(), rows.max(), cols.max()))
        assert len(set(holes)) > 1  # each view has its own hole
    assert main([*common, "--rand-augment", "2,9", "--out", str(tmp_path / "ra.png")]) == 0
    for row in range(2):
        eval_cell, *views = _cells(Image.open(tmp_path / "ra.png"), row, 5)
        changed = [not (np.array_equal(v, eval_cell) or np.array_equal(v, eval_cell[:, ::-1])) for v in views]
        assert sum(changed) >= 2
    with pytest.raises(SystemExit) as usage:  # argparse: a usage error, exit status 2
        main([*common, "--rand-augment", "2", "--out", str(tmp_path / "x.png")])
    assert usage.value.code == 2
