"""An independent, plain re-implementation of every method, written from the paper and UPT-NOTES.md.

Nothing here calls `upt`'s encoders or open_clip's forward passes: each Transformer block, attention
head, layer norm, pooling and projection is spelled out from the frozen CLIP's weight tensors, and
each prompt is put where the paper puts it. The tests compare the project's forward with this one
(in float64, to 1e-6), so any change to the mathematics shows up as a number, not as a property.

The learned tensors are read by their artifact names (`prompt.<name>` in every saved artifact):
    coop         context                         (depth, m, text width)
    vpt-*        prompts                         (depth, n, vision width)
    joint        text.context, visual.prompts
    promptsrc    text.context (depth, m, text width), visual.prompts (depth, n, vision width)
    upt / mlp    unified (depth, 2m, text width), mixer.*, to_vision.*
    shared       unified (depth, m, text width), to_vision.*
    clip-lora    text.down, visual.down (layers, 3, rank, width): A; text.up, visual.up (layers, 3, width, rank): B
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


# ---- building blocks, from the weights -------------------------------------------------------------

def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ln(x: Tensor, module: nn.LayerNorm) -> Tensor:
    return layer_norm(x, module.weight, module.bias, module.eps)


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def multi_head_attention(x: Tensor, in_weight: Tensor, in_bias: Tensor, out_weight: Tensor, out_bias: Tensor,
                         heads: int, causal: bool = False) -> Tensor:
    """Scaled dot-product self-attention of the tokens of x (batch, length, width) with `heads` heads."""
    batch, length, width = x.shape
    head_dim = width // heads
    q, k, v = (x @ in_weight.T + in_bias).split(width, dim=-1)

    def per_head(t: Tensor) -> Tensor:
        return t.reshape(batch, length, heads, head_dim).transpose(1, 2)

    q, k, v = per_head(q), per_head(k), per_head(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if causal:
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    mixed = scores.softmax(dim=-1) @ v
    mixed = mixed.transpose(1, 2).reshape(batch, length, width)
    return mixed @ out_weight.T + out_bias


def clip_block(x: Tensor, block: nn.Module, causal: bool, in_weight_delta: Tensor | None = None) -> Tensor:
    """One pre-norm residual block of CLIP: x + attn(LN1(x)), then + MLP(LN2(x)). `in_weight_delta`
    (3·width, width) is added to the packed query/key/value weights (CLIP-LoRA's ΔW)."""
    assert isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity), "layer scale not modelled"
    attn = block.attn
    in_weight = attn.in_proj_weight if in_weight_delta is None else attn.in_proj_weight + in_weight_delta
    x = x + multi_head_attention(ln(x, block.ln_1), in_weight, attn.in_proj_bias,
                                 attn.out_proj.weight, attn.out_proj.bias, attn.num_heads, causal)
    activation = quick_gelu if type(block.mlp.gelu).__name__ == "QuickGELU" else gelu
    hidden = activation(ln(x, block.ln_2) @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias)
    return x + hidden @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


# ---- the two towers with prompts --------------------------------------------------------------------

