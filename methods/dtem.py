"""``dtem``: Decoupled Token Embedding for Merging (Lee & Hong, NeurIPS 2024, "Learning to Merge Tokens via Decoupled
Embedding for Efficient Vision Transformers", arXiv 2412.10569). Budget = r tokens merged per block, as ToMe.

A small learned module per block maps the tokens to a *decoupled* embedding that serves only as the merging metric
(in place of ToMe's keys); the ViT's own forward never sees it. It is trained through a continuous relaxation of
the merging while the backbone stays frozen ("modular" training); at inference the tokens are merged by ToMe's
bipartite soft matching on that embedding, r per block. Following the official code (movinghoon/DTEM,
``dtem/dtem.py``: ``DTEMLinear``, ``DTEMAttention.patch``, ``DTEMBlock._select``/``_merge_train``/``_merge_eval``;
``train.py`` for the recipe):

* **module**: one linear layer per block, ``D -> feat_dim``, on the block's *normed input* ``norm1(x)`` (the input
  of the ``qkv`` projection, which the official code widens by ``feat_dim`` outputs), detached in training so the
  merging loss never reaches the backbone through it. ``feat_dim`` = the head dimension, twice that for ``D >= 1024``
  (official ``out_dim``); PyTorch's default ``nn.Linear`` init, as officially. Only patch tokens are embedded here
  (the official fused projection also embeds CLS, whose embedding is never used). Its MACs (``T D feat_dim``) and the
  matching (``T_a T_b feat_dim``) are :class:`~lwbench.method.Overhead`.
* **inference** (official ``_merge_eval``: ToMe's ``bipartite_soft_matching`` with ``class_token=True``): the
  L2-normalised embedding replaces the head-mean keys in :class:`~lwbench.methods.tome.ToMeEncoder`'s block loop,
  which is reused unchanged (size-weighted merge, sizes carried, proportional attention as a ``log size`` float mask,
  source tracking as an ``assignment``, LayerScale through the block's own submodules). A constant r per block
  (official ``--val-reduction``; ``schedule=decreasing`` is ToMe's option).
* **relaxation** (training forward, official ``_merge_train`` + ``_select``): tokens are not removed. Among the
  ``n`` *active* patch tokens the cosine scores ``S = a b^T`` between sets A and B are restricted to each A token's
  ``k2 = 3`` best B candidates and divided by ``tau1 = 0.1``; a soft top-r over all ``(A, candidate)`` edges is
  ``r`` rounds of ``p = softmax(z / tau2)`` over the flattened edges (``tau2 = 0.1``), ``khot += p`` and
  ``z += log(max(1 - rowsum(p), eps))`` (the A token just chosen is masked); rows of ``khot`` summing above 1 are
  divided by their (detached) sum, giving a soft assignment ``M`` (``|A| x |B|``, rows <= 1). Soft merging:
  ``x_b <- (s_b x_b + M^T (s_a x_a)) / (s_b + M^T s_a)``, ``s_b <- s_b + M^T s_a``,
  ``s_a <- s_a (1 - rowsum M)`` (clipped to [0, 1] straight-through), ``x_a`` unchanged. Then the ``r`` tokens of
  least size become inactive (moved behind the active ones: never matched again, attended with weight ~ their size)
  and ``n -= r``. Proportional attention weights every key by its size (0 for a fully merged token). The hard limit
  (``tau2 -> 0``) is exactly ToMe's merge on the same metric (tested). ``-log(eps) tau1`` (1.59 at tau1 = 0.1) is
  the score gap up to which the row mask is decisive.
* **training** (official ``train.py``): only the embedding modules train (every name without ``metric`` is frozen),
  with the task loss alone (official soft-target CE under mixup/cutmix), AdamW lr 1e-4 (per-step half-cosine to
  1e-6, no warm-up), wd 1e-4 on matrices only, grad clip 5, 30 epochs of ImageNet at batch 8 x 128; the training
  r is ``--reduction`` (16), the same as the inference r by default. Here that is the method's ``embed`` stage
  (``--set method.embed.steps=...``), which inherits the run's ``train.*`` recipe like every method stage (quick:
  100 steps at lr 5e-4, batch 32), at the budget's r unless ``train_r`` is set. It counts as pretraining
  (``pretrain_steps``).

Departures (deliberate):

* ``finetuned`` regime: after the embedding stage every parameter (backbone, head, embeddings) is fine-tuned with
  the run's one ``train.*`` recipe at the budget, the same steps every method gets, through the relaxed merging
  (the paper's end-to-end variant, whose code is not released; ``finetune_relaxed=false`` fine-tunes through the
  hard ToMe merge instead, embeddings frozen). ``--set method.finetune.steps=0`` is the paper's modular DTEM
  (backbone untouched); lwbench refuses ``off_the_shelf`` for any trained method, so such rows read ``finetuned``
  with ``finetune_steps`` 0.
* Bipartite sets in training: the official relaxed pass puts the first active patch in A and re-sorts the tokens by
  size after each merge, while its inference (ToMe) puts the first patch in B when there is a CLS token and keeps
  ``[unmerged A, B]``: training and inference pair different tokens. Here training uses the inference sets (patch
  ``j`` in A when ``num_prefix + j`` is even) and order (surviving A, then surviving B, in sequence order, then the
  ``r`` least-size tokens), so the relaxation's hard limit is the inference model itself. Which tokens become
  inactive is the official rule (the ``r`` least sizes).
* Proportional attention in training is ``log(max(size, 1e-6))`` added to the logits (fused attention kept),
  with the gradient of ``log(size)`` taken at ``max(size, 1e-6)`` so a fully merged key still passes the official
  ``d attn / d size`` (to O(1e-6)); officially ``exp(logits) * size`` (exactly 0 weight for size 0).
* The softmax relaxation runs in float32 (as officially under AMP). Ties in rankings go to the lower index (stable
  sorts); the official sorts are unstable.
* CLS *and* registers are never embedded, matched or merged (officially CLS only); any grid, any number of prefix
  tokens; RoPE ``Eva`` backbones as in :mod:`lwbench.methods.tome` (a token keeps its cell's rotary embedding).
* ``init=keys`` (not official) starts each module at the head-mean of its block's key projection, i.e. at ToMe's
  metric (exactly, when the block has no k-norm): DTEM before training is then ToMe.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lwbench.config import Stage
from lwbench.errors import ConfigError
from lwbench.method import detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.vit import num_prefix, to_output

from ._reduction import (
    attention_step,
    call_block,
    check_blocks,
    gather_tokens,
    mlp_residual,
    rope_of,
    start_tokens,
    tap,
    tokens_per_layer,
)
from .tome import SCHEDULES, BipartiteMatcher, ToMe, ToMeEncoder, tome_schedule

EPS = torch.finfo(torch.float32).eps  # the official EPSILON of the row mask
SIZE_FLOOR = 1e-6  # smallest size inside log(size) of the relaxed proportional attention
INITS = ("random", "keys")


def default_feat_dim(embed_dim: int, num_heads: int) -> int:
    """The official embedding width: the head dimension, twice that from 1024 wide on."""
    head = int(embed_dim) // int(num_heads)
    return head if embed_dim < 1024 else 2 * head


def soft_top_r(scores: torch.Tensor, r: int, k2: int = 3, tau1: float = 0.1, tau2: float = 0.1) -> torch.Tensor:
    """DTEM's soft grouping: ``(B, Ta, Tb)`` scores -> ``(B, Ta, Tb)`` soft assignment of A tokens to B tokens.

    Each A row keeps its ``k2`` best B candidates (scaled by ``1 / tau1``); ``r`` rounds of a softmax over all
    ``Ta * k2`` edges at temperature ``tau2``, each masking the rows it chose by ``log(max(1 - mass, eps))``; rows
    whose total exceeds 1 are divided by it (detached). In float32."""
    with torch.autocast(scores.device.type, enabled=False):
        s = scores.float()
        bsz, na, nb = s.shape
        top, idx = s.topk(min(int(k2), nb), dim=-1)
        z = top / tau1
        khot = torch.zeros_like(z)
        for _ in range(int(r)):
            onehot = (z.reshape(bsz, -1) / tau2).softmax(dim=-1).reshape(z.shape)
            khot = khot + onehot
            z = z + torch.log((1.0 - onehot.sum(dim=-1, keepdim=True)).clamp(min=EPS))
        khot = khot / ((khot.sum(dim=-1, keepdim=True).detach() - 1.0).clamp(min=0.0) + 1.0)
        return s.new_zeros(bsz, na, nb).scatter_add(-1, idx, khot)


def relaxed_size_bias(size: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``(B, T, 1)`` soft sizes (zeros allowed) -> ``(B, 1, 1, P + T)`` logit bias ``log(max(size, 1e-6))`` whose
    gradient is ``1 / max(size, 1e-6)``: the official ``exp(logit) * size`` to O(1e-6), gradient included."""
    s = size.squeeze(-1).float()
    s = s + (s.clamp(min=SIZE_FLOOR) - s).detach()
    log = s.log()
    return torch.cat([log.new_zeros(log.shape[0], num_prefix), log], dim=1)[:, None, None, :]


