"""DeiT's loss from stored teacher labels: the official formula, each head trained as DeiT trains it."""

import pytest
import torch
import torch.nn.functional as F

from student.losses import TeacherLabels, deit_loss_terms, soft_target_cross_entropy

B, C = 6, 10


def official_deit_soft_kd(student_logits, teacher_logits, T):
    """facebookresearch/deit losses.py, DistillationLoss, distillation_type == 'soft'."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / T, dim=1),
            F.log_softmax(teacher_logits / T, dim=1),
            reduction="sum",
            log_target=True,
        )
        * (T * T)
        / student_logits.numel()
    )


def reference_soft_targets_log(values, ids, num_classes, tau):
    """Independent rebuild of the tempered teacher, as log-probs, from stored top-k log-probs.

    At tau = 1: the top-k keep their stored probabilities, the tail's mass 1 - sum(exp(values))
    is spread uniformly over the other classes. At other tau: that same distribution, tempered.
    """
    values = values.float()
    rows, k = values.shape
    if k == num_classes:
        tail = torch.empty(rows, 1)  # no tail; the log_softmax below renormalises fp16 rounding
    else:
        tail_mass = (1 - values.exp().sum(1, keepdim=True)).clamp_min(torch.finfo(torch.float32).tiny)
        tail = (tail_mass / (num_classes - k)).log()
    dense = tail.expand(rows, num_classes).clone().scatter_(1, ids.long(), values)
    return F.log_softmax(dense / tau, dim=1)


def teacher_from_topk(values, ids, tau):
    """The production path: the store's rows through storage.soft.soft_targets."""
    return TeacherLabels.from_topk(values, ids, C, tau=tau)


def store_topk(teacher_logits, k):
    """What a soft store holds: top-k teacher log-probs, sorted descending, in fp16, and their ids."""
    values, ids = F.log_softmax(teacher_logits.float(), dim=1).topk(k, dim=1)
    return values.half(), ids.to(torch.int16)


def mixed_smoothed_target(seed=0):
    g = torch.Generator().manual_seed(seed)
    y1, y2 = torch.randint(0, C, (B,), generator=g), torch.randint(0, C, (B,), generator=g)
    smooth = lambda y: F.one_hot(y, C) * 0.9 + 0.1 / C
    lam = 0.7
    return lam * smooth(y1) + (1 - lam) * smooth(y2)


def logits(seed, scale=3.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, generator=g) * scale).requires_grad_(requires_grad)


@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("kd_reduction", ["deit", "batchmean"])
def test_soft_equals_official_deit_formula_when_k_is_num_classes(tau, kd_reduction):
    cls_out, dist_out, target = logits(1), logits(2), mixed_smoothed_target()
    values, ids = store_topk(logits(3, scale=5.0), k=C)
    # The official formula sees the same fp16-rounded log-probs, put back in class order, as logits.
    stored_teacher = torch.empty(B, C).scatter_(1, ids.long(), values.float())

    loss, _, kd = deit_loss_terms(
        (cls_out, dist_out), target, teacher_from_topk(values, ids, tau),
        mode="soft", alpha=0.5, tau=tau, kd_reduction=kd_reduction,
    )

    official_kd = official_deit_soft_kd(dist_out, stored_teacher, tau)
    expected_kd = official_kd if kd_reduction == "deit" else official_kd * C  # numel / B = C
    base = torch.sum(-target * F.log_softmax(cls_out, dim=-1), dim=-1).mean()
    torch.testing.assert_close(kd, expected_kd, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, 0.5 * base + 0.5 * expected_kd, rtol=1e-6, atol=0)


def test_soft_kd_is_bitwise_the_official_formula_on_dense_teacher_logits():
    dist_out, teacher_logits = logits(4), logits(5, scale=5.0)
    for tau in (1.0, 3.0):
        _, _, kd = deit_loss_terms(
            (logits(6), dist_out), mixed_smoothed_target(), TeacherLabels.from_logits(teacher_logits, tau),
            mode="soft", tau=tau, kd_reduction="deit",
        )
        assert kd.item() == official_deit_soft_kd(dist_out, teacher_logits, tau).item()


def test_batchmean_is_the_true_per_sample_kl():
    dist_out, teacher_logits, tau = logits(7), logits(8, scale=5.0), 2.0
    p = F.softmax(teacher_logits / tau, dim=1)
    q = F.softmax(dist_out / tau, dim=1)
    true_kl = (p * (p.log() - q.log())).sum(1).mean() * tau**2
    teacher = TeacherLabels.from_logits(teacher_logits, tau)
    _, _, kd = deit_loss_terms(dist_out, mixed_smoothed_target(), teacher, mode="soft", tau=tau)
    assert kd.item() == pytest.approx(true_kl.item(), rel=1e-5)


