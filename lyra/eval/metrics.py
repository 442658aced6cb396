"""Scoring functions for Lyra's benchmarks: pure, typed, no model calls.

Definitions (and where they come from):

* VQA accuracy (TextVQA^S). Answers are normalised as the EvalAI answer processor that
  the TextVQA evaluation (and the reference's `m4c_evaluator`) applies to prediction and
  ground truths alike: lower-case, drop "," and "?", split "'s", remove or space out
  punctuation, drop periods not followed by a digit, number words zero..ten -> digits
  ("none" -> "0"), drop articles, restore apostrophes of common contractions. The score of
  a prediction against the 10 human answers is the mean, over the 10 leave-one-out subsets
  of 9 answers, of min(#matches / 3, 1) (Antol et al., 2015; GT-Vision-Lab/VQA `vqaEval.py`).
* ANLS (DocVQA^S). s = 1 - NL(prediction, answer) when NL < 0.5 else 0, maximised over the
  ground truths, NL being the Levenshtein distance over the longer length; both strings
  lower-cased, trimmed and with runs of spaces collapsed (Biten et al., 2019, ST-VQA; the
  RRC DocVQA evaluation).
* Relaxed accuracy (ChartQA^S). A numeric answer is right when within 5 % of the gold
  number (a trailing "%" divides by 100), any other answer needs a case-insensitive exact
  match (Masry et al., 2022, Sec. 5.1; pix2struct's `relaxed_correctness`).
* WER (LibriSpeech). Whisper's `EnglishTextNormalizer` on both sides, then the corpus rate
  sum(word edits) / sum(reference words) (Radford et al., 2022; equal to `jiwer.wer` over
  lists).
* Option letters (VideoMME) and the long-speech sufficiency answer of the paper's Fig. 8
  ("yes" + letter when the audio suffices, else "no").
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

# ----------------------------------------------------------------------------- VQA accuracy

# Contractions written without apostrophes -> with them (the EvalAI/VQA table, ASCII quotes).
# Kept as the official table has it, quirks included: "somebody'd" maps to "somebodyd", and the
# capitalised keys ("Im", "Ive", ...) never fire because words are lower-cased first.
_CONTRACTION_TABLE = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll
someones someone's|somethingd something'd|somethingd've something'd've|something'dve something'd've
somethingll something'll|thats that's|thered there'd|thered've there'd've|there'dve there'd've
therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll
theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've
werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's
whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've
wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't
wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all
yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've
youd you'd|youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS: dict[str, str] = dict(
    pair.split(" ") for pair in _CONTRACTION_TABLE.replace("\n", "|").split("|") if pair.strip()
)
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# Removed outright when written against a space (or when the text holds a digit-comma-digit),
# else replaced by a space: "x-ray" -> "x ray", "yes !" -> "yes".
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its look-behind is mistyped as a look-ahead that
# always succeeds, so in effect every period not followed by a digit goes ("3.5" stays, "5." -> "5").
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def normalize_vqa_answer(answer: str) -> str:
    """The EvalAI/VQA answer normalisation (see the module docstring), e.g.
    `"Two dogs!"` -> `"2 dogs"`, `"The Man's hat."` -> `"man 's hat"`, `"dont"` -> `"don't"`."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original = text
    spaced_or_numeric = _DIGIT_COMMA_DIGIT.search(original) is not None
    for mark in PUNCTUATION:
        if spaced_or_numeric or mark + " " in original or " " + mark in original:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = [NUMBER_WORDS.get(word, word) for word in text.split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy of `prediction` against the human `answers` (10 in VQA/TextVQA).

    Mean over the leave-one-out subsets (each answer left out once) of min(#matches / 3, 1),
    after `normalize_vqa_answer` on every string. One match of ten scores 0.3, two 0.6, three
    0.9, four or more 1.0. With a single answer the subsets would be empty, so it is an exact
    match instead.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    predicted = normalize_vqa_answer(prediction)
    matches = sum(normalize_vqa_answer(a) == predicted for a in answers)
    n = len(answers)
    if n == 1:
        return float(matches)
    # Leaving out a non-matching answer leaves `matches` matches; leaving out a matching one, one fewer.
    return ((n - matches) * min(matches / 3, 1.0) + matches * min((matches - 1) / 3, 1.0)) / n


def vqa_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer (the reference's
    `STVQAAccuracyEvaluator`, which it reports for DocVQA^S and ChartQA^S)."""
    predicted = normalize_vqa_answer(prediction)
    return float(any(normalize_vqa_answer(a) == predicted for a in answers))


# ----------------------------------------------------------------------------- edit distances

def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1) between two
    sequences: characters of strings, or words of token lists (rapidfuzz, jiwer's engine)."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(a, b))


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def normalized_levenshtein(a: str, b: str) -> float:
    """Levenshtein distance over the longer length, in [0, 1] (0 when both are empty)."""
    longest = max(len(a), len(b))
    return levenshtein(a, b) / longest if longest else 0.0


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one prediction: the best, over the ground
    truths, of 1 - NL when NL < `threshold`, else 0 (strings lower-cased, trimmed, spaces collapsed)."""
    if not answers:
        raise ValueError("anls needs at least one ground-truth answer")
    predicted = _anls_text(prediction)
    best = 0.0
    for answer in answers:
        distance = normalized_levenshtein(predicted, _anls_text(answer))
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


# ----------------------------------------------------------------------------- relaxed accuracy

def _as_number(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed correctness of one prediction against one gold answer.

    Both numbers: |prediction - target| <= tolerance * |target| (a gold 0 needs an exact 0,
    the limit of that rule). Otherwise: case-insensitive exact match of the trimmed strings.
    """
    predicted, gold = prediction.strip(), target.strip()
    predicted_number, gold_number = _as_number(predicted), _as_number(gold)
    if predicted_number is not None and gold_number is not None:
        return abs(predicted_number - gold_number) <= tolerance * abs(gold_number)
    return predicted.lower() == gold.lower()


def relaxed_accuracy(prediction: str, answers: str | Sequence[str], tolerance: float = 0.05) -> float:
    """1.0 when `prediction` is relaxed-correct for any of `answers` (ChartQA has one), else 0.0."""
    targets = [answers] if isinstance(answers, str) else list(answers)
    if not targets:
        raise ValueError("relaxed_accuracy needs at least one gold answer")
    return float(any(relaxed_match(prediction, target, tolerance) for target in targets))


# ----------------------------------------------------------------------------- WER

@functools.lru_cache(maxsize=1)
def whisper_normalizer() -> Callable[[str], str]:
    """Whisper's English text normaliser (spelling, numbers, punctuation), built once."""
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()


@dataclass(frozen=True)
class WERStats:
    """Corpus word error rate: `errors` word edits over `reference_words` reference words."""

    errors: int
    reference_words: int
    utterances: int

    @property
    def wer(self) -> float:
        if self.reference_words == 0:
            raise ValueError("WER is undefined: the references hold no words after normalisation")
        return self.errors / self.reference_words


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str],
               normalizer: Callable[[str], str] | None = None) -> WERStats:
    """Word errors of `hypotheses` against `references`, summed over the corpus.

    Args:
        normalizer: applied to every string before splitting into words; default Whisper's
            `EnglishTextNormalizer`. Pass `str` to score the raw text.
    """
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    normalize = normalizer or whisper_normalizer()
    pairs = [(" ".join(normalize(r).split()), " ".join(normalize(h).split())) for r, h in zip(references, hypotheses)]
    scored = [(r, h) for r, h in pairs if r]  # jiwer needs words in every reference
    errors = sum(len(h.split()) for r, h in pairs if not r)  # the rest: every word inserted
    if scored:
        counts = jiwer.process_words([r for r, _ in scored], [h for _, h in scored])
        errors += counts.substitutions + counts.deletions + counts.insertions
    words = sum(len(r.split()) for r, _ in scored)
    return WERStats(errors=errors, reference_words=words, utterances=len(references))


# ----------------------------------------------------------------------------- option letters

_MARKUP = re.compile(r"[*_`#]+")
_LEADING_VERDICT = re.compile(r"^\s*(yes|no)\b[\s,.:;!\-]*", re.IGNORECASE)
# Key words match in any case; a bare letter only as a capital (so "the answer is a cat" is no
# "A"), a bracketed one in either case.
_KEYWORD_LETTER = (
    r"\b(?i:answer|option|choice)s?\b(?:\s+(?i:is|would\s+be|should\s+be|will\s+be))?\s*[:=]?\s*"
    r"(?:(?i:option|choice)\s+)?(?:[(\[]\s*((?i:[{letters}]))\s*[)\]]|([{letters}])[.,:;!]?(?![\w']))"
)
# Words after a capital "A" that show it is a letter, not the article ("A and B", "A is wrong").
_AFTER_LETTER = frozenset({"and", "or", "nor", "is", "was", "would", "should", "seems", "looks", "fits", "because",
                           "since", "but", "as"})


def _letter_patterns(letters: str) -> list[re.Pattern]:
    return [
        # The whole reply is one letter, maybe bracketed or followed by a mark: "B", "(b)", "C."
        re.compile(rf"^[(\[]?\s*([{letters}])\s*[)\]]?[.:,;!]?$", re.IGNORECASE),
        # A leading letter with a delimiter: "B. a cat", "(b) a cat", "B) ...", "B: ...", "B, because".
        re.compile(rf"^[(\[]\s*((?i:[{letters}]))\s*[)\]]|^([{letters}])\s*[).:,;]"),
        # A leading letter used as a name: "B is correct", "C would be ...".
        re.compile(rf"^([{letters}])\s+(?:is|would|should|seems|looks|fits)\b"),
        # "The answer is B", "answer: (C)", "Option B is ...", "the correct choice would be D".
        re.compile(_KEYWORD_LETTER.format(letters=letters)),
        # A bracketed letter anywhere: "I think (C) fits".
        re.compile(rf"[(\[]\s*((?i:[{letters}]))\s*[)\]]"),
    ]


def extract_option_letter(response: str, letters: str = "ABCD",
                          options: Mapping[str, str] | None = None) -> str | None:
    """The option letter a multiple-choice reply chose, or None when it names none (or names
    several different letters without saying which is the answer).

    Understands "B", "(B)", "B.", "B) text", "The answer is B", "Option B is ...", "yes, C",
    "**C**" and a lone capital letter in a sentence ("I would say C here"); the article "A"
    before a lower-case word ("A cat sits") is not a choice. With `options` (letter -> text),
    a reply that quotes exactly one option's text picks that option.
    """
    text = _MARKUP.sub("", response).strip()
    text = _LEADING_VERDICT.sub("", text, count=1).strip()
    if not text:
        return None
    letters = "".join(sorted(set(letters.upper())))
    for pattern in _letter_patterns(letters):
        match = pattern.search(text)
        if match:
            return next(group for group in match.groups() if group).upper()
    # A lone capital letter, not part of a word, and not the article "A" (or "I") before a lower-case word.
    candidates = set()
    for match in re.finditer(rf"(?<![\w'])([{letters}])(?![\w'])", text):
        following = re.match(r"\s+([a-z]+)", text[match.end():])
        if match.group(1) in "AI" and following and following.group(1) not in _AFTER_LETTER:
            continue
        candidates.add(match.group(1))
    if len(candidates) == 1:
        return candidates.pop()
    if options:
        quoted = [letter for letter, option in options.items()
                  if (normalized := _option_text(option)) and normalized in _option_text(text)]
        if len(quoted) == 1:
            return quoted[0].upper()
    return None


def _option_text(text: str) -> str:
    text = re.sub(r"^\s*[(\[]?[A-Za-z][)\].:]\s+", "", text)  # "A. Paris" -> "Paris"
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass(frozen=True)
class Sufficiency:
    """A long-speech VideoMME reply (paper, Fig. 8): was the audio enough, and which letter.

    `verdict` is "yes", "no" or None (the reply said neither); `letter` the chosen option.
    """

    verdict: str | None
    letter: str | None

    @property
    def answered(self) -> bool:
        """The model claimed the audio suffices and named an option (a bare letter counts)."""
        return self.verdict != "no" and self.letter is not None


_SENTENCE_VERDICT = re.compile(r"(?:^|[.,:;!]\s*)(yes|no)\s*(?:[.,:;!]|$)", re.IGNORECASE)


def parse_sufficiency(response: str, letters: str = "ABCD",
                      options: Mapping[str, str] | None = None) -> Sufficiency:
    """Parse a reply to the Fig. 8 prompt: "yes" + letter when the audio suffices, else "no".

    The verdict is the reply's first word when that is yes/no, else a clause that is just
    "yes"/"no" ("Based on the audio, yes. B"). "no" means unanswered whatever follows; without
    a verdict, a named option counts as an answer.
    """
    text = _MARKUP.sub("", response).strip()
    lead = _LEADING_VERDICT.match(text)
    clause = lead or _SENTENCE_VERDICT.search(text)
    verdict = clause.group(1).lower() if clause else None
    if verdict == "no":
        return Sufficiency("no", None)
    return Sufficiency(verdict, extract_option_letter(text, letters, options))


# ----------------------------------------------------------------------------- aggregation

def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean, None for an empty sequence (so empty groups show as null, not 0)."""
    return sum(values) / len(values) if values else None


def percent(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(100.0 * value, digits)
