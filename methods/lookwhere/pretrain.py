"""The distillation stage on its own: ``lwbench pretrain lookwhere --teacher NAME --data TASK|FOLDER``.

Runs as one process or under ``torchrun`` (DDP: gloo on CPU, nccl on GPU; the process group is only
created when ``WORLD_SIZE`` > 1). Each rank draws its share of the images through a
``DistributedSampler``; the student is wrapped in DDP, the teacher is not (no gradients). The one
training loop writes safetensors checkpoints (rank 0 only) and resumes from them, so a killed run
continues where it stopped. The output folder (``model.safetensors`` + ``lookwhere.json``) is what
``--set method.weights=FOLDER`` loads.

Examples::

    lwbench pretrain lookwhere --teacher vit_base_patch14_reg4_dinov2 --data /data/imagenet/train --img-size 518 \\
        --steps 100000 --out runs/lw-b14
    torchrun --nproc_per_node 8 -m lwbench.methods.lookwhere.pretrain --teacher ... --data traffic_signs
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from lwbench.config import ATTN_QUERIES
from lwbench.errors import CheckpointError, DataNotFoundError, LwbenchError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")


class ImageFolderImages:
    """Every image under ``root`` (recursively), random-resized-cropped to ``img_size``; labels unused (0).

    A plain map-style dataset (torch is imported lazily so that ``lwbench --help`` stays fast)."""

    def __init__(self, root: str | Path, img_size: tuple[int, int], scale: tuple[float, float] = (0.35, 1.0)):
        from torchvision import transforms as T

        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise DataNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) found under {self.root}; "
                                    "pass --data with a folder of images or a task name")
        self.aug = T.Compose([T.RandomResizedCrop(img_size, scale=scale), T.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from lwbench.task import normalize
        from lwbench.tasks._imageio import read_image, to_tensor

        return normalize(to_tensor(self.aug(read_image(self.files[i])))), 0


def _as_hw(size) -> tuple[int, int] | None:
    if size is None:
        return None
    from lwbench.sizes import as_hw

    return as_hw(size)


def load_teacher(name: str, img_size: tuple[int, int], weights: str | Path | None):
    """Teacher ViT from timm (``pretrained`` when no file is given) or from a file; lwbench's cached
    task-trained teachers (``TaskModel`` state dicts, keys ``encoder.vit.*``) load as well."""
    from lwbench.backbones import create_backbone, load_backbone_weights, read_state_dict

    if weights is None:
        if name.startswith("lw_vit"):
            raise CheckpointError(f"teacher {name} has no published weights; pass --teacher-weights PATH "
                                  "(e.g. the task-trained teacher lwbench cached)")
        vit = create_backbone(name, img_size, pretrained=True)
    else:
        vit = create_backbone(name, img_size)
        sd = read_state_dict(weights)
        prefix = "encoder.vit."
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        load_backbone_weights(vit, sd)
    vit.eval()
    for p in vit.parameters():
        p.requires_grad_(False)
    return vit


def _dataset(data: str, data_root, img_size, seed: int):
    if Path(data).is_dir():
        hw = _as_hw(img_size) or (224, 224)
        return ImageFolderImages(data, hw), hw
    from lwbench.registry import get_task

    task = get_task(data)(source="auto", data_root=data_root, img_size=img_size, seed=seed)
    return task.dataset("train", train=True), tuple(task.img_size)


def _batches(ds, batch_size: int, world: int, rank: int, seed: int, workers: int,
             pin_memory: bool = False) -> Iterator:
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    drop = len(ds) // world >= batch_size
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=drop) \
        if world > 1 else None
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=drop,
                        num_workers=workers, generator=gen, persistent_workers=workers > 0, pin_memory=pin_memory)
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def pretrain(teacher_name: str, data: str, out_dir: str | Path | None = None, steps: int = 1000,
             teacher_weights: str | Path | None = None, img_size=None, data_root: str | Path | None = None,
             batch_size: int = 32, lr: float = 1e-4, weight_decay: float = 0.05, warmup_steps: int = 0,
             selector_depth: int | None = None, selector_size=None, distill_min_k: int = 16,
             distill_max_k: int = 128, attn_queries: str = "patch", seed: int = 0, workers: int = 0,
             device: str | None = None, quiet: bool = False, grad_clip: float | None = None) -> Path:
    """What-where distillation of a LookWhere student from ``teacher_name`` on ``data`` (task or folder).

    Returns the output folder. Every option is validated before the first step."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lwbench.config import TrainConfig
    from lwbench.method import BackboneSpec
    from lwbench.paths import cache_dir
    from lwbench.training.loop import is_main_process, pin_memory_for, train_loop

    from .checkpoint import write_meta
    from .distill import DistillStudent, WhatWhereLoss
    from .method import LookWhere

    world = int(os.environ.get("WORLD_SIZE", "1"))
    own_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        own_group = True
    rank = dist.get_rank() if world > 1 else 0
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if world > 1 and str(device).startswith("cuda"):
        # NCCL collectives (the loop's agree/gather of resume state included) use the current device: this rank's
        torch.cuda.set_device(torch.device(device))
    try:
        ds, hw = _dataset(data, data_root, _as_hw(img_size), seed)
        teacher = load_teacher(teacher_name, hw, teacher_weights).to(device)
        spec = BackboneSpec.of(teacher, teacher_name, hw)
        method = LookWhere(spec, None, selector_depth=selector_depth, selector_size=selector_size,
                           distill_min_k=distill_min_k, distill_max_k=distill_max_k, attn_queries=attn_queries)
        out = Path(out_dir) if out_dir else cache_dir() / "pretrain" / f"lookwhere-{teacher_name}-{hw[0]}x{hw[1]}"
        torch.manual_seed(seed)  # where-head init; DDP broadcasts rank 0's copy anyway
        encoder = method.build(teacher).to(device)
        encoder.set_trainable(selector=True, extractor=True)
        student = DistillStudent(encoder)
        if world > 1:
            student = DDP(student, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
        loss = WhatWhereLoss(teacher, student, distill_min_k, distill_max_k, queries=attn_queries, seed=seed + rank)
        if is_main_process():
            write_meta(out, {**method.meta(encoder), "data": str(data), "world_size": world, "batch_size": batch_size,
                             "lr": lr, "steps": steps, "teacher_weights": str(teacher_weights)})
        stage = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                            warmup_steps=warmup_steps, grad_clip=grad_clip, workers=workers)
        batches = _batches(ds, batch_size, world, rank, seed, workers, pin_memory=pin_memory_for(device))
        train_loop(encoder, loss, batches, stage, ckpt_dir=out,
                   device=device, desc="lookwhere-distill", quiet=quiet or rank > 0,
                   data_parallel=False)  # per-rank batches (DistributedSampler), gradients synchronised by DDP
        if world > 1:
            dist.barrier()  # rank 0 has written the final checkpoint when every rank returns
        return out
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


