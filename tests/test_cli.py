"""The `dali-ba` command line, run for real (in-process through main, and once as a subprocess)."""
from __future__ import annotations

import subprocess
import sys

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
