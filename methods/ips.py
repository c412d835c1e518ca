"""``ips``: Iterative Patch Selection (Bergner et al., ICLR 2023). Budget = k = M, the memory size.

IPS scores patches with the attention of its aggregator, a multi-head cross-attention with one learned
query over patch embeddings (official ``architecture/transformer.py``). Selection runs without gradients:
a memory of M patches is filled with the first M, then the patches are visited in chunks of I and the
memory keeps the M best of memory + chunk. Only the M survivors take the gradient pass.

Adaptation to a ViT backbone (whose blocks mix patches, so there is no per-patch encoder to run on all N
patches): the embeddings scored are the backbone's own shallow patch embeddings (projection + position
embedding), computed chunk by chunk; the gradient pass runs the backbone on the M kept patches. The
aggregator (query, attention, residual + LayerNorm, MLP, as in IPS) pools the M kept embeddings; its output
enters the backbone through the CLS token via a zero-initialised projection, so the task loss trains the
scorer (as IPS's classification loss trains its aggregator) and an untrained model equals the plain
backbone on the kept patches.

Ranking (``ranking``, default ``softmax``, IPS's rule): at every iteration the memory + chunk is scored by the
aggregator's attention, a softmax over those M + I patches per head, averaged over heads; the M best stay. With
one head the softmax is monotone in the logit, so this is the top-M by logit whatever the buffer; with several
heads a patch's score depends on its buffer-mates (each head's normaliser differs), so the iterative memory is
not the one-shot top-M, as in the official code. ``ranking=logits`` (lwbench's version 1) ranks by the
head-mean of the logits instead, a buffer-independent score whose iterative memory is exactly the one-shot
top-M; measured against the official rule with 8 heads, the kept sets overlap 0.91-0.99 (Jaccard) and 0.30-0.57
when the attention is sharp, so it is a different method and is labelled as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lwbench.config import Stage
from lwbench.method import Overhead, PatchSelectionMethod, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.tokens import TokenOutput
from lwbench.vit import all_positions, assemble, embed_patches, grid_of, rope_of, run_blocks, to_output


def softmax_head_mean(logits: torch.Tensor) -> torch.Tensor:
    """IPS's ranking score of a buffer: ``(B, H, n)`` logits -> ``(B, n)`` head-mean of the per-head softmax."""
    return logits.softmax(dim=-1).mean(1)


