"""Students built by timm: the distillation token's two heads in training, their average at test time."""

import pytest
import torch

from student.losses import TeacherLabels, deit_loss_terms
from student.model import create_student, eval_logits, has_distillation_token

NUM_CLASSES = 7
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}


def images(n=4, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def distilled():
    torch.manual_seed(0)
    return create_student("deit_tiny_distilled_patch16_224", num_classes=NUM_CLASSES, model_kwargs=TINY_VIT)


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return create_student("test_resnet", num_classes=NUM_CLASSES)


def test_tiny_config_is_what_was_asked_for(distilled):
    assert has_distillation_token(distilled)
    assert len(distilled.blocks) == 2 and distilled.embed_dim == 64
    assert distilled.patch_embed.grid_size == (4, 4)
    assert distilled.pos_embed.shape[1] == 16 + 2  # patches + class and distillation tokens
    assert distilled.head.out_features == distilled.head_dist.out_features == NUM_CLASSES
    assert distilled.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # DeiT's drop path by default


def test_distilled_model_trains_two_heads_that_deit_loss_terms_takes(distilled):
    distilled.train()
    cls_out, dist_out = distilled(images())
    assert cls_out.shape == dist_out.shape == (4, NUM_CLASSES)
    target = torch.full((4, NUM_CLASSES), 1 / NUM_CLASSES)
    loss, _, _ = deit_loss_terms((cls_out, dist_out), target, TeacherLabels.hard(torch.zeros(4, dtype=torch.long)))
    distilled.zero_grad()
    loss.backward()
    assert distilled.head.weight.grad.abs().sum() > 0 and distilled.head_dist.weight.grad.abs().sum() > 0
    assert distilled.dist_token.grad.abs().sum() > 0


def test_eval_averages_the_two_heads(distilled):
    distilled.eval()
    x = images()
    out = eval_logits(distilled, x)
    torch.testing.assert_close(out["avg"], (out["cls"] + out["dist"]) / 2)
    torch.testing.assert_close(out["avg"], distilled(x))
    assert not torch.allclose(out["cls"], out["dist"])  # two different heads, not one seen twice
    # The heads' outputs match a by-hand read of the two tokens.
    tokens = distilled.forward_features(x)
    torch.testing.assert_close(out["cls"], distilled.head(tokens[:, 0]))
    torch.testing.assert_close(out["dist"], distilled.head_dist(tokens[:, 1]))
    assert not out["avg"].requires_grad


def test_one_head_model_gives_the_same_head_three_times(plain):
    assert not has_distillation_token(plain)
    plain.eval()
    x = images()
    out = eval_logits(plain, x)
    assert out["cls"] is out["dist"] is out["avg"]
    torch.testing.assert_close(out["avg"], plain(x))
    assert out["avg"].shape == (4, NUM_CLASSES)
    plain.train()
    # A single head in training too: deit_loss_terms puts both terms on it.
    assert isinstance(plain(x), torch.Tensor)


def test_eval_logits_refuses_train_mode(distilled):
    distilled.train()
    with pytest.raises(ValueError, match="eval"):
        eval_logits(distilled, images())


def test_model_kwargs_and_arguments_must_agree():
    with pytest.raises(ValueError, match="num_classes given twice"):
        kwargs = {**TINY_VIT, "num_classes": 7}
        create_student("deit_tiny_distilled_patch16_224", num_classes=5, model_kwargs=kwargs)
    # The same value twice is fine, and img_size as an argument builds the same model.
    model = create_student(
        "deit_tiny_distilled_patch16_224", num_classes=NUM_CLASSES, model_kwargs=TINY_VIT, img_size=32,
        drop_path_rate=0.0,
    )
    assert model.patch_embed.img_size == (32, 32)


def test_compiled_and_wrapped_models_are_seen_through(distilled):
    class Wrapper(torch.nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    assert has_distillation_token(Wrapper(distilled))
