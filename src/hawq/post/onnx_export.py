"""ONNX export of a quantized model with QuantizeLinear/DequantizeLinear (QDQ) nodes.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` at opset 20; it runs
offline, and its ``symbolic`` hooks let each quantized layer emit exactly the QDQ nodes we want.
(The default dynamo exporter of torch >= 2.9 needs onnxscript and custom translations for this.)
The graph is then rewritten with :mod:`onnx` and checked in onnxruntime.

Per quantized layer:

* **weights**: the integers q of :func:`hawq.maths.quantizers.quantize` as an initializer, then
  ``DequantizeLinear`` (per output channel, axis 0) — so the float weight onnxruntime computes,
  (q - zp) * scale, is the fake-quantized weight exactly. 8..5-bit weights are stored as INT8
  (UINT8 for asymmetric); 4..2-bit weights as INT4/UINT4 (opset 21) when ``int4=True`` and
  onnxruntime accepts it, else INT8. ONNX has no 2/3/5/6/7-bit type: those values sit in the
  next wider integer type and the result records that note.
* **input activations** (a_bits < 16): ``QuantizeLinear`` -> ``DequantizeLinear`` per tensor
  in UINT8; below 8 bits a ``Clip`` to the b-bit range goes first, so values saturate at
  2^b - 1 as in PyTorch. (Not UINT4: see :data:`UINT4_ACTIVATIONS`.)
* ``weights="float"`` exports the dequantized float weights instead (no weight DQ), for
  runtimes without integer initializers; the note says so. The exporter then folds BatchNorm
  into the constant conv weights, so outputs differ from PyTorch by float rounding.
"""

from __future__ import annotations

import copy
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hawq.base.errors import ConfigError
from hawq.base.io import atomic_write_bytes
from hawq.modules.qmodules import QuantMixin
from hawq.maths.quantizers import fake_quantize, quantize

__all__ = ["EXPORTER", "OPSET", "OnnxExportResult", "UINT4_ACTIVATIONS", "export_onnx", "run_onnx"]

EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript exporter), opset 20; opset 21 when INT4"
OPSET = 20
#: Quantize 4-bit activations to UINT4? Off: onnxruntime (1.32) fails to build a session when a
#: Relu or Clip feeds a QuantizeLinear with a UINT4 zero point (its Clip/Relu+Quantize fusion
#: reads the zero point as 8-bit), so activations below 8 bits use Clip + UINT8 QDQ instead.
UINT4_ACTIVATIONS = False


class _WeightDQ(torch.autograd.Function):
    """Dequantize stored integer weights; exports as one DequantizeLinear."""

    @staticmethod
    def forward(ctx, q, scale, zp, axis, bits, layer):  # noqa: D401
        shape = [1] * q.dim()
        if axis is not None:
            shape[axis] = -1
            return (q.float() - zp.float().view(shape)) * scale.view(shape)
        return (q.float() - zp.float()) * scale

    @staticmethod
    def symbolic(g, q, scale, zp, axis, bits, layer):
        kw = {"axis_i": axis} if axis is not None else {}
        return g.op("DequantizeLinear", q, scale, zp, hawq_role_s="w", hawq_bits_i=bits,
                    hawq_layer_s=layer, **kw)


