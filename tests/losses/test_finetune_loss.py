import pytest
import torch
import torch.nn.functional as F

from medmap.errors import ConfigError
from medmap.losses.finetune import (
    MedMAPLoss,
    build_medmap_loss,
    class_weights_from_labels,
    focal_loss,
    kl_head_alignment,
)


def _logits(seed=0, b=6, c=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g), torch.randn(b, c, generator=g), torch.randint(0, c, (b,), generator=g)


def test_focal_with_gamma_zero_equals_cross_entropy():
    lc, _, y = _logits()
    assert torch.allclose(focal_loss(lc, y, gamma=0.0), F.cross_entropy(lc, y))
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    assert torch.allclose(focal_loss(lc, y, gamma=0.0, weight=w), F.cross_entropy(lc, y, weight=w))


def test_focal_down_weights_easy_examples():
    y = torch.tensor([0, 0])
    easy, hard = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    ratio_focal = focal_loss(easy, y[:1], 2.0) / focal_loss(hard, y[:1], 2.0)
    ratio_ce = F.cross_entropy(easy, y[:1]) / F.cross_entropy(hard, y[:1])
    assert ratio_focal < ratio_ce


def test_kl_zero_when_heads_agree_and_positive_otherwise():
    lc, ls, _ = _logits()
    assert float(kl_head_alignment(lc, lc.clone())) == pytest.approx(0.0, abs=1e-6)
    # a shift of all logits leaves the distribution unchanged
    assert float(kl_head_alignment(lc, lc + 3.0)) == pytest.approx(0.0, abs=1e-6)
    kl = kl_head_alignment(lc, ls)
    p, q = lc.softmax(-1), ls.softmax(-1)
    assert torch.allclose(kl, (p * (p.log() - q.log())).sum(-1).mean(), atol=1e-6)  # KL(p_cls || p_sim)


@pytest.mark.parametrize("detach,cls_grad,sim_grad", [("none", True, True), ("cls", False, True), ("sim", True, False)])
def test_kl_detach_controls_gradient_path(detach, cls_grad, sim_grad):
    lc, ls, _ = _logits()
    lc.requires_grad_(True)
    ls.requires_grad_(True)
    kl_head_alignment(lc, ls, detach).backward()
    assert (lc.grad is not None and lc.grad.abs().sum() > 0) == cls_grad
    assert (ls.grad is not None and ls.grad.abs().sum() > 0) == sim_grad


def test_medmap_loss_combines_the_three_terms():
    lc, ls, y = _logits()
    loss_fn = MedMAPLoss(4, sup="ce", lambda_sim=0.7, lambda_kl=0.3)
    loss, parts = loss_fn({"logits_cls": lc, "logits_sim": ls}, y)
    expected = F.cross_entropy(lc, y) + 0.7 * F.cross_entropy(ls, y) + 0.3 * kl_head_alignment(lc, ls)
    assert torch.allclose(loss, expected)
    assert torch.allclose(parts["total"], expected) and not parts["total"].requires_grad
    assert float(parts["kl"]) > 0


def test_medmap_loss_without_text_is_supervised_only():
    lc, _, y = _logits()
    loss, parts = MedMAPLoss(4, sup="focal", gamma=2.0)({"logits_cls": lc, "logits_sim": None}, y)
    assert torch.allclose(loss, focal_loss(lc, y, 2.0))
    assert float(parts["sim"]) == 0.0 and float(parts["kl"]) == 0.0


def test_class_weights_balanced():
    w = class_weights_from_labels([0, 0, 0, 1], 3)
    assert torch.allclose(w, torch.tensor([4 / 9, 4 / 3, 4 / 3]))


def test_build_from_config_and_errors():
    cfg = {"loss": {"sup": "ce", "class_weights": [1.0, 2.0], "lambda_kl": 0.2}, "ablation": {"kl": False}}
    loss_fn = build_medmap_loss(cfg, 2)
    assert loss_fn.lambda_kl == 0.0 and loss_fn.class_weights.tolist() == [1.0, 2.0]
    with pytest.raises(ConfigError, match="unknown config key 'loss.lamda_kl'; valid keys in 'loss': "):
        build_medmap_loss({"loss": {"lamda_kl": 1.0}}, 2)
    with pytest.raises(ConfigError, match="sup"):
        MedMAPLoss(2, sup="hinge")
    with pytest.raises(ConfigError, match="class_weights"):
        MedMAPLoss(3, class_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="unlabelled"):
        MedMAPLoss(2)({"logits_cls": torch.zeros(1, 2), "logits_sim": None}, torch.tensor([-1]))
