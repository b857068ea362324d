"""Vision transformers: patch tokens as players, absent tokens removed from attention.

For a timm ``VisionTransformer`` split after block ``k`` (default: the tokens entering the last
block), the players are the ``N`` patch tokens ``T_1..T_N`` of that sequence; the prefix tokens
(class token, registers) are always present. The worth of a coalition ``S`` is

    v(S) = softmax(head(norm(blocks_{k+1..L}(T ; keys restricted to prefix + S))))[c]

where every remaining block attends only to the present tokens (a boolean key mask: an absent
token is *removed* from attention, as if it were not in the sequence, not set to zero: a zero
token still has a key and a value and would be attended). With class-token pooling the head
reads the class token; with average pooling the mean runs over the present patch tokens only
(the empty coalition then pools to the zero vector). So ``v(S)`` equals the model evaluated on
the shorter sequence ``prefix + S`` (tested), which is the token analogue of the paper's "only
the positions in S keep their activations".

Maps live on the patch grid (14 x 14 for a 224 input and 16-pixel patches) and are upsampled
like the CNN maps. Cost: every coalition is a transformer block (plus norm and head) on the
whole sequence, ``K * (n - 1) + 2`` of them per image: about ``K * n`` times a block's cost,
not a table lookup as on CNN heads; ``block=2`` (2 x 2 tiles of tokens) divides ``n`` by four.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ShapCAMError

POOLS = ("token", "avg")


def is_token_model(model: nn.Module) -> bool:
    """A timm ``VisionTransformer`` (or a subclass of it)."""
    return any(c.__name__ == "VisionTransformer" for c in type(model).__mro__) and hasattr(
        model, "blocks") and hasattr(model, "patch_embed")


def check_token_model(model: nn.Module) -> None:
    """One clear line for the transformer variants the token game does not cover."""
    name = type(model).__name__
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in POOLS:
        raise ShapCAMError(f"{name} pools with {model.global_pool!r}; the token game supports "
                           f"{', '.join(POOLS)} pooling")
    if model.global_pool == "avg" and getattr(model, "pool_include_prefix", False):
        raise ShapCAMError(f"{name} averages the prefix tokens too; not supported")
    if len(model.blocks) < 2:
        raise ShapCAMError(f"{name} has {len(model.blocks)} block: the token game needs two")


def default_layer(model: nn.Module) -> str:
    """The tokens entering the last block: the output of ``blocks.{L - 2}``."""
    return f"blocks.{len(model.blocks) - 2}"


def split_index(model: nn.Module, layer: str) -> int:
    """``blocks.k`` -> ``k`` (the split is after that block; one must remain)."""
    head, _, index = layer.partition(".")
    last = len(model.blocks) - 2
    if head != "blocks" or not index.isdigit() or not 0 <= int(index) <= last:
        raise ShapCAMError(f"a vision transformer is explained at the output of one of its "
                           f"blocks, blocks.0 .. blocks.{last} (default blocks.{last}: the "
                           f"tokens entering the last block), not {layer!r}")
    return int(index)


class TokenHead(nn.Module):
    """``blocks[k + 1:] -> norm -> pool -> fc_norm -> head`` with an optional key mask.

    ``forward(tokens)`` equals the model's own computation; ``forward(tokens, present)`` with
    ``present (B, N)`` bool over the patch tokens removes the absent ones from attention and
    from average pooling.
    """

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        check_token_model(model)
        self.model, self.start = model, k + 1
        self.prefix = int(model.num_prefix_tokens)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        mask = None
        if present is not None:
            keep = torch.cat([torch.ones(present.shape[0], self.prefix, dtype=torch.bool,
                                         device=present.device), present.bool()], 1)
            mask = keep[:, None, None, :]  # (B, heads, queries, keys) by broadcasting
        x = tokens
        for blk in m.blocks[self.start:]:
            x = blk(x, attn_mask=mask)
        x = m.norm(x)
        if m.global_pool == "token":
            pooled = x[:, 0]
        else:
            patches = x[:, self.prefix:]
            if present is None:
                pooled = patches.mean(1)
            else:
                w = present.to(patches.dtype).unsqueeze(-1)
                pooled = (patches * w).sum(1) / w.sum(1).clamp_min(1)
        return m.head(m.head_drop(m.fc_norm(pooled)))


def grid(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """Patch tokens ``(B, P + N, D)`` as a map ``(B, D, h, w)`` (a square grid)."""
    B, T, D = tokens.shape
    n = T - prefix
    side = math.isqrt(n)
    if side * side != n:
        raise ShapCAMError(f"{n} patch tokens do not form a square grid; use a square input")
    return tokens[:, prefix:].transpose(1, 2).reshape(B, D, side, side)


class TokenGame:
    """The token games of a batch (the interface of :class:`~shapcam.methods.shapcam.
    FeatureMaskGame`'s generic path): ``game(index, masks)`` -> values."""

    plan = None
    prefix_values = None  # no exact fast path: every coalition runs the remaining blocks

    def __init__(self, head: TokenHead, tokens: torch.Tensor, targets: torch.Tensor, *,
                 value: str = "probability", groups: torch.Tensor | None = None,
                 batch_size: int = 256) -> None:
        self.head, self.tokens, self.targets = head, tokens, targets
        self.value, self.batch_size = value, batch_size
        self.n_games = tokens.shape[0]
        self.n_positions = tokens.shape[1] - head.prefix
        self.device = tokens.device
        self.groups = groups.to(self.device) if groups is not None else None
        self.n_players = int(self.groups.max()) + 1 if groups is not None else self.n_positions

    @torch.no_grad()
    def __call__(self, index: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        present = masks.to(self.device)
        if self.groups is not None:
            present = present[..., self.groups]
        index = index.to(self.device)
        out = []
        for s in range(0, index.shape[0], self.batch_size):
            i = index[s:s + self.batch_size]
            logits = self.head(self.tokens[i], present[s:s + self.batch_size]).float()
            t = self.targets[i].view(-1, 1)
            out.append((logits if self.value == "logit" else logits.softmax(-1)).gather(1, t))
        return torch.cat(out).squeeze(1)
