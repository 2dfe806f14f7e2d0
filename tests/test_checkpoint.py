"""Checkpoints that survive corruption: a manifest written last and verified on load, a resume that falls back
to the previous checkpoint, and folders replaced without a moment where neither old nor new exists."""

import json
from pathlib import Path

import pytest
import ray.train
import torch

from owl2.cli import main
from owl2.config import ModelConfig
from owl2.folders import MANIFEST, DamagedFolder, replacing, verify
from owl2.model import Owl2Config, Owl2ForCausalLM
from owl2.train import checkpoint as ckpt
from owl2.train.optim import warmup_cosine


def _model() -> Owl2ForCausalLM:
    torch.manual_seed(0)
    return Owl2ForCausalLM(Owl2Config.from_spec(ModelConfig.from_preset("debug")))


def _optimizer(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return optimizer, warmup_cosine(optimizer, 1, 10, 0.0)


@pytest.fixture(scope="module")
def model():
    return _model()


def _save(folder: Path, model, step: int) -> Path:
    optimizer, scheduler = _optimizer(model)
    return ckpt.save(folder, model, optimizer, scheduler, ckpt.TrainState(stage="stage1", step=step), "name: x\n")


def _load(folder: Path, model) -> ckpt.TrainState:
    optimizer, scheduler = _optimizer(model)
    return ckpt.load_training_state(folder, optimizer, scheduler)


def test_a_checkpoint_carries_a_manifest_written_last_and_loads(tmp_path, model):
    folder = _save(tmp_path / "checkpoint", model, step=7)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["format"] == 1 and manifest["step"] == 7
    expected = {"config.json", "model.safetensors", ckpt.OPTIMIZER_FILE, ckpt.SCHEDULER_FILE, ckpt.STATE_FILE}
    assert expected | {ckpt.EXPERIMENT_FILE} <= set(manifest["files"])  # and whatever save_pretrained adds
    assert set(manifest["files"]) == {path.name for path in folder.iterdir()} - {MANIFEST}
    assert manifest["files"]["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size
    assert _load(folder, model).step == 7
    loaded = Owl2ForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint"]  # no staging folder left


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: _truncate(f / "model.safetensors"), r"model\.safetensors has [\d,]+ bytes; the manifest says"),
        (lambda f: (f / ckpt.OPTIMIZER_FILE).unlink(), r"optimizer\.pt is missing"),
        (lambda f: (f / MANIFEST).write_text('{"format": 1, "files": '), r"owl2_manifest\.json is unreadable"),
        (lambda f: (f / MANIFEST).unlink(), r"owl2_manifest\.json is missing \(it is written last"),
        (lambda f: (f / ckpt.STATE_FILE).write_text('{"stage": "stage1", "step": 9}  '), r"state\.json has"),
    ],
    ids=["truncated-weights", "missing-file", "bad-manifest", "no-manifest", "edited-state"],
)
def test_a_damaged_checkpoint_is_refused_with_one_line_naming_the_folder_and_the_file(tmp_path, model, damage, message):
    folder = _save(tmp_path / "checkpoint", model, step=3)
    damage(folder)
    loads = [lambda: _load(folder, model)]
    if (folder / MANIFEST).exists():  # without a manifest (a released model, an older checkpoint) weights load
        loads.append(lambda: Owl2ForCausalLM.from_pretrained(folder))
    for load in loads:
        with pytest.raises(DamagedFolder, match=f"^checkpoint {folder} is damaged: {message}") as error:
            load()
        assert "\n" not in str(error.value)


def test_a_changed_byte_of_the_same_size_is_found_by_its_hash(tmp_path, model):
    folder = _save(tmp_path / "checkpoint", model, step=3)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(DamagedFolder, match="model.safetensors does not match its sha256"):
        verify(folder)


def test_a_resumed_worker_falls_back_to_the_newest_earlier_checkpoint_that_verifies(tmp_path, model):
    run = tmp_path / "run"
    names = ["checkpoint_2026-12-07_10-00-00.000001", "checkpoint_2026-12-07_10-00-05.000001"]
    names += ["checkpoint_2026-12-07_10-00-09.000001", "checkpoint_2026-12-07_10-00-12.000001"]
    for step, name in enumerate(names, start=1):
        _save(run / name, model, step=2 * step)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own file beside them
    handed = ray.train.Checkpoint(str(run / names[2]))  # the one Ray registered last; names[3]: never registered
    assert ckpt.usable(handed) is handed and ckpt.usable(None) is None

    _truncate(run / names[2] / "model.safetensors")
    fallback = ckpt.usable(ray.train.Checkpoint(str(run / names[2])))
    assert fallback.path == str(run / names[1]) and _load(Path(fallback.path), model).step == 4

    (run / names[1] / ckpt.SCHEDULER_FILE).unlink()
    assert ckpt.usable(ray.train.Checkpoint(str(run / names[2]))).path == str(run / names[0])

    (run / names[0] / MANIFEST).unlink()
    with pytest.raises(DamagedFolder, match="^no checkpoint of this run verifies, so it cannot resume") as error:
        ckpt.usable(ray.train.Checkpoint(str(run / names[2])))
    assert "\n" not in str(error.value) and str(run / names[0]) in str(error.value)


def test_replacing_a_folder_keeps_the_old_one_until_the_new_one_is_complete(tmp_path):
    folder = tmp_path / "out"
    with replacing(folder) as staging:
        (staging / "a.txt").write_text("old")
        (staging / "stale.txt").write_text("stale")
    with pytest.raises(RuntimeError), replacing(folder) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("the writer died")
    assert (folder / "a.txt").read_text() == "old"  # untouched by the failed write
    with replacing(folder, step=5) as staging:
        assert not folder.samefile(staging)
        (staging / "a.txt").write_text("new")
    assert sorted(path.name for path in folder.iterdir()) == ["a.txt", MANIFEST]  # replaced whole
    assert verify(folder)["step"] == 5 and (folder / "a.txt").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_model_convert_replaces_an_existing_folder_whole_and_the_result_verifies(tmp_path, golden_dir, capsys):
    out = tmp_path / "owl2"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"an older, sharded save")
    assert main(["model", "convert", str(golden_dir), "--out", str(out)]) == 0
    assert not (out / "model-00001-of-00002.safetensors").exists() and verify(out)["step"] is None
    _truncate(out / "model.safetensors")
    capsys.readouterr()
    assert main(["model", "convert", str(out), "--out", str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"owl2: error: checkpoint {out} is damaged: model.safetensors has "
        f"{(out / 'model.safetensors').stat().st_size:,} bytes; the manifest says "
        f"{json.loads((out / MANIFEST).read_text())['files']['model.safetensors']['size']:,}"
    )