def test_tail_rebuild_is_exact_at_tau_1():
    k = 3
    teacher_logits = logits(9, scale=2.0)  # flat enough that the tail holds real mass
    true_probs = F.softmax(teacher_logits, dim=1)
    values, ids = store_topk(teacher_logits, k)
    rebuilt = teacher_from_topk(values, ids, 1.0).log_probs.exp()

    top = rebuilt.gather(1, ids.long())
    tail_total = 1 - top.sum(1)
    # Exact against what the store holds ...
    torch.testing.assert_close(top, values.float().exp(), rtol=1e-6, atol=0)
    torch.testing.assert_close(tail_total, 1 - values.float().exp().sum(1), rtol=1e-5, atol=1e-7)
    # ... and equal to the teacher's true softmax up to the fp16 rounding of the stored log-probs.
    torch.testing.assert_close(top, true_probs.gather(1, ids.long()), rtol=2e-3, atol=0)
    torch.testing.assert_close(tail_total, 1 - true_probs.gather(1, ids.long()).sum(1), rtol=0, atol=2e-3)
    assert (tail_total > 0.05).all()
    # The tail really is spread evenly over the other classes.
    tail_mask = torch.ones(B, C, dtype=torch.bool).scatter_(1, ids.long(), False)
    per_class = rebuilt[tail_mask].view(B, C - k)
    torch.testing.assert_close(per_class, (tail_total / (C - k))[:, None].expand(B, C - k), rtol=1e-5, atol=0)


