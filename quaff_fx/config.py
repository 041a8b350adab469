"""Frozen configuration dataclasses: how outliers are chosen and how layers are quantized."""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from .errors import QuaffError

STRATEGIES = ("mean_times", "top_abs", "zscore", "static")
DEFAULT_EXCLUDE = ("lm_head", "*embed*", "*wte", "*wpe")
# the smoothing strengths the calibration tries per input (None: no smoothing); "auto" picks among them
SMOOTH_GRID: tuple[float | None, ...] = (None, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MOMENTUM = 0.9  # the outlier scales' running-average momentum in training (QuaffConfig.momentum's default)
CONFIG_VERSION = 1  # format version of QuaffConfig.to_dict (what an artifact's manifest records)
# module-name suffixes of an MLP's output projection (Llama/Mistral/Qwen down_proj, OPT fc2, Falcon/BLOOM
# dense_4h_to_h, Mixtral's experts' w2): its input, the post-activation product, is the heavy-tailed one
ACT_GROUP_LAYERS = ("down_proj", "fc2", "dense_4h_to_h", "w2")


TOP_1PCT = {"strategy": "top_abs", "max_ratio": 0.01}
PRESETS = {"default": TOP_1PCT, "accurate": TOP_1PCT, "fast": TOP_1PCT,
           "paper": {"strategy": "mean_times", "threshold": 100.0, "max_ratio": 0.01}}
# what a preset sets beyond the outlier selection (see the README's accuracy table). "default" (= the dataclass
# defaults; "accurate" is another name for it): Quaff's outlier scaling + SmoothQuant smoothing (α 0.6, one factor
# per input, shared by siblings so they stay fusable) of the other channels + GPTQ rounding (≤ +1% perplexity on
# SmolLM2's three held-out texts). "fast": plain Quaff, round-to-nearest, no smoothing (no XᵀX pass at transform
# time). "paper": the paper's outlier settings, plain. "default" also quantizes the input of each MLP output projection
# per (token, group of 128 input channels) instead of per token (SmolLM2 leave-one-source-out: +1.02% -> +0.36%).
PLAIN = {"smooth_alpha": None, "smooth_shared": True, "weight_rounding": "nearest", "act_group": 0}
ACCURATE = {"smooth_alpha": 0.6, "smooth_shared": True, "weight_rounding": "gptq", "act_group": 128}
PRESET_QUANT = {"default": ACCURATE, "accurate": ACCURATE, "fast": PLAIN, "paper": PLAIN}


def check_act_group(value: object) -> int:
    """``value`` as an activation group size: an integer >= 0 (0: per token), else a QuaffError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise QuaffError(f"act_group must be an integer >= 0 (0: per token; G: per group of G input channels), "
                         f"got {value!r}")
    return value


@dataclass(frozen=True)
class OutlierConfig:
    """How outlier input channels are picked from calibration statistics.

    strategy:  top_abs     the channels with the largest max|x| in each batch (quaff-fx's default: see
                           the README's accuracy table; it held on every held-out text we tried)
               mean_times  |x| > threshold * mean|x| of the batch (the paper's default, threshold 100;
                           the preset 'paper')
               zscore      |x - mean| / std > threshold
               static      exactly the channels in ``channels`` (a user's list, applied to every layer)
    max_ratio: per-layer cap, as a fraction of the layer's input channels; the channels that were
               outliers most often across batches are kept.
    """

    strategy: str = "top_abs"
    threshold: float = 100.0
    max_ratio: float = 0.01
    channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise QuaffError(f"unknown outlier strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if not self.threshold > 0:
            raise QuaffError(f"outlier threshold must be > 0, got {self.threshold}")
        if not 0.0 <= self.max_ratio <= 1.0:
            raise QuaffError(f"max_ratio must lie in [0, 1], got {self.max_ratio}")
        if self.strategy == "static" and not self.channels:
            raise QuaffError("the static strategy needs a list of channels (--channels 3,17,...)")
        if any(c < 0 for c in self.channels):
            raise QuaffError(f"static outlier channels must be >= 0, got {list(self.channels)}")

    @classmethod
    def preset(cls, name: str) -> "OutlierConfig":
        """A named outlier configuration (see PRESETS): 'default', 'fast', 'paper' (the Quaff paper's settings)."""
        if name not in PRESETS:
            raise QuaffError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def cap(self, in_features: int) -> int:
        """Largest number of outlier channels a layer with ``in_features`` inputs may keep."""
        return int(in_features * self.max_ratio)


@dataclass(frozen=True)
class QuaffConfig:
    """Everything that decides how a model is rewritten.

    weight_granularity: 'channel' (one int8 scale per output channel) or 'tensor' (one per layer).
    momentum:           scales follow S <- momentum * S + (1 - momentum) * S_batch in training;
                        0 means the scale is recomputed from each batch. Frozen in eval.
    exact_grad:         compute grad_X with the dequantized weight in the compute dtype instead of an
                        int8 GEMM with the gradient quantized per row.
    smooth_alpha:       also smooth the non-outlier channels SmoothQuant-style. None: off, plain Quaff;
                        a number: that α everywhere (default 0.6); "auto": for each input (siblings such
                        as q/k/v share one) the calibration measures the layers' output error on
                        sampled calibration rows for every α of SMOOTH_GRID (no smoothing included)
                        and the smallest error wins.
    smooth_shared:      layers that read one input share one smoothing factor (the default, so they can be
                        fused); False: each layer's own (from its own weight), not fusable when smoothed
                        (with "auto" the α is still measured per input, with the shared factor).
    weight_rounding:    'nearest' (round to nearest) or 'gptq' (the default: error-compensated with XᵀX of
                        the calibration batches, which the stats keep in memory; see quaff_fx.rounding).
    act_group:          the activation scales of the layers named by ``act_group_layers``: 0 per token (one int8
                        scale per row of X̂), G > 0 one per (token, group of G consecutive input channels), each
                        group's integer products scaled by its own scale (default 128; 0 in 'fast' and 'paper').
    act_group_layers:   module-name suffixes (whole dotted components: "down_proj" matches
                        "model.layers.0.mlp.down_proj", "mlp.c_proj" GPT-2's MLP output) of the layers that
                        ``act_group`` applies to; every other layer quantizes per token.
    include / exclude:  fnmatch patterns on module names; exclude wins. Embeddings and lm_head are
                        excluded by default.
    """

    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    weight_granularity: str = "channel"
    momentum: float = MOMENTUM
    exact_grad: bool = False
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    smooth_alpha: float | str | None = ACCURATE["smooth_alpha"]
    weight_rounding: str = ACCURATE["weight_rounding"]
    smooth_shared: bool = ACCURATE["smooth_shared"]
    act_group: int = ACCURATE["act_group"]
    act_group_layers: tuple[str, ...] = ACT_GROUP_LAYERS

    def __post_init__(self) -> None:
        if self.weight_granularity not in ("channel", "tensor"):
            raise QuaffError(f"weight_granularity must be 'channel' or 'tensor', got {self.weight_granularity!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise QuaffError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_rounding not in ("nearest", "gptq"):
            raise QuaffError(f"weight_rounding must be 'nearest' or 'gptq', got {self.weight_rounding!r}")
        a = self.smooth_alpha
        if a is not None and a != "auto" and (isinstance(a, (str, bool)) or not 0.0 < a < 1.0):
            raise QuaffError(f"smooth_alpha must be 'auto', None (off) or a number in (0, 1), got {a!r}")
        check_act_group(self.act_group)
        names = self.act_group_layers
        if not isinstance(names, tuple) or not all(isinstance(n, str) and n.strip(".") for n in names):
            raise QuaffError(f"act_group_layers must be a tuple of module-name suffixes such as 'down_proj', "
                             f"got {names!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "QuaffConfig":
        """The named preset ('default', 'fast', 'paper'; 'accurate' = 'default'): outlier selection, smoothing and
        rounding; other fields as given."""
        return cls(**{"outliers": OutlierConfig.preset(name), **PRESET_QUANT[name], **overrides})

    @property
    def searches_smoothing(self) -> bool:
        return self.smooth_alpha == "auto"

    def calibration_options(self) -> dict[str, Any]:
        """What ``calibrate`` must gather beyond its statistics for this config: the smoothing search, the batches."""
        return {"smooth_grid": SMOOTH_GRID if self.searches_smoothing else None,
                "keep_batches": self.weight_rounding == "gptq"}

    def eligible(self, module_name: str) -> bool:
        """Whether the Linear called ``module_name`` is to be quantized."""
        leaf = module_name.rsplit(".", 1)[-1]

        def hit(patterns: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(module_name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)

        return hit(self.include) and not hit(self.exclude)

    def act_group_of(self, module_name: str) -> int:
        """The activation group size of the layer called ``module_name``: ``act_group`` where a suffix of
        ``act_group_layers`` names it (whole dotted components), else 0 (per token)."""
        named = any(module_name == s or module_name.endswith("." + s) for s in self.act_group_layers)
        return self.act_group if named else 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields with the format version (``from_dict`` reads it back to an equal config)."""
        return {**dataclasses.asdict(self), "format_version": CONFIG_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuaffConfig":
        """The config ``to_dict`` wrote (a dict without ``format_version`` is read as version 1; one without
        ``act_group`` was written before per-group activation scales existed: read as 0, per token)."""
        if not isinstance(data, dict):
            raise QuaffError(f"a quaff config is a JSON object, got {type(data).__name__}")
        version = data.get("format_version", 1)
        if version != CONFIG_VERSION:
            raise QuaffError(f"quaff config format version {version!r}; this quaff-fx reads version {CONFIG_VERSION}: "
                             "upgrade quaff-fx or transform the model again")
        try:
            raw = dict(data.get("outliers", {}))
            outliers = OutlierConfig(**{**raw, "channels": tuple(raw.get("channels", ()))})
            rest = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()
                    if k not in ("outliers", "format_version")}
            return cls(outliers=outliers, **{"act_group": 0, **rest})
        except TypeError as exc:
            raise QuaffError(f"quaff config has unknown or missing fields: {exc}") from None
