"""Packed integer checkpoints: quantized weights stored as real b-bit integers.

:func:`save_quantized` writes two files, each atomically:

* ``<stem>.safetensors`` holds the tensors. A quantized layer ``L`` with weight shape
  (C, ...) stores ``L.weight:packed`` (uint8): its integer weights, row by row (one row = one
  output channel, K = weight[0].numel() values), each value ``u = q - qmin`` written with the
  row's bit width b into a little-endian bit stream that starts on a byte boundary, so a row
  takes ceil(K*b/8) bytes. Beside it ``L.weight:scale`` (float32, per channel or 0-d),
  ``L.weight:zero_point`` (int32; only when not all zero) and ``L.weight:bits`` (uint8, one per
  row; only for per-output-channel bit widths). A MultiheadAttention ``L`` stores its packed
  ``in_proj_weight`` the same way, under ``L.in_proj_weight:...`` (one with separate q/k/v
  weights raises UnsupportedLayerError). Every other state-dict entry (BatchNorm,
  biases, float layers, the activation quantizers' calibrated ``act.lo``/``act.hi``) is stored
  under its own key, floats as float32.
* ``<stem>.json``, the manifest: format version, the model identity (registry name or
  ``module:factory``, and the class), the bit plan, per layer its quantizer form, bit widths,
  packed layout and activation quantizer (bits, state, scale, zero point), the byte breakdown
  against :func:`hawq.modules.accounting.budget_report`, and the SHA-256 of the tensor file (a manifest
  never pairs with another run's tensors).

:func:`load_quantized` rebuilds the model (architecture from a skeleton you pass, or a built-in
registry name in the manifest) with :class:`PackedWeightMixin` twins whose weight quantization
parameters are the stored ones, so its outputs equal the fake-quantized model's bit for bit
(``torch.equal``). Loading never imports or calls anything a manifest names (a checkpoint is
data, not code), confines the tensor file to the manifest's own folder and checks every field
it uses, and the sizes against the tensor file, before allocating anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from hawq.modules.attention import pin_slow_path_
from hawq.base.errors import ConfigError, DataError, UnsupportedLayerError
from hawq.base.io import atomic_write_bytes, atomic_write_text
from hawq.maths.plan import A_CALIBRATIONS, BitPlan, LayerSpec, QuantConfig
from hawq.modules.qmodules import TWINS, QuantMixin, layer_bias, layer_weight, layer_weight_key, to_twin
from hawq.maths.quantizers import QParams, dequantize, int_range, quantize

__all__ = ["ENCODING", "ExportResult", "FORMAT", "FORMAT_VERSION", "PackedWeightMixin",
           "accounted_size", "calibration_split", "load_quantized", "manifest_path_for",
           "pack_bits", "packed_class", "quantized_from_plan", "read_manifest", "roundtrip_equal",
           "row_nbytes", "save_quantized", "size_check", "unpack_bits"]

FORMAT = "hawq-packed"
FORMAT_VERSION = 1
ENCODING = ("per output channel row: u = q - qmin (qmin = -2^(b-1) symmetric, 0 asymmetric), "
            "b bits per value, little-endian bit stream, each row starts on a byte")
#: Rows x row length x bits of the temporary bit array, per packing chunk (bounds memory).
_CHUNK_BITS = 1 << 25


# ----------------------------------------------------------------------------- bit packing

def row_nbytes(bits: int | Sequence[int] | np.ndarray, row_len: int) -> np.ndarray:
    """Bytes of each packed row: ceil(row_len * b / 8) (int64 array, one entry per row)."""
    return (np.asarray(bits, dtype=np.int64) * int(row_len) + 7) // 8


def _row_bits(bits: int | Sequence[int] | np.ndarray, rows: int) -> np.ndarray:
    arr = np.asarray(bits, dtype=np.int64)
    if arr.ndim == 0:
        arr = np.full(rows, int(arr), dtype=np.int64)
    if arr.shape != (rows,):
        raise ConfigError(f"bits has {arr.size} entries for {rows} rows: give one int or one "
                          "bit width per row")
    if arr.size and (arr.min() < 1 or arr.max() > 8):
        raise ConfigError(f"bit widths {sorted(set(arr.tolist()))}: packing supports 1..8 bits")
    return arr


def _pack_uniform(u: np.ndarray, b: int) -> np.ndarray:
    """(R, K) values in [0, 2^b) -> (R, ceil(K*b/8)) uint8, little-endian bit order."""
    R, K = u.shape
    if b == 8:
        return u.astype(np.uint8)
    out = np.empty((R, (K * b + 7) // 8), dtype=np.uint8)
    shifts = np.arange(b, dtype=np.uint8)
    step = max(1, _CHUNK_BITS // max(K * b, 1))
    for s in range(0, R, step):
        chunk = u[s:s + step].astype(np.uint8)
        bitarr = ((chunk[..., None] >> shifts) & 1).reshape(len(chunk), K * b)
        out[s:s + step] = np.packbits(bitarr, axis=1, bitorder="little")
    return out


def _unpack_uniform(p: np.ndarray, b: int, K: int) -> np.ndarray:
    """Inverse of :func:`_pack_uniform`: (R, nbytes) uint8 -> (R, K) int64."""
    if b == 8:
        return p.astype(np.int64)
    R = p.shape[0]
    out = np.empty((R, K), dtype=np.int64)
    weights = (1 << np.arange(b, dtype=np.int64))
    step = max(1, _CHUNK_BITS // max(K * b, 1))
    for s in range(0, R, step):
        bitarr = np.unpackbits(p[s:s + step], axis=1, count=K * b, bitorder="little")
        out[s:s + step] = bitarr.reshape(-1, K, b).astype(np.int64) @ weights
    return out


def pack_bits(values: torch.Tensor | np.ndarray, bits: int | Sequence[int]) -> np.ndarray:
    """Pack non-negative integers row by row at their bit width into one uint8 array.

    ``values``: (R, K) integers, row r in [0, 2^bits[r]); ``bits``: one int or one per row
    (1..8). Row r occupies ``row_nbytes(bits, K)[r]`` bytes starting at the sum of the
    previous rows' bytes; inside a row, value k's bit j is stream bit k*b + j, stream bit i
    is bit i % 8 of byte i // 8 (little-endian), padding bits are 0. Vectorised: one numpy
    pass per distinct bit width (memory about R*K*b bytes, in chunks). Returns a 1-d uint8
    array. Raises ConfigError when a value does not fit its row's width.
    """
    u = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if u.ndim != 2:
        raise ConfigError(f"pack_bits needs a 2-d (rows, row_len) array, got shape {u.shape}")
    R, K = u.shape
    b = _row_bits(bits, R)
    if u.size and (u.min() < 0 or (u >= (1 << b)[:, None]).any()):
        raise ConfigError("pack_bits: a value does not fit its row's bit width (give u = q - "
                          "qmin in [0, 2^b))")
    nbytes = row_nbytes(b, K)
    offsets = np.concatenate([[0], np.cumsum(nbytes)])
    out = np.zeros(int(offsets[-1]), dtype=np.uint8)
    for bw in np.unique(b):
        rows = np.nonzero(b == bw)[0]
        packed = _pack_uniform(u[rows], int(bw))
        if len(np.unique(b)) == 1:
            return packed.reshape(-1)
        out[offsets[rows][:, None] + np.arange(packed.shape[1])] = packed
    return out


def unpack_bits(data: torch.Tensor | np.ndarray, bits: int | Sequence[int], rows: int,
                row_len: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the (rows, row_len) int64 values. Raises DataError when
    ``data`` has the wrong length for the layout. Cost: one vectorised pass per bit width."""
    p = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    p = p.reshape(-1).astype(np.uint8, copy=False)
    b = _row_bits(bits, rows)
    nbytes = row_nbytes(b, row_len)
    offsets = np.concatenate([[0], np.cumsum(nbytes)])
    if p.size != offsets[-1]:
        raise DataError(f"packed data has {p.size} bytes, the layout ({rows} rows of {row_len} "
                        f"values) needs {int(offsets[-1])}: the file is corrupt or mismatched")
    out = np.empty((rows, row_len), dtype=np.int64)
    for bw in np.unique(b):
        sel = np.nonzero(b == bw)[0]
        n = int(row_nbytes(int(bw), row_len))
        chunk = p[offsets[sel][:, None] + np.arange(n)] if len(np.unique(b)) > 1 \
            else p.reshape(rows, n)
        out[sel] = _unpack_uniform(chunk, int(bw), row_len)
    return out


