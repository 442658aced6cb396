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
    sampler = ...  # may group by dataset.lengths / dataset.modalities (estimated, nothing decoded)
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
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from lyra.data.audio import SAMPLE_RATE, AudioError, load_audio
from lyra.data.vision import VisionError, load_image, load_video_frames, sample_frame_indices
from lyra.model.speech import num_clips
from lyra.processing import (
    IGNORE_INDEX,
    PLACEHOLDERS,
    PLACEHOLDER_PATTERN,
    EncodedTurn,
    LyraProcessor,
    ProcessedSample,
    assemble,
    collate,
    mm_token_types,
)
from lyra.utils.io import atomic_write_text

logger = logging.getLogger("lyra.data")

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MEDIA_KEYS = ("image", "video", "speech", "long_speech", "sound")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
UNIT_PATTERN = re.compile(r"^\s*(?:<\d+>\s*)+$")

BAD_SAMPLE_CODES: dict[str, str] = {
    "malformed_json": "the record is not valid JSON (fix the line and column given)",
    "bad_schema": "a field is missing or has the wrong type",
    "bad_roles": "turns must alternate human/gpt, start with human (after an optional system turn) and end with gpt",
    "placeholder_mismatch": "the <image>/<video>/<speech>/<sound> placeholders do not match the files",
    "missing_file": "a media file does not exist under the data root",
    "corrupt_image": "an image cannot be decoded",
    "corrupt_video": "a video cannot be decoded",
    "corrupt_audio": "an audio file cannot be decoded",
    "empty_audio": "an audio file holds no samples",
    "audio_too_long": "an audio file is longer than the model's limit (speech/sound.max_seconds)",
    "bad_media": "a decoded file cannot be preprocessed (e.g. an extreme aspect ratio)",
    "over_length": "the multimodal content alone exceeds model_max_length",
    "no_answer": "no answer token is left after truncation to model_max_length",
    "error": "an unexpected error (see the logged traceback)",
}
"""Codes of `BadSampleError`, with what each means."""


