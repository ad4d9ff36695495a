import pytest
import torch

from medmap.config import load_config, load_organ_config
from medmap.errors import CheckpointError, ConfigError, MedMAPError
from medmap.losses.finetune import build_medmap_loss
from medmap.models.medmap import (
    MedMAPClassifier,
    MedMAPModelConfig,
    build_medmap_classifier,
    combine_head_probabilities,
    load_encoders_from_pretrain,
)

from tests.helpers.stage2 import ROI, TEXT_DIM, make_bank, make_batch, make_encoders, make_organ, make_run_config


def _model(organ, **kw):
    torch.manual_seed(0)
    cfg = MedMAPModelConfig(num_heads=2, mlp_ratio=2.0, dropout=0.0, cct_layers=1, **kw)
    return MedMAPClassifier(organ, make_encoders(organ), TEXT_DIM, cfg)


@pytest.mark.parametrize("num_modalities", [1, 2, 4])
def test_forward_shapes_any_number_of_modalities(num_modalities):
    organ = make_organ(num_modalities, num_classes=3)
    model = _model(organ)
    images, present, _ = make_batch(organ, b=3)
    out = model(images, present, make_bank(organ))
    assert out["logits_cls"].shape == (3, 3) and out["logits_sim"].shape == (3, 3)
    assert torch.allclose(out["probs"].sum(1), torch.ones(3), atol=1e-5)
    assert out["features"].shape == (3, 16) and out["class_tokens"].shape == (3, 3, 16)
    for mi, name in enumerate(organ.modalities):
        rows = present[:, mi].nonzero(as_tuple=True)[0]
        if len(rows):
            assert torch.equal(out["token_index"][name], rows)
            assert out["tokens"][name].shape == (len(rows), 12, 16) and out["token_grids"][name] == (2, 2, 3)
        else:
            assert name not in out["tokens"]


@pytest.mark.parametrize("ablation", [{}, {"cct": False}, {"csa": False}, {"text": False}])
def test_absent_modality_cannot_change_outputs(ablation):
    organ = make_organ(3)
    torch.manual_seed(0)
    model = build_medmap_classifier(organ, make_run_config(**ablation), TEXT_DIM).eval()
    bank = make_bank(organ)
    present = torch.tensor([[True, False, True], [True, True, False]])
    images, present, _ = make_batch(organ, b=2, present=present)
    noisy = images.clone()
    noisy[0, 1] = 100 * torch.randn(ROI)
    noisy[1, 2] = float("nan")  # never read
    with torch.no_grad():
        a, b = model(images, present, bank), model(noisy, present, bank)
    assert torch.equal(a["logits_cls"], b["logits_cls"]) and torch.equal(a["probs"], b["probs"])
    assert torch.isfinite(b["probs"]).all()


def test_batch_composition_does_not_leak_missing_modalities():
    # Study 0 lacks m1; alone, m1 is dropped from V entirely; batched with a study that has
    # m1, its m1 tokens exist but are masked. Both must give the same prediction.
    organ = make_organ(3)
    model = _model(organ).eval()
    bank = make_bank(organ)
    images, present, _ = make_batch(organ, b=2, present=torch.tensor([[True, False, True], [True, True, True]]))
    with torch.no_grad():
        together = model(images, present, bank)
        alone = model(images[:1], present[:1], bank)
    assert torch.allclose(together["logits_cls"][0], alone["logits_cls"][0], atol=1e-5)
    assert torch.allclose(together["logits_sim"][0], alone["logits_sim"][0], atol=1e-5)