class _ActQDQ(torch.autograd.Function):
    """Fake-quantize an activation per tensor; exports as [Clip] -> QuantizeLinear ->
    DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zp, lo, hi, qmin, qmax, bits, layer, clip):
        z = zp.float()
        return (torch.clamp(torch.round(x / scale) + z, qmin, qmax) - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zp, lo, hi, qmin, qmax, bits, layer, clip):
        if clip:
            x = g.op("Clip", x, lo, hi)
        q = g.op("QuantizeLinear", x, scale, zp, hawq_role_s="aq", hawq_bits_i=bits,
                 hawq_layer_s=layer)
        return g.op("DequantizeLinear", q, scale, zp, hawq_role_s="adq", hawq_bits_i=bits,
                    hawq_layer_s=layer)


class _QDQLayer(nn.Module):
    """Export-time stand-in for one quantized twin: QDQ input, DQ weight, then the float op."""

    def __init__(self, name: str, twin: nn.Module, weights: str, int4: bool):
        super().__init__()
        self.layer = name
        self.kind = "linear" if isinstance(twin, nn.Linear) else "conv"
        self.__dict__["inner"] = twin  # for _conv_forward's stride/padding; not a submodule
        self.register_buffer("bias", None if twin.bias is None else twin.bias.detach().clone())
        qp = twin.weight_qparams()
        w = twin.weight.detach().float()
        self.w_bits = twin.w_bits
        self.weight_mode = "float" if (qp is None or weights == "float") else "int"
        if self.weight_mode == "int":
            signed = (bool((qp.qmin < 0).all()) if isinstance(qp.qmin, torch.Tensor)
                      else qp.qmin < 0)
            dtype = torch.int8 if signed else torch.uint8
            self.register_buffer("qweight", quantize(w, qp).to(dtype))
            self.register_buffer("wscale", qp.scale.detach().float().clone())
            self.register_buffer("wzp", qp.zero_point.detach().to(dtype).clone())
            self.axis = qp.axis
            self.max_bits = int(max(qp.bits.tolist()) if isinstance(qp.bits, torch.Tensor)
                                else qp.bits)
        else:
            self.register_buffer("fweight", fake_quantize(w, qp))
            self.max_bits = 32
        aqp = twin.act.qparams() if twin.act.state == "frozen" else None
        if twin.act.state != "frozen" and twin.act.bits < 16:
            raise ConfigError(f"layer {name!r}: its activation quantizer is not calibrated; run "
                              "hawq.calibrate_(model, data) before exporting")
        self.a_bits = int(twin.act.bits)
        self.act_on = aqp is not None
        # below 8 bits a Clip to the b-bit range goes first (UINT8 would saturate at 255)
        self.clip = self.a_bits < 8 and not (int4 and UINT4_ACTIVATIONS and self.a_bits == 4)
        if self.act_on:
            self.register_buffer("ascale", aqp.scale.detach().float().reshape(()).clone())
            self.register_buffer("azp", aqp.zero_point.detach().to(torch.uint8).reshape(()))
            self.qmin, self.qmax = int(aqp.qmin), int(aqp.qmax)
            z = float(aqp.zero_point)
            s = aqp.scale.detach().float().reshape(())
            self.register_buffer("alo", (torch.tensor(self.qmin - z) * s).float())
            self.register_buffer("ahi", (torch.tensor(self.qmax - z) * s).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_on:
            x = _ActQDQ.apply(x, self.ascale, self.azp, self.alo, self.ahi, self.qmin,
                              self.qmax, self.a_bits, self.layer, self.clip)
        if self.weight_mode == "int":
            w = _WeightDQ.apply(self.qweight, self.wscale, self.wzp, self.axis, self.max_bits,
                                self.layer)
        else:
            w = self.fweight
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        return self.inner._conv_forward(x, w, self.bias)


@dataclass
class OnnxExportResult:
    """What :func:`export_onnx` wrote: path, exporter, opset, per-layer storage formats,
    notes (every place the export is not a literal b-bit QDQ), and the check in onnxruntime on
    the example input: max |difference| and argmax agreement vs the PyTorch model with
    onnxruntime's default (integer-fused) kernels, and max |difference| with graph
    optimizations off (the literal QDQ graph; see :func:`run_onnx`)."""

    path: str
    exporter: str
    opset: int
    bytes: int
    layers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    int4: bool = False
    max_abs_diff: float | None = None
    agreement: float | None = None
    max_abs_diff_unoptimized: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _swap_layers(model: nn.Module, weights: str,
                 int4: bool) -> tuple[nn.Module, list[_QDQLayer]]:
    wrapped = copy.deepcopy(model).eval()
    out = []
    for name, m in list(wrapped.named_modules()):
        if name and isinstance(m, QuantMixin):
            layer = _QDQLayer(name, m, weights, int4)
            parent_name, _, child = name.rpartition(".")
            parent = wrapped.get_submodule(parent_name) if parent_name else wrapped
            setattr(parent, child, layer)
            out.append(layer)
    if not out:
        raise ConfigError("export_onnx: the model has no quantized layer; run hawq.quantize_ "
                          "and hawq.calibrate_ first (or export the float model with "
                          "torch.onnx.export)")
    return wrapped, out


def _rewrite(proto: Any, int4: bool) -> tuple[Any, bool, dict[str, dict[str, str]]]:
    """Strip the hawq_* marker attributes; store <= 4-bit weights and activations as INT4/UINT4
    (opset 21) when ``int4``. Returns (model, used_int4, {layer: {"w"/"a": storage}})."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def value(name: str) -> np.ndarray:  # the exporter dedupes equal tensors via Identity
        while name not in inits and name in alias:
            name = alias[name]
        return numpy_helper.to_array(inits[name])

    storage: dict[str, dict[str, str]] = {}
    used = False
    act_zp: dict[str, str] = {}
    for node in graph.node:
        marks = {a.name: helper.get_attribute_value(a) for a in node.attribute
                 if a.name.startswith("hawq_")}
        if not marks:
            continue
        keep = [a for a in node.attribute if not a.name.startswith("hawq_")]
        del node.attribute[:]
        node.attribute.extend(keep)
        role = marks["hawq_role"].decode()
        bits = int(marks["hawq_bits"])
        layer = marks["hawq_layer"].decode()
        rec = storage.setdefault(layer, {})
        if role == "w":
            w = value(node.input[0])
            kind = "int8" if w.dtype == np.int8 else "uint8"
            if int4 and bits <= 4:
                signed = kind == "int8"
                t4 = TensorProto.INT4 if signed else TensorProto.UINT4
                zp = value(node.input[2])
                wname, zname = f"{layer}.qweight_4b", f"{layer}.wzp_4b"
                graph.initializer.append(helper.make_tensor(wname, t4, w.shape,
                                                            w.reshape(-1).tolist()))
                graph.initializer.append(helper.make_tensor(zname, t4, zp.shape,
                                                            zp.reshape(-1).tolist()))
                node.input[0], node.input[2] = wname, zname
                kind, used = ("int4" if signed else "uint4"), True
            rec["w"] = kind
        else:
            kind = "uint8"
            if int4 and UINT4_ACTIVATIONS and bits == 4:
                if layer not in act_zp:
                    zp = value(node.input[2])
                    zname = f"{layer}.azp_4b"
                    graph.initializer.append(helper.make_tensor(zname, TensorProto.UINT4,
                                                                zp.shape, zp.reshape(-1).tolist()))
                    act_zp[layer] = zname
                node.input[2] = act_zp[layer]
                kind, used = "uint4", True
            rec["a"] = kind
    if used:
        for op in proto.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = max(op.version, 21)
        del graph.value_info[:]  # stale 8-bit types on the Q outputs; onnxruntime re-infers
    used_names = {i for n in graph.node for i in n.input}
    keep_inits = [t for t in graph.initializer if t.name in used_names]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    onnx.checker.check_model(proto)
    return proto, used, storage


