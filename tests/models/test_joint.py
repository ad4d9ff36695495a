"""The joint-space zero-shot scores and the stage-2 joint head that starts as stage 1's zero-shot classifier."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from medmap.errors import CheckpointError
from medmap.models.joint import (JointClassText, JointSpaceHead, ZeroShotWeights, joint_logits, load_joint_head,
                                 project_class_text)
from medmap.models.medmap import MedMAPClassifier, MedMAPModelConfig
from medmap.models.pretrain import MedMAPPretrainModel
from tests.helpers.stage2 import ROI, TEXT_DIM, TINY_ARCH, make_batch, make_encoders, make_organ


def _bank(organ, seed: int = 0, negatives: bool = True) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    c, m = organ.num_classes, len(organ.modalities)
    mask = torch.ones(c, m, 2, dtype=torch.bool)
    mask[:, -1, :] = False  # the last sequence has no descriptors: it is not scored
    mask[0, 0, 1] = False   # a slot with one descriptor only
    return SimpleNamespace(
        classes=list(organ.classes), modalities=list(organ.modalities),
        class_emb=torch.randn(c, 2, TEXT_DIM, generator=g), class_mask=torch.ones(c, 2, dtype=torch.bool),
        modality_emb=torch.randn(m, TEXT_DIM, generator=g),
        descriptor_emb=torch.randn(c, m, 2, TEXT_DIM, generator=g) * mask.unsqueeze(-1), descriptor_mask=mask,
        negative_emb=torch.randn(c, 1, TEXT_DIM, generator=g) if negatives else None,
        negative_mask=torch.ones(c, 1, dtype=torch.bool) if negatives else None)


def _unit(*shape: int, seed: int = 1) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_parts_of_the_zero_shot_score() -> None:
    c, m, k = 3, 2, 8
    text = JointClassText(study=_unit(c, k, seed=2), negative=_unit(c, k, seed=3), per_sequence=_unit(c, m, k, seed=4),
                          described=torch.tensor([True, False]))
    seq, study = _unit(4, m, k, seed=5), _unit(4, k, seed=6)
    present = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    scale = torch.tensor([10.0, 20.0])
    only_study = joint_logits(seq, present, study, text, scale, 5.0, ZeroShotWeights(sequences=0.0, negatives=True))
    torch.testing.assert_close(only_study, 5.0 * (study @ text.study.t() - study @ text.negative.t()))
    no_neg = joint_logits(seq, present, study, text, scale, 5.0, ZeroShotWeights(sequences=0.0, negatives=False))
    torch.testing.assert_close(no_neg, 5.0 * study @ text.study.t())
    only_seq = joint_logits(seq, present, study, text, scale, 5.0, ZeroShotWeights(study=0.0))
    # only sequence 0 is described: rows with it score 10 cos(v_0, D_c0); row 2 lacks it and scores 0
    expected = 10.0 * seq[:, 0] @ text.per_sequence[:, 0].t() * present[:, :1]
    torch.testing.assert_close(only_seq, expected)
    both = joint_logits(seq, present, study, text, scale, 5.0, ZeroShotWeights(study=0.5, sequences=2.0, negatives=True))
    torch.testing.assert_close(both, 0.5 * only_study + 2.0 * only_seq)


def test_without_study_or_descriptors_the_papers_form() -> None:
    """No study embedding and no descriptors: class prompts against every present sequence."""
    text = JointClassText(study=_unit(3, 8, seed=2), negative=None, per_sequence=None, described=None)
    seq = _unit(2, 2, 8, seed=3)
    present = torch.tensor([[True, True], [False, True]])
    out = joint_logits(seq, present, None, text, torch.tensor([10.0, 4.0]))
    row0 = (10.0 * seq[0, 0] @ text.study.t() + 4.0 * seq[0, 1] @ text.study.t()) / 2
    torch.testing.assert_close(out[0], row0)
    torch.testing.assert_close(out[1], 4.0 * seq[1, 1] @ text.study.t())


def test_prompt_ensembles_skip_padding() -> None:
    organ = make_organ(3, 3)
    bank = _bank(organ)
    proj = torch.nn.Linear(TEXT_DIM, 8)
    text = project_class_text(proj, bank)
    with torch.no_grad():
        one = F.normalize(proj(bank.descriptor_emb[0, 0, 0]), dim=-1)
        torch.testing.assert_close(text.per_sequence[0, 0], one)  # the padded slot does not count
        two = F.normalize(F.normalize(proj(bank.descriptor_emb[1, 0]), dim=-1).sum(0), dim=-1)
        torch.testing.assert_close(text.per_sequence[1, 0], two)
    assert text.described.tolist() == [True, True, False]


def _stage1(organ, study: bool = True) -> MedMAPPretrainModel:
    torch.manual_seed(0)
    model = MedMAPPretrainModel(organ.modalities, {m: ROI for m in organ.modalities}, arch=TINY_ARCH,
                                text_dim=TEXT_DIM, embed_dim=8, text_proj="mlp", study_alignment=study)
    with torch.no_grad():  # temperatures other than the initial ones, so that loading them is tested
        model.log_temperature.copy_(torch.log(torch.tensor([3.0, 7.0, 11.0])))
        if study:
            model.study_log_temperature.fill_(2.0)
    return model.eval()


@pytest.mark.parametrize("study", [True, False])
def test_stage2_joint_head_starts_as_stage1_zero_shot(study: bool) -> None:
    from medmap.engines.pretrain import zero_shot_logits

    organ = make_organ(3, 3)
    bank = _bank(organ)
    pre = _stage1(organ, study)
    cfg = MedMAPModelConfig(num_heads=2, mlp_ratio=2.0, dropout=0.0, sim_head="joint", joint_embed_dim=8,
                            joint_study=study)  # prediction avg: the zero-initialised classifier adds a uniform half
    model = MedMAPClassifier(organ, make_encoders(organ), TEXT_DIM, cfg)
    model.encoders.load_state_dict(pre.encoders.state_dict())
    load_joint_head(model.joint_head, pre.state_dict(), list(organ.modalities))
    images, present, _ = make_batch(organ, b=4)
    model.eval()
    with torch.no_grad():
        out = model(images, present, bank)
        vs = torch.zeros(4, 3, 8)
        pooled = {}
        for j, m in enumerate(organ.modalities):
            rows = present[:, j].nonzero(as_tuple=True)[0]
            z = pre.encoders(images[rows, j : j + 1], m).pooled
            pooled[m] = (rows, z)
            vs[rows, j] = pre.project_volume(z, m)
        s = [pre.encode_study(pooled, 4)[0]] if study else None
        ref = zero_shot_logits(pre, bank, [(vs, present)], torch.device("cpu"), s)
    torch.testing.assert_close(out["logits_sim"], ref, atol=1e-5, rtol=1e-5)  # gamma = 0: CCT adds nothing yet
    torch.testing.assert_close(out["logits_cls"], torch.zeros_like(out["logits_cls"]))
    uniform = torch.full_like(ref, 1 / 3)
    torch.testing.assert_close(out["probs"], 0.5 * (ref.softmax(-1) + uniform), atol=1e-5, rtol=1e-5)
    assert torch.equal(out["probs"].argmax(1), ref.argmax(1))


def test_joint_head_load_refuses_other_projections() -> None:
    organ = make_organ(3, 3)
    head = JointSpaceHead(organ.modalities, 16, TEXT_DIM, embed_dim=8, study=True)
    with pytest.raises(CheckpointError, match="no 'study_"):
        load_joint_head(head, _stage1(organ, study=False).state_dict(), list(organ.modalities))
    wide = JointSpaceHead(organ.modalities, 16, TEXT_DIM, embed_dim=12, study=False)
    with pytest.raises(CheckpointError, match="set model.joint"):
        load_joint_head(wide, _stage1(organ, study=False).state_dict(), list(organ.modalities))


def test_joint_head_trains_and_refines_with_cct() -> None:
    organ = make_organ(3, 3)
    cfg = MedMAPModelConfig(num_heads=2, mlp_ratio=2.0, dropout=0.0, sim_head="joint", joint_embed_dim=8)
    model = MedMAPClassifier(organ, make_encoders(organ), TEXT_DIM, cfg)
    images, present, labels = make_batch(organ, b=4)
    out = model(images, present, _bank(organ))
    F.cross_entropy(out["logits_sim"], labels).backward()
    assert model.joint_refine.grad is not None and model.joint_refine.grad.abs() > 0
    assert model.joint_head.text_proj[0].weight.grad.abs().sum() > 0
    assert all(model.joint_head.vision_proj[m].weight.grad is not None for m in organ.modalities)