@pytest.mark.parametrize("tau", [0.5, 3.0])
def test_tempered_rebuild_keeps_topk_ratios_and_sums_to_one(tau):
    values, ids = store_topk(logits(10, scale=2.0), k=4)
    rebuilt = teacher_from_topk(values, ids, tau).log_probs
    torch.testing.assert_close(rebuilt.exp().sum(1), torch.ones(B), rtol=1e-6, atol=0)
    top = rebuilt.gather(1, ids.long())
    # Tempering divides log-probs by tau, so differences between top-k classes shrink by tau.
    gaps = values.float() - values.float()[:, :1]
    torch.testing.assert_close(top - top[:, :1], gaps / tau, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("k", [3, C])
def test_storage_soft_targets_agree_with_an_independent_rebuild(k, tau):
    values, ids = store_topk(logits(11, scale=2.0), k)
    ours = TeacherLabels.from_topk(values, ids, C, tau=tau)
    reference = reference_soft_targets_log(values, ids, C, tau)
    torch.testing.assert_close(ours.log_probs, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.ids, ids[:, 0].long())


def test_topk_holding_all_the_mass_gives_a_finite_loss():
    # A peaked teacher: fp16 rounding pushes sum(exp(top-k)) to 1 or above, so the tail is empty.
    teacher_logits = torch.zeros(B, C).scatter_(1, torch.arange(B)[:, None] % C, 40.0)
    values, ids = store_topk(teacher_logits, k=3)
    dist_out = logits(30, requires_grad=True)
    for tau in (0.5, 1.0, 3.0):
        teacher = teacher_from_topk(values, ids, tau)
        loss, _, _ = deit_loss_terms(dist_out, mixed_smoothed_target(), teacher, mode="soft", tau=tau)
        (grad,) = torch.autograd.grad(loss, dist_out)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_hard_is_cross_entropy_on_teacher_argmax():
    cls_out, dist_out, target, teacher_logits = logits(12), logits(13), mixed_smoothed_target(), logits(14)
    teacher = TeacherLabels.hard(teacher_logits.argmax(1))
    loss, base, kd = deit_loss_terms((cls_out, dist_out), target, teacher, mode="hard", alpha=0.5)
    expected_kd = F.cross_entropy(dist_out, teacher_logits.argmax(1))  # no label smoothing
    assert kd.item() == expected_kd.item()
    assert base.item() == soft_target_cross_entropy(cls_out, target).item()
    torch.testing.assert_close(loss, 0.5 * soft_target_cross_entropy(cls_out, target) + 0.5 * expected_kd)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_single_head_student_takes_both_terms_on_its_head(mode):
    out, target = logits(15, requires_grad=True), mixed_smoothed_target()
    teacher = TeacherLabels.from_logits(logits(16))
    loss, base, kd = deit_loss_terms(out, target, teacher, mode=mode, alpha=0.5)
    two_heads_same, base_same, kd_same = deit_loss_terms((out, out), target, teacher, mode=mode, alpha=0.5)
    assert loss.item() == two_heads_same.item() and (base.item(), kd.item()) == (base_same.item(), kd_same.item())
    kd = F.cross_entropy(out, teacher.ids) if mode == "hard" else F.kl_div(
        F.log_softmax(out, 1), teacher.log_probs, reduction="batchmean", log_target=True
    )
    torch.testing.assert_close(loss, 0.5 * soft_target_cross_entropy(out, target) + 0.5 * kd)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_alpha_edges_and_gradients_reach_only_the_right_head(mode):
    target, teacher = mixed_smoothed_target(), TeacherLabels.from_logits(logits(17))
    for alpha, cls_gets_grad, dist_gets_grad in [(0.0, True, False), (0.5, True, True), (1.0, False, True)]:
        cls_out, dist_out = logits(18, requires_grad=True), logits(19, requires_grad=True)
        loss, base, kd = deit_loss_terms((cls_out, dist_out), target, teacher, mode=mode, alpha=alpha)
        loss.backward()
        if alpha == 0.0:
            assert loss.item() == pytest.approx(base.item(), rel=1e-7)
        if alpha == 1.0:
            assert loss.item() == pytest.approx(kd.item(), rel=1e-7)
        assert bool(cls_out.grad.abs().sum() > 0) == cls_gets_grad
        assert bool(dist_out.grad.abs().sum() > 0) == dist_gets_grad


def test_base_term_never_reaches_dist_head_nor_kd_the_cls_head():
    target, teacher = mixed_smoothed_target(), TeacherLabels.from_logits(logits(20))
    cls_out, dist_out = logits(21, requires_grad=True), logits(22, requires_grad=True)
    loss, _, _ = deit_loss_terms((cls_out, dist_out), target, teacher, mode="soft", alpha=0.3)
    loss.backward()
    expected_cls = torch.autograd.grad(0.7 * soft_target_cross_entropy(cls_out, target), cls_out)[0]
    torch.testing.assert_close(cls_out.grad, expected_cls)
    assert teacher.log_probs.grad is None


def test_none_mode_is_plain_training():
    target = mixed_smoothed_target()
    out = logits(23, requires_grad=True)
    loss, base, kd = deit_loss_terms(out, target, None, mode="none", alpha=0.9)
    assert loss.item() == soft_target_cross_entropy(out, target).item() and kd.item() == 0.0
    # A two-head student trains both heads on the ground truth, equally.
    cls_out, dist_out = logits(24, requires_grad=True), logits(25, requires_grad=True)
    loss, _, _ = deit_loss_terms((cls_out, dist_out), target, None, mode="none")
    loss.backward()
    expected = (soft_target_cross_entropy(cls_out, target) + soft_target_cross_entropy(dist_out, target)) / 2
    torch.testing.assert_close(loss, expected)
    assert cls_out.grad.abs().sum() > 0 and dist_out.grad.abs().sum() > 0


def test_refuses_mismatched_inputs():
    target, out = mixed_smoothed_target(), logits(26)
    with pytest.raises(ValueError, match="tempered at tau=3"):
        deit_loss_terms(out, target, TeacherLabels.from_logits(logits(27), tau=3.0), mode="soft", tau=1.0)
    with pytest.raises(ValueError, match="hard labels"):
        deit_loss_terms(out, target, TeacherLabels.hard(torch.zeros(B, dtype=torch.long)), mode="soft")
    with pytest.raises(ValueError, match="needs teacher"):
        deit_loss_terms(out, target, None, mode="hard")
    with pytest.raises(ValueError, match="mode"):
        deit_loss_terms(out, target, None, mode="kd")
    with pytest.raises(ValueError, match="alpha"):
        deit_loss_terms(out, target, TeacherLabels.hard(torch.zeros(B, dtype=torch.long)), alpha=1.5)


def test_bf16_logits_are_handled_in_fp32():
    out, target, teacher = logits(28), mixed_smoothed_target(), TeacherLabels.from_logits(logits(29), tau=2.0)
    loss32, _, _ = deit_loss_terms(out, target, teacher, mode="soft", tau=2.0)
    loss16, _, _ = deit_loss_terms(out.bfloat16(), target, teacher, mode="soft", tau=2.0)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
