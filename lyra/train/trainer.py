"""`LyraTrainer`: transformers' Trainer with what Lyra's stages need and nothing more.

- the loss is the model's (CE + lambda * LCMR); CE and LCMR are logged separately;
- batches from `LyraCollator` carry bookkeeping (skipped bad samples, ids) that is
  counted by a `BadSampleTracker` and never reaches the model;
- projectors may have their own learning rate;
- modality- and length-grouped batches;
- with `route_adapters` (a frozen LLM that has MLoRA adapters, e.g. stage 4), each batch runs with
  the adapter inference would choose for it, so what trains sees the hidden states it will see;
- with `answer_states` (stage 4, everything but the speech generator frozen), each sample's
  answer states are computed once and reused (lyra/train/answer_states.py);
- light checkpoints (lyra/train/checkpoint.py): `checkpoint-N/` holds what trains, the optimiser,
  scheduler and RNG state and a record of the frozen base, and is marked complete only once
  every file of it is written; resuming loads it over the same base, rebuilt.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import SCHEDULER_NAME

from lyra.data.collate import BadSampleTracker
from lyra.model import mlora
from lyra.model.lyra import PREPARE_INPUT_KEYS
from lyra.train.answer_states import AnswerStateCache
from lyra.train.checkpoint import BaseRecord, gather_trainable_state, load_trainable_state, write_trainable_state

COMPLETE_MARKER = ".complete"
# What the model's forward takes: the LLM's inputs plus the targets of each loss.
MODEL_INPUT_KEYS = (*PREPARE_INPUT_KEYS, "labels", "transcript_ids", "transcript_speech_index", "tgt_units")


class ModalityLengthGroupedSampler(torch.utils.data.Sampler):
    """Groups of `group` samples of one modality and similar length, in a seeded order per epoch.

    A group is one optimiser step across all ranks (per-device batch x ranks x accumulation),
    so every rank runs the same modules in every step — which distributed gradient reduction
    needs (ZeRO reduces gradients in the order backward produces them). A modality's last
    group is filled up with repeats of its own samples, as DistributedSampler pads.
    """

    def __init__(self, lengths: list[int], modalities: list[str], group: int, seed: int):
        self.lengths, self.modalities, self.group, self.seed = lengths, modalities, group, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _groups(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        groups = []
        for modality in sorted(set(self.modalities)):
            members = [i for i, m in enumerate(self.modalities) if m == modality]
            order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            order += order[: (-len(order)) % self.group]  # fill the last group
            while len(order) % self.group:  # fewer samples than one group
                order += order[: self.group - len(order) % self.group]
            chunk = 50 * self.group  # sort by length within chunks: little padding, still shuffled
            for start in range(0, len(order), chunk):
                ranked = sorted(order[start:start + chunk], key=lambda i: -self.lengths[i])
                groups += [ranked[i:i + self.group] for i in range(0, len(ranked), self.group)]
        return [groups[g] for g in torch.randperm(len(groups), generator=generator).tolist()]

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups())

    def __iter__(self):
        for group in self._groups():
            yield from group


class LyraTrainer(Trainer):
    def __init__(self, *args, base: BaseRecord, tokenizer=None, projector_lr: float | None = None,
                 tracker: BadSampleTracker | None = None, group_by_modality_length: bool = False,
                 route_adapters: bool = False, answer_states: AnswerStateCache | None = None, **kwargs):
        """`base`: the record of the frozen base the model was built from (`lyra.train.recipe`
        makes it), written into every checkpoint and checked on resume."""
        super().__init__(*args, **kwargs)
        self.base = base
        self.route_adapters = route_adapters
        self.answer_states = answer_states
        self.tokenizer_to_save = tokenizer  # not `processing_class`: the Trainer would edit the model config
        self.projector_lr = projector_lr
        self.tracker = tracker or BadSampleTracker()
        self.group_by_modality_length = group_by_modality_length
        self._sums = {"ce_loss": 0.0, "lcmr_loss": 0.0, "speech_generator_loss": 0.0}
        self._counts = {key: 0 for key in self._sums}

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        self.tracker.update(inputs)
        if not inputs.get("num_samples", 1):  # every sample of the batch was bad: a zero step
            zero = _zero_loss(model)
            return (zero, None) if return_outputs else zero
        self.route(inputs)
        if self.answer_states is not None:
            loss = self.model.speech_generator.loss(*self.answer_states.batch_states(self.model, inputs),
                                                    inputs["tgt_units"])
            self._sums["speech_generator_loss"] += float(loss.detach())
            self._counts["speech_generator_loss"] += 1
            return (loss, None) if return_outputs else loss
        outputs = model(**model_inputs(inputs), return_logits=False)
        # Every trainable parameter gets a gradient on every rank and step, also those off this
        # batch's path (text in stage 1): DDP then needs no unused-parameter search, which would
        # mark such a parameter ready twice. ZeRO-3 partitions parameters outside the forward
        # and fills missing gradients itself.
        if not is_deepspeed_zero3_enabled():
            outputs.loss = outputs.loss + _zero_loss(model)
        elif not outputs.loss.requires_grad:
            raise RuntimeError(f"batch {inputs.get('sample_ids')} has nothing trainable on its path, which ZeRO-3 "
                               "cannot step on; leave such samples out of this stage's data or use ZeRO-2")
        for key in self._sums:
            value = getattr(outputs, key, None)
            if value is not None:
                self._sums[key] += float(value.detach())
                self._counts[key] += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def route(self, inputs: dict[str, Any]) -> None:
        """With `route_adapters`: switch to the adapter inference would use for this batch."""
        if self.route_adapters:
            samples = [waveform.shape[-1] for waveform in inputs.get("speech") or []]
            mlora.use_adapter(self.model, mlora.adapter_for_audio(self.model, samples))

    def prepare_answer_states(self) -> None:
        """Fill the answer-state cache with one pass over the training data, then start the speech
        generator's input norm from all of them (unless a resumed checkpoint already set it)."""
        # one modality per batch, so that each runs with the adapter inference would use
        loader = torch.utils.data.DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                                             sampler=self._grouped_sampler(self.train_dataset, 1),
                                             collate_fn=self.data_collator)
        batches = tqdm(loader, desc="answer states (computed once)", unit="batch",
                       disable=not self.args.should_save)
        with self.accelerator.autocast():  # as the training forward runs (frozen weights are bf16 in bf16)
            self.answer_states.fill(self.model, batches, self.route)
        norm = self.model.speech_generator.input_norm
        if norm is not None and not bool(norm.initialized):
            norm.initialize(self.answer_states.all_states())
        self.train_dataset = self.answer_states.dataset()  # from now on, batches of cached states
        self.data_collator = self.answer_states.collate

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key in self._sums:
            if self._counts[key]:
                logs[key] = round(self._sums[key] / self._counts[key], 6)
                self._sums[key], self._counts[key] = 0.0, 0
        if "loss" in logs:
            logs["bad_samples"] = self.tracker.skipped
        super().log(logs, start_time)

    # ------------------------------------------------------------------ optimiser
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault((name in decay, "_projector." in name), []).append(parameter)
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        param_groups = []
        for (decays, projector), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if projector and self.projector_lr is not None:
                group["lr"] = self.projector_lr
            param_groups.append(group)
        self.optimizer = optimizer_cls(param_groups, **kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ data
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        # With cached answer states every step runs the speech generator alone, so batches may mix
        # modalities; groups of one modality and length would hold the same few answers (a
        # small model's stage 4: 19 % phoneme error after 336 steps, 2 % with shuffled batches).
        if self.answer_states is not None or not self.group_by_modality_length or not hasattr(dataset, "sample_info"):
            return super()._get_train_sampler(train_dataset)
        return self._grouped_sampler(dataset, self.args.world_size * self.args.gradient_accumulation_steps)

    def _grouped_sampler(self, dataset, steps_per_group: int) -> ModalityLengthGroupedSampler:
        info = dataset.sample_info()
        return ModalityLengthGroupedSampler([i.length for i in info], [i.modality for i in info],
                                            self.args.per_device_train_batch_size * steps_per_group, self.args.seed)

    # ------------------------------------------------------------------ checkpoints
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A checkpoint (`_internal_call`) is light: the trainable state and the base record only
        (all ranks take part: under ZeRO-3 the trainable shards are gathered). Otherwise the whole
        model in the inference layout."""
        if not _internal_call:
            return super().save_model(output_dir, _internal_call)
        state = gather_trainable_state(self.model, zero3=is_deepspeed_zero3_enabled())
        if self.args.should_save:
            write_trainable_state(Path(output_dir or self.args.output_dir), state, self.base)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self.model.save_pretrained(output_dir, state_dict=state_dict, replace=False,
                                       tokenizer=self.tokenizer_to_save)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # DeepSpeed's own checkpoint holds the optimiser (and the fp32 master weights); without
        # the frozen parameters, which ZeRO-2 would otherwise copy in whole.
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            (folder / COMPLETE_MARKER).write_text(f"{self.state.global_step}\n")

    def check_checkpoint_base(self, checkpoint: str | Path) -> None:
        """Raise unless `checkpoint` was trained on the base this trainer's model was built from."""
        BaseRecord.read(Path(checkpoint)).check_matches(self.base, Path(checkpoint))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.check_checkpoint_base(resume_from_checkpoint)
        load_trainable_state(model or self.model, Path(resume_from_checkpoint))

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        if not (resume_from_checkpoint and self.is_deepspeed_enabled):
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        # DeepSpeed restores the trainable weights from its own checkpoint, strictly; the frozen
        # ones are in it no more, as they come from the rebuilt base.
        self.check_checkpoint_base(resume_from_checkpoint)
        hook = self.model.register_load_state_dict_post_hook(_frozen_parameters_come_from_the_base)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            hook.remove()


def _frozen_parameters_come_from_the_base(module: torch.nn.Module, incompatible) -> None:
    """A `load_state_dict` post hook: frozen parameters missing from a light checkpoint are fine."""
    frozen = {name for name, parameter in module.named_parameters() if not parameter.requires_grad}
    incompatible.missing_keys[:] = [key for key in incompatible.missing_keys if key not in frozen]


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a collated batch that the model's forward takes (no bookkeeping)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}


def _zero_loss(model) -> torch.Tensor:
    """A zero that depends on every trainable parameter, so every rank's backward matches.
    Not under ZeRO-3, whose parameters are empty shards outside the forward: there a batch with
    nothing trainable on its path (text in stage 1) cannot go backward."""
    return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` that was fully written (an interrupted save is ignored)."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return max(folders, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def trainable_table(model: torch.nn.Module) -> str:
    """Trainable / total parameters per component, as a markdown table."""
    components = {
        "vit": "backbone.model.visual.", "llm": "backbone.model.language_model.", "lm_head": "backbone.lm_head.",
        "speech_encoder": "speech_encoder.", "sound_encoder": "sound_encoder.",
        "speech_projector": "speech_projector.", "sound_projector": "sound_projector.",
        "speech_generator": "speech_generator.",
    }
    rows = {name: [0, 0] for name in components}
    rows["lora"] = [0, 0]
    seen = set()
    for name, parameter in model.named_parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        key = "lora" if ".lora_" in name else next((c for c, p in components.items() if name.startswith(p)), None)
        if key is None:
            raise ValueError(f"parameter {name} belongs to no known component")
        rows[key][1] += parameter.numel()
        rows[key][0] += parameter.numel() if parameter.requires_grad else 0
    lines = ["| component | trainable | total |", "|---|---|---|"]
    for name, (trainable, total) in rows.items():
        if total:
            lines.append(f"| {name} | {trainable:,} | {total:,} |")
    trainable = sum(r[0] for r in rows.values())
    total = sum(r[1] for r in rows.values())
    lines.append(f"| **all** | {trainable:,} ({100 * trainable / max(1, total):.2f} %) | {total:,} |")
    return "\n".join(lines)


def single_process_distributed_env() -> None:
    """DeepSpeed in a plain `python` process needs a rendezvous; without these it falls
    back to MPI discovery and fails. The launcher (`deepspeed ...`) sets them itself."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
