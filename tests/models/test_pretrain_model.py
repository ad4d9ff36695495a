"""MedMAPPretrainModel: pair extraction, normalised projections, clamped temperatures."""

from __future__ import annotations

import math

import torch

from medmap.models.pretrain import MedMAPPretrainModel

TINY = {"type": "cnn", "channels": [4, 8], "subunits": 1, "dim": 16}


def test_forward_pairs_only_present_modalities() -> None:
    mods = ["t1", "t2", "flair"]
    model = MedMAPPretrainModel(["x"] + mods, {m: (16, 16, 16) for m in ["x"] + mods}, arch=TINY, text_dim=12, embed_dim=8)
    present = torch.tensor([[True, False, True], [True, True, False]])
    out = model(torch.randn(2, 3, 16, 16, 16), present, mods, torch.randn(2, 3, 12))
    assert out["v"].shape == (4, 8) and out["t"].shape == (4, 8)
    torch.testing.assert_close(out["v"].norm(dim=1), torch.ones(4))
    # modality indices are global (position in the model's list), pairs follow the mask
    assert sorted(out["modality"].tolist()) == [1, 1, 2, 3]
    assert {tuple(p) for p in out["pair_index"].tolist()} == {(0, 0), (1, 0), (1, 1), (0, 2)}
    assert out["logit_scale"].shape == (4,)


def test_logit_scale_is_clamped() -> None:
    model = MedMAPPretrainModel(["t1"], {"t1": (16, 16, 16)}, arch=TINY, text_dim=4, embed_dim=4, max_logit_scale=100.0)
    with torch.no_grad():
        model.log_temperature.fill_(10.0)
    assert math.isclose(model.logit_scale().item(), 100.0, rel_tol=1e-6)
    with torch.no_grad():
        model.log_temperature.fill_(-3.0)
    assert model.logit_scale().item() == 1.0
    assert math.isclose(MedMAPPretrainModel(["t1"], {"t1": (16, 16, 16)}, arch=TINY, text_dim=4).logit_scale().item(), 1 / 0.07, rel_tol=1e-5)
