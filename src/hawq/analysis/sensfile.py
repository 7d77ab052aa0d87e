"""One sensitivity file format: read, validate and match a sensitivity JSON to a model.

``hawq allocate --sensitivity-file FILE`` reads what two commands write, in one format:

* the JSON of ``hawq analyze --json`` (the *analysis* form), a
  :class:`hawq.analysis.hessian.HessianResult` dict::

      {"metric": "trace" | "eigen" | "fisher" | "channel",
       "layers": [{"name": str, "params": int, "trace": float, "avg_trace": float,
                   "stderr": float, "eigenvalue": float | [float, ...], "probes": int}, ...],
       "model": str (optional), "version": 1, ...}

* the ``sensitivity.json`` that ``hawq compress --out DIR`` / ``hawq zeroq --out DIR`` write (the
  *run* form): the same analysis dict under ``"hessian"``, beside the run's own statistics
  (``names``, ``weight_errors``, ``omega``, ``warnings``, and ``model``)::

      {"hessian": {<the analysis form>}, "names": [...], "omega": [[...]], "model": str, ...}

  A run made with a sensitivity that estimates no Hessian (``measured``, ZeroQ's ``kl``) has no
  ``"hessian"``; allocate cannot use it (a :class:`DataError` says so).

Per layer only ``name`` and the score are required: ``avg_trace`` (Tr(H)/n, metrics ``trace``,
``fisher``, ``channel``) or ``eigenvalue`` (its first entry when a list; metric ``eigen``). The
score must be a finite real number. ``params`` is optional; when given it must equal the
model's. Every quantizable layer of the model must be listed exactly once and no other layer.
Sizes (``params``, ``macs``) always come from the model, never from the file.

A negative score (a Hutchinson trace estimate below zero, possible with few probes) is kept in
:attr:`SensitivityFile.negative` and clamped at 0 by :meth:`SensitivityFile.scores_for`: the
layer is treated as having zero curvature, so quantizing it costs nothing in the quadratic model
and the allocator gives it the fewest bits the budget and limits allow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hawq.base.errors import ConfigError, DataError

__all__ = ["SCORE_KEYS", "SensitivityFile", "load_sensitivity", "parse_sensitivity",
           "resolve_model_name"]

#: metric -> the per-layer field that scores a layer
SCORE_KEYS = {"trace": "avg_trace", "fisher": "avg_trace", "channel": "avg_trace",
              "eigen": "eigenvalue"}

_FIX = "re-run 'hawq analyze --model MODEL --json FILE' (or 'hawq compress --out DIR')"


@dataclass
class SensitivityFile:
    """A validated sensitivity file: the ``metric``, the ``model`` it names (or None), per-layer
    ``names`` and ``scores`` in the file's order, the ``params`` the file claims (None where it
    gives none), the layers whose score is negative, the form it was read from (``analysis``
    or ``run``) and where it came from (``source``, for messages)."""

    source: str
    metric: str
    model: str | None
    names: list[str]
    scores: list[float]
    params: list[int | None]
    form: str = "analysis"
    negative: list[str] = field(default_factory=list)

    def scores_for(self, layers: Sequence[Any]) -> np.ndarray:
        """The scores in the order of ``layers`` (the model's quantizable layers: objects with
        ``name`` and ``params``, e.g. :class:`hawq.modules.surgery.LayerInfo`), negative ones
        clamped at 0. Raises :class:`ConfigError` naming the layers when the file lists a layer
        the model lacks, misses one of the model's layers, or claims another size. Cost: O(L)."""
        model_names = [lay.name for lay in layers]
        known = set(model_names)
        unknown = [n for n in self.names if n not in known]
        if unknown:
            raise ConfigError(
                f"{self.source} lists layers {_few(unknown)} that the model does not have (its "
                f"layers: {_few(model_names)}): the file was made for another model; analyze "
                "and allocate the same model (give the analyzed model with --model)")
        listed = set(self.names)
        missing = [n for n in model_names if n not in listed]
        if missing:
            raise ConfigError(
                f"{self.source} has no score for the model's layers {_few(missing)}: a plan "
                f"must cover every quantizable layer; {_FIX} so the file lists all "
                f"{len(model_names)} layers")
        claimed = dict(zip(self.names, self.params))
        wrong = [(lay.name, claimed[lay.name], int(lay.params)) for lay in layers
                 if claimed[lay.name] is not None and claimed[lay.name] != int(lay.params)]
        if wrong:
            n, said, real = wrong[0]
            raise ConfigError(
                f"{self.source} says layer {n!r} has {said} weights but the model's has {real}"
                f"{f' ({len(wrong)} layers differ)' if len(wrong) > 1 else ''}: the file was "
                f"made for another model (or edited); {_FIX} for this model")
        by_name = dict(zip(self.names, self.scores))
        return np.maximum(np.array([by_name[n] for n in model_names], dtype=float), 0.0)

    def negative_warning(self) -> str | None:
        """The warning for negative scores (None when there are none)."""
        if not self.negative:
            return None
        what = "eigenvalue" if self.metric == "eigen" else "average Hessian trace"
        return (f"negative {what} in {self.source} for {_few(self.negative)}: too few probes "
                "for the noise; hawq treats it as zero curvature (clamped at 0, so the "
                "allocator gives the layer the fewest bits the budget allows); re-analyze with "
                "a higher --max-probes or a smaller --tol")