# ----------------------------------------------------------------------------- packed twins

class PackedWeightMixin:
    """A quantized twin whose weight quantization parameters are fixed (loaded from a packed
    checkpoint) instead of recomputed from the weight. ``weight`` holds the dequantized
    integers, so fake-quantizing it with the stored parameters returns it bit for bit (and
    keeps the straight-through gradient, so the model still fine-tunes). Calling ``setup``
    again (re-quantizing with a new plan) drops the stored parameters."""

    packed_qparams: QParams | None = None

    def weight_qparams(self):  # type: ignore[override]
        qp = self.__dict__.get("packed_qparams")
        return qp if qp is not None else super().weight_qparams()  # type: ignore[misc]

    def setup(self, spec: LayerSpec, config: QuantConfig) -> None:  # type: ignore[override]
        self.__dict__["packed_qparams"] = None
        super().setup(spec, config)  # type: ignore[misc]


_PACKED: dict[type, type] = {}


def packed_class(twin_type: type) -> type:
    """The :class:`PackedWeightMixin` subclass of a quantized twin type (created once)."""
    if issubclass(twin_type, PackedWeightMixin):
        return twin_type
    if twin_type not in _PACKED:
        cls = type(f"Packed{twin_type.__name__}", (PackedWeightMixin, twin_type),
                   {"__module__": __name__, "__qualname__": f"Packed{twin_type.__name__}"})
        _PACKED[twin_type] = cls
        globals()[cls.__name__] = cls  # a module-level name, as for any class (deepcopy)
    return _PACKED[twin_type]


for _twin in list(TWINS.values()):
    packed_class(_twin)


# ----------------------------------------------------------------------------- save

