"""Long-speech instruction data (training stage 3): recordings + transcripts -> QA samples.

The paper made Lyra-LongSpeech-12K by giving each recording's transcript to GPT-4o with the
question-answer generation prompt of its Fig. 8 (five pairs, the first a summary). Here:

  * `llm_qa` sends that prompt to any OpenAI-compatible chat-completions endpoint (plain
    urllib, no SDK) and parses the reply, including the figure's own output format (one JSON
    object with repeated "Question"/"Answer" keys inside a fenced block);
  * `rule_based_qa` is an offline, deterministic stand-in for tests and dry runs: a
    keyword summary, whether and when a word is said, which of two words comes first, the
    names mentioned, what follows a quoted phrase, and how often a word occurs.

Each recording becomes one multi-turn sample in the released format::

    {"id": "talk1", "long_speech": "Audios/talk1.mp3",
     "conversations": [{"from": "human", "value": "<speech>\\nSummarize ..."}, {"from": "gpt", ...}, ...]}

(`long_speech` uses the `<speech>` placeholder; the loader cuts it into 30 s clips.)

Transcripts: `.txt` (plain text; times are then estimated from the character position and
the duration), `.srt`/`.vtt` subtitles, TED-LIUM `.stm`, or Whisper-style `.json`
(`{"text", "segments": [{"start", "end", "text"}]}`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile
from tqdm import tqdm

from lyra.utils.io import atomic_write_text

logger = logging.getLogger("lyra.data.long_speech")

QA_PROMPT = """Task:
You will be provided with a transcript from an audio or video recording. Your task is to generate question-answer pairs based on the content of the transcript.

Guidelines for Question-Answer Pair Generation:
- The first question should be about summarizing the content of this recording.
- Carefully read the transcript provided and base all questions and answers strictly on the content within.
- Ensure that each question is directly related to specific details in the transcript, such as events, facts, or points made by the speaker.
- Provide clear, concise, and specific questions, along with accurate answers derived from the transcript.
- Do not introduce any new information that isn't in the transcript. If the speaker does not introduce themselves, refer to them as "Speaker" or "Narrator".
- Avoid generic or overly broad questions; aim for a range of question types (e.g., factual, inferential, explanation-based).
- Generate {num_pairs} question-answer pairs.

Output Format:
- Your output should be structured as a JSON object.
- Each question-answer pair should be formatted as:
```json
{{
  [
    {{
      "Question": <question-1>, "Answer": <answer-1>,
      "Question": <question-2>, "Answer": <answer-2>,
      ...
    }}
  ]
}}
```

Transcript:
{transcript}"""
"""The paper's Fig. 8 prompt; `{num_pairs}` and `{transcript}` are filled in."""

TRANSCRIPT_SUFFIXES = (".json", ".srt", ".vtt", ".stm", ".txt")
STOPWORDS = set(
    """a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her here
    hers herself him himself his how i if in into is it its itself just like me more most my myself no nor not now
    of off on once only or other our ours ourselves out over own really same she should so some such than that the
    their theirs them themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves going know think
    thing things get got one also well right yeah okay oh gonna want people said say says lot way even much many
    make made let us see go come back something there's it's that's i'm don't can't we're you're they're""".split()
)
DISTRACTORS = ["volcano", "submarine", "violin", "penguin", "cathedral", "avalanche", "telescope", "saxophone",
               "giraffe", "lighthouse", "tornado", "chandelier", "glacier", "harpoon", "meteorite", "accordion"]


@dataclass
class Segment:
    start: float
    end: float
    text: str


@dataclass
class Transcript:
    text: str
    segments: list[Segment] = field(default_factory=list)  # empty: no timing
    duration: float = 0.0  # seconds, from the recording


def _seconds(stamp: str) -> float:
    parts = stamp.strip().replace(",", ".").split(":")
    value = 0.0
    for part in parts:
        value = value * 60 + float(part)
    return value


