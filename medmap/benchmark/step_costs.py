"""Bench section ``step_costs``: where a lesion-level liver fine-tuning step spends its time.

``python -m medmap.benchmark --sections step_costs`` times, on random inputs of the liver
config's shapes (8 phases of 24 x 24 x 16 voxels, batch 8):

* the training augmentation of one study (``medmap.data.augment``, every transform applied)
  against the same transforms called through TorchIO per study, as earlier versions did;
* the optimiser step of the liver model: PyTorch's default AdamW (a loop per parameter),
  the multi-tensor (``foreach``) one and the fused one that the engines use (:func:`build_adamw`);
* a whole training step with the model's dropout at 0.1 and at 0 (the liver default);
* validation forward passes per study at the training batch and at the default validation
  batch (``training.eval_batch_size``: 4 x 8);
* the brain model's validation forward per study with the DenseNet trunks' max pool as
  :class:`~medmap.models.encoders.SeparableMaxPool3d` (the default) and as ``nn.MaxPool3d``;
* the brain model's training step and validation forward per study with its encoders'
  instance norms on PyTorch's group-norm kernel (:mod:`medmap.models.norms`, the default) and
  on ``nn.InstanceNorm3d``, timed in turns;
* the brain model against the time-to-accuracy DenseNet baseline: a training step (the
  brain config's batch) and the validation forward per study, MedMAP's split into the four
  sequence encoders and the rest (CSA, CCT, heads). This is the per-step side of the brain
  time-to-accuracy gap (docs/performance.md).

Figures are printed and stored in ``res["step_costs"]``; nothing is asserted.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from medmap.benchmark.sections import FinetuneSetup, time_calls
from medmap.data.augment import build_augmentation
from medmap.run_config import eval_batch_size, finetune_config

#: every transform on, with the liver config's strengths
ALL_ON = {"flip": {"prob": 1.0}, "affine": {"prob": 1.0, "degrees": 8, "scales": 0.08, "translation_mm": 4},
          "bias_field": {"prob": 1.0, "coefficients": 0.2}, "scale_shift": {"prob": 1.0},
          "noise": {"prob": 1.0, "std": 0.05}}


def _lesion_study() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randn(8, 24, 24, 16, generator=g), "present": torch.ones(8, dtype=torch.bool),
            "affine": torch.diag(torch.tensor([1.25, 1.25, 2.5, 1.0], dtype=torch.float64)), "study_id": "bench"}


def _torchio_augment(study: dict[str, Any]) -> torch.Tensor:
    """The same transforms through TorchIO, one subject per study (the earlier implementation)."""
    import torchio as tio

    a = ALL_ON["affine"]
    pipeline = tio.Compose([
        tio.RandomFlip(axes=(0,), flip_probability=1.0),
        tio.RandomAffine(scales=a["scales"], degrees=a["degrees"], translation=a["translation_mm"], default_pad_value=0.0),
        tio.RandomBiasField(coefficients=ALL_ON["bias_field"]["coefficients"]),
        tio.RandomNoise(std=(0.0, ALL_ON["noise"]["std"])),
    ])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        subject = tio.Subject(study=tio.ScalarImage(tensor=study["images"].clone(), affine=study["affine"].numpy()))
        return pipeline(subject)["study"].data


def _augmentation(iters: int) -> dict[str, float]:
    study = _lesion_study()
    ours = build_augmentation(ALL_ON, seed=0)
    return {"medmap_ms": 1000 * time_calls(lambda: ours(study), 5 * iters)["median_s"],
            "torchio_ms": 1000 * time_calls(lambda: _torchio_augment(study), 5 * iters)["median_s"]}


def _optimizers(iters: int) -> dict[str, float]:
    setup = FinetuneSetup("liver")
    for p in setup.model.parameters():
        p.grad = torch.randn_like(p)
    out = {}
    for name, kwargs in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        groups = setup.model.parameter_groups(3e-4, 0.05)  # fresh groups: an optimiser writes its options into them
        opt = torch.optim.AdamW(groups, lr=3e-4, **kwargs)
        out[f"{name}_ms"] = 1000 * time_calls(opt.step, 5 * iters)["median_s"]
    return out


def _dropout_and_validation(iters: int) -> dict[str, float]:
    out = {}
    for dropout in (0.1, 0.0):
        setup = FinetuneSetup("liver", [f"model.dropout={dropout}"])
        batch = setup.random_batch()
        out[f"step_dropout_{dropout}_ms"] = 1000 * time_calls(lambda: setup.step(*batch), iters)["median_s"]
    setup.model.eval()
    batches = {"training": setup.batch_size, "default": eval_batch_size(finetune_config(setup.cfg).training)}
    for name, b in batches.items():
        images, present, _ = setup.random_batch(b)
        with torch.no_grad():
            t = time_calls(lambda: setup.model(images, present, setup.bank), iters)["median_s"]
        out[f"validation_batch_{b}_ms_per_study"] = 1000 * t / b
    out["validation_batches"] = batches
    return out


def _validation_batch(setup: FinetuneSetup) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The config's validation batch size and a random batch of it."""
    b = eval_batch_size(finetune_config(setup.cfg).training)
    images, present, _ = setup.random_batch(b)
    return b, images, present


