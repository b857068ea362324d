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
like the CNN maps. Cost: ``K * (n - 1) + 2`` coalitions per image. In general each is the
remaining blocks (plus norm and head) on the whole sequence, about ``K * n`` times a block's
cost, not a table lookup as on CNN heads. For class-token models split before their last block
(the default) :class:`ClassTokenPath` is exact and far cheaper: one masked softmax over the
keys and the MLP on the class token per coalition. ``block=2`` (2 x 2 tiles of tokens) divides
``n`` by four either way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ShapCAMError

POOLS = ("token", "avg")


def is_token_model(model: nn.Module) -> bool:
    """A timm ``VisionTransformer`` (or a subclass of it)."""
    return any(c.__name__ == "VisionTransformer" for c in type(model).__mro__) and hasattr(
        model, "blocks") and hasattr(model, "patch_embed")


def is_swin(model: nn.Module) -> bool:
    """A timm ``SwinTransformer`` (v1)."""
    return any(c.__name__ == "SwinTransformer" for c in type(model).__mro__) and hasattr(
        model, "layers")


def is_transformer(model: nn.Module) -> bool:
    """A model whose players are tokens: a ViT or a Swin."""
    return is_token_model(model) or is_swin(model)


def check_token_model(model: nn.Module) -> None:
    """One clear line for the transformer variants the token game does not cover."""
    name = type(model).__name__
    base = next(c for c in type(model).__mro__ if c.__name__ == "VisionTransformer")
    if any(getattr(type(model), f) is not getattr(base, f) for f in ("forward_head", "pool")):
        raise ShapCAMError(f"{name} has a head of its own (e.g. DeiT's distillation head); "
                           "the token game covers VisionTransformer's own head")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in POOLS:
        raise ShapCAMError(f"{name} pools with {model.global_pool!r}; the token game supports "
                           f"{', '.join(POOLS)} pooling")
    if model.global_pool == "avg" and getattr(model, "pool_include_prefix", False):
        raise ShapCAMError(f"{name} averages the prefix tokens too; not supported")
    if len(model.blocks) < 2:
        raise ShapCAMError(f"{name} has {len(model.blocks)} block: the token game needs two")


def default_layer(model: nn.Module) -> str:
    """The tokens entering the last block: the output of ``blocks.{L - 2}`` (ViT) or of the
    last stage's second-to-last block (Swin)."""
    if is_swin(model):
        last = len(model.layers) - 1
        return f"layers.{last}.blocks.{len(model.layers[last].blocks) - 2}"
    return f"blocks.{len(model.blocks) - 2}"


def token_split(model: nn.Module, layer: str) -> tuple[str, nn.Module]:
    """``(trunk layer, head)`` of a transformer split at ``layer``: the head takes the tokens
    (and a coalition) and returns logits."""
    if is_swin(model):
        return layer, SwinHead(model, layer)
    k = split_index(model, layer)
    return f"blocks.{k}", TokenHead(model, k)


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

    def grid(self, tokens: torch.Tensor) -> torch.Tensor:
        return grid(tokens, self.prefix)

    def n_positions(self, tokens: torch.Tensor) -> int:
        return tokens.shape[1] - self.prefix

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


