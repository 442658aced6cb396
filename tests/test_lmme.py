"""LMME against the library's own forward, per-sample runs and a full recomputation."""

from __future__ import annotations

import pytest
import torch

from lyra.config import LMMEConfig, load_config
from lyra.model.lmme import RetentionRecord, block_ranges, instruction_attention, keep_count
from lyra.model.lyra import LyraForConditionalGeneration
from lyra.processing import LyraProcessor, collate

from conftest import tone

KEEP_ALL = LMMEConfig(enabled=True, blocks=2, keep=1.0, min_keep=32)
PRUNE = LMMEConfig(enabled=True, blocks=2, keep=0.5, min_keep=8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LyraForConditionalGeneration.from_config(load_config("tiny")).eval()


@pytest.fixture(scope="module")
def processor(tiny_tokenizer, model):
    from lyra.data.vision import VisionLimits

    limits = VisionLimits(image_min_pixels=112 * 112, image_max_pixels=112 * 112,
                          video_min_pixels=56 * 56, video_max_pixels=56 * 56)
    return LyraProcessor(tiny_tokenizer, model.config, limits)


def _image(seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(112, 112, 3, generator=g) * 255).byte().numpy())


def samples(processor):
    """Text+image, text+video, text+speech and a mixed sample of different lengths."""
    frames = [_image(10 + i) for i in range(4)]
    return [
        processor([{"role": "user", "content": "<image>\nwhat is shown here?"}], images=[_image(1)]),
        processor([{"role": "user", "content": "describe <video> briefly"}], videos=[frames]),
        processor([{"role": "user", "content": "<speech>"}], speech=[tone(2.0)]),
        processor([{"role": "user", "content": "<image> and <speech>: answer the question"}],
                  images=[_image(2)], speech=[tone(1.0, freq=300.0)]),
    ]


def test_blocks_and_keep_counts():
    assert [list(r) for r in block_ranges(28, 4)] == [list(range(i, i + 7)) for i in (0, 7, 14, 21)]
    assert [len(r) for r in block_ranges(10, 4)] == [2, 3, 3, 2]
    cfg = LMMEConfig(keep=0.7, min_keep=32)
    assert (keep_count(1000, cfg), keep_count(40, cfg), keep_count(20, cfg)) == (700, 32, 20)
    with pytest.raises(ValueError, match="lmme.blocks"):
        block_ranges(2, 3)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_keep_all_equals_library_forward(model, processor, padding_side):
    """rho = 1: our layer loop gives the library forward's logits, for each kind and a padded mix."""
    batch = collate(samples(processor), model.config.tokens.pad, padding_side=padding_side)
    with torch.no_grad():
        reference = model(**batch).logits
        ours = model(**batch, lmme=KEEP_ALL)
    assert torch.equal(ours.kept_index >= 0, batch["attention_mask"].bool())
    valid = batch["attention_mask"].bool()
    assert (ours.logits[valid] - reference[valid]).abs().max().item() <= 1e-5


def test_keep_all_generation_equals_library_generate(model, processor):
    batch = collate(samples(processor), model.config.tokens.pad, padding_side="left")
    ours = model.generate(**batch, lmme=KEEP_ALL, max_new_tokens=8)
    reference = model.generate(**batch, max_new_tokens=8)
    assert ours.tolist() == reference.tolist()


def test_pruned_batch_equals_each_sample_alone(model, processor):
    group = samples(processor)
    batch = collate(group, model.config.tokens.pad, padding_side="right")
    with torch.no_grad():
        together = model(**batch, lmme=PRUNE)
        for row, sample in enumerate(group):
            alone = model(**collate([sample], model.config.tokens.pad), lmme=PRUNE)
            n = alone.logits.shape[1]
            assert together.kept_index[row, :n].tolist() == alone.kept_index[0].tolist()
            assert (together.kept_index[row, n:] == -1).all()
            assert (together.logits[row, :n] - alone.logits[0]).abs().max().item() <= 1e-5
    kept = together.retention.kept_fraction()
    assert 0.4 < kept[0] < 0.7  # ceil(0.5 * count), at least 8 per sample


def test_pruned_cache_generation_equals_full_recomputation(model, processor):
    """Decoding over pruned caches == re-running the pruned forward on the whole sequence each step.

    The reference marks generated tokens as labels, so they are not instruction tokens and
    the pruning decisions are those of the prefill (causal attention: later tokens cannot
    change the scores of earlier rows).
    """
    sample = samples(processor)[3]
    batch = collate([sample], model.config.tokens.pad, padding_side="left")
    generated = model.generate(**batch, lmme=PRUNE, max_new_tokens=16)[0]
    assert generated.shape[0] == 16 and model.config.tokens.eos not in generated.tolist()[:-1]
    sequence = batch["input_ids"]
    prompt_length = sequence.shape[1]
    with torch.no_grad():
        for step in range(16):
            labels = torch.full_like(sequence, -100)
            labels[:, prompt_length:] = sequence[:, prompt_length:]
            full = dict(batch, input_ids=sequence, attention_mask=torch.ones_like(sequence),
                        mm_token_type_ids=torch.nn.functional.pad(batch["mm_token_type_ids"], (0, step)))
            out = model(**full, labels=labels, lmme=PRUNE)
            next_token = out.logits[0, -1].argmax()
            assert next_token.item() == generated[step].item(), f"diverged at step {step}"
            sequence = torch.cat([sequence, next_token.view(1, 1)], dim=1)


