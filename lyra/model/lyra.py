"""Lyra: transformers' Qwen2-VL with speech and sound spliced into its input embeddings.

The backbone (`Qwen2VLForConditionalGeneration`) is composed, not modified: Lyra
embeds the token ids itself, overwrites the rows of `<|speech_pad|>` / `<|sound_pad|>`
tokens with projected Whisper features, and hands both `input_ids` (for image/video
placeholders and M-RoPE) and `inputs_embeds` to the backbone. Speech and sound
tokens count as text for M-RoPE (type 0): one temporal step per token, the same index
on all three axes, which is exactly how the backbone positions text.

Checkpoint layout (`save_pretrained`): `config.json` (`{"model_type": "lyra", "lyra":
{...}}`) and safetensors weights under the module names `backbone.*`,
`speech_encoder.whisper.*`, `speech_projector.*`, `sound_projector.*` (absent when
`sound.enabled` is false, as in converted releases).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.utils import ModelOutput

from lyra.config import AudioEncoderConfig, LMMEConfig, LyraConfig
from lyra.losses.lcmr import lcmr_loss
from lyra.model import mlora
from lyra.model.backbone import qwen2vl_config
from lyra.model.lmme import RetentionRecord, context_types, lmme_decode, lmme_prefill
from lyra.model.projector import FrameConcatProjector
from lyra.model.speech import (FrameCache, WhisperEncoder, audio_frames, encode_audio, load_whisper_encoder_state,
                               num_clips, waveform_tensor)
from lyra.model.speechgen import SpeechGenerator
from lyra.model.vocoder import UnitVocoder, check_vocoder
from lyra.utils.io import move_into, replace_directory
from lyra.utils.state_dict import check_state_dict

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"  # its own folder: HF tokenizer loading would misread our config.json
MODEL_TYPE = "lyra"
# The keys of a collated batch that `prepare_inputs` takes: what the LLM reads.
PREPARE_INPUT_KEYS = ("input_ids", "attention_mask", "speech", "sound", "pixel_values", "image_grid_thw",
                      "pixel_values_videos", "video_grid_thw", "mm_token_type_ids")


class LyraForConditionalGeneration(nn.Module):
    """Qwen2-VL + Whisper speech/sound path.

    Modules: `backbone` (Qwen2-VL: `model.visual`, `model.language_model`, `lm_head`),
    `speech_encoder`, `speech_projector`, `sound_projector` (None when `sound.enabled` is
    false) and, when sound does not share the speech encoder, `sound_encoder`.
    """

    def __init__(self, config: LyraConfig, backbone: Qwen2VLForConditionalGeneration | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else Qwen2VLForConditionalGeneration(qwen2vl_config(config))
        llm_width = config.text.hidden_size
        self.speech_encoder = WhisperEncoder(config.speech.encoder)
        self.speech_projector = FrameConcatProjector(self.speech_encoder.width, llm_width, config.speech.projector)
        sound = config.sound
        self.sound_encoder: WhisperEncoder | None = None
        self.sound_projector: FrameConcatProjector | None = None
        if sound.enabled:
            sound_width = self.speech_encoder.width
            if not sound.share_speech_encoder:
                if sound.encoder is None:
                    raise ValueError("sound.encoder must be set when sound.share_speech_encoder is false")
                self.sound_encoder = WhisperEncoder(sound.encoder)
                sound_width = self.sound_encoder.width
            self.sound_projector = FrameConcatProjector(sound_width, llm_width, sound.projector)
        self.speech_generator = self._build_speech_generator() if config.speech_generator.enabled else None
        # MLoRA state (lyra.model.mlora): projector weights per adapter, and the adapter in use.
        self.adapter_configs: dict[str, Any] = {}  # name -> peft LoraConfig
        self.adapter_projectors: dict[str, dict[str, torch.Tensor]] = {}
        self.active_adapter: str | None = None
        self.last_retention: RetentionRecord | None = None  # set by generate with LMME
        cache_mib = config.speech.frozen_encoder_cache_mib
        self._frame_cache = FrameCache(cache_mib) if cache_mib > 0 else None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: LyraConfig, load_encoder_weights: bool = True) -> "LyraForConditionalGeneration":
        """A new model with random backbone weights; the Whisper encoder(s) load
        `checkpoint` from their config when one is given."""
        model = cls(config)
        if load_encoder_weights:
            model.load_encoder_checkpoints()
        return model

    def load_encoder_checkpoints(self) -> None:
        if self.config.speech.encoder.checkpoint:
            self.speech_encoder.load_checkpoint(self.config.speech.encoder.checkpoint)
        if self.sound_encoder is not None and self.config.sound.encoder.checkpoint:
            self.sound_encoder.load_checkpoint(self.config.sound.encoder.checkpoint)

    @classmethod
    def from_qwen2vl(
        cls,
        qwen2vl_dir: str | Path,
        whisper_checkpoint: str | Path,
        base_config: LyraConfig | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "LyraForConditionalGeneration":
        """Build from a local Qwen2-VL checkpoint directory plus Whisper weights.

        Dimensions are read from the checkpoints; the projectors start random (stage 1
        trains them). `base_config` supplies everything else (token ids, limits).
        """
        qwen2vl_dir = Path(qwen2vl_dir)
        if not (qwen2vl_dir / "config.json").is_file():
            raise FileNotFoundError(f"{qwen2vl_dir} is not a Qwen2-VL checkpoint directory (no config.json)")
        backbone = Qwen2VLForConditionalGeneration.from_pretrained(
            qwen2vl_dir, dtype=dtype, local_files_only=True, trust_remote_code=False
        )
        config = LyraConfig.from_dict(base_config.to_dict()) if base_config else LyraConfig()
        copy_backbone_dims(backbone.config, config)
        encoder_state = load_whisper_encoder_state(whisper_checkpoint)
        config.speech.encoder = encoder_config_from_state(encoder_state, str(whisper_checkpoint))
        config.validate()
        model = cls(config, backbone=backbone)
        model.speech_encoder.whisper.load_state_dict(encoder_state)
        return model.to(dtype)

    @property
    def frame_cache(self) -> FrameCache | None:
        """Encoder outputs of audio already heard (used whenever no gradient can reach the encoder:
        it is frozen, or grad mode is off as in evaluation and inference). Models
        with the same frozen encoder weights may share one, so a recording is encoded once."""
        return self._frame_cache

    @frame_cache.setter
    def frame_cache(self, cache: FrameCache | None) -> None:
        self._frame_cache = cache

    def _build_speech_generator(self) -> SpeechGenerator:
        text = self.config.text
        return SpeechGenerator.from_config(
            self.config.speech_generator, text.hidden_size, rms_norm_eps=text.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": text.rope_theta},
        )

    def add_speech_generator(self) -> None:
        """Give the model a (new, random) speech generator: stage 4 trains it."""
        if self.speech_generator is None:
            self.config.speech_generator.enabled = True
            self.speech_generator = self._build_speech_generator().to(self.device)

    def attach_vocoder(self, vocoder: UnitVocoder) -> None:
        """Give the model the unit vocoder that `speak` uses (it must speak the generator's units).
        It is kept out of the module tree and out of checkpoints, which record only its name
        (`speech_generator.vocoder`): a vocoder is a separate release with its own weights."""
        if self.speech_generator is None:
            raise ValueError("this model has no speech generator (train stage 4), so a vocoder has nothing to speak")
        check_vocoder(self.config.speech_generator, vocoder)
        self._vocoder = [vocoder]  # a list, so nn.Module does not register it

    @property
    def vocoder(self) -> UnitVocoder | None:
        return self._vocoder[0] if getattr(self, "_vocoder", None) else None

    @property
    def can_speak(self) -> bool:
        return self.speech_generator is not None and self.vocoder is not None

    @torch.no_grad()
    def speak(self, sample, answer_ids: list[int]) -> tuple[np.ndarray, int]:
        """A spoken version of an answer already generated for `sample` (a `ProcessedSample`):
        one forward over prompt + answer gives the answer tokens' hidden states, the speech
        generator turns them into units and the vocoder into a waveform at its sample rate."""
        if not self.can_speak:
            raise ValueError("this model cannot speak: it needs a speech generator (stage 4) and attach_vocoder()")
        vocoder = self.vocoder
        if not answer_ids:
            return np.zeros(0, np.float32), vocoder.sample_rate
        device = self.device
        answer = torch.tensor(answer_ids, dtype=torch.long)
        ids = torch.cat([sample.input_ids, answer])[None].to(device)
        types = torch.cat([sample.mm_token_type_ids, torch.zeros_like(answer, dtype=sample.mm_token_type_ids.dtype)])
        media = {name: getattr(sample, name).to(device) for name in
                 ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
                 if getattr(sample, name) is not None}
        embeds, positions, _ = self.prepare_inputs(ids, torch.ones_like(ids), sample.speech or None,
                                                   sample.sound or None, mm_token_type_ids=types[None].to(device),
                                                   **media)
        hidden = self.backbone.model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        units = self.speech_generator.predict(hidden[:, -len(answer_ids):])[0]
        return vocoder.synthesize(units), vocoder.sample_rate

    # ------------------------------------------------------------------ forward
    @property
    def device(self) -> torch.device:
        return self.backbone.lm_head.weight.device

    def encode_speech(self, waveforms: list[torch.Tensor], progress: bool = False,
                      frames: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Project `[T_i]` 16 kHz waveforms; returns one `[tokens_i, d_llm]` tensor each.
        `frames[i]`, when given and not None, is waveform i's `audio_frames`, computed beforehand."""
        return self._encode(waveforms, self._audio_encoder("speech"), self.speech_projector, progress, frames)

    def encode_sound(self, waveforms: list[torch.Tensor],
                     frames: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        self.config.check_sound_input()
        return self._encode(waveforms, self._audio_encoder("sound"), self.sound_projector, False, frames)

    def audio_frames(self, kind: str, waveforms: list[torch.Tensor],
                     max_clips: int | None = None) -> list[torch.Tensor | None]:
        """The speech or sound (`kind`) encoder's output for each waveform, `[clips_i, n_audio_ctx,
        d_enc]`, to pass to `prepare_inputs` as `speech_frames` / `sound_frames`: a server runs the
        encoders in a thread of their own this way, while another one decodes. The projectors
        (which an MLoRA adapter swaps) still run in `prepare_inputs`. With `max_clips`, waveforms
        of more clips get None (`prepare_inputs` then encodes them, one batch of clips at a time,
        instead of holding all their frames)."""
        if kind == "sound":
            self.config.check_sound_input()
        encoder = self._audio_encoder(kind)
        cache, batch = self._encoder_cache(encoder), self.config.speech.encode_batch_clips
        rule = self.config.speech.window_rule
        frames: list[torch.Tensor | None] = []
        for waveform in map(waveform_tensor, waveforms):
            fits = max_clips is None or num_clips(waveform.shape[0], rule) <= max_clips
            frames.append(audio_frames(waveform, encoder, batch, cache, rule) if fits else None)
        return frames

    def _audio_encoder(self, kind: str) -> WhisperEncoder:
        if kind not in ("speech", "sound"):
            raise ValueError(f"unknown audio kind {kind!r}; use 'speech' or 'sound'")
        return self.sound_encoder if kind == "sound" and self.sound_encoder is not None else self.speech_encoder

    def _encoder_cache(self, encoder: WhisperEncoder) -> FrameCache | None:
        trained = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
        return None if trained else self._frame_cache

    def _encode(self, waveforms, encoder: WhisperEncoder, projector: nn.Module, progress: bool,
                frames: list[torch.Tensor | None] | None) -> list[torch.Tensor]:
        frames = frames if frames is not None else [None] * len(waveforms)
        if len(frames) != len(waveforms):
            raise ValueError(f"{len(frames)} precomputed encoder outputs for {len(waveforms)} waveforms")
        batch, rule = self.config.speech.encode_batch_clips, self.config.speech.window_rule
        cache = self._encoder_cache(encoder)
        return [encode_audio(waveform_tensor(w), encoder, projector, batch, progress, cache, rule, f)
                for w, f in zip(waveforms, frames)]

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        speech: list[torch.Tensor] | None = None,
        sound: list[torch.Tensor] | None = None,
        progress: bool = False,
        speech_frames: list[torch.Tensor | None] | None = None,
        sound_frames: list[torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Token embeddings `[B, L, d]` with speech/sound features at their pad tokens, and the
        projected speech tokens of each waveform (for LCMR). `progress`: a bar while encoding;
        `speech_frames` / `sound_frames`: encoder outputs computed beforehand (`audio_frames`)."""
        embeds = self.backbone.get_input_embeddings()(input_ids)
        speech_features: list[torch.Tensor] = []
        for name, waveforms, token_id in (("speech", speech, self.config.tokens.speech),
                                          ("sound", sound, self.config.tokens.sound)):
            mask = input_ids == token_id
            if name == "sound" and (waveforms or mask.any()):
                self.config.check_sound_input()
            if not waveforms:
                if mask.any():
                    raise ValueError(f"input_ids hold {int(mask.sum())} {name} tokens but no {name} audio was given")
                continue
            if name == "speech":
                features = speech_features = self.encode_speech(waveforms, progress, speech_frames)
            else:
                features = self.encode_sound(waveforms, sound_frames)
            embeds = _scatter(embeds, mask, torch.cat(features), name)
        return embeds, speech_features

    def prepare_inputs(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        speech: list[torch.Tensor] | None = None,
        sound: list[torch.Tensor] | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        progress: bool = False,
        speech_frames: list[torch.Tensor | None] | None = None,
        sound_frames: list[torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Everything before the LLM layers: `[B, L, d]` input embeddings with image, video,
        speech and sound features spliced in, `[3, B, L]` M-RoPE position ids (padding
        excluded; speech and sound count as text), and each speech input's projected tokens.
        `speech_frames` / `sound_frames`: see `embed_inputs`."""
        embeds, speech_features = self.embed_inputs(input_ids, speech, sound, progress, speech_frames, sound_frames)
        vision = self.backbone.model
        if pixel_values is not None:
            features = torch.cat(vision.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output)
            embeds = _scatter(embeds, input_ids == self.config.tokens.image, features, "image")
        if pixel_values_videos is not None:
            features = torch.cat(
                vision.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True).pooler_output
            )
            embeds = _scatter(embeds, input_ids == self.config.tokens.video, features, "video")
        if mm_token_type_ids is None:
            mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
        position_ids, _ = vision.get_rope_index(
            input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask=attention_mask
        )
        return embeds, position_ids, speech_features

    def lmme_settings(self, lmme: LMMEConfig | None) -> LMMEConfig | None:
        """The LMME configuration in force: the per-call one, else the model's if enabled."""
        chosen = lmme if lmme is not None else self.config.lmme
        return chosen if chosen.enabled else None

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        speech: list[torch.Tensor] | None = None,
        sound: list[torch.Tensor] | None = None,
        lmme: LMMEConfig | None = None,
        transcript_ids: list[torch.Tensor] | None = None,
        transcript_speech_index: torch.Tensor | None = None,
        return_logits: bool = True,
        tgt_units: torch.Tensor | None = None,
        **media: Any,
    ) -> LyraOutput:
        """Run the model.

        Args:
            input_ids, attention_mask, labels: `[B, L]` (labels -100 where not trained).
            speech, sound: 16 kHz waveforms `[T_i]`, one per pad run, in order.
            lmme: per-call LMME settings (default: the model config's).
            transcript_ids, transcript_speech_index: transcripts of some speech inputs
                (`transcript_ids[k]` is the text of `speech[transcript_speech_index[k]]`); with
                labels, they add lambda * LCMR to the loss.
            return_logits: False computes the LM head only where labels are (training).
            tgt_units: `[B, U]` speech units of each answer (-100 padded): with labels, the
                speech generator's CTC loss on the answer tokens' hidden states is added.
            media: pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                mm_token_type_ids (as the processor returns them).

        Returns:
            `LyraOutput`; with LMME the logits cover the kept rows only (`kept_index`).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, position_ids, speech_features = self.prepare_inputs(input_ids, attention_mask, speech, sound, **media)
        settings = self.lmme_settings(lmme)
        shifted = None
        if labels is not None:  # next-token targets, aligned with the rows that predict them
            shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
        kept_index = retention = None
        if settings is None:
            hidden = self.backbone.model(inputs_embeds=embeds, attention_mask=attention_mask,
                                         position_ids=position_ids).last_hidden_state
        else:
            result = lmme_prefill(self.backbone.model.language_model, embeds, position_ids, attention_mask,
                                  context_types(input_ids, self.config.tokens), settings, labels=labels)
            hidden, shifted = result.hidden_states, result.shifted_labels
            kept_index, retention = result.kept_index, result.retention
        output = LyraOutput(kept_index=kept_index, retention=retention)
        if return_logits:
            output.logits = self.backbone.lm_head(hidden)
        if shifted is not None:
            rows = shifted != -100
            # Without logits to return, only the rows with a target go through the LM head:
            # with a 152K vocabulary that head is most of a small model's compute.
            logits = output.logits[rows] if return_logits else self.backbone.lm_head(hidden[rows])
            output.loss = nn.functional.cross_entropy(logits.float(), shifted[rows])
        if output.loss is not None:
            output.ce_loss = output.loss.detach()
            if tgt_units is not None:
                output.speech_generator_loss = self.speech_generator_loss(hidden, labels, tgt_units, kept_index)
                output.loss = output.loss + output.speech_generator_loss
            if transcript_ids and self.config.lcmr.weight > 0:
                output.lcmr_loss = self.lcmr(speech_features, transcript_ids, transcript_speech_index)
                output.loss = output.loss + self.config.lcmr.weight * output.lcmr_loss
        return output

    def speech_generator_loss(self, hidden: torch.Tensor, labels: torch.Tensor, tgt_units: torch.Tensor,
                              kept_index: torch.Tensor | None) -> torch.Tensor:
        """CTC loss of the speech generator on the hidden states `[B, L, d]` of the answer tokens."""
        if self.speech_generator is None:
            raise ValueError("the batch has tgt_units but the model has no speech generator "
                             "(set speech_generator.enabled, or train stage 4)")
        if kept_index is not None:
            raise ValueError("train the speech generator without LMME (it needs every answer state)")
        return self.speech_generator.loss(*gather_answer_states(hidden, labels), tgt_units)

    @torch.no_grad()
    def answer_states(self, input_ids: torch.LongTensor, labels: torch.LongTensor,
                      attention_mask: torch.Tensor | None = None, speech: list[torch.Tensor] | None = None,
                      sound: list[torch.Tensor] | None = None, **media: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states of the answer tokens (`labels != -100`), what the speech generator
        reads: `[B, A, d]` packed to the left, with a `[B, A]` mask of the real ones."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, position_ids, _ = self.prepare_inputs(input_ids, attention_mask, speech, sound, **media)
        hidden = self.backbone.model(inputs_embeds=embeds, attention_mask=attention_mask,
                                     position_ids=position_ids).last_hidden_state
        return gather_answer_states(hidden, labels)

    def lcmr(self, speech_features: list[torch.Tensor], transcript_ids: list[torch.Tensor],
             transcript_speech_index: torch.Tensor) -> torch.Tensor:
        """LCMR between the projected tokens of the transcribed speech inputs and the LLM's
        embeddings of their transcripts (soft-DTW; lyra.losses.lcmr)."""
        if transcript_speech_index is None or len(transcript_speech_index) != len(transcript_ids):
            raise ValueError("transcript_speech_index must give the speech input of every transcript")
        table = self.backbone.get_input_embeddings()
        speech_tokens = [speech_features[int(i)] for i in transcript_speech_index]
        transcripts = [table(ids.to(table.weight.device)) for ids in transcript_ids]
        return lcmr_loss(speech_tokens, transcripts, self.config.lcmr)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        speech: list[torch.Tensor] | None = None,
        sound: list[torch.Tensor] | None = None,
        lmme: LMMEConfig | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        streamer=None,
        progress: bool = False,
        **media: Any,
    ) -> torch.LongTensor:
        """Generate; returns only the new tokens `[B, new]` (pad after each sample's eos).

        Prompts must be left-padded. Without LMME this is the backbone's own `generate`;
        with LMME, a prefill that prunes and a decode loop over the pruned caches.
        `streamer` follows transformers' streamer protocol (`put` gets the prompt first,
        then each new token; `end` at the end).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generation needs left-padded prompts: use collate(..., padding_side='left')")
        settings = self.lmme_settings(lmme)
        sampling = {"do_sample": do_sample, "max_new_tokens": max_new_tokens}
        if do_sample:
            sampling.update(temperature=temperature, top_k=top_k, top_p=top_p)
        if settings is None:
            inputs_embeds, _ = self.embed_inputs(input_ids, speech, sound, progress)
            sequences = self.backbone.generate(
                input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                pad_token_id=self.config.tokens.pad, eos_token_id=self.config.stop_token_ids, streamer=streamer,
                **sampling, **media,
            )
            return sequences[:, input_ids.shape[1]:]
        embeds, position_ids, _ = self.prepare_inputs(input_ids, attention_mask, speech, sound, progress=progress,
                                                      **media)
        language_model = self.backbone.model.language_model
        cache = DynamicCache(config=self.backbone.config.text_config)
        types = context_types(input_ids, self.config.tokens)
        prefill = lmme_prefill(language_model, embeds, position_ids, attention_mask, types, settings, cache=cache)
        self.last_retention = prefill.retention
        logits = self.backbone.lm_head(prefill.hidden_states[:, -1])
        processors = sampling_processors(do_sample, temperature, top_k, top_p)
        return _decode_loop(self, logits, prefill.state, cache, input_ids, processors, max_new_tokens, do_sample,
                            streamer)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | Path, max_shard_size: str = "5GB",
                        state_dict: dict[str, torch.Tensor] | None = None, replace: bool = True,
                        tokenizer=None, dtype: torch.dtype | None = None) -> None:
        """Write `config.json`, safetensors shards and `adapters/<name>/`, never half-written:
        everything goes to a temp dir first, which then replaces `directory` (`replace`) or
        whose files are moved into the existing `directory` (a trainer's checkpoint folder).

        `state_dict`: weights to save instead of the live ones (e.g. gathered ZeRO-3 shards);
        `tokenizer`: saved alongside, so the folder is complete for `lyra.chat`;
        `dtype`: write every floating-point tensor in it (e.g. bf16 after bf16 training).
        """
        from huggingface_hub import save_torch_state_dict

        directory = Path(directory)
        parent = directory.parent if replace else directory
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=parent))
        try:
            with open(staging / CONFIG_FILE, "w") as f:
                json.dump({"model_type": MODEL_TYPE, "lyra": self.config.to_dict()}, f, indent=2)
            base = mlora.base_state_dict(self, state_dict)
            state = saveable({k: v for k, v in base.items() if k not in self.tied_keys()}, dtype)
            save_torch_state_dict(state, staging, max_shard_size=max_shard_size)
            for name in mlora.adapter_names(self):
                mlora.save_adapter(self, name, staging, state_dict, dtype)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
            (replace_directory if replace else move_into)(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> "LyraForConditionalGeneration":
        """Load a directory written by `save_pretrained` (safetensors only: no pickle)."""
        from accelerate import init_empty_weights

        config = read_checkpoint_config(directory)
        with init_empty_weights(include_buffers=False):
            model = cls(config)
        model.load_full_state_dict(read_weights(directory), source=str(directory))
        mlora.load_adapters(model, directory)
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device)

    def tied_keys(self) -> set[str]:
        """Keys that alias another parameter; saved once, under the input embedding's name."""
        return {"backbone.lm_head.weight"} if self.config.text.tie_word_embeddings else set()

    def load_full_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load every parameter (assigning tensors, so it works on meta-initialised modules);
        a checkpoint that lacks or adds keys is an error naming them."""
        check_state_dict(self.state_dict(), state, f"checkpoint {source}", "the model in its config.json",
                         ". Was it written by another model or a different Lyra version?", optional=self.tied_keys())
        self.load_state_dict(state, strict=False, assign=True)
        if self.config.text.tie_word_embeddings:
            self.backbone.lm_head.weight = self.backbone.get_input_embeddings().weight


def saveable(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """`state` as safetensors takes it: floating-point tensors in `dtype` (kept when None), each
    on a storage of its own (ZeRO-3 gathers views into one flat buffer, which safetensors refuses)."""
    def ready(tensor: torch.Tensor) -> torch.Tensor:
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        owns_storage = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        return tensor if owns_storage else tensor.clone()

    return {k: ready(v) for k, v in state.items()}


def checkpoint_tokenizer_source(directory: str | Path, config: LyraConfig) -> str | None:
    """What `load_tokenizer` should read for a checkpoint: its own copy, else the config's choice."""
    folder = Path(directory) / TOKENIZER_DIR
    return str(folder) if folder.is_dir() else config.tokenizer


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All safetensors weights of a checkpoint directory (one file or an index of shards)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing; the checkpoint is incomplete")
        state.update(load_file(str(directory / name)))
    return state