class CrossAttentionScorer(nn.Module):
    """IPS's ``Transformer``: one learned query, multi-head cross-attention, residual + LayerNorm, MLP."""

    def __init__(self, dim: int, heads: int = 8, head_dim: int | None = None, mlp_ratio: float = 4.0,
                 dropout: float = 0.1, attn_dropout: float = 0.1):
        super().__init__()
        self.heads = int(heads)
        self.head_dim = int(head_dim or max(1, dim // heads))
        inner = self.heads * self.head_dim
        self.query = nn.Parameter(torch.empty(1, 1, dim))
        bound = math.sqrt(1.0 / self.head_dim)
        nn.init.uniform_(self.query, -bound, bound)
        self.q_w = nn.Linear(dim, inner, bias=False)
        self.k_w = nn.Linear(dim, inner, bias=False)
        self.v_w = nn.Linear(dim, inner, bias=False)
        self.fc = nn.Linear(inner, dim, bias=False)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.ReLU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """``(B, n, D)`` -> ``(B, H, n)`` scaled query-key logits."""
        b, n, _ = emb.shape
        q = self.q_w(self.query).view(1, 1, self.heads, self.head_dim).transpose(1, 2)  # (1, H, 1, d)
        k = self.k_w(emb).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, n, d)
        return (q @ k.transpose(-2, -1)).squeeze(2) / math.sqrt(self.head_dim)

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        """Buffer-independent ranking score ``(B, n)``: head-mean of the attention logits (``ranking=logits``)."""
        return self.logits(emb).mean(1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Pool ``(B, M, D)`` kept embeddings into one ``(B, D)`` vector."""
        b, n, _ = emb.shape
        attn = self.attn_drop(self.logits(emb).softmax(dim=-1))  # (B, H, M)
        v = self.v_w(emb).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, M, d)
        x = (attn.unsqueeze(2) @ v).squeeze(2).reshape(b, -1)  # (B, H*d)
        x = self.norm1(self.drop(self.fc(x)) + self.query[:, 0])
        return self.norm2(x + self.drop(self.mlp(x)))


class IterativeSelector(Overhead):
    """No-grad iterative top-M over chunks of I patches (selection cost), plus the aggregator that
    trains the scorer in the gradient pass. The backbone is passed in, not owned."""

    def __init__(self, dim: int, heads: int, dropout: float, ranking: str = "softmax"):
        super().__init__()
        self.scorer = CrossAttentionScorer(dim, heads=heads, dropout=dropout, attn_dropout=dropout)
        self.ranking = ranking
        self.to_cls = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_cls.weight)
        nn.init.zeros_(self.to_cls.bias)

    @torch.no_grad()
    def select(self, vit: nn.Module, x: torch.Tensor, m: int, chunk: int) -> torch.Tensor:
        """Indices ``(B, M)`` (sorted) of the memory after the last chunk, embedding at most I new patches at a
        time. A patch's logits are computed once and carried with it (the softmax is per buffer)."""
        grid = grid_of(vit, x)
        n = grid[0] * grid[1]
        b = x.shape[0]
        idx = torch.arange(n, device=x.device).expand(b, n)
        mem_idx = idx[:, :m]
        mem_logits = self.scorer.logits(embed_patches(vit, x, mem_idx))  # (B, H, M)
        for start in range(m, n, chunk):
            new_idx = idx[:, start: min(start + chunk, n)]
            all_idx = torch.cat([mem_idx, new_idx], dim=1)
            all_logits = torch.cat([mem_logits, self.scorer.logits(embed_patches(vit, x, new_idx))], dim=2)
            score = softmax_head_mean(all_logits) if self.ranking == "softmax" else all_logits.mean(1)
            top = score.topk(m, dim=1).indices
            mem_idx = all_idx.gather(1, top)
            mem_logits = all_logits.gather(2, top.unsqueeze(1).expand(-1, all_logits.shape[1], -1))
        return mem_idx.sort(dim=1).values

    def forward(self, vit: nn.Module, x: torch.Tensor, m: int, chunk: int) -> torch.Tensor:
        return self.select(vit, x, m, chunk)

    def summary(self, emb: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D)`` addition to the CLS token (zero for an untrained model)."""
        return self.to_cls(self.scorer(emb)).unsqueeze(1)


class IPSEncoder(nn.Module):
    def __init__(self, vit: nn.Module, m: int, chunk: int, heads: int, dropout: float, ranking: str = "softmax"):
        super().__init__()
        self.vit = vit
        self.m = int(m)
        self.chunk = int(chunk)
        self.selector = IterativeSelector(int(vit.embed_dim), heads, dropout, ranking)

    def forward(self, x: torch.Tensor) -> TokenOutput:
        grid = grid_of(self.vit, x)
        n = grid[0] * grid[1]
        if self.m >= n:  # IPS is not needed (as in the official ``ips``): every patch, in order
            idx = all_positions(x.shape[0], grid, x.device)
        else:
            idx = self.selector(self.vit, x, self.m, self.chunk)
        emb = embed_patches(self.vit, x, idx)  # gradient pass on the M kept patches only
        tok = assemble(self.vit, emb)
        tok = torch.cat([tok[:, :1] + self.selector.summary(emb), tok[:, 1:]], dim=1)
        tok = run_blocks(self.vit, tok, rope_of(self.vit, grid, idx))
        return to_output(self.vit, tok, idx, grid)


@register_method("ips")
class IPS(PatchSelectionMethod):
    description = "no-grad iterative top-M patch memory scored by a cross-attention aggregator; grad pass on M"
    style = ("#17becf", "<")
    training = "finetune"
    families = ("vit", "eva")
    families_note = "its aggregator's summary enters the backbone through the class token"
    version = 2  # 2: ranked by the head-mean softmax over memory + chunk, as the official code (1: logit mean)

    @dataclass(frozen=True)
    class Options:
        chunk: int = option(32, "I: patches embedded and scored per iteration (official traffic signs: 32)", min=1)
        heads: int = option(8, "H of the cross-attention scorer (official: 8)", min=1)
        dropout: float = option(0.1, "dropout and attention dropout of the aggregator (official: 0.1)", min=0,
                                max=0.99)
        ranking: str = option("softmax", "softmax: head-mean softmax over memory + chunk (official); logits: "
                              "head-mean logit, buffer-independent (lwbench version 1)", choices=("softmax", "logits"))
        finetune: Stage = option(default_factory=Stage, help="end-to-end training of scorer, backbone and head")

    def build(self, vit: nn.Module) -> nn.Module:
        o = self.opts
        return IPSEncoder(detach_copy(vit), int(self.budget), o.chunk, o.heads, o.dropout, o.ranking)

    def fit(self, ctx) -> nn.Module:
        model = self.task_model(ctx, trainable=True)
        ctx.finetune(model, tag=f"ips-{int(self.budget)}", stage=self.opts.finetune)
        return model.eval()
