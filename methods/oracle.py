"""``oracle``: the annotated object cells first, then random cells, through the backbone. Budget = k.

The ceiling of *where to look*: a selector that knows where the objects are (the task's boxes, the same cells
``object_recall`` counts) and spends the rest of its k cells at random. Beside ``saliency`` (no learning) it
brackets every learned selector: read from ``object_recall``, a selector sits between the two, and the accuracy
gap between ``oracle`` and ``full`` is what the extractor loses by seeing only k cells even when they are the
right ones. It is a measurement, not a deployable method: it reads annotations no real input has.

How it knows the boxes. A model sees only pixels, so :meth:`Oracle.fit` looks up every test image of the task
(``Task.objects``) once and keys its object cells by a fingerprint of the image tensor (256 fixed pixel values,
exact floats); the encoder finds each input's cells by the same fingerprint. An input that is not a test image
(an augmented training image, a photo of your own) has no entry: its k cells are random, and in evaluation
lwbench warns once. In the ``finetuned`` regime the extractor is fine-tuned on the training images' annotated cells,
so on the *un-augmented* training images (an augmented image cannot be looked up): the one recipe difference from
the other fine-tuned rows, which see light augmentation. (Version 1 fine-tuned on augmented images, hence on random
cells, and then scored 67.9% against 95.6% off the shelf.)

Order: object cells before all others, in random order among themselves when there are more than k (a fixed
seed in evaluation, as ``random``); indices sorted, so k = all patches is the plain model exactly. Refused in one
line on tasks that annotate no objects (ImageNet, ADE20K, an image folder). Cost: no arithmetic (a gather and a
top-k), counted as 0 MACs of overhead; the lookup's time is in its latency.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lwbench.errors import ConfigError
from lwbench.method import PatchSelectionMethod, detach_copy
from lwbench.methods.random import RandomPatchEncoder
from lwbench.options import option
from lwbench.registry import register_method

log = logging.getLogger("lwbench")

#: Pixel values per fingerprint: enough that two different images of a split never share one.
FINGERPRINT_VALUES = 256


def _positions(numel: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    n = min(FINGERPRINT_VALUES, numel)
    return torch.randperm(numel, generator=gen)[:n].to(device)


def fingerprint(image: torch.Tensor) -> bytes:
    """A key for one ``(C, H, W)`` image: the exact float32 bytes of 256 fixed pixel positions (fixed per shape)."""
    flat = image.reshape(-1)
    values = flat[_positions(flat.numel(), flat.device)].detach().float().cpu()
    return bytes(str(tuple(image.shape)), "ascii") + values.numpy().tobytes()


class OracleEncoder(RandomPatchEncoder):
    """k cells per image: its annotated object cells first (looked up by fingerprint), then ``random``'s draw."""

    content_blind = False  # the cells depend on the images: drawn and ranked every forward, never cached

    def __init__(self, vit: nn.Module, k: int, seed: int = 0):
        super().__init__(vit, k, seed=seed)
        self.object_cells: dict[bytes, torch.Tensor] = {}  # fingerprint -> (N,) bool, set by Oracle.fit
        self._warned = False

    def cell_scores(self, x: torch.Tensor, n: int) -> torch.Tensor:
        scores = super().cell_scores(x, n)
        missed = 0
        # No table (built, not fitted), or a jit trace (FLOP counting, where the lookup's bytes are not the
        # input's): random cells; the count is the same for any k cells
        lookup = bool(self.object_cells) and not torch.jit.is_tracing()
        for i in range(x.shape[0] if lookup else 0):
            cells = self.object_cells.get(fingerprint(x[i]))
            if cells is not None and cells.numel() == n:
                scores[i] += 2.0 * cells.float()  # every object cell ranks above every other cell
            else:
                missed += 1
        if missed and not self.training and self.object_cells and not self._warned:
            self._warned = True
            log.warning("oracle: %d of %d images are not test images of the task it was fitted on; their cells are "
                        "random", missed, x.shape[0])
        return scores


@register_method("oracle")
class Oracle(PatchSelectionMethod):
    description = "k high-res patches: the annotated object cells first, then random (a ceiling; reads the boxes)"
    style = ("#000000", r"$\mathbf{O}$")
    training = "none"  # off the shelf as it is; the finetuned regime fine-tunes it at k on un-augmented images
    reads_annotations = True  # a ceiling, never a recommendation
    version = 2  # 2: fine-tuned on the annotated cells of un-augmented training images (1: augmented, so random cells)

    @dataclass(frozen=True)
    class Options:
        seed: int = option(0, "seed of the random cells after the object cells", min=0)

    def check_task(self, task) -> None:
        from lwbench.diagnostics import has_objects

        if not has_objects(task):
            raise ConfigError(f"oracle: task '{task.name}' ({task.source} source) annotates no object boxes, so there "
                              "is nothing to look up; it runs on tasks with objects (traffic_signs, billiards)")

    def build(self, vit):
        return OracleEncoder(detach_copy(vit), int(self.budget), seed=self.opts.seed)

    def fit(self, ctx):
        grid, patch = self.spec.grid, self.spec.patch
        if ctx.regime != "finetuned":
            model = self.task_model(ctx)
        else:
            # Fine-tuned on the annotated cells of the training images, un-augmented (an augmented image has no
            # entry: its cells would be random, and an extractor tuned on random cells is not the oracle's)
            from lwbench.training.loop import EpochStream, pin_memory_for

            model = self.task_model(ctx, trainable=True)
            model.encoder.object_cells = object_cells_by_fingerprint(ctx.task, grid, patch, split="train")
            stage = ctx.stage(None)
            batches = EpochStream(ctx.task.dataset("train"), int(stage.batch_size),
                                  seed=int(getattr(ctx.task, "seed", 0)), num_workers=int(stage.workers or 0),
                                  pin_memory=pin_memory_for(ctx.device))
            ctx.finetune(model, tag=f"{self.name}-{self.budget_str()}-finetune", batches=batches)
            model.eval()
        model.encoder.object_cells = object_cells_by_fingerprint(ctx.task, grid, patch)
        return model


def object_cells_by_fingerprint(task, grid: tuple[int, int], patch: int,
                                split: str = "test") -> dict[bytes, torch.Tensor]:
    """``{fingerprint(image): (N,) bool object cells}`` over ``split`` (the cells ``object_recall`` counts)."""
    from lwbench.diagnostics import object_mask

    ds = task.dataset(split)
    table: dict[bytes, torch.Tensor] = {}
    clashes: set[bytes] = set()
    for i in range(len(ds)):
        key = fingerprint(ds[i][0])
        if key in table:
            clashes.add(key)
        table[key] = object_mask(task, split, i, grid, patch)
    for key in clashes:  # two different images with one fingerprint: neither can be told apart, both get random
        del table[key]
    if clashes:
        log.warning("oracle: %d fingerprints are shared by several %s images of %s; those images get random cells",
                    len(clashes), split, task.name)
    return table
