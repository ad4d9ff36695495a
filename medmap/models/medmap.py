"""The MedMAP stage-2 classifier: modality-aware encoders + CSA + CCT + two heads.

Data flow for a batch of studies of one organ (``M`` modalities, ``C`` classes)::

    images [B, M, X, Y, Z], present [B, M]
      -> for each modality m present in at least one study of the batch:
           E_m on the sub-batch of studies that have m           -> Z_m [B_m, N_m, d]
           CSA(Z_m | projected text)  (or a plain linear map)    -> A_m [B_m, N_m, d]
           scattered back into [B, N_m, d], masked where m is missing
      -> CCT(V = concat_m A_m, Q = [class tokens; modality descriptors])  -> v* [B, d], q*_c [B, C, d]
         (or, without CCT: masked mean of each A_m, concatenated, MLP  -> v*)
      -> logits_cls = W v*;  logits_sim_c = tau * cos(v*, q*_c)
      -> probs = mean(softmax(logits_cls), softmax(logits_sim))   (``prediction: avg|cls|sim``)

Encoders run only on studies where their modality is present, so a missing modality costs
nothing and its (all-zero) image is never read. The design choices are explained in
``docs/method.md``.

Example:
    >>> from medmap.config import load_organ_config, load_config
    >>> organ = load_organ_config("brain")
    >>> cfg = load_config("tiny", "finetune")
    >>> model = build_medmap_classifier(organ, cfg, text_dim=384)        # doctest: +SKIP
    >>> out = model(batch["images"], batch["present"], text_bank)        # doctest: +SKIP
    >>> out["probs"].shape                                               # doctest: +SKIP
    torch.Size([2, 2])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmap.config import OrganConfig
from medmap.errors import CheckpointError, ConfigError, MedMAPError
from medmap.models.cct import POOLINGS, CrossCognitionTransformer
from medmap.models.csa import CrossModalSemanticAggregation
from medmap.models.exchange import CrossSequenceExchange
from medmap.models.joint import JointSpaceHead, ZeroShotWeights
from medmap.models.positions import GridPositionEmbedding
from medmap.run_config import FinetuneConfig, finetune_config

PREDICTION_MODES = ("avg", "cls", "sim")
SIM_HEADS = ("cct", "joint")
TOKEN_FUSIONS = ("sequence", "location")


@dataclass
class MedMAPModelConfig:
    """Architecture and ablation switches of :class:`MedMAPClassifier`.

    Attributes:
        num_heads: attention heads in CSA and CCT.
        mlp_ratio: feed-forward width multiple in CSA and CCT.
        dropout: dropout in CSA, CCT and before the classifier.
        use_csa: ``False`` = ablation "no CSA": a linear map + modality embedding per token.
        csa_conv_blocks: FiLM conv blocks in the CSA local stream.
        csa_transformer_blocks: transformer blocks in the CSA global stream.
        use_cct: ``False`` = ablation "no CCT": each modality's tokens pooled (mean, or
            channel-wise max with ``pooling: max``), concatenated, MLP.
        cct_layers: number of two-way CCT layers ``L``.
        pooling: ``mean``, ``attention`` or ``max`` pooling of the CCT visual tokens into ``v*``.
        use_text: ``False`` = ablation "no text": no text bank, no similarity head; CSA runs
            without FiLM / cross-attention and CCT attends to learned query tokens.
        prediction: ``avg`` (mean of the two heads' probabilities), ``cls`` or ``sim``.
        tau_init: initial similarity temperature ``tau`` (a scale, multiplies the cosine).
        tau_max: upper clamp of ``tau`` (lower clamp is 1).
        token_positions: add a learned embedding of each token's place on its grid
            (:class:`~medmap.models.positions.GridPositionEmbedding`) to the encoder tokens.
        cct_self_attention: CCT layers start with self-attention among the visual tokens of
            all present sequences.
        token_fusion: ``sequence`` (CCT sees every sequence's tokens, ``M x N``) or
            ``location`` (the CSA tokens of all sequences at one grid cell are concatenated,
            with the presence flags, and projected to one visual token per cell, so CCT sees
            ``N`` tokens that each describe one place in every sequence; needs the sequences'
            token grids to coincide, as they do for lesion patches and co-registered volumes).
        sequence_exchange: after every stage of the (CNN) encoders, each sequence's feature
            map receives a zero-initialised 1x1x1 projection of all present sequences' maps
            (:class:`~medmap.models.exchange.CrossSequenceExchange`), so that the sequences
            meet at every scale while each keeps its own encoder.
        sim_head: the similarity head: ``cct`` (``tau cos(v*, q*_c)``, the paper's form) or
            ``joint`` (stage 1's zero-shot classifier in its joint space,
            :class:`~medmap.models.joint.JointSpaceHead`, plus ``gamma tau cos(v*, q*_c)`` with
            ``gamma`` starting at 0, so that CCT's class tokens refine it as training goes).
        joint_embed_dim / joint_vision_proj / joint_text_proj / joint_study: the joint head's
            projections, as in the stage-1 run it starts from.
        joint_weights: how the joint head weighs the study and sequence parts.
    """

    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    use_csa: bool = True
    csa_conv_blocks: int = 1
    csa_transformer_blocks: int = 1
    use_cct: bool = True
    cct_layers: int = 2
    pooling: str = "mean"
    use_text: bool = True
    prediction: str = "avg"
    tau_init: float = 10.0
    tau_max: float = 100.0
    token_positions: bool = False
    cct_self_attention: bool = False
    token_fusion: str = "sequence"
    sequence_exchange: bool = False
    sim_head: str = "cct"
    joint_embed_dim: int = 128
    joint_vision_proj: str = "linear"
    joint_text_proj: str = "mlp"
    joint_study: bool = True
    joint_weights: ZeroShotWeights = field(default_factory=ZeroShotWeights)

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTION_MODES:
            raise ConfigError(f"model.prediction must be one of {PREDICTION_MODES}, got '{self.prediction}'")
        if not self.use_text and self.prediction != "cls":
            # Without text there is no similarity head; only the classifier can predict.
            self.prediction = "cls"
        if self.pooling not in POOLINGS:
            raise ConfigError(f"model.pooling must be one of {', '.join(POOLINGS)}, got '{self.pooling}'")
        if self.token_fusion not in TOKEN_FUSIONS:
            raise ConfigError(f"model.token_fusion must be one of {', '.join(TOKEN_FUSIONS)}, got {self.token_fusion!r}")
        if self.sim_head not in SIM_HEADS:
            raise ConfigError(f"model.sim_head must be one of {', '.join(SIM_HEADS)}, got {self.sim_head!r}")
        if not 1.0 <= self.tau_init <= self.tau_max:
            raise ConfigError(f"model.tau_init must lie in [1, tau_max={self.tau_max}], got {self.tau_init}")

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any] | FinetuneConfig) -> "MedMAPModelConfig":
        """Read the ``model`` and ``ablation`` sections of a fine-tuning run config."""
        typed = finetune_config(cfg)
        model, abl = typed.model, typed.ablation
        return cls(
            num_heads=model.num_heads, mlp_ratio=model.mlp_ratio, dropout=model.dropout,
            use_csa=abl.csa, csa_conv_blocks=model.csa.conv_blocks, csa_transformer_blocks=model.csa.transformer_blocks,
            use_cct=abl.cct, cct_layers=model.cct.layers, cct_self_attention=model.cct.self_attention,
            pooling=model.pooling, use_text=abl.text, prediction=model.prediction,
            tau_init=model.tau_init, tau_max=model.tau_max, token_positions=model.token_positions,
            token_fusion=model.token_fusion, sequence_exchange=model.sequence_exchange,
            sim_head=model.sim_head, joint_embed_dim=model.joint.embed_dim, joint_vision_proj=model.joint.vision_proj,
            joint_text_proj=model.joint.text_proj, joint_study=model.joint.study,
            joint_weights=ZeroShotWeights(model.joint.zero_shot.study, model.joint.zero_shot.sequences,
                                          model.joint.zero_shot.negatives),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: What :meth:`MedMAPClassifier._encode` keeps per modality: (index m, rows, tokens Z_m, grid, pooled z_m).
Encoded = tuple[int, Tensor, Tensor, tuple[int, int, int], Tensor]


class TextProjection(nn.Module):
    """``P_t``: trainable map from frozen text embeddings to the model width ``d``."""

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, emb: Tensor) -> Tensor:
        return self.norm(self.proj(emb))


class PlainTokenProjection(nn.Module):
    """The "no CSA" ablation: ``A_m = LN(W Z_m) + e_m`` (no text, no conv, no attention)."""

    def __init__(self, dim: int, num_modalities: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.modality_embedding = nn.Parameter(torch.zeros(num_modalities, dim))
        nn.init.trunc_normal_(self.modality_embedding, std=0.02)

    def forward(self, tokens: Tensor, modality_index: int | Tensor) -> Tensor:
        emb = self.modality_embedding[modality_index]
        return self.norm(self.proj(tokens)) + (emb.unsqueeze(1) if emb.dim() == 2 else emb)


def average_class_prompts(class_emb: Tensor) -> Tensor:
    """Prompt ensembling: ``[C, P, t] -> [C, t]``, mean of L2-normalised prompt embeddings.

    All-zero rows are treated as padding (classes with fewer prompts) and left out.
    """
    if class_emb.dim() == 2:
        class_emb = class_emb.unsqueeze(1)
    norms = class_emb.norm(dim=-1, keepdim=True)
    valid = (norms > 0).to(class_emb.dtype)
    if bool((valid.sum(dim=1) == 0).any()):
        raise MedMAPError("text bank: a class has no non-empty prompt embedding")
    unit = class_emb / norms.clamp_min(1e-12)
    mean = (unit * valid).sum(dim=1) / valid.sum(dim=1)
    return F.normalize(mean, dim=-1)


class MedMAPClassifier(nn.Module):
    """Stage-2 MedMAP: modality-aware encoders, CSA, CCT, classifier and similarity heads.

    Args:
        organ: the task (modalities in tensor order, classes).
        encoders: a module with ``.dim`` whose ``forward(x [B,1,X,Y,Z], modality=name)``
            returns an object with ``tokens [B, N, d]``, ``grid (gx, gy, gz)`` and
            ``pooled [B, d]`` (``medmap.models.encoders.ModalityAwareEncoders``).
        text_dim: width of the frozen text embeddings (``None`` when ``use_text`` is off).
        cfg: architecture / ablation switches.

    :meth:`forward` returns a dict with ``logits_cls [B, C]``, ``logits_sim [B, C]`` (``None``
    without text), ``probs [B, C]``, ``features`` (``v*`` ``[B, d]``), ``class_tokens``
    (``q*_c`` ``[B, C, d]`` or ``None``), and for saliency: ``tokens`` (modality ->
    encoder tokens ``Z_m [B_m, N_m, d]``, part of the autograd graph), ``token_grids``
    (modality -> grid), ``token_index`` (modality -> LongTensor of the batch rows that
    have it) and ``pool_weights`` (``[B, sum N_m]`` CCT pooling weights, or ``None``).
    """

    def __init__(self, organ: OrganConfig, encoders: nn.Module, text_dim: int | None,
                 cfg: MedMAPModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or MedMAPModelConfig()
        self.organ = organ
        self.cfg = cfg
        self.modalities = list(organ.modalities)
        self.num_classes = organ.num_classes
        self.encoders = encoders
        d = int(getattr(encoders, "dim"))
        self.dim = d
        m, c = len(self.modalities), self.num_classes

        if cfg.use_text:
            if text_dim is None or text_dim <= 0:
                raise ConfigError("the text branch is enabled (ablation.text: true) but text_dim was not given")
            self.text_projection: TextProjection | None = TextProjection(text_dim, d)
        else:
            self.text_projection = None

        if cfg.use_csa:
            self.csa: nn.Module = CrossModalSemanticAggregation(
                d, m, cfg.num_heads, cfg.csa_conv_blocks, cfg.csa_transformer_blocks,
                cfg.mlp_ratio, cfg.dropout, use_text=cfg.use_text,
            )
        else:
            self.csa = PlainTokenProjection(d, m)

        self.cct: CrossCognitionTransformer | None = None
        self.fusion_mlp: nn.Sequential | None = None
        if cfg.use_cct:
            self.cct = CrossCognitionTransformer(d, cfg.num_heads, cfg.cct_layers, cfg.mlp_ratio, cfg.dropout, cfg.pooling,
                                                 self_attention=cfg.cct_self_attention)
            if not cfg.use_text:
                # Pure vision: CCT attends to learned queries in place of class / modality text.
                self.query_tokens = nn.Parameter(torch.zeros(c + m, d))
                nn.init.trunc_normal_(self.query_tokens, std=0.02)
        else:
            self.fusion_mlp = nn.Sequential(
                nn.LayerNorm(m * d + m),
                nn.Linear(m * d + m, d),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(d, d),
            )

        self.positions = GridPositionEmbedding(d) if cfg.token_positions else None
        self.exchange: CrossSequenceExchange | None = None
        if cfg.sequence_exchange:
            first = encoders.encoder_for(self.modalities[0])
            if not hasattr(first, "run_stage"):
                raise ConfigError("model.sequence_exchange needs CNN encoders (encoder.arch type: cnn or densenet)")
            self.exchange = CrossSequenceExchange(first.stage_channels, m)
        self.location_fusion: nn.Sequential | None = None
        if cfg.token_fusion == "location" and cfg.use_cct:
            self.location_fusion = nn.Sequential(nn.LayerNorm(m * d + m), nn.Linear(m * d + m, d))
        self.classifier = nn.Sequential(nn.LayerNorm(d), nn.Dropout(cfg.dropout), nn.Linear(d, c))
        if cfg.use_text:
            self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.tau_init)))
        self.joint_head: JointSpaceHead | None = None
        if cfg.use_text and cfg.sim_head == "joint":
            assert text_dim is not None
            self.joint_head = JointSpaceHead(self.modalities, d, text_dim, cfg.joint_embed_dim, cfg.joint_vision_proj,
                                             cfg.joint_text_proj, cfg.joint_study, weights=cfg.joint_weights)
            self.joint_refine = nn.Parameter(torch.zeros(()))  # gamma: CCT's class tokens join as training goes
            # the classifier starts uniform, so that before any step the prediction is the zero-shot one
            nn.init.zeros_(self.classifier[-1].weight)
            nn.init.zeros_(self.classifier[-1].bias)

    # ------------------------------------------------------------------ helpers
    @property
    def tau(self) -> Tensor:
        """Similarity scale ``tau = exp(log_tau)`` clamped to ``[1, tau_max]``."""
        return self.log_tau.exp().clamp(1.0, self.cfg.tau_max)

    def project_text(self, text_bank: Any) -> tuple[Tensor, Tensor]:
        """Projected class tokens ``[C, d]`` and modality descriptor tokens ``[M, d]``.

        ``text_bank`` is a ``TextBank`` (or any object / mapping) with ``class_emb``
        ``[C, P, text_dim]`` and ``modality_emb [M, text_dim]``.
        """
        assert self.text_projection is not None
        for attr, expected in (("classes", self.organ.classes), ("modalities", self.modalities)):
            got = text_bank.get(attr) if isinstance(text_bank, Mapping) else getattr(text_bank, attr, None)
            if got is not None and list(got) != list(expected):
                raise MedMAPError(f"text bank {attr} {list(got)} do not match organ '{self.organ.name}': {list(expected)}")
        class_emb = _as_tensor(_get(text_bank, "class_emb"), self.log_tau)
        modality_emb = _as_tensor(_get(text_bank, "modality_emb"), self.log_tau)
        if class_emb.shape[0] != self.num_classes:
            raise MedMAPError(f"text bank has {class_emb.shape[0]} classes, the organ '{self.organ.name}' has {self.num_classes}")
        if modality_emb.shape[0] != len(self.modalities):
            raise MedMAPError(
                f"text bank has {modality_emb.shape[0]} modality descriptors, the organ '{self.organ.name}' "
                f"has {len(self.modalities)} modalities"
            )
        class_tokens = self.text_projection(average_class_prompts(class_emb))
        modality_tokens = self.text_projection(F.normalize(modality_emb, dim=-1))
        return class_tokens, modality_tokens

    def parameter_groups(self, lr: float, weight_decay: float = 0.05, encoder_lr_scale: float = 1.0) -> list[dict[str, Any]]:
        """Optimizer groups: encoders at ``lr * encoder_lr_scale``; no weight decay on biases,
        norms, embeddings and the temperature."""
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_enc = name.startswith("encoders.")
            no_wd = p.dim() < 2 or "embedding" in name or "tokens" in name or name == "log_tau"
            groups.setdefault((is_enc, no_wd), []).append(p)
        return [
            {"params": ps, "lr": lr * (encoder_lr_scale if is_enc else 1.0), "weight_decay": 0.0 if no_wd else weight_decay}
            for (is_enc, no_wd), ps in groups.items()
        ]

    # ------------------------------------------------------------------ forward
    def _encode(self, images: Tensor, present: Tensor) -> dict[str, Encoded]:
        """``E_m`` of each modality on the studies that have it: name -> (index m, rows, tokens Z_m, grid, pooled z_m)."""
        if self.exchange is not None:
            return self._encode_exchanging(images, present)
        out = {}
        for mi, name in enumerate(self.modalities):
            idx = present[:, mi].nonzero(as_tuple=True)[0]
            if idx.numel():
                enc = self.encoders(images[idx, mi : mi + 1], modality=name)
                out[name] = (mi, idx, enc.tokens, tuple(int(g) for g in enc.grid), enc.pooled)
        return out  # type: ignore[return-value]

    def _encode_exchanging(self, images: Tensor, present: Tensor) -> dict[str, Encoded]:
        """As :meth:`_encode`, stage by stage for every study, with the cross-sequence exchange
        between stages (an absent sequence is computed on its zero image and masked out)."""
        assert self.exchange is not None
        encoders = [self.encoders.encoder_for(name) for name in self.modalities]
        # an absent sequence's image is never read: its encoder sees zeros
        feats = [torch.where(present[:, mi, None, None, None, None], images[:, mi : mi + 1], 0.0)
                 for mi in range(len(self.modalities))]
        for stage in range(len(encoders[0].stage_channels)):
            feats = self.exchange(stage, [enc.run_stage(stage, f) for enc, f in zip(encoders, feats)], present)
        out = {}
        for mi, name in enumerate(self.modalities):
            idx = present[:, mi].nonzero(as_tuple=True)[0]
            if idx.numel():
                enc = encoders[mi].tokens_from(feats[mi][idx])
                out[name] = (mi, idx, enc.tokens, tuple(int(g) for g in enc.grid), enc.pooled)
        return out  # type: ignore[return-value]

    def _aggregate(self, encoded: Mapping[str, Encoded],
                   class_tokens: Tensor | None, modality_tokens: Tensor | None) -> dict[str, Tensor]:
        """CSA (or the plain projection) of each modality's tokens -> ``A_m`` (rows: studies that have m).

        CSA is one module for all modalities, so when the token grids agree the tokens of every
        modality go through it in one call (each row with its own modality index), which is
        much faster on a CPU than one call per modality; the result is the same."""
        items = []
        for name, (mi, idx, z, grid, _) in encoded.items():
            if self.positions is not None:
                z = z + self.positions(grid)
            items.append((name, mi, z, grid))
        if not items:
            return {}
        if len({grid for _, _, _, grid in items}) > 1:  # grids differ: one call per modality
            return {name: self._aggregate_one(z, grid, mi, class_tokens, modality_tokens) for name, mi, z, grid in items}
        z_all = torch.cat([z for _, _, z, _ in items])
        mod_index = torch.cat([torch.full((z.shape[0],), mi, dtype=torch.long, device=z.device) for _, mi, z, _ in items])
        a_all = self._aggregate_one(z_all, items[0][3], mod_index, class_tokens, modality_tokens)
        return dict(zip([name for name, *_ in items], a_all.split([z.shape[0] for _, _, z, _ in items])))

    def _aggregate_one(self, z: Tensor, grid: tuple[int, int, int], modality_index: int | Tensor,
                       class_tokens: Tensor | None, modality_tokens: Tensor | None) -> Tensor:
        if self.cfg.use_csa:
            return self.csa(z, grid, modality_index, class_tokens, modality_tokens)
        return self.csa(z, modality_index)

    def _fuse_locations(self, aggregated: Mapping[str, Tensor], rows: Mapping[str, Tensor],
                        present: Tensor) -> tuple[Tensor, Tensor]:
        """``token_fusion: location``: one visual token per grid cell from every sequence's token there."""
        assert self.location_fusion is not None
        sizes = {a.shape[1] for a in aggregated.values()}
        if len(sizes) != 1:
            raise MedMAPError("model.token_fusion: location needs every sequence on one token grid; "
                              f"got {len(sizes)} grid sizes (use token_fusion: sequence)")
        b, n = present.shape[0], sizes.pop()
        any_a = next(iter(aggregated.values()))
        stacked = any_a.new_zeros(b, n, len(self.modalities), self.dim)
        for mi, name in enumerate(self.modalities):
            if name in aggregated:
                stacked[rows[name], :, mi] = aggregated[name]
        flags = present.to(any_a.dtype).unsqueeze(1).expand(b, n, -1)
        fused = self.location_fusion(torch.cat([stacked.flatten(2), flags], dim=-1))
        return fused, torch.zeros(b, n, dtype=torch.bool, device=fused.device)

    def forward(self, images: Tensor, present: Tensor, text_bank: Any = None) -> dict[str, Any]:
        b, m = images.shape[:2]
        if images.dim() != 5 or m != len(self.modalities):
            raise MedMAPError(
                f"images must be [B, M={len(self.modalities)}, X, Y, Z] for organ '{self.organ.name}', "
                f"got {tuple(images.shape)}"
            )
        present = present.to(device=images.device, dtype=torch.bool)
        if present.shape != (b, m):
            raise MedMAPError(f"present must be [B={b}, M={m}], got {tuple(present.shape)}")
        if bool((~present.any(dim=1)).any()):
            raise MedMAPError("every study needs at least one present modality")

        class_tokens = modality_tokens = None
        if self.cfg.use_text:
            if text_bank is None:
                raise MedMAPError("this model uses text (ablation.text: true) but no text bank was given")
            class_tokens, modality_tokens = self.project_text(text_bank)

        encoded = self._encode(images, present)
        tokens_out = {name: e[2] for name, e in encoded.items()}
        grids = {name: e[3] for name, e in encoded.items()}
        index_out = {name: e[1] for name, e in encoded.items()}
        aggregated = self._aggregate(encoded, class_tokens, modality_tokens)
        visual, padding, per_modality_pooled = [], [], []
        for mi, name in enumerate(self.modalities):
            if name not in aggregated:
                if self.fusion_mlp is not None:
                    per_modality_pooled.append(images.new_zeros(b, self.dim))
                continue
            a, idx = aggregated[name], index_out[name]
            if self.fusion_mlp is not None:
                pooled = a.amax(dim=1) if self.cfg.pooling == "max" else a.mean(dim=1)
                per_modality_pooled.append(a.new_zeros(b, self.dim).index_copy(0, idx, pooled))
            else:
                pad = torch.ones(b, a.shape[1], dtype=torch.bool, device=a.device)
                pad[idx] = False
                visual.append(a.new_zeros(b, a.shape[1], a.shape[2]).index_copy(0, idx, a))
                padding.append(pad)

        pool_weights = None
        q_star = None
        if self.cct is not None:
            if self.location_fusion is not None:
                v_seq, pad_seq = self._fuse_locations(aggregated, index_out, present)
            else:
                v_seq, pad_seq = torch.cat(visual, dim=1), torch.cat(padding, dim=1)
            if class_tokens is not None and modality_tokens is not None:
                q_seq = torch.cat([class_tokens, modality_tokens], dim=0)
            else:
                q_seq = self.query_tokens
            out = self.cct(v_seq, q_seq.unsqueeze(0).expand(b, -1, -1), pad_seq, self.num_classes)
            v_star, q_star, pool_weights = out.pooled, out.class_tokens, out.pool_weights
        else:
            assert self.fusion_mlp is not None
            fused = torch.cat(per_modality_pooled + [present.to(images.dtype)], dim=1)
            v_star = self.fusion_mlp(fused)
            if class_tokens is not None:
                q_star = class_tokens.unsqueeze(0).expand(b, -1, -1)

        logits_cls = self.classifier(v_star)
        logits_sim = None
        if self.cfg.use_text and q_star is not None:
            logits_sim = self.tau * torch.einsum("bd,bcd->bc", F.normalize(v_star, dim=-1), F.normalize(q_star, dim=-1))
        if self.joint_head is not None:
            joint = self.joint_head({name: (e[1], e[4]) for name, e in encoded.items()}, present, text_bank)
            logits_sim = joint if logits_sim is None else joint + self.joint_refine * logits_sim
        probs = combine_head_probabilities(logits_cls, logits_sim, self.cfg.prediction)
        return {
            "logits_cls": logits_cls,
            "logits_sim": logits_sim,
            "probs": probs,
            "features": v_star,
            "class_tokens": q_star,
            "tokens": tokens_out,
            "token_grids": grids,
            "token_index": index_out,
            "pool_weights": pool_weights,
        }


def combine_head_probabilities(logits_cls: Tensor, logits_sim: Tensor | None, mode: str = "avg") -> Tensor:
    """The prediction: ``avg`` of the two heads' softmax probabilities, or one head alone."""
    if mode not in PREDICTION_MODES:
        raise ConfigError(f"prediction mode must be one of {PREDICTION_MODES}, got '{mode}'")
    p_cls = logits_cls.float().softmax(dim=-1)
    if logits_sim is None or mode == "cls":
        return p_cls
    p_sim = logits_sim.float().softmax(dim=-1)
    return p_sim if mode == "sim" else 0.5 * (p_cls + p_sim)


def build_medmap_classifier(organ: OrganConfig, cfg: Mapping[str, Any] | FinetuneConfig,
                            text_dim: int | None) -> MedMAPClassifier:
    """Build the stage-2 model from a fine-tuning run config (``encoder``, ``model``, ``ablation``).

    ``ablation.modality_aware: false`` builds one shared encoder for all modalities;
    ``ablation.pretrained`` is read by the engine (random init when false), not here.
    """
    from medmap.models.encoders import build_encoders  # noqa: PLC0415 - keeps import light for tests

    typed = finetune_config(cfg)
    if typed.encoder.arch is None:
        raise ConfigError("fine-tuning config: 'encoder.arch' is required (a name from configs/encoders/)")
    roi = tuple(int(s) for s in organ.roi_size)
    encoders = build_encoders(typed.encoder.arch, {mod: roi for mod in organ.modalities},
                              shared=not typed.ablation.modality_aware)
    model_cfg = MedMAPModelConfig.from_run_config(typed)
    return MedMAPClassifier(organ, encoders, text_dim if model_cfg.use_text else None, model_cfg)


def ablation_switches(cfg: Mapping[str, Any] | FinetuneConfig) -> dict[str, bool]:
    """The run config's ``ablation`` section with defaults (every component on), validated.

    Example:
        >>> ablation_switches({"ablation": {"cct": False}})["cct"], ablation_switches({})["pretrained"]
        (False, True)
    """
    return asdict(finetune_config(cfg).ablation)


@dataclass
class EncoderLoadReport:
    """What :func:`load_encoders_from_pretrain` did.

    Attributes:
        loaded: encoder parameter/buffer names (relative to ``model.encoders``) that were set.
        missing: encoder names with no counterpart in the checkpoint (left at their init).
        unexpected: checkpoint encoder keys with no counterpart in the model (e.g. a
            modality that this organ does not have).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"loaded {len(self.loaded)} encoder tensors, {len(self.missing)} missing, {len(self.unexpected)} unexpected"


def load_encoders_from_pretrain(model: MedMAPClassifier, state_dict: Mapping[str, Tensor] | str | Path) -> EncoderLoadReport:
    """Initialise ``model.encoders`` from a stage-1 checkpoint, matching weights by name.

    Keys are matched after stripping everything up to the first ``encoders.`` (so
    ``encoders.<...>``, ``module.encoders.<...>`` and a bare encoder state dict all work).
    Per-modality encoders are keyed by modality name, so a stage-1 model pre-trained on more
    modalities than this organ has loads exactly the modalities it shares; the rest are
    reported as unexpected. Non-encoder stage-1 weights (projections, temperatures) are ignored.

    Args:
        model: the stage-2 model.
        state_dict: a state dict, or a path to a ``.safetensors`` / ``.pt`` file.

    Raises:
        CheckpointError: the file is unreadable, a matched tensor has a different shape, or
            nothing at all matched (almost certainly the wrong checkpoint or encoder arch).
    """
    if isinstance(state_dict, (str, Path)):
        state_dict = _read_state_dict(Path(state_dict))
    target = model.encoders.state_dict()
    merged = dict(target)
    report = EncoderLoadReport()
    mismatched = []
    for key, value in state_dict.items():
        cand = key
        if cand not in target and "encoders." in key:
            cand = key.split("encoders.", 1)[1]
        if cand in target:
            if tuple(value.shape) != tuple(target[cand].shape):
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[cand].shape)}")
                continue
            merged[cand] = value
            report.loaded.append(cand)
        elif "encoders." in key:
            report.unexpected.append(key)
    if mismatched:
        raise CheckpointError("encoder weights do not fit this model (different encoder arch?): " + "; ".join(mismatched[:5]))
    if not report.loaded:
        raise CheckpointError(
            "no encoder weights in the checkpoint match this model; check that it is a stage-1 "
            "checkpoint with the same encoder arch and modality-aware/shared setting"
        )
    loaded = set(report.loaded)
    report.missing = [k for k in target if k not in loaded]
    model.encoders.load_state_dict(merged)
    return report


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"pre-training checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return sd.get("model", sd) if isinstance(sd, dict) else sd
    except Exception as e:  # noqa: BLE001 - any read failure is a bad checkpoint for the user
        raise CheckpointError(f"cannot read pre-training checkpoint {path}: {e}") from e


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        if name not in obj:
            raise MedMAPError(f"text bank has no '{name}'")
        return obj[name]
    if not hasattr(obj, name):
        raise MedMAPError(f"text bank has no '{name}'")
    return getattr(obj, name)


def _as_tensor(x: Any, like: Tensor) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return torch.as_tensor(x).to(device=like.device, dtype=like.dtype)
