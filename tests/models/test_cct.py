import pytest
import torch

from medmap.models.cct import CrossCognitionTransformer


@pytest.mark.parametrize("pooling", ["mean", "attention", "max"])
def test_cct_shapes_and_masked_tokens_have_no_influence(pooling):
    torch.manual_seed(0)
    cct = CrossCognitionTransformer(16, num_heads=4, num_layers=2, pooling=pooling).eval()
    v = torch.randn(2, 10, 16)
    q = torch.randn(2, 5, 16)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    out = cct(v, q, pad, num_class_tokens=3)
    assert out.pooled.shape == (2, 16) and out.class_tokens.shape == (2, 3, 16)
    assert torch.allclose(out.pool_weights.sum(1), torch.ones(2))
    assert (out.pool_weights[1, 6:] == 0).all()
    v2 = v.clone()
    v2[1, 6:] = 1e3 * torch.randn(4, 16)
    out2 = cct(v2, q, pad, num_class_tokens=3)
    assert torch.equal(out.pooled[1], out2.pooled[1])
    assert torch.equal(out.class_tokens[1], out2.class_tokens[1])
    # and the unmasked study does see its own tokens change
    v3 = v.clone()
    v3[0, 0] += torch.randn(16)
    assert not torch.allclose(cct(v3, q, pad, 3).pooled[0], out.pooled[0])


def test_cct_masked_equals_truncated():
    # Masking a tail of tokens gives the same result as not having them at all.
    torch.manual_seed(1)
    cct = CrossCognitionTransformer(16, num_heads=2, num_layers=1, pooling="attention").eval()
    v, q = torch.randn(1, 9, 16), torch.randn(1, 4, 16)
    pad = torch.zeros(1, 9, dtype=torch.bool)
    pad[0, 5:] = True
    full = cct(v, q, pad, 2)
    short = cct(v[:, :5], q, pad[:, :5], 2)
    assert torch.allclose(full.pooled, short.pooled, atol=1e-5)
    assert torch.allclose(full.class_tokens, short.class_tokens, atol=1e-5)


def test_cct_rejects_all_missing_study():
    cct = CrossCognitionTransformer(8, num_heads=2, num_layers=1)
    with pytest.raises(ValueError, match="no present"):
        cct(torch.randn(1, 3, 8), torch.randn(1, 2, 8), torch.ones(1, 3, dtype=torch.bool), 1)


@pytest.mark.parametrize("train", [True, False])
def test_cct_without_missing_tokens_skips_the_mask_and_computes_the_same(train):
    # No padded token: CCT drops the mask (fused attention kernels); the result and the
    # gradients are those of the layers run with an all-False mask.
    torch.manual_seed(2)
    cct = CrossCognitionTransformer(16, num_heads=4, num_layers=2, self_attention=True).train(train)
    v = torch.randn(3, 12, 16, requires_grad=True)
    q = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 12, dtype=torch.bool)
    fast = cct(v, q, pad, num_class_tokens=2)
    (grad_fast,) = torch.autograd.grad(fast.pooled.sum() + fast.class_tokens.sum(), v)
    h, t = v, q
    for layer in cct.layers:
        h, t = layer(h, t, pad)
    pooled = cct.v_norm(h).mean(dim=1)
    class_tokens = cct.q_norm(t)[:, :2]
    (grad_masked,) = torch.autograd.grad(pooled.sum() + class_tokens.sum(), v)
    assert torch.allclose(fast.pooled, pooled, atol=1e-5)
    assert torch.allclose(fast.class_tokens, class_tokens, atol=1e-5)
    assert torch.allclose(grad_fast, grad_masked, atol=1e-5)
