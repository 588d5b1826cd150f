"""The channels-last GroupNorm(+ReLU) kernel: built here with the machine's compiler, checked
against PyTorch's GroupNorm in float64, and used by the hybrid backbone in bf16 training."""
import pytest
import torch
import torch.nn.functional as F

from pix2tex.models import fused_norm
from pix2tex.models.fused_norm import GroupNormAct, group_norm_act


@pytest.fixture(scope="module")
def kernel():
    # A C++ compiler is part of the set-up (Linux with gcc): a build failure is a failure here.
    assert fused_norm.load(), f"the kernel did not build: {fused_norm._error}"


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("shape,groups,relu", [
    ((4, 64, 12, 20), 32, True),    # 2 channels per group, as in the stem
    ((3, 96, 7, 9), 8, False),      # odd sizes, no activation (the last norm of a block)
    ((1, 32, 16, 16), 4, True),     # one image: work is split over rows, not samples
])
def test_matches_group_norm_in_float64(kernel, shape, groups, relu):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 5).bfloat16()  # mean far from 0 against the spread
    weight, bias = torch.randn(shape[1]) * 0.5 + 1, torch.randn(shape[1]) * 0.1
    dy = torch.randn(shape).bfloat16()

    xf = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    y = group_norm_act(xf, groups, w, b, 1e-5, relu)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)

    xd, wd, bd = (t.double().requires_grad_() for t in (x, weight, bias))
    yd = F.group_norm(xd, groups, wd, bd, 1e-5)
    yd = yd.relu() if relu else yd
    yd.backward(dy.double())
    # bf16 output and input gradient: a few units of bf16 rounding (2^-8); float32 parameter grads
    assert rel_err(y, yd) < 5e-3
    assert rel_err(xf.grad, xd.grad) < 5e-3
    assert rel_err(w.grad, wd.grad) < 1e-3
    assert rel_err(b.grad, bd.grad) < 1e-3


def test_rejects_what_it_does_not_implement(kernel):
    x = torch.randn(2, 8, 4, 4).bfloat16()
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="channels-last"):
        fused_norm._kernel.forward(x, w, b, None, 4, 1e-5, True)  # NCHW
    with pytest.raises(RuntimeError, match="bfloat16"):
        fused_norm._kernel.forward(x.float().contiguous(memory_format=torch.channels_last), w, b, None, 4, 1e-5, True)
    with pytest.raises(RuntimeError, match="groups"):
        fused_norm._kernel.forward(x.contiguous(memory_format=torch.channels_last), w, b, None, 3, 1e-5, True)


def test_module_keeps_timm_parameters_and_falls_back_outside_bf16_cpu(kernel):
    from timm.layers import GroupNormAct as TimmGroupNormAct

    torch.manual_seed(0)
    ours, timm_norm = GroupNormAct(64, num_groups=32), TimmGroupNormAct(64, num_groups=32)
    timm_norm.load_state_dict(ours.state_dict())  # the same state dict: checkpoints carry over
    x = torch.randn(2, 64, 6, 10)
    assert torch.equal(ours(x), timm_norm(x))  # float32: PyTorch's own GroupNorm, bit for bit
    xb = x.bfloat16()
    assert ours(xb).is_contiguous(memory_format=torch.channels_last)  # the kernel
    assert rel_err(ours(xb), timm_norm.double()(xb.double()).detach()) < 5e-3


def test_backbone_trains_channels_last_with_the_kernel_and_without_it(kernel, hybrid_batch):
    """One bf16 training step of the tiny hybrid model with and without the kernel: same loss and
    gradients up to bf16 rounding, and the kernel's backbone runs channels-last."""
    def features():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return hybrid_batch.model.encoder.patch_embed.backbone(hybrid_batch.images)

    assert features().is_contiguous(memory_format=torch.channels_last)
    loss, grads = hybrid_batch.bf16_step()
    kernel_module, fused_norm._kernel = fused_norm._kernel, None
    try:
        assert not features().is_contiguous(memory_format=torch.channels_last)
        loss_ref, grads_ref = hybrid_batch.bf16_step()
    finally:
        fused_norm._kernel = kernel_module
    assert abs(loss - loss_ref) < 1e-2 * abs(loss_ref)
    assert rel_err(grads, grads_ref.double()) < 0.05  # bf16 through a dozen layers, both ways
