"""Training records: the data file, its records and what is wrong with them.

`RecordStore` reads a JSON-list or JSONL file of LLaVA-style records (format in
`lyra.data.dataset`) without parsing every record up front; `inspect_record` checks one
record's structure (roles, placeholders against files, `speech_asr`, `tgt_unit`) without file
access. A record that cannot be used is a `BadSampleError` with one of `BAD_SAMPLE_CODES`; in
"skip" mode the dataset returns a `SkippedSample` in its place. `strict_problems` adds the
checks that the loader can do without but a data file should pass (unknown keys, empty
answers); `python -m lyra.data.validate` applies them.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lyra.processing import PLACEHOLDERS, PLACEHOLDER_PATTERN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MEDIA_KEYS = ("image", "video", "speech", "long_speech", "sound")
RECORD_KEYS = frozenset({"id", "conversations", *MEDIA_KEYS, "speech_asr", "tgt_unit", "meta"})
"""Keys a record may have; `meta` holds free-form bookkeeping that the loader ignores."""
TURN_KEYS = frozenset({"from", "value", "role", "content"})
"""Keys a turn may have (`role`/`content` are accepted for `from`/`value`)."""
UNIT_PATTERN = re.compile(r"^\s*(?:<\d+>\s*)+$")

BAD_SAMPLE_CODES: dict[str, str] = {
    "malformed_json": "the record is not valid JSON (fix the line and column given)",
    "not_utf8": "the record's bytes are not valid UTF-8 (re-save the file as UTF-8)",
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
    """The data file itself cannot be read: a JSON list with a syntax error (`code`
    "malformed_json") or with bytes that are not UTF-8 ("not_utf8")."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None, code: str = "malformed_json"):
        super().__init__(message)
        self.line = line
        self.column = column
        self.code = code


@dataclass
class SkippedSample:
    """What `LyraDataset.__getitem__` returns for a bad sample (in "skip" mode)."""

    index: int
    sample_id: str
    code: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.sample_id, "code": self.code, "reason": self.reason}


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
            if not self.path.exists():
                raise FileNotFoundError(f"data file not found: {self.path}")
            kind = "a directory" if self.path.is_dir() else "not a regular file (a FIFO, device or socket?)"
            raise FileNotFoundError(f"data file {self.path} is {kind}; give the JSON or JSONL file itself")
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
        """The parsed record; `BadSampleError` ("malformed_json" or "not_utf8") for a bad JSONL line."""
        raw = self.raw(index)
        try:
            text = raw.decode("utf-8-sig")  # a JSONL file may start with a byte-order mark
        except UnicodeDecodeError as error:
            raise BadSampleError(
                f"{self.path.name} line {self.line(index)}, column {_column(raw, error.start)}: "
                f"byte 0x{raw[error.start]:02x} is not valid UTF-8; re-save the file as UTF-8",
                code="not_utf8",
                index=index,
            ) from None
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
        data = self.path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line, column = data.count(b"\n", 0, error.start) + 1, _column(data, error.start)
            raise DataFileError(
                f"{self.path}: not UTF-8 at line {line}, column {column} (byte 0x{data[error.start]:02x}); "
                f"re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
                line=line,
                column=column,
                code="not_utf8",
            ) from None
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


def _column(data: bytes, offset: int) -> int:
    """1-based byte column of `offset` within its line of `data`."""
    return offset - data.rfind(b"\n", 0, offset)


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
        if not isinstance(role, str) or role not in ROLES:
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


def strict_problems(record: dict[str, Any], parsed: ParsedRecord) -> list[Problem]:
    """What the loader tolerates but a clean data file should not hold: keys outside
    `RECORD_KEYS` / `TURN_KEYS` (usually a typo such as 'images', which would leave a file
    unused) and answers that are empty, which would teach the model to say nothing."""
    problems = [
        Problem("unknown_key", f"unknown record key {key!r}; known keys: {', '.join(sorted(RECORD_KEYS))}")
        for key in record
        if key not in RECORD_KEYS
    ]
    for k, turn in enumerate(record["conversations"]):
        problems += [
            Problem("unknown_key", f"turn {k} has unknown key {key!r}; a turn holds 'from' and 'value'")
            for key in turn
            if key not in TURN_KEYS
        ]
    problems += [
        Problem("empty_answer", f"turn {k} (gpt) is empty; write the answer or drop the turn pair")
        for k, message in enumerate(parsed.messages)
        if message["role"] == "assistant" and not message["content"].strip()
    ]
    return problems
