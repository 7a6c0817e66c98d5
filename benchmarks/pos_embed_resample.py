"""Fine-tune position-embedding resampling: ours (timm, antialias=False) vs DeiT's main.py vs timm's default.

    python benchmarks/pos_embed_resample.py

DeiT's main.py resizes the grid tokens with F.interpolate(bicubic, align_corners=False), no antialias.
timm's resample_abs_pos_embed defaults to antialias=True, another kernel. On random position
embeddings (the worst case; trained ones are smoother) this prints, for each grid change, the
largest difference of each method from DeiT's relative to the largest |value| of DeiT's result.
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timm.layers import resample_abs_pos_embed  # noqa: E402

from student.finetune import resample_pos_embed  # noqa: E402
from student.model import create_student  # noqa: E402


def deit(pos, new, extra=2):
    """DeiT's main.py --finetune block."""
    d, old = pos.shape[-1], int((pos.shape[-2] - extra) ** 0.5)
    tok = pos[:, extra:].reshape(-1, old, old, d).permute(0, 3, 1, 2)
    tok = F.interpolate(tok, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat((pos[:, :extra], tok.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def rel(x, ref, scale):
    return (x - ref).abs().max().item() / scale


def main():
    print(f"{'grid':<16}{'timm default (antialias) vs DeiT':>36}{'ours vs DeiT':>16}")
    for old, new in [(24, 14), (14, 7), (14, 10), (7, 14), (14, 24), (14, 16)]:
        g = torch.Generator().manual_seed(old * 100 + new)
        pos = torch.randn(1, 2 + old * old, 192, generator=g)
        model = create_student("deit_tiny_distilled_patch16_224", num_classes=10,
                               model_kwargs={"img_size": new * 16, "depth": 1})
        ref = deit(pos, new)
        ours = resample_pos_embed(pos, model)[0]
        timm_aa = resample_abs_pos_embed(pos, [new, new], num_prefix_tokens=2)
        scale = ref.abs().max().item()
        grid = f"{old}x{old} -> {new}x{new}"
        print(f"{grid:<16}{rel(timm_aa, ref, scale):>36.1%}{rel(ours, ref, scale):>16.1%}"
              + ("   (bytes equal)" if ours.numpy().tobytes() == ref.numpy().tobytes() else ""))


if __name__ == "__main__":
    main()
