"""Attention kernels for bf16 training on CPU: the same function and gradients as PyTorch's
scaled_dot_product_attention in float64, and the encoder/decoder route through them."""
import pytest
import torch
import torch.nn.functional as F

from pix2tex.models import attention


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("L,S,causal,kernel", [(30, 30, True, "matmul"), (30, 70, False, "matmul"),
                                                (150, 150, False, "matmul"),
                                                (300, 300, False, "flash32")])
def test_attention_matches_sdpa_in_float64(L, S, causal, kernel):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 16).bfloat16() for n in (L, S, S))
    assert attention.kernel_for(q, k, causal) == kernel
    dout = torch.randn(2, 4, L, 16).bfloat16()
    qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention.attention(qb, kb, vb, is_causal=causal)
    out.backward(dout)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal)
    ref.backward(dout.double())
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
    for got, want in ((qb.grad, qd.grad), (kb.grad, kd.grad), (vb.grad, vd.grad)):
        assert rel_err(got, want) < 2e-2


def test_inference_and_float32_use_pytorch_sdpa_unchanged():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    assert torch.equal(attention.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    with torch.no_grad():
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        assert torch.equal(attention.attention(qb, kb, vb, is_causal=True),
                           F.scaled_dot_product_attention(qb, kb, vb, is_causal=True))


def test_model_routes_attention_and_keeps_x_transformers_results(monkeypatch, hybrid_batch):
    """The ViT blocks and every decoder attention call go through attention(); with the routing
    undone (x-transformers' and timm's own SDPA) the bf16 loss and gradients agree."""
    calls = []
    routed = attention.attention

    def counting(q, k, v, is_causal=False, dropout_p=0.0):
        calls.append((tuple(q.shape), tuple(k.shape), is_causal))
        return routed(q, k, v, is_causal=is_causal, dropout_p=dropout_p)

    monkeypatch.setattr(attention, "attention", counting)
    loss, grads = hybrid_batch.bf16_step()
    # 1 encoder block + 2 decoder layers x (causal self-attention, cross-attention)
    assert sum(1 for _, _, c in calls if c) == 2 and len(calls) == 5
    monkeypatch.setattr(attention, "attention",
                        lambda q, k, v, is_causal=False, dropout_p=0.0:
                        F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))
    loss_ref, grads_ref = hybrid_batch.bf16_step()
    assert abs(loss - loss_ref) < 1e-2 * abs(loss_ref)
    assert rel_err(grads, grads_ref.double()) < 0.05


def test_vit_attention_long_sequences_match_timm():
    """Above SHORT the ViT's attention casts q, k, v to float32 together for flash: same outputs
    and gradients as timm's own attention (bf16 SDPA) up to bf16 rounding."""
    from timm.layers import Attention as TimmAttention

    torch.manual_seed(0)
    ours, theirs = attention.Attention(64, num_heads=4), TimmAttention(64, num_heads=4)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, attention.SHORT // 64 + 1, 64)  # queries x keys above SHORT: float32 flash
    grads = []
    for module in (ours, theirs):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xx)
        out.float().square().mean().backward()
        grads.append((out.float(), xx.grad, module.qkv.weight.grad))
    for got, want in zip(*grads):
        assert rel_err(got, want.double()) < 2e-2
