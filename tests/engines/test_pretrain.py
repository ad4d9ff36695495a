"""End-to-end stage-1 pre-training on tiny NIfTI studies: training, metrics, kill and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medmap.config import load_config
from medmap.engines.pretrain import run_pretraining
from medmap.text.encoder import FrozenTextEncoder
from tests.helpers.tiny_studies import MODS, make_tiny_brain_data

@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_brain_data(tmp_path_factory.mktemp("tiny"), n=10, n_val=3)


def _overrides(data: Path, steps: int, every: int) -> list[str]:
    return [
        f"data.organs=[{data.parent / 'brain_tiny.yaml'}]",
        f"training.steps={steps}",
        f"training.ckpt_every_steps={every}",
    ]


def test_pretrain_end_to_end_never_runs_the_text_encoder_in_the_loop(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("tiny", "pretrain", _overrides(data, 6, 3) + [f"text.cache_dir={tmp_path / 'text'}"])
    started = {"training": False}
    real_encode, real_step = FrozenTextEncoder.encode, torch.optim.AdamW.step
    calls = []

    def encode(self, texts):
        if started["training"]:
            raise AssertionError("the text encoder ran inside the training loop")
        calls.append(len(texts))
        return real_encode(self, texts)

    def step(self, *a, **k):
        started["training"] = True
        return real_step(self, *a, **k)

    monkeypatch.setattr(FrozenTextEncoder, "encode", encode)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run = tmp_path / "run"
    metrics = run_pretraining(cfg, data, run)
    assert calls, "texts should have been embedded before training"
    assert started["training"]
    for name in ("config.yaml", "log.csv", "metrics/pretrain_val.json", "metrics/pretrain_val.md",
                 "checkpoints/last/model.safetensors", "checkpoints/last/state.pt", "checkpoints/best/model.safetensors"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    assert set(metrics["retrieval"]) <= set(MODS) and metrics["retrieval"]
    assert 0.0 <= metrics["mean_v2t_R@1"] <= 1.0 and "mean_v2t_R@1_chance" in metrics
    assert metrics["zero_shot"]["brain"]["n"] == 3
    assert torch.load(run / "checkpoints/last/state.pt", weights_only=True)["step"] == 6
    # second run on the same cache: the encoder is never even called
    started["training"] = False
    n_calls = len(calls)
    run_pretraining(load_config("tiny", "pretrain", _overrides(data, 1, 1) + [f"text.cache_dir={tmp_path / 'text'}"]), data, tmp_path / "run2")
    assert len(calls) == n_calls


def _cli(data: Path, out: Path, overrides: list[str], resume: bool = False) -> list[str]:
    cmd = ["pretrain", "--data", str(data), "--config", "tiny", "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + (["--resume"] if resume else [])


@pytest.fixture(scope="module")
def text_dir(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text cache already holding every text of ``data`` (so subprocesses never load the encoder)."""
    from medmap.data.studylist import read_study_list
    from medmap.engines.pretrain import study_texts
    from medmap.run_config import TextSection
    from medmap.text.cache import run_text_cache
    from medmap.text.prompts import TextTable, build_text_bank

    root = tmp_path_factory.mktemp("text")
    cache = run_text_cache(TextSection(cache_dir=str(root)), root)
    TextTable(study_texts(read_study_list(data)), cache)
    build_text_bank(data.parent / "brain_tiny.yaml", cache)
    return root


def test_kill_and_resume_gives_the_same_run(
    data: Path, text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medmap.cli.main import main

    # one thread everywhere, so that the in-process runs compute bit-for-bit like the subprocess
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _kill_and_resume(data, text_dir, tmp_path, main)
    finally:
        torch.set_num_threads(threads)


def _kill_and_resume(data: Path, text_dir: Path, tmp_path: Path, main) -> None:
    steps = 12
    aug = "data.augment={enabled: true, flip: {prob: 0.5}, noise: {prob: 0.5, std: 0.05}, scale_shift: {prob: 0.5}}"
    ov = _overrides(data, steps, 2) + [f"text.cache_dir={text_dir}", aug]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medmap.cli.main", *_cli(data, killed, ov)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 180
    while not (killed / "checkpoints" / "last" / "state.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = torch.load(killed / "checkpoints/last/state.pt", weights_only=True)["step"]
    assert 0 < done < steps

    # resume through the command line (in this process: it reads RUN_DIR/config.yaml)
    assert main(_cli(data, killed, [], resume=True)) == 0
    assert torch.load(killed / "checkpoints/last/state.pt", weights_only=True)["step"] == steps
    steps_logged = [int(line.split(",")[0]) for line in (killed / "log.csv").read_text().splitlines()[1:]]
    assert steps_logged[:steps] == list(range(1, steps + 1))  # no duplicates from the killed run
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]

    # an uninterrupted run ends with the same weights: same data order, same steps
    full = tmp_path / "full"
    assert main(_cli(data, full, ov)) == 0
    a = load_file(killed / "checkpoints/last/model.safetensors")
    b = load_file(full / "checkpoints/last/model.safetensors")
    for k in a:  # bit-identical, augmentation and dropout included
        assert torch.equal(a[k], b[k]), k
    # starting again into a finished run folder without --resume is refused
    assert main(_cli(data, full, ov)) == 2


@pytest.mark.parametrize("name", ["default", "tiny", "coarse", "liver_lesion", "brain_4mm"])
def test_shipped_pretrain_configs_build(name: str) -> None:
    from medmap.config import load_config, load_organ_config
    from medmap.models.pretrain import build_pretrain_model

    cfg = load_config(name, "pretrain")
    organs = {o.name: o for o in map(load_organ_config, cfg["data"]["organs"])}
    model = build_pretrain_model(cfg, organs, text_dim=384)
    for organ in organs.values():
        x = torch.zeros(1, 1, *organ.roi_size)
        out = model.encoders(x, organ.modalities[0])
        assert out.pooled.shape == (1, model.encoders.dim)
    if name == "coarse":  # CPU-sized organs
        assert organs["brain"].roi_size == (40, 48, 40) and organs["liver"].roi_size == (48, 48, 32)


def test_stage_1_without_findings_is_a_clear_error(data: Path, tmp_path: Path) -> None:
    import json

    from medmap.errors import StudyListError

    bare = tmp_path / "bare.jsonl"
    lines = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    for obj in lines:
        obj.pop("findings", None)
        obj["modalities"] = {m: str((data.parent / p).resolve()) for m, p in obj["modalities"].items()}
    bare.write_text("".join(json.dumps(o) + "\n" for o in lines))
    cfg = load_config("tiny", "pretrain", _overrides(data, 2, 2))
    with pytest.raises(StudyListError, match="has findings; stage 1 pairs every sequence") as e:
        run_pretraining(cfg, bare, tmp_path / "run")
    assert "bare.jsonl" in str(e.value) and not (tmp_path / "run" / "checkpoints").exists()