def read_checkpoint_config(directory: str | Path) -> LyraConfig:
    """The `LyraConfig` stored in a checkpoint directory, with a clear error otherwise."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    if not path.is_file():
        raise ValueError(f"{directory} is not a Lyra checkpoint: it has no {CONFIG_FILE}")
    with open(path) as f:
        data = json.load(f)
    if data.get("model_type") != MODEL_TYPE or "lyra" not in data:
        raise ValueError(
            f"{path} is not a Lyra checkpoint config (model_type={data.get('model_type')!r}). For official "
            f"Lyra releases run scripts/convert_reference_checkpoint.py; for a plain Qwen2-VL directory use "
            f"LyraForConditionalGeneration.from_qwen2vl"
        )
    return LyraConfig.from_dict(data["lyra"], source=str(path))


def copy_backbone_dims(hf: Qwen2VLConfig, config: LyraConfig) -> None:
    """Set `config`'s LLM and ViT dimensions and vision token ids to those of a Qwen2-VL config."""
    text, vision = hf.text_config, hf.vision_config
    config.text.vocab_size = text.vocab_size
    config.text.hidden_size = text.hidden_size
    config.text.intermediate_size = text.intermediate_size
    config.text.num_hidden_layers = text.num_hidden_layers
    config.text.num_attention_heads = text.num_attention_heads
    config.text.num_key_value_heads = text.num_key_value_heads
    config.text.rms_norm_eps = text.rms_norm_eps
    config.text.max_position_embeddings = text.max_position_embeddings
    config.text.rope_theta = text.rope_parameters["rope_theta"]
    config.text.mrope_section = list(text.rope_parameters["mrope_section"])
    config.text.tie_word_embeddings = bool(hf.tie_word_embeddings)
    config.vision.depth = vision.depth
    config.vision.embed_dim = vision.embed_dim
    config.vision.num_heads = vision.num_heads
    config.vision.mlp_ratio = vision.mlp_ratio
    config.vision.patch_size = vision.patch_size
    config.vision.spatial_merge_size = vision.spatial_merge_size
    config.vision.temporal_patch_size = vision.temporal_patch_size
    config.tokens.image = hf.image_token_id
    config.tokens.video = hf.video_token_id
    config.tokens.vision_start = hf.vision_start_token_id
    config.tokens.vision_end = hf.vision_end_token_id


