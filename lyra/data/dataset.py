"""Training data: LLaVA-style conversation JSON -> tokenised samples with labels -> batches.

Record format (one JSON object per sample; a file is a JSON list or JSONL)::

    {"id": "...",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...],
     "image": "coco/1.jpg" | [...],       # <image> placeholders, in order
     "video": "clips/a.mp4" | [...],      # <video>; a file, a folder of frames, or a 4x4 frame grid image
     "speech": "Lyra_MM/7.mp3" | [...],   # <speech>
     "long_speech": "talks/x.mp3",        # also <speech>: one long recording, cut into 30 s clips
     "sound": "audiocaps/3.wav" | [...],  # <sound>
     "speech_asr": "what is this",        # transcript of the speech (LCMR); a list aligns with the files
     "tgt_unit": "<12><7><981>..."}       # speech-generator target units (stage 4)

These are the keys of the released Lyra-Data files, which load unchanged. As in the reference
trainer, `image` and `video` paths are relative to `image_root` (its `--image_folder`) and
`speech`, `long_speech` and `sound` paths to `audio_root` (its `--speech_folder`); both default to
`root`. A missing `.jpg` image is looked for as `.gif`, then `.png` (the reference does the same
for OCR-VQA). Roles are `human`/`gpt` (`user`/`assistant` are accepted too), alternating,
starting with `human` (after an optional `system` turn) and ending with `gpt`.

How the trainer uses it::

    processor = LyraProcessor(tokenizer, config, VisionLimits(...))
    dataset = LyraDataset("lyra_multimodal.json", processor, root="data/Lyra_SFT/multi_modality_speech",
                          image_root="data/Lyra_SFT/multi_modality_image", model_max_length=8192)
    sampler = ...  # may group by dataset.lengths / dataset.modalities (lyra.data.lengths)
    loader = DataLoader(dataset, batch_size=4, num_workers=4, collate_fn=LyraCollator.from_processor(processor))
    tracker = BadSampleTracker(max_fraction=0.05)
    for batch in tracker.track(loader):   # counts and logs skipped samples in the main process
        if batch["num_samples"] == 0:     # every sample of this batch was bad
            continue
        ...

Bad samples (missing or undecodable files, placeholder/file mismatches, bad roles, malformed
JSONL lines, samples whose media alone exceed `model_max_length`, ...) are never replaced by
other samples: `dataset[i]` logs a warning and returns a `SkippedSample`; the collator drops it
and lists it under `batch["skipped"]`; `BadSampleTracker` counts them (`tracker.skipped`,
`tracker.by_code`). This works across DataLoader worker processes because the information
travels inside the batch. `on_bad_sample="raise"` raises `BadSampleError` instead.

The parts live in their own modules: records and their checks (`lyra.data.records`), length
estimates for grouping (`lyra.data.lengths`) and batching (`lyra.data.collate`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lyra.data.audio import SAMPLE_RATE, AudioError, load_audio
from lyra.data.lengths import LengthEstimator, SampleInfo
from lyra.data.records import BadSampleError, ParsedRecord, RecordStore, SkippedSample, inspect_record
from lyra.data.vision import (
    IMAGE_SUFFIXES,
    VisionError,
    even_frame_count,
    fit_image,
    load_image,
    load_video_frames,
    split_frame_grid,
)
from lyra.processing import (
    IGNORE_INDEX,
    PLACEHOLDERS,
    EncodedTurn,
    LyraProcessor,
    ProcessedSample,
    assemble,
    mm_token_types,
)

logger = logging.getLogger("lyra.data")


@dataclass
class TrainingSample(ProcessedSample):
    """A `ProcessedSample` with labels plus what training needs besides the model inputs."""

    index: int = -1
    sample_id: str = ""
    modality: str = "text"
    transcripts: list[torch.Tensor | None] = field(default_factory=list)  # aligned with `speech`
    tgt_units: torch.Tensor | None = None
    dropped_turns: int = 0  # trailing turns dropped to fit model_max_length
    truncated_tokens: int = 0  # text tokens cut from the end to fit model_max_length


class LyraDataset(torch.utils.data.Dataset):
    """Lazily loaded training samples (see the module docstring).

    Args:
        data_path: a JSON list or JSONL file of records.
        processor: the `LyraProcessor` (tokenizer, model config, vision limits).
        root: base folder of relative paths; default the data file's folder.
        image_root: base of `image`/`video` paths (reference: `--image_folder`); default `root`.
        audio_root: base of `speech`/`long_speech`/`sound` paths (`--speech_folder`); default `root`.
        model_max_length: token budget per sample. Over it, whole trailing turns are dropped
            (the sample still ends with an answer); if the first exchange alone is too long its
            text tail is cut, never a multimodal block; if the media alone do not fit, the sample
            is bad (`over_length`). None: no limit.
        on_bad_sample: "skip" (log, count, return `SkippedSample`) or "raise".
        info_cache: optional JSON file that caches `sample_info()` between runs.
    """

    def __init__(
        self,
        data_path: str | Path,
        processor: LyraProcessor,
        root: str | Path | None = None,
        image_root: str | Path | None = None,
        audio_root: str | Path | None = None,
        model_max_length: int | None = None,
        on_bad_sample: str = "skip",
        info_cache: str | Path | None = None,
    ):
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}")
        if model_max_length is not None and model_max_length < 1:
            raise ValueError(f"model_max_length must be positive, got {model_max_length}")
        self.records = RecordStore(data_path)
        self.processor = processor
        self.root = Path(root) if root is not None else self.records.path.parent
        self.image_root = Path(image_root) if image_root is not None else self.root
        self.audio_root = Path(audio_root) if audio_root is not None else self.root
        self.model_max_length = model_max_length
        self.on_bad_sample = on_bad_sample
        self.info_cache = Path(info_cache) if info_cache is not None else None
        self.bad_sample_counts: Counter[str] = Counter()  # this process only; see BadSampleTracker
        self._info: dict[bool, list[SampleInfo]] = {}  # by probe_media
        self._lengths = LengthEstimator(self.records, processor, self.resolve, (self.image_root, self.audio_root),
                                        model_max_length, self.info_cache)
        tokens = processor.tokens
        self._media_ids = torch.tensor(
            [tokens.image, tokens.video, tokens.vision_start, tokens.vision_end, tokens.speech, tokens.sound]
        )

    def __len__(self) -> int:
        return len(self.records)

    # ------------------------------------------------------------------ items
    def __getitem__(self, index: int) -> TrainingSample | SkippedSample:
        try:
            return self.load(index)
        except Exception as error:  # every failure is a counted, logged bad sample
            bad = error if isinstance(error, BadSampleError) else BadSampleError(
                f"{type(error).__name__}: {error}", code="error"
            )
            bad.index = index
            if bad.sample_id is None:
                bad.sample_id = self._peek_id(index)
            self.bad_sample_counts[bad.code] += 1
            if self.on_bad_sample == "raise":
                if bad is error:
                    raise
                raise bad from error
            logger.warning(
                "skipping bad sample #%d (id %r, line %d of %s): [%s] %s",
                index, bad.sample_id, self.records.line(index), self.records.path.name, bad.code, bad,
                exc_info=bad is not error,
            )
            return SkippedSample(index, bad.sample_id or "", bad.code, str(bad))

    def load(self, index: int) -> TrainingSample:
        """Build sample `index`; raises `BadSampleError` instead of skipping."""
        parsed = self.parse(index)
        loaded = {kind: [self.load_media(kind, path) for path in parsed.media[kind]] for kind in PLACEHOLDERS}
        return self.build(index, parsed, loaded)

    def parse(self, index: int) -> ParsedRecord:
        record = self.records.get(index)
        parsed, problems = inspect_record(record)
        if problems:
            first = problems[0]
            sample_id = str(record.get("id", "")) if isinstance(record, dict) else ""
            raise BadSampleError(first.message, code=first.code, index=index, sample_id=sample_id)
        return parsed

    def root_of(self, kind: str) -> Path:
        """The folder that `kind` paths (image, video, speech, long_speech, sound) are relative to."""
        return self.image_root if kind in ("image", "video") else self.audio_root

    def resolve(self, kind: str, path: str) -> Path:
        """The file a record's path names; raises `BadSampleError("missing_file")`."""
        full = self.root_of(kind) / path
        if full.exists():
            return full
        if kind == "image" and full.suffix.lower() == ".jpg":
            for suffix in (".gif", ".png"):  # as the reference trainer does
                if full.with_suffix(suffix).exists():
                    return full.with_suffix(suffix)
        raise BadSampleError(f"{kind} file not found: {full}", code="missing_file")

    def load_media(self, kind: str, path: str) -> Any:
        """Decode one file: a PIL image, a list of video frames, or 16 kHz mono samples."""
        full = self.resolve(kind, path)
        try:
            if kind == "image":
                return fit_image(load_image(full))
            if kind == "video":
                return self._load_video(full)
            samples = load_audio(full)
        except BadSampleError:
            raise
        except FileNotFoundError as error:
            raise BadSampleError(str(error), code="missing_file") from None
        except AudioError as error:
            code = "empty_audio" if "is empty" in str(error) else "corrupt_audio"
            raise BadSampleError(str(error), code=code) from None
        except Exception as error:
            code = {"image": "corrupt_image", "video": "corrupt_video"}.get(kind, "corrupt_audio")
            raise BadSampleError(f"{full}: {error}", code=code) from None
        config = self.processor.config
        limit = config.speech.max_seconds if kind == "speech" else config.sound.max_seconds
        seconds = samples.shape[0] / SAMPLE_RATE
        if seconds > limit:
            raise BadSampleError(
                f"{full}: {kind} is {seconds:.1f} s long, over the model's limit of {limit:.0f} s", code="audio_too_long"
            )
        return samples

    def _load_video(self, path: Path) -> list[Image.Image]:
        vision = self.processor.vision
        if path.is_dir():  # a folder of frames, in name order
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise VisionError(f"video folder {path} holds no image frames")
            count = even_frame_count(len(files), vision.limits.video_max_frames, vision.temporal_patch_size)
            picks = np.linspace(0, len(files) - 1, count).round().astype(int)
            return [load_image(files[i]) for i in picks]
        if path.suffix.lower() in IMAGE_SUFFIXES:  # a 4x4 grid of frames in one image
            return split_frame_grid(load_image(path))
        return load_video_frames(path, vision.limits, vision.temporal_patch_size)

    def build(self, index: int, parsed: ParsedRecord, loaded: dict[str, list[Any]]) -> TrainingSample:
        """Tokenise a parsed record with its decoded media, fitting it to `model_max_length`."""
        processor = self.processor
        try:
            media = processor.process_media(loaded["image"], loaded["video"], loaded["speech"], loaded["sound"])
        except Exception as error:
            raise BadSampleError(f"cannot preprocess the media: {error}", code="bad_media") from None
        turns = processor.encode_turns(parsed.messages, media.runs)
        turns, dropped, cut_to = self._fit(turns)
        tokens = processor.tokens
        sample = TrainingSample(
            input_ids=torch.empty(0, dtype=torch.long),
            mm_token_type_ids=torch.empty(0),
            index=index,
            sample_id=parsed.sample_id,
            modality=parsed.modality,
            dropped_turns=dropped,
        )
        assemble(turns, media, tokens.image, tokens.video, sample=sample)
        if cut_to is not None:
            sample.truncated_tokens = sample.input_ids.shape[0] - cut_to
            sample.input_ids = sample.input_ids[:cut_to]
            sample.labels = sample.labels[:cut_to]
            sample.mm_token_type_ids = mm_token_types(sample.input_ids, tokens.image, tokens.video)
        if not bool((sample.labels != IGNORE_INDEX).any()):
            raise BadSampleError(
                f"no answer token is left after truncation to model_max_length={self.model_max_length}", code="no_answer"
            )
        tokenizer = processor.tokenizer
        for text in parsed.transcripts[: len(sample.speech)]:
            ids = tokenizer.encode(text, add_special_tokens=False) if text and text.strip() else []
            sample.transcripts.append(torch.tensor(ids, dtype=torch.long) if ids else None)
        if parsed.tgt_units is not None:
            sample.tgt_units = torch.tensor(parsed.tgt_units, dtype=torch.long)
        if dropped or cut_to is not None:
            logger.debug("sample #%d (%s): dropped %d trailing turn(s), cut %d token(s) to fit %d",
                         index, parsed.sample_id, dropped, sample.truncated_tokens, self.model_max_length)
        return sample

    def _fit(self, turns: list[EncodedTurn]) -> tuple[list[EncodedTurn], int, int | None]:
        """Fit turns to the budget: (kept turns, dropped turn count, length to cut to or None)."""
        limit = self.model_max_length
        total = sum(len(t.input_ids) for t in turns)
        if limit is None or total <= limit:
            return turns, 0, None
        length, best = 0, None
        for k, turn in enumerate(turns):  # the longest prefix that fits and ends with an answer
            length += len(turn.input_ids)
            if length > limit:
                break
            if turn.role == "assistant":
                best = k
        if best is not None:
            return turns[: best + 1], len(turns) - best - 1, None
        first = next(k for k, t in enumerate(turns) if t.role == "assistant")
        kept = turns[: first + 1]
        ids = torch.tensor([i for t in kept for i in t.input_ids])
        media_positions = torch.isin(ids, self._media_ids).nonzero()
        media_end = int(media_positions[-1]) + 1 if media_positions.numel() else 0
        if media_end > limit:
            media_tokens = int(media_positions.numel())
            raise BadSampleError(
                f"the first exchange needs {media_end} tokens up to the end of its last media block "
                f"({media_tokens} media tokens), over model_max_length={limit}; shorten the media or raise the limit",
                code="over_length",
            )
        return kept, len(turns) - first - 1, limit

    def _peek_id(self, index: int) -> str:
        try:
            record = self.records.get(index)
            return str(record.get("id", "")) if isinstance(record, dict) else ""
        except Exception:
            return ""

    # ------------------------------------------------------------------ grouping info
    @property
    def lengths(self) -> list[int]:
        """Estimated tokens per sample (capped at model_max_length); nothing is decoded."""
        return [info.length for info in self.sample_info()]

    @property
    def modalities(self) -> list[str]:
        """Per sample: "text", or the media kinds joined by "+" (e.g. "image+speech", "long_speech")."""
        return [info.modality for info in self.sample_info()]

    def sample_info(self, workers: int = 8, probe_media: bool = True) -> list[SampleInfo]:
        """Estimated length and modality of every sample (`lyra.data.lengths`), computed once per
        process and cached to `info_cache`. With `probe_media=False` no file is opened and fixed
        per-kind media estimates are used. Unreadable records get length 0 and modality "invalid"."""
        if probe_media not in self._info:
            self._info[probe_media] = self._lengths.estimate(probe_media, workers)
        return self._info[probe_media]