def _brain_max_pool(iters: int) -> dict[str, float]:
    """Brain validation forward per study: the separable max pool against ``nn.MaxPool3d``."""
    from torch import nn

    from medmap.models.encoders import SeparableMaxPool3d

    setup = FinetuneSetup("brain")
    setup.model.eval()
    b, images, present = _validation_batch(setup)
    pools = [(parent, name, child) for parent in setup.model.modules()
             for name, child in parent.named_children() if isinstance(child, SeparableMaxPool3d)]
    out: dict[str, float] = {"batch": b, "pools": len(pools)}
    for name in ("separable", "native"):
        if name == "native":
            for parent, child_name, pool in pools:
                setattr(parent, child_name, nn.MaxPool3d(pool.kernel_size, pool.stride, pool.padding))
        with torch.no_grad():
            t = time_calls(lambda: setup.model(images, present, setup.bank), iters)["median_s"]
        out[f"{name}_ms_per_study"] = 1000 * t / b
    return out


def _as_instance_norms(model: torch.nn.Module) -> int:
    """Undo :func:`~medmap.models.norms.instance_norms_as_group_norms` (for timing): every
    affine-free ``GroupNorm(C, C)`` becomes the ``nn.InstanceNorm3d(C)`` it stands for."""
    from torch import nn

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm) and child.num_groups == child.num_channels and not child.affine:
                setattr(parent, name, nn.InstanceNorm3d(child.num_channels, eps=child.eps))
                swapped += 1
    return swapped


def _brain_instance_norm(iters: int) -> dict[str, float]:
    """Brain training step and validation forward per study with the encoders' instance norms on
    the group-norm kernel (the default) and on ``nn.InstanceNorm3d``, timed in turns."""
    import copy
    import statistics
    import time

    group = FinetuneSetup("brain")
    instance = copy.deepcopy(group)
    out: dict[str, float] = {"norms": _as_instance_norms(instance.model)}
    images, present, labels = group.random_batch()
    b, v_images, v_present = _validation_batch(group)
    times: dict[str, list[float]] = {k: [] for k in ("group_step", "instance_step", "group_val", "instance_val")}
    for i in range(iters + 1):  # in turns, so that both meet the same machine; the first round warms up
        for name, setup in (("group", group), ("instance", instance)):
            setup.model.train()
            t0 = time.perf_counter()
            setup.step(images, present, labels)
            t1 = time.perf_counter()
            setup.model.eval()
            with torch.no_grad():
                setup.model(v_images, v_present, setup.bank)
            t2 = time.perf_counter()
            if i:
                times[f"{name}_step"].append(1000 * (t1 - t0))
                times[f"{name}_val"].append(1000 * (t2 - t1) / b)
    out.update({f"{k}_ms" if k.endswith("step") else f"{k}_ms_per_study": statistics.median(v) for k, v in times.items()})
    return out


