"""The nano omni task: a synthetic world small enough for Lyra-Nano to learn on two CPU cores.

Everything is generated, deterministically from a seed, and cached on disk:

* **scenes** -- 84 x 84 images on a 3 x 3 grid of 28-pixel cells (one cell = one merged
  Qwen2-VL vision token), holding 1-4 copies of one shape (circle, square, triangle, cross) in
  one colour (red, green, blue, yellow, purple, orange), in random cells. Questions: what colour
  the shapes are, what shape they are, how many there are.
* **signs** -- 84 x 84 images with one printed word (cat, dog, sun, fish, bird, tree) in a
  coloured ink. Questions: what word is written, what colour the writing is. Training also has
  signs in inks that are none of the six colours (`DISTRACTOR_INKS`), asked only what they say,
  so that reading a word cannot lean on the ink it was seen in.
* **sounds** -- 1.5 s clips of tones and noise, each with a caption ("two high beeps",
  "a rising tone", "a burst of noise", ...). Question: what do you hear.
* **spoken questions** -- every distinct question text (38 of them) read by several offline
  TTS voices (`lyra.data.tts`: espeak-ng variants and Piper); the same recordings are reused
  across images, so a frozen Whisper encoder runs once per recording. Every question type has
  two phrasings.

Questions about *where* a shape is are not asked: at this scale the model did not learn them
(see docs/nano_results.md); the cells are still random and recorded in `media.json`.

Conversations are multi-turn (several questions about one image). The train / held-out split is
by content, never by sample: some colour x shape pairs and word x ink pairs occur only in
held-out images (`HELD_OUT_OBJECTS`, `HELD_OUT_SIGNS`), held-out sound clips have pitches and
lengths no training clip has (`SOUND_RANGES`), and the held-out questions ask about exactly
those. One TTS voice (`HELD_OUT_VOICE`) is never trained on.

    task = build_nano_task("outputs/nano/data", NanoTaskSpec(seed=0))
    task.files["base"]     # LLaVA-style JSON for each training phase (see `PHASE_FILES`)
    task.files["eval"]     # held-out conversations with `meta` (question types, answers)

Records follow `lyra.data.dataset` (`conversations`, `image`, `speech`, `sound`, `speech_asr`)
plus a `meta` object the trainer ignores: per assistant turn its question type, whether the
question was spoken, and the generator's ground truth.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from lyra.data.audio import SAMPLE_RATE, write_wav
from lyra.data.tts import make_backend, synthesize_16k
from lyra.data.units import format_units
from lyra.model.vocoder import load_vocoder
from lyra.utils.io import atomic_file, atomic_write_text

TASK_VERSION = 4  # bump when the generator's output changes for the same spec

# ----------------------------------------------------------------------------- the world
IMAGE_SIZE = 84  # pixels: 3 x 3 cells of 28, i.e. 3 x 3 merged vision tokens (patch 14, merge 2)
CELL = IMAGE_SIZE // 3
PATCH = 14  # the ViT's patch size
SIGN_FONT_SIZE = 26
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (230, 200, 20),
    "purple": (135, 50, 175),
    "orange": (245, 125, 20),
}
# Inks of the distractor signs: far from every named colour, never asked about.
DISTRACTOR_INKS: dict[str, tuple[int, int, int]] = {
    "black": (30, 30, 30),
    "grey": (125, 125, 125),
    "brown": (120, 70, 30),
    "pink": (240, 125, 190),
    "teal": (20, 145, 145),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = (  # row-major 3 x 3 grid
    "top left", "top", "top right",
    "left", "middle", "right",
    "bottom left", "bottom", "bottom right",
)
NUMBERS = ("zero", "one", "two", "three", "four")
WORDS = ("cat", "dog", "sun", "fish", "bird", "tree")
# Sound classes: (name, caption). Beeps vary in count and pitch; sweeps and noise have no pitch.
SOUNDS: dict[str, str] = {
    "beep1_low": "one low beep", "beep1_high": "one high beep",
    "beep2_low": "two low beeps", "beep2_high": "two high beeps",
    "beep3_low": "three low beeps", "beep3_high": "three high beeps",
    "rise": "a rising tone", "fall": "a falling tone", "noise": "a burst of noise",
}
SOUND_SECONDS = 1.5

# Held out: never in training media; the held-out questions are about these.
HELD_OUT_OBJECTS = frozenset({("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square")})
HELD_OUT_SIGNS = frozenset({("cat", "blue"), ("dog", "orange"), ("sun", "purple"), ("fish", "red"),
                            ("bird", "yellow"), ("tree", "green")})
# Sounds are held out by their parameters: held-out clips have pitches, sweep ranges and noise
# lengths that no training clip has (`SOUND_RANGES`).
SOUND_RANGES = {  # split -> parameter -> (low, high)
    "train": {"low": (280, 400), "high": (1100, 1400), "sweep_low": (250, 350), "sweep_high": (1300, 1700),
              "noise": (0.45, 0.75)},
    "eval": {"low": (410, 470), "high": (1420, 1560), "sweep_low": (360, 420), "sweep_high": (1150, 1280),
             "noise": (0.8, 0.95)},
}

QUESTION_TYPES = ("colour", "shape", "count", "word", "ink", "sound")
PHRASINGS = {  # two ways to ask each question type
    "colour": ("What colour are the shapes?", "Which colour do you see?"),
    "shape": ("What shape are they?", "Which shape is shown?"),
    "count": ("How many shapes are there?", "How many shapes do you see?"),
    "word": ("What word is written?", "What does the sign say?"),
    "ink": ("What colour is the writing?", "What colour is the ink?"),
    "sound": ("What do you hear?", "What is that sound?"),
}

# TTS voices: (name, backend, speaker parameters). Piper runs with zero noise so it is deterministic.
VOICES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("espeak-us-m1", "espeak-ng", {"voice": "en-us+m1", "pitch": 50, "rate": 160}),
    ("espeak-gb-f3", "espeak-ng", {"voice": "en-gb+f3", "pitch": 58, "rate": 150}),
    ("piper-joe", "piper", {"voice": 0, "speaker_id": None, "length_scale": 1.0, "noise_scale": 0.0,
                            "noise_w_scale": 0.0}),
    ("espeak-us-linda", "espeak-ng", {"voice": "en-us+linda", "pitch": 62, "rate": 170}),
)
HELD_OUT_VOICE = "espeak-us-linda"

PHASE_FILES = {
    "base": "base.json",  # text questions on scenes and signs, sound captions (LLM + ViT from scratch)
    "stage1": "stage1.json",  # spoken questions with transcripts (speech projector + LCMR)
    "stage2": "stage2.json",  # multi-turn, one turn spoken, plus spoken sound questions (MLoRA)
    "stage4": "stage4.json",  # one question (text or spoken) each, its answer's phoneme units (speech generator)
    "eval": "eval.json",  # held-out content, text and spoken questions
}
MEDIA_FILE = "media.json"  # what the generator put in every image and sound clip


@dataclass
class NanoTaskSpec:
    """What to generate. Equal specs give byte-identical files (`fingerprint`)."""

    seed: int = 0
    train_scenes: int = 1600
    train_signs: int = 1500
    train_distractor_signs: int = 500  # signs in `DISTRACTOR_INKS`, asked only what they say
    train_sound_clips: int = 20  # per sound class
    eval_scenes: int = 120
    eval_signs: int = 40
    eval_sound_clips: int = 6  # per sound class
    base_records: int = 4000  # text conversations for the base phase
    base_sound_fraction: float = 0.2  # the fraction of base records that ask about a sound clip
    base_multi_turn: float = 1.0  # the fraction of base image conversations with every question, not one
    stage1_records: int = 1600  # single spoken question each
    stage2_records: int = 1600
    stage2_sound_fraction: float = 0.2  # the fraction of stage-2 records with a spoken question about a sound
    stage4_records: int = 800  # single questions whose answers carry `tgt_unit` (stage 4)
    stage4_spoken_fraction: float = 0.5  # the fraction of them asked in speech (the others in text)
    stage4_sound_fraction: float = 0.2  # the fraction of them about a sound clip
    unit_vocoder: str = "piper:en_US-joe-medium"  # whose phoneme ids the answers' units are
    speech: bool = True  # synthesise spoken questions (False: images and sounds only, for tests)

    def fingerprint(self) -> str:
        blob = json.dumps({"version": TASK_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- drawing
def _rng(seed: int, *tags: int | str) -> np.random.Generator:
    """An independent stream per (seed, tags): reordering generation never changes a sample."""
    words = [seed] + [int(hashlib.sha1(str(t).encode()).hexdigest()[:8], 16) for t in tags]
    return np.random.default_rng(words)


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: int = 18) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _background(rng: np.random.Generator) -> Image.Image:
    base = rng.integers(215, 250)
    pixels = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), base, dtype=np.int16)
    pixels += rng.integers(-6, 7, size=(1, 1, 3)).astype(np.int16)  # a faint tint
    pixels += rng.normal(0, 3, size=pixels.shape).round().astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill) -> None:
    """One shape of diameter `size` centred on (cx, cy)."""
    r = size / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render_scene(objects: list[dict[str, Any]], rng: np.random.Generator) -> Image.Image:
    """`objects`: [{"colour", "shape", "cell"}], at most one per cell of the 3 x 3 grid."""
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        row, col = divmod(obj["cell"], 3)
        size = rng.uniform(18, 24)
        cx = col * CELL + CELL / 2 + rng.uniform(-1.5, 1.5)
        cy = row * CELL + CELL / 2 + rng.uniform(-1.5, 1.5)
        draw_shape(draw, obj["shape"], cx, cy, size, _jitter(COLOURS[obj["colour"]], rng))
    return image


_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int) -> ImageFont.FreeTypeFont:
    if size not in _FONTS:  # Pillow's bundled font: the same glyphs on every machine
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def render_sign(word: str, ink: str, rng: np.random.Generator) -> Image.Image:
    """A printed word in a coloured ink, bold, at a random place on the 14-pixel patch grid that
    keeps it whole (a from-scratch ViT learns to read aligned bold glyphs in a CPU budget;
    thin glyphs at arbitrary offsets it did not, docs/nano_results.md)."""
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    font = _font(SIGN_FONT_SIZE)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font, stroke_width=2)
    width, height = right - left, bottom - top
    x = PATCH * int(rng.integers(0, (IMAGE_SIZE - width) // PATCH + 1)) - left
    y = PATCH * int(rng.integers(0, (IMAGE_SIZE - height) // PATCH + 1)) - top
    fill = _jitter({**COLOURS, **DISTRACTOR_INKS}[ink], rng, 12)
    draw.text((x, y), word, font=font, fill=fill, stroke_width=2, stroke_fill=fill)
    return image


def render_sound(kind: str, rng: np.random.Generator, split: str = "train") -> np.ndarray:
    """A `SOUND_SECONDS` clip of class `kind` (a key of `SOUNDS`), 16 kHz mono float32, with the
    parameter ranges of `split` (`SOUND_RANGES`)."""
    ranges = SOUND_RANGES[split]
    n = int(SOUND_SECONDS * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    audio = np.zeros(n, np.float64)
    amplitude = rng.uniform(0.25, 0.5)

    def envelope(start: float, length: float) -> np.ndarray:
        inside = (t >= start) & (t < start + length)
        ramp = np.clip(np.minimum(t - start, start + length - t) / 0.01, 0, 1)  # 10 ms fades
        return np.where(inside, ramp, 0.0)

    if kind.startswith("beep"):
        count, pitch = int(kind[4]), kind.split("_")[1]
        freq = rng.uniform(*ranges[pitch])
        length, gap = rng.uniform(0.12, 0.18), rng.uniform(0.12, 0.2)
        start = rng.uniform(0.05, SOUND_SECONDS - count * (length + gap))
        for k in range(count):
            audio += envelope(start + k * (length + gap), length) * np.sin(2 * np.pi * freq * t)
    elif kind in ("rise", "fall"):
        low, high = rng.uniform(*ranges["sweep_low"]), rng.uniform(*ranges["sweep_high"])
        start, length = rng.uniform(0.05, 0.3), rng.uniform(0.8, 1.0)
        progress = np.clip((t - start) / length, 0, 1)
        freq = low + (high - low) * (progress if kind == "rise" else 1 - progress)
        phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
        audio += envelope(start, length) * np.sin(phase)
    elif kind == "noise":
        length = rng.uniform(*ranges["noise"])
        start = rng.uniform(0.05, SOUND_SECONDS - length - 0.05)
        audio += envelope(start, length) * rng.uniform(-1, 1, n)
    else:
        raise ValueError(f"unknown sound class {kind!r}; known: {sorted(SOUNDS)}")
    audio = amplitude * audio + rng.normal(0, 0.003, n)
    return audio.astype(np.float32)


# ----------------------------------------------------------------------------- content
def allowed_objects(split: str) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return [p for p in pairs if p not in HELD_OUT_OBJECTS] if split == "train" else pairs


def sample_scene(rng: np.random.Generator, split: str) -> list[dict[str, Any]]:
    """1-4 copies of one colour x shape pair in distinct cells: a training pair for "train", a
    held-out pair for "eval"."""
    pairs = allowed_objects("train") if split == "train" else sorted(HELD_OUT_OBJECTS)
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    cells = rng.choice(9, size=int(rng.integers(1, 5)), replace=False)
    return [{"colour": colour, "shape": shape, "cell": int(k)} for k in sorted(cells)]


def ask(qtype: str, answer: str, rng: np.random.Generator) -> dict[str, str]:
    phrasing = PHRASINGS[qtype][int(rng.integers(len(PHRASINGS[qtype])))]
    return {"type": qtype, "question": phrasing, "answer": answer}


def scene_questions(objects: list[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, str]]:
    """One question of each scene type, each in a random phrasing."""
    return [ask("colour", objects[0]["colour"], rng), ask("shape", objects[0]["shape"], rng),
            ask("count", NUMBERS[len(objects)], rng)]


def sign_questions(word: str, ink: str, rng: np.random.Generator) -> list[dict[str, str]]:
    """What the sign says and, for the six named inks only, its colour."""
    return [ask("word", word, rng)] + ([ask("ink", ink, rng)] if ink in COLOURS else [])


def answer_question(content: dict[str, Any], question: str) -> str | None:
    """Answer a question from a medium's ground truth (`media.json`) alone: an independent check
    of the generator, which parses the question instead of reusing the answer it stored."""
    qtype = next((t for t, texts in PHRASINGS.items() if question in texts), None)
    if content["kind"] == "scene" and qtype in ("colour", "shape", "count"):
        objects = content["objects"]
        if qtype == "count":
            return NUMBERS[len(objects)]
        values = {o[qtype] for o in objects}
        return values.pop() if len(values) == 1 else None
    if content["kind"] == "sign" and (qtype == "word" or (qtype == "ink" and content["ink"] in COLOURS)):
        return content[qtype]
    if content["kind"] == "sound" and qtype == "sound":
        return SOUNDS[content["class"]]
    return None


def all_answers() -> list[str]:
    """Every answer the task can expect (the closed set a spoken answer is judged against)."""
    return [*COLOURS, *SHAPES, *NUMBERS[1:5], *WORDS, *SOUNDS.values()]


def all_question_texts() -> list[str]:
    """Every distinct question the task asks (the spoken set)."""
    return [text for texts in PHRASINGS.values() for text in texts]


def utterance_name(text: str, voice: str) -> str:
    slug = "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")
    return f"speech/{voice}/{slug}.wav"


# ----------------------------------------------------------------------------- building
@dataclass
class NanoTask:
    """A generated task on disk: `files[phase]` are JSON record files (see `PHASE_FILES`)."""

    root: Path
    spec: NanoTaskSpec
    files: dict[str, Path]
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.manifest["data_hash"]

    def records(self, phase: str) -> list[dict[str, Any]]:
        return json.loads(self.files[phase].read_text())

    def media(self) -> dict[str, dict[str, Any]]:
        """Ground truth per media path: scene objects, sign word and ink, sound class."""
        return json.loads((self.root / MEDIA_FILE).read_text())


class _Writer:
    """Writes media under `root` once each, remembering a content hash of everything written."""

    def __init__(self, root: Path):
        self.root = root
        self.hashes: dict[str, str] = {}

    def image(self, relative: str, image: Image.Image) -> str:
        with atomic_file(self.root / relative) as temporary:
            image.save(temporary, format="PNG", optimize=False)
        self.hashes[relative] = hashlib.sha1(np.asarray(image).tobytes()).hexdigest()
        return relative

    def audio(self, relative: str, samples: np.ndarray) -> str:
        write_wav(self.root / relative, samples)
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)  # what the 16-bit WAV holds
        self.hashes[relative] = hashlib.sha1(pcm.tobytes()).hexdigest()
        return relative


def _turns(qas: list[dict[str, str]], first_prefix: str, spoken: set[int] | None = None) -> list[dict[str, str]]:
    conversation = []
    for k, qa in enumerate(qas):
        asked = "<speech>" if spoken and k in spoken else qa["question"]
        value = f"{first_prefix}\n{asked}" if k == 0 else asked
        conversation += [{"from": "human", "value": value}, {"from": "gpt", "value": qa["answer"]}]
    return conversation


def _record(rid: str, media_key: str, media_path: str, qas: list[dict[str, str]], spoken: set[int],
            voices: list[str], placeholder: str) -> dict[str, Any]:
    record: dict[str, Any] = {"id": rid, media_key: media_path,
                              "conversations": _turns(qas, placeholder, spoken)}
    order = sorted(spoken)
    if order:
        record["speech"] = [utterance_name(qas[k]["question"], voices[i]) for i, k in enumerate(order)]
        record["speech_asr"] = [qas[k]["question"] for k in order]
    record["meta"] = {"types": [qa["type"] for qa in qas], "answers": [qa["answer"] for qa in qas],
                      "questions": [qa["question"] for qa in qas], "spoken": [k in spoken for k in range(len(qas))],
                      "voices": [voices[order.index(k)] if k in spoken else None for k in range(len(qas))]}
    return record


def all_spoken(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with every question asked in speech by the voice of its spoken turn (every
    question is recorded in every training voice, so the recordings exist)."""
    meta = record["meta"]
    voice = next(v for v in meta["voices"] if v is not None)
    media_key, placeholder = ("sound", "<sound>") if "sound" in record else ("image", "<image>")
    qas = [{"question": q, "answer": a, "type": t} for q, a, t in zip(meta["questions"], meta["answers"], meta["types"])]
    turns = range(len(qas))
    return _record(record["id"], media_key, record[media_key], qas, set(turns), [voice for _ in turns], placeholder)


