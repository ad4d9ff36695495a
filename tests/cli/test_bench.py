"""``medmap bench`` / ``medmap.benchmark``: the pieces its figures rest on (the full run is a
multi-minute measurement, not a test)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

from medmap import benchmark as perf
from medmap.cli import bench
from medmap.cli.main import build_parser
from medmap.models.encoders import PatchEmbed3d, build_encoder

TINY_VIT = {"type": "vit", "dim": 16, "depth": 1, "heads": 2, "patch_size": 4, "stem_channels": 0}
TINY_CNN = {"type": "cnn", "channels": [4], "subunits": 1, "dim": 8, "stem_patch": 2, "stem_channels": 4}


@pytest.mark.parametrize("arch", [TINY_VIT, TINY_CNN])
def test_naive_conv_patch_embedding_computes_the_same_encoder(arch: dict) -> None:
    torch.manual_seed(0)
    enc = build_encoder(arch, (8, 12, 8))
    x = torch.randn(2, 1, 8, 12, 8)
    ref = enc(x).tokens.detach()
    swapped, diff = perf.swap_to_conv_patch_embedding(enc)
    assert swapped == 1 and diff < 1e-5
    assert not any(isinstance(m, PatchEmbed3d) for m in enc.modules())
    assert any(isinstance(m, torch.nn.Conv3d) and m.stride == m.kernel_size != (1, 1, 1) for m in enc.modules())
    torch.testing.assert_close(enc(x).tokens, ref, rtol=1e-4, atol=1e-5)


def test_flop_count_and_timing_helpers() -> None:
    lin = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32)
    assert perf.count_flops(lambda: lin(x)) == 2 * 8 * 32 * 16
    # backward: the weight gradient, plus the input gradient once the input needs one
    assert perf.count_flops(lambda: lin(x).sum().backward()) == 2 * 2 * 8 * 32 * 16
    assert perf.count_flops(lambda: lin(x.requires_grad_(True)).sum().backward()) == 3 * 2 * 8 * 32 * 16
    t = perf.time_calls(lambda: lin(x), iters=3, warmup=1)
    assert t["n"] == 3 and 0 < t["min_s"] <= t["median_s"]
    with perf.peak_rss() as mem:
        torch.ones(1 << 20)
    assert mem["peak_rss_mb"] > 0


def test_synthetic_study_and_run_folder_are_readable(tmp_path: Path) -> None:
    # a tiny stage-2 set-up stands in for the default config (whose model is minutes of CPU here)
    setup = perf.FinetuneSetup("brain", ["encoder.arch=cnn_small"])
    setup.organ = dataclasses.replace(setup.organ, roi_size=(32, 32, 32))
    setup.model = perf.build_medmap_classifier(setup.organ, setup.cfg, perf.TEXT_DIM)
    study = perf.write_brain_study(tmp_path / "study", quick=True)
    pred = perf.load_run(perf.make_run_folder(tmp_path / "run", setup), device="cpu").predict(study)
    assert pred.modalities_used == ["t1", "t1ce", "t2", "flair"]
    assert pred.preprocess_seconds > 0 and pred.model_seconds > 0
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5


def test_bench_is_a_medmap_command() -> None:
    args = build_parser().parse_args(["bench", "--quick", "--sections", "peak", "naive", "--json", "x.json"])
    assert args.func is bench.run and args.quick and args.sections == ["peak", "naive"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--sections", "everything"])
    assert isinstance(args, argparse.Namespace)


def test_latency_section_measures_both_studies(tmp_path, monkeypatch):
    # tiny stand-ins for the default models (minutes of CPU here); the 2 mm brain study (--quick)
    from medmap.benchmark import latency

    def tiny_setup(name: str) -> perf.FinetuneSetup:
        if name != "brain":
            return perf.FinetuneSetup(name)  # the liver lesion model is small already
        setup = perf.FinetuneSetup("brain", ["encoder.arch=cnn_small"])
        setup.organ = dataclasses.replace(setup.organ, roi_size=(32, 32, 32))
        setup.model = perf.build_medmap_classifier(setup.organ, setup.cfg, perf.TEXT_DIM)
        return setup

    monkeypatch.setattr(latency, "FinetuneSetup", tiny_setup)
    res: dict = {}
    latency.section_latency(res, argparse.Namespace(quick=True, iters=1))
    out = res["latency"]
    assert out["torch_threads"] == torch.get_num_threads() and out["gzip_backend"] in ("isal", "zlib")
    for organ, target in (("brain", latency.BRAIN_TARGET_S), ("liver", latency.LIVER_TARGET_S)):
        r = out[organ]
        assert r["target_s"] == target and r["meets_target"] == (r["total_s"] <= target)
        assert r["n"] == 1 and r["total_s"] > 0 and r["cold_s"] > 0
        assert set(r["stages"]) == {"read_decompress_s", "checks_s", "geometry_s", "mask_normalise_s", "model_s",
                                    "other_s"}
        assert all(v >= 0 for v in r["stages"].values())


def test_step_costs_section_is_registered_and_its_augmentation_timing_runs() -> None:
    from medmap.benchmark import step_costs
    from medmap.benchmark.sections import USER_WAIT_SECTIONS

    assert "step_costs" in bench.ALL_SECTIONS and "step_costs" in USER_WAIT_SECTIONS
    times = step_costs._augmentation(1)
    assert times["medmap_ms"] > 0 and times["torchio_ms"] > 0
    out = step_costs._torchio_augment(step_costs._lesion_study())
    assert out.shape == (8, 24, 24, 16)


def test_step_costs_times_the_brain_trunks_with_both_max_pools() -> None:
    from medmap.benchmark import step_costs

    pool = step_costs._brain_max_pool(1)
    assert pool["pools"] == 4  # one per sequence's DenseNet trunk
    assert pool["separable_ms_per_study"] > 0 and pool["native_ms_per_study"] > 0


def test_step_costs_times_the_brain_model_against_the_densenet_baseline() -> None:
    from medmap.benchmark import step_costs

    vs = step_costs._brain_against_densenet(1)
    assert vs["batch"] == 4 and vs["validation_batch"] == 16  # the brain config's batches
    for key in ("medmap_step_ms", "densenet_step_ms", "medmap_validation_ms_per_study",
                "medmap_encoders_validation_ms_per_study", "densenet_validation_ms_per_study"):
        assert vs[key] > 0


def test_step_costs_times_the_brain_model_with_both_instance_norm_kernels() -> None:
    from torch import nn

    from medmap.benchmark import step_costs
    from medmap.benchmark.sections import FinetuneSetup

    setup = FinetuneSetup("brain")
    group_norms = sum(isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels for m in setup.model.modules())
    assert step_costs._as_instance_norms(setup.model) == group_norms > 0
    assert not any(isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels for m in setup.model.modules())
    norm = step_costs._brain_instance_norm(1)
    assert norm["norms"] == group_norms
    for key in ("group_step_ms", "instance_step_ms", "group_val_ms_per_study", "instance_val_ms_per_study"):
        assert norm[key] > 0
