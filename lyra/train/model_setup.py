"""What a training stage does to its model before the first step: which weights train, in
which precision, and whether activations are recomputed. Kept apart from the recipe (data,
trainer) so that benchmarks and tools set a model up exactly as a stage does without the
data stack."""

from __future__ import annotations

from lyra.model import mlora
from lyra.model.lyra import LyraForConditionalGeneration
from lyra.train.config import TrainConfig


def configure_trainable(model: LyraForConditionalGeneration, config: TrainConfig) -> None:
    """Freeze everything, then unfreeze what the stage trains (paper Table 7)."""
    model.requires_grad_(False)
    wanted = config.trainable
    if wanted.adapter:
        if "speech" in mlora.adapter_names(model):
            mlora.use_adapter(model, "speech")  # a new adapter's projector starts from the speech one
        spec = mlora.AdapterSpec(wanted.adapter_r, wanted.adapter_alpha, wanted.adapter_dropout)
        mlora.add_adapter(model, wanted.adapter, spec)  # LoRA from the base LLM, now the only active one
        for name, parameter in model.named_parameters():
            if f".lora_A.{wanted.adapter}." in name or f".lora_B.{wanted.adapter}." in name:
                parameter.requires_grad_(True)
    if wanted.speech_projector:
        model.speech_projector.requires_grad_(True)
    if wanted.sound_projector:
        if model.sound_projector is None:
            raise ValueError("the recipe trains sound_projector but the model has none (sound.enabled is false)")
        model.sound_projector.requires_grad_(True)
    if wanted.llm:
        model.backbone.model.language_model.requires_grad_(True)
        model.backbone.lm_head.requires_grad_(True)
    if wanted.vit:
        model.backbone.model.visual.requires_grad_(True)
    if wanted.speech_generator:
        model.add_speech_generator()  # new and random unless the checkpoint has one
        model.speech_generator.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the config trains nothing: set something under `trainable`")


def train_in_fp32(model: LyraForConditionalGeneration) -> None:
    """Every weight in fp32, what the optimiser's master weights and autocast expect (bf16 training
    computes in bf16 under autocast, or DeepSpeed casts the model itself). A previous stage's
    `final/` holds bf16 weights after bf16 training."""
    model.float()


def enable_gradient_checkpointing(model: LyraForConditionalGeneration, config: TrainConfig) -> None:
    """Recompute each LLM layer's activations in the backward when the stage asks for it."""
    if config.gradient_checkpointing:
        model.backbone.activation_checkpointing_enable({"use_reentrant": False})
