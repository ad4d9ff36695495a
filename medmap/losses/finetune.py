"""The MedMAP stage-2 loss: supervised classifier loss + similarity CE + KL head alignment.

``L = L_sup(logits_cls, y) + lambda_sim * CE(logits_sim, y) + lambda_kl * KL(p_cls || p_sim)``

* ``L_sup`` is focal loss or cross-entropy, optionally class-weighted.
* The similarity head gets its own cross-entropy for the whole run (also class-weighted), so
  both heads keep a supervised signal from the first step to the last; nothing is scheduled
  away.
* ``KL(p_cls || p_sim) = sum_c p_cls,c (log p_cls,c - log p_sim,c)``, averaged over the batch:
  the classifier distribution is the reference and the similarity head is pulled towards it.
  ``kl_detach`` chooses the gradient path: ``"none"`` (default; both heads receive gradient,
  a mutual alignment), ``"cls"`` (``p_cls`` is a fixed target, only the similarity head moves)
  or ``"sim"``.

Example:
    >>> import torch
    >>> loss_fn = MedMAPLoss(num_classes=3, sup="focal", gamma=2.0, lambda_sim=1.0, lambda_kl=0.5)
    >>> out = {"logits_cls": torch.randn(4, 3), "logits_sim": torch.randn(4, 3)}
    >>> loss, parts = loss_fn(out, torch.tensor([0, 1, 2, 1]))
    >>> sorted(parts)
    ['kl', 'sim', 'sup', 'total']
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmap.errors import ConfigError
from medmap.run_config import FinetuneConfig, finetune_config

KL_DETACH_MODES = ("none", "cls", "sim")


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, weight: Tensor | None = None) -> Tensor:
    """Multi-class focal loss ``-w_y (1 - p_y)^gamma log p_y`` (Lin et al., 2017).

    Reduced like ``F.cross_entropy``: a weighted mean ``sum_i w_{y_i} l_i / sum_i w_{y_i}``,
    so that ``gamma = 0`` gives exactly (class-weighted) cross-entropy.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_y = logp.gather(1, target.view(-1, 1)).squeeze(1)
    loss = -((1.0 - logp_y.exp()).clamp_min(0.0) ** gamma) * logp_y if gamma != 0 else -logp_y
    if weight is None:
        return loss.mean()
    w = weight.to(loss)[target]
    return (w * loss).sum() / w.sum()


def kl_head_alignment(logits_cls: Tensor, logits_sim: Tensor, detach: str = "none") -> Tensor:
    """``KL(p_cls || p_sim)`` averaged over the batch (see module docstring for ``detach``)."""
    if detach not in KL_DETACH_MODES:
        raise ConfigError(f"loss.kl_detach must be one of {KL_DETACH_MODES}, got '{detach}'")
    logp_cls = F.log_softmax(logits_cls.float(), dim=-1)
    logp_sim = F.log_softmax(logits_sim.float(), dim=-1)
    if detach == "cls":
        logp_cls = logp_cls.detach()
    elif detach == "sim":
        logp_sim = logp_sim.detach()
    # kl_div(input, target) = sum target * (log target - input) = KL(target || input).
    return F.kl_div(logp_sim, logp_cls, reduction="batchmean", log_target=True)