def build_nano_task(root: str | Path, spec: NanoTaskSpec | None = None, progress: bool = True,
                    force: bool = False) -> NanoTask:
    """Generate the task under `root` (or reuse it when `root/manifest.json` matches `spec`)."""
    spec = spec or NanoTaskSpec()
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not force and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        files = {phase: root / name for phase, name in PHASE_FILES.items()}
        if manifest.get("spec_hash") == spec.fingerprint() and all(f.is_file() for f in files.values()):
            return NanoTask(root, spec, files, manifest)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    writer = _Writer(root)
    seed = spec.seed

    # Media: scenes, signs, sounds (train and held-out content never mix).
    scenes: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {"train": [], "eval": []}
    for split, count in (("train", spec.train_scenes), ("eval", spec.eval_scenes)):
        for i in tqdm(range(count), desc=f"nano data: {split} scenes", disable=not progress, leave=False):
            rng = _rng(seed, "scene", split, i)
            objects = sample_scene(rng, split)
            path = writer.image(f"images/{split}/scene_{i:05d}.png", render_scene(objects, rng))
            scenes[split].append((path, objects))
    signs: dict[str, list[tuple[str, str, str]]] = {"train": [], "eval": []}
    sign_pairs = {"train": [(w, c) for w in WORDS for c in COLOURS if (w, c) not in HELD_OUT_SIGNS],
                  "eval": sorted(HELD_OUT_SIGNS)}
    for split, count in (("train", spec.train_signs), ("eval", spec.eval_signs)):
        for i in range(count):
            rng = _rng(seed, "sign", split, i)
            word, ink = sign_pairs[split][int(rng.integers(len(sign_pairs[split])))]
            path = writer.image(f"images/{split}/sign_{i:05d}.png", render_sign(word, ink, rng))
            signs[split].append((path, word, ink))
    for i in range(spec.train_distractor_signs):
        rng = _rng(seed, "distractor-sign", i)
        word, ink = WORDS[int(rng.integers(len(WORDS)))], list(DISTRACTOR_INKS)[int(rng.integers(len(DISTRACTOR_INKS)))]
        path = writer.image(f"images/train/distractor_sign_{i:05d}.png", render_sign(word, ink, rng))
        signs["train"].append((path, word, ink))
    sounds: dict[str, list[tuple[str, str]]] = {"train": [], "eval": []}
    for split, per_class in (("train", spec.train_sound_clips), ("eval", spec.eval_sound_clips)):
        for kind in SOUNDS:
            for j in range(per_class):
                rng = _rng(seed, "sound", split, kind, j)
                clip = render_sound(kind, rng, split)
                sounds[split].append((writer.audio(f"sounds/{split}/{kind}_{j}.wav", clip), kind))

    train_voices = [name for name, _, _ in VOICES if name != HELD_OUT_VOICE]
    if spec.speech:
        synthesize_questions(root, writer, [name for name, _, _ in VOICES], progress)

    def image_qas(split: str, rng: np.random.Generator) -> tuple[str, list[dict[str, str]]]:
        """An image (scene or sign; 3 in 4 are scenes) and every question about it, shuffled."""
        if rng.random() < 0.75:
            path, objects = scenes[split][int(rng.integers(len(scenes[split])))]
            options = scene_questions(objects, rng)
        else:
            path, word, ink = signs[split][int(rng.integers(len(signs[split])))]
            options = sign_questions(word, ink, rng)
        return path, [options[int(k)] for k in rng.permutation(len(options))]

    def sound_qa(split: str, rng: np.random.Generator) -> tuple[str, list[dict[str, str]]]:
        path, kind = sounds[split][int(rng.integers(len(sounds[split])))]
        return path, [ask("sound", SOUNDS[kind], rng)]

    records: dict[str, list[dict[str, Any]]] = {phase: [] for phase in PHASE_FILES}
    for i in range(spec.base_records):  # text questions about images and sound clips
        rng = _rng(seed, "base", i)
        if rng.random() < spec.base_sound_fraction:
            path, qas = sound_qa("train", rng)
            records["base"].append(_record(f"base-{i}", "sound", path, qas, set(), [], "<sound>"))
        else:
            path, qas = image_qas("train", rng)
            turns = len(qas) if rng.random() < spec.base_multi_turn else 1
            records["base"].append(_record(f"base-{i}", "image", path, qas[:turns], set(), [], "<image>"))
    if spec.speech:
        for i in range(spec.stage1_records):  # one spoken question about an image
            rng = _rng(seed, "stage1", i)
            path, qas = image_qas("train", rng)
            voice = train_voices[int(rng.integers(len(train_voices)))]
            records["stage1"].append(_record(f"stage1-{i}", "image", path, qas[:1], {0}, [voice], "<image>"))
        for i in range(spec.stage2_records):  # two turns, one of them spoken; or a spoken sound question
            rng = _rng(seed, "stage2", i)
            voice = train_voices[int(rng.integers(len(train_voices)))]
            if rng.random() < spec.stage2_sound_fraction:
                path, qas = sound_qa("train", rng)
                records["stage2"].append(_record(f"stage2-{i}", "sound", path, qas, {0}, [voice], "<sound>"))
                continue
            path, qas = image_qas("train", rng)
            qas = qas[:2]
            spoken = {int(rng.integers(len(qas)))}
            records["stage2"].append(_record(f"stage2-{i}", "image", path, qas, spoken, [voice], "<image>"))
    if spec.speech:
        voice_units = _answer_units(spec.unit_vocoder)
        for i in range(spec.stage4_records):  # one question, in text or speech; the answer's units
            rng = _rng(seed, "stage4", i)
            if rng.random() < spec.stage4_sound_fraction:
                (path, qas), key, placeholder = sound_qa("train", rng), "sound", "<sound>"
            else:
                (path, qas), key, placeholder = image_qas("train", rng), "image", "<image>"
            spoken = {0} if rng.random() < spec.stage4_spoken_fraction else set()
            voice = [train_voices[int(rng.integers(len(train_voices)))]]
            record = _record(f"stage4-{i}", key, path, qas[:1], spoken, voice, placeholder)
            record["tgt_unit"] = format_units(voice_units(qas[0]["answer"]))
            records["stage4"].append(record)
    # Held-out: every scene and sign with two questions, as text, spoken (first or second turn,
    # alternately) by a training voice, and spoken by the held-out voice; every sound clip.
    eval_records = records["eval"]
    held_media = [(p, "scene") for p, _ in scenes["eval"]] + [(p, "sign") for p, _, _ in signs["eval"]]
    for i, (path, kind) in enumerate(held_media):
        rng = _rng(seed, "eval", i)
        if kind == "scene":
            options = scene_questions(scenes["eval"][i][1], rng)
        else:
            _, word, ink = signs["eval"][i - len(scenes["eval"])]
            options = sign_questions(word, ink, rng)
        order = rng.permutation(len(options))
        for pair in range(0, len(order) - 1, 2):
            qas = [options[int(order[pair])], options[int(order[pair + 1])]]
            rid = f"eval-{i}-{pair // 2}"
            eval_records.append(_record(f"{rid}-text", "image", path, qas, set(), [], "<image>"))
            if spec.speech:
                turn = (i + pair // 2) % 2
                voice = train_voices[int(rng.integers(len(train_voices)))]
                eval_records.append(_record(f"{rid}-speech", "image", path, qas, {turn}, [voice], "<image>"))
                eval_records.append(_record(f"{rid}-voice", "image", path, qas, {turn}, [HELD_OUT_VOICE],
                                            "<image>"))
        if len(order) % 2:  # the odd question out, alone
            qas = [options[int(order[-1])]]
            eval_records.append(_record(f"eval-{i}-last-text", "image", path, qas, set(), [], "<image>"))
            if spec.speech:
                voice = train_voices[int(rng.integers(len(train_voices)))]
                eval_records.append(_record(f"eval-{i}-last-speech", "image", path, qas, {0}, [voice], "<image>"))
                eval_records.append(_record(f"eval-{i}-last-voice", "image", path, qas, {0}, [HELD_OUT_VOICE],
                                            "<image>"))
    for j, (path, kind) in enumerate(sounds["eval"]):
        qas = [ask("sound", SOUNDS[kind], _rng(seed, "eval-sound", j))]
        eval_records.append(_record(f"eval-sound-{j}-text", "sound", path, qas, set(), [], "<sound>"))
        if spec.speech:
            voice = train_voices[j % len(train_voices)]
            eval_records.append(_record(f"eval-sound-{j}-speech", "sound", path, qas, {0}, [voice], "<sound>"))
    for record in eval_records:
        record["meta"]["held_out"] = True

    content_of = {path: {"kind": "scene", "objects": objects} for split in scenes for path, objects in scenes[split]}
    content_of.update({path: {"kind": "sign", "word": word, "ink": ink}
                       for split in signs for path, word, ink in signs[split]})
    content_of.update({path: {"kind": "sound", "class": kind} for split in sounds for path, kind in sounds[split]})
    atomic_write_text(root / MEDIA_FILE, json.dumps(content_of, indent=0) + "\n")
    files = {}
    for phase, name in PHASE_FILES.items():
        files[phase] = root / name
        atomic_write_text(files[phase], json.dumps(records[phase], indent=0) + "\n")
    content = hashlib.sha256()
    for relative in sorted(writer.hashes):
        content.update(f"{relative}:{writer.hashes[relative]}\n".encode())
    for name in [*PHASE_FILES.values(), MEDIA_FILE]:
        content.update((root / name).read_bytes())
    manifest = {
        "spec": dataclasses.asdict(spec), "spec_hash": spec.fingerprint(), "version": TASK_VERSION,
        "data_hash": content.hexdigest()[:16], "counts": {phase: len(r) for phase, r in records.items()},
        "media": len(writer.hashes),
        "held_out": {"objects": sorted(HELD_OUT_OBJECTS), "signs": sorted(HELD_OUT_SIGNS),
                     "sounds": SOUND_RANGES, "voice": HELD_OUT_VOICE},
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return NanoTask(root, spec, files, manifest)


def _answer_units(vocoder: str):
    """Answer text -> the phoneme units that `vocoder` (a Piper voice) speaks, memoised."""
    voice = load_vocoder(vocoder)
    if not hasattr(voice, "text_to_units"):
        raise ValueError(f"nano stage-4 units need a Piper voice (phoneme units); {vocoder!r} is a {voice.unit_kind} "
                         f"vocoder")
    cache: dict[str, list[int]] = {}
    return lambda text: cache.setdefault(text, voice.text_to_units(text))


def synthesize_questions(root: Path, writer: _Writer, voices: Iterable[str], progress: bool = True) -> None:
    """Every question text of `all_question_texts()` read by each voice, as 16 kHz WAV."""
    table = {name: (backend, speaker) for name, backend, speaker in VOICES}
    backends: dict[str, Any] = {}
    jobs = [(text, voice) for voice in voices for text in all_question_texts()]
    for text, voice in tqdm(jobs, desc="nano data: spoken questions (TTS)", disable=not progress, leave=False):
        backend_name, speaker = table[voice]
        if backend_name not in backends:
            backends[backend_name] = make_backend(backend_name)
        writer.audio(utterance_name(text, voice), synthesize_16k(backends[backend_name], text, speaker))

