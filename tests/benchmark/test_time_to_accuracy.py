"""The time-to-accuracy bench reads a run's log while it runs and stops it at the threshold."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from medmap.benchmark.time_to_accuracy import cnn_config, first_reaching, watch_run
from medmap.run_config import parse_run_config

HEADER = "step,loss,epoch,val_balanced_accuracy,elapsed_s\n"


def test_first_reaching_reads_the_first_validation_over_the_threshold(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text(HEADER + "1,2.0,,,\n50,1.5,0,0.61,12.5\n100,1.1,0,0.93,25.0\n150,0.9,0,0.95,37.5\n")
    r = first_reaching(log, 0.90)
    assert r["reached"] and r["step"] == 100 and r["score"] == 0.93 and r["train_elapsed_s"] == 25.0
    assert r["best"] == 0.95 and r["validations"] == 3
    miss = first_reaching(log, 0.99)
    assert not miss["reached"] and miss["best"] == 0.95


def test_watch_run_stops_the_command_once_the_log_shows_the_threshold(tmp_path: Path) -> None:
    run = tmp_path / "run"
    writer = (  # a "training run" that logs one validation a second and would go on for a minute
        "import sys, time, pathlib\n"
        "p = pathlib.Path(sys.argv[1]); p.mkdir(); f = p / 'log.csv'\n"
        f"f.write_text({HEADER!r})\n"
        "for i in range(60):\n"
        "    time.sleep(0.3)\n"
        "    with f.open('a') as o: o.write(f'{i},1.0,0,{0.5 + 0.1 * i:.2f},{i}\\n')\n"
    )
    t0 = time.perf_counter()
    r = watch_run([sys.executable, "-c", writer, str(run)], run, 0.80, cap_s=30, log=tmp_path / "w.log")
    assert r["reached"] and r["score"] >= 0.80 and time.perf_counter() - t0 < 15
    capped = watch_run([sys.executable, "-c", writer, str(tmp_path / "run2")], tmp_path / "run2", 2.0, cap_s=2,
                       log=tmp_path / "w2.log")
    assert not capped["reached"] and capped["wall_s"] < 10


def test_the_densenet_config_is_a_valid_cnn_baseline_config() -> None:
    cfg = cnn_config("liver", 50)
    typed = parse_run_config(cfg, "cnn_baseline")
    assert typed.training.val_every_steps == 50 and typed.net["name"] == "DenseNet"
    # the baseline follows the task's recipe, weight averaging included
    from medmap.config import load_config
    from medmap.run_config import finetune_config

    assert typed.training.ema_decay == finetune_config(load_config("liver", "finetune")).training.ema_decay
    # --tta-set overrides reach the DenseNet where it shares the value
    over = parse_run_config(cnn_config("liver", 50, ["training.ema_decay=0.9", "training.epochs=3",
                                                     "data.stratified_batches=true"]), "cnn_baseline")
    assert over.training.ema_decay == 0.9 and over.training.epochs == 3 and over.data.stratified_batches
    assert not typed.data.stratified_batches  # the shipped recipes leave it off
