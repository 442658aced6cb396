"""Speech -> discrete units: HuBERT features, k-means, de-duplication (paper App. B.4).

The reference (Lyra's `data_preparation/speech_generation`, after LLaMA-Omni and
SpeechGPT) runs mHuBERT (`mhubert_base_vp_en_es_fr_it3.pt`) on 16 kHz audio, takes
layer 11's output, assigns each 20 ms frame to the nearest of 1,000 k-means centroids
(`mhubert_base_vp_en_es_fr_it3_L11_km1000.bin`) and merges consecutive repeats; the
training JSON stores them as `"tgt_unit": "<12><7><981>..."` (parsed by the
reference's `re.findall(r'<(\\d+)>', ...)`).

Here: transformers' `HubertModel` (a local directory; `convert_fairseq_hubert_state`
maps a fairseq checkpoint onto it), centroids from a `.npy` file `[K, D]` (the
reference's `.bin` is a scikit-learn pickle: export its `cluster_centers_` once with
`numpy.save`), and `fit_kmeans`, a plain-torch mini-batch k-means for new unit sets.

Layer numbering follows fairseq's `extract_features(output_layer=L)` (1-based): the
output of the L-th transformer layer, i.e. transformers' `hidden_states[L]`.
"""

from __future__ import annotations

import ast
import math
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.serialization as ts

SAMPLE_RATE = 16000  # HuBERT's input rate; its features come at 50 Hz (320-sample hop)
UNIT_PATTERN = re.compile(r"<(\d+)>")


# ---------------------------------------------------------------------- unit strings
def dedup_units(units: Iterable[int]) -> list[int]:
    """Merge consecutive repeats: [5, 5, 7, 5] -> [5, 7, 5]."""
    out: list[int] = []
    for unit in units:
        unit = int(unit)
        if not out or out[-1] != unit:
            out.append(unit)
    return out


def format_units(units: Iterable[int]) -> str:
    """The reference's `tgt_unit` string: [12, 7, 981] -> '<12><7><981>'."""
    return "".join(f"<{int(u)}>" for u in units)


def parse_units(text: str) -> list[int]:
    """Inverse of `format_units` (the reference's `re.findall(r'<(\\d+)>', ...)`)."""
    return [int(u) for u in UNIT_PATTERN.findall(text)]


def check_unit_range(units: torch.Tensor | Iterable[int], num_units: int) -> None:
    """Raise `ValueError` when a unit id lies outside a speech generator's vocabulary
    `[0, num_units)`; id `num_units` is its CTC blank and never a target.

    `units` is any shape of ids (a tensor stays on its device; one sync for the check).
    Stage 4's loss and `python -m lyra.data.validate` both check with this.
    """
    if isinstance(units, torch.Tensor):
        bad = units[(units < 0) | (units >= num_units)].unique().tolist()
    else:
        bad = sorted({int(u) for u in units if not 0 <= int(u) < num_units})
    if bad:
        raise ValueError(
            f"unit ids {bad[:5]}{' ...' if len(bad) > 5 else ''} are outside the speech generator's vocabulary "
            f"[0, {num_units}) (id {num_units} is the CTC blank); regenerate the units with this model's "
            f"unit set or use a config whose speech_generator.num_units covers them"
        )