def encoder_config_from_state(state: dict[str, torch.Tensor], source: str) -> AudioEncoderConfig:
    """Whisper encoder dims read off its weights (openai-whisper names); `source` names them in errors."""
    layers = [int(k.split(".")[1]) for k in state if k.startswith("blocks.")]
    if "conv1.weight" not in state or "positional_embedding" not in state or not layers:
        raise ValueError(f"{source}: not a Whisper encoder (no conv1.weight, positional_embedding or blocks.N.*)")
    conv1 = state["conv1.weight"]  # (n_state, n_mels, 3)
    n_ctx, n_state = state["positional_embedding"].shape
    if n_state % 64:
        raise ValueError(f"{source}: a Whisper encoder {n_state} wide does not split into 64-wide heads, as "
                         f"every released Whisper does")
    n_layer = 1 + max(layers)
    return AudioEncoderConfig(
        n_mels=conv1.shape[1],
        n_audio_ctx=n_ctx,
        n_audio_state=n_state,
        n_audio_head=n_state // 64,  # every released Whisper uses 64-wide heads
        n_audio_layer=n_layer,
        checkpoint=source,
    )


@dataclass
class LyraOutput(ModelOutput):
    """Model outputs; with LMME, `logits` rows are the kept tokens, at `kept_index`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None  # detached, for logging
    lcmr_loss: torch.Tensor | None = None
    speech_generator_loss: torch.Tensor | None = None
    kept_index: torch.Tensor | None = None
    retention: RetentionRecord | None = None


def gather_answer_states(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `hidden` `[B, L, d]` where `labels` `[B, L]` is set, packed to the left:
    `[B, A, d]` and the `[B, A]` mask of real rows."""
    answer = labels != -100
    width = int(answer.sum(1).max())
    states = hidden.new_zeros(hidden.shape[0], width, hidden.shape[-1])
    mask = torch.zeros(hidden.shape[0], width, dtype=torch.bool, device=hidden.device)
    for row in range(hidden.shape[0]):
        count = int(answer[row].sum())
        states[row, :count] = hidden[row, answer[row]]
        mask[row, :count] = True
    return states, mask