class BadSampleError(ValueError):
    """A sample that cannot be used. `code` is a key of `BAD_SAMPLE_CODES`."""

    def __init__(self, message: str, code: str = "error", index: int | None = None, sample_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.index = index
        self.sample_id = sample_id

    def __reduce__(self):  # keep code/index/id when raised inside a DataLoader worker
        return (BadSampleError, (str(self), self.code, self.index, self.sample_id))


class DataFileError(ValueError):
    """The data file itself cannot be read (e.g. a JSON list with a syntax error)."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None):
        super().__init__(message)
        self.line = line
        self.column = column


@dataclass
class SkippedSample:
    """What `LyraDataset.__getitem__` returns for a bad sample (in "skip" mode)."""

    index: int
    sample_id: str
    code: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.sample_id, "code": self.code, "reason": self.reason}


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


# ----------------------------------------------------------------------------- records
class RecordStore:
    """The records of a JSON-list or JSONL file, kept as raw text and parsed on demand.

    A JSON list is scanned once (element by element, so a syntax error is reported with its
    line and column); each element's text is kept in one compact byte buffer. A JSONL file
    is indexed by line offsets and read from disk when a record is asked for; a malformed
    line becomes a bad sample (`malformed_json`, with line and column) when it is read.
    """

    _WHITESPACE = re.compile(r"[ \t\n\r]*")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file not found: {self.path}")
        self._blob: bytes | None = None
        self._handle = None
        self._handle_pid = -1
        with open(self.path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if self.path.suffix.lower() != ".jsonl" and head.startswith(b"["):
            self._scan_json_list()
        else:
            self._index_jsonl()

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def is_jsonl(self) -> bool:
        return self._blob is None

    def line(self, index: int) -> int:
        """1-based line of the file where record `index` starts."""
        return int(self._lines[index])

    def raw(self, index: int) -> bytes:
        start, end = int(self._starts[index]), int(self._ends[index])
        if self._blob is not None:
            return self._blob[start:end]
        if self._handle is None or self._handle_pid != os.getpid():  # one handle per worker process
            self._handle = open(self.path, "rb")
            self._handle_pid = os.getpid()
        self._handle.seek(start)
        return self._handle.read(end - start)

    def get(self, index: int) -> Any:
        """The parsed record; `BadSampleError("malformed_json")` for a bad JSONL line."""
        text = self.raw(index).decode("utf-8", errors="replace")
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise BadSampleError(
                f"{self.path.name} line {self.line(index) + error.lineno - 1}, column {error.colno}: {error.msg}",
                code="malformed_json",
                index=index,
            ) from None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"], state["_handle_pid"] = None, -1
        return state

    def _scan_json_list(self) -> None:
        text = self.path.read_text(encoding="utf-8-sig")
        decoder = json.JSONDecoder()
        skip = self._WHITESPACE
        spans: list[tuple[int, int]] = []
        lines: list[int] = []
        line, counted_to = 1, 0
        try:
            pos = skip.match(text, 0).end()
            if text[pos : pos + 1] != "[":
                raise json.JSONDecodeError("Expecting '['", text, pos)
            pos = skip.match(text, pos + 1).end()
            if text[pos : pos + 1] == "]":
                end = pos + 1
            else:
                while True:
                    _, end = decoder.raw_decode(text, pos)
                    line += text.count("\n", counted_to, pos)
                    counted_to = pos
                    spans.append((pos, end))
                    lines.append(line)
                    pos = skip.match(text, end).end()
                    if text[pos : pos + 1] == ",":
                        pos = skip.match(text, pos + 1).end()
                        continue
                    if text[pos : pos + 1] == "]":
                        end = pos + 1
                        break
                    raise json.JSONDecodeError("Expecting ',' delimiter or ']'", text, pos)
            rest = skip.match(text, end).end()
            if rest != len(text):
                raise json.JSONDecodeError("Extra data after the list", text, rest)
        except json.JSONDecodeError as error:
            raise DataFileError(
                f"{self.path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}",
                line=error.lineno,
                column=error.colno,
            ) from None
        parts = [text[a:b].encode("utf-8") for a, b in spans]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        self._starts, self._ends = offsets[:-1], offsets[1:]
        self._blob = b"".join(parts)
        self._lines = np.asarray(lines, dtype=np.int64)

    def _index_jsonl(self) -> None:
        starts: list[int] = []
        ends: list[int] = []
        lines: list[int] = []
        offset = 0
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    starts.append(offset)
                    ends.append(offset + len(raw))
                    lines.append(number)
                offset += len(raw)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._ends = np.asarray(ends, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)


# ----------------------------------------------------------------------------- parsing
@dataclass
class ParsedRecord:
    """A record checked for structure, with its messages in chat-template form."""

    sample_id: str
    messages: list[dict[str, str]]
    media: dict[str, list[str]]  # image, video, speech (incl. long_speech), sound -> paths as written
    long_speech: bool = False
    transcripts: list[str | None] = field(default_factory=list)  # aligned with media["speech"]
    tgt_units: list[int] | None = None

    @property
    def modality(self) -> str:
        kinds = [k for k in PLACEHOLDERS if self.media[k]]
        if self.long_speech:
            kinds = ["long_speech" if k == "speech" else k for k in kinds]
        return "+".join(kinds) or "text"


@dataclass
class Problem:
    code: str
    message: str
    path: str | None = None


def _as_path_list(value: Any, key: str, problems: list[Problem]) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in items):
        problems.append(Problem("bad_schema", f"'{key}' must be a path or a list of paths, got {value!r:.80}"))
        return []
    return list(items)


def inspect_record(record: Any) -> tuple[ParsedRecord | None, list[Problem]]:
    """Check a record's structure (no file access). Returns the parsed record (None when unusable)
    and every problem found."""
    problems: list[Problem] = []
    if not isinstance(record, dict):
        return None, [Problem("bad_schema", f"a record must be a JSON object, got {type(record).__name__}")]
    sample_id = str(record.get("id", ""))
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return None, [Problem("bad_schema", "'conversations' must be a non-empty list of turns")]

    messages: list[dict[str, str]] = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            problems.append(Problem("bad_schema", f"turn {k} is not an object"))
            continue
        role, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            problems.append(Problem("bad_schema", f"turn {k} has no string 'value'"))
            continue
        if role not in ROLES:
            problems.append(Problem("bad_roles", f"turn {k} has role {role!r}; use 'human' or 'gpt'"))
            continue
        messages.append({"role": ROLES[role], "content": value})
    if problems:
        return None, problems

    body = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"]
    order = [m["role"] for m in body]
    if not body or any(role != expected[k % 2] for k, role in enumerate(order)) or order[-1] != "assistant":
        shown = " ".join({"user": "human", "assistant": "gpt"}.get(r, r) for r in (m["role"] for m in messages))
        problems.append(
            Problem("bad_roles", f"roles are [{shown}]; they must alternate human/gpt, start with human, end with gpt")
        )

    media = {kind: [] for kind in PLACEHOLDERS}
    for key in ("image", "video", "sound"):
        media[key] = _as_path_list(record.get(key), key, problems)
    speech = _as_path_list(record.get("speech"), "speech", problems)
    long_speech = _as_path_list(record.get("long_speech"), "long_speech", problems)
    if speech and long_speech:
        problems.append(Problem("bad_schema", "a sample has both 'speech' and 'long_speech'; keep one"))
    media["speech"] = speech or long_speech

    found = Counter(PLACEHOLDER_PATTERN.findall("".join(m["content"] for m in messages)))
    mismatches = [
        f"{found[k]} <{k}> placeholder(s) but {len(media[k])} {'long_speech' if k == 'speech' and long_speech else k} file(s)"
        for k in PLACEHOLDERS
        if found[k] != len(media[k])
    ]
    if mismatches:
        problems.append(Problem("placeholder_mismatch", "; ".join(mismatches)))
    for k, message in enumerate(messages):
        if message["role"] == "assistant" and PLACEHOLDER_PATTERN.search(message["content"]):
            problems.append(Problem("placeholder_mismatch", f"turn {k} (gpt) holds a media placeholder"))

    transcripts: list[str | None] = [None] * len(media["speech"])
    asr = record.get("speech_asr")
    if asr is not None and media["speech"]:
        if isinstance(asr, str):
            if len(media["speech"]) == 1:
                transcripts = [asr]
            else:
                problems.append(
                    Problem("bad_schema", f"'speech_asr' is one string but there are {len(media['speech'])} speech files; give a list")
                )
        elif isinstance(asr, list) and len(asr) == len(media["speech"]) and all(
            a is None or isinstance(a, str) for a in asr
        ):
            transcripts = list(asr)
        else:
            problems.append(Problem("bad_schema", "'speech_asr' must be a string or a list of strings, one per speech file"))

    units = record.get("tgt_unit")
    tgt_units = None
    if units is not None:
        if isinstance(units, str) and UNIT_PATTERN.match(units):
            tgt_units = [int(u) for u in re.findall(r"<(\d+)>", units)]
        elif isinstance(units, list) and units and all(isinstance(u, int) for u in units):
            tgt_units = list(units)
        else:
            problems.append(Problem("bad_schema", f"'tgt_unit' must look like '<12><7>...', got {str(units)[:40]!r}"))

    parsed = ParsedRecord(sample_id, messages, media, bool(long_speech), transcripts, tgt_units)
    return parsed, problems


# ----------------------------------------------------------------------------- dataset
@dataclass
class SampleInfo:
    """Cheap per-sample facts for samplers: an estimated token count and the modality."""

    length: int
    modality: str


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

    def resolve(self, kind: str, path: str) -> Path:
        """The file a record's path names; raises `BadSampleError("missing_file")`."""
        base = self.image_root if kind in ("image", "video") else self.audio_root
        full = base / path
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
            count = _even_frame_count(len(files), vision.limits.video_max_frames, vision.temporal_patch_size)
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
        """Estimated length and modality of every sample, computed once (and cached to `info_cache`).

        Text is counted with the tokenizer (batched) plus the chat template's overhead; media
        tokens come from metadata only: image sizes from the file header, audio durations from
        `soundfile.info`, video size/frame count/fps from the container. With
        `probe_media=False` no file is opened and fixed per-kind estimates are used.
        Unreadable records get length 0 and modality "invalid".
        """
        if probe_media in self._info:
            return self._info[probe_media]
        key = self._cache_key(probe_media)
        cached = self._read_info_cache(key)
        if cached is not None:
            self._info[probe_media] = cached
            return cached
        parsed: list[ParsedRecord | None] = []
        for i in range(len(self)):
            try:
                record, problems = inspect_record(self.records.get(i))
            except BadSampleError:
                record = None
            parsed.append(record)
        text_lengths = self._text_lengths(parsed)
        jobs = [(i, kind, path) for i, p in enumerate(parsed) if p for kind in PLACEHOLDERS for path in p.media[kind]]
        media_tokens = [0] * len(parsed)
        estimate = self._estimate_media_tokens if probe_media else self._default_media_tokens
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for (i, _, _), n in zip(jobs, pool.map(lambda job: estimate(job[1], job[2]), jobs)):
                media_tokens[i] += n
        info = []
        for p, text, media in zip(parsed, text_lengths, media_tokens):
            if p is None:
                info.append(SampleInfo(0, "invalid"))
                continue
            length = text + media
            if self.model_max_length is not None:
                length = min(length, self.model_max_length)
            info.append(SampleInfo(int(length), p.modality))
        self._info[probe_media] = info
        self._write_info_cache(key, info)
        return info

    def _text_lengths(self, parsed: list[ParsedRecord | None]) -> list[int]:
        tokenizer = self.processor.tokenizer
        render = self.processor.render
        empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
        base = len(tokenizer.encode(render(empty, False), add_special_tokens=False))
        per_pair = len(tokenizer.encode(render(empty * 2, False), add_special_tokens=False)) - base
        texts, owners = [], []
        for i, p in enumerate(parsed):
            for m in p.messages if p else []:
                texts.append(PLACEHOLDER_PATTERN.sub("", m["content"]))
                owners.append(i)
        lengths = [0] * len(parsed)
        for start in range(0, len(texts), 4096):
            batch = tokenizer(texts[start : start + 4096], add_special_tokens=False)["input_ids"]
            for owner, ids in zip(owners[start : start + 4096], batch):
                lengths[owner] += len(ids)
        for i, p in enumerate(parsed):
            if p:
                lengths[i] += base + per_pair * max(0, len(p.messages) // 2 - 1)
        return lengths

    def _default_media_tokens(self, kind: str, path: str) -> int:
        limits = self.processor.vision.limits
        if kind == "image":
            return limits.image_max_pixels // (28 * 28) // 2 + 2
        if kind == "video":
            return limits.video_total_pixels // (28 * 28) // 2 + 2
        return self.processor.config.audio_tokens_per_clip(kind)

    def _estimate_media_tokens(self, kind: str, path: str) -> int:
        try:
            full = self.resolve(kind, path)
            if kind == "image":
                with Image.open(full) as image:
                    width, height = image.size
                return self._image_tokens(height, width) + 2
            if kind == "video":
                return self._video_tokens(full) + 2
            import soundfile

            seconds = soundfile.info(str(full)).duration
            return num_clips(int(seconds * SAMPLE_RATE)) * self.processor.config.audio_tokens_per_clip(kind)
        except Exception:  # unreadable: validation reports it; here any estimate will do
            return self._default_media_tokens(kind, path)

    def _image_tokens(self, height: int, width: int) -> int:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        limits = self.processor.vision.limits
        height, width = max(height, 28), max(width, 28)
        h, w = smart_resize(height, width, factor=28, min_pixels=limits.image_min_pixels, max_pixels=limits.image_max_pixels)
        return (h // 28) * (w // 28)

    def _video_tokens(self, path: Path) -> int:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        vision = self.processor.vision
        limits, tp = vision.limits, vision.temporal_patch_size
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            count = _even_frame_count(len(files), limits.video_max_frames, tp)
            with Image.open(files[0]) as image:
                width, height = image.size
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                width, height = image.size[0] // 4, image.size[1] // 4
            count = 16
        else:
            import av

            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate or stream.guessed_rate or 25)
                frames = stream.frames or int(float(stream.duration * stream.time_base) * fps if stream.duration else 0)
                if not frames and container.duration:
                    frames = int(container.duration / 1_000_000 * fps)
                width, height = stream.codec_context.width, stream.codec_context.height
            count = len(sample_frame_indices(max(frames, 1), fps, limits, tp))
        budget = min(limits.video_max_pixels, limits.video_total_pixels / max(count, 1) * tp)
        max_pixels = max(budget, int(limits.video_min_pixels * 1.05))
        h, w = smart_resize(max(height, 28), max(width, 28), factor=28, min_pixels=limits.video_min_pixels,
                            max_pixels=max_pixels)
        return math.ceil(count / tp) * (h // 28) * (w // 28)

    def _cache_key(self, probe_media: bool) -> dict[str, Any]:
        stat = self.records.path.stat()
        limits = self.processor.vision.limits
        return {
            "data": str(self.records.path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime,
            "roots": [str(self.image_root), str(self.audio_root)], "max_length": self.model_max_length,
            "limits": [limits.image_min_pixels, limits.image_max_pixels, limits.video_max_pixels,
                       limits.video_total_pixels, limits.video_fps, limits.video_max_frames],
            "vocab": len(self.processor.tokenizer), "probe": probe_media,
        }

    def _read_info_cache(self, key: dict[str, Any]) -> list[SampleInfo] | None:
        if self.info_cache is None or not self.info_cache.is_file():
            return None
        try:
            data = json.loads(self.info_cache.read_text())
            if data.get("key") != key:
                return None
            return [SampleInfo(int(n), str(m)) for n, m in zip(data["lengths"], data["modalities"])]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_info_cache(self, key: dict[str, Any], info: list[SampleInfo]) -> None:
        if self.info_cache is None:
            return
        payload = {"key": key, "lengths": [i.length for i in info], "modalities": [i.modality for i in info]}
        atomic_write_text(self.info_cache, json.dumps(payload))


def _even_frame_count(available: int, maximum: int, temporal_patch: int) -> int:
    count = min(available, maximum)
    count -= count % temporal_patch
    return max(count, min(available, temporal_patch))


def fit_image(image: Image.Image) -> Image.Image:
    """Make degenerate images usable, as the reference trainer does: sides of at least 28 pixels
    and an aspect ratio of at most 200 (Qwen2-VL's resize refuses more)."""
    width, height = image.size
    if min(width, height) < 28:
        width, height = max(width, 28), max(height, 28)
        image = image.resize((width, height), Image.NEAREST)
    if width / height > 200:
        image = image.resize((height * 180, height), Image.NEAREST)
    elif height / width > 200:
        image = image.resize((width, width * 180), Image.NEAREST)
    return image


def split_frame_grid(image: Image.Image, rows: int = 4, cols: int = 4) -> list[Image.Image]:
    """Frames of a video stored as one grid image (rows x cols, row-major), after trimming a
    white margin -- the reference trainer's `.jpg` video format."""
    pixels = np.asarray(image.convert("RGB"))
    ink = pixels.astype(np.int32).sum(axis=-1) < 720  # anything not (almost) white
    ys, xs = np.any(ink, axis=1).nonzero()[0], np.any(ink, axis=0).nonzero()[0]
    if ys.size and xs.size:
        pixels = pixels[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    height, width = pixels.shape[0] // rows, pixels.shape[1] // cols
    if height < 1 or width < 1:
        raise VisionError(f"a frame-grid image of {pixels.shape[1]}x{pixels.shape[0]} is too small for {rows}x{cols} frames")
    return [
        Image.fromarray(pixels[r * height : (r + 1) * height, c * width : (c + 1) * width])
        for r in range(rows)
        for c in range(cols)
    ]


# ----------------------------------------------------------------------------- batching
class LyraCollator:
    """Pads `TrainingSample`s into a batch, dropping `SkippedSample`s (and `None`s).

    Batch keys (model inputs first, as `LyraForConditionalGeneration.forward` takes them):
        input_ids, attention_mask, labels: `[B, L]` (right padding by default; labels -100 on padding).
        pixel_values, image_grid_thw / pixel_values_videos, video_grid_thw, mm_token_type_ids:
            as `lyra.processing.collate` (only when the batch has images/videos).
        speech, sound: flat lists of 16 kHz waveforms in batch order (row, then placeholder).
        speech_sample_index: `LongTensor[len(speech)]`, the batch row of each speech waveform.
        transcript_ids: `list[LongTensor]`, the tokenised `speech_asr` of the speech inputs that
            have one, and transcript_speech_index: `LongTensor[len(transcript_ids)]`, the index
            into `speech` of each: transcript_ids[k] pairs with speech[transcript_speech_index[k]].
            For LCMR, the model encodes `speech` in order, waveform j giving
            `num_clips(len(speech[j])) * tokens_per_clip` rows of `encode_speech(speech)`, so the
            projected tokens of transcript k are that row range of waveform transcript_speech_index[k].
        tgt_units: `[B, U]` speech-generator units, -100 padded (rows without units all -100);
            only when a sample has `tgt_unit`.
        sample_ids (list[str]), sample_indices (`LongTensor[B]`), num_samples (int B),
        skipped (list of {"index", "id", "code", "reason"} for the dropped bad samples).
    When every sample was bad the batch is just {"num_samples": 0, "skipped": [...]}.
    """

    def __init__(self, pad_id: int, padding_side: str = "right"):
        self.pad_id = pad_id
        self.padding_side = padding_side

    @classmethod
    def from_processor(cls, processor: LyraProcessor, padding_side: str = "right") -> "LyraCollator":
        return cls(processor.tokens.pad, padding_side)

    def __call__(self, items: Iterable[TrainingSample | SkippedSample | None]) -> dict[str, Any]:
        items = list(items)
        samples = [s for s in items if isinstance(s, ProcessedSample)]
        skipped = [s.as_dict() for s in items if isinstance(s, SkippedSample)]
        skipped += [{"index": -1, "id": "", "code": "error", "reason": "the dataset returned None"}
                    for s in items if s is None]
        if not samples:
            return {"num_samples": 0, "skipped": skipped}
        batch = collate(samples, self.pad_id, self.padding_side)
        speech_rows = [row for row, s in enumerate(samples) for _ in s.speech]
        if speech_rows:
            batch["speech_sample_index"] = torch.tensor(speech_rows, dtype=torch.long)
        transcripts, paired = [], []
        position = 0
        for s in samples:
            for j in range(len(s.speech)):
                ids = getattr(s, "transcripts", [])[j] if j < len(getattr(s, "transcripts", [])) else None
                if ids is not None:
                    transcripts.append(ids)
                    paired.append(position + j)
            position += len(s.speech)
        if transcripts:
            batch["transcript_ids"] = transcripts
            batch["transcript_speech_index"] = torch.tensor(paired, dtype=torch.long)
        units = [getattr(s, "tgt_units", None) for s in samples]
        if any(u is not None for u in units):
            width = max(u.shape[0] for u in units if u is not None)
            padded = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
            for row, u in enumerate(units):
                if u is not None:
                    padded[row, : u.shape[0]] = u
            batch["tgt_units"] = padded
        batch["sample_ids"] = [getattr(s, "sample_id", "") for s in samples]
        batch["sample_indices"] = torch.tensor([getattr(s, "index", -1) for s in samples], dtype=torch.long)
        batch["num_samples"] = len(samples)
        batch["skipped"] = skipped
        return batch


class BadSampleTracker:
    """Counts the bad samples that collated batches report, in the trainer's process.

    Args:
        max_fraction: raise once more than this fraction of the samples seen were bad (after
            `min_samples`), to stop a run whose data is broken wholesale (a wrong root, say).
        min_samples: samples to see before `max_fraction` applies.
    """

    def __init__(self, max_fraction: float | None = None, min_samples: int = 200):
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.seen = 0  # good + bad
        self.skipped = 0
        self.by_code: Counter[str] = Counter()
        self.recent: list[dict[str, Any]] = []  # the last 100 skipped samples

    def update(self, batch: dict[str, Any]) -> int:
        """Count a batch's skipped samples (logging each); returns how many it had."""
        skipped = batch.get("skipped", [])
        self.seen += int(batch.get("num_samples", 0)) + len(skipped)
        for entry in skipped:
            self.skipped += 1
            self.by_code[entry["code"]] += 1
            logger.warning("bad sample skipped (#%s, id %r): [%s] %s (%d skipped so far)",
                           entry["index"], entry["id"], entry["code"], entry["reason"], self.skipped)
        self.recent = (self.recent + list(skipped))[-100:]
        if (
            self.max_fraction is not None
            and self.seen >= self.min_samples
            and self.skipped > self.max_fraction * self.seen
        ):
            raise RuntimeError(
                f"{self.skipped} of {self.seen} samples were bad (over max_fraction={self.max_fraction}): "
                f"{dict(self.by_code)}; run `python -m lyra.data.validate` on the data"
            )
        return len(skipped)

    def track(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Yield the batches of a DataLoader, counting each one's skipped samples."""
        for batch in batches:
            self.update(batch)
            yield batch

    def summary(self) -> str:
        codes = ", ".join(f"{code}: {n}" for code, n in self.by_code.most_common()) or "none"
        return f"{self.skipped} bad sample(s) skipped of {self.seen} ({codes})"

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": self.skipped, "by_code": dict(self.by_code)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.skipped = int(state["seen"]), int(state["skipped"])
        self.by_code = Counter(state["by_code"])


# ----------------------------------------------------------------------------- sample set
def make_sample_set(root: str | Path, num_samples: int = 32, seed: int = 0, long_speech_seconds: float = 65.0) -> Path:
    """Write a small data set covering every record kind under `root`; returns its JSON path.

    Media are synthetic (shapes, tones, noise) and small: a few hundred kB in all. The kinds
    cycle: text multi-turn, image, video, speech (16 kHz WAV with transcript), speech (44.1 kHz
    stereo FLAC), sound (8 kHz WAV), image+speech multi-turn, long speech. Used by the tests
    and `scripts/bench_dataloader.py`.
    """
    import av

    root = Path(root)
    rng = np.random.default_rng(seed)
    for sub in ("images", "videos", "audio"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def tone(seconds: float, rate: int, freq: float, channels: int = 1) -> np.ndarray:
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.2 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape[0])
        return np.stack([wave] * channels, axis=1).astype(np.float32) if channels > 1 else wave.astype(np.float32)

    sizes = [(56, 56), (112, 84), (84, 140), (168, 112)]
    for k, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (200, 30 * k, 40)
        Image.fromarray(pixels).save(root / "images" / f"img{k}.png")
    for k in range(2):
        path = root / "videos" / f"clip{k}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=4)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for f in range(8):
                frame = np.full((48, 64, 3), 20 * f, dtype=np.uint8)
                frame[:, (8 * f) % 64 : (8 * f) % 64 + 8] = (255, 255 - 40 * k, 0)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    for k in range(3):
        sf.write(root / "audio" / f"speech{k}.wav", tone(2.0 + k, 16000, 220.0 * (k + 1)), 16000)
    sf.write(root / "audio" / "stereo.flac", tone(3.0, 44100, 330.0, channels=2), 44100)
    sf.write(root / "audio" / "sound.wav", tone(4.0, 8000, 880.0), 8000)
    sf.write(root / "audio" / "long.wav", tone(long_speech_seconds, 16000, 150.0), 16000)

    questions = ["What is shown here?", "Describe it briefly.", "What colour stands out?", "Is anything moving?"]
    answers = ["A red square on noise.", "A small synthetic picture.", "Red.", "A bar slides to the right."]
    records = []
    for i in range(num_samples):
        q, a = questions[i % 4], answers[i % 4]
        kind = i % 8
        rec: dict[str, Any] = {"id": f"sample-{i:04d}"}
        if kind == 0:
            rec["conversations"] = [
                {"from": "human", "value": q}, {"from": "gpt", "value": a},
                {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Nothing else."},
            ]
        elif kind == 1:
            rec["image"] = f"images/img{i % 4}.png"
            rec["conversations"] = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
        elif kind == 2:
            rec["video"] = f"videos/clip{i % 2}.mp4"
            rec["conversations"] = [{"from": "human", "value": f"<video>\n{q}"}, {"from": "gpt", "value": a}]
        elif kind == 3:
            rec["speech"] = f"audio/speech{i % 3}.wav"
            rec["speech_asr"] = q
            rec["conversations"] = [{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": a}]
        elif kind == 4:
            rec["speech"] = "audio/stereo.flac"
            rec["conversations"] = [{"from": "human", "value": "<speech>\nTranscribe this."}, {"from": "gpt", "value": a}]
        elif kind == 5:
            rec["sound"] = "audio/sound.wav"
            rec["conversations"] = [{"from": "human", "value": "<sound>\nWhat do you hear?"}, {"from": "gpt", "value": "A beep."}]
        elif kind == 6:
            rec["image"] = f"images/img{i % 4}.png"
            rec["speech"] = f"audio/speech{i % 3}.wav"
            rec["speech_asr"] = q
            rec["conversations"] = [
                {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a},
                {"from": "human", "value": "<speech>"}, {"from": "gpt", "value": answers[(i + 1) % 4]},
            ]
        else:
            rec["long_speech"] = "audio/long.wav"
            rec["conversations"] = [
                {"from": "human", "value": "<speech>\nSummarize this recording."}, {"from": "gpt", "value": "A steady hum."},
            ]
        records.append(rec)
    path = root / "samples.json"
    atomic_write_text(path, json.dumps(records, indent=1))
    return path