def read_transcript(path: str | Path, duration: float = 0.0) -> Transcript:
    """Read a transcript file (see the module docstring for the formats)."""
    path = Path(path)
    raw = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    segments: list[Segment] = []
    if suffix == ".json":
        data = json.loads(raw)
        for seg in data.get("segments", []):
            segments.append(Segment(float(seg["start"]), float(seg["end"]), str(seg["text"]).strip()))
        text = str(data.get("text") or " ".join(s.text for s in segments))
    elif suffix in (".srt", ".vtt"):
        stamp = re.compile(r"(\d+:\d{2}(?::\d{2})?[.,]\d+)\s*-->\s*(\d+:\d{2}(?::\d{2})?[.,]\d+)")
        for block in re.split(r"\n\s*\n", raw.replace("\r", "")):
            lines = [line for line in block.strip().split("\n") if line.strip()]
            for k, line in enumerate(lines):
                match = stamp.search(line)
                if match:
                    words = " ".join(re.sub(r"<[^>]+>", "", l).strip() for l in lines[k + 1 :]).strip()
                    if words:
                        segments.append(Segment(_seconds(match.group(1)), _seconds(match.group(2)), words))
                    break
        text = " ".join(s.text for s in segments)
    elif suffix == ".stm":  # TED-LIUM: file channel speaker start end <label> words
        for line in raw.splitlines():
            fields = line.split(None, 6)
            if len(fields) < 7 or line.startswith(";;"):
                continue
            words = re.sub(r"\s*\{[^}]*\}|<[^>]*>|\([^)]*\)", " ", fields[6])
            words = re.sub(r"\s+'", "'", words)  # TED-LIUM splits contractions: "it 's"
            words = re.sub(r"\s+", " ", words).strip()
            if words and words != "ignore_time_segment_in_scoring":
                segments.append(Segment(float(fields[3]), float(fields[4]), words))
        text = " ".join(s.text for s in segments)
    else:
        text = raw
    text = re.sub(r"\s+", " ", text).strip()
    if not duration and segments:
        duration = segments[-1].end
    return Transcript(text, segments, duration)