class DecoupledMerger(BipartiteMatcher):
    """One block's decoupled embedding (``embed``), ToMe's hard merge on it, and the relaxed (soft) merge."""

    def __init__(self, a_offset: int, num_prefix: int, dim: int, feat_dim: int, k2: int, tau1: float, tau2: float):
        super().__init__(a_offset)
        self.embed = nn.Linear(int(dim), int(feat_dim))
        self.num_prefix = int(num_prefix)
        self.k2, self.tau1, self.tau2 = int(k2), float(tau1), float(tau2)
        self.source = None  # during an inference forward: the tap on this block's norm1 (the module's input)

    def forward(self, x, metric, size, positions, assignment, r: int):
        """ToMe's merge (called by :class:`ToMeEncoder`'s loop) with the decoupled embedding of the block's normed
        input as the metric; the keys ``metric`` it is handed are ignored."""
        z = self.source.out[:, self.num_prefix:]
        return super().forward(x, self.embed(z), size, positions, assignment, r)

    def soft(self, x: torch.Tensor, z: torch.Tensor, size: torch.Tensor, positions: torch.Tensor, r: int):
        """Relaxed merge of the ``(B, n, D)`` active patch tokens ``x`` (``z`` their normed block input, ``size``
        ``(B, n, 1)`` float, ``positions`` ``(B, n)``). Returns the same three, reordered: surviving A, surviving B
        (sequence order), then the ``r`` tokens of least size (the ones that become inactive)."""
        metric = F.normalize(self.embed(z).float(), dim=-1)
        o = self.a_offset
        sl_a, sl_b = slice(o, None, 2), slice(1 - o, None, 2)
        assign = soft_top_r(metric[:, sl_a] @ metric[:, sl_b].transpose(-1, -2), r, self.k2, self.tau1, self.tau2)
        with torch.autocast(x.device.type, enabled=False):
            xf, sf = x.float(), size.float()
            xa, xb, sa, sb = xf[:, sl_a], xf[:, sl_b], sf[:, sl_a], sf[:, sl_b]
            at = assign.transpose(-1, -2)
            new_sb = sb + at @ sa
            new_xb = (sb * xb + at @ (sa * xa)) / new_sb
            rest = 1.0 - assign.sum(dim=-1, keepdim=True)
            new_sa = sa * (rest + (rest.clamp(0.0, 1.0) - rest).detach())
            new_x, new_size = torch.empty_like(xf), torch.empty_like(sf)
            new_x[:, sl_a], new_x[:, sl_b] = xa, new_xb
            new_size[:, sl_a], new_size[:, sl_b] = new_sa, new_sb
        bsz, n = positions.shape
        idx = torch.arange(n, device=x.device)
        drop = new_size.squeeze(-1).detach().argsort(dim=1, stable=True)[:, :r]
        dropped = torch.zeros(bsz, n, dtype=torch.long, device=x.device).scatter(1, drop, 1)
        key = dropped * (2 * n) + ((idx - o) % 2) * n + idx  # [surviving A, surviving B, dropped], each in order
        order = key.argsort(dim=1)
        return gather_tokens(new_x, order).to(x.dtype), gather_tokens(new_size, order), positions.gather(1, order)