# ---------------------------------------------------------------------- k-means
class KMeansQuantizer:
    """Nearest-centroid assignment (squared Euclidean), as fairseq's `ApplyKmeans`."""

    def __init__(self, centroids: np.ndarray | torch.Tensor):
        centroids = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
        if centroids.ndim != 2 or centroids.shape[0] < 1:
            raise ValueError(f"k-means centroids must be a [K, D] array, got shape {tuple(centroids.shape)}")
        self.centroids = centroids  # (K, D)
        self.norms = (centroids**2).sum(dim=1)  # (K,)

    @classmethod
    def from_file(cls, path: str | Path) -> KMeansQuantizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"k-means centroids file not found: {path}")
        if path.suffix != ".npy":
            raise ValueError(
                f"{path}: expected a .npy array of centroids [K, D]. A scikit-learn k-means pickle (.bin) "
                f"must be exported once, in an environment you trust: numpy.save('km.npy', joblib.load(path).cluster_centers_)"
            )
        return cls(np.load(path, allow_pickle=False))

    @property
    def num_units(self) -> int:
        return self.centroids.shape[0]

    def __call__(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Unit ids `[N]` for features `[N, D]`."""
        x = torch.as_tensor(features, dtype=torch.float32)
        if x.ndim != 2 or x.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"features {tuple(x.shape)} do not match centroids of dimension {self.centroids.shape[1]}")
        c = self.centroids.to(x.device)
        dist = (x**2).sum(1, keepdim=True) - 2 * x @ c.T + self.norms.to(x.device)  # (N, K)
        return dist.argmin(dim=1)


def fit_kmeans(
    features: np.ndarray | torch.Tensor,
    num_clusters: int,
    iterations: int = 100,
    batch_size: int = 10000,
    seed: int = 0,
    init_size: int | None = None,
) -> np.ndarray:
    """Mini-batch k-means (Sculley 2010) with k-means++ initialisation.

    Each step assigns a random batch to its nearest centres and moves every centre to
    the running mean of all points it has received (per-centre rate 1 / count). A
    centre that never receives a point is re-seeded from a random batch point.

    Args:
        features: `[N, D]` training features (e.g. HuBERT layer-11 frames).
        num_clusters: K.
        iterations: mini-batch steps.
        batch_size: points per step.
        init_size: points drawn for k-means++ (default max(3K, batch_size), capped at N).

    Returns:
        float32 centroids `[K, D]` (save with `numpy.save` for `KMeansQuantizer`).
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    n = x.shape[0]
    if x.ndim != 2 or n < num_clusters:
        raise ValueError(f"need a [N, D] feature array with N >= {num_clusters} clusters, got {tuple(x.shape)}")
    gen = torch.Generator().manual_seed(seed)
    sample = x[torch.randperm(n, generator=gen)[: min(n, init_size or max(3 * num_clusters, batch_size))]]
    centres = _kmeans_plus_plus(sample, num_clusters, gen)
    counts = torch.zeros(num_clusters)
    for _ in range(iterations):
        batch = x[torch.randint(0, n, (min(batch_size, n),), generator=gen)]
        assign = KMeansQuantizer(centres)(batch)
        hits = torch.bincount(assign, minlength=num_clusters).float()
        sums = torch.zeros_like(centres).index_add_(0, assign, batch)
        counts += hits
        seen = hits > 0
        centres[seen] += (sums[seen] - hits[seen, None] * centres[seen]) / counts[seen, None]
        dead = counts == 0
        if bool(dead.any()):
            centres[dead] = batch[torch.randint(0, batch.shape[0], (int(dead.sum()),), generator=gen)]
    return centres.numpy()


def _kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    centres = [x[torch.randint(0, x.shape[0], (1,), generator=gen)].squeeze(0)]
    closest = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:  # fewer distinct points than clusters: pick any
            index = torch.randint(0, x.shape[0], (1,), generator=gen)
        else:
            index = torch.multinomial(closest / total, 1, generator=gen)
        centres.append(x[index].squeeze(0))
        closest = torch.minimum(closest, ((x - centres[-1]) ** 2).sum(1))
    return torch.stack(centres).clone()


def kmeans_inertia(features: np.ndarray | torch.Tensor, centroids: np.ndarray | torch.Tensor) -> float:
    """Mean squared distance of the features to their nearest centroid."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    c = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
    return float(torch.cdist(x, c).min(dim=1).values.pow(2).mean())


# ---------------------------------------------------------------------- HuBERT features
class HubertUnitExtractor:
    """16 kHz waveform -> HuBERT layer features -> k-means units.

    `model` is a transformers HuBERT directory (loaded with `local_files_only=True`), a
    fairseq `.pt` checkpoint (converted in memory) or a `HubertModel`. Layers after `layer` are dropped (they cannot change its output).
    Long audio is cut into `max_chunk`-sample pieces encoded separately, as fairseq's
    `HubertFeatureReader` does (1.6 M samples = 100 s).
    """

    def __init__(
        self,
        model: str | Path | Any,
        kmeans: str | Path | KMeansQuantizer | np.ndarray | None,
        layer: int = 11,
        device: str | torch.device = "cpu",
        max_chunk: int = 1_600_000,
        normalize: bool = False,
    ):
        from transformers import HubertModel

        if isinstance(model, (str, Path)):
            model = load_hubert(model)
        elif not isinstance(model, HubertModel):
            raise TypeError(f"model must be a HuBERT directory, a fairseq .pt path or a HubertModel, got {type(model)}")
        num_layers = len(model.encoder.layers)
        if not 1 <= layer <= num_layers:
            raise ValueError(f"layer must be in 1..{num_layers} (1-based, fairseq's output_layer), got {layer}")
        model.encoder.layers = model.encoder.layers[:layer]
        self.model = model.eval().to(device)
        self.layer = layer
        self.device = torch.device(device)
        self.max_chunk = max_chunk
        self.normalize = normalize
        if kmeans is None or isinstance(kmeans, KMeansQuantizer):
            self.quantizer = kmeans  # None: features only (e.g. to fit k-means)
        elif isinstance(kmeans, np.ndarray):
            self.quantizer = KMeansQuantizer(kmeans)
        else:
            self.quantizer = KMeansQuantizer.from_file(kmeans)
        if self.quantizer is not None and self.quantizer.centroids.shape[1] != model.config.hidden_size:
            raise ValueError(
                f"k-means centroids have dimension {self.quantizer.centroids.shape[1]} but HuBERT's hidden size "
                f"is {model.config.hidden_size}"
            )
        self._captured: torch.Tensor | None = None
        self.model.encoder.layers[-1].register_forward_hook(self._capture)

    def _capture(self, module, args, output) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output

    @torch.no_grad()
    def features(self, waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Layer-`layer` features `[frames, D]` of a 16 kHz mono waveform `[samples]`."""
        x = torch.as_tensor(np.asarray(waveform, dtype=np.float32)).to(self.device)
        if x.ndim != 1:
            raise ValueError(f"expected a mono waveform [samples], got shape {tuple(x.shape)}")
        if self.normalize:
            x = torch.nn.functional.layer_norm(x, x.shape)
        pieces = []
        for start in range(0, x.shape[0], self.max_chunk):
            self.model(x[start:start + self.max_chunk].unsqueeze(0))
            pieces.append(self._captured[0])
        return torch.cat(pieces).float().cpu()

    def units(self, waveform: np.ndarray | torch.Tensor, dedup: bool = True) -> list[int]:
        """Unit ids of a waveform; consecutive repeats merged when `dedup`."""
        if self.quantizer is None:
            raise ValueError("this extractor was built without k-means centroids; it only gives features")
        units = self.quantizer(self.features(waveform)).tolist()
        return dedup_units(units) if dedup else units


# ---------------------------------------------------------------------- fairseq mHuBERT
def hubert_config_from_fairseq(model_cfg: dict[str, Any] | Any):
    """A transformers `HubertConfig` from a fairseq HuBERT model config (`cfg["model"]`
    of a fairseq checkpoint, or its legacy `args` namespace)."""
    from transformers import HubertConfig

    cfg = model_cfg if isinstance(model_cfg, dict) else vars(model_cfg)
    layers = _parse_conv_layers(cfg.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"))
    mode = cfg.get("extractor_mode", "default")
    if mode not in ("default", "layer_norm"):
        raise ValueError(f"unknown fairseq extractor_mode {mode!r}")
    return HubertConfig(
        hidden_size=cfg.get("encoder_embed_dim", 768),
        num_hidden_layers=cfg.get("encoder_layers", 12),
        num_attention_heads=cfg.get("encoder_attention_heads", 12),
        intermediate_size=cfg.get("encoder_ffn_embed_dim", 3072),
        hidden_act=cfg.get("activation_fn", "gelu"),
        conv_dim=[c for c, _, _ in layers],
        conv_kernel=[k for _, k, _ in layers],
        conv_stride=[s for _, _, s in layers],
        conv_bias=bool(cfg.get("conv_bias", False)),
        feat_extract_norm="group" if mode == "default" else "layer",
        num_conv_pos_embeddings=cfg.get("conv_pos", 128),
        num_conv_pos_embedding_groups=cfg.get("conv_pos_groups", 16),
        do_stable_layer_norm=bool(cfg.get("layer_norm_first", False)),
        feat_proj_layer_norm=True,
        layer_norm_eps=1e-5,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
    )


def _parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's `conv_feature_layers` string (lists of (dim, kernel, stride)
    tuples joined by + and *) without `eval`."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported conv_feature_layers expression: {spec!r}")

    layers = value(ast.parse(spec, mode="eval"))
    if not all(isinstance(t, tuple) and len(t) == 3 for t in layers):
        raise ValueError(f"conv_feature_layers must be a list of (dim, kernel, stride), got {spec!r}")
    return layers