def class_weights_from_labels(labels: Sequence[int] | np.ndarray, num_classes: int) -> Tensor:
    """"Balanced" class weights ``n / (C * n_c)`` (scikit-learn's convention).

    A class absent from ``labels`` gets the largest observed weight (rather than an
    undefined ``n / 0``), so it is not ignored if it appears later.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    if counts.sum() == 0:
        raise ConfigError("cannot compute class weights from an empty label list")
    w = np.zeros(num_classes)
    seen = counts > 0
    w[seen] = counts.sum() / (num_classes * counts[seen])
    w[~seen] = w[seen].max()
    return torch.tensor(w, dtype=torch.float32)


class MedMAPLoss(nn.Module):
    """Stage-2 objective; ``forward(outputs, target) -> (loss, parts)``.

    Args:
        num_classes: ``C``.
        sup: ``"focal"`` or ``"ce"`` for the classifier head.
        gamma: focal-loss focusing parameter.
        class_weights: optional ``[C]`` weights for both supervised terms.
        lambda_sim: weight of the similarity-head cross-entropy.
        lambda_kl: weight of ``KL(p_cls || p_sim)``; 0 disables it (ablation "no KL").
        kl_detach: ``"none"``, ``"cls"`` or ``"sim"`` (which side of the KL is a fixed target).
        label_smoothing: label smoothing of the cross-entropy terms (not used by focal).

    ``outputs`` is the model's dict (``logits_cls``, ``logits_sim`` possibly ``None`` for the
    "no text" ablation, in which case only ``L_sup`` is used). ``parts`` holds detached
    tensors ``sup``, ``sim``, ``kl``, ``total`` for logging.
    """

    def __init__(self, num_classes: int, sup: str = "focal", gamma: float = 2.0,
                 class_weights: Sequence[float] | Tensor | None = None, lambda_sim: float = 1.0,
                 lambda_kl: float = 0.5, kl_detach: str = "none", label_smoothing: float = 0.0) -> None:
        super().__init__()
        if sup not in ("focal", "ce"):
            raise ConfigError(f"loss.sup must be 'focal' or 'ce', got '{sup}'")
        if gamma < 0 or lambda_sim < 0 or lambda_kl < 0:
            raise ConfigError("loss.gamma, loss.lambda_sim and loss.lambda_kl must be >= 0")
        if kl_detach not in KL_DETACH_MODES:
            raise ConfigError(f"loss.kl_detach must be one of {KL_DETACH_MODES}, got '{kl_detach}'")
        self.num_classes = num_classes
        self.sup, self.gamma = sup, float(gamma)
        self.lambda_sim, self.lambda_kl = float(lambda_sim), float(lambda_kl)
        self.kl_detach = kl_detach
        self.label_smoothing = float(label_smoothing)
        if class_weights is not None:
            cw = torch.as_tensor(class_weights, dtype=torch.float32)
            if cw.shape != (num_classes,) or bool((cw < 0).any()) or float(cw.sum()) <= 0:
                raise ConfigError(f"loss.class_weights must be {num_classes} non-negative numbers, got {cw.tolist()}")
            self.register_buffer("class_weights", cw)
        else:
            self.class_weights = None

    def forward(self, outputs: Mapping[str, Any], target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits_cls: Tensor = outputs["logits_cls"]
        logits_sim: Tensor | None = outputs.get("logits_sim")
        target = target.to(logits_cls.device).long()
        if bool(((target < 0) | (target >= self.num_classes)).any()):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); unlabelled studies (-1) cannot be trained on")
        w = self.class_weights
        if self.sup == "focal":
            sup = focal_loss(logits_cls, target, self.gamma, w)
        else:
            sup = F.cross_entropy(logits_cls.float(), target, weight=w, label_smoothing=self.label_smoothing)
        zero = sup.new_zeros(())
        sim = kl = zero
        if logits_sim is not None:
            if self.lambda_sim > 0:
                sim = F.cross_entropy(logits_sim.float(), target, weight=w, label_smoothing=self.label_smoothing)
            if self.lambda_kl > 0:
                kl = kl_head_alignment(logits_cls, logits_sim, self.kl_detach)
        total = sup + self.lambda_sim * sim + self.lambda_kl * kl
        parts = {"sup": sup.detach(), "sim": sim.detach(), "kl": kl.detach(), "total": total.detach()}
        return total, parts


def build_medmap_loss(cfg: Mapping[str, Any] | FinetuneConfig, num_classes: int,
                      class_weights: Sequence[float] | Tensor | None = None) -> MedMAPLoss:
    """Build :class:`MedMAPLoss` from a run config's ``loss`` and ``ablation`` sections.

    ``loss.class_weights`` may be ``null``, a list of ``C`` numbers, or ``"balanced"``; in
    the last case the caller (the engine) computes them with
    :func:`class_weights_from_labels` on the training labels and passes ``class_weights``.
    ``ablation.kl: false`` sets ``lambda_kl = 0``; ``ablation.text: false`` leaves only ``L_sup``.
    """
    typed = finetune_config(cfg)
    lcfg = typed.loss
    if class_weights is None and isinstance(lcfg.class_weights, list):
        class_weights = list(lcfg.class_weights)
    elif class_weights is None and lcfg.class_weights not in (None, "balanced", "none"):
        raise ConfigError(f"loss.class_weights must be null, 'balanced' or a list, got {lcfg.class_weights!r}")
    return MedMAPLoss(
        num_classes,
        sup=lcfg.sup,
        gamma=lcfg.gamma,
        class_weights=class_weights,
        lambda_sim=lcfg.lambda_sim,
        lambda_kl=lcfg.lambda_kl if typed.ablation.kl else 0.0,
        kl_detach=lcfg.kl_detach,
        label_smoothing=lcfg.label_smoothing,
    )