class DTEMEncoder(ToMeEncoder):
    """ToMe's block loop with a :class:`DecoupledMerger` per block (inference, and training with
    ``relaxed=False``); in training mode with ``relaxed`` (default) the soft merge of the official training."""

    def __init__(self, vit: nn.Module, schedule: list[int], feat_dim: int, k2: int = 3, tau1: float = 0.1,
                 tau2: float = 0.1, prop_attn: bool = True, train_schedule: list[int] | None = None):
        super().__init__(vit, schedule, prop_attn=prop_attn)
        p, dim = num_prefix(vit), int(vit.embed_dim)
        self.matchers = nn.ModuleList(DecoupledMerger(p % 2, p, dim, feat_dim, k2, tau1, tau2) for _ in vit.blocks)
        self.train_schedule = list(schedule if train_schedule is None else train_schedule)
        self.relaxed = True

    def embeddings(self) -> list[nn.Parameter]:
        """The decoupled embedding modules' parameters (the only ones the modular stage trains)."""
        return [q for m in self.matchers for q in m.embed.parameters()]

    @torch.no_grad()
    def init_from_keys(self) -> None:
        """Every module set to its block's head-mean key projection: the metric becomes ToMe's (``init=keys``)."""
        for blk, m in zip(self.vit.blocks, self.matchers, strict=True):
            attn = blk.attn
            qkv = getattr(attn, "qkv", None)
            heads, dim = int(attn.num_heads), int(self.vit.embed_dim)
            if not isinstance(qkv, nn.Linear):
                raise ConfigError("dtem: init=keys needs a fused qkv projection in every block; use init=random")
            hd = qkv.weight.shape[0] // (3 * heads)
            if m.embed.out_features != hd:
                raise ConfigError(f"dtem: init=keys needs feat_dim = the head dimension ({hd}), not "
                                  f"{m.embed.out_features}")
            w = qkv.weight[heads * hd: 2 * heads * hd].reshape(heads, hd, dim).mean(0)
            bias = qkv.bias[heads * hd: 2 * heads * hd] if qkv.bias is not None else getattr(attn, "k_bias", None)
            m.embed.weight.copy_(w)
            m.embed.bias.copy_(bias.reshape(heads, hd).mean(0) if bias is not None else torch.zeros(hd))

    def forward(self, x: torch.Tensor):
        if self.training and self.relaxed:
            return self.forward_relaxed(x)
        with contextlib.ExitStack() as stack:
            for blk, m in zip(self.vit.blocks, self.matchers, strict=True):
                m.source = stack.enter_context(tap(blk.norm1))
            try:
                return super().forward(x)
            finally:
                for m in self.matchers:
                    m.source = None

    def forward_relaxed(self, x: torch.Tensor):
        """The official training forward: soft merging, every token kept (inactive ones behind the ``n`` active),
        size-proportional attention. Returns all patch tokens with ``mask`` = active, ``sizes`` = soft sizes."""
        vit = self.vit
        h, positions, grid, p = start_tokens(vit, x)
        bsz, total = x.shape[0], h.shape[1] - p
        n = total  # active patch tokens, always the first n
        size = None
        rope = rope_of(vit, grid)
        counts = []
        for blk, m, r in zip(vit.blocks, self.matchers, self.train_schedule, strict=True):
            r = min(r, n // 2)
            bias = relaxed_size_bias(size, p).to(h.dtype) if (self.prop_attn and size is not None) else None
            if r <= 0:
                h = call_block(blk, h, rope, bias)
            else:
                with tap(blk.norm1) as t:
                    h, _, _, _ = attention_step(blk, h, bias, rope, need_v=False, rotated=False)
                z = t.out[:, p: p + n].detach()  # official: the metric layer sees input.detach()
                if size is None:
                    size = torch.ones(bsz, total, 1, device=h.device)
                act, s_act, pos_act = m.soft(h[:, p: p + n], z, size[:, :n], positions[:, :n], r)
                h = torch.cat([h[:, :p], act, h[:, p + n:]], dim=1)
                size = torch.cat([s_act, size[:, n:]], dim=1)
                positions = torch.cat([pos_act, positions[:, n:]], dim=1)
                h = mlp_residual(blk, h)
                n -= r
                rope = rope_of(vit, grid, positions)
            counts.append(n)
        mask = (torch.arange(total, device=x.device) < n).expand(bsz, -1)
        sizes = size.squeeze(-1) if size is not None else None
        aux = {"tokens_per_layer": tokens_per_layer(counts, bsz, x.device)}
        return to_output(vit, h, positions, grid, sizes=sizes, mask=mask, aux=aux)


@register_method("dtem")
class DTEM(ToMe):
    """ToMe's budget (r per block, its grid and range); DTEM's learned merging metric."""

    description = "DTEM: ToMe merging on a learned per-block decoupled embedding, trained by soft merging"
    style = ("#1b9e77", r"$\spadesuit$")  # every filled letter marker is taken; a filled mathtext glyph
    training = "pretrain+finetune"

    @dataclass(frozen=True)
    class Options:
        feat_dim: int | None = option(None, "embedding width (null: the head dimension, 2x from 1024 wide on, as "
                                            "officially)", min=1)
        k2: int = option(3, "B candidates per A token in the soft grouping (official --k2)", min=1)
        tau1: float = option(0.1, "score temperature of the soft grouping (official --tau1)", min=0,
                             min_exclusive=True)
        tau2: float = option(0.1, "softmax temperature of the soft top-r (official --tau2)", min=0,
                             min_exclusive=True)
        train_r: int | None = option(None, "r of the relaxed training (null: the budget's r, as official "
                                           "--reduction = --val-reduction)", min=0)
        init: str = option("random", "module init: random (official nn.Linear default) or keys (ToMe's metric)",
                           choices=INITS)
        schedule: str = option("constant", "r per block: constant, or decreasing from 2r to 0", choices=SCHEDULES)
        prop_attn: bool = option(True, "proportional attention (log of merged sizes added to the logits)")
        finetune_relaxed: bool = option(True, "fine-tune through the soft merging (end-to-end DTEM); false: through "
                                              "ToMe's hard merge, embeddings frozen")
        embed: Stage = option(default_factory=Stage, help="the embedding modules alone (backbone and head frozen, "
                                                          "soft merging, task loss)")
        finetune: Stage = option(default_factory=Stage, help="then everything at r (the regime's fine-tuning)")

    def check_budget(self):
        super().check_budget()
        o, spec = self.opts, self.spec
        if o.train_r is not None:
            hi = self.max_r(spec, o.schedule)
            self._require(o.train_r <= hi, f"r=0..{hi} and method.train_r=0..{hi}, here train_r={o.train_r}")
        if o.init == "keys":
            hd = spec.embed_dim // spec.num_heads
            if self.feat_dim() != hd:
                raise ConfigError(f"dtem: init=keys needs feat_dim = the head dimension ({hd}) of {spec.name}, not "
                                  f"{self.feat_dim()}")

    def feat_dim(self) -> int:
        f = self.opts.feat_dim
        return int(f) if f is not None else default_feat_dim(self.spec.embed_dim, self.spec.num_heads)

    def train_schedule(self) -> list[int]:
        r = self.opts.train_r
        return self.schedule() if r is None else tome_schedule(int(r), self.spec.depth, self.opts.schedule)

    def build(self, vit):
        vit = detach_copy(vit)
        check_blocks(vit, "dtem")
        o = self.opts
        enc = DTEMEncoder(vit, self.schedule(), self.feat_dim(), o.k2, o.tau1, o.tau2, prop_attn=o.prop_attn,
                          train_schedule=self.train_schedule())
        if o.init == "keys":
            enc.init_from_keys()
        return enc

    def fit(self, ctx):
        from lwbench.training.loop import task_loss

        model = self.task_model(ctx)
        enc = model.encoder
        model.requires_grad_(False)
        params = enc.embeddings()
        for q in params:
            q.requires_grad_(True)
        stage = ctx.stage(self.opts.embed)
        if stage.steps:
            enc.relaxed, enc.train_schedule = True, self.train_schedule()
            ctx.train(model, task_loss, f"dtem-embed-{self.budget_str()}", stage=stage, params=params)
        if ctx.stage(self.opts.finetune).steps:
            enc.relaxed, enc.train_schedule = self.opts.finetune_relaxed, self.schedule()
            model.requires_grad_(True)
            if not enc.relaxed:
                for q in params:
                    q.requires_grad_(False)  # no gradient reaches them through the hard matching
            ctx.finetune(model, tag=f"dtem-{self.budget_str()}-finetune", stage=self.opts.finetune)
        return model.eval()


__all__ = ["DTEM", "DTEMEncoder", "DecoupledMerger", "soft_top_r", "relaxed_size_bias", "default_feat_dim"]
