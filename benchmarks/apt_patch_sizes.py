"""Where APT's large patches fall on a quick synthetic task (issue 33): the share of the annotated object's cells (the
sign, the balls) and of the other cells that end in a patch larger than the base, at each entropy threshold, on the
first 200 test images (token counts depend on the image only, so the untrained model counts what the fine-tuned one
does).

    LWBENCH_CACHE=... python benchmarks/apt_patch_sizes.py [TASK [ENTROPY ...]]   # default: traffic_signs 5 6
"""
import sys

import torch

from lwbench.backbones import create_backbone
from lwbench.config import resolve_config
from lwbench.diagnostics import object_mask
from lwbench.runner import Plan

torch.set_num_threads(2)
task = sys.argv[1] if len(sys.argv) > 1 else "traffic_signs"
for ent in [float(e) for e in sys.argv[2:]] or [5.0, 6.0]:
    cfg = resolve_config("apt", task, f"entropy={ent}", "quick", regime="finetuned", quiet=True,
                         sets=["methods.apt.finetune.steps=0"])
    plan = Plan(cfg)
    enc = plan.method.build(create_backbone(plan.backbone_name, plan.task.img_size)).eval()
    ds = plan.task.dataset("test")
    grid = tuple(s // plan.spec.patch for s in plan.task.img_size)
    sign_big = sign_n = other_big = other_n = 0
    for i in range(200):
        x = ds[i][0][None]
        with torch.no_grad():
            out = enc(x)
        a = out.assignment[0]  # cell -> token
        counts = torch.bincount(a[a >= 0], minlength=int(a.max()) + 1)
        big = counts[a] > 1  # the cell shares its token with other cells: a large patch
        cells = object_mask(plan.task, "test", i, grid, plan.spec.patch).reshape(-1)
        sign_big += int((big & cells).sum())
        sign_n += int(cells.sum())
        other_big += int((big & ~cells).sum())
        other_n += int((~cells).sum())
    print(f"{task} entropy={ent:g}: object cells in a large patch {sign_big / sign_n:.1%} ({sign_n} cells), "
          f"other cells {other_big / other_n:.1%}")
