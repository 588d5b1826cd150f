"""Distillation: losses are minimal when student == teacher, grow otherwise, ignore padding."""
import pytest
import torch

from pix2tex.distill.losses import EmbeddingLoss, hard_loss, match_grid, soft_loss, target_loss

B, T, V, D = 3, 7, 11, 8


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(B, T, V, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False  # a short sequence: positions 4.. are padding
    mask[2, 6:] = False
    return teacher, mask, g


def test_soft_loss_zero_for_identical_logits_and_grows(batch):
    teacher, mask, g = batch
    assert soft_loss(teacher.clone(), teacher, mask, 2.0).abs() < 1e-6
    near = soft_loss(teacher + 0.1 * torch.randn(B, T, V, generator=g), teacher, mask, 2.0)
    far = soft_loss(teacher + 1.0 * torch.randn(B, T, V, generator=g), teacher, mask, 2.0)
    assert 0 < near < far


def test_soft_loss_has_t_squared_scaling(batch):
    teacher, mask, g = batch
    student = torch.randn(B, T, V, generator=g)
    t = 3.0
    p_t = torch.softmax(teacher / t, -1)
    kl = (p_t * (torch.log_softmax(teacher / t, -1) - torch.log_softmax(student / t, -1))).sum(-1)
    expected = kl[mask].mean() * t * t
    torch.testing.assert_close(soft_loss(student, teacher, mask, t), expected)


def test_hard_loss_minimal_when_student_agrees(batch):
    teacher, mask, g = batch
    confident = torch.nn.functional.one_hot(teacher.argmax(-1), V).float() * 50
    assert hard_loss(confident, teacher, mask) < 1e-6
    assert hard_loss(torch.randn(B, T, V, generator=g), teacher, mask) > 1.0


def test_target_loss_ignores_padding(batch):
    teacher, mask, g = batch
    targets = torch.randint(3, V, (B, T), generator=g)
    targets[~mask] = 0
    base = target_loss(teacher, targets)
    changed = teacher.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 100  # logits at padding positions
    torch.testing.assert_close(target_loss(changed, targets), base)


@pytest.mark.parametrize("loss", ["soft", "hard", "mse", "cosine"])
def test_padding_positions_do_not_affect_losses(batch, loss):
    teacher, mask, g = batch
    student = torch.randn(B, T, V, generator=g)
    garbage = torch.randn(B, T, V, generator=g) * 100

    def value(s, t):
        if loss == "soft":
            return soft_loss(s, t, mask, 2.0)
        if loss == "hard":
            return hard_loss(s, t, mask)
        return EmbeddingLoss(V, V, loss)(s, t, mask)

    base = value(student, teacher)
    s2, t2 = student.clone(), teacher.clone()
    s2[~mask], t2[~mask] = garbage[~mask], -garbage[~mask]
    torch.testing.assert_close(value(s2, t2), base)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_embedding_loss_zero_when_equal_and_projects_widths(kind):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, D, generator=g)
    same = EmbeddingLoss(D, D, kind)
    assert same(hidden, hidden.clone()) < 1e-6
    assert same(hidden + torch.randn(B, T, D, generator=g), hidden) > 1e-3
    wider = EmbeddingLoss(D // 2, D, kind)  # student narrower than teacher: learned projection
    assert sum(p.numel() for p in wider.parameters()) == D // 2 * D + D
    loss = wider(torch.randn(B, T, D // 2, generator=g), hidden)
    loss.backward()
    assert wider.project.weight.grad is not None and loss > 0


def test_match_grid_resamples_encoder_memory():
    memory = torch.randn(2, 4 * 12, D)  # a 64x192 image at stride 16
    assert match_grid(memory, 48, (64, 192)) is memory
    out = match_grid(memory, 2 * 6, (64, 192))  # the same image at stride 32
    assert out.shape == (2, 12, D)
    constant = torch.ones(1, 48, D)
    torch.testing.assert_close(match_grid(constant, 12, (64, 192)), torch.ones(1, 12, D))