@pytest.mark.parametrize(
    "ablation",
    [
        {},
        {"modality_aware": False},
        {"csa": False},
        {"cct": False},
        {"kl": False},
        {"text": False},
        {"csa": False, "cct": False, "text": False},
    ],
    ids=["full", "shared_encoder", "no_csa", "no_cct", "no_kl", "no_text", "vision_baseline"],
)
def test_each_ablation_builds_and_trains(ablation):
    organ = make_organ(3, num_classes=3)
    cfg = make_run_config(**ablation)
    torch.manual_seed(0)
    model = build_medmap_classifier(organ, cfg, TEXT_DIM)
    loss_fn = build_medmap_loss(cfg, organ.num_classes)
    if ablation.get("modality_aware") is False:
        assert model.encoders.shared
    if ablation.get("kl") is False:
        assert loss_fn.lambda_kl == 0.0
    bank = make_bank(organ) if ablation.get("text", True) else None
    images, present, labels = make_batch(organ, b=4)
    opt = torch.optim.Adam(model.parameter_groups(lr=3e-3, weight_decay=0.0))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = []
    for _ in range(3):
        out = model(images, present, bank)
        loss, parts = loss_fn(out, labels)
        assert torch.isfinite(loss) and all(torch.isfinite(p) for p in parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert (out["logits_sim"] is None) == (not ablation.get("text", True))
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoders.") for k in changed) and any(k.startswith("classifier.") for k in changed)
    assert losses[-1] < losses[0]


def test_saliency_gradients_reach_tokens_and_images(organ, bank):
    model = _model(organ).eval()
    images, present, _ = make_batch(organ, b=2, present=torch.ones(2, 3, dtype=torch.bool))
    images.requires_grad_(True)
    out = model(images, present, bank)
    tok = out["tokens"]["m1"]
    g_tok, g_img = torch.autograd.grad(out["probs"][:, 1].sum(), [tok, images])
    assert g_tok.shape == tok.shape and g_tok.abs().sum() > 0
    assert g_img.abs().sum() > 0


def test_prediction_modes():
    lc, ls = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert torch.allclose(combine_head_probabilities(lc, ls, "avg"), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(combine_head_probabilities(lc, ls, "cls"), lc.softmax(-1))
    assert torch.allclose(combine_head_probabilities(lc, ls, "sim"), ls.softmax(-1))
    assert torch.allclose(combine_head_probabilities(lc, None, "avg"), lc.softmax(-1))


def test_tau_is_clamped(organ):
    model = _model(organ, tau_max=20.0)
    with torch.no_grad():
        model.log_tau.fill_(10.0)
    assert float(model.tau.detach()) == 20.0


def test_clear_errors_for_bad_inputs(organ, bank):
    model = _model(organ)
    images, present, _ = make_batch(organ, b=2)
    with pytest.raises(MedMAPError, match="no text bank"):
        model(images, present, None)
    with pytest.raises(MedMAPError, match="at least one present"):
        model(images, torch.zeros(2, 3, dtype=torch.bool), bank)
    with pytest.raises(MedMAPError, match="M=3"):
        model(images[:, :2], present[:, :2], bank)
    wrong = make_bank(make_organ(3, num_classes=4))
    wrong.classes = list(organ.classes) + ["c3"]
    with pytest.raises(MedMAPError, match="classes"):
        model(images, present, wrong)
    with pytest.raises(ConfigError, match="prediction"):
        MedMAPModelConfig(prediction="max")
    with pytest.raises(ConfigError, match="ablation"):
        build_medmap_classifier(organ, make_run_config(no_such_switch=False), TEXT_DIM)


def test_padded_prompts_are_ignored(organ):
    model = _model(organ).eval()
    bank = make_bank(organ, prompts=2)
    padded = make_bank(organ, prompts=2)
    padded.class_emb = torch.cat([bank.class_emb, torch.zeros(3, 1, TEXT_DIM)], dim=1)  # P=3 with zero padding
    images, present, _ = make_batch(organ, b=2)
    with torch.no_grad():
        assert torch.allclose(model(images, present, bank)["probs"], model(images, present, padded)["probs"])


def test_load_encoders_from_pretrain_by_modality_name(tmp_path):
    organ = make_organ(2)
    model = _model(organ)
    # A stage-1 model pre-trained on three modalities (one this organ lacks), saved with
    # the pre-training model's prefixes and a non-encoder tensor.
    other = make_encoders(make_organ(3))
    sd = {f"encoders.{k}": v + 1.0 for k, v in other.state_dict().items()}
    sd["projections.m0.weight"] = torch.zeros(4, 4)
    report = load_encoders_from_pretrain(model, sd)
    assert not report.missing
    assert report.unexpected and all(".m2." in k for k in report.unexpected)
    assert torch.equal(model.encoders.state_dict()["encoders.m1.to_tokens.weight"], sd["encoders.encoders.m1.to_tokens.weight"])
    # from a safetensors file
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    assert load_encoders_from_pretrain(_model(organ), tmp_path).summary().startswith("loaded")


def test_load_encoders_from_pretrain_errors():
    organ = make_organ(2)
    model = _model(organ)
    with pytest.raises(CheckpointError, match="no encoder weights"):
        load_encoders_from_pretrain(model, {"foo.weight": torch.zeros(1)})
    bad = {f"encoders.{k}": torch.zeros(1, *v.shape) for k, v in model.encoders.state_dict().items()}
    with pytest.raises(CheckpointError, match="do not fit"):
        load_encoders_from_pretrain(model, bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_encoders_from_pretrain(model, "/nonexistent/model.safetensors")


@pytest.mark.parametrize("name", ["brain", "liver", "tiny"])
def test_shipped_finetune_configs_build(name):
    cfg = load_config(name, "finetune")
    organ = load_organ_config(cfg["organ"])
    model_cfg = MedMAPModelConfig.from_run_config(cfg)
    assert model_cfg.use_text and model_cfg.use_csa and model_cfg.use_cct
    loss = build_medmap_loss(cfg, organ.num_classes, class_weights=torch.ones(organ.num_classes))
    assert loss.lambda_kl > 0 and loss.lambda_sim > 0
    if name == "tiny":
        model = build_medmap_classifier(organ, cfg, TEXT_DIM)
        assert model.dim == 16


@pytest.mark.parametrize("shared", [False, True])
def test_load_encoders_from_a_stage1_model(shared):
    from medmap.models.pretrain import MedMAPPretrainModel
    from tests.helpers.stage2 import TINY_ARCH

    organ = make_organ(2)
    stage1 = MedMAPPretrainModel(["m0", "m1", "m2"], {m: ROI for m in ["m0", "m1", "m2"]}, arch=TINY_ARCH,
                                 text_dim=TEXT_DIM, embed_dim=8, shared_encoder=shared)
    cfg = MedMAPModelConfig(num_heads=2, cct_layers=1)
    model = MedMAPClassifier(organ, make_encoders(organ, shared=shared), TEXT_DIM, cfg)
    report = load_encoders_from_pretrain(model, stage1.state_dict())
    assert not report.missing
    assert bool(report.unexpected) != shared  # m2's encoder has no place in a 2-modality organ
    for k, v in model.encoders.state_dict().items():
        assert torch.equal(v, stage1.encoders.state_dict()[k])


def test_ablation_switches_defaults_and_validation():
    from medmap.models.medmap import ablation_switches

    assert all(ablation_switches({}).values())
    assert ablation_switches({"ablation": {"pretrained": False}})["pretrained"] is False
    with pytest.raises(ConfigError, match="true or false"):
        ablation_switches({"ablation": {"cct": "no"}})


FUSION_OPTIONS = [
    {"token_positions": True},
    {"cct": {"layers": 1, "self_attention": True}},
    {"token_fusion": "location"},
    {"sequence_exchange": True},
    {"token_positions": True, "token_fusion": "location", "sequence_exchange": True,
     "cct": {"layers": 1, "self_attention": True}},
]


@pytest.mark.parametrize("options", FUSION_OPTIONS, ids=["positions", "self_attention", "location", "exchange", "all"])
def test_fusion_options_keep_missing_modalities_out(options):
    """Token positions, CCT self-attention and per-location fusion: an absent modality still
    cannot change any output, and a study predicts the same alone or in a batch."""
    organ = make_organ(3)
    cfg = make_run_config()
    cfg["model"] = {**cfg["model"], **options}
    torch.manual_seed(0)
    model = build_medmap_classifier(organ, cfg, TEXT_DIM).eval()
    bank = make_bank(organ)
    present = torch.tensor([[True, False, True], [True, True, True]])
    images, present, _ = make_batch(organ, b=2, present=present)
    noisy = images.clone()
    noisy[0, 1] = float("nan")
    with torch.no_grad():
        a, b = model(images, present, bank), model(noisy, present, bank)
        alone = model(images[:1], present[:1], bank)
    assert torch.equal(a["probs"], b["probs"]) and torch.isfinite(b["probs"]).all()
    assert torch.allclose(a["logits_cls"][0], alone["logits_cls"][0], atol=1e-5)
    if options.get("token_fusion") == "location":
        assert a["pool_weights"].shape == (2, 12)  # one visual token per cell of the 2 x 2 x 3 grid


def test_csa_in_one_call_equals_one_call_per_modality():
    """CSA runs every modality's tokens in one batched call; the result is that of separate calls."""
    organ = make_organ(3)
    model = _model(organ).eval()
    bank = make_bank(organ)
    images, present, _ = make_batch(organ, b=3, present=torch.ones(3, 3, dtype=torch.bool))
    class_tokens, modality_tokens = model.project_text(bank)
    with torch.no_grad():
        encoded = model._encode(images, present)
        batched = model._aggregate(encoded, class_tokens, modality_tokens)
        for name, (mi, _, z, grid, _) in encoded.items():
            one = model.csa(z, grid, mi, class_tokens, modality_tokens)
            assert torch.allclose(batched[name], one, atol=1e-5), name


def test_grid_positions_tell_centre_from_rim():
    from medmap.models.positions import GridPositionEmbedding, grid_coordinates

    xyz = grid_coordinates((3, 3, 2))
    assert xyz.shape == (18, 3) and xyz[8, :2].tolist() == [0.0, 0.0] and xyz[0].tolist() == [-1.0, -1.0, -1.0]
    pos = GridPositionEmbedding(dim=8)
    assert torch.equal(pos((3, 3, 2)), torch.zeros(18, 8))  # starts as a no-op
    torch.nn.init.normal_(pos.net[2].weight)
    emb = pos((3, 3, 2))
    assert not torch.allclose(emb[8], emb[0])


def test_token_fusion_is_checked():
    with pytest.raises(ConfigError, match="token_fusion must be one of sequence, location"):
        MedMAPModelConfig(token_fusion="voxel")


DENSENET = {"type": "densenet", "init_features": 4, "growth_rate": 2, "block_config": [1], "dim": 16}  # stride 4: the 2 x 2 x 3 grid


@pytest.mark.parametrize("arch", [None, DENSENET], ids=["cnn", "densenet"])
def test_sequence_exchange_starts_as_separate_encoders_and_then_mixes(arch):
    """Zero-initialised, the exchange leaves every encoder as it was (stage-1 weights act
    unchanged); once trained, a sequence's tokens depend on the other sequences."""
    organ = make_organ(3)
    cfg = make_run_config()
    if arch is not None:
        cfg["encoder"] = {"arch": arch}
    plain = build_medmap_classifier(organ, cfg, TEXT_DIM).eval()
    cfg["model"] = {**cfg["model"], "sequence_exchange": True}
    mixed = build_medmap_classifier(organ, cfg, TEXT_DIM).eval()
    mixed.load_state_dict({**plain.state_dict(), **{k: v for k, v in mixed.state_dict().items() if k.startswith("exchange.")}})
    bank = make_bank(organ)
    images, present, _ = make_batch(organ, b=2, present=torch.ones(2, 3, dtype=torch.bool))
    with torch.no_grad():
        assert torch.allclose(plain(images, present, bank)["probs"], mixed(images, present, bank)["probs"], atol=1e-6)
        for conv in mixed.exchange.mix:
            torch.nn.init.normal_(conv.weight, std=0.1)
        other = images.clone()
        other[:, 1] = torch.randn_like(other[:, 1])
        a, b = mixed(images, present, bank)["tokens"]["m0"], mixed(other, present, bank)["tokens"]["m0"]
    assert not torch.allclose(a, b)  # m0's tokens now see m1


def test_sequence_exchange_needs_cnn_encoders():
    organ = make_organ(2)
    cfg = make_run_config()
    cfg["encoder"] = {"arch": {"type": "vit", "dim": 16, "depth": 1, "heads": 2, "patch_size": 4, "stem_channels": 0}}
    cfg["model"] = {**cfg["model"], "sequence_exchange": True}
    with pytest.raises(ConfigError, match="sequence_exchange needs CNN encoders"):
        build_medmap_classifier(organ, cfg, TEXT_DIM)