def _export(model: nn.Module, example_input: torch.Tensor, weights: str, int4: bool):
    """Trace the QDQ stand-in model with the TorchScript exporter, then :func:`_rewrite`."""
    import warnings

    import onnx

    wrapped, qlayers = _swap_layers(model, weights, int4)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the exporter's deprecation notice, not ours to act on
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (example_input,), buf, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          do_constant_folding=True)
    proto, used, storage = _rewrite(onnx.load_from_string(buf.getvalue()), int4)
    return qlayers, proto, used, storage


def _session(data: bytes, quiet: bool = False, optimize: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = max(1, min(2, torch.get_num_threads()))
    opts.log_severity_level = 4 if quiet else 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor, *,
                int4: bool = True, weights: str = "int", verify: bool = True) -> OnnxExportResult:
    """Export a quantized, calibrated ``model`` to ONNX with QDQ nodes at ``path`` (atomic).

    ``example_input``: a batch (the batch dimension is exported as dynamic). ``int4``: store
    <= 4-bit weights/activations as INT4/UINT4 (opset 21); when onnxruntime rejects the model
    the export falls back to 8-bit containers and records a note. ``weights="float"`` stores
    dequantized float weights. ``verify`` runs the example in onnxruntime and fills
    ``max_abs_diff``/``agreement``. Needs ``pip install onnx onnxruntime`` (extra ``export``).
    Cost: one traced forward, one onnxruntime session and forward.
    """
    try:
        import onnx  # noqa: F401  (fail early with the install hint)
        import onnxruntime  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised without the extra
        raise ConfigError("ONNX export needs onnx and onnxruntime: pip install "
                          "'hawq[export]' (or pip install onnx onnxruntime)") from exc
    if weights not in ("int", "float"):
        raise ConfigError(f"weights={weights!r}: use 'int' (QDQ) or 'float' (dequantized)")
    notes: list[str] = []
    qlayers, proto, used, storage = _export(model, example_input, weights, int4)
    data = proto.SerializeToString()
    if used:
        try:
            _session(data, quiet=True)
        except Exception as exc:  # runtime without INT4 kernels: 8-bit containers instead
            notes.append(f"onnxruntime rejected INT4/UINT4 ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); stored <= 4-bit values in 8-bit types")
            qlayers, proto, used, storage = _export(model, example_input, weights, False)
            data = proto.SerializeToString()
    rows = []
    for layer in qlayers:
        st = storage.get(layer.layer, {})
        wfmt = st.get("w", "float")
        afmt = st.get("a", "float" if not layer.act_on else "uint8")
        wb = layer.w_bits
        wmax = max(wb) if isinstance(wb, list) else wb
        note = []
        if wfmt == "float" and weights == "float" and wmax < 16:
            note.append("weights exported as dequantized float32 (weights='float')")
        elif wfmt != "float":
            width = 4 if "4" in wfmt else 8
            if isinstance(wb, list):
                note.append(f"per-channel weight bits {sorted(set(wb))} stored as {wfmt.upper()}")
            elif wb != width:
                why = "INT4 not used" if wb == 4 else f"ONNX has no {wb}-bit type"
                note.append(f"{wb}-bit weight values stored in {wfmt.upper()} ({why}); the "
                            "dequantized weights are exact")
        if layer.act_on and layer.clip:
            note.append(f"{layer.a_bits}-bit activations: Clip to the {2 ** layer.a_bits}-level "
                        f"range, then {afmt.upper()} QDQ")
        rows.append({"name": layer.layer, "w_bits": wb, "a_bits": layer.a_bits,
                     "weight_format": wfmt, "act_format": afmt if layer.act_on else "float",
                     "note": "; ".join(note)})
        if note:
            notes.append(f"{layer.layer}: " + "; ".join(note))
    path = Path(path)
    atomic_write_bytes(path, data)
    res = OnnxExportResult(path=str(path), exporter=EXPORTER, opset=21 if used else OPSET,
                           bytes=len(data), layers=rows, notes=notes, int4=used)
    if verify:
        with torch.no_grad():
            ref = model.eval()(example_input).numpy()
        out = run_onnx(data, example_input)
        res.max_abs_diff = float(np.abs(out - ref).max())
        res.agreement = float((out.argmax(1) == ref.argmax(1)).mean()) if out.ndim == 2 else None
        lit = run_onnx(data, example_input, optimize=False)
        res.max_abs_diff_unoptimized = float(np.abs(lit - ref).max())
    return res


def run_onnx(model: bytes | str | os.PathLike, x: torch.Tensor | np.ndarray,
             batch_size: int = 500, optimize: bool = True) -> np.ndarray:
    """Outputs of an exported model in onnxruntime (CPU) on ``x``, in batches.

    ``optimize=True`` (onnxruntime's default) lets it fuse DQ -> Conv/Gemm -> Q into integer
    kernels (QLinearConv, with int32-quantized biases and fixed-point requantization), so an
    activation can land one quantization step away from PyTorch's float fake quantization;
    ``optimize=False`` runs the QDQ graph literally (float ops), which matches PyTorch to float
    rounding. Cost: one session build plus one forward per batch."""
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    sess = _session(data, optimize=optimize)
    xs = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    xs = xs.astype(np.float32, copy=False)
    outs = [sess.run(None, {"input": xs[i:i + batch_size]})[0]
            for i in range(0, len(xs), batch_size)]
    return np.concatenate(outs)
