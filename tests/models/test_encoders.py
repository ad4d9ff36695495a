"""Modality-aware encoders: shapes of ViT / CNN / shared, configs as data."""

from __future__ import annotations

import pytest
import torch

from medmap.errors import ConfigError
from medmap.models.encoders import EncoderOutput, TokenPool, build_encoder, build_encoders, load_arch, pool_tokens


@pytest.mark.parametrize("arch", ["vit_small", "cnn_small"])
def test_default_archs_give_150_tokens_for_the_brain_roi(arch: str) -> None:
    enc = build_encoders(arch, {"t1": (80, 96, 80), "t2wi": (96, 96, 64)})
    out = enc(torch.randn(1, 1, 80, 96, 80), modality="t1")
    assert isinstance(out, EncoderOutput)
    assert out.grid == (5, 6, 5) and out.tokens.shape == (1, 150, enc.dim) and out.pooled.shape == (1, enc.dim)
    assert enc(torch.randn(1, 1, 96, 96, 64), modality="t2wi").grid == (6, 6, 4)
    # separate weights per modality
    assert enc.encoders["t1"] is not enc.encoders["t2wi"]
    assert enc.encoders["t1"].state_dict().keys() == enc.encoders["t2wi"].state_dict().keys()


def test_tokens_are_row_major_over_the_grid() -> None:
    enc = build_encoders({"type": "cnn", "channels": [4], "subunits": 1, "dim": 8}, {"t1": (8, 6, 4)})
    x = torch.randn(2, 1, 8, 6, 4)
    e = enc.encoder_for("t1")
    grid_feat = e.to_tokens(e.stages(x))  # [B, d, gx, gy, gz]
    out = enc(x, "t1")
    gx, gy, gz = out.grid
    ref = e.norm(grid_feat[:, :, 1, 2, 1])
    torch.testing.assert_close(out.tokens[:, 1 * gy * gz + 2 * gz + 1], ref)


def test_vit_interpolates_positional_embedding() -> None:
    enc = build_encoders("vit_small", {"t1": (32, 32, 32)})
    out = enc(torch.randn(1, 1, 48, 32, 16), modality="t1")
    assert out.grid == (3, 2, 1)


def test_shared_trunk_ablation() -> None:
    rois = {"t1": (32, 32, 32), "flair": (32, 32, 32)}
    sep = build_encoders("cnn_small", rois, shared=False)
    shared = build_encoders("cnn_small", rois, shared=True)
    assert shared.encoder_for("t1") is shared.encoder_for("flair")
    n_sep = sum(p.numel() for p in sep.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_sep == 2 * n_shared
    x = torch.randn(1, 1, 32, 32, 32)
    torch.testing.assert_close(shared(x, "t1").pooled, shared(x, "flair").pooled)


def test_bad_configs_and_inputs() -> None:
    with pytest.raises(ConfigError, match="type"):
        load_arch({"type": "resnet"})
    with pytest.raises(ConfigError, match="unknown"):
        build_encoders("no_such_arch", {"t1": (16, 16, 16)})
    with pytest.raises(ConfigError, match="divisible"):
        build_encoders({"type": "vit", "dim": 10, "heads": 4}, {"t1": (16, 16, 16)})
    enc = build_encoders("cnn_small", {"t1": (16, 16, 16)})
    with pytest.raises(KeyError, match="no encoder"):
        enc(torch.zeros(1, 1, 16, 16, 16), "flair")
    with pytest.raises(ValueError, match="B, 1"):
        enc(torch.zeros(1, 2, 16, 16, 16), "t1")


def test_patch_embedding_equals_a_strided_convolution() -> None:
    from medmap.models.encoders import PatchEmbed3d

    torch.manual_seed(0)
    pe = PatchEmbed3d(2, 5, 4)
    conv = torch.nn.Conv3d(2, 5, kernel_size=4, stride=4)
    with torch.no_grad():
        conv.weight.copy_(pe.proj.weight.reshape(5, 2, 4, 4, 4))
        conv.bias.copy_(pe.proj.bias)
    x = torch.randn(3, 2, 17, 12, 9)  # not multiples of 4: both drop the remainder
    torch.testing.assert_close(pe(x), conv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch_type", ["cnn", "vit"])
def test_max_pooling_keeps_a_single_token_finding(arch_type: str) -> None:
    small = {"cnn": {"type": "cnn", "channels": [8, 16], "dim": 16},
             "vit": {"type": "vit", "dim": 16, "depth": 1, "heads": 2, "stem_channels": 0, "patch_size": 4}}[arch_type]
    x = torch.randn(2, 1, 16, 16, 16)
    mean_enc = build_encoder(small, (16, 16, 16)).eval()
    max_enc = build_encoder({**small, "pool": "max"}, (16, 16, 16)).eval()
    max_enc.load_state_dict(mean_enc.state_dict())  # same weights: only the pooling differs
    with torch.no_grad():
        a, b = mean_enc(x), max_enc(x)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.pooled, a.tokens.mean(1)) and torch.allclose(b.pooled, b.tokens.amax(1))
    # one outstanding token moves the max-pooled vector by its full size, the mean by 1/N
    tokens = torch.zeros(1, 100, 4)
    tokens[0, 7] = torch.tensor([5.0, 0.0, 0.0, 0.0])
    assert pool_tokens(tokens, "max")[0, 0] == 5.0 and pool_tokens(tokens, "mean")[0, 0] == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="pool"):
        build_encoder({**small, "pool": "sum"}, (16, 16, 16))