# -- CLI -----------------------------------------------------------------------------------------------
def add_pretrain_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``lwbench pretrain lookwhere``."""
    g = parser.add_argument_group("teacher and data")
    g.add_argument("--teacher", required=True, help="teacher backbone (timm name, e.g. vit_base_patch14_reg4_dinov2)")
    g.add_argument("--teacher-weights", default=None, help="teacher state dict (.safetensors/.pth); default: timm's")
    g.add_argument("--data", required=True, help="a task name (its training images; labels unused) or an image folder")
    g.add_argument("--data-root", default=None, help="where the task's real data lives (tasks only)")
    g.add_argument("--img-size", default=None,
                   help="high-res size: S or HxW, e.g. 518 or 504x672 (default: the task's, 224 for folders)")
    g = parser.add_argument_group("student")
    g.add_argument("--selector-depth", type=int, default=None, help="selector blocks (default 3)")
    g.add_argument("--selector-size", default=None,
                   help="selector input: px (154), HxW (112x154), a fraction of the high-res size (0.3), or auto "
                        "(default: the paper's 11 patches on the short side, the long side in proportion)")
    g.add_argument("--distill-min-k", type=int, default=16)
    g.add_argument("--distill-max-k", type=int, default=128)
    g.add_argument("--attn-queries", choices=ATTN_QUERIES, default="patch",
                   help="teacher attention rows averaged for the where-target")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=32, help="per process")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--grad-clip", type=float, default=None)
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda:LOCAL_RANK when available)")
    g.add_argument("--out", default=None, help="output folder (default: the lwbench cache)")
    g.add_argument("--quiet", action="store_true")
    return parser


def run_pretrain(args: argparse.Namespace) -> int:
    out = pretrain(args.teacher, args.data, out_dir=args.out, steps=args.steps, teacher_weights=args.teacher_weights,
                   img_size=args.img_size, data_root=args.data_root, batch_size=args.batch_size, lr=args.lr,
                   weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, selector_depth=args.selector_depth,
                   selector_size=args.selector_size, distill_min_k=args.distill_min_k,
                   distill_max_k=args.distill_max_k, attn_queries=args.attn_queries, seed=args.seed,
                   workers=args.workers, device=args.device, quiet=args.quiet, grad_clip=args.grad_clip)
    if int(os.environ.get("RANK", "0")) == 0:
        print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_pretrain_args(argparse.ArgumentParser(prog="lwbench pretrain lookwhere",
                                                       description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        return run_pretrain(args)
    except LwbenchError as exc:
        print(f"lwbench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