def text_feature(clip, token_ids: list[int], context: Tensor | None, deltas: list[Tensor] | None = None) -> Tensor:
    """ψ of one unpadded token sequence [SOS] ... [EOS]; context (depth, m, width) takes positions 1..m;
    `deltas`: each block's ΔW of its query/key/value weights (CLIP-LoRA).

    Layer 0's context replaces the word embeddings after [SOS] (before the positional embedding is
    added); before block i < depth the outputs at positions 1..m are replaced by layer i's context.
    The feature is the final-norm output at the end-of-text token (the last one here), projected.
    """
    assert clip.text_pool_type == "argmax", "the reference models CLIP's end-of-text pooling"
    ids = torch.tensor(token_ids, device=clip.token_embedding.weight.device)
    x = clip.token_embedding.weight[ids]
    m = 0 if context is None else context.shape[1]
    if context is not None:
        x = torch.cat([x[:1], context[0].to(x.dtype), x[1 + m:]])
    x = (x + clip.positional_embedding[: len(token_ids)]).unsqueeze(0)
    for index, block in enumerate(clip.transformer.resblocks):
        if context is not None and 0 < index < context.shape[0]:
            x = torch.cat([x[:, :1], context[index].to(x.dtype).unsqueeze(0), x[:, 1 + m:]], dim=1)
        x = clip_block(x, block, causal=True, in_weight_delta=None if deltas is None else deltas[index])
    x = ln(x, clip.ln_final)[0, len(token_ids) - 1]
    projection = clip.text_projection
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def image_features(clip, images: Tensor, prompts: Tensor | None, deltas: list[Tensor] | None = None) -> Tensor:
    """φ of a batch with visual prompts (depth, n, width) after [CLS], before the patch tokens;
    `deltas`: each block's ΔW of its query/key/value weights (CLIP-LoRA).

    Layer 0's prompts are inserted after the positional embeddings and before ln_pre; before block
    i < depth the outputs at the prompt positions are replaced by layer i's prompts. The prompt
    outputs are dropped before pooling ([CLS] token or the mean of the patch tokens).
    """
    visual = clip.visual
    assert visual.attn_pool is None and not visual.final_ln_after_pool
    batch = images.shape[0]
    patches = F.conv2d(images, visual.conv1.weight, stride=visual.conv1.stride)
    patches = patches.flatten(2).transpose(1, 2)  # (batch, grid², width)
    cls = visual.class_embedding.reshape(1, 1, -1).expand(batch, 1, -1)
    x = torch.cat([cls, patches], dim=1) + visual.positional_embedding
    n = 0 if prompts is None else prompts.shape[1]
    if prompts is not None:
        x = torch.cat([x[:, :1], prompts[0].to(x.dtype).expand(batch, -1, -1), x[:, 1:]], dim=1)
    x = ln(x, visual.ln_pre) if isinstance(visual.ln_pre, nn.LayerNorm) else x
    for index, block in enumerate(visual.transformer.resblocks):
        if prompts is not None and 0 < index < prompts.shape[0]:
            x = torch.cat([x[:, :1], prompts[index].to(x.dtype).expand(batch, -1, -1), x[:, 1 + n:]], dim=1)
        x = clip_block(x, block, causal=False, in_weight_delta=None if deltas is None else deltas[index])
    x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
    x = ln(x, visual.ln_post)
    pooled = x[:, 1:].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]
    return pooled @ visual.proj


# ---- token sequences and classifiers ----------------------------------------------------------------

def _until_eot(ids: Tensor) -> list[int]:
    ids = ids.tolist()
    eot = ids.index(max(ids))  # the end-of-text id is the largest in CLIP's vocabulary
    return ids[: eot + 1]


def class_sequence(tokenizer, name: str, n_ctx: int) -> list[int]:
    """[SOS] + n_ctx placeholder positions + the tokens of "<name>." + [EOS], built by hand."""
    sos, *body = _until_eot(tokenizer([f"{name}."])[0])
    return [sos] + [sos] * n_ctx + body  # the placeholders' ids never matter: their embeddings are replaced


def context_from_words(clip, tokenizer, phrase: str) -> Tensor:
    """The word embeddings of `phrase` (without [SOS]/[EOS]), as a (1, m, width) context."""
    ids = _until_eot(tokenizer([phrase])[0])[1:-1]
    return clip.token_embedding.weight[torch.tensor(ids)].unsqueeze(0)


def prompted_classifier(clip, tokenizer, class_names: list[str], context: Tensor) -> Tensor:
    """W (k, d): each class name after the learned context, encoded and normalised."""
    rows = [text_feature(clip, class_sequence(tokenizer, name, context.shape[1]), context) for name in class_names]
    return F.normalize(torch.stack(rows), dim=-1)


def template_classifier(clip, tokenizer, class_names: list[str], templates: tuple[str, ...],
                        deltas: list[Tensor] | None = None) -> Tensor:
    """The zero-shot classifier: per class, the normalised features of every template averaged, and the
    mean normalised again (CLIP's prompt ensemble); `deltas`: the text tower's ΔW (CLIP-LoRA)."""
    rows = []
    for name in class_names:
        features = [F.normalize(text_feature(clip, _until_eot(tokenizer([t.format(name)])[0]), None, deltas), dim=-1)
                    for t in templates]
        rows.append(F.normalize(torch.stack(features).mean(dim=0), dim=-1))
    return torch.stack(rows)


# ---- each method's prompts, from its learned tensors -------------------------------------------------

