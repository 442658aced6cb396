"""The transformers config of Lyra's Qwen2-VL backbone, apart from the model so that code
needing only the LLM (benchmarks) imports neither the speech encoder nor its audio stack."""

from __future__ import annotations

from transformers import Qwen2VLConfig

from lyra.config import LyraConfig


def qwen2vl_config(config: LyraConfig) -> Qwen2VLConfig:
    """The transformers config of the backbone described by `config`."""
    text, vision, tokens = config.text, config.vision, config.tokens
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads,
            rms_norm_eps=text.rms_norm_eps,
            max_position_embeddings=text.max_position_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": text.rope_theta,
                "mrope_section": list(text.mrope_section),
            },
            bos_token_id=tokens.pad,
            eos_token_id=tokens.eos,
            pad_token_id=tokens.pad,
        ),
        vision_config=dict(
            depth=vision.depth,
            embed_dim=vision.embed_dim,
            hidden_size=text.hidden_size,
            mlp_ratio=vision.mlp_ratio,
            num_heads=vision.num_heads,
            in_channels=vision.in_channels,
            patch_size=vision.patch_size,
            spatial_merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        ),
        image_token_id=tokens.image,
        video_token_id=tokens.video,
        vision_start_token_id=tokens.vision_start,
        vision_end_token_id=tokens.vision_end,
        tie_word_embeddings=text.tie_word_embeddings,
        attn_implementation=config.attn_implementation,
    )
