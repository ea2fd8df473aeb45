#!/usr/bin/env python
"""Mutation testing of upt/: plant each bug of a curated list, one at a time, and check a test fails.

Each mutant is an exact snippet of a file in upt/ and its replacement. The tree (upt/, tests/,
pyproject.toml) is copied once per worker into a temporary folder; a mutant is written into the copy,
its targeted tests run there with `pytest -x` (the copy's upt/ is imported, never the checkout's), and
the file is restored. The checkout is never written to.

    .venv/bin/python scripts/mutation.py              # every mutant, 2 workers
    .venv/bin/python scripts/mutation.py --list       # the mutants and their tests
    .venv/bin/python scripts/mutation.py eq5-ffn-residual-dropped theta-one-head --jobs 1

Per mutant it prints killed (with the first failing test), survived, or timeout (counted as killed,
as mutmut does); a snippet no longer found in its file is reported as stale and left out of the
score. The score is killed / (killed + survived). Exit status 1 if any mutant survived or is stale.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("upt", "tests", "pyproject.toml")

# Test selections: fast, non-slow tests, the likeliest killer first (-x stops at the first failure).
METHODS = "tests/core/test_reference_methods.py"
THETA = "tests/core/test_reference_theta.py"
ARTIFACT_REF = "tests/core/test_reference_artifact.py"
PROTOCOL = "tests/core/test_reference_protocol.py"
LOGITS = METHODS + "::test_logits_match_the_reference"
GRADIENTS = METHODS + "::test_gradients_match_the_reference"
IMAGE_TOWER = METHODS + "::test_the_image_tower_alone_trains_the_shared_prompt_and_its_generator"
CTX_INIT = METHODS + "::test_ctx_init_starts_the_text_context_from_the_words"
EQUATION_5 = THETA + "::test_theta_is_equation_5_with_width_over_64_heads"
INIT = THETA + "::test_prompts_start_from_a_normal_distribution_of_std_0_02"
DEPTHS = THETA + "::test_upt_depth_is_bounded_by_both_towers"
TOWER_DEPTHS = THETA + "::test_single_tower_depths_are_bounded_by_their_own_tower"
EXPORT = ARTIFACT_REF + "::test_exported_and_reloaded_artifact_serves_the_reference_logits"
CLASS_ORDER = ARTIFACT_REF + "::test_artifact_keeps_a_custom_class_order"
SCHEDULE = PROTOCOL + "::test_the_optimiser_uses_dassls_schedule_at_every_step"
SGD = PROTOCOL + "::test_the_optimiser_is_sgd_with_the_papers_momentum_and_weight_decay"
MODES = PROTOCOL + "::test_training_runs_in_train_mode_and_leaves_the_model_in_eval_mode"
STEP_REPORTS = PROTOCOL + "::test_reported_loss_and_accuracy_are_those_of_the_steps"
SHUFFLE = PROTOCOL + "::test_batches_are_shuffled_and_cropped_anew_every_epoch"
VALIDATION = PROTOCOL + "::test_reported_validation_accuracy_is_measured_on_the_validation_images"
SPLIT_SIZES = PROTOCOL + "::test_split_sizes_and_disjointness_for_small_and_large_classes"
SPLIT_ORDER = PROTOCOL + "::test_split_does_not_depend_on_file_system_order"
AUGMENTATION = PROTOCOL + "::test_train_augmentation_is_the_papers"
EVAL_TRANSFORM = PROTOCOL + "::test_evaluation_transform_resizes_the_shorter_side_and_centre_crops"
EVALUATION = PROTOCOL + "::test_evaluation_sees_every_image_once"
ARTIFACT = "tests/core/test_artifact.py"
SCHEDULE_TABLE = "tests/core/test_training.py::test_paper_schedule"
TIP_CACHE = "tests/core/test_reference_tip_adapter.py::test_cache_holds_the_shots_normalised_keys_and_one_hot_labels"
TIP_LOGITS = "tests/core/test_reference_tip_adapter.py::test_served_logits_are_the_papers_formula"
TIP_SEARCH = "tests/core/test_tip_adapter.py::test_search_picks_the_best_leave_one_out_accuracy_of_the_shots"
TIP_CONFIGS = "tests/core/test_tip_adapter.py::test_released_configs_by_data_set"
TIP_IMAGENET = "tests/core/test_datasets.py::test_imagenets_training_free_classifier_is_the_template_ensemble"
GDA_TESTS = "tests/core/test_gda.py"
GDA_LINEAR = GDA_TESTS + "::test_w_and_b_are_the_papers_in_float64"
GDA_ALPHA = GDA_TESTS + "::test_alpha_is_cross_fitted_on_the_shots"
GDA_SERVED = GDA_TESTS + "::test_served_logits_are_the_papers_formula"
AUTO_RULE = "tests/core/test_auto.py::test_a_costlier_candidate_must_win_by_more_than_one_paired_standard_error"
DASSL_SPLIT = "tests/core/test_datasets.py::test_few_shot_split_draws_dassls_images_for_a_seed"
COCOOP_LOGITS = (LOGITS, "-k", "cocoop")
MODEL_EXPORT = "tests/core/test_export.py"
MODEL_EXPORT_PREDICTOR = MODEL_EXPORT + "::test_a_predictor_built_in_python_exports_too"
MODEL_EXPORT_FAST_PATH = MODEL_EXPORT + "::test_a_tower_whose_attention_takes_pytorchs_fast_path_exports"
MODEL_EXPORT_COCOOP = (MODEL_EXPORT + "::test_the_onnx_model_gives_the_predictors_top_1_and_logits", "-k", "cocoop")
ONCE_PER_STEP = "tests/core/test_methods.py::test_upt_generator_runs_once_per_step_for_both_towers"
PROMPTSRC_TESTS = "tests/core/test_promptsrc.py"
PSRC_LOSS = PROMPTSRC_TESTS + "::test_the_loss_terms_logits_and_gradients_are_the_papers"
PSRC_FROZEN = PROMPTSRC_TESTS + "::test_the_frozen_targets_do_not_move_with_the_prompts"
PSRC_GPA_WEIGHTS = PROMPTSRC_TESTS + "::test_gpa_weights_are_the_normalised_gaussian_density"
PSRC_GPA = PROMPTSRC_TESTS + "::test_the_trained_prompts_are_the_gaussian_weighted_average_of_each_epochs"
PSRC_RESUME = PROMPTSRC_TESTS + "::test_resume_from_an_epoch_checkpoint_gives_the_same_artifact"
PSRC_DEFAULTS = PROMPTSRC_TESTS + "::test_its_few_shot_config_is_the_default"
PSRC_PROMPTS = PROMPTSRC_TESTS + "::test_prompts_are_deep_in_both_towers_the_text_context_from_a_photo_of_a"
LORA_TESTS = "tests/core/test_clip_lora.py"
LORA_LOGITS = LORA_TESTS + "::test_logits_match_the_reference"
LORA_EXPORT = LORA_TESTS + "::test_exported_and_reloaded_artifact_serves_the_reference_logits"
LORA_ZERO_SHOT = LORA_TESTS + "::test_an_untrained_model_is_zero_shot_clip"
LORA_DROPOUT = LORA_TESTS + "::test_dropout_drops_the_adapters_input_while_training_only"
LORA_RECIPE = LORA_TESTS + "::test_the_optimiser_is_adamw_with_a_cosine_over_the_iterations"
LORA_RESUME = LORA_TESTS + "::test_a_resumed_run_ends_with_the_same_artifact"
LORA_SERVING = LORA_TESTS + "::test_a_lora_task_takes_a_pass_of_its_own_beside_the_shared_ones"
LORA_PASSES = LORA_TESTS + "::test_grouped_passes_are_each_shuffled_and_the_last_epoch_cut"
LORA_UPDATE = LORA_TESTS + "::test_an_update_is_the_scaled_low_rank_product_and_dropout_masks_each_projection_unbiased"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    description: str
    tests: tuple[str, ...]
    from_issue: bool = False


def m(name, file, original, replacement, description, *tests, issue=False) -> Mutant:
    return Mutant(name, file, original, replacement, description, tuple(tests), issue)


TIP = "upt/methods/tip_adapter.py"
COCOOP = "upt/methods/cocoop.py"
PSRC = "upt/methods/promptsrc.py"
PROMPTS, MODEL, ENC = "upt/methods/prompts.py", "upt/methods/model.py", "upt/encoders.py"
REGISTRY = "upt/methods/registry.py"
TRAIN, DATA, ART, PRED = "upt/training.py", "upt/data.py", "upt/artifact.py", "upt/predict.py"
LORA, LORA_TRAIN = "upt/methods/lora.py", "upt/lora_training.py"

MUTANTS: list[Mutant] = [
    # ---- the bugs listed in issue 13 -----------------------------------------------------------------
    m("eq5-first-residual-subtracted", PROMPTS, "u_mid = attended + self.norm_in(u)", "u_mid = attended - self.norm_in(u)",
      "equation 5: U' = SA(U) - LN(U)", EQUATION_5, LOGITS, issue=True),
    m("eq5-ffn-residual-dropped", PROMPTS, "return self.ffn(normed) + normed", "return self.ffn(normed)",
      "equation 5: Û = FFN(LN(U')) without its residual", EQUATION_5, LOGITS, issue=True),
    m("eq5-ffn-residual-from-u-prime", PROMPTS, "return self.ffn(normed) + normed", "return self.ffn(normed) + u_mid",
      "equation 5: FFN residual taken from U' instead of LN(U')", EQUATION_5, LOGITS, issue=True),
    m("theta-one-head", PROMPTS, "heads = max(1, width // 64)", "heads = 1",
      "θ's attention with one head instead of d/64", EQUATION_5, LOGITS, issue=True),
    m("upt-visual-half-detached", PROMPTS, "visual=self.to_vision(u[:, self.n_ctx:]))",
      "visual=self.to_vision(u[:, self.n_ctx:].detach()))",
      "the visual half of θ(U) detached: no gradient from the image tower to U or θ", IMAGE_TOWER, GRADIENTS, issue=True),
    m("shared-ignores-ctx-init", REGISTRY, "split=split, init=init)", "split=split, init=init if split else None)",
      "the shared ablation ignores ctx_init", CTX_INIT, issue=True),
    m("visual-prompts-before-cls", ENC, "x = torch.cat([x[:, :1], _expand(prompts[0], x), x[:, 1:]], dim=1)",
      "x = torch.cat([_expand(prompts[0], x), x], dim=1)",
      "visual prompts inserted before [CLS]", LOGITS, issue=True),
    m("prompt-outputs-pooled", ENC, "x = torch.cat([x[:, :1], x[:, 1 + n_prompts:]], dim=1)", "x = x",
      "the prompt outputs kept in the pooled tokens", LOGITS, issue=True),
    m("deep-text-prompts-one-too-far", ENC, "x = _run_blocks(clip.transformer, x, mask, context, start=1, lora=lora)",
      "x = _run_blocks(clip.transformer, x, mask, context, start=2, lora=lora)",
      "deep text prompts written one position too far", LOGITS, issue=True),
    m("one-placeholder-too-many", MODEL, '" ".join(["X"] * n_ctx)', '" ".join(["X"] * (n_ctx + 1))',
      "one X placeholder too many in every prompt", LOGITS, issue=True),
    m("ensemble-not-renormalised", MODEL, "return F.normalize(features.mean(dim=1), dim=-1)",
      "return features.mean(dim=1)", "the template ensemble's mean not re-normalised", LOGITS, issue=True),
    m("fixed-classifier-first-template", MODEL, "template_classifier(backbone, class_names, config.templates)",
      "template_classifier(backbone, class_names, config.templates[:1])",
      "the visual-only methods' fixed classifier uses only the first template", LOGITS, issue=True),
    m("export-dropout-on", MODEL, "was_training = self.training\n        self.eval()", "was_training = self.training",
      "export() leaves dropout on", EXPORT, issue=True),
    m("upt-depth-vision-only", REGISTRY, '_BOTH_DEPTH = DepthRule(("text", "vision"))', '_BOTH_DEPTH = DepthRule(("vision",))',
      "UPT's depth checked against the vision tower only", DEPTHS, issue=True),
    m("lr-schedule-not-applied", TRAIN, 'group["lr"] = lr', 'group["lr"] = group["lr"]',
      "the learning-rate schedule never applied to the optimiser", SCHEDULE, issue=True),
    m("training-in-eval-mode", TRAIN, "self.model.train()", "self.model.eval()",
      "training run in eval mode (no dropout)", MODES, issue=True),
    m("left-in-train-mode", TRAIN, "self.model.eval()\n        return history", "return history",
      "the model left in train mode after the loop", MODES, issue=True),
    m("train-accuracy-argmin", TRAIN, "int((logits.argmax(dim=-1) == labels).sum())",
      "int((logits.argmin(dim=-1) == labels).sum())", "train accuracy counts the argmin", STEP_REPORTS, issue=True),
    m("validation-k-per-class", DATA, "n_val = min(k, MAX_VALIDATION_PER_CLASS, len(group) // 2)",
      "n_val = min(k, len(group) // 2)", "a validation set of K per class instead of min(K, 4)", SPLIT_SIZES, issue=True),
    m("train-overlaps-validation", DATA,
      "n_train = min(k, len(group) - n_val)\n        train.extend(group[:n_train])\n"
      "        val.extend(group[n_train: n_train + n_val])",
      "n_train = min(k, len(group))\n        train.extend(group[:n_train])\n"
      "        val.extend(group[len(group) - n_val:])",
      "training images overlap validation on small classes", SPLIT_SIZES, issue=True),
    m("validation-accuracy-on-train", TRAIN, "report = predictor.evaluate(split.val, per_sample=True)",
      "report = predictor.evaluate(split.train, per_sample=True)", "the reported validation accuracy measured on the training images", VALIDATION, issue=True),
    m("files-not-sorted", DATA, "files = sorted(p for p in (root / folder).iterdir()",
      "files = list(p for p in (root / folder).iterdir()",
      "image files not sorted before sampling (file-system order)", SPLIT_ORDER, issue=True),
    m("crop-scale-0.8", DATA, "scale=(0.08, 1.0)", "scale=(0.8, 1.0)",
      "random-resized-crop scale 0.8-1 instead of 0.08-1", AUGMENTATION, issue=True),
    m("evaluation-skips-one-per-batch", DATA, "chunk = samples[start: start + batch_size]",
      "chunk = samples[start: start + batch_size - 1]", "evaluation skips one image per batch", EVALUATION, issue=True),
    m("batches-not-shuffled", TRAIN, "shuffle=True", "shuffle=False", "batches not shuffled", SHUFFLE, issue=True),
    m("momentum-dropped", TRAIN, "lr=config.step_lr, momentum=config.momentum,", "lr=config.step_lr,",
      "SGD without momentum", SGD, issue=True),
    m("same-shuffle-every-epoch", TRAIN, "generator = _seed_everything(self.config.seed, epoch)",
      "generator = _seed_everything(self.config.seed, 0)", "the same shuffle and crops in every epoch", SHUFFLE, issue=True),
    m("ln-pre-before-prompts", ENC,
      "x = torch.cat([x[:, :1], _expand(prompts[0], x), x[:, 1:]], dim=1)\n    x = visual.ln_pre(x)\n",
      "x = torch.cat([visual.ln_pre(x)[:, :1], _expand(prompts[0], x), visual.ln_pre(x)[:, 1:]], dim=1)\n"
      "    x = visual.ln_pre(x) if prompts is None else x\n",
      "ln_pre applied to the image tokens before the visual prompts are inserted (prompts bypass it)", LOGITS,
      issue=True),
    m("artifact-classes-resorted", ART, 'return list(self.config["class_names"])',
      'return sorted(self.config["class_names"])', "an artifact's class names re-sorted on load", CLASS_ORDER, issue=True),
    # ---- methods/ ------------------------------------------------------------------------------------
    m("theta-not-batch-first", PROMPTS, "dropout=dropout, batch_first=True)", "dropout=dropout, batch_first=False)",
      "θ's attention without batch_first (the released code's bug: each token attends to itself)", EQUATION_5, LOGITS),
    m("theta-attends-normed-u", PROMPTS, "self.attention(u, u, u, need_weights=False)",
      "self.attention(self.norm_in(u), self.norm_in(u), self.norm_in(u), need_weights=False)",
      "SA applied to LN(U) instead of U", EQUATION_5, LOGITS),
    m("theta-released-norm-placement", PROMPTS, "u_mid = attended + self.norm_in(u)", "u_mid = self.norm_in(u + attended)",
      "the released code's LN(U + SA(U)) instead of equation 5", EQUATION_5, LOGITS),
    m("theta-norms-swapped", PROMPTS, "normed = self.norm_mid(u_mid)", "normed = self.norm_in(u_mid)",
      "LN(U') uses the first norm's parameters", EQUATION_5, LOGITS),
    m("theta-ffn-relu", PROMPTS, "nn.Linear(width, 4 * width), nn.GELU()", "nn.Linear(width, 4 * width), nn.ReLU()",
      "θ's FFN with ReLU instead of GELU", EQUATION_5, LOGITS),
    m("upt-split-swapped", PROMPTS, "return Prompts(text=u[:, : self.n_ctx], visual=self.to_vision(u[:, self.n_ctx:]))",
      "return Prompts(text=u[:, self.n_ctx:], visual=self.to_vision(u[:, : self.n_ctx]))",
      "θ(U)'s halves swapped between the towers", LOGITS),
    m("mlp-relu", PROMPTS, "nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout)",
      "nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout)", "the MLP ablation with ReLU", LOGITS),
    m("coop-init-last-layer", PROMPTS, "self.context[0].copy_(init)", "self.context[-1].copy_(init)",
      "ctx_init written into the last layer's context instead of the first", CTX_INIT),
    m("prompt-init-uniform", PROMPTS, "return nn.Parameter(torch.randn(shape) * std)",
      "return nn.Parameter(torch.rand(shape) * std)", "prompts initialised U(0, std) instead of N(0, std²)", INIT),
    m("ensemble-features-not-normalised", MODEL, "tokens[chunk].to(backbone.device), normalize=normalize_each)",
      "tokens[chunk].to(backbone.device), normalize=False)",
      "template features averaged before normalisation", LOGITS),
    m("no-logit-scale", MODEL, "return self.backbone.logit_scale * self.image_features(images, prompts)",
      "return self.image_features(images, prompts)", "logits without CLIP's logit scale", LOGITS),
    m("image-features-not-normalised", MODEL, "encode_image(self.clip, images, prompts.visual, normalize=True)",
      "encode_image(self.clip, images, prompts.visual, normalize=False)", "image features not normalised", LOGITS),
    m("classifier-not-normalised", MODEL, "encode_text(self.clip, self.class_tokens, prompts.text, normalize=True)",
      "encode_text(self.clip, self.class_tokens, prompts.text, normalize=False)", "prompted classifier not normalised", LOGITS),
    m("generate-twice", MODEL, "self.image_features(images, prompts) @ self.classifier(prompts).T",
      "self.image_features(images, self.generate()) @ self.classifier(prompts).T",
      "θ(U) computed twice per step, two dropout masks (the released code)", ONCE_PER_STEP),
    m("vpt-deep-default-shallow", REGISTRY, "options=_prompt_options(_VISION_ALL), depth=_VISION_ALL,",
      'options=_prompt_options(_VISION_ALL), depth=DepthRule(("vision",)),', "VPT-deep prompts only the first layer by default", TOWER_DEPTHS),
    m("joint-visual-shallow", REGISTRY, "depth=_VISION_ALL,\n               build=_joint)",
      'depth=DepthRule(("vision",)),\n               build=_joint)', "joint's visual prompts shallow by default", TOWER_DEPTHS),
    m("ctx-init-keeps-sos", MODEL, "return tokens[1:end]  # drop [SOS] and [EOS]", "return tokens[0:end]",
      "ctx_init's embeddings include [SOS]", CTX_INIT),
    m("coop-depth-vision", REGISTRY, '_TEXT_DEPTH = DepthRule(("text",))', '_TEXT_DEPTH = DepthRule(("vision",))', "CoOp's depth checked against the vision tower", TOWER_DEPTHS),
    # ---- encoders.py ---------------------------------------------------------------------------------
    m("context-before-positional", ENC,
      "if context is not None:\n        x = _replace(x, context[0], start=1)\n"
      "    x = x + clip.positional_embedding[:length].to(cast_dtype)",
      "x = x + clip.positional_embedding[:length].to(cast_dtype)\n    if context is not None:\n"
      "        x = _replace(x, context[0], start=1)",
      "text context replaces the embeddings after the positional embedding was added", LOGITS),
    m("deep-prompts-skip-layer-1", ENC, "if 0 < index < depth:", "if 1 < index < depth:",
      "layer 1's deep prompts never swapped in", LOGITS),
    m("text-truncated-at-shortest", ENC, "last = int(token_ids.argmax(dim=-1).max()) + 1",
      "last = int(token_ids.argmax(dim=-1).min()) + 1", "text cut after the shortest prompt", LOGITS),
    m("text-without-causal-mask", ENC, "mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None",
      "mask = None", "the text tower without its causal mask", LOGITS),
    m("visual-prompts-after-patches", ENC, "x = torch.cat([x[:, :1], _expand(prompts[0], x), x[:, 1:]], dim=1)",
      "x = torch.cat([x, _expand(prompts[0], x)], dim=1)", "visual prompts appended after the patches", LOGITS),
    # ---- training.py ---------------------------------------------------------------------------------
    m("warmup-one-epoch-longer", TRAIN, "if epoch < self.warmup_epochs:", "if epoch <= self.warmup_epochs:",
      "the warm-up lasts one epoch more", SCHEDULE),
    m("cosine-period-shortened", TRAIN, "(epoch - self.warmup_epochs) / self.total_epochs))",
      "(epoch - self.warmup_epochs) / (self.total_epochs - self.warmup_epochs)))",
      "cosine over the epochs after warm-up instead of all epochs (not Dassl)", SCHEDULE),
    m("cosine-one-epoch-ahead", TRAIN, "(epoch - self.warmup_epochs) / self.total_epochs))",
      "epoch / self.total_epochs))", "cosine counted from epoch 0 (one epoch ahead of Dassl)", SCHEDULE),
    m("weight-decay-dropped", TRAIN, "weight_decay=config.weight_decay)", ")", "SGD without weight decay", SGD),
    m("epochs-for-4-shots", TRAIN, "if shots is not None and shots <= 4:", "if shots is not None and shots < 4:",
      "4 shots trained for 200 epochs instead of 100", SCHEDULE_TABLE),
    # ---- data.py -------------------------------------------------------------------------------------
    m("eval-resize-distorts", DATA, "T.Resize(spec.size, interpolation", "T.Resize((spec.size, spec.size), interpolation",
      "evaluation squeezes the image to a square instead of resizing its shorter side", EVAL_TRANSFORM),
    m("no-horizontal-flip", DATA, "        T.RandomHorizontalFlip(),\n", "",
      "training without horizontal flips", AUGMENTATION),
    m("train-normalisation-swapped", DATA,
      "T.RandomHorizontalFlip(),\n        T.ToTensor(),\n        T.Normalize(spec.mean, spec.std),",
      "T.RandomHorizontalFlip(),\n        T.ToTensor(),\n        T.Normalize(spec.std, spec.mean),",
      "training images normalised with mean and std swapped", AUGMENTATION),
    m("split-not-seeded", DATA, "rng = random.Random(seed)", "rng = random.Random()",
      "the few-shot split ignores the seed", SPLIT_ORDER),
    m("all-shots-takes-half", DATA, "k = shots if shots is not None else len(group)",
      "k = shots if shots is not None else len(group) // 2", "shots=None trains on half of each class", SPLIT_SIZES),
    m("crop-bilinear", DATA, "T.RandomResizedCrop(spec.size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC)",
      "T.RandomResizedCrop(spec.size, scale=(0.08, 1.0))", "training crops resized bilinearly", AUGMENTATION),
    # ---- artifact.py and predict.py ------------------------------------------------------------------
    m("artifact-hash-unchecked", ART, 'if _sha256(tensors_path) != config.get("tensors_sha256"):', "if False:",
      "a corrupted tensors file is loaded", ARTIFACT),
    m("artifact-backbone-unchecked", PRED, "artifact.check_backbone(backbone)", "pass",
      "an artifact served on another backbone", ARTIFACT),
    m("served-logits-unscaled", PRED, "logits = self.backbone.logit_scale * features @ self.classifier.T",
      "logits = features @ self.classifier.T", "served logits without the logit scale", EXPORT),
    m("served-visual-prompts-ignored", PRED, "encode_image(self.backbone.clip, batch, self.visual_prompts, normalize",
      "encode_image(self.backbone.clip, batch, None, normalize", "serving ignores the visual prompts", EXPORT),
    m("evaluation-argmin", PRED, "predicted.append(self.logits(batch).argmax(dim=-1).cpu())",
      "predicted.append(self.logits(batch).argmin(dim=-1).cpu())", "evaluation predicts the least likely class", EVALUATION),
    m("rank-ascending", PRED, "values, indices = probabilities.topk(min(top_k, len(self.class_names)), dim=-1)",
      "values, indices = probabilities.topk(min(top_k, len(self.class_names)), dim=-1, largest=False)",
      "predictions ranked least likely first", CLASS_ORDER),
    # ---- methods/tip_adapter.py (Tip-Adapter, Tip-Adapter-F) -----------------------------------------
    m("tip-affinity-sign", TIP, "return torch.exp(-beta * (1.0 - affinity)) @ values",
      "return torch.exp(-beta * (affinity - 1.0)) @ values", "cache affinities exp(β(1 − fKᵀ)) instead of exp(−β(…))",
      TIP_LOGITS),
    m("tip-alpha-ignored", TIP, "return self.alpha * cache_logits(", "return cache_logits(",
      "the cache's votes not weighted by α", TIP_LOGITS),
    m("tip-keys-normalised-per-view", "upt/methods/crossfit.py", "return F.normalize(view_features.mean(dim=0), dim=-1)",
      "return F.normalize(view_features, dim=-1).mean(dim=0)", "keys: views normalised, then averaged", TIP_CACHE),
    m("tip-values-shifted", TIP, "return F.one_hot(labels, n_classes).float()",
      "return F.one_hot(labels.roll(1), n_classes).float()", "cache values not the shots' own labels", TIP_CACHE),
    m("tip-search-ignores-beta", TIP, "votes = torch.exp(-beta * (1.0 - affinity)) @ values",
      "votes = torch.exp(-(1.0 - affinity)) @ values", "the α, β search scores every β as β = 1", TIP_SEARCH),
    m("tip-search-without-zero-shot", TIP, "logits = zero_shot_logits.unsqueeze(0) + some.view(-1, 1, 1) * votes",
      "logits = some.view(-1, 1, 1) * votes", "the search scores the cache alone, without the zero-shot logits",
      TIP_SEARCH),
    m("tip-search-keeps-own-key", TIP, "device=keys.device), rows] = -math.inf", "device=keys.device), rows] = 1.0",
      "leave-one-out: each shot still votes for itself", TIP_SEARCH),
    m("tip-imagenet-one-template", TIP, "return ENSEMBLE_TEMPLATES if dataset == \"imagenet\"",
      "return ENSEMBLE_TEMPLATES if dataset == \"ImageNet\"", "ImageNet's cache classifier from one template",
      TIP_IMAGENET),
    m("tip-config-imagenet-everywhere", TIP, "return RELEASED_CONFIGS.get(dataset, RELEASED_CONFIGS[\"imagenet\"])",
      "return RELEASED_CONFIGS[\"imagenet\"]", "every data set searched on ImageNet's grid", TIP_CONFIGS),
    # ---- methods/gda.py ---------------------------------------------------------------------------------
    m("gda-no-shrinkage", "upt/methods/gda.py", "shrunk = (n - 1) * covariance + covariance.trace() * torch.eye(",
      "shrunk = (n - 1) * covariance + 0 * covariance.trace() * torch.eye(", "the KS estimator without its tr(Σ) I",
      GDA_LINEAR),
    m("gda-precision-unscaled", "upt/methods/gda.py", "return width * torch.cholesky_inverse(",
      "return torch.cholesky_inverse(", "the precision without its factor D", GDA_LINEAR),
    m("gda-bias-sign", "upt/methods/gda.py", "math.log(1.0 / n_classes) - 0.5 * (weights * means)",
      "math.log(1.0 / n_classes) + 0.5 * (weights * means)", "b_c = log π + ½ μᵀΣ⁻¹μ", GDA_LINEAR),
    m("gda-views-averaged", "upt/methods/gda.py", "views = F.normalize(view_features.double(), dim=-1)",
      "views = F.normalize(view_features.double().mean(dim=0, keepdim=True), dim=-1)",
      "GDA fitted on the views' mean, not on every view", GDA_LINEAR),
    m("gda-alpha-fitted-on-held-out", "upt/methods/gda.py", "fit, held = assignment != fold, assignment == fold",
      "fit, held = assignment >= 0, assignment == fold", "α scored on shots the head was fitted on", GDA_ALPHA),
    m("gda-served-without-head", PRED, "logits = logits + self.gda.logits(features)", "logits = logits",
      "served GDA logits are zero-shot's", GDA_SERVED),
    # ---- auto.py and few-shot splits ----------------------------------------------------------------------
    m("auto-rule-plain-argmax", "upt/auto.py", "        if gap <= stderr:", "        if gap <= 0:",
      "auto keeps the best validation accuracy whatever the noise", AUTO_RULE),
    m("dassl-split-label-order", "upt/datasets/source.py", "    for group in groups.values():",
      "    for _, group in sorted(groups.items()):", "classes sampled in label order, not first appearance",
      DASSL_SPLIT),
    m("dassl-split-exactly-k-unsampled", "upt/datasets/source.py", "k is not None and len(group) >= k else group",
      "k is not None and len(group) > k else group", "a class of exactly K images kept in order, unsampled",
      DASSL_SPLIT),
    m("tip-served-cache-only", PRED, "logits = logits + self.cache.logits(features)",
      "logits = self.cache.logits(features)", "served Tip-Adapter logits drop the zero-shot term", TIP_LOGITS),
    m("tip-classifier-first-template", TRAIN, "released_templates(source.name, config.templates))",
      "released_templates(source.name, config.templates[:1]))",
      "Tip-Adapter's W from the first template only", TIP_LOGITS),
    # ---- methods/cocoop.py (CoCoOp) ------------------------------------------------------------------
    m("cocoop-shift-ignored", COCOOP, "return self.context[0].unsqueeze(0) + shift.unsqueeze(1)",
      "return self.context[0].unsqueeze(0) + 0 * shift.unsqueeze(1)", "CoCoOp's meta-net output never added",
      *COCOOP_LOGITS),
    m("cocoop-meta-net-linear", COCOOP, "nn.Linear(feature_width, hidden), nn.ReLU(inplace=True),",
      "nn.Linear(feature_width, hidden), nn.Identity(),", "CoCoOp's meta-net without its ReLU", *COCOOP_LOGITS),
    m("cocoop-raw-features", MODEL, "features = encode_image(self.clip, images, None, normalize=True)",
      "features = encode_image(self.clip, images, None, normalize=False)",
      "CoCoOp's meta-net and logits on unnormalised image features", *COCOOP_LOGITS),
    m("cocoop-classifiers-of-other-images", COCOOP, 'torch.einsum("bd,bkd->bk", features.to(text.dtype), text)',
      'torch.einsum("bd,bkd->bk", features.flip(0).to(text.dtype), text)',
      "each image scored against another image's classifier", *COCOOP_LOGITS),
    m("cocoop-export-chunked", COCOOP, "if torch.jit.is_tracing():", "if False:",
      "CoCoOp's exported graph keeps the chunk count of the batch it was traced on", *MODEL_EXPORT_COCOOP),
    # ---- export.py (ONNX / OpenVINO export) -------------------------------------------------------------
    m("export-pixels-unnormalised", "upt/export.py",
      "logits = self.predictor.logits((pixels - self.mean) / self.std).float()",
      "logits = self.predictor.logits(pixels).float()", "the exported graph skips CLIP's mean/std normalisation",
      MODEL_EXPORT_PREDICTOR),
    m("export-attention-fast-path", "upt/export.py", "torch.backends.mha.set_fastpath_enabled(False)",
      "torch.backends.mha.set_fastpath_enabled(enabled)",
      "traced through the fused attention kernel, which ONNX cannot write (ViT-B-16)", MODEL_EXPORT_FAST_PATH),
    # ---- methods/promptsrc.py (PromptSRC) ------------------------------------------------------------
    m("psrc-cross-entropy-dropped", PSRC, '"cross_entropy": F.cross_entropy(logits, labels),',
      '"cross_entropy": 0 * F.cross_entropy(logits, labels),', "PromptSRC's loss without its cross-entropy", PSRC_LOSS),
    m("psrc-text-weight-dropped", PSRC, '"text_l1": regulation.text_loss_weight * (text - frozen_text)',
      '"text_l1": (text - frozen_text)', "PromptSRC's text L1 term unweighted", PSRC_LOSS),
    m("psrc-image-weight-is-text-weight", PSRC, '"image_l1": regulation.image_loss_weight * (image',
      '"image_l1": regulation.text_loss_weight * (image', "PromptSRC's image L1 weighted by the text weight",
      PSRC_LOSS),
    m("psrc-image-l1-to-prompted", PSRC, "frozen_image = _wide(encode_image(model.clip, images, None, normalize=True))",
      "frozen_image = _wide(encode_image(model.clip, images, prompts.visual, normalize=True))",
      "the image L1 (and zero-shot logits) from the prompted image features, not frozen CLIP's", PSRC_LOSS),
    m("psrc-kl-swapped", PSRC, "(log_p0.exp() * (log_p0 - log_p)).sum()", "(log_p.exp() * (log_p - log_p0)).sum()",
      "KL(p ‖ p₀) instead of the released KL(p₀ ‖ p)", PSRC_LOSS),
    m("psrc-kl-batchmean", PSRC, "(log_p0 - log_p)).sum() / logits.numel()", "(log_p0 - log_p)).sum() / len(logits)",
      "the KL term divided by the batch instead of batch × classes", PSRC_LOSS),
    m("psrc-frozen-text-normalised-each", PSRC, "TEMPLATES, normalize_each=False)", "TEMPLATES)",
      "frozen text targets: the mean of normalised features (CLIP's), not the released code's", PSRC_FROZEN),
    m("psrc-frozen-text-one-template", PSRC, "TEMPLATES, normalize_each=False)", "TEMPLATES[:1], normalize_each=False)",
      "frozen text targets from one template instead of the ensemble", PSRC_FROZEN),
    m("psrc-gpa-uniform", PSRC, "return (-0.5 * ((epoch - mean) / std) ** 2).softmax(dim=0)",
      "return torch.full((epochs,), 1.0 / epochs, dtype=torch.float64)", "GPA's weights uniform over the epochs",
      PSRC_GPA_WEIGHTS),
    m("psrc-gpa-zero-based", PSRC, "epoch = torch.arange(1, epochs + 1, dtype=torch.float64)",
      "epoch = torch.arange(0, epochs, dtype=torch.float64)", "GPA's Gaussian over epochs 0..N-1, not 1..N",
      PSRC_GPA_WEIGHTS),
    m("psrc-gpa-not-applied", PSRC, "            model.load_state_dict(self.aggregate)", "            pass",
      "the last epoch's prompts kept instead of GPA's sum", PSRC_GPA),
    m("psrc-gpa-not-resumed", TRAIN, 'self.objective.load_state_dict(state.get("objective", {}))',
      'self.objective.load_state_dict({"aggregate": {}})', "a resumed run restarts GPA's sum from zero", PSRC_RESUME),
    m("psrc-objective-ignored", TRAIN,
      "objective = config.spec.objective(model, config, source.name) if config.spec.objective else CrossEntropy()",
      "objective = CrossEntropy()", "PromptSRC trained with the cross-entropy alone, no GPA", PSRC_GPA),
    m("psrc-given-options-ignored", PSRC, "return cls(**(chosen | given))", "return cls(**chosen)",
      "PromptSRC's loss weights and GPA options given by the user ignored", PSRC_DEFAULTS),
    m("psrc-lr-default-dropped", REGISTRY, "batch_size=promptsrc.BATCH_SIZE, lr=promptsrc.LR,",
      "batch_size=promptsrc.BATCH_SIZE,", "PromptSRC at the paper's lr 0.002 instead of its config's 0.0025",
      PSRC_DEFAULTS),
    m("psrc-depth-not-capped", REGISTRY, "default=promptsrc.DEPTH, capped=True)", "default=promptsrc.DEPTH)",
      "PromptSRC's default depth 9 refused on a smaller model instead of every layer", PSRC_DEFAULTS),
    m("psrc-text-prompts-shallow", REGISTRY, "return JointPrompts(TextContext(n_ctx, backbone.text_width, depth,",
      "return JointPrompts(TextContext(n_ctx, backbone.text_width, 1,", "PromptSRC's text prompts at the input only",
      PSRC_PROMPTS),
    # ---- methods/lora.py, lora_training.py and the encoders' adapters (CLIP-LoRA) ----------------------
    m("lora-scale-dropped", ENC, "return self.scale * torch.einsum(", "return torch.einsum(",
      "the adapters' updates not scaled by alpha / √rank", LORA_LOGITS),
    m("lora-scale-over-rank", LORA, "return alpha / math.sqrt(rank)", "return alpha / rank",
      "s = alpha / rank (the LoRA paper's) instead of the released code's alpha / √rank", LORA_LOGITS),
    m("lora-wrong-projection", ENC, "down, up = self.down[layer, projections], self.up[layer, projections]",
      "down, up = self.down[layer, projections].flip(0), self.up[layer, projections].flip(0)",
      "the query's adapter put on the value projection and the value's on the query", LORA_LOGITS),
    m("lora-last-block-unadapted", ENC, "        if lora is not None:\n            x = lora_block(",
      "        if lora is not None and not last:\n            x = lora_block(",
      "the image tower's last block ([CLS] only) runs without its adapters", LORA_LOGITS),
    m("lora-b-starts-nonzero", LORA, "self.up = nn.Parameter(torch.zeros(layers, PROJECTIONS, width, options.rank))",
      "self.up = nn.Parameter(0.01 * torch.randn(layers, PROJECTIONS, width, options.rank))",
      "B initialised off zero: the untrained model is not zero-shot CLIP", LORA_ZERO_SHOT),
    m("lora-a-not-kaiming", LORA, "nn.init.kaiming_uniform_(self.down[layer, projection], a=math.sqrt(5))",
      "nn.init.normal_(self.down[layer, projection])", "A drawn N(0, 1) instead of Kaiming-uniform", LORA_ZERO_SHOT),
    m("lora-dropout-on-base-input", ENC, "    normed = block.ln_1(x)\n    attn = block.attn\n",
      "    normed = F.dropout(block.ln_1(x), lora.dropout, training=lora.dropout > 0)\n    attn = block.attn\n",
      "dropout on the base projections' input too, not the adapters' alone", LORA_ZERO_SHOT),
    m("lora-one-mask-for-every-projection", ENC,
      "dropped = F.dropout(x.unsqueeze(0).expand(len(down), *x.shape), self.dropout, training=True)",
      "dropped = F.dropout(x, self.dropout, training=True).unsqueeze(0).expand(len(down), *x.shape)",
      "one dropout mask shared by the q, k and v adapters (the paper's code draws one each)", LORA_UPDATE),
    m("lora-dropout-not-rescaled", ENC, "self.dropout, training=True)\n",
      "self.dropout, training=True) * (1 - self.dropout)\n",
      "the adapters' dropped input not rescaled by 1 / (1 - p): updates biased low while training", LORA_UPDATE),
    m("lora-dropout-when-serving", LORA, "self.options.dropout if self.training else 0.0", "self.options.dropout",
      "the adapters' dropout on in eval mode (export, serving)", LORA_DROPOUT, LORA_EXPORT),
    m("lora-text-not-folded", LORA, '"classifier": self.classifier().to(self.visual.down.dtype).clone(),',
      '"classifier": F.normalize(encode_text(self.backbone.clip, self.class_tokens, normalize=True).view('
      'len(self.class_names), len(self.templates), -1).mean(dim=1), dim=-1).to(self.visual.down.dtype),',
      "W exported without the text adapters folded in", LORA_EXPORT),
    m("lora-served-unadapted", PRED, "normalize=True, lora=self.lora)", "normalize=True, lora=None)",
      "serving ignores the image adapters", LORA_EXPORT),
    m("lora-shares-the-prompt-pass", "upt/serving.py",
      '    if predictor.lora is not None:\n        return id(predictor.backbone), ("lora", id(predictor))\n', "",
      "a LoRA task's requests grouped into the other tasks' shared pass", LORA_SERVING),
    m("lora-lr-per-epoch", LORA_TRAIN, "lr = self.lr_at(self.done)", "lr = self.lr_at(epoch * self.steps_per_epoch)",
      "the cosine stepped per epoch instead of per iteration", LORA_RECIPE),
    m("lora-sgd-weight-decay", LORA_TRAIN, "weight_decay=WEIGHT_DECAY)", "weight_decay=self.config.weight_decay)",
      "AdamW with SGD's weight decay 5e-4 instead of the paper's 0.01", LORA_RECIPE),
    m("lora-resume-restarts-schedule", LORA_TRAIN,
      "self.first_step = min(start * self.steps_per_epoch, self.iterations)", "self.first_step = 0",
      "a resumed run restarts the cosine from its first iteration", LORA_RESUME),
    m("lora-passes-share-a-shuffle", LORA_TRAIN, "generator = _seed_everything(self.config.seed, index)",
      "generator = _seed_everything(self.config.seed, epoch)",
      "the passes grouped into one epoch draw the same batches and crops", LORA_PASSES),
]


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | timeout | stale | ambiguous | error
    detail: str
    seconds: float


def _copy_tree(destination: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "screenshots", "node_modules")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        else:
            shutil.copy2(source, destination / name)
    return destination


def _first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if match:
        return match.group(1)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", "--no-header", "-rfE"]


class Runner:
    """A worker process that imports torch, open_clip and pytest once, then forks one child per pytest run.

    The child imports `upt` afresh from its copy of the tree (the worker never imports it), so each run
    sees the mutated file; the import of the heavy libraries (seconds per run) is paid once per worker.
    """

    def __init__(self, tree: Path):
        self.tree = tree
        env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--runner"], cwd=tree, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def pytest(self, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
        log = self.tree / "pytest.log"
        request = {"tree": str(self.tree), "args": PYTEST_ARGS + list(tests), "timeout": timeout, "log": str(log)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return answer["code"], log.read_text(errors="replace") if log.exists() else ""

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _serve_runs() -> None:
    """The worker process's loop (see Runner): one JSON request per stdin line, one answer per stdout line."""
    import numpy  # noqa: F401  the slow imports, done once and shared by every forked run
    import open_clip  # noqa: F401
    import PIL.Image  # noqa: F401
    import pytest
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    assert not any(name == "upt" or name.startswith("upt.") for name in sys.modules), "upt must be imported per run"
    sys.dont_write_bytecode = True
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: one pytest run in the copy of the tree
            code = 3
            try:
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.chdir(request["tree"])
                sys.path.insert(0, request["tree"])
                code = int(pytest.main(request["args"]))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                code = None
                break
            time.sleep(0.1)
        print(json.dumps({"code": code}), flush=True)


