"""Forward passes of open_clip's two towers with prompt tokens inserted.

Both functions reproduce `CLIP.encode_text` / `CLIP.encode_image` exactly when no prompts are given
(tests check it to 1e-5), so every method differs from zero-shot CLIP only by its prompts.

Prompt tensors are per layer: shape (depth, length, width). Layer 0's prompts enter with the input
tokens; before layer i < depth the outputs at the prompt positions are replaced by layer i's prompts
(VPT-deep / layer-wise UPT). depth 1 is the shallow form. Visual prompts may also be given per sample,
(batch, depth, length, width), so that images of several tasks share one pass when serving; tasks of
different depths too, with `depths` (batch,) saying how many of its layers each sample's prompts reach
(the rows beyond are padding, never read).

The image towers pool the [CLS] token alone, so their last block runs its attention query, output
projection and MLP for that token only (its keys and values still come from every token): the same
features, ~8 % less work per image on ViT-B-16.

Both towers also take low-rank adapters on their attention's query, key and value projections
(`QkvLora`, CLIP-LoRA): the blocks then run their attention from its weights with each update added
beside the base in-projection; without adapters, the blocks run as open_clip's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer, text_global_pool


def encode_text(
    clip: CLIP,
    token_ids: torch.Tensor,
    context: torch.Tensor | None = None,
    normalize: bool = False,
    lora: QkvLora | None = None,
) -> torch.Tensor:
    """Encode tokenized prompts; `context` (depth, m, width) replaces the embeddings at positions 1..m;
    `lora`: the text tower's adapters.

    The causal mask means no position sees a later one, so the end-of-text feature only depends on the
    tokens up to it: the sequence is cut after the longest prompt's end-of-text token instead of
    running all 77 positions.
    """
    token_ids = _truncate_after_eot(clip, token_ids)
    length = token_ids.shape[1]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(token_ids).to(cast_dtype)
    if context is not None:
        x = _replace(x, context[0], start=1)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
    x = _run_blocks(clip.transformer, x, mask, context, start=1, lora=lora)
    x = clip.ln_final(x)
    x = text_global_pool(x, token_ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if isinstance(clip.text_projection, torch.nn.Linear):
        x = clip.text_projection(x)
    elif clip.text_projection is not None:
        x = x @ clip.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def encode_image(
    clip: CLIP,
    images: torch.Tensor,
    prompts: torch.Tensor | None = None,
    normalize: bool = False,
    depths: torch.Tensor | None = None,
    lora: QkvLora | None = None,
) -> torch.Tensor:
    """Encode images with visual prompts (depth, n, width) inserted after [CLS], before the patches;
    `lora`: the image tower's adapters.

    Prompts of shape (batch, depth, n, width) give each image its own (one pass for several tasks);
    `depths` (batch,), with such prompts only, limits sample b's to its first depths[b] layers: after
    them its prompt positions carry the previous layer's outputs on, as a shallower task's would.
    Prompts are inserted after the positional embeddings and pass through `ln_pre` with the other
    tokens; they are dropped before pooling, so average-pooled towers are not skewed by them.
    """
    visual = clip.visual
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    n_prompts = 0
    if prompts is not None:
        if prompts.dim() == 4:
            prompts = prompts.transpose(0, 1)  # (depth, batch, n, width): layer i's are prompts[i]
        n_prompts = prompts.shape[-2]
        x = torch.cat([x[:, :1], _expand(prompts[0], x), x[:, 1:]], dim=1)
    x = visual.ln_pre(x)
    first_token_only = pools_first_token(visual)
    x = _run_blocks(visual.transformer, x, None, prompts, start=1, depths=depths, first_token_only=first_token_only,
                    lora=lora)
    if n_prompts and not first_token_only:
        x = torch.cat([x[:, :1], x[:, 1 + n_prompts:]], dim=1)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return F.normalize(pooled, dim=-1) if normalize else pooled


def _run_blocks(
    transformer: Transformer,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    prompts: torch.Tensor | None,
    start: int,
    depths: torch.Tensor | None = None,
    first_token_only: bool = False,
    lora: QkvLora | None = None,
) -> torch.Tensor:
    """Run the residual blocks, swapping in layer i's prompts at positions start..start+len before block i
    (only in the samples whose `depths` exceed i, where given). `first_token_only`: the last block's
    outputs at the first position alone (see `first_token_block`), for a tower that pools only it.
    `lora`: block i runs with layer i's adapters (`lora_block`)."""
    batch_first = transformer.batch_first
    if not batch_first:
        x = x.transpose(0, 1)
    depth = 0 if prompts is None else prompts.shape[0]
    for index, block in enumerate(transformer.resblocks):
        if 0 < index < depth:
            replaced = _replace(x, prompts[index], start, batch_first)
            if depths is None:
                x = replaced
            else:
                reached = (depths > index).view((-1, 1, 1) if batch_first else (1, -1, 1))
                x = torch.where(reached.to(x.device), replaced, x)
        last = first_token_only and index == len(transformer.resblocks) - 1
        if lora is not None:
            x = lora_block(block, x, lora, index, mask, last, batch_first)
        elif last:
            x = first_token_block(block, x, batch_first)
        else:
            x = block(x, attn_mask=mask)
    return x if batch_first else x.transpose(0, 1)


def pools_first_token(visual: VisionTransformer) -> bool:
    """Whether the tower's features depend only on its last block's output at [CLS]: it pools that
    token (no attention pooling) and its last block is open_clip's plain one, which
    `first_token_block` computes for one position."""
    last = visual.transformer.resblocks[-1]
    return (visual.pool_type == "tok" and visual.attn_pool is None
            and type(last) is ResidualAttentionBlock and not hasattr(last, "ln_1_kv"))