class ClassTokenPath:
    """Exact fast path of a class-token model split just before its last block: only the
    class token's output is read, and the keys and values of every token are those of the
    (coalition-independent) input sequence, so per image they are computed once; a coalition
    then costs one masked softmax over the keys, a weighted sum of the values and the MLP on a
    single token, instead of a whole block on the sequence (about ``n`` times less work).
    """

    def __init__(self, head: TokenHead, tokens: torch.Tensor) -> None:
        """``tokens``: ``(T, D)`` of one image, the input of the last block."""
        blk, m = head.model.blocks[-1], head.model
        attn = blk.attn
        h = blk.norm1(tokens.unsqueeze(0))
        T = tokens.shape[0]
        qkv = attn.qkv(h).reshape(1, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (1, heads, T, hd)
        q, k = attn.q_norm(q), attn.k_norm(k)
        self.scores = (q[0, :, 0] * attn.scale).unsqueeze(1) @ k[0].transpose(-2, -1)
        self.scores = self.scores.squeeze(1)  # (heads, T): the class token's query on all keys
        self.values = v[0]  # (heads, T, hd)
        self.gate = attn.gate(h[0, :1]).sigmoid() if attn.gate is not None else None
        self.cls = tokens[:1]  # (1, D)
        self.blk, self.attn, self.model, self.prefix = blk, attn, m, head.prefix

    def logits(self, present: torch.Tensor) -> torch.Tensor:
        """Logits for coalitions ``present (M, N)``."""
        M = present.shape[0]
        keep = torch.cat([torch.ones(M, self.prefix, dtype=torch.bool, device=present.device),
                          present.bool()], 1)
        s = self.scores.unsqueeze(0).masked_fill(~keep.unsqueeze(1), float("-inf"))
        out = torch.einsum("mht,htd->mhd", s.softmax(-1), self.values).reshape(M, -1)
        out = self.attn.norm(out)
        if self.gate is not None:
            out = out * self.gate
        y = self.cls + self.blk.ls1(self.attn.proj(out))
        y = y + self.blk.ls2(self.blk.mlp(self.blk.norm2(y)))
        m = self.model
        return m.head(m.head_drop(m.fc_norm(m.norm(y))))


def has_class_token_path(head: nn.Module) -> bool:
    """Class-token pooling, one block after the split, timm's plain ``Block``/``Attention``."""
    if not isinstance(head, TokenHead):
        return False
    m = head.model
    blk = m.blocks[-1]
    return (m.global_pool == "token" and head.start == len(m.blocks) - 1
            and type(blk).__name__ == "Block" and type(blk.attn).__name__ == "Attention")


def grid(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """Patch tokens ``(B, P + N, D)`` as a map ``(B, D, h, w)`` (a square grid)."""
    B, T, D = tokens.shape
    n = T - prefix
    side = math.isqrt(n)
    if side * side != n:
        raise ShapCAMError(f"{n} patch tokens do not form a square grid; use a square input")
    return tokens[:, prefix:].transpose(1, 2).reshape(B, D, side, side)


class SwinHead(nn.Module):
    """A Swin split inside its last stage: the remaining blocks of that stage, then ``norm ->
    average pool -> fc``, with an optional key mask over the ``h x w`` tokens.

    Covered where the last stage is one attention window without shift (timm's Swin at 224:
    7 x 7 tokens, window 7): each remaining block is then plain attention over all tokens with
    its relative position bias, so a key mask (``-inf`` for absent tokens) removes them exactly
    as for a ViT, and the average pools the present tokens only. Tokens are NHWC.
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        last = len(model.layers) - 1
        stage = model.layers[last]
        head, _, rest = layer.partition(f"layers.{last}.blocks.")
        d = len(stage.blocks)
        if head or not rest.isdigit() or not 0 <= int(rest) <= d - 2:
            raise ShapCAMError(f"a Swin is explained at the output of a block of its last "
                               f"stage, layers.{last}.blocks.0 .. layers.{last}.blocks.{d - 2}"
                               f" (default: the tokens entering the last block), not {layer!r}")
        self.blocks = list(stage.blocks)[int(rest) + 1:]
        for blk in self.blocks:
            if any(blk.shift_size) or tuple(blk.window_size) != tuple(blk.input_resolution):
                raise ShapCAMError(f"{type(model).__name__}'s last stage is not one unshifted "
                                   "attention window at this input size; not supported")
        if type(model.head).__name__ != "ClassifierHead" or model.head.global_pool.pool_type \
                != "avg":
            raise ShapCAMError(f"{type(model).__name__} has a head other than average pooling "
                               "and a linear layer; not supported")
        self.model, self.prefix = model, 0

    def grid(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.permute(0, 3, 1, 2)

    def n_positions(self, tokens: torch.Tensor) -> int:
        return tokens.shape[1] * tokens.shape[2]

    def forward(self, tokens: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        B, H, W, C = tokens.shape
        mask = None
        if present is not None:
            bias = torch.zeros(B, 1, H * W, dtype=tokens.dtype, device=tokens.device)
            bias = bias.masked_fill(~present.bool().unsqueeze(1), float("-inf"))
            mask = bias.expand(B, H * W, H * W)  # one window per image: (windows, N, N)
        x = tokens
        for blk in self.blocks:  # SwinTransformerBlock.forward with the key mask
            a = blk.attn(blk.norm1(x).reshape(B, H * W, C), mask=mask).reshape(B, H, W, C)
            x = (x + blk.drop_path1(a)).reshape(B, -1, C)
            x = (x + blk.drop_path2(blk.mlp(blk.norm2(x)))).reshape(B, H, W, C)
        x = self.model.norm(x).reshape(B, -1, C)
        if present is None:
            pooled = x.mean(1)
        else:  # absent tokens' outputs (NaN when no key is left) are left out, not multiplied
            keep = present.bool().unsqueeze(-1)
            pooled = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)
            pooled = pooled / keep.sum(1).clamp_min(1)  # the empty coalition pools to 0
        head = self.model.head
        return head.flatten(head.fc(head.drop(pooled)))


class TokenGame:
    """The token games of a batch (the interface of :class:`~shapcam.methods.shapcam.
    FeatureMaskGame`'s generic path): ``game(index, masks)`` -> values."""

    plan = None
    prefix_values = None  # the estimator evaluates coalitions through __call__

    def __init__(self, head: TokenHead, tokens: torch.Tensor, targets: torch.Tensor, *,
                 value: str = "probability", groups: torch.Tensor | None = None,
                 batch_size: int = 256, fast: bool = True) -> None:
        self.head, self.tokens, self.targets = head, tokens, targets
        #: the exact class-token path (:class:`ClassTokenPath`), where the model allows it
        self.fast = fast and has_class_token_path(head)
        self._paths: dict[int, ClassTokenPath] = {}
        self.value, self.batch_size = value, batch_size
        self.n_games = tokens.shape[0]
        self.n_positions = head.n_positions(tokens)
        self.device = tokens.device
        self.groups = groups.to(self.device) if groups is not None else None
        self.n_players = int(self.groups.max()) + 1 if groups is not None else self.n_positions

    @torch.no_grad()
    def __call__(self, index: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        present = masks.to(self.device)
        if self.groups is not None:
            present = present[..., self.groups]
        index = index.to(self.device)
        if self.fast:
            out = torch.empty(index.shape[0], dtype=torch.float32, device=self.device)
            for b in index.unique().tolist():
                if b not in self._paths:
                    self._paths[b] = ClassTokenPath(self.head, self.tokens[b])
                sel = torch.nonzero(index == b).squeeze(1)
                for s in range(0, sel.numel(), self.batch_size):
                    rows = sel[s:s + self.batch_size]
                    logits = self._paths[b].logits(present[rows]).float()
                    out[rows] = self._value(logits, self.targets[b].expand(rows.numel()))
            return out
        out = []
        for s in range(0, index.shape[0], self.batch_size):
            i = index[s:s + self.batch_size]
            logits = self.head(self.tokens[i], present[s:s + self.batch_size]).float()
            out.append(self._value(logits, self.targets[i]))
        return torch.cat(out)

    def _value(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scores = logits if self.value == "logit" else logits.softmax(-1)
        return scores.gather(1, targets.view(-1, 1)).squeeze(1)
