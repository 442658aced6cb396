"""Scoring functions against hand-worked cases and the benchmarks' own definitions."""

from __future__ import annotations

import itertools
import random

import jiwer
import pytest

from lyra.eval.metrics import (
    Sufficiency, anls, corpus_wer, extract_option_letter, levenshtein, normalize_vqa_answer, normalized_levenshtein,
    parse_sufficiency, relaxed_accuracy, relaxed_match, vqa_accuracy, vqa_exact_match, whisper_normalizer,
)

# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("raw, normalized", [
    ("Two dogs!", "2 dogs"),  # number word, "!" against no space -> dropped at the end
    ("The Man's hat.", "man 's hat"),  # lower-case, article, "'s" split, final period
    ("dont", "don't"),  # contraction restored
    ("isnt it", "isn't it"),
    ("x-ray", "x ray"),  # punctuation inside a word becomes a space
    ("yes !", "yes"),  # punctuation next to a space is removed
    ("3.5", "3.5"),  # a period before a digit stays
    ("5.", "5"),
    ("one, two", "1 2"),  # commas go before anything else
    ("an apple", "apple"),
    ("none", "0"),
    ("  Ten\tapples\n", "10 apples"),
    ("what?", "what"),
    ("(left)", "left"),
])
def test_vqa_normalisation(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def _official_vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The definition, literally: average over the 10 choices of 9 answers of min(#match/3, 1)."""
    predicted = normalize_vqa_answer(prediction)
    normalized = [normalize_vqa_answer(a) for a in answers]
    subsets = [normalized[:i] + normalized[i + 1:] for i in range(len(normalized))]
    return sum(min(sum(a == predicted for a in subset) / 3, 1.0) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_accuracy_hand_worked(matches, expected):
    # k matching humans of 10: ((10-k)*min(k/3,1) + k*min((k-1)/3,1)) / 10
    answers = ["red"] * matches + ["blue"] * (10 - matches)
    assert vqa_accuracy("Red.", answers) == pytest.approx(expected)


def test_vqa_accuracy_equals_leave_one_out_definition():
    rng = random.Random(0)
    pool = ["2", "two", "the dog", "dog", "a cat", "Cat!", "don't", "dont", "yes", "no", "3.5", "red car"]
    for _ in range(200):
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool)
        assert vqa_accuracy(prediction, answers) == pytest.approx(_official_vqa_accuracy(prediction, answers))


def test_vqa_accuracy_normalises_both_sides():
    answers = ["two"] * 3 + ["three"] * 7
    assert vqa_accuracy("2", answers) == pytest.approx(0.9)
    assert vqa_accuracy("The dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("anything", ["only"]) == 0.0 and vqa_accuracy("Only", ["only"]) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_vqa_exact_match():
    assert vqa_exact_match("Two", ["2", "4"]) == 1.0
    assert vqa_exact_match("three", ["2", "4"]) == 0.0


# ----------------------------------------------------------------------------- ANLS


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3
    assert levenshtein(["a", "b", "c"], ["a", "c", "d"]) == 2
    assert normalized_levenshtein("", "") == 0.0


def test_anls_hand_worked():
    assert anls("Denver Broncos", ["Denver Broncos"]) == 1.0
    # "denver broncos" -> "denver r. broncos": 3 insertions over 17 characters
    assert anls("Denver Broncos", ["Denver R. Broncos"]) == pytest.approx(1 - 3 / 17)
    # case, outer spaces and inner runs of spaces do not count
    assert anls("  DEAR   dr. lobo ", ["Dear Dr. Lobo"]) == 1.0
    # the best ground truth counts
    assert anls("12/15/89", ["12/15/88", "nothing alike"]) == pytest.approx(1 - 1 / 8)


def test_anls_threshold():
    assert anls("abd", ["abc"]) == pytest.approx(2 / 3)  # NL = 1/3 < 0.5
    assert anls("ab", ["ac"]) == 0.0  # NL = 0.5 exactly: not below the threshold
    assert anls("abcd", ["abxy"]) == 0.0  # NL = 0.5
    assert anls("abcde", ["abcxy"]) == pytest.approx(0.6)  # NL = 0.4
    assert anls("completely wrong", ["right"]) == 0.0
    assert anls("ab", ["ac"], threshold=0.6) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize("prediction, target, correct", [
    ("10.4", "10", True),  # 4 %
    ("10.5", "10", True),  # 5 %: the edge is inside
    ("10.6", "10", False),  # 6 %
    ("-95", "-100", True),
    ("45%", "0.45", True),  # a percent sign divides by 100
    ("45", "0.45", False),
    ("0", "0", True),
    ("0.01", "0", False),
    ("Yes", "yes", True),  # not numbers: case-insensitive exact match
    ("cats", "cat", False),
    (" 17 ", "17", True),
    ("1,000", "1000", False),  # not a float: exact match, as the definition parses numbers
])
def test_relaxed_match(prediction, target, correct):
    assert relaxed_match(prediction, target) is correct


def test_relaxed_accuracy_several_answers():
    assert relaxed_accuracy("98", ["100", "x"]) == 1.0
    assert relaxed_accuracy("98", "200") == 0.0
    assert relaxed_accuracy("98", "100", tolerance=0.01) == 0.0


# ----------------------------------------------------------------------------- WER

VOCABULARY = ("the cat sat on a mat while two dogs ran across green fields under grey skies and "
              "nobody heard them bark at seven o'clock in the morning").split()


def _pairs(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (reference, hypothesis) pairs: substitutions, deletions and insertions."""
    rng = random.Random(seed)
    references, hypotheses = [], []
    for _ in range(count):
        reference = [rng.choice(VOCABULARY) for _ in range(rng.randint(3, 14))]
        hypothesis = []
        for word in reference:
            roll = rng.random()
            if roll < 0.1:
                continue  # deletion
            hypothesis.append(rng.choice(VOCABULARY) if roll < 0.2 else word)  # substitution
            if rng.random() < 0.08:
                hypothesis.append(rng.choice(VOCABULARY))  # insertion
        references.append(" ".join(reference))
        hypotheses.append(" ".join(hypothesis))
    return references, hypotheses


def test_wer_hand_worked():
    stats = corpus_wer(["the cat sat on the mat"], ["the cat sat on mat"], normalizer=str)
    assert (stats.errors, stats.reference_words, stats.wer) == (1, 6, pytest.approx(1 / 6))
    # corpus rate: (1 + 2) edits over (4 + 2) words, not the mean of per-utterance rates
    stats = corpus_wer(["a b c d", "e f"], ["a b c x", ""], normalizer=str)
    assert stats.wer == pytest.approx(3 / 6)


def test_wer_equals_jiwer_on_generated_pairs():
    references, hypotheses = _pairs(80)
    assert corpus_wer(references, hypotheses, normalizer=str).wer == pytest.approx(jiwer.wer(references, hypotheses))
    for reference, hypothesis in list(zip(references, hypotheses))[:20]:  # per utterance too
        assert corpus_wer([reference], [hypothesis], normalizer=str).wer == pytest.approx(
            jiwer.wer(reference, hypothesis))


def test_wer_uses_whisper_normaliser():
    normalize = whisper_normalizer()
    references = ["Mr. Smith paid twenty-five dollars.", "It's SEVEN o'clock, isn't it?"]
    hypotheses = ["mister smith paid $25", "it is 7 o'clock is not it"]
    stats = corpus_wer(references, hypotheses)
    assert stats.wer == pytest.approx(jiwer.wer([normalize(r) for r in references], [normalize(h) for h in hypotheses]))
    assert stats.errors <= 1  # spelling and numbers agree after normalisation
    references, hypotheses = _pairs(60, seed=1)
    assert corpus_wer(references, hypotheses).wer == pytest.approx(
        jiwer.wer([normalize(r) for r in references], [normalize(h) for h in hypotheses]))


def test_wer_errors():
    with pytest.raises(ValueError):
        corpus_wer(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        _ = corpus_wer(["uh, um"], ["x"]).wer  # fillers only: no reference words after normalisation


# ----------------------------------------------------------------------------- option letters


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b", "B"), ("[C]", "C"), ("**D**", "D"),
    ("The answer is B", "B"), ("The answer is B.", "B"), ("Answer: (d)", "D"), ("The best answer is: A. Paris", "A"),
    ("Option B is correct.", "B"), ("I choose option C", "C"), ("The correct choice would be D.", "D"),
    ("yes, C", "C"), ("Yes. The answer is B.", "B"), ("yes B", "B"),
    ("B) The dog runs.", "B"), ("C: blue", "C"), ("D is the best fit", "D"), ("I think (C) fits.", "C"),
    ("I would say C here.", "C"), ("I think it's A because of the colour.", "A"),
    ("A cat sits on the mat.", None),  # the article
    ("The answer is a cat.", None),
    ("A and B", None),  # two letters, no choice made
    ("", None), ("no", None), ("I do not know.", None),
])
def test_extract_option_letter(reply, letter):
    assert extract_option_letter(reply) == letter


def test_extract_option_letter_by_option_text_and_letter_set():
    options = {"A": "The dog runs", "B": "The cat is sleeping", "C": "Nothing", "D": "Birds"}
    assert extract_option_letter("the cat is sleeping on the sofa", options=options) == "B"
    assert extract_option_letter("E", letters="ABCDE") == "E"
    assert extract_option_letter("E") is None


@pytest.mark.parametrize("reply, verdict, letter, answered", [
    ("yes, C", "yes", "C", True),
    ("Yes. B", "yes", "B", True),
    ("yes\nThe answer is A.", "yes", "A", True),
    ("no", "no", None, False),
    ("No, the context does not mention it. B", "no", None, False),
    ("Based on the audio, yes. D", "yes", "D", True),
    ("B", None, "B", True),  # a bare letter is an answer
    ("yes", "yes", None, False),  # claims enough but names nothing
    ("The speaker talks about cooking.", None, None, False),
    ("None of the options", None, None, False),  # "none" is not "no"
])
def test_parse_sufficiency(reply, verdict, letter, answered):
    parsed = parse_sufficiency(reply)
    assert parsed == Sufficiency(verdict, letter)
    assert parsed.answered is answered


def test_option_patterns_do_not_depend_on_order():
    # every permutation of a two-letter reply names no single letter
    for first, second in itertools.permutations("ABCD", 2):
        assert extract_option_letter(f"{first} or {second}") is None


# ----------------------------------------------------------------------------- needle retrieval


def test_needle_retrieval_score():
    from lyra.eval.needle import retrieval_score

    assert retrieval_score("The password is Pineapple.", "pineapple") == 1.0
    assert retrieval_score("pine apple", "pineapple") == 0.0
    assert retrieval_score("pineapples", "pineapple") == 0.0  # whole words only
    assert retrieval_score("It was seven.", "7") == 1.0  # numbers spelled either way
    assert retrieval_score("", "pineapple") == 0.0


def test_needle_haystack_and_grid():
    import numpy as np

    from lyra.eval.needle import GAP_SECONDS, build_haystack, grid_scores

    background = np.linspace(-0.5, 0.5, 16000 * 3, dtype=np.float32)  # 3 s, cycled when needed
    needle = np.ones(16000, np.float32)
    for depth in (0.0, 0.5, 1.0):
        audio, start = build_haystack(background, needle, 10.0, depth)
        assert audio.shape == (160000,) and audio.dtype == np.float32
        begin = int(round(start * 16000))
        assert np.all(audio[begin:begin + 16000] == 1.0)  # the needle, whole, where reported
        gap = int(GAP_SECONDS * 16000)
        assert np.all(audio[begin - gap:begin] == 0.0) and np.all(audio[begin + 16000:begin + 16000 + gap] == 0.0)
    assert build_haystack(background, needle, 10.0, 0.0)[1] == pytest.approx(GAP_SECONDS)
    assert build_haystack(background, needle, 10.0, 1.0)[1] == pytest.approx(10.0 - 1.0 - GAP_SECONDS)
    with pytest.raises(ValueError):
        build_haystack(background, needle, 1.2, 0.5)  # no room for the needle
    records = [{"length": 10, "depth": 0.5, "score": 1.0}, {"length": 10, "depth": 0.5, "score": 0.0},
               {"length": 20, "depth": 0.5, "score": 1.0}, {"length": 20, "depth": 0.0, "error": "x"}]
    assert grid_scores(records, [10, 20], [0.0, 0.5]) == [[None, None], [0.5, 1.0]]