def first_token_block(block: ResidualAttentionBlock, x: torch.Tensor, batch_first: bool = True) -> torch.Tensor:
    """`block(x)` at the first position only, (batch, 1, width) (or (1, batch, width)): its query
    attends to every position's keys and values as in the full block; the other positions' outputs,
    which nothing after the last block reads, are not computed. No attention mask (image towers)."""
    first = x[:, :1] if batch_first else x[:1]
    normed = block.ln_1(x)
    query = normed[:, :1] if batch_first else normed[:1]
    first = first + block.ls_1(block.attention(q_x=query, k_x=normed, v_x=normed))
    return first + block.ls_2(block.mlp(block.ln_2(first)))


@dataclass(frozen=True)
class QkvLora:
    """One tower's low-rank adapters (CLIP-LoRA): at layer i, projection p (0: query, 1: key, 2: value)
    of a block's normed input x gains scale · (x · down[i, p]ᵀ) · up[i, p]ᵀ beside x · W_pᵀ + b_p.

    down (layers, 3, rank, width) is LoRA's A and up (layers, 3, width, rank) its B, laid out as
    nn.Linear's weights. `dropout` drops the adapters' input only (not the base projection's), with
    a mask of its own per projection as the paper's code does; 0 when serving."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    dropout: float = 0.0

    def update(self, layer: int, x: torch.Tensor, projections: slice) -> torch.Tensor:
        """The updates of `projections` (slice(0, 3): q, k, v; slice(1, 3): k, v) at `layer` for x
        (..., width), packed as the in-projection's outputs are: (..., count · width)."""
        down, up = self.down[layer, projections], self.up[layer, projections]  # (p, rank, width), (p, width, rank)
        down = down.to(x.dtype)
        if self.dropout:
            dropped = F.dropout(x.unsqueeze(0).expand(len(down), *x.shape), self.dropout, training=True)
            low = torch.einsum("p...w,prw->...pr", dropped, down)
        else:  # one product for every projection's A, no copy of x per projection
            low = (x @ down.flatten(0, 1).T).unflatten(-1, (len(down), -1))
        return self.scale * torch.einsum("...pr,pwr->...pw", low, up.to(x.dtype)).flatten(-2)


def lora_block(block: ResidualAttentionBlock, x: torch.Tensor, lora: QkvLora, layer: int,
               mask: torch.Tensor | None = None, first_token_only: bool = False,
               batch_first: bool = True) -> torch.Tensor:
    """`block(x)` with layer `layer`'s adapters on its q, k, v projections, its attention computed from
    the block's weights (open_clip's plain block with nn.MultiheadAttention). `first_token_only`: the
    outputs at the first position alone, as `first_token_block`."""
    if not batch_first:
        x = x.transpose(0, 1)
    normed = block.ln_1(x)
    attn = block.attn
    if first_token_only:
        q = _projected(attn, normed[:, :1], lora, layer, slice(0, 1))
        k, v = _projected(attn, normed, lora, layer, slice(1, 3)).chunk(2, dim=-1)
        x = x[:, :1]
    else:
        q, k, v = _projected(attn, normed, lora, layer, slice(0, 3)).chunk(3, dim=-1)
    x = x + block.ls_1(_attention(attn, q, k, v, mask))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x if batch_first else x.transpose(0, 1)


def _projected(attn: torch.nn.MultiheadAttention, x: torch.Tensor, lora: QkvLora, layer: int,
               projections: slice) -> torch.Tensor:
    """x · W_pᵀ + b_p of the packed in-projection's `projections`, with their low-rank updates beside."""
    width = x.shape[-1]
    rows = slice(projections.start * width, projections.stop * width)
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[rows]
    return F.linear(x, attn.in_proj_weight[rows], bias) + lora.update(layer, x, projections)


def _attention(attn: torch.nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-head scaled dot-product attention of projected (batch, length, width) q, k, v, then the
    output projection; `mask` additive (the text tower's causal mask)."""
    heads = attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)

    mixed = F.scaled_dot_product_attention(split(q), split(k), split(v),
                                           attn_mask=None if mask is None else mask.to(q.dtype))
    return attn.out_proj(mixed.transpose(1, 2).flatten(2))


def _replace(x: torch.Tensor, tokens: torch.Tensor, start: int, batch_first: bool = True) -> torch.Tensor:
    """Return x with positions start..start+len(tokens) set to `tokens` (out of place, autograd-safe)."""
    if not batch_first:
        x = x.transpose(0, 1)
    end = start + tokens.shape[-2]  # tokens are (length, width), or (batch, length, width) per sample
    x = torch.cat([x[:, :start], _expand(tokens, x), x[:, end:]], dim=1)
    return x if batch_first else x.transpose(0, 1)


def _expand(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(length, width) tokens shared by the batch, or (batch, length, width) tokens per sample."""
    tokens = tokens.to(like.dtype)
    return tokens if tokens.dim() == 3 else tokens.unsqueeze(0).expand(like.shape[0], -1, -1)


def _truncate_after_eot(clip: CLIP, token_ids: torch.Tensor) -> torch.Tensor:
    if clip.text_pool_type != "argmax" or clip.attn_mask is None:
        return token_ids  # without a causal mask, or with other pooling, later positions matter
    last = int(token_ids.argmax(dim=-1).max()) + 1
    return token_ids[:, :last]