def convert_fairseq_hubert_state(state: dict[str, torch.Tensor], config, source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Rename a fairseq `HubertModel` state dict to transformers' `HubertModel` keys.

    fairseq -> transformers:
      feature_extractor.conv_layers.i.0.weight      -> feature_extractor.conv_layers.i.conv.weight
      feature_extractor.conv_layers.0.2.{weight,bias}  (group norm, "default" mode)
                                                    -> feature_extractor.conv_layers.0.layer_norm.*
      feature_extractor.conv_layers.i.2.1.*  (layer norm, "layer_norm" mode) -> ...conv_layers.i.layer_norm.*
      layer_norm.*                                  -> feature_projection.layer_norm.*
      post_extract_proj.*                           -> feature_projection.projection.*
      mask_emb                                      -> masked_spec_embed
      encoder.pos_conv.0.{weight_g,weight_v,bias}   -> encoder.pos_conv_embed.conv.{weight norm g, v, bias}
      encoder.layer_norm.*                          -> encoder.layer_norm.*
      encoder.layers.i.self_attn.{q,k,v,out}_proj.* -> encoder.layers.i.attention.{q,k,v,out}_proj.*
      encoder.layers.i.self_attn_layer_norm.*       -> encoder.layers.i.layer_norm.*
      encoder.layers.i.fc1.* / fc2.*                -> encoder.layers.i.feed_forward.intermediate_dense.* / output_dense.*
      encoder.layers.i.final_layer_norm.*           -> encoder.layers.i.final_layer_norm.*
    Pre-training heads (`final_proj`, `label_embs_concat`, `target_glu`) are dropped, and
    `mask_emb` too when the config has no time masking (inference).
    The weight-norm names on the transformers side are read from a model built from
    `config` (parametrization `original0/1` or legacy `weight_g/weight_v`).
    """
    from transformers import HubertModel

    with torch.device("meta"):
        target = set(HubertModel(config).state_dict())
    g_key, v_key = (
        ("parametrizations.weight.original0", "parametrizations.weight.original1")
        if "encoder.pos_conv_embed.conv.parametrizations.weight.original0" in target
        else ("weight_g", "weight_v")
    )
    rules = [
        (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
        (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
        (r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
        (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
        (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
        (r"mask_emb", "masked_spec_embed"),
        (r"encoder\.pos_conv\.0\.weight_g", f"encoder.pos_conv_embed.conv.{g_key}"),
        (r"encoder\.pos_conv\.0\.weight_v", f"encoder.pos_conv_embed.conv.{v_key}"),
        (r"encoder\.pos_conv\.0\.bias", "encoder.pos_conv_embed.conv.bias"),
        (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
        (r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)", r"encoder.layers.\1.attention.\2_proj.\3"),
        (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
        (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
        (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
        (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    ]
    dropped = ("final_proj.", "label_embs_concat", "target_glu.")
    if "masked_spec_embed" not in target:  # transformers only builds it for training-time masking
        dropped += ("mask_emb",)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        if key.startswith(dropped):
            continue
        for pattern, replacement in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            unknown.append(key)
    missing = sorted(target - set(out))
    extra = sorted(set(out) - target)
    if unknown or missing or extra:
        raise ValueError(
            f"{source} does not map onto a transformers HubertModel with this config: "
            f"{len(unknown)} unknown fairseq keys {unknown[:4]}, {len(missing)} missing {missing[:4]}, "
            f"{len(extra)} unexpected {extra[:4]}"
        )
    return out


def load_fairseq_checkpoint(path: str | Path, max_stubs: int = 64) -> dict[str, Any]:
    """Read a fairseq checkpoint without running its pickled code.

    `torch.load(weights_only=True)` refuses the non-tensor objects fairseq stores
    (`argparse.Namespace`, omegaconf containers, meters). Each refused class is
    allow-listed as an inert stub that only records its pickled state, and loading is
    retried; tensors and plain containers load normally and a stubbed callable is never
    run. Globals from modules torch blocks outright (`os`, `subprocess`, ...) are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fairseq checkpoint not found: {path}")
    stubs: list[tuple[type, str]] = []
    for _ in range(max_stubs):
        try:
            with ts.safe_globals(stubs):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            match = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
            if match is None:
                reason = [line for line in str(error).splitlines() if "GLOBAL" in line or "Trying" in line]
                raise ValueError(
                    f"{path}: refused to load it: {(reason or [str(error)[:300]])[0]} "
                    f"(a fairseq checkpoint holds tensors, configs and meters, never such calls)"
                ) from error
            name = match.group(1)
            stubs.append((type(name.rsplit(".", 1)[-1], (_PickledStub,), {"_pickled_name": name}), name))
    raise ValueError(f"{path}: more than {max_stubs} unknown pickled classes; is it a fairseq checkpoint?")


class _PickledStub:
    """Stand-in for a pickled class: keeps the constructor arguments and state."""

    _pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        instance = object.__new__(cls)
        instance.__dict__["_args"] = args
        return instance

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<stub {self._pickled_name}>"


def hubert_from_fairseq(path: str | Path):
    """A transformers `HubertModel` with the weights of a fairseq HuBERT checkpoint
    (e.g. `mhubert_base_vp_en_es_fr_it3.pt`). Save it with `save_pretrained(dir)`."""
    from transformers import HubertModel

    checkpoint = load_fairseq_checkpoint(path)
    state = checkpoint.get("model")
    if not state:
        raise ValueError(f"{path}: no 'model' state dict (top-level keys: {list(checkpoint)[:8]})")
    cfg = checkpoint.get("cfg")
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if model_cfg is None and checkpoint.get("args") is not None:
        model_cfg = checkpoint["args"]
    if model_cfg is None:
        raise ValueError(f"{path}: no model config ('cfg'.'model' or 'args') in the checkpoint")
    if not isinstance(model_cfg, dict):
        model_cfg = {k: v for k, v in vars(model_cfg).items() if not k.startswith("_")}
    config = hubert_config_from_fairseq(model_cfg)
    model = HubertModel(config)
    model.load_state_dict(convert_fairseq_hubert_state(state, config, source=str(path)))
    return model.eval()


def load_hubert(path: str | Path):
    """A `HubertModel` from a transformers directory or a fairseq `.pt` checkpoint."""
    from transformers import HubertModel

    path = Path(path)
    if path.is_file():
        return hubert_from_fairseq(path)
    if (path / "config.json").is_file():
        return HubertModel.from_pretrained(path, local_files_only=True).eval()
    raise FileNotFoundError(f"{path} is neither a transformers HuBERT directory (config.json) nor a fairseq .pt file")


def frames_per_second(config) -> float:
    """HuBERT frames per second of 16 kHz audio (50 for the standard conv stack)."""
    return SAMPLE_RATE / math.prod(config.conv_stride)