def _brain_against_densenet(iters: int) -> dict[str, float]:
    """Brain training step and validation forward per study: MedMAP against the TTA DenseNet."""
    from medmap.benchmark.time_to_accuracy import paper_grid_densenet
    from medmap.engines.common import build_adamw
    from medmap.experiments.baselines import StackedModalityCNN

    setup = FinetuneSetup("brain")
    images, present, labels = setup.random_batch()
    out: dict[str, float] = {"batch": setup.batch_size}
    out["medmap_step_ms"] = 1000 * time_calls(lambda: setup.step(images, present, labels), iters)["median_s"]
    densenet = paper_grid_densenet()
    cnn = StackedModalityCNN(densenet["net"], len(setup.organ.modalities), setup.organ.num_classes).train()
    opt = build_adamw(cnn.parameters(), **densenet["training"])

    def cnn_step() -> None:
        loss = torch.nn.functional.cross_entropy(cnn(images, present), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out["densenet_step_ms"] = 1000 * time_calls(cnn_step, iters)["median_s"]
    b, images, present = _validation_batch(setup)
    setup.model.eval()
    cnn.eval()
    with torch.no_grad():
        for name, fn in (("medmap", lambda: setup.model(images, present, setup.bank)),
                         ("medmap_encoders", lambda: setup.model._encode(images, present)),
                         ("densenet", lambda: cnn(images, present))):
            out[f"{name}_validation_ms_per_study"] = 1000 * time_calls(fn, iters)["median_s"] / b
    out["validation_batch"] = b
    return out


def section_step_costs(res: dict[str, Any], args: argparse.Namespace) -> None:
    """Augmentation, optimiser, dropout and validation batch costs of the liver fine-tuning step."""
    iters = max(3, int(args.iters))
    print(f"\n== Step costs: lesion-level liver fine-tuning (8 phases of 24x24x16, batch 8; "
          f"{torch.get_num_threads()} threads) ==")
    aug, opt, rest = _augmentation(iters), _optimizers(iters), _dropout_and_validation(iters)
    print(f"  augmentation of one study, every transform on:  medmap {aug['medmap_ms']:.1f} ms, "
          f"TorchIO per study {aug['torchio_ms']:.1f} ms")
    print(f"  AdamW step of the liver model:  default {opt['default_ms']:.0f} ms, foreach {opt['foreach_ms']:.0f} ms, "
          f"fused {opt['fused_ms']:.0f} ms (the engines)")
    print(f"  training step:  dropout 0.1 {rest['step_dropout_0.1_ms']:.0f} ms, "
          f"dropout 0 {rest['step_dropout_0.0_ms']:.0f} ms (the liver default)")
    b_train, b_default = rest["validation_batches"]["training"], rest["validation_batches"]["default"]
    print(f"  validation forward per study:  batch {b_train} {rest[f'validation_batch_{b_train}_ms_per_study']:.1f} ms, "
          f"batch {b_default} {rest[f'validation_batch_{b_default}_ms_per_study']:.1f} ms (the default)")
    pool = _brain_max_pool(iters)
    print(f"  brain validation forward per study (batch {pool['batch']:.0f}):  separable max pool "
          f"{pool['separable_ms_per_study']:.1f} ms (the default), nn.MaxPool3d {pool['native_ms_per_study']:.1f} ms")
    norm = _brain_instance_norm(iters)
    print(f"  brain, instance norms on the group-norm kernel (the default) / nn.InstanceNorm3d, in turns:  "
          f"training step {norm['group_step_ms']:.0f} / {norm['instance_step_ms']:.0f} ms, validation forward "
          f"per study {norm['group_val_ms_per_study']:.1f} / {norm['instance_val_ms_per_study']:.1f} ms")
    vs = _brain_against_densenet(iters)
    print(f"  brain, MedMAP against the DenseNet baseline:  training step (batch {vs['batch']:.0f}) "
          f"{vs['medmap_step_ms']:.0f} ms against {vs['densenet_step_ms']:.0f} ms; validation forward per study "
          f"(batch {vs['validation_batch']:.0f}) {vs['medmap_validation_ms_per_study']:.1f} ms "
          f"(encoders {vs['medmap_encoders_validation_ms_per_study']:.1f}) against "
          f"{vs['densenet_validation_ms_per_study']:.1f} ms")
    res["step_costs"] = {"augmentation": aug, "adamw": opt, **rest, "brain_max_pool": pool,
                          "brain_instance_norm": norm, "brain_against_densenet": vs}