@dataclass
class ExportResult:
    """What :func:`save_quantized` wrote and how its size compares with the accounting.

    ``accounted_bytes`` is :func:`hawq.modules.accounting.budget_report`'s ``size_bytes`` (quantized
    weights at their bits, other parameters at 32); ``payload_bytes`` is the same content as
    stored (packed weights incl. row padding + float parameters); ``overhead_bytes`` is all
    the rest: scales/zero points/bit lists, buffers (BN running statistics, activation ranges),
    the safetensors header and the manifest. ``total_bytes`` = tensor file + manifest.
    """

    path: str
    manifest_path: str
    file_bytes: int
    manifest_bytes: int
    total_bytes: int
    accounted_bytes: float
    payload_bytes: int
    packed_weight_bytes: int
    padding_bytes: int
    float_param_bytes: int
    quant_meta_bytes: int
    buffer_bytes: int
    header_bytes: int
    overhead_bytes: int
    payload_vs_accounted: float
    layers: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def manifest_path_for(path: str | os.PathLike) -> Path:
    """The manifest beside a tensor file: ``x.safetensors`` -> ``x.json``."""
    path = Path(path)
    return path.with_suffix(".json") if path.suffix != ".json" else path.with_suffix(".m.json")


def _model_identity(model: nn.Module, model_name: str | None) -> dict[str, Any]:
    cls = type(model)
    ident: dict[str, Any] = {"name": model_name, "class": f"{cls.__module__}:{cls.__qualname__}"}
    if model_name is not None:
        try:
            from hawq.modules.models import get_spec

            spec = get_spec(model_name)
            ident["dataset"] = spec.dataset
            ident["input_shape"] = list(spec.input_shape)
        except Exception:  # identity is informative; a user name need not resolve here
            pass
    return ident


def _quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and isinstance(m, QuantMixin)}


def _infos_without_forward(model: nn.Module, names: Sequence[str] | None = None) -> list:
    """LayerInfo rows (params only; no MACs/shapes) for the accounting, without a forward."""
    from hawq.modules.surgery import LayerInfo, quantizable_layers

    mods = quantizable_layers(model)
    out = []
    for name, m in mods.items():
        bias = layer_bias(m)
        out.append(LayerInfo(name, type(m).__name__, layer_weight(m).numel(),
                             0 if bias is None else bias.numel(), 0, [], []))
    return out


def accounted_size(model: nn.Module) -> Any:
    """:func:`hawq.modules.accounting.budget_report` of ``model``'s current plan (no forward pass)."""
    from hawq.modules.accounting import budget_report, count_params
    from hawq.modules.surgery import current_plan

    return budget_report(_infos_without_forward(model), current_plan(model), count_params(model))


def _as_list_bits(bits: Any) -> int | list[int]:
    if isinstance(bits, torch.Tensor):
        return [int(b) for b in bits.tolist()] if bits.dim() else int(bits)
    return [int(b) for b in bits] if isinstance(bits, (list, tuple)) else int(bits)


