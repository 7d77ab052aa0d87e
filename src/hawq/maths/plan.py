"""Bit plans: which bit width each layer's weights and input activations get.

A :class:`BitPlan` maps layer names to :class:`LayerSpec` and may carry a ``default`` spec for
layers it does not name. Plans round-trip through JSON with a version number.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hawq.base.errors import ConfigError
from hawq.base.io import atomic_write_text
from hawq.maths.quantizers import W_CLIPS, check_bits, check_channel_bits

__all__ = ["A_CALIBRATIONS", "BitPlan", "LayerSpec", "PLAN_VERSION", "QuantConfig"]

#: Activation range calibrations of :class:`QuantConfig` (``a_calibration``).
A_CALIBRATIONS = ("minmax", "percentile")

PLAN_VERSION = 1


@dataclass(frozen=True)
class LayerSpec:
    """Bits of one layer: ``w_bits`` for its weight, ``a_bits`` for its input activation.

    ``w_bits`` may also be a list of ints, one per output channel (channel-wise plans); a
    tuple or 1-d tensor is stored as a list of plain ints. Its length is checked against the
    layer by :meth:`check_channels` (done by ``quantize_`` and ``budget_report``).
    """

    w_bits: int | list[int] = 8
    a_bits: int = 32

    def __post_init__(self) -> None:
        w = check_channel_bits(self.w_bits, "w_bits", symmetric=True)
        object.__setattr__(self, "w_bits", w)
        check_bits(self.a_bits, "a_bits")

    def __hash__(self) -> int:
        w = tuple(self.w_bits) if isinstance(self.w_bits, list) else self.w_bits
        return hash((w, self.a_bits))

    @property
    def per_channel(self) -> bool:
        """True when ``w_bits`` is a per-output-channel list."""
        return isinstance(self.w_bits, list)

    def mean_w_bits(self) -> float:
        """Average weight bits (the int itself, or the mean over channels)."""
        w = self.w_bits
        return sum(w) / len(w) if isinstance(w, list) else float(w)

    def check_channels(self, name: str, out_channels: int) -> None:
        """Raise ConfigError naming layer ``name`` when per-channel ``w_bits`` has a wrong length."""
        if isinstance(self.w_bits, list) and len(self.w_bits) != out_channels:
            raise ConfigError(f"layer {name!r}: w_bits has {len(self.w_bits)} per-channel bit "
                              f"widths but the layer has {out_channels} output channels; give "
                              f"{out_channels} (one per output channel) or one int")


@dataclass
class QuantConfig:
    """How layers are quantized (independent of how many bits they get).

    * ``w_symmetric``/``w_per_channel``: weight quantizer form (default symmetric per-channel).
    * ``w_clip``: a :data:`hawq.maths.quantizers.W_CLIPS` name: ``"minmax"`` or ``"mse"`` (MSE-optimal
      clipping search, best at 2-4 bits).
    * ``a_calibration``: ``"minmax"`` or ``"percentile"`` (``a_percentile`` of |x|, per batch,
      averaged over calibration batches).
    * ``learn_steps``: LSQ: the weight step (per channel) and activation step become trainable
      parameters (``w_step``, ``act.step``) for quantization-aware training; initial weight steps
      from the MSE-optimal clipping, activation steps from calibration (MSE-clipped range).
    """

    w_symmetric: bool = True
    w_per_channel: bool = True
    w_clip: str = "minmax"
    a_calibration: str = "minmax"
    a_percentile: float = 99.99
    learn_steps: bool = False

    def __post_init__(self) -> None:
        W_CLIPS.check(self.w_clip, "w_clip")
        if self.a_calibration not in A_CALIBRATIONS:
            raise ConfigError(f"a_calibration={self.a_calibration!r}: use one of "
                              f"{list(A_CALIBRATIONS)}")
        if not 50.0 < self.a_percentile <= 100.0:
            raise ConfigError(f"a_percentile={self.a_percentile}: give a value in (50, 100]")


@dataclass
class BitPlan:
    """Layer name -> :class:`LayerSpec`, plus an optional ``default`` for unnamed layers."""

    layers: dict[str, LayerSpec] = field(default_factory=dict)
    default: LayerSpec | None = None

    def __post_init__(self) -> None:
        layers = {}
        for name, spec in self.layers.items():
            if isinstance(spec, int) and not isinstance(spec, bool):
                spec = LayerSpec(spec)
            elif isinstance(spec, (tuple, list)) and len(spec) == 2:
                spec = LayerSpec(*spec)
            if not isinstance(spec, LayerSpec):
                raise ConfigError(f"plan entry {name!r}={spec!r}: give LayerSpec(w_bits, a_bits), "
                                  "a (w_bits, a_bits) pair or an int w_bits")
            layers[name] = spec
        self.layers = layers

    @classmethod
    def uniform(cls, w_bits: int = 8, a_bits: int = 32) -> "BitPlan":
        """A plan that gives every quantizable layer the same bits."""
        return cls({}, LayerSpec(w_bits, a_bits))

    def spec_for(self, name: str) -> LayerSpec | None:
        """The spec of layer ``name``: its own entry, else the default, else None (untouched)."""
        return self.layers.get(name, self.default)

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION,
                "default": None if self.default is None else asdict(self.default),
                "layers": {k: asdict(v) for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BitPlan":
        if not isinstance(d, dict) or "layers" not in d:
            raise ConfigError("a bit plan is a JSON object with 'layers' (name -> "
                              "{'w_bits', 'a_bits'}) and optionally 'default'")
        if d.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise ConfigError(f"plan version {d['version']} is newer than this hawq "
                              f"({PLAN_VERSION}); upgrade hawq")

        def spec(v: Any, where: str) -> LayerSpec:
            if isinstance(v, (int, list)):
                return LayerSpec(v)
            if not isinstance(v, dict) or set(v) - {"w_bits", "a_bits"}:
                raise ConfigError(f"plan entry {where}: give {{'w_bits': int or [int per "
                                  f"channel], 'a_bits': int}}, got {v!r}")
            return LayerSpec(**v)

        if not isinstance(d["layers"], dict) or not all(isinstance(k, str) for k in d["layers"]):
            raise ConfigError(f"a bit plan's 'layers' is an object (layer name -> {{'w_bits', "
                              f"'a_bits'}}), got {type(d['layers']).__name__}")
        default = d.get("default")
        return cls({k: spec(v, k) for k, v in d["layers"].items()},
                   None if default is None else spec(default, "default"))

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON (atomically). Returns the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BitPlan":
        from hawq.base.io import read_json

        return cls.from_dict(read_json(path, "bit plan"))