def _few(names: Sequence[str], k: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return f"[{shown}{', ...' if len(names) > k else ''}] ({len(names)})" \
        if len(names) > k else f"[{shown}]"


def _number(v: Any) -> float | None:
    """``v`` as a finite float, or None when it is not a finite real number (bools excluded)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except (OverflowError, ValueError):
        return None
    return f if math.isfinite(f) else None


def load_sensitivity(path: str | os.PathLike) -> SensitivityFile:
    """Read and validate the sensitivity file at ``path`` (either form; see the module
    docstring). Raises :class:`DataError` naming the file, the layer and the fix when the file is
    missing, unreadable, not JSON or malformed. Cost: reading the file, O(L)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"sensitivity file {str(p)!r} is a directory: give the JSON written by "
                        "'hawq analyze --json' or the run's sensitivity.json")
    from hawq.base.io import read_json

    try:
        data = read_json(p, "sensitivity file")
    except (UnicodeDecodeError, RecursionError, OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"sensitivity file {str(p)!r} cannot be read as JSON "
                        f"({type(exc).__name__}): {_FIX}") from None
    return parse_sensitivity(data, str(p))


def parse_sensitivity(data: Any, source: str = "sensitivity file") -> SensitivityFile:
    """Validate ``data`` (a parsed sensitivity JSON, either form) into a
    :class:`SensitivityFile`. Raises :class:`DataError` naming ``source``, the layer and the fix.
    Cost: O(L)."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a JSON object (the JSON of 'hawq analyze --json' "
                        f"or a run's sensitivity.json), got a {type(data).__name__}")
    model = data.get("model")
    form = "analysis"
    hess = data
    if "layers" not in data and "hessian" in data:
        form, hess = "run", data["hessian"]
        if hess is None:
            raise DataError(f"{source} holds no Hessian statistics (the run used a "
                            "sensitivity that estimates none, e.g. 'measured' or 'kl'): "
                            f"{_FIX}")
        if not isinstance(hess, dict):
            raise DataError(f"{source}: 'hessian' must be an object (the JSON of 'hawq "
                            f"analyze'), got a {type(hess).__name__}: {_FIX}")
    elif "layers" not in data:
        what = ("holds no Hessian statistics (the run used a sensitivity that estimates none, "
                "e.g. 'measured' or 'kl')" if "omega" in data or "names" in data
                else "has neither 'layers' (hawq analyze --json) nor 'hessian' (a run's "
                     "sensitivity.json)")
        raise DataError(f"{source} {what}: {_FIX}")
    if model is not None and not isinstance(model, str):
        raise DataError(f"{source}: 'model' must be a string, got {type(model).__name__}; "
                        "remove it and give --model")
    version = hess.get("version", 1)
    if version != 1 or isinstance(version, bool):
        raise DataError(f"{source}: Hessian result version {version!r} is not 1 (written by "
                        f"another hawq?): {_FIX}")
    metric = hess.get("metric", "trace")
    if not isinstance(metric, str) or metric not in SCORE_KEYS:
        raise DataError(f"{source}: metric {metric!r} cannot score weight bits (use one of "
                        f"{sorted(SCORE_KEYS)}; 'activation' traces score activations): "
                        "re-run 'hawq analyze --metric trace --json FILE'")
    key = SCORE_KEYS[metric]
    layers = hess.get("layers")
    if not isinstance(layers, list) or not layers:
        raise DataError(f"{source}: 'layers' must be a non-empty list of per-layer objects, got "
                        f"{type(layers).__name__ if not isinstance(layers, list) else '[]'}: "
                        f"{_FIX}")
    names: list[str] = []
    seen: set[str] = set()
    scores: list[float] = []
    params: list[int | None] = []
    for i, lh in enumerate(layers):
        if not isinstance(lh, dict):
            raise DataError(f"{source}: layer entry #{i} is a {type(lh).__name__}, not an object "
                            f"with 'name' and '{key}': {_FIX}")
        name = lh.get("name")
        if not isinstance(name, str) or not name:
            raise DataError(f"{source}: layer entry #{i} has no 'name' (a layer name string, as "
                            f"'hawq layers' lists): {_FIX}")
        if name in seen:
            raise DataError(f"{source} lists layer {name!r} twice: each layer must appear once; "
                            f"{_FIX}")
        raw = lh.get(key)
        if key == "eigenvalue" and isinstance(raw, list):
            raw = raw[0] if raw else None
        if raw is None:
            raise DataError(f"{source}: layer {name!r} has no {key!r} (metric {metric!r} needs "
                            f"it): {_FIX}")
        score = _number(raw)
        if score is None:
            raise DataError(f"{source}: layer {name!r} has {key}={raw!r}, not a finite number: "
                            f"{_FIX}")
        n = lh.get("params")
        if n is not None:
            f = _number(n)
            if f is None or f != int(f) or f < 1:
                raise DataError(f"{source}: layer {name!r} has params={n!r}, not a positive "
                                f"whole number: remove it (sizes come from the model) or {_FIX}")
            n = int(f)
        names.append(name)
        seen.add(name)
        scores.append(score)
        params.append(n)
    negative = [n for n, s in zip(names, scores) if s < 0]
    return SensitivityFile(source, metric, model, names, scores, params, form, negative)


def resolve_model_name(given: str | None, sens: SensitivityFile) -> tuple[str, str | None]:
    """(the model to build, a warning or None): ``given`` (the user's ``--model``) when set,
    else the file's model only when it is a built-in name (:data:`hawq.modules.models.MODELS`);
    a file never chooses code to import. Raises :class:`ConfigError` saying to give ``--model``
    otherwise."""
    from hawq.modules.models import MODELS

    if given:
        note = None
        if sens.model is not None and sens.model != given:
            note = (f"{sens.source} was made for model {sens.model!r}; allocating for --model "
                    f"{given!r} (its layers and sizes are checked against the file)")
        return given, note
    if sens.model is None:
        raise ConfigError(f"{sens.source} names no model: give --model (the analyzed model; "
                          "its weights are needed for ||Q(W) - W||^2)")
    if sens.model not in MODELS.names():
        raise ConfigError(f"{sens.source} names model {sens.model!r}, which is not a built-in "
                          f"model ({MODELS.names()}): give --model explicitly (hawq does not "
                          "import code named by a file)")
    return sens.model, None