def run_mutant(mutant: Mutant, runner: Runner, timeout: float) -> Outcome:
    started = time.monotonic()
    target = runner.tree / mutant.file  # the copy, restored after every mutant: the checkout may move meanwhile
    source = target.read_text()
    count = source.count(mutant.original)
    if count != 1:
        return Outcome(mutant, "stale" if count == 0 else "ambiguous", f"snippet found {count} times", 0.0)
    try:
        target.write_text(source.replace(mutant.original, mutant.replacement))
        code, output = runner.pytest(mutant.tests, timeout)
    finally:
        target.write_text(source)
    seconds = time.monotonic() - started
    if code is None:
        return Outcome(mutant, "timeout", f"tests ran past {timeout:.0f} s", seconds)
    if code == 0:
        return Outcome(mutant, "survived", "all selected tests passed", seconds)
    if code == 1:
        return Outcome(mutant, "killed", _first_failure(output), seconds)
    return Outcome(mutant, "error", f"pytest exit {code}: {_first_failure(output)}", seconds)


def baseline(runner: Runner, tests: set[str], timeout: float) -> None:
    code, output = runner.pytest(tuple(sorted(tests)), timeout)
    if code != 0:
        sys.exit(f"The unmutated tree fails its selected tests (exit {code}); fix that first:\n{output[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="run only these mutants (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel, each in its own copy")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant's tests")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unmutated copy")
    parser.add_argument("--json", type=Path, help="also write the outcomes to this file")
    parser.add_argument("--runner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runner:
        _serve_runs()
        return 0

    names = {mutant.name for mutant in MUTANTS}
    assert len(names) == len(MUTANTS), "mutant names must be unique"
    unknown = set(args.names) - names
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
    selected = [mutant for mutant in MUTANTS if not args.names or mutant.name in args.names]
    if args.list:
        for mutant in selected:
            tag = " [issue 13]" if mutant.from_issue else ""
            print(f"{mutant.name:36} {mutant.file:24} {mutant.description}{tag}\n{'':36} tests: {' '.join(mutant.tests)}")
        return 0

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="upt-mutation-") as workdir:
        runners: Queue[Runner] = Queue()
        for index in range(max(1, args.jobs)):
            runners.put(Runner(_copy_tree(Path(workdir) / f"tree{index}")))
        try:
            if not args.no_baseline:
                print("baseline: the selected tests on the unmutated tree ...", flush=True)
                runner = runners.get()
                baseline(runner, {test for mutant in selected for test in mutant.tests}, args.timeout * 2)
                runners.put(runner)

            def work(mutant: Mutant) -> Outcome:
                runner = runners.get()
                try:
                    outcome = run_mutant(mutant, runner, args.timeout)
                finally:
                    runners.put(runner)
                print(f"{outcome.status:9} {mutant.name:36} {outcome.seconds:5.0f} s  {outcome.detail}", flush=True)
                return outcome

            with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                outcomes = list(pool.map(work, selected))
        finally:
            while not runners.empty():
                runners.get().close()

    killed = [o for o in outcomes if o.status in ("killed", "timeout")]
    survived = [o for o in outcomes if o.status == "survived"]
    stale = [o for o in outcomes if o.status in ("stale", "ambiguous")]
    errors = [o for o in outcomes if o.status == "error"]
    scored = len(killed) + len(survived) + len(errors)
    score = len(killed) / scored if scored else 0.0
    print()
    if stale:
        print("stale mutants (snippet not found exactly once; update or remove them):")
        for o in stale:
            print(f"  {o.mutant.name} in {o.mutant.file}: {o.detail}")
    if survived or errors:
        print("surviving mutants:" if survived else "", *[f"  {o.mutant.name}: {o.mutant.description}" for o in survived],
              sep="\n")
        for o in errors:
            print(f"  error {o.mutant.name}: {o.detail}")
    issue = [o for o in outcomes if o.mutant.from_issue]
    issue_killed = sum(o.status in ("killed", "timeout") for o in issue)
    print(f"issue 13's bugs: {issue_killed}/{len(issue)} killed")
    print(f"mutation score: {len(killed)}/{scored} = {score:.1%} ({len(stale)} stale) "
          f"in {time.monotonic() - started:.0f} s with {args.jobs} job(s)")
    if args.json:
        args.json.write_text(json.dumps([{"name": o.mutant.name, "status": o.status, "detail": o.detail,
                                          "seconds": round(o.seconds, 1)} for o in outcomes], indent=2) + "\n")
    return 0 if not survived and not stale and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
