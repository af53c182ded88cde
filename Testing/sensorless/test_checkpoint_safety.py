"""Model files are read weights-only: a checkpoint that would run code when unpickled is refused."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")

from SensorlessTrackingLib.predict import (  # noqa: E402
    ModelFileError,
    default_model_path,
    load_model,
    read_checkpoint,
)
from SensorlessTrackingLib.train import TrainingError, checkpoint_model_config  # noqa: E402
from sensorless_helpers import run_cli, tiny_model_config  # noqa: E402


class _MakesADirectory:
    """Unpickling this object calls ``os.mkdir(path)``: code run by merely loading the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture
def hostile(tmp_path):
    """(a checkpoint that looks like ours but carries a code-running object, the path its code makes)."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"model_config": tiny_model_config().to_dict(), "state_dict": {}, "payload": _MakesADirectory(marker)},
               path)
    return path, marker


def test_a_checkpoint_that_would_run_code_is_refused(hostile, tmp_path, capsys):
    path, marker = hostile
    for load in (read_checkpoint, load_model, checkpoint_model_config):
        with pytest.raises((ModelFileError, TrainingError), match=r"refused: the file holds a Python object \((posix|nt)\.mkdir\)"):
            load(path)
    missing = tmp_path / "missing.igs.mha"  # the model is refused before the input is read
    assert run_cli(["track", "predict", str(missing), "--model", str(path), "--out", str(tmp_path / "o.igs.mha")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" in err
    assert run_cli(["track", "train", "--simulated", "1", "--init", str(path), "--out", str(tmp_path / "m")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()  # nothing in the file ran
    # the file is hostile indeed: an unrestricted unpickler runs its code
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_a_resumed_run_reads_its_last_checkpoint_weights_only(hostile, tmp_path, capsys):
    path, marker = hostile
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(path.read_bytes())
    assert run_cli(["track", "train", "--simulated", "1", "--out", str(out), "--epochs", "1"]) == 2
    assert "refused" in capsys.readouterr().err and not marker.exists()


def test_the_shipped_model_loads_weights_only():
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"no shipped model at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # what read_checkpoint does
    json.dumps(ckpt["model_config"])  # the architecture is plain JSON
    model = load_model(path)
    assert model.config.name == ckpt["model_config"]["name"]