def format_time(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


# ----------------------------------------------------------------------------- LLM
def build_messages(transcript: str, num_pairs: int = 5, max_chars: int | None = None) -> list[dict[str, str]]:
    """Chat messages that ask an LLM for QA pairs with the Fig. 8 prompt."""
    if max_chars is not None and len(transcript) > max_chars:
        transcript = transcript[:max_chars].rsplit(" ", 1)[0] + " ..."
    return [{"role": "user", "content": QA_PROMPT.format(num_pairs=num_pairs, transcript=transcript)}]


def parse_qa_response(reply: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from an LLM reply: JSON (lists of objects, or objects with repeated
    Question/Answer keys as in Fig. 8), the figure's not-quite-JSON block, or "Q:"/"A:" lines."""
    fenced = re.search(r"```(?:json)?\s*(.*?)```", reply, re.DOTALL)
    body = fenced.group(1) if fenced else reply
    pairs: list[tuple[str, str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, list) and all(isinstance(x, tuple) and len(x) == 2 for x in node) and node:
            question = None
            for key, value in node:  # an object, kept as ordered (key, value) pairs
                name = str(key).strip().lower()
                if name.startswith("question") and isinstance(value, str):
                    question = value
                elif name.startswith("answer") and question is not None and isinstance(value, (str, int, float)):
                    pairs.append((question.strip(), str(value).strip()))
                    question = None
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    try:
        walk(json.loads(body, object_pairs_hook=list))
    except ValueError:
        pass
    if not pairs:  # e.g. the figure's `{ [ {...} ] }`, which is not valid JSON
        string = r'"((?:[^"\\]|\\.)*)"'
        for q, a in re.findall(r'"Question[^"]*"\s*:\s*' + string + r'\s*,\s*"Answer[^"]*"\s*:\s*' + string, body, re.I):
            pairs.append((json.loads(f'"{q}"').strip(), json.loads(f'"{a}"').strip()))
    if not pairs:
        for q, a in re.findall(r"(?:^|\n)\s*(?:\d+[.)]\s*)?Q(?:uestion)?\s*\d*\s*[:.]\s*(.+?)\s*\n\s*A(?:nswer)?\s*\d*\s*[:.]\s*(.+?)(?=\n\s*(?:\d+[.)]\s*)?Q|\Z)",
                              body, re.DOTALL | re.IGNORECASE):
            pairs.append((q.strip(), " ".join(a.split())))
    return [(q, a) for q, a in pairs if q and a]


def chat_completion(endpoint: str, model: str, messages: list[dict[str, str]], api_key: str | None = None,
                    temperature: float = 0.2, timeout: float = 300.0, retries: int = 3) -> str:
    """One request to an OpenAI-compatible `/chat/completions` endpoint; returns the reply text.

    `endpoint` may be the full URL or its base (`http://host:8000/v1`). Retries on network
    errors, 429 and 5xx with exponential back-off.
    """
    url = endpoint.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions"
    body = json.dumps({"model": model, "messages": messages, "temperature": temperature}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = json.loads(response.read().decode("utf-8"))
            return str(data["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as error:
            if error.code not in (429, 500, 502, 503, 504) or attempt == retries:
                detail = error.read().decode("utf-8", errors="replace")[:300]
                raise RuntimeError(f"{url} answered HTTP {error.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            if attempt == retries:
                raise RuntimeError(f"cannot reach {url}: {error}") from None
        except (KeyError, IndexError, ValueError) as error:
            raise RuntimeError(f"{url} sent an unexpected reply: {error}") from None
        time.sleep(2**attempt)
    raise AssertionError("unreachable")


def llm_qa(transcript: Transcript, endpoint: str, model: str, api_key: str | None = None, num_pairs: int = 5,
           max_chars: int | None = None) -> list[tuple[str, str]]:
    reply = chat_completion(endpoint, model, build_messages(transcript.text, num_pairs, max_chars), api_key)
    pairs = parse_qa_response(reply)
    if not pairs:
        raise RuntimeError(f"no question-answer pairs found in the reply: {reply[:200]!r}")
    return pairs


# ----------------------------------------------------------------------------- rules
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _time_of(transcript: Transcript, char_pos: int) -> float:
    """When the character at `char_pos` of the text is said (from segments, else proportionally)."""
    if transcript.segments:
        position = 0
        for seg in transcript.segments:
            position += len(seg.text) + 1
            if position > char_pos:
                return seg.start
        return transcript.segments[-1].start
    return transcript.duration * char_pos / max(len(transcript.text), 1)


def _part(transcript: Transcript, seconds: float) -> str:
    if not transcript.duration:
        return "recording"
    third = seconds / transcript.duration
    return "beginning" if third < 1 / 3 else "middle" if third < 2 / 3 else "end"


def rule_based_qa(transcript: Transcript, seed: int = 0, num_pairs: int = 5) -> list[tuple[str, str]]:
    """Deterministic QA pairs from a transcript alone (no model); the first is a summary."""
    rng = random.Random(seed)
    text = transcript.text
    words = [(m.group(0), m.start()) for m in _WORD.finditer(text)]
    lowered = [(w.lower().strip("'-"), pos) for w, pos in words]
    content = [(w, pos) for w, pos in lowered if len(w) > 3 and w not in STOPWORDS]
    counts = Counter(w for w, _ in content)
    first_at: dict[str, int] = {}
    for w, pos in content:
        first_at.setdefault(w, pos)
    surface: dict[str, Counter] = {}
    for (w, _), (original, _) in zip(lowered, words):
        surface.setdefault(w, Counter())[original.strip("'-")] += 1
    top = [surface[w].most_common(1)[0][0] if w in surface else w for w, _ in counts.most_common(3)]
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    opening = sentences[0] if sentences else text[:200]

    if top:
        topics = ", ".join(top[:-1]) + (f" and {top[-1]}" if len(top) > 1 else top[-1])
        summary = f"The speaker mainly talks about {topics}. The recording opens with: \"{opening}\""
    else:
        summary = f"The recording says: \"{opening}\""
    pairs = [("Summarize the content of this recording.", summary)]

    def mention() -> tuple[str, str] | None:
        if rng.random() < 0.3:
            absent = [w for w in DISTRACTORS if w not in counts and w not in text.lower()]
            if absent:
                w = rng.choice(absent)
                return f"Does the speaker mention \"{w}\"?", f"No, \"{w}\" is not mentioned in the recording."
        if not first_at:
            return None
        w = rng.choice(sorted(first_at))
        at = _time_of(transcript, first_at[w])
        return (f"Does the speaker mention \"{w}\"? If so, when?",
                f"Yes, \"{w}\" is first mentioned at about {format_time(at)}, in the {_part(transcript, at)} of the recording.")

    def order() -> tuple[str, str] | None:
        candidates = sorted(first_at)
        if len(candidates) < 2:
            return None
        a, b = rng.sample(candidates, 2)
        early, late = (a, b) if first_at[a] < first_at[b] else (b, a)
        return (f"Which is mentioned first, \"{a}\" or \"{b}\"?",
                f"\"{early}\" is mentioned first, at about {format_time(_time_of(transcript, first_at[early]))}; "
                f"\"{late}\" comes at about {format_time(_time_of(transcript, first_at[late]))}.")

    def names() -> tuple[str, str] | None:
        found: list[str] = []
        for k, (w, pos) in enumerate(words):
            before = text[:pos].rstrip()
            sentence_start = not before or before[-1] in ".!?\"'"
            if w[0].isupper() and not sentence_start and w.lower() not in STOPWORDS and w not in found and len(w) > 1:
                found.append(w)
        if not found:
            return "Which names are mentioned in the recording?", "No names are mentioned."
        shown = found[:6]
        listed = ", ".join(shown[:-1]) + (f" and {shown[-1]}" if len(shown) > 1 else shown[0])
        return "Which names are mentioned in the recording?", f"The recording mentions {listed}."

    def follow() -> tuple[str, str] | None:
        long_ones = [s for s in sentences if len(s.split()) >= 8]
        if not long_ones:
            return None
        sentence = rng.choice(long_ones).split()
        return (f"What does the speaker say right after \"{' '.join(sentence[:4])}\"?",
                f"The speaker continues: \"{' '.join(sentence[4:])}\"")

    def how_often() -> tuple[str, str] | None:
        if not counts:
            return None
        w = rng.choice(sorted(counts))
        n = counts[w]
        return f"How many times does the speaker say \"{w}\"?", f"\"{w}\" is said {n} time{'s' if n != 1 else ''}."

    makers = [mention, order, names, follow, how_often]
    rng.shuffle(makers)
    attempts = 0
    while len(pairs) < num_pairs and attempts < 4 * num_pairs:
        pair = makers[attempts % len(makers)]()
        attempts += 1
        if pair and pair[0] not in (q for q, _ in pairs):
            pairs.append(pair)
    return pairs


# ----------------------------------------------------------------------------- samples
def make_records(sample_id: str, audio_path: str, pairs: list[tuple[str, str]], one_per_sample: bool = False) -> list[dict]:
    """Records in the released long-speech format (see the module docstring)."""
    if one_per_sample:
        return [
            {"id": f"{sample_id}_{k}", "long_speech": audio_path,
             "conversations": [{"from": "human", "value": f"<speech>\n{q}"}, {"from": "gpt", "value": a}]}
            for k, (q, a) in enumerate(pairs)
        ]
    conversations = []
    for k, (q, a) in enumerate(pairs):
        conversations.append({"from": "human", "value": f"<speech>\n{q}" if k == 0 else q})
        conversations.append({"from": "gpt", "value": a})
    return [{"id": sample_id, "long_speech": audio_path, "conversations": conversations}]


def find_transcript(audio: Path) -> Path | None:
    for suffix in TRANSCRIPT_SUFFIXES:
        candidate = audio.with_suffix(suffix)
        if candidate.is_file() and candidate != audio:
            return candidate
    return None


@dataclass
class LongSpeechStats:
    recordings: int = 0
    samples: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (audio, reason)
    cached: int = 0


def prepare_long_speech(
    items: list[tuple[Path, Path | str]],
    output_path: str | Path,
    root: str | Path | None = None,
    generator: str = "rules",
    endpoint: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    num_pairs: int = 5,
    min_seconds: float = 30.0,
    max_seconds: float = 2500.0,
    max_transcript_chars: int | None = None,
    one_per_sample: bool = False,
    seed: int = 0,
    workers: int = 4,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> LongSpeechStats:
    """Make long-speech QA records for `(audio, transcript)` items and write them as a JSON list.

    `transcript` is a file path or the transcript text itself. `generator` is "rules"
    (`rule_based_qa`) or "llm" (`llm_qa` with `endpoint`/`model`). Recordings shorter than
    `min_seconds`, longer than `max_seconds` (stage 3 used < 2500 s), unreadable or without
    transcript text are skipped and listed. LLM answers are cached per recording under
    `cache_dir` (default: `.qa_cache` beside the output), so an interrupted run resumes
    without paying twice; requests run on `workers` threads. Audio paths are written relative
    to `root` (default: the output's folder).
    """

    if generator not in ("rules", "llm"):
        raise ValueError(f"generator must be 'rules' or 'llm', got {generator!r}")
    if generator == "llm" and not (endpoint and model):
        raise ValueError("the llm generator needs an endpoint and a model")
    output_path = Path(output_path)
    root = Path(root) if root is not None else output_path.parent
    cache = Path(cache_dir) if cache_dir is not None else output_path.parent / ".qa_cache"
    stats = LongSpeechStats()

    def one(item: tuple[Path, Path | str]) -> tuple[list[dict], str | None, bool]:
        audio, source = item
        try:
            duration = soundfile.info(str(audio)).duration
        except Exception as error:
            return [], f"unreadable audio: {error}", False
        if not min_seconds <= duration <= max_seconds:
            return [], f"{duration:.0f} s is outside [{min_seconds:.0f}, {max_seconds:.0f}] s", False
        if isinstance(source, Path):
            transcript = read_transcript(source, duration)
        else:
            transcript = Transcript(re.sub(r"\s+", " ", source).strip(), [], duration)
        if len(transcript.text.split()) < 20:
            return [], "transcript has fewer than 20 words", False
        sample_id = audio.stem
        cached = False
        if generator == "rules":
            pairs = rule_based_qa(transcript, seed=zlib.crc32(f"{seed}:{sample_id}".encode()), num_pairs=num_pairs)
        else:
            cache_file = cache / f"{sample_id}.json"
            if cache_file.is_file():
                pairs = [tuple(p) for p in json.loads(cache_file.read_text())]
                cached = True
            else:
                try:
                    pairs = llm_qa(transcript, endpoint, model, api_key, num_pairs, max_transcript_chars)
                except RuntimeError as error:
                    return [], str(error), False
                atomic_write_text(cache_file, json.dumps(pairs))
        relative = os.path.relpath(audio, root)
        return make_records(sample_id, relative, pairs, one_per_sample), None, cached

    records: list[dict] = []
    with ThreadPoolExecutor(max_workers=max(1, workers if generator == "llm" else 1)) as pool:
        results = pool.map(one, items)
        for (audio, _), (made, reason, cached) in tqdm(
            zip(items, results), total=len(items), desc=f"long speech ({generator})", disable=not progress
        ):
            if reason is not None:
                stats.skipped.append((str(audio), reason))
                logger.warning("skipping %s: %s", audio, reason)
                continue
            stats.recordings += 1
            stats.cached += int(cached)
            stats.samples += len(made)
            records.extend(made)
    atomic_write_text(output_path, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    return stats
