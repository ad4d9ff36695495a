import pytest
import torch

from medmap.data.augment import build_augmentation
from medmap.errors import ConfigError

OFF = {"flip": {"prob": 0.0}, "affine": {"prob": 0.0}, "bias_field": {"prob": 0.0}, "scale_shift": {"prob": 0.0}, "noise": {"prob": 0.0}}


def _sample(m: int = 3, missing: int | None = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(m, 16, 14, 12)
    images[:, 3:13, 3:11, 2:10] = torch.randn(1, 10, 8, 8, generator=g).expand(m, -1, -1, -1)
    images[:, 3:6, 3:6, 2:5] += 5.0  # an asymmetric marker
    present = torch.ones(m, dtype=torch.bool)
    if missing is not None:
        images[missing] = 0
        present[missing] = False
    return {"images": images, "present": present, "affine": torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)), "study_id": "s"}


def test_same_spatial_transform_for_all_modalities():
    cfg = {**OFF, "flip": {"prob": 1.0}, "affine": {"prob": 1.0, "degrees": 15, "scales": 0.1, "translation_mm": 4}}
    s = _sample()
    out = build_augmentation(cfg, seed=0)(s)
    assert not torch.equal(out["images"][0], s["images"][0])
    assert torch.equal(out["images"][0], out["images"][1])  # identical input -> identical output
    assert torch.count_nonzero(out["images"][2]) == 0  # missing stays zero
    assert torch.equal(out["present"], s["present"]) and out["study_id"] == "s"


def test_flip_is_left_right_in_ras():
    s = _sample(missing=None)
    out = build_augmentation({**OFF, "flip": {"prob": 1.0, "axes": [0]}}, seed=0)(s)
    assert torch.equal(out["images"], s["images"].flip(1))


def test_intensity_transforms_respect_present_and_background():
    cfg = {**OFF, "bias_field": {"prob": 1.0}, "scale_shift": {"prob": 1.0, "scale": 0.2, "shift": 0.3}}
    s = _sample()
    out = build_augmentation(cfg, seed=1)(s)["images"]
    assert torch.count_nonzero(out[2]) == 0
    bg = s["images"][0] == 0
    assert torch.all(out[0][bg] == 0)  # scale/shift and bias field leave the zero background alone
    assert not torch.allclose(out[0], s["images"][0])


def test_reproducible_and_leaves_global_rng_alone():
    s = _sample()
    state = torch.get_rng_state()
    a = build_augmentation(None, seed=7)
    b = build_augmentation(None, seed=7)
    outs_a = [a(s)["images"] for _ in range(3)]
    outs_b = [b(s)["images"] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    assert not all(torch.equal(outs_a[0], x) for x in outs_a[1:])  # calls differ from each other
    assert torch.equal(torch.get_rng_state(), state)
    c = build_augmentation(None, seed=8)
    assert not all(torch.equal(x, c(s)["images"]) for x in outs_a[:1])


def test_disabled_and_bad_config():
    s = _sample()
    assert build_augmentation({"enabled": False}, seed=0)(s) is s
    with pytest.raises(ConfigError, match="unknown keys \\['rotate'\\]"):
        build_augmentation({"rotate": {}}, seed=0)
    with pytest.raises(ConfigError, match="'noise.prob' must be in"):
        build_augmentation({"noise": {"prob": 2}}, seed=0)
    with pytest.raises(ConfigError, match="'flip': unknown keys"):
        build_augmentation({"flip": {"p": 0.5}}, seed=0)


def test_sequence_dropout_removes_present_sequences_and_keeps_one():
    s = _sample(m=6, missing=2)
    always = build_augmentation({**OFF, "sequence_dropout": {"prob": 1.0}}, seed=3)
    for _ in range(5):
        out = always(s)
        kept = [i for i in range(6) if out["present"][i]]
        assert len(kept) == 1 and kept[0] != 2  # one present sequence survives; the missing one stays missing
        assert all(torch.count_nonzero(out["images"][i]) == 0 for i in range(6) if i not in kept)
        assert torch.equal(out["images"][kept[0]], s["images"][kept[0]])  # the kept one is untouched
    assert torch.equal(s["present"], torch.tensor([True, True, False, True, True, True]))  # input not modified
    some = build_augmentation({**OFF, "sequence_dropout": {"prob": 0.5}}, seed=3)
    counts = {int(some(s)["present"].sum()) for _ in range(20)}
    assert len(counts) > 1 and max(counts) <= 5 and min(counts) >= 1


def test_sequence_dropout_leaves_the_other_draws_unchanged():
    s = _sample()
    plain = build_augmentation(None, seed=5)(s)
    with_dropout = build_augmentation({"sequence_dropout": {"prob": 0.5}}, seed=5)(s)
    for i in range(3):
        if with_dropout["present"][i]:
            assert torch.equal(with_dropout["images"][i], plain["images"][i])


def _deg(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_world_affine_rotates_in_millimetres_not_voxels():
    """90 degrees about z: the output at world offset (a, b) mm shows the input at (-b, a) mm,
    on isotropic voxels and on voxels twice as long along y."""
    from medmap.data.augment import world_affine

    one = _deg(1.0, 1.0, 1.0)
    iso = torch.randn(1, 5, 5, 3)
    out = world_affine(iso, torch.eye(4, dtype=torch.float64), _deg(0, 0, 90), one, _deg(0, 0, 0))
    for a in range(-2, 3):
        for b in range(-2, 3):
            assert torch.allclose(out[0, 2 + a, 2 + b], iso[0, 2 - b, 2 + a], atol=1e-5)
    aniso = torch.randn(1, 9, 5, 3)  # 1 mm along x, 2 mm along y: a 9 x 10 mm field, centre voxel (4, 2, 1)
    affine = torch.diag(_deg(1.0, 2.0, 1.0, 1.0))
    out = world_affine(aniso, affine, _deg(0, 0, 90), one, _deg(0, 0, 0))
    for a in (-4, -2, 0, 2, 4):          # x offset in mm (= voxels)
        for j in (-1, 0, 1):             # y offset in voxels (2j mm)
            # input at (-2j mm, a mm) = voxel (4 - 2j, 2 + a / 2)
            assert torch.allclose(out[0, 4 + a, 2 + j, 1], aniso[0, 4 - 2 * j, 2 + a // 2, 1], atol=1e-5)


def test_world_affine_identity_and_scaling():
    from medmap.data.augment import world_affine

    x = torch.randn(2, 7, 6, 5)
    eye = torch.diag(_deg(1.5, 1.5, 3.0, 1.0))
    same = world_affine(x, eye, _deg(0, 0, 0), _deg(1, 1, 1), _deg(0, 0, 0))
    assert torch.allclose(same, x, atol=1e-5)
    ramp = torch.arange(7.0).reshape(1, 7, 1, 1).expand(1, 7, 6, 5)
    zoomed = world_affine(ramp, eye, _deg(0, 0, 0), _deg(0.5, 1, 1), _deg(0, 0, 0))  # samples half the field: 2x zoom
    assert torch.allclose(zoomed[0, :, 0, 0], 3.0 + 0.5 * (torch.arange(7.0) - 3.0), atol=1e-5)