def test_sampling_works_with_pruned_cache(model, processor):
    batch = collate(samples(processor)[:2], model.config.tokens.pad, padding_side="left")
    torch.manual_seed(3)
    first = model.generate(**batch, lmme=PRUNE, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    torch.manual_seed(3)
    second = model.generate(**batch, lmme=PRUNE, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    assert first.shape == (2, 6) and first.tolist() == second.tolist()


def test_instruction_scores_equal_eager_attention(processor):
    """The |instruction| x |all| probabilities equal those rows of the eager attention matrix."""
    config = load_config("tiny", overrides={"attn_implementation": "eager"})
    torch.manual_seed(0)
    eager = LyraForConditionalGeneration.from_config(config).eval()
    batch = collate(samples(processor)[3:], config.tokens.pad)
    with torch.no_grad():
        embeds, positions, _ = eager.prepare_inputs(**{k: v for k, v in batch.items()})
        language_model = eager.backbone.model.language_model
        out = language_model(inputs_embeds=embeds, position_ids=positions, output_attentions=True,
                             output_hidden_states=True)
        cos, sin = language_model.rotary_emb(embeds, positions)
        rows = torch.arange(embeds.shape[1] - 12, embeds.shape[1])
        valid = torch.ones(embeds.shape[1], dtype=torch.bool)
        for layer_index in range(len(language_model.layers)):
            ours = instruction_attention(language_model.layers[layer_index], out.hidden_states[layer_index][0],
                                         cos[0], sin[0], rows, valid)
            theirs = out.attentions[layer_index][0][:, rows]
            assert (ours - theirs).abs().max().item() <= 1e-6


def test_training_with_gradient_checkpointing(processor):
    torch.manual_seed(0)
    model = LyraForConditionalGeneration.from_config(load_config("tiny"))
    sample = samples(processor)[3]
    batch = collate([sample], model.config.tokens.pad)
    labels = batch["input_ids"].clone()
    labels[:, :-4] = -100
    model.eval()  # no dropout: the two passes must agree
    plain = model(**batch, labels=labels, lmme=PRUNE)
    plain.loss.backward()
    grad = model.speech_projector.fc2.weight.grad.clone()
    model.zero_grad()
    model.backbone.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    checkpointed = model(**batch, labels=labels, lmme=PRUNE)
    checkpointed.loss.backward()
    assert torch.allclose(plain.loss, checkpointed.loss, atol=1e-6)
    assert torch.allclose(grad, model.speech_projector.fc2.weight.grad, atol=1e-6)
    assert grad.abs().sum() > 0
    kept_labels = (checkpointed.kept_index >= 0).sum().item()
    assert kept_labels < batch["input_ids"].shape[1]  # it did prune


def test_retention_record_round_trip(tmp_path, model, processor):
    batch = collate(samples(processor)[3:], model.config.tokens.pad)
    with torch.no_grad():
        record = model(**batch, lmme=LMMEConfig(enabled=True, blocks=2, keep=0.5, min_keep=4)).retention
    record.save(tmp_path / "r.json")
    loaded = RetentionRecord.load(tmp_path / "r.json")
    assert loaded == record
    kinds = [run[0] for run in record.context[0]]
    assert kinds == ["image", "speech"]


def test_lmme_flag_parsing():
    assert LMMEConfig.parse("4,0.7") == LMMEConfig(enabled=True, blocks=4, keep=0.7)
    assert not LMMEConfig.parse("off").enabled
    for bad in ("4", "4,1.5", "x,0.5"):
        with pytest.raises(ValueError, match="--lmme"):
            LMMEConfig.parse(bad)


def test_retention_pictures(model, processor):
    import numpy as np

    from lyra.eval.retention import image_overlay, timeline

    sample = samples(processor)[3]
    batch = collate([sample], model.config.tokens.pad)
    with torch.no_grad():
        record = model(**batch, lmme=LMMEConfig(enabled=True, blocks=2, keep=0.5, min_keep=4)).retention
    grid = tuple(sample.image_grid_thw[0].tolist())
    picture = np.asarray(image_overlay(_image(2), grid, record, run=0)).astype(int)
    original = np.asarray(_image(2).resize((picture.shape[1], picture.shape[0]))).astype(int)
    _, start, end = record.context[0][0]
    cols = grid[2] // 2
    kept = set(record.kept[-1][0])
    for index in range(start, end):
        r, c = divmod(index - start, cols)
        patch = (slice(r * 28, r * 28 + 28), slice(c * 28, c * 28 + 28))
        same = np.array_equal(picture[patch], original[patch])
        assert same == (index in kept)
    strip = timeline(record)
    assert strip.size[0] == 1200 and strip.size[1] > 16
    with pytest.raises(ValueError, match="is speech, not an image"):
        image_overlay(_image(2), grid, record, run=1)