def _scatter(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, name: str) -> torch.Tensor:
    """Write `features` `[n, d]` into the rows of `embeds` where `mask` is set (in order)."""
    n_slots = int(mask.sum())
    if features.shape[0] != n_slots:
        raise ValueError(
            f"{name}: the inputs give {features.shape[0]} feature tokens but input_ids hold {n_slots} "
            f"{name} pad tokens; build inputs with LyraProcessor so the counts agree"
        )
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))


def sampling_processors(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None):
    """transformers' logits warpers for these sampling settings (none for greedy)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


def _decode_loop(model: LyraForConditionalGeneration, logits: torch.Tensor, state, cache, prompt: torch.Tensor,
                 processors, max_new_tokens: int, do_sample: bool, streamer=None) -> torch.LongTensor:
    """Greedy or sampled decoding over an LMME prefill; `[B, new]` with pad after eos."""
    tokens = model.config.tokens
    stop = torch.tensor(model.config.stop_token_ids, device=prompt.device)
    language_model = model.backbone.model.language_model
    batch = prompt.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    sequence = prompt
    new = []
    if streamer is not None:
        streamer.put(prompt)
    for step in range(max_new_tokens):
        scores = processors(sequence, logits.float())
        if do_sample:
            next_token = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
        else:
            next_token = scores.argmax(-1)
        next_token = torch.where(finished, torch.full_like(next_token, tokens.pad), next_token)
        new.append(next_token)
        if streamer is not None:
            streamer.put(next_token)
        sequence = torch.cat([sequence, next_token[:, None]], dim=1)
        finished |= torch.isin(next_token, stop)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        hidden = lmme_decode(language_model, language_model.embed_tokens(next_token[:, None]), state, cache)
        logits = model.backbone.lm_head(hidden[:, -1])
    if streamer is not None:
        streamer.end()
    return torch.stack(new, dim=1)