def equation_5(u: Tensor, p: dict[str, Tensor], prefix: str = "mixer.") -> Tensor:
    """UPT's θ: U' = SA(U) + LN(U); Û = FFN(LN(U')) + LN(U'), with d/64 heads; the 2m tokens of
    each layer's U attend to each other (the layer index is the batch)."""
    width = u.shape[-1]
    heads = max(1, width // 64)
    attended = multi_head_attention(u, p[prefix + "attention.in_proj_weight"], p[prefix + "attention.in_proj_bias"],
                                    p[prefix + "attention.out_proj.weight"], p[prefix + "attention.out_proj.bias"],
                                    heads)
    u_prime = attended + layer_norm(u, p[prefix + "norm_in.weight"], p[prefix + "norm_in.bias"])
    normed = layer_norm(u_prime, p[prefix + "norm_mid.weight"], p[prefix + "norm_mid.bias"])
    hidden = gelu(normed @ p[prefix + "ffn.0.weight"].T + p[prefix + "ffn.0.bias"])
    return hidden @ p[prefix + "ffn.3.weight"].T + p[prefix + "ffn.3.bias"] + normed


def prompt_mlp(u: Tensor, p: dict[str, Tensor], prefix: str = "mixer.") -> Tensor:
    """The MLP ablation: Linear → GELU → Linear on each token by itself."""
    hidden = gelu(u @ p[prefix + "layers.0.weight"].T + p[prefix + "layers.0.bias"])
    return hidden @ p[prefix + "layers.3.weight"].T + p[prefix + "layers.3.bias"]


@dataclass
class ReferencePrompts:
    text: Tensor | None = None
    visual: Tensor | None = None


def to_vision(tokens: Tensor, p: dict[str, Tensor]) -> Tensor:
    return tokens @ p["to_vision.weight"].T + p["to_vision.bias"]


def method_prompts(method: str, p: dict[str, Tensor], n_ctx: int) -> ReferencePrompts:
    if method == "zero-shot":
        return ReferencePrompts()
    if method == "coop":
        return ReferencePrompts(text=p["context"])
    if method in ("vpt-shallow", "vpt-deep"):
        return ReferencePrompts(visual=p["prompts"])
    if method in ("joint", "promptsrc"):
        return ReferencePrompts(text=p["text.context"], visual=p["visual.prompts"])
    if method == "shared":
        u = p["unified"]
        return ReferencePrompts(text=u, visual=to_vision(u, p))
    mixed = equation_5(p["unified"], p) if method == "upt" else prompt_mlp(p["unified"], p)
    return ReferencePrompts(text=mixed[:, :n_ctx], visual=to_vision(mixed[:, n_ctx:], p))


TEXT_LEARNING = {"coop", "joint", "upt", "mlp", "shared", "promptsrc"}


# ---- the training-free heads: GDA and Tip-Adapter's leave-one-out search --------------------------

def gda_linear(view_features: Tensor, labels: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """GDA's W, b (paper, eq. for LDA with the KS precision) from raw view features (views, n, d).

    Every view is a sample x_j (normalised), with its shot's label; μ_c the class means;
    Σ̂ = Σ_j (x_j − μ_{y_j})(x_j − μ_{y_j})ᵀ / (N − 1); Σ⁻¹ = d · ((N − 1) Σ̂ + tr(Σ̂) I)⁻¹;
    w_c = Σ⁻¹ μ_c; b_c = log(1/C) − ½ μ_cᵀ Σ⁻¹ μ_c."""
    views, n, d = view_features.shape
    x = view_features.reshape(views * n, d)
    x = x / x.norm(dim=-1, keepdim=True)
    y = labels.repeat(views)
    means = torch.stack([x[y == c].sum(dim=0) / int((y == c).sum()) for c in range(n_classes)])
    centred = x - means[y]
    scatter = sum(torch.outer(row, row) for row in centred)  # (N − 1) Σ̂
    covariance = scatter / (len(x) - 1)
    precision = d * torch.linalg.inv(scatter + torch.trace(covariance) * torch.eye(d, dtype=x.dtype))
    weights = torch.stack([precision @ mean for mean in means])
    bias = torch.tensor([math.log(1.0 / n_classes) - 0.5 * float(mean @ precision @ mean) for mean in means],
                        dtype=x.dtype)
    return weights, bias


def gda_logits(features: Tensor, classifier: Tensor, weights: Tensor, bias: Tensor, alpha: float,
               scale: float) -> Tensor:
    """s · f Wᵀ_clip + α (f Wᵀ + b), f the normalised image features."""
    return scale * features @ classifier.T + alpha * (features @ weights.T + bias)


def shot_folds(labels: Tensor, n_classes: int, max_folds: int = 4) -> list[int]:
    """Each shot's fold: its rank within its class modulo k, k = min(smallest class, 4) (0: no folds)."""
    k = min(min(int((labels == c).sum()) for c in range(n_classes)), max_folds)
    if k < 2:
        return []
    seen = [0] * n_classes
    folds = []
    for label in labels.tolist():
        folds.append(seen[label] % k)
        seen[label] += 1
    return folds


def gda_cross_fit_alpha(view_features: Tensor, labels: Tensor, classifier: Tensor, scale: float,
                        alphas: tuple[float, ...]) -> tuple[int | None, list[int]]:
    """The first α of the grid with the most hits of held-out shots (each fold fitted on the others;
    a shot queried by its normalised mean view): (its index, the hits per α)."""
    folds = shot_folds(labels, classifier.shape[0])
    if not folds:
        return None, []
    mean_view = view_features.mean(dim=0)
    queries = mean_view / mean_view.norm(dim=-1, keepdim=True)
    hits = [0] * len(alphas)
    for fold in sorted(set(folds)):
        fit = torch.tensor([f != fold for f in folds])
        weights, bias = gda_linear(view_features[:, fit], labels[fit], classifier.shape[0])
        for i in (~fit).nonzero().flatten().tolist():
            for a, alpha in enumerate(alphas):
                logits = gda_logits(queries[i:i + 1], classifier, weights, bias, alpha, scale)
                hits[a] += int(int(logits.argmax()) == int(labels[i]))
    return hits.index(max(hits)), hits


def tip_leave_one_out_hits(keys: Tensor, values: Tensor, labels: Tensor, classifier: Tensor, scale: float,
                           alpha: float, beta: float) -> int:
    """Shots that Tip-Adapter classifies right when each is scored by the cache without its own key."""
    hits = 0
    for i in range(len(keys)):
        others = [j for j in range(len(keys)) if j != i]
        votes = torch.exp(-beta * (1 - keys[i] @ keys[others].T)) @ values[others]
        logits = scale * keys[i] @ classifier.T + alpha * votes
        hits += int(int(logits.argmax()) == int(labels[i]))
    return hits


def cocoop_logits(clip, tokenizer, p: dict[str, Tensor], class_names: list[str], images: Tensor) -> Tensor:
    """CoCoOp: image i's context is v + h(x_i), h = Linear → ReLU → Linear on the normalised feature x_i;
    its own classifier W(x_i) is built from that context, and scored against x_i."""
    features = F.normalize(image_features(clip, images, None), dim=-1)
    rows = []
    for x in features:
        shift = torch.relu(x @ p["meta_net.0.weight"].T + p["meta_net.0.bias"]) @ p["meta_net.2.weight"].T \
            + p["meta_net.2.bias"]
        classifier = prompted_classifier(clip, tokenizer, class_names, p["context"] + shift)
        rows.append(clip.logit_scale.exp() * classifier @ x)
    return torch.stack(rows)


def logits(clip, tokenizer, method: str, p: dict[str, Tensor], class_names: list[str], images: Tensor,
           n_ctx: int, templates: tuple[str, ...]) -> Tensor:
    """logit_scale · cos(φ(x; visual prompts), W) for every image and class."""
    if method == "cocoop":
        return cocoop_logits(clip, tokenizer, p, class_names, images)
    prompts = method_prompts(method, p, n_ctx)
    if method in TEXT_LEARNING:
        classifier = prompted_classifier(clip, tokenizer, class_names, prompts.text)
    else:
        classifier = template_classifier(clip, tokenizer, class_names, templates)
    features = F.normalize(image_features(clip, images, prompts.visual), dim=-1)
    return clip.logit_scale.exp() * features @ classifier.T


# ---- PromptSRC's self-regulating loss and Gaussian prompt aggregation (Khattak et al., ICCV 2023) ------

def frozen_text_targets(clip, tokenizer, class_names: list[str], templates: tuple[str, ...]) -> Tensor:
    """Frozen CLIP's class text features as PromptSRC's released code computes them: per class, the
    unnormalised features of every template averaged, then normalised (k, d)."""
    rows = []
    for name in class_names:
        features = [text_feature(clip, _until_eot(tokenizer([t.format(name)])[0]), None) for t in templates]
        mean = torch.stack(features).mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def promptsrc_loss_terms(clip, tokenizer, p: dict[str, Tensor], class_names: list[str], images: Tensor,
                         labels: Tensor, templates: tuple[str, ...], text_weight: float,
                         image_weight: float) -> dict[str, Tensor]:
    """The paper's L = L_CE + λ_image·L_SCL-image + λ_text·L_SCL-text + L_SCL-logits, term by term.

    L1 distances are means over every element; the logits term is KL(p_zero-shot ‖ p_prompted) summed
    over the batch and divided by batch × classes (the released code's sum / numel), temperature 1."""
    scale = clip.logit_scale.exp()
    prompts = method_prompts("promptsrc", p, p["text.context"].shape[1])
    text = prompted_classifier(clip, tokenizer, class_names, prompts.text)
    raw = image_features(clip, images, prompts.visual)
    image = raw / raw.norm(dim=-1, keepdim=True)
    frozen_raw = image_features(clip, images, None)
    frozen_image = frozen_raw / frozen_raw.norm(dim=-1, keepdim=True)
    frozen_text = frozen_text_targets(clip, tokenizer, class_names, templates)
    logits = scale * image @ text.T
    zero_shot = scale * frozen_image @ frozen_text.T
    log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    log_q = zero_shot - torch.logsumexp(zero_shot, dim=-1, keepdim=True)
    batch, classes = logits.shape
    return {
        "cross_entropy": -log_p[torch.arange(batch), labels].mean(),
        "text_l1": text_weight * (text - frozen_text).abs().sum() / text.numel(),
        "image_l1": image_weight * (image - frozen_image).abs().sum() / image.numel(),
        "logits_kl": (torch.exp(log_q) * (log_q - log_p)).sum() / (batch * classes),
    }


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """The Gaussian density N(e; mean, std²) at epochs e = 1..epochs, divided by its sum."""
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    return [d / sum(density) for d in density]


def gaussian_prompt_aggregation(per_epoch: list[dict[str, Tensor]], mean: float, std: float) -> dict[str, Tensor]:
    """Σ_e g_e θ_e over the prompts θ_e after each epoch e."""
    weights = gpa_weights(len(per_epoch), mean, std)
    return {name: sum(w * state[name] for w, state in zip(weights, per_epoch)) for name in per_epoch[0]}


# ---- CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024): low-rank updates of the attention weights ------------

def lora_weight_deltas(down: Tensor, up: Tensor, alpha: float, rank: int) -> list[Tensor]:
    """Per block, ΔW = (α / √r) · B A for each of W_q, W_k, W_v (CLIP-LoRA's released scaling), stacked as the
    packed in-projection stacks them (3·width, width); A = down[layer, p] (r, width), B = up[layer, p] (width, r)."""
    scale = alpha / math.sqrt(rank)
    return [torch.cat([scale * up[layer, p] @ down[layer, p] for p in range(3)]) for layer in range(len(down))]


def lora_classifier(clip, tokenizer, p: dict[str, Tensor], class_names: list[str], templates: tuple[str, ...],
                    alpha: float, rank: int) -> Tensor:
    """W through the text tower whose query/key/value weights are W0 + ΔW."""
    deltas = lora_weight_deltas(p["text.down"], p["text.up"], alpha, rank)
    return template_classifier(clip, tokenizer, class_names, templates, deltas)


def lora_image_features(clip, p: dict[str, Tensor], images: Tensor, alpha: float, rank: int) -> Tensor:
    """Normalised φ(x) through the image tower whose query/key/value weights are W0 + ΔW."""
    deltas = lora_weight_deltas(p["visual.down"], p["visual.up"], alpha, rank)
    return F.normalize(image_features(clip, images, None, deltas), dim=-1)


def lora_logits(clip, tokenizer, p: dict[str, Tensor], class_names: list[str], images: Tensor,
                templates: tuple[str, ...], alpha: float, rank: int) -> Tensor:
    """logit_scale · cos(φ(x), W), both towers adapted (in eval mode: no dropout)."""
    classifier = lora_classifier(clip, tokenizer, p, class_names, templates, alpha, rank)
    return clip.logit_scale.exp() * lora_image_features(clip, p, images, alpha, rank) @ classifier.T
