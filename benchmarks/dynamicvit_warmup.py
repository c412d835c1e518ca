"""DynamicViT's predictor warm-up on a task, step by step: losses, and top-1 / object recall of the eval-time top-k
on 64 test images. Shows why version 2 collapsed on billiards and version 3 does not.

    python benchmarks/dynamicvit_warmup.py --task billiards --steps 60                    # version 3 (the fix)
    python benchmarks/dynamicvit_warmup.py --task billiards --steps 60 --detached-mask     # version 2's training output
    python benchmarks/dynamicvit_warmup.py --task billiards --steps 8 --ratio-only         # keep-ratio loss alone

Measured 2026-12-07 (2 threads, the shipped billiards teacher daae38cee01d, keep 0.7, lr 5e-4, batch 32): object
recall 0.36 at the start; with ``--ratio-only`` 0.00 after 4 steps; with ``--detached-mask`` 0.00 from step 4 to 60;
version 3 0.15 at step 4, 0.00 at 16-24 while the keep-ratio term dominates, then 0.61 (36), 0.99 (44), 1.00 (48-60).
Uses the quick profile's cached teacher (``LWBENCH_CACHE``); about 3.5 s per step on 2 cores.
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="billiards")
    ap.add_argument("--keep-rate", type=float, default=0.7)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--detached-mask", action="store_true", help="version 2: the head sees a detached keep mask")
    ap.add_argument("--ratio-only", action="store_true", help="train the predictors on the keep-ratio loss alone")
    args = ap.parse_args(argv)

    import lwbench.methods.dynamicvit as dv
    from lwbench.config import resolve_config
    from lwbench.diagnostics import object_mask
    from lwbench.runner import Plan, build_teacher
    from lwbench.training.context import FitContext

    torch.manual_seed(0)
    plan = Plan(resolve_config("dynamicvit", args.task, f"keep_rate={args.keep_rate}", profile="quick"))
    torch.set_num_threads(plan.threads)
    teacher, _, _ = build_teacher(plan)
    teacher.requires_grad_(False)
    model = plan.method.task_model(FitContext(task=plan.task, teacher=teacher, defaults=plan.cfg.train),
                                   trainable=True)
    enc = model.encoder
    if args.detached_mask:  # version 2's training output: dropped tokens hidden from the head by a detached mask
        train_forward = enc._forward_train

        def detached(tok, grid):
            out = train_forward(tok, grid)
            return out.replace(keep=None, mask=out.keep.detach() > 0.5)

        enc._forward_train = detached
    test = plan.task.dataset("test", train=False)
    idx = list(range(64))
    images = torch.stack([test[i][0] for i in idx])
    labels = torch.tensor([int(test[i][1]) for i in idx])
    p = plan.spec.patch
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    objects = torch.stack([object_mask(plan.task, "test", i, grid, p) for i in idx]).flatten(1).bool()
    loss_fn = dv.dynamicvit_loss(teacher)
    opt = torch.optim.AdamW(enc.predictors.parameters(), lr=float(plan.cfg.train.lr), weight_decay=0.05)
    train = plan.task.dataset("train", train=True)
    gen = torch.Generator().manual_seed(0)

    def evaluate() -> str:
        model.eval()
        with torch.no_grad():
            out = enc(images)
            acc = (dv.task_logits(model, out, images).argmax(1) == labels).float().mean().item()
        model.train()
        kept = torch.zeros_like(objects).scatter_(1, out.positions, True)
        return f"top-1 {100 * acc:.1f}%, object recall {(kept & objects).sum().item() / objects.sum().item():.2f}"

    print(f"step 0: {evaluate()}", flush=True)
    model.train()
    for step in range(1, args.steps + 1):
        batch = torch.randint(len(train), (int(plan.cfg.train.batch_size),), generator=gen).tolist()
        x = torch.stack([train[i][0] for i in batch])
        y = torch.tensor([int(train[i][1]) for i in batch])
        loss, logs = loss_fn(model, x, y)
        if args.ratio_only:
            out = enc(x)
            loss = sum(((d.mean(1) - r) ** 2).mean() for d, r in zip(out.aux["decisions"], out.aux["ratios"],
                                                                      strict=True)) * 2.0 / len(out.aux["ratios"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 4 == 0 or step == args.steps:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in logs.items())
            print(f"step {step}: {shown}; eval {evaluate()}", flush=True)


if __name__ == "__main__":
    main()
