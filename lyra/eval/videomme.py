"""VideoMME: multiple-choice questions on 30 s to 1 h videos, scored by duration class.

Three ways to give the model a video (paper, Sec. 4.3 and Table 5):

* `vision`: sampled frames and the question (`<video>`);
* `audio`: only the audio track, as long speech (`<speech>`), with the Fig. 8 prompt: answer
  "yes" and the letter when the audio is enough, else "no". Reported: accuracy over all
  questions (an unanswered one is wrong), the answered fraction ("solve 33 %") and the
  accuracy on the answered ones ("LSCI" row), each overall and by duration; with the
  predictions of a vision run as fallback, the combined accuracy ("Baseline + LSCI");
* `omni`: frames and audio track together (`<video>` then `<speech>`).

Question files (one record per question):

* the official release, `videomme/test-00000-of-00001.parquet` (lmms-lab/Video-MME) with
  columns video_id, duration (short|medium|long), domain, sub_category, url, videoID,
  question_id, task_type, question, options (["A. ...", "B. ...", ...]), answer ("A".."D");
* JSON (or JSONL) with the same fields per question, or per video with a "questions" list
  (the layout of the first Video-MME json release).

Videos are `<videoID>.<ext>` in `data/`, `video/`, `videos/` or the data root itself (the
official zips unpack to `data/`), or in `--video-dir`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from lyra.data.vision import VisionError
from lyra.eval.metrics import extract_option_letter, mean, parse_sufficiency, percent

DURATIONS = ("short", "medium", "long")
LETTERS = "ABCD"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
VIDEO_FOLDERS = ("data", "video", "videos", ".")
PARQUET_NAME = "videomme/test-00000-of-00001.parquet"

# The Video-MME multiple-choice prompt (as lmms-eval and the Qwen2-VL report use it).
MC_PROMPT = ("Select the best answer to the following multiple-choice question based on the {source}. "
             "Respond with only the letter (A, B, C, or D) of the correct option.\n"
             "{question}\n{options}\nThe best answer is:")
MC_SOURCE = {"vision": "video", "omni": "video and its audio"}
# The paper's long-speech VideoMME prompt (Fig. 8), the audio track being the context.
SUFFICIENCY_PROMPT = (
    "Based on the context, determine if it provides enough information to answer the question:\n"
    "{question} with the provided choices {choices}.\n"
    "Do not introduce any information not found in the context.\n"
    "- If the context is sufficient to answer the question, respond \"yes\" and answer with the option's "
    "letter from the given choices directly.\n"
    "- If the context does not contain enough information to answer the question, respond \"no\"."
)
MODES = ("vision", "audio", "omni")


@dataclass
class VideoMMEItem:
    """One question about one video."""

    id: str  # question_id, e.g. "001-1"
    video: str  # the file stem (the official videoID, a YouTube id)
    duration: str  # short | medium | long
    question: str
    options: dict[str, str]  # letter -> text without the "A. " prefix
    answer: str  # the correct letter
    extra: dict[str, Any] = field(default_factory=dict)  # domain, sub_category, task_type

    def option_lines(self) -> str:
        return "\n".join(f"{letter}. {text}" for letter, text in self.options.items())


# ----------------------------------------------------------------------------- question files

_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])\s*[.):]\s*")


def parse_options(options: Any) -> dict[str, str]:
    """["A. x", "B. y"] or ["x", "y"] or {"A": "x"} -> {"A": "x", "B": "y"}."""
    if isinstance(options, dict):
        return {str(k).strip().upper(): str(v).strip() for k, v in options.items()}
    parsed = {}
    for index, option in enumerate(list(options)):
        text = str(option)
        match = _OPTION_PREFIX.match(text)
        letter = match.group(1) if match else LETTERS[index] if index < len(LETTERS) else chr(ord("A") + index)
        parsed[letter] = text[match.end():].strip() if match else text.strip()
    return parsed


def item_from_record(record: dict[str, Any], video_record: dict[str, Any] | None = None) -> VideoMMEItem:
    """A question record (parquet row or JSON object) -> item; `video_record` supplies the
    video fields of the nested JSON layout."""
    merged = {**(video_record or {}), **record}
    missing = [k for k in ("question", "options", "answer") if k not in merged]
    video = merged.get("videoID") or merged.get("video") or merged.get("video_id")
    if missing or video is None:
        raise ValueError(f"VideoMME record lacks {missing or ['videoID']}: {json.dumps(merged, default=str)[:200]}")
    duration = str(merged.get("duration", "")).strip().lower()
    if duration not in DURATIONS:
        raise ValueError(f"VideoMME record {merged.get('question_id')}: duration {duration!r} is not one of {DURATIONS}")
    answer = str(merged["answer"]).strip().upper()[:1]
    item_id = merged.get("question_id") or f"{video}-{merged.get('question_index', 0)}"
    extra = {k: merged[k] for k in ("domain", "sub_category", "task_type", "video_id") if k in merged}
    return VideoMMEItem(id=str(item_id), video=str(video), duration=duration, question=str(merged["question"]).strip(),
                        options=parse_options(merged["options"]), answer=answer, extra=extra)


def _rows_from_json(path: Path) -> Iterable[tuple[dict, dict | None]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
        records = data if isinstance(data, list) else data.get("data") or list(data.values())
    for record in records:
        if "questions" in record:  # one record per video
            video = {k: v for k, v in record.items() if k != "questions"}
            for index, question in enumerate(record["questions"]):
                yield {"question_index": index + 1, **question}, video
        else:
            yield record, None


def _rows_from_parquet(path: Path) -> Iterable[tuple[dict, None]]:
    import pandas as pd  # via `datasets` (pyarrow); only needed for the official parquet

    for row in pd.read_parquet(path).to_dict(orient="records"):
        row["options"] = list(row["options"])  # a numpy array from pyarrow
        yield row, None


def find_question_file(data_root: Path) -> Path:
    """The official parquet if present, else the only parquet/json/jsonl file in the root."""
    official = data_root / PARQUET_NAME
    if official.is_file():
        return official
    candidates = sorted([*data_root.glob("*.parquet"), *data_root.glob("videomme/*.parquet"),
                         *data_root.glob("*.json"), *data_root.glob("*.jsonl")])
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"no VideoMME question file in {data_root}: expected {PARQUET_NAME} or one .parquet/.json/.jsonl "
            f"file (found {[c.name for c in candidates]}); pass --question-file"
        )
    return candidates[0]


def load_questions(data_root: str | Path, question_file: str | Path | None = None) -> list[VideoMMEItem]:
    """Every question of the benchmark, in file order (see the module doc for formats)."""
    path = Path(question_file) if question_file else find_question_file(Path(data_root))
    if not path.is_file():
        raise FileNotFoundError(f"VideoMME question file not found: {path}")
    rows = _rows_from_parquet(path) if path.suffix == ".parquet" else _rows_from_json(path)
    items = [item_from_record(record, video) for record, video in rows]
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ValueError(f"{path}: question_id {item.id!r} appears twice")
        seen.add(item.id)
    return items


def find_video(data_root: str | Path, video: str, video_dir: str | Path | None = None) -> Path:
    folders = [Path(video_dir)] if video_dir else [Path(data_root) / name for name in VIDEO_FOLDERS]
    for folder in folders:
        for extension in VIDEO_EXTENSIONS:
            path = folder / f"{video}{extension}"
            if path.is_file():
                return path
    raise FileNotFoundError(f"video {video!r} not found in {[str(f) for f in folders]} "
                            f"(looked for {video}{{{','.join(VIDEO_EXTENSIONS)}}}); pass --video-dir")


# ----------------------------------------------------------------------------- model inputs

def build_prompt(item: VideoMMEItem, mode: str) -> str:
    """The user turn, placeholders first: `<video>` (vision), `<speech>` (audio), both (omni)."""
    if mode == "audio":
        choices = ", ".join(f"{letter}. {text}" for letter, text in item.options.items())
        return "<speech>\n" + SUFFICIENCY_PROMPT.format(question=item.question, choices=choices)
    if mode not in MC_SOURCE:
        raise ValueError(f"unknown VideoMME mode {mode!r}; choose from {MODES}")
    text = MC_PROMPT.format(source=MC_SOURCE[mode], question=item.question, options=item.option_lines())
    return ("<video>\n<speech>\n" if mode == "omni" else "<video>\n") + text


def has_audio_track(path: str | Path) -> bool:
    """Whether the video file holds an audio stream (some VideoMME videos are silent)."""
    import av

    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio)
    except Exception as error:  # PyAV raises many types for broken files
        raise VisionError(f"cannot open video {path}: {error}") from error


# ----------------------------------------------------------------------------- scoring

def score_record(record: dict[str, Any], mode: str) -> dict[str, Any]:
    """Parse one prediction record ({"response", "answer", "options"?}) into letter/correct
    (and verdict/answered in audio mode). Records with an "error" are wrong and unanswered."""
    options = record.get("options")
    if "error" in record or record.get("response") is None:
        return {"letter": None, "correct": False, "answered": False, "verdict": None}
    if mode == "audio":
        parsed = parse_sufficiency(record["response"], LETTERS, options)
        letter = parsed.letter if parsed.answered else None
        return {"letter": letter, "correct": letter == record["answer"], "answered": parsed.answered,
                "verdict": parsed.verdict}
    letter = extract_option_letter(record["response"], LETTERS, options)
    return {"letter": letter, "correct": letter == record["answer"], "answered": letter is not None,
            "verdict": None}


def _by_duration(records: Sequence[dict[str, Any]], value) -> dict[str, float | None]:
    out = {"overall": percent(mean([value(r) for r in records]))}
    for duration in DURATIONS:
        out[duration] = percent(mean([value(r) for r in records if r["duration"] == duration]))
    return out


def score_predictions(records: Sequence[dict[str, Any]], mode: str,
                      fallback: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Metrics (percent, None for an empty group) from prediction records.

    Every record needs "answer", "duration" and "response" (or "error"). `fallback` maps ids to
    records of a vision run: in audio mode their letters answer the questions the audio did not
    (the paper's "Baseline + LSCI").
    """
    scored = [{**r, **score_record(r, mode)} for r in records]
    counts = {"overall": len(scored), **{d: sum(r["duration"] == d for r in scored) for d in DURATIONS}}
    result: dict[str, Any] = {
        "n": len(scored),
        "counts": counts,
        "errors": sum("error" in r for r in scored),
        "accuracy": _by_duration(scored, lambda r: float(r["correct"])),
        "unparsed": sum(not r["answered"] and "error" not in r for r in scored) if mode != "audio" else None,
    }
    if mode == "audio":
        answered = [r for r in scored if r["answered"]]
        result["answered_fraction"] = _by_duration(scored, lambda r: float(r["answered"]))
        result["answered_accuracy"] = _by_duration(answered, lambda r: float(r["correct"]))
        result["answered_counts"] = {"overall": len(answered),
                                     **{d: sum(r["duration"] == d for r in answered) for d in DURATIONS}}
        if fallback is not None:
            missing = [r["id"] for r in scored if not r["answered"] and r["id"] not in fallback]
            if missing:
                raise ValueError(f"the fallback predictions lack {len(missing)} question(s), e.g. {missing[:3]}")

            def combined(r: dict[str, Any]) -> float:
                if r["answered"]:
                    return float(r["correct"])
                stand_in = {**fallback[r["id"]], "answer": r["answer"], "options": r.get("options")}
                return float(score_record(stand_in, "vision")["correct"])

            result["combined_accuracy"] = _by_duration(scored, combined)
    return result