def save_quantized(model: nn.Module, path: str | os.PathLike, model_name: str | None = None,
                   extra: dict[str, Any] | None = None) -> ExportResult:
    """Write ``model`` (quantized in place by :func:`hawq.quantize_` and calibrated) as a packed
    integer checkpoint: ``path`` (safetensors) and its JSON manifest beside it (see the
    module docstring for the layout). ``model_name`` (a :mod:`hawq.modules.models` registry name or
    ``module:factory``) lets :func:`load_quantized` rebuild the architecture on its own;
    ``extra`` is stored in the manifest as is. Returns an :class:`ExportResult` with the byte
    breakdown. Cost: one quantize pass over each weight plus the packing (vectorised).
    """
    from safetensors.torch import save as st_save

    path = Path(path)
    qlayers = _quant_layers(model)
    if not qlayers:
        raise ConfigError("save_quantized: the model has no quantized layer; run "
                          "hawq.quantize_(model, plan) (and hawq.calibrate_) first")
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    packed_keys: set[str] = set()
    packed_bytes = padding_bits = meta_bytes = 0
    for name, m in qlayers.items():
        cfg = m.config
        act = m.act
        act_qp = act.qparams() if act.state == "frozen" else None
        entry: dict[str, Any] = {
            "type": type(m).__name__.removeprefix("Packed"),
            "w_bits": _as_list_bits(m.w_bits), "a_bits": int(act.bits),
            "weight_shape": list(m.weight.shape),
            "w_symmetric": bool(cfg.w_symmetric), "w_per_channel": bool(cfg.w_per_channel),
            "act": {"bits": int(act.bits), "state": act.state, "method": act.method,
                    "percentile": float(act.percentile),
                    "scale": None if act_qp is None else float(act_qp.scale),
                    "zero_point": None if act_qp is None else int(act_qp.zero_point),
                    "learned": bool(getattr(act, "learn", False))},
        }
        qp = m.weight_qparams()
        if qp is None:  # a float layer inside a plan (w_bits 16/32): weight stays float32
            entry["packed"] = False
            layers[name] = entry
            continue
        wkey = layer_weight_key(m)
        if wkey is None:
            raise UnsupportedLayerError(
                f"save_quantized: layer {name!r} ({type(m).__name__}) keeps its quantized weight "
                "in several tensors (a MultiheadAttention with kdim/vdim != embed_dim), which "
                "the packed format cannot store yet: leave it float in the plan, or save the "
                "fake-quantized model with torch.save(model.state_dict(), ...)")
        w = m.weight.detach().float().cpu()
        q = quantize(w, qp).to(torch.int64)
        rows, row_len = w.shape[0], w[0].numel()
        row_bits = (qp.bits.cpu().numpy() if isinstance(qp.bits, torch.Tensor)
                    else np.full(rows, int(qp.bits)))
        qmin = (qp.qmin.cpu().numpy() if isinstance(qp.qmin, torch.Tensor)
                else np.full(rows, int(qp.qmin)))
        u = q.reshape(rows, row_len).numpy() - qmin[:, None]
        packed = pack_bits(u, row_bits)
        key = f"{name}.{wkey}"  # "L.weight"; "L.in_proj_weight" for MultiheadAttention
        packed_keys.add(key)
        tensors[f"{key}:packed"] = torch.from_numpy(packed)
        tensors[f"{key}:scale"] = qp.scale.detach().float().cpu().clone()
        meta_bytes += tensors[f"{key}:scale"].numel() * 4
        zp = qp.zero_point.detach().cpu()
        if bool((zp != 0).any()):
            tensors[f"{key}:zero_point"] = zp.to(torch.int32).clone()
            meta_bytes += zp.numel() * 4
        if isinstance(qp.bits, torch.Tensor):
            tensors[f"{key}:bits"] = torch.from_numpy(row_bits.astype(np.uint8))
            meta_bytes += rows
        packed_bytes += packed.size
        padding_bits += int(packed.size) * 8 - int(row_bits.sum()) * row_len
        entry.update(packed=True, rows=rows, row_len=row_len, nbytes=int(packed.size),
                     per_tensor_scale=qp.axis is None)
        layers[name] = entry
    param_names = {n for n, _ in model.named_parameters()}
    float_param_bytes = buffer_bytes = 0
    for key, t in state.items():
        # learned step sizes are stored as the layers' scales (weights: key:scale,
        # activations: the manifest), so the loaded model needs no LSQ parameters
        if key in packed_keys or key.endswith((".w_step", ".act.step", ".act.zp")):
            continue
        t = t.detach().cpu()
        t = t.float() if t.is_floating_point() else t
        tensors[key] = t.contiguous().clone()
        nb = t.numel() * t.element_size()
        if key in param_names:
            float_param_bytes += nb
        else:
            buffer_bytes += nb
    from hawq.modules.surgery import current_plan

    plan = current_plan(model)
    budget = accounted_size(model)
    data = st_save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    header_bytes = 8 + int.from_bytes(data[:8], "little")
    sha = hashlib.sha256(data).hexdigest()
    payload = packed_bytes + float_param_bytes
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tensors": path.name, "sha256": sha, "encoding": ENCODING,
        "model": _model_identity(model, model_name),
        "plan": plan.to_dict(), "layers": layers,
        "sizes": {"file_bytes": len(data), "accounted_bytes": budget.size_bytes,
                  "payload_bytes": payload, "packed_weight_bytes": packed_bytes,
                  "padding_bytes": padding_bits / 8, "float_param_bytes": float_param_bytes,
                  "quant_meta_bytes": meta_bytes, "buffer_bytes": buffer_bytes,
                  "header_bytes": header_bytes},
        "extra": extra or {},
    }
    text = json.dumps(manifest, indent=1, default=float) + "\n"
    mpath = manifest_path_for(path)
    atomic_write_bytes(path, data)
    atomic_write_text(mpath, text)
    manifest_bytes = len(text.encode())
    total = len(data) + manifest_bytes
    return ExportResult(
        path=str(path), manifest_path=str(mpath), file_bytes=len(data),
        manifest_bytes=manifest_bytes, total_bytes=total, accounted_bytes=budget.size_bytes,
        payload_bytes=payload, packed_weight_bytes=packed_bytes, padding_bytes=padding_bits // 8,
        float_param_bytes=float_param_bytes, quant_meta_bytes=meta_bytes,
        buffer_bytes=buffer_bytes, header_bytes=header_bytes,
        overhead_bytes=total - payload,
        payload_vs_accounted=payload / budget.size_bytes - 1.0, layers=len(qlayers), sha256=sha)


# ----------------------------------------------------------------------------- load

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))


_ACT_STATES = ("calibrating", "frozen")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_tensor_name(name: Any, mpath: Path) -> None:
    """``tensors`` must be a plain file name in the manifest's own folder."""
    bad = (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
           or "\\" in name or "\0" in name or os.sep in name
           or (os.altsep is not None and os.altsep in name) or Path(name).is_absolute()
           or Path(name).drive)
    if not bad:
        try:
            folder = mpath.parent.resolve()
            bad = (folder / name).resolve().parent != folder
        except (OSError, ValueError, RuntimeError):  # too long, a symlink loop, ...
            bad = True
    if bad:
        raise DataError(f"manifest {str(mpath)!r}: 'tensors' = {name!r} is not a plain file name "
                        "in the manifest's own folder (no path separators, no '..', no links "
                        "leading out): the manifest is damaged or crafted; export again")