def test_grid_pooling_tells_where_a_finding_is() -> None:
    # one outstanding token, once on the left and once on the right of a 4 x 2 x 2 token grid
    grid = (4, 2, 2)
    left, right = torch.zeros(1, 16, 3), torch.zeros(1, 16, 3)
    left[0, 0, 0] = right[0, 15, 0] = 5.0  # row-major: token 0 is x=0, token 15 is x=3
    for pool in ("mean", "max"):  # a whole-volume pool cannot tell the two apart
        assert torch.equal(pool_tokens(left, pool), pool_tokens(right, pool))
    gp = TokenPool("grid", dim=3, pool_grid=(2, 1, 1))
    with torch.no_grad():
        gp.proj.weight.copy_(torch.eye(3, 6))  # z = the left cell's maxima
        gp.proj.bias.zero_()
        assert gp(left, grid)[0, 0] == 5.0 and gp(right, grid)[0, 0] == 0.0
    # any input size: the adaptive pool always gives pool_grid cells
    enc = build_encoder({"type": "cnn", "channels": [8], "dim": 8, "pool": "grid", "pool_grid": [3, 2, 1]}, (16, 16, 16))
    for size in ((16, 16, 16), (24, 12, 8)):
        assert enc(torch.randn(2, 1, *size)).pooled.shape == (2, 8)
    with pytest.raises(ConfigError, match="pool_grid"):
        TokenPool("grid", dim=4, pool_grid=(2, 0, 1))


def test_attention_pooling_weights_tokens_by_a_learned_score() -> None:
    tokens = torch.zeros(1, 20, 3)
    tokens[0, 7] = torch.tensor([1.0, 2.0, 3.0])  # one outstanding token among 20
    ap = TokenPool("attention", dim=3)
    with torch.no_grad():
        ap.score.weight.zero_()
        ap.score.bias.zero_()
        # equal scores: the plain mean (the finding gets 1/N of the weight)
        torch.testing.assert_close(ap(tokens, (5, 2, 2)), tokens.mean(1))
        ap.score.weight.copy_(torch.tensor([[0.0, 0.0, 10.0]]))  # score = 10 x channel 2
        z = ap(tokens, (5, 2, 2))
    # the scored token takes nearly all the weight: 1 / (1 + 19 e^-30)
    torch.testing.assert_close(z, tokens[:, 7], atol=1e-6, rtol=0)
    # the score is trained: gradients reach it through an encoder's pooled vector
    enc = build_encoder({"type": "cnn", "channels": [8], "dim": 8, "pool": "attention"}, (16, 16, 16))
    enc(torch.randn(2, 1, 16, 16, 16)).pooled.square().sum().backward()
    assert enc.pooling.score.weight.grad is not None and enc.pooling.score.weight.grad.abs().sum() > 0
    # other poolings have no score parameters, so their checkpoints are unchanged
    assert not any("score" in k for k in build_encoder({"type": "cnn", "channels": [8], "dim": 8}, (16, 16, 16)).state_dict())


def test_densenet_encoder_stages_and_tokens() -> None:
    """The DenseNet trunk gives the brain ROI's 5 x 6 x 5 grid, and each stage's stated
    channels are those its output has (the cross-sequence exchange is sized from them)."""
    enc = build_encoder("densenet_brain", (40, 48, 40))
    x = torch.randn(2, 1, 40, 48, 40)
    feats = x
    for i, channels in enumerate(enc.stage_channels):
        feats = enc.run_stage(i, feats)
        assert feats.shape[1] == channels
    out = enc(x)
    assert out.grid == (5, 6, 5) and out.tokens.shape == (2, 150, enc.dim) and enc.stride == 8
    assert torch.allclose(enc.tokens_from(feats).tokens, out.tokens, atol=1e-6)
    three = build_encoder({"type": "densenet", "init_features": 8, "growth_rate": 4, "block_config": [1, 2, 1],
                           "dim": 16}, (32, 32, 32))
    assert three.stride == 16 and three(torch.randn(1, 1, 32, 32, 32)).grid == (2, 2, 2)


def test_densenet_encoder_rejects_an_empty_block_config() -> None:
    with pytest.raises(ConfigError, match="block_config"):
        build_encoder({"type": "densenet", "block_config": []}, (32, 32, 32))
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_encoder({"type": "densenet", "channels": [8]}, (32, 32, 32))


@pytest.mark.parametrize("size", [(9, 8, 7), (10, 12, 10), (5, 5, 6)])
def test_separable_max_pool_equals_max_pool3d(size: tuple[int, int, int]) -> None:
    """Without gradients the three 1D maxima give exactly nn.MaxPool3d's result; with
    gradients the native kernel runs, so training gets its gradients."""
    from medmap.models.encoders import SeparableMaxPool3d

    x = torch.randn(2, 3, *size)
    ours, native = SeparableMaxPool3d(3, 2, 1), torch.nn.MaxPool3d(3, 2, 1)
    with torch.no_grad():
        assert torch.equal(ours(x), native(x))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).square().sum().backward()
    native(xb).square().sum().backward()
    assert torch.equal(xa.grad, xb.grad)
