"""With prompts switched off, the prompted encoders are open_clip's own encoders."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from upt.encoders import encode_image, encode_text

CLASS_PROMPTS = ["a photo of a bag.", "a photo of a pair of trousers.", "x", "a photo of a very long name of a thing."]


@pytest.fixture(scope="module")
def vit_b_16():
    """ViT-B-16 with random weights: the architecture is what the equivalence is about."""
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16", pretrained=None).eval(), open_clip.get_tokenizer("ViT-B-16")


def _check_equivalence(clip, tokenizer, image_size):
    tokens = tokenizer(CLASS_PROMPTS)
    images = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        torch.testing.assert_close(encode_text(clip, tokens), clip.encode_text(tokens), atol=1e-5, rtol=0)
        torch.testing.assert_close(encode_image(clip, images), clip.encode_image(images), atol=1e-5, rtol=0)


def test_tiny_encoders_match_open_clip(tiny):
    _check_equivalence(tiny.clip, tiny.tokenizer, tiny.image.size)


@pytest.mark.slow
def test_vit_b_16_encoders_match_open_clip(vit_b_16):
    clip, tokenizer = vit_b_16
    _check_equivalence(clip, tokenizer, 224)


def test_text_is_encoded_only_up_to_the_longest_prompt(tiny, monkeypatch):
    lengths = []
    block = tiny.clip.transformer.resblocks[0]
    handle = block.register_forward_hook(lambda module, args, out: lengths.append(out.shape[1]))
    try:
        tokens = tiny.tokenizer(["a bag.", "a photo of a pair of trousers."])
        encode_text(tiny.clip, tokens)
    finally:
        handle.remove()
    assert lengths == [int(tokens.argmax(dim=-1).max()) + 1]
    assert lengths[0] < tokens.shape[1] == 77


def test_prompts_change_the_features(tiny):
    tokens = tiny.tokenizer(["X X a bag."])
    images = torch.randn(1, 3, tiny.image.size, tiny.image.size)
    context = torch.randn(1, 2, tiny.text_width)
    visual = torch.randn(2, 3, tiny.vision_width)  # two layers of three visual tokens
    with torch.no_grad():
        assert not torch.allclose(encode_text(tiny.clip, tokens, context), encode_text(tiny.clip, tokens))
        shallow = encode_image(tiny.clip, images, visual[:1])
        deep = encode_image(tiny.clip, images, visual)
        assert not torch.allclose(shallow, encode_image(tiny.clip, images))
        assert not torch.allclose(deep, shallow)  # the second layer's prompts replace the first's outputs


def test_deep_prompts_replace_the_previous_layers_prompt_outputs(tiny):
    """Feeding layer 1 exactly what layer 0 produced at the prompt positions must change nothing."""
    clip = tiny.clip
    image = torch.randn(1, 3, tiny.image.size, tiny.image.size)
    first = torch.randn(1, 2, tiny.vision_width)
    outputs = []
    handle = clip.visual.transformer.resblocks[0].register_forward_hook(lambda m, a, out: outputs.append(out))
    with torch.no_grad():
        shallow = encode_image(clip, image, first)
        handle.remove()
        carried = outputs[0][0, 1:3].unsqueeze(0)  # block 0's outputs at the two prompt positions
        deep = encode_image(clip, image, torch.cat([first, carried]))
        other = encode_image(clip, image, torch.cat([first, torch.randn_like(carried)]))
    torch.testing.assert_close(deep, shallow, atol=1e-6, rtol=0)
    assert not torch.allclose(other, shallow)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_per_sample_visual_prompts_equal_each_samples_own_prompts(tiny, depth):
    """(batch, depth, n, width) prompts: each image encoded as with its own task's (depth, n, width)."""
    torch.manual_seed(0)
    images = torch.randn(5, 3, tiny.image.size, tiny.image.size)  # batch 5 != n 3: shapes cannot be confused
    per_sample = torch.randn(5, depth, 3, tiny.vision_width) * 0.1
    with torch.no_grad():
        together = encode_image(tiny.clip, images, per_sample)
        for index in range(5):
            alone = encode_image(tiny.clip, images[index:index + 1], per_sample[index])
            torch.testing.assert_close(together[index:index + 1], alone, atol=1e-5, rtol=0)


def test_per_sample_prompts_of_several_depths_reach_only_their_own_layers(tiny):
    """Tasks of different depths in one pass: sample b's prompts replace outputs at its first depths[b]
    layers only, exactly as its own task's (depths[b], n, width) prompts alone (padding never read)."""
    torch.manual_seed(0)
    layers = tiny.vision_layers
    images = torch.randn(4, 3, tiny.image.size, tiny.image.size)
    per_sample = torch.randn(4, layers, 3, tiny.vision_width) * 0.1
    depths = torch.tensor([1, layers, 2, 1])
    with torch.no_grad():
        together = encode_image(tiny.clip, images, per_sample, depths=depths)
        for index in range(4):
            own = per_sample[index, :depths[index]]
            alone = encode_image(tiny.clip, images[index:index + 1], own)
            torch.testing.assert_close(together[index:index + 1], alone, atol=1e-5, rtol=0)
        # the padding rows are never read: other values there change nothing
        padded = per_sample.clone()
        for index, depth in enumerate(depths):
            padded[index, depth:] = 7.0
        assert torch.equal(encode_image(tiny.clip, images, padded, depths=depths), together)


def _last_block_positions(clip, encode) -> list[int]:
    """How many positions the last block's MLP computed during `encode()`."""
    positions = []
    mlp = clip.visual.transformer.resblocks[-1].mlp
    handle = mlp.register_forward_hook(lambda module, args, out: positions.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            encode()
    finally:
        handle.remove()
    return positions


def test_the_last_block_runs_at_cls_only_where_the_tower_pools_cls(tiny):
    """Nothing reads the last block's outputs at the other positions, so they are not computed (~8 %
    of ViT-B-16's work); a tower that averages its tokens needs them all, and gets open_clip's features."""
    images = torch.randn(2, 3, tiny.image.size, tiny.image.size)
    prompts = torch.randn(tiny.vision_layers, 3, tiny.vision_width) * 0.1
    assert _last_block_positions(tiny.clip, lambda: encode_image(tiny.clip, images, prompts)) == [1]
    averaging = copy.deepcopy(tiny.clip)
    averaging.visual.pool_type = "avg"
    tokens = 1 + (tiny.image.size // averaging.visual.patch_size[0]) ** 2
    assert _last_block_positions(averaging, lambda: encode_image(averaging, images)) == [tokens]
    with torch.no_grad():
        torch.testing.assert_close(encode_image(averaging, images), averaging.encode_image(images), atol=1e-5, rtol=0)
        assert not torch.allclose(encode_image(averaging, images), encode_image(tiny.clip, images))
