"""``freehandus simulate sweep``: output folder, checks before work, bad numbers, progress."""

from __future__ import annotations

import pytest

from FreehandUSApp.cli import main
from FreehandUSLib.io import read_sequence

SMALL = ["--frames", "3", "--rows", "32", "--cols", "32", "--length-mm", "1", "--scatterers-per-cell", "2"]


def test_simulate_sweep_into_a_folder(tmp_path, capsys):
    assert main(["simulate", "sweep", "--out", f"{tmp_path / 'session'}/", *SMALL]) == 0
    assert read_sequence(tmp_path / "session" / "sweep.igs.mha").n_frames == 3
    assert main(["simulate", "sweep", "--out", str(tmp_path), *SMALL]) == 0  # an existing folder
    assert (tmp_path / "sweep.igs.mha").is_file()
    capsys.readouterr()


def test_simulate_sweep_checks_its_arguments_before_simulating(tmp_path, capsys, monkeypatch):
    from FreehandUSLib.simulation import sweep

    def no_work(*args, **kwargs):
        raise AssertionError("simulated although the output cannot be written")

    monkeypatch.setattr(sweep, "simulate_sweep", no_work)
    assert main(["simulate", "sweep", "--out", str(tmp_path / "x.bmp"), *SMALL]) == 2
    assert "unknown file type" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["simulate", "sweep", "--out", str(tmp_path / "x.igs.mha"), "--config-out",
                 str(tmp_path / "a_file" / "c.json"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--config-out" in err and "not a folder" in err and err.count("\n") == 1
    assert main(["simulate", "sweep", "--out", str(tmp_path / "a_file" / "x.igs.mha"), *SMALL]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--frames", "1"], ["--rows", "0"], ["--fps", "0"], ["--fps", "nan"],
                                   ["--depth-mm", "-5"], ["--length-mm", "inf"], ["--seed", "-1"],
                                   ["--scatterers-per-cell", "0"], ["--frequency-mhz", "nan"],
                                   ["--depth-mm", "1e-300"],  # was a ValueError traceback
                                   ["--elevation-sigma-mm", "1e-300"],  # was a numba TypingError traceback
                                   ["--seed", "99999999999999999999999"]])
def test_simulate_sweep_bad_numbers_are_refused_by_the_parser(tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "sweep", "--out", str(tmp_path / "x.igs.mha"), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {extra[0]}" in err


@pytest.mark.parametrize("flag, shown", [(None, False), ("--progress", True)])
def test_simulate_sweep_progress_only_on_request_or_a_terminal(tmp_path, capsys, flag, shown):
    assert main(["simulate", "sweep", "--out", str(tmp_path / "x.igs.mha"), *SMALL, *([flag] if flag else [])]) == 0
    assert ("simulate:" in capsys.readouterr().err) == shown
