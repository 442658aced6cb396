"""Image-speech benchmarks (paper, Table 2): the question is spoken, the picture is given.

Each task reads the reference's `data/Lyra_Eval/<task folder>` layout (dvlab-research/Lyra,
`scripts/eval/lyra_*_speech.sh`): a JSONL question file, one record per question with
`question_id`, `image` (relative to the image folder), optionally `speech` (the audio's name;
else the question_id) and `text`; the audio is `<speech folder>/<name>.mp3`, or `.wav`.

task      folder           question file                                 images         answers
textvqa   TextVQA_speech   lyra_textvqa_val_v051_ocr_withspeechid.jsonl  train_images/  TextVQA_0.5.1_val.json
docvqa    Docvqa_val       lyra_docvqa_audio.jsonl                       ./             "answer" per record
chartqa   Chartvqa_human   lyra_chartvqa_audio.jsonl                     ./             "answer" per record
mmvet     MM_vet_speech    lyra_mm_vet.jsonl                             images/        mm-vet.json (judge)

with the audio in `lyra_audios/` for all four. Prompts follow the reference: `<image>` then
`<speech>`; for TextVQA the reference sends the record's `text` (its scorer reads the written
question from `prompt`), which we take to hold the rest of the turn (OCR tokens, "Answer the
question using a single word or phrase.") with `<speech>` standing for the spoken question;
a `text` without `<speech>` has its first line (the written question) replaced by the
recording. Records may also carry their answers ("answers" or "answer"), so a self-made set
needs no annotation file.

Scores: TextVQA^S VQA accuracy; DocVQA^S ANLS; ChartQA^S relaxed accuracy (the reference
scored both with exact match after VQA normalisation, reported as `exact_match`); MM-Vet^S
an LLM judge with MM-Vet's grading prompt (`judge_one`), after exporting the predictions in
the `{question_id: answer}` JSON the official MM-Vet evaluator reads.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lyra.eval.metrics import anls, mean, percent, relaxed_accuracy, vqa_accuracy, vqa_exact_match


@dataclass(frozen=True)
class TaskLayout:
    question_file: str
    image_dir: str
    speech_dir: str
    metric: str
    annotation_file: str | None = None
    folder: str = ""  # the folder name under data/Lyra_Eval


TASKS: dict[str, TaskLayout] = {
    "textvqa": TaskLayout("lyra_textvqa_val_v051_ocr_withspeechid.jsonl", "train_images", "lyra_audios",
                          "vqa_accuracy", "TextVQA_0.5.1_val.json", "TextVQA_speech"),
    "docvqa": TaskLayout("lyra_docvqa_audio.jsonl", ".", "lyra_audios", "anls", None, "Docvqa_val"),
    "chartqa": TaskLayout("lyra_chartvqa_audio.jsonl", ".", "lyra_audios", "relaxed_accuracy", None,
                          "Chartvqa_human"),
    "mmvet": TaskLayout("lyra_mm_vet.jsonl", "images", "lyra_audios", "llm_judge", "mm-vet.json", "MM_vet_speech"),
}
SPEECH_EXTENSIONS = (".mp3", ".wav", ".flac", ".ogg", ".m4a")
PLACEHOLDER = re.compile(r"<(image|video|speech|sound)>\s*")


@dataclass
class SpeechVQAItem:
    """One spoken question about one image."""

    id: str
    image: Path
    speech: Path
    prompt: str  # the user turn, with `<image>` and `<speech>`
    answers: list[str]  # ground truths ([] for MM-Vet without mm-vet.json: export only)
    question: str | None = None  # the question in text, when known (the MM-Vet judge needs it)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. MM-Vet capabilities


# ----------------------------------------------------------------------------- reading

def resolve_speech(speech_dir: Path, name: str) -> Path:
    """`<name>.mp3` as the reference looks first, then `.wav` and other formats."""
    direct = speech_dir / name
    if direct.suffix.lower() in SPEECH_EXTENSIONS and direct.is_file():
        return direct
    for extension in SPEECH_EXTENSIONS:
        path = speech_dir / f"{name}{extension}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no speech file for {name!r} in {speech_dir} (tried {', '.join(SPEECH_EXTENSIONS)})")


def textvqa_question(prompt: str) -> str:
    """The question inside a TextVQA prompt: "OCR tokens: ... Question: Q Short answer:", or
    the line that is neither OCR tokens nor the answer instruction (lower-cased, as the
    reference keys its annotations)."""
    match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
    if prompt.startswith("OCR tokens: ") and match:
        return match.group(1).strip().lower()
    for line in PLACEHOLDER.sub("", prompt).split("\n"):
        line = line.strip()
        if line and not line.startswith("Reference OCR token") and not line.startswith("Answer the question"):
            return line.lower()
    raise ValueError(f"no question in TextVQA prompt {prompt[:80]!r}")


def build_prompt(task: str, text: str | None, instruction: str | None = None) -> str:
    """`<image>\\n<speech>` (+ the record's non-question lines for TextVQA, + `instruction`)."""
    tail = ""
    if task == "textvqa" and text:
        body = text.replace("<image>", "").lstrip("\n")
        if "<speech>" in body:
            prompt = "<image>\n" + body
            return prompt + (f"\n{instruction}" if instruction else "")
        tail = "\n".join(line for line in body.split("\n")[1:] if line.strip())  # drop the written question
    parts = ["<image>", "<speech>"] + [p for p in (tail, instruction) if p]
    return "\n".join(parts)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _textvqa_annotations(path: Path) -> tuple[dict, dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data["data"] if isinstance(data, dict) else data
    by_image_question = {(str(e["image_id"]), str(e["question"]).strip().lower()): e for e in entries}
    by_id = {str(e["question_id"]): e for e in entries if "question_id" in e}
    return by_image_question, by_id


def load_items(task: str, data_root: str | Path, question_file: str | Path | None = None,
               image_dir: str | Path | None = None, speech_dir: str | Path | None = None,
               annotation_file: str | Path | None = None, instruction: str | None = None) -> list[SpeechVQAItem]:
    """Every question of `task` (see the module doc for the layout), in file order."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    layout, root = TASKS[task], Path(data_root)
    questions = Path(question_file) if question_file else root / layout.question_file
    images = Path(image_dir) if image_dir else root / layout.image_dir
    speech = Path(speech_dir) if speech_dir else root / layout.speech_dir
    if not questions.is_file():
        raise FileNotFoundError(f"{task} question file not found: {questions} (pass --question-file, or point "
                                f"--data-root at data/Lyra_Eval/{layout.folder})")
    records = [json.loads(line) for line in questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    annotation = Path(annotation_file) if annotation_file else (
        root / layout.annotation_file if layout.annotation_file else None)
    textvqa_index = mmvet_meta = None
    if annotation is not None and annotation.is_file():
        if task == "textvqa":
            textvqa_index = _textvqa_annotations(annotation)
        elif task == "mmvet":
            mmvet_meta = json.loads(annotation.read_text(encoding="utf-8"))

    counts: dict[str, int] = {}
    for record in records:
        key = str(record["question_id"])
        counts[key] = counts.get(key, 0) + 1
    items = []
    for line_number, record in enumerate(records):
        question_id = str(record["question_id"])
        speech_name = str(record.get("speech") or question_id)
        # TextVQA's question_id is the image id, shared by the questions of one picture.
        item_id = question_id if counts[question_id] == 1 else f"{question_id}|{record.get('speech', line_number)}"
        answers = _as_list(record.get("answers", record.get("answer")))
        question = record.get("question")
        extra: dict[str, Any] = {}
        if task == "textvqa":
            question = question or textvqa_question(record.get("prompt") or record.get("text") or "")
            if not answers and textvqa_index is not None:
                by_image_question, by_id = textvqa_index
                entry = None
                for image_key in (question_id, Path(str(record.get("image", ""))).stem):
                    entry = entry or by_image_question.get((image_key, question))
                entry = entry or by_id.get(question_id)
                answers = _as_list(entry["answers"]) if entry else []
        elif task == "mmvet":
            meta = (mmvet_meta or {}).get(question_id, {})
            answers = answers or _as_list(meta.get("answer"))
            question = question or meta.get("question") or PLACEHOLDER.sub("", record.get("text") or "").strip() or None
            extra["capability"] = list(meta.get("capability") or record.get("capability") or [])
        if not answers and task != "mmvet":
            raise ValueError(f"{questions}: no ground truth for question {item_id!r} "
                             f"(expected 'answer(s)' in the record{' or ' + str(annotation) if annotation else ''})")
        items.append(SpeechVQAItem(
            id=item_id, image=images / str(record["image"]), speech=resolve_speech(speech, speech_name),
            prompt=build_prompt(task, record.get("text"), instruction), answers=answers, question=question,
            extra=extra,
        ))
    return items


# ----------------------------------------------------------------------------- scoring

def score_predictions(task: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics (percent) from records with "response" (or "error", scored 0) and "answers"."""
    layout = TASKS[task]
    if layout.metric == "llm_judge":
        # Filled in by the judge (`judge_one`, `mmvet_scores`); until then the predictions are only exported.
        return {"metric": "llm_judge", "score": None, "n": len(records), "errors": sum("error" in r for r in records)}
    metric = {"vqa_accuracy": vqa_accuracy, "anls": anls, "relaxed_accuracy": relaxed_accuracy}[layout.metric]
    scores, exact = [], []
    for record in records:
        response = record.get("response")
        scores.append(metric(response, record["answers"]) if response is not None else 0.0)
        exact.append(vqa_exact_match(response, record["answers"]) if response is not None else 0.0)
    result = {"metric": layout.metric, "score": percent(mean(scores)), "n": len(records),
              "errors": sum("error" in r for r in records)}
    if task in ("docvqa", "chartqa"):
        result["exact_match"] = percent(mean(exact))  # the reference's number for these two
    return result


# ----------------------------------------------------------------------------- MM-Vet judge

# MM-Vet's grading prompt (yuweihao/MM-Vet, mm-vet_evaluator.py): instructions and few-shot
# table; the question, ground truth and prediction are appended as the last table row.
MMVET_GRADER_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
JUDGE_TRIES = 5


def mmvet_grader_query(question: str, answer: str, prediction: str, retry: bool = False) -> str:
    """The judge's user message for one prediction (retry: the evaluator's second wording)."""
    row = " | ".join([question, answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> "), prediction, ""])
    return MMVET_GRADER_PROMPT + "\n" + row + (RETRY_SUFFIX if retry else "")


def parse_judge_score(content: str) -> float | None:
    """The score at the start of the judge's reply, if it is a number in [0, 1]."""
    try:
        score = float(content.strip().split(" ")[0].strip())
    except (ValueError, IndexError):
        return None
    return score if 0.0 <= score <= 1.0 else None


def chat_completion(endpoint: str, model: str, content: str, api_key: str | None, temperature: float,
                    max_tokens: int = 3, timeout: float = 120.0) -> str:
    """One call to an OpenAI-compatible `/chat/completions` endpoint; returns the reply text."""
    url = endpoint if endpoint.rstrip("/").endswith("/chat/completions") else endpoint.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "temperature": temperature}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read().decode("utf-8"))
    except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as error:
        raise RuntimeError(f"judge endpoint {url}: {error}") from error
    try:
        return str(reply["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError) as error:
        raise RuntimeError(f"judge endpoint {url} answered without choices[0].message.content: {reply}") from error


def judge_one(item: SpeechVQAItem, prediction: str, endpoint: str, model: str, api_key: str | None) -> dict[str, Any]:
    """Grade one prediction as MM-Vet's evaluator does: temperature 0, 3 tokens; on an
    unparsable reply ask again with the "(digit)" suffix at a temperature 0.5 higher, up to
    five tries, then score 0."""
    if not item.answers or item.question is None:
        raise ValueError(f"{item.id}: no ground truth/question for the judge (put mm-vet.json in the data root)")
    temperature, contents = 0.0, []
    content = chat_completion(endpoint, model, mmvet_grader_query(item.question, item.answers[0], prediction),
                              api_key, temperature)
    contents.append(content)
    score = parse_judge_score(content)
    while score is None and len(contents) < JUDGE_TRIES:
        temperature += 0.5
        content = chat_completion(endpoint, model, mmvet_grader_query(item.question, item.answers[0], prediction,
                                                                      retry=True), api_key, temperature)
        contents.append(content)
        score = parse_judge_score(content)
    return {"score": 0.0 if score is None else score, "judge_replies": contents, "judge_model": model}


def mmvet_scores(grades: Sequence[dict[str, Any]], items: Sequence[SpeechVQAItem]) -> dict[str, Any]:
    """Total and per-capability MM-Vet scores (percent) from judge grades ({"id", "score"})."""
    by_id = {item.id: item for item in items}
    scores = {g["id"]: float(g["score"]) for g in grades if "score" in g}
    capabilities: dict[str, list[float]] = {}
    for item_id, score in scores.items():
        for capability in by_id[item_id].extra.get("capability", []):
            capabilities.setdefault(capability, []).append(score)
    return {"score": percent(mean(list(scores.values())), 1), "graded": len(scores),
            "by_capability": {c: percent(mean(v), 1) for c, v in sorted(capabilities.items())}}
