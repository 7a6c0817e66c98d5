"""Your own PyTorch loop on a label store: the lockstep batches and DeiT's loss come from deit-lockstep,
everything else (model, optimizer, precision, checkpoints) is plain PyTorch and yours to change.

    python examples/own_loop.py --data SRC --labels STORE --epochs 3 --batch-size 64
    torchrun --nproc-per-node 2 examples/own_loop.py ...     # each rank takes its share (add DDP yourself)

(after `pip install -e .` or `make setup`, so that `student` imports.)
"""

import argparse
import json
import os

import timm
import torch

from student.api import open_lockstep

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--labels", required=True)
p.add_argument("--model", default="deit_tiny_distilled_patch16_224")
p.add_argument("--model-kwargs", default="{}", help='e.g. \'{"depth": 2}\' for a tiny student')
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--lr", type=float, default=5e-4)
p.add_argument("--workers", type=int, default=2)
p.add_argument("--out", default=None, help="save the weights here at the end")
args = p.parse_args()

rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ls = open_lockstep(args.data, args.labels, args.batch_size, rank, world, args.workers)

torch.manual_seed(ls.data.seed)  # the same initial weights as `cli.py train` (and on every rank)
model = timm.create_model(args.model, num_classes=ls.num_classes, drop_path_rate=0.0,
                          **json.loads(args.model_kwargs)).to(device)
if hasattr(model, "set_distilled_training"):
    model.set_distilled_training(True)  # train mode returns (class logits, distillation logits)
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)

for epoch in range(args.epochs):
    model.train()
    total, steps = 0.0, 0
    for batch in ls.epoch(epoch):
        loss = ls.loss(model(batch.images.to(device)), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if steps == 0 and epoch == 0:
            print(f"first step loss {loss.item()!r}")
        total, steps = total + loss.item(), steps + 1
    print(f"epoch {epoch}: {steps} steps, mean loss {total / max(steps, 1):.4f}")

if args.out and rank == 0:
    torch.save(model.state_dict(), args.out)