def _check_layer(name: str, e: Any, mpath: Path) -> None:
    """One ``layers`` entry of a manifest: every field :func:`load_quantized` uses has the
    right type, and a packed layer's rows/row_len/bits/weight_shape agree (DataError naming
    the field otherwise). Pure: allocates nothing proportional to the values it checks."""
    where = f"manifest {str(mpath)!r}, layer {name!r}"

    def bad(field_: str, want: str) -> DataError:
        got = e.get(field_, "<missing>") if isinstance(e, dict) else e
        text = repr(got)
        return DataError(f"{where}: {field_!r} is {text[:80]}, expected {want}; the manifest "
                         "is damaged or was edited: export again")

    if not isinstance(e, dict):
        raise DataError(f"{where}: the entry is a {type(e).__name__}, expected an object of "
                        "layer fields; the manifest is damaged or was edited: export again")
    shape = e.get("weight_shape")
    if not (isinstance(shape, list) and shape and all(_is_int(d) and d >= 1 for d in shape)):
        raise bad("weight_shape", "a non-empty list of positive integers")
    for key in ("w_symmetric", "w_per_channel"):
        if not isinstance(e.get(key), bool):
            raise bad(key, "true or false")
    if not isinstance(e.get("packed", False), bool):
        raise bad("packed", "true or false")
    packed = e.get("packed", False)
    w = e.get("w_bits")
    if packed:
        ok = (_is_int(w) and 1 <= w <= 8) or (
            isinstance(w, list) and w and all(_is_int(b) and 1 <= b <= 8 for b in w))
        if not ok:
            raise bad("w_bits", "an integer in 1..8 or a list of them (one per row)")
    elif not (_is_int(w) or (isinstance(w, list) and w and all(_is_int(b) for b in w))):
        raise bad("w_bits", "an integer bit width or a list of them")
    if not _is_int(e.get("a_bits")):
        raise bad("a_bits", "an integer bit width")
    try:
        LayerSpec(w, e["a_bits"])
    except ConfigError as exc:
        raise DataError(f"{where}: {exc}; the manifest is damaged or was edited: export "
                        "again") from None
    act = e.get("act")
    if not isinstance(act, dict):
        raise bad("act", "an object (the activation quantizer)")
    act_want = {"bits": (lambda v: _is_int(v) and (1 <= v <= 8 or v in (16, 32)),
                         "a bit width in 1..8, or 16/32"),
                "state": (lambda v: v in _ACT_STATES, f"one of {list(_ACT_STATES)}"),
                "method": (lambda v: v in A_CALIBRATIONS, f"one of {list(A_CALIBRATIONS)}"),
                "percentile": (_is_num, "a finite number"),
                "scale": (lambda v: v is None or (_is_num(v) and abs(v) < 1e38),
                          "a finite float32 number or null"),
                "zero_point": (lambda v: v is None or (_is_int(v) and abs(v) < 2**31),
                               "an int32 or null"),
                "learned": (lambda v: isinstance(v, bool), "true or false")}
    for key, (check, want) in act_want.items():
        if key == "learned" and key not in act:
            continue
        if key not in act or not check(act[key]):
            got = repr(act.get(key, "<missing>"))[:80]
            raise DataError(f"{where}: 'act.{key}' is {got}, expected {want}; the manifest is "
                            "damaged or was edited: export again")
    if act.get("learned") and act["scale"] is not None and act["zero_point"] is None:
        raise bad("act", "a zero_point with the learned scale")
    if not packed:
        return
    rows, row_len = e.get("rows"), e.get("row_len")
    if not (_is_int(rows) and rows == shape[0]):
        raise bad("rows", f"the weight's first dimension {shape[0]} (weight_shape {shape})")
    if not (_is_int(row_len) and row_len == math.prod(shape[1:])):
        raise bad("row_len", f"{math.prod(shape[1:])}, the product of weight_shape[1:] "
                             f"(weight_shape {shape})")
    if isinstance(w, list) and len(w) != rows:
        raise bad("w_bits", f"one bit width per row ({rows} rows), got {len(w)}")
    if not isinstance(e.get("per_tensor_scale"), bool):
        raise bad("per_tensor_scale", "true or false")
    if "nbytes" in e and e["nbytes"] != _packed_nbytes(w, rows, row_len):
        raise bad("nbytes", f"{_packed_nbytes(w, rows, row_len)} for {rows} rows of {row_len} "
                            f"values at w_bits {w if _is_int(w) else 'per row'}")


def _packed_nbytes(bits: int | list[int], rows: int, row_len: int) -> int:
    """Bytes of a packed weight (Python ints: no allocation, however large the numbers)."""
    if isinstance(bits, list):
        return sum((b * row_len + 7) // 8 for b in bits)
    return rows * ((bits * row_len + 7) // 8)


def _check_manifest(man: dict[str, Any], mpath: Path) -> None:
    """Schema of a packed-checkpoint manifest (see :func:`read_manifest`)."""
    where = f"manifest {str(mpath)!r}"
    version = man.get("format_version", 0)
    if not _is_int(version):
        raise DataError(f"{where}: 'format_version' is {version!r}, expected an integer; the "
                        "manifest is damaged or was edited: export again")
    if version > FORMAT_VERSION:
        raise DataError(f"{where} has format version {version}, newer than this hawq "
                        f"({FORMAT_VERSION}): upgrade hawq")
    _check_tensor_name(man.get("tensors"), mpath)
    sha = man.get("sha256")
    if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        raise DataError(f"{where}: 'sha256' is {repr(sha)[:80]}, expected 64 lowercase hex "
                        "digits; the manifest is damaged or was edited: export again")
    ident = man.get("model", {})
    if not isinstance(ident, dict):
        raise DataError(f"{where}: 'model' is a {type(ident).__name__}, expected an object "
                        "(name, class); the manifest is damaged or was edited: export again")
    for key in ("name", "class"):
        if ident.get(key) is not None and not isinstance(ident[key], str):
            raise DataError(f"{where}: 'model.{key}' is {repr(ident[key])[:80]}, expected a "
                            "string or null; the manifest is damaged or was edited: export again")
    layers = man.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise DataError(f"{where}: 'layers' is {repr(layers)[:80]}, expected a non-empty object "
                        "(layer name -> fields); the manifest is damaged or was edited: export "
                        "again")
    for name, entry in layers.items():
        if not name:
            raise DataError(f"{where}: a layer has an empty name; export again")
        _check_layer(name, entry, mpath)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a packed checkpoint (give the .safetensors or the manifest path),
    checked against the schema: every field :func:`load_quantized` uses has the right type,
    ``tensors`` is a plain file name in the manifest's folder, and each packed layer's rows,
    row length, bits and weight shape agree. Raises DataError naming the field otherwise.
    Cost: reading and checking the JSON (nothing is allocated from its numbers)."""
    from hawq.base.io import read_json

    path = Path(path)
    mpath = path if path.suffix == ".json" else manifest_path_for(path)
    man = read_json(mpath, "packed-checkpoint manifest")
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        fmt = man.get("format") if isinstance(man, dict) else None
        raise DataError(f"{str(mpath)!r} is not a hawq packed-checkpoint manifest (format "
                        f"{repr(fmt)[:80]})")
    _check_manifest(man, mpath)
    return man


def _skeleton(man: dict[str, Any], model: nn.Module | Callable[[], nn.Module] | None,
              data_dir: str | os.PathLike | None) -> nn.Module:
    """The architecture to load into: ``model`` (an instance, or a factory called with no
    arguments), else the manifest's ``model.name`` when it is a key of the built-in registry
    :data:`hawq.modules.models.MODELS`. Nothing a manifest names is ever imported or called."""
    if isinstance(model, nn.Module):
        return model
    if model is not None:
        if not callable(model):
            raise ConfigError(f"model={model!r}: give an nn.Module instance or a no-argument "
                              "factory returning one")
        built = model()
        if not isinstance(built, nn.Module):
            raise ConfigError(f"model factory {getattr(model, '__name__', model)!r} returned a "
                              f"{type(built).__name__}, not an nn.Module")
        return built
    from hawq.modules.models import MODELS, build_model

    ident = man.get("model") or {}
    name = ident.get("name")
    if isinstance(name, str) and name in MODELS:
        return build_model(name, pretrained=False, data_dir=data_dir)
    raise ConfigError(
        f"the checkpoint's model is {name!r} (class {ident.get('class')!r}), not a built-in "
        f"hawq model ({', '.join(MODELS.names())}): load_quantized never imports or calls what "
        "a checkpoint names; pass the architecture yourself, "
        "load_quantized(path, model=<an instance or a no-argument factory>) (on the command "
        "line: --model pkg.module:factory)")


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_packed_sizes(man: dict[str, Any], tensors: dict[str, torch.Tensor],
                        path: Path) -> None:
    """Each packed layer of the (schema-checked) manifest has exactly one ``<layer>.<w>:packed``
    uint8 tensor of the byte size its rows/row_len/bits give, and scales of the right shape:
    checked before anything is unpacked (DataError otherwise)."""
    packed: dict[str, list[str]] = {}
    for key in tensors:
        if key.endswith(":packed"):
            packed.setdefault(key[:-len(":packed")].rpartition(".")[0], []).append(key)
    for name, e in man["layers"].items():
        if not e.get("packed"):
            continue
        where = f"{str(path)!r}, layer {name!r}"
        keys = packed.get(name, [])
        if len(keys) != 1:
            raise DataError(f"{where}: {len(keys)} packed weight tensors for a packed layer "
                            "(expected 1); the files are damaged or mismatched: export again")
        t = tensors[keys[0]]
        want = _packed_nbytes(e["w_bits"], e["rows"], e["row_len"])
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != want:
            raise DataError(f"{where}: packed weight is {t.numel()} {t.dtype} values, the "
                            f"manifest's layout ({e['rows']} rows of {e['row_len']} values at "
                            f"w_bits {e['w_bits'] if _is_int(e['w_bits']) else 'per row'}) needs "
                            f"{want} uint8 bytes; the files are damaged or mismatched: export "
                            "again")
        base = keys[0][:-len(":packed")]
        scale = tensors.get(f"{base}:scale")
        shape = () if e["per_tensor_scale"] else (e["rows"],)
        if scale is None or tuple(scale.shape) != shape or not scale.is_floating_point():
            raise DataError(f"{where}: scale tensor is "
                            f"{None if scale is None else tuple(scale.shape)}, expected a float "
                            f"tensor of shape {shape}; the files are damaged or mismatched: "
                            "export again")
        zp = tensors.get(f"{base}:zero_point")
        if zp is not None and (tuple(zp.shape) != shape or zp.is_floating_point()):
            raise DataError(f"{where}: zero_point tensor has shape {tuple(zp.shape)} "
                            f"({zp.dtype}), expected integers of shape {shape}; export again")


def load_quantized(path: str | os.PathLike,
                   model: nn.Module | Callable[[], nn.Module] | None = None,
                   data_dir: str | os.PathLike | None = None) -> nn.Module:
    """Rebuild the quantized model saved by :func:`save_quantized` at ``path``.

    The architecture comes from ``model`` (an instance, used in place, or a no-argument
    factory) or else, only when the manifest's ``model.name`` is a built-in registry name
    (:data:`hawq.modules.models.MODELS`), from that name: nothing the manifest names is ever
    imported or called (a checkpoint saved from your own model needs ``model=``). The
    manifest is checked first (:func:`read_manifest`: field types, ``tensors`` a plain file
    name beside it, rows/row length/bits/shape consistent), then the tensor file against it
    (SHA-256, each packed weight's byte size) before anything is unpacked. Quantized layers
    become :class:`PackedWeightMixin` twins with the stored scales and bits, activation
    quantizers get their stored ranges and state, every other tensor is loaded strictly.
    Returns the model in eval mode; its outputs equal the saved model's exactly. Raises
    DataError on a missing/corrupt/mismatched/malformed file and ConfigError when no
    architecture is given for a non-built-in model or it does not match. Cost: reading and
    hashing the file, unpacking + one dequantize per layer.
    """
    from safetensors.torch import load as st_load

    path = Path(path)
    man = read_manifest(path)
    if not path.is_file() or path.suffix == ".json":
        path = path.parent / man["tensors"] if path.suffix == ".json" else path
    if not path.is_file():
        raise DataError(f"packed checkpoint {str(path)!r} does not exist: check the path")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != man["sha256"]:
        raise DataError(f"{str(path)!r} does not match its manifest (SHA-256 differs): the "
                        "files come from different exports or one is damaged; export again")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors' own error types
        raise DataError(f"{str(path)!r} is not a readable safetensors file ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}); export again") from None
    _check_packed_sizes(man, tensors, path)
    net = _skeleton(man, model, data_dir)
    mods = dict(net.named_modules())
    for name, entry in man["layers"].items():
        if name not in mods:
            raise ConfigError(f"the checkpoint has layer {name!r} that the model lacks: pass the "
                              "architecture the checkpoint was saved from")
        m = mods[name]
        w = layer_weight(m)
        if w is None or list(w.shape) != entry["weight_shape"]:
            raise ConfigError(f"layer {name!r}: checkpoint weight shape {entry['weight_shape']} "
                              f"!= model {None if w is None else list(w.shape)}; pass the "
                              "architecture the checkpoint was saved from")
        spec = LayerSpec(entry["w_bits"], entry["a_bits"])
        try:
            cfg = QuantConfig(w_symmetric=entry["w_symmetric"],
                              w_per_channel=entry["w_per_channel"],
                              a_calibration=entry["act"]["method"],
                              a_percentile=entry["act"]["percentile"])
        except ConfigError as e:
            raise DataError(f"{str(path)!r}, layer {name!r}: {e}; the manifest is damaged or "
                            "was edited: export again") from None
        twin = to_twin(m, spec, cfg)
        twin.__class__ = packed_class(type(twin))
        _set_child(net, name, twin)
        mods[name] = twin
    weights: dict[str, torch.Tensor] = {}
    for name, entry in man["layers"].items():
        twin = mods[name]
        twin.act.state = entry["act"]["state"]
        if entry["act"].get("learned") and entry["act"]["scale"] is not None:
            lo, hi = int_range(int(entry["act"]["bits"]), False)
            twin.act.__dict__["fixed_qparams"] = QParams(
                torch.tensor(entry["act"]["scale"], dtype=torch.float32),
                torch.tensor(entry["act"]["zero_point"], dtype=torch.int64),
                int(entry["act"]["bits"]), lo, hi, None)
        if getattr(twin, "bias", ...) is None and f"{name}.bias" in tensors:  # bias_correct_
            twin.bias = nn.Parameter(torch.zeros(twin.weight.shape[0]))
        if not entry.get("packed"):
            continue
        key = f"{name}.{layer_weight_key(twin)}"
        if f"{key}:packed" not in tensors:
            raise ConfigError(f"layer {name!r}: the checkpoint packs another weight than the "
                              f"model's {key!r}; pass the architecture the checkpoint was saved "
                              "from")
        rows, row_len = entry["rows"], entry["row_len"]
        bits = entry["w_bits"]
        qmin = np.asarray(int_range(np.asarray(bits, dtype=np.int64), entry["w_symmetric"])[0])
        u = unpack_bits(tensors[f"{key}:packed"], bits, rows, row_len)
        q = torch.from_numpy(u + (qmin[:, None] if qmin.ndim else qmin))
        q = q.reshape(entry["weight_shape"])
        scale = tensors[f"{key}:scale"].float()
        zp = tensors.get(f"{key}:zero_point")
        zp = torch.zeros(scale.shape, dtype=torch.int64) if zp is None else zp.to(torch.int64)
        if isinstance(bits, list):
            b = torch.tensor(bits, dtype=torch.int64)
            lo, hi = int_range(b, entry["w_symmetric"])
        else:
            b = int(bits)
            lo, hi = int_range(b, entry["w_symmetric"])
        qp = QParams(scale, zp, b, lo, hi, None if entry["per_tensor_scale"] else 0)
        twin.__dict__["packed_qparams"] = qp
        weights[key] = dequantize(q, qp)
    missing, unexpected = [], []
    own = net.state_dict()
    load = {}
    for key, t in own.items():
        src = weights.get(key, tensors.get(key))
        if src is None:
            missing.append(key)
        elif tuple(src.shape) != tuple(t.shape):
            raise ConfigError(f"tensor {key!r}: checkpoint shape {tuple(src.shape)} != model "
                              f"{tuple(t.shape)}; pass the architecture it was saved from")
        else:
            load[key] = src
    stored = {k for k in tensors if ":" not in k}
    unexpected = sorted(stored - set(own))
    if missing or unexpected:
        raise ConfigError(f"checkpoint and model do not match: missing {missing[:8]}, unexpected "
                          f"{unexpected[:8]}; pass the architecture the checkpoint was saved "
                          "from")
    net.load_state_dict(load, strict=True)
    pin_slow_path_(net)  # fused transformer fast paths would bypass the twins
    return net.eval()


def roundtrip_equal(model: nn.Module, loaded: nn.Module, x: torch.Tensor) -> bool:
    """True when ``model(x)`` and ``loaded(x)`` are bitwise equal (eval mode, no grad)."""
    with torch.no_grad():
        was = model.training, loaded.training
        model.eval(), loaded.eval()
        try:
            return bool(torch.equal(model(x), loaded(x)))
        finally:
            model.train(was[0]), loaded.train(was[1])


def calibration_split(data: Any) -> Any:
    """The calibration data of ``data`` the way :func:`hawq.workflows.workflow.compress` reads it: the
    ``calib`` (or ``train``) entry of a dict with split keys (``calib``/``heldout``/``test``),
    else ``data`` itself. Raises DataError for a split dict without calibration data."""
    from collections.abc import Mapping

    if isinstance(data, Mapping) and set(data) & {"calib", "heldout", "test", "train"}:
        calib = data.get("calib", data.get("train"))
        if calib is None:
            raise DataError("data needs 'calib' (calibration data): give {'calib': ..., "
                            "'heldout': ..., 'test': ...}")
        return calib
    return data


def quantized_from_plan(model_name: str | nn.Module, plan: BitPlan, *,
                        data_dir: str | None = None, w_clip: str = "minmax",
                        calib_samples: int = 512, hessian_samples: int = 256, seed: int = 0,
                        bias_correct: bool = False, data: Any = None,
                        task: Any = None) -> nn.Module:
    """The model a compress run produced, rebuilt from its plan: quantize with ``plan`` and
    calibrate the activations the way :func:`hawq.workflows.workflow.compress` does (same data, same
    order, same task), so exporting a run's plan reproduces the run's model.

    ``model_name``: a built-in name (built pretrained) or your float ``nn.Module`` (quantized
    in place and returned). ``data`` None: the built-in model's dataset (the first
    max(calib_samples, hessian_samples) training samples); else your data (any form
    :func:`hawq.feed.tasks.iter_batches` reads, or ``{'calib': ..., 'heldout': ..., 'test': ...}``
    whose calibration split is used), fed by ``task`` (a Task, a registered name or a loss
    callable; default classification), bound to the float model first. Raises ConfigError when
    an ``nn.Module`` comes without data. Cost: one calibration pass over ``calib_samples``
    (two, plus the correction's passes, with ``bias_correct``)."""
    from hawq.post.biascorr import quantize_calibrate_
    from hawq.feed.tasks import as_task

    torch.manual_seed(seed)
    if data is None:
        if isinstance(model_name, nn.Module):
            raise ConfigError("quantized_from_plan(model, ...) on your own model needs data=: "
                              "the calibration data of the run (or {'calib': ..., ...})")
        from hawq.feed.data import load_dataset
        from hawq.modules.models import build_model, get_spec

        spec = get_spec(model_name)
        model = build_model(model_name, pretrained=True, data_dir=data_dir)
        calib = load_dataset(spec.dataset, "train", data_dir, max(calib_samples, hessian_samples))
        quantize_calibrate_(model, plan, QuantConfig(w_clip=w_clip), calib, calib_samples,
                            bias_correct)
        return model
    if isinstance(model_name, nn.Module):
        model = model_name
    else:
        from hawq.modules.models import build_model

        model = build_model(model_name, pretrained=True, data_dir=data_dir)
    model.eval()
    tk = as_task(task).bind(model)
    quantize_calibrate_(model, plan, QuantConfig(w_clip=w_clip), calibration_split(data),
                        calib_samples, bias_correct, task=tk)
    return model


def size_check(res: ExportResult, tolerance: float = 0.01) -> dict[str, Any]:
    """Does the packed size match the accounting? ``ok`` when the stored payload is within
    ``tolerance`` of the accounted bytes and the whole export is within tolerance plus the
    listed overhead. Returns the numbers (JSON-ready)."""
    acc = res.accounted_bytes
    return {"accounted_bytes": acc, "payload_bytes": res.payload_bytes,
            "total_bytes": res.total_bytes, "overhead_bytes": res.overhead_bytes,
            "payload_rel_diff": res.payload_bytes / acc - 1.0,
            "ok": abs(res.payload_bytes - acc) <= tolerance * acc
            and abs(res.total_bytes - acc) <= tolerance * acc + res.overhead_bytes}

