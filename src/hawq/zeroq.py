"""ZeroQ: data-free mixed-precision post-training quantization (Cai et al., CVPR 2020).

Pipeline (:func:`zeroq`, ``hawq zeroq``): distil a batch of inputs from the model's BatchNorm
statistics (:mod:`hawq.distill`), measure each layer's sensitivity on them, pick weight bits on
the Pareto frontier (or by integer programming) under a size budget, quantize, calibrate the
activation ranges on the distilled data, and evaluate on real test data (for the report only:
no real data is used to build the quantized model).

Sensitivities:

* ``"kl"`` (ZeroQ): Omega_i(b) = mean_x KL(softmax M(W; x) || softmax M(W with only layer i's
  weight quantized to b bits; x)) over the distilled inputs x. One forward pass per (layer, bit
  width); the B bit widths of a layer run as one vmapped call (``torch.func``) when the model
  allows it, else one call each.
* ``"hessian"`` (data-free HAWQ-V2): Omega_i(b) = Tr(H_i)/n_i x ||Q_b(W_i) - W_i||^2 with the
  Hessian traces of :func:`hawq.hessian.analyze` on the distilled inputs, labelled by the FP32
  model's own predictions.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from hawq.errors import ConfigError, NumericalError
from hawq.plan import BitPlan, LayerSpec, QuantConfig
from hawq.quantizers import check_bits, fake_quantize, weight_qparams
from hawq.surgery import quantizable_layers

log = logging.getLogger(__name__)

__all__ = ["SENSITIVITIES", "DATA_SOURCES", "ZeroQConfig", "ZeroQResult", "gaussian_data",
           "hessian_sensitivity", "kl_sensitivity", "zeroq"]

#: Sensitivity measures of the zero-shot pipeline.
SENSITIVITIES = ("kl", "hessian")
#: Where sensitivity/calibration inputs come from: ZeroQ's distilled data (zero-shot), real
#: training images, or Gaussian noise (the baselines of the ZeroQ paper).
DATA_SOURCES = ("distilled", "real", "noise")


# ----------------------------------------------------------------------------- sensitivity

def _quantized_weights(w: torch.Tensor, bits: Sequence[int], config: QuantConfig) -> torch.Tensor:
    """(B, *w.shape): w fake-quantized at each bit width (float bits leave it unchanged)."""
    w = w.detach()
    return torch.stack([fake_quantize(w, weight_qparams(w, b, config.w_symmetric,
                                                        config.w_per_channel, config.w_clip))
                        for b in bits])


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Sum over samples of KL(p || q) per leading row: logp (N, K), logq (B, N, K) -> (B,)."""
    return (logp.exp() * (logp - logq)).sum(dim=(-1, -2))


def kl_sensitivity(model: nn.Module, x: torch.Tensor, names: Sequence[str] | None = None,
                   bits: Sequence[int] = (2, 4, 8), config: QuantConfig | None = None,
                   batch_size: int = 256, vectorize: bool = True,
                   progress: bool = False) -> np.ndarray:
    """ZeroQ's sensitivity: (L, B) array of mean KL(FP32 output || output with only layer i's
    weight quantized to ``bits[j]``) over the inputs ``x``, softmax of the model's outputs.

    ``names``: quantizable layers (default all, registration order). Weights are quantized as
    :func:`hawq.quantize_` does with ``config`` (activations stay float). Float bits (>= 16)
    leave the weight unchanged, so their KL is 0 up to rounding (exactly 0 with
    ``vectorize=False``). ``vectorize`` runs a layer's B variants as one ``torch.func.vmap``
    call, falling back to a loop when an op has no batching rule. Values below 0 (rounding) are
    clamped to 0. Model in eval mode, weights untouched. Cost: 1 + L*B forward passes over ``x``.
    """
    config = config or QuantConfig()
    bits = [check_bits(b, "bits", symmetric=config.w_symmetric) for b in bits]
    mods = quantizable_layers(model)
    names = list(mods) if names is None else list(names)
    missing = [n for n in names if n not in mods]
    if missing:
        raise ConfigError(f"layers {missing} are not quantizable layers of the model; valid: "
                          f"{sorted(mods)}")
    if x.shape[0] == 0:
        raise ConfigError("x is empty: give at least one input (e.g. distilled data)")
    from torch.func import functional_call, vmap

    device = next(model.parameters()).device
    chunks = [c.to(device) for c in x.split(batch_size)]
    was_training = model.training
    model.eval()
    out = np.zeros((len(names), len(bits)))
    use_vmap = vectorize
    try:
        with torch.no_grad():
            ref = [F.log_softmax(model(c).double().flatten(1), dim=1) for c in chunks]
            bar = tqdm(names, desc="KL sensitivity", disable=not progress, leave=False)
            for i, name in enumerate(bar):
                key = f"{name}.weight"
                wq = _quantized_weights(mods[name].weight, bits, config)
                total = torch.zeros(len(bits), dtype=torch.float64)
                for c, logp in zip(chunks, ref):
                    def run(w: torch.Tensor, c: torch.Tensor = c) -> torch.Tensor:
                        return F.log_softmax(functional_call(model, {key: w}, (c,)).double()
                                             .flatten(1), dim=1)

                    logq = None
                    if use_vmap:
                        try:
                            logq = vmap(run)(wq)
                        except Exception as exc:  # an op without a batching rule
                            log.info("vmap failed (%s); one forward per bit width", exc)
                            use_vmap = False
                    if logq is None:
                        logq = torch.stack([run(w) for w in wq])
                    total += _kl_rows(logp, logq).double()
                out[i] = (total / x.shape[0]).numpy()
    finally:
        model.train(was_training)
    if not np.all(np.isfinite(out)):
        raise NumericalError("a KL sensitivity is NaN/inf: check the inputs (distilled data) and "
                             "the model's outputs")
    return np.maximum(out, 0.0)


def hessian_sensitivity(model: nn.Module, x: torch.Tensor, names: Sequence[str] | None = None,
                        bits: Sequence[int] = (2, 4, 8), config: QuantConfig | None = None,
                        seed: int = 0, max_probes: int = 50, tol: float = 1e-2,
                        progress: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Data-free HAWQ-V2: Omega (L, B) = Tr(H_i)/n_i x ||Q_b(W_i) - W_i||^2 with the Hessian of
    the cross-entropy on inputs ``x`` against the model's own predictions (argmax) as labels.

    Returns (omega, {"names", "labels", "hessian": HessianResult dict, "weight_errors"}).
    Cost: one forward for the labels plus a Hutchinson run (<= ``max_probes`` HVPs on ``x``).
    """
    from hawq.hessian import analyze
    from hawq.sensitivity import omega_matrix, weight_errors

    config = config or QuantConfig()
    names = list(quantizable_layers(model)) if names is None else list(names)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            labels = model(x).argmax(dim=1)
    finally:
        model.train(was_training)
    res = analyze(model, (x, labels), metric="trace", layers=names, seed=seed, tol=tol,
                  max_probes=max_probes, progress=progress)
    errors = weight_errors(model, names, bits, config)
    omega = omega_matrix([lh.avg_trace for lh in res.layers], errors)
    return omega, {"names": names, "labels": labels.tolist(), "hessian": res.to_dict(),
                   "weight_errors": errors.tolist()}


def gaussian_data(shape: Sequence[int], n: int, seed: int = 0) -> torch.Tensor:
    """(n, *shape) standard-normal inputs from a private seeded generator (the noise baseline)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=gen)


# ----------------------------------------------------------------------------- pipeline

@dataclass
class ZeroQConfig:
    """Options of :func:`zeroq` (all JSON-serialisable).

    Size target: one of ``target_compression`` (weights vs FP32; default 8), ``target_avg_bits``,
    ``target_bytes``, ``target_fraction``; or ``w_bits`` for uniform quantization (no
    sensitivity or allocation). ``bops_limit`` (G BOPs) and ``latency_table``/``latency_limit``
    need ``allocator='ilp'`` (as in :class:`hawq.pipeline.CompressConfig`). ``data_source`` picks the inputs for sensitivity and
    calibration: ``"distilled"`` (zero-shot, the default), ``"real"`` (``calib_samples``
    training images) or ``"noise"`` (``calib_samples`` N(0, 1) inputs) for comparisons.
    ``distill_label_weight`` (default 10) adds a cross-entropy term toward round-robin class
    labels to ZeroQ's BN loss (see :func:`hawq.distill.distill_data`); 0 is ZeroQ's own loss.
    ``evaluate`` measures FP32 and quantized accuracy on the real test set (report only).
    """

    model: str = "resnet20"
    data_dir: str | None = None
    bits: tuple[int, ...] = (2, 4, 8)
    a_bits: int = 8
    w_bits: int | None = None
    target_compression: float | None = None
    target_avg_bits: float | None = None
    target_bytes: float | None = None
    target_fraction: float | None = None
    bops_limit: float | None = None
    latency_table: str | None = None
    latency_limit: float | None = None
    pin_first_last: int | None = None
    sensitivity: str = "kl"
    allocator: str = "frontier"
    data_source: str = "distilled"
    distill_batch: int = 32
    distill_iters: int = 500
    distill_lr: float = 0.5
    distill_init: str = "uniform"
    distill_label_weight: float = 10.0
    input_shape: tuple[int, ...] | None = None
    calib_samples: int = 512
    hessian_max_probes: int = 50
    hessian_tol: float = 1e-2
    w_clip: str = "minmax"
    a_calibration: str = "minmax"
    evaluate: bool = True
    test_samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(f"sensitivity={self.sensitivity!r}: use one of {SENSITIVITIES}")
        if self.allocator not in ("frontier", "ilp"):
            raise ConfigError(f"allocator={self.allocator!r}: use 'frontier' (ZeroQ's Pareto "
                              "frontier) or 'ilp'")
        if self.data_source not in DATA_SOURCES:
            raise ConfigError(f"data_source={self.data_source!r}: use one of {DATA_SOURCES}")
        self.bits = tuple(sorted(set(int(b) for b in self.bits)))
        if not self.bits:
            raise ConfigError("bits is empty: give candidate weight bit widths, e.g. (2, 4, 8)")
        for b in self.bits:
            check_bits(b, "bits", symmetric=True)
        check_bits(self.a_bits, "a_bits")
        if self.w_bits is not None:
            check_bits(self.w_bits, "w_bits", symmetric=True)
        if self.input_shape is not None:
            self.input_shape = tuple(int(s) for s in self.input_shape)
        targets = [t for t in (self.target_compression, self.target_avg_bits, self.target_bytes,
                               self.target_fraction) if t is not None]
        if len(targets) > 1:
            raise ConfigError("give one size target: target_compression, target_avg_bits, "
                              "target_bytes or target_fraction")
        if targets and self.w_bits is not None:
            raise ConfigError("w_bits (uniform quantization) and a size target exclude each "
                              "other: give one")
        if self.w_bits is not None and (self.bops_limit is not None
                                        or self.latency_limit is not None):
            raise ConfigError("w_bits (uniform quantization) cannot take bops_limit/"
                              "latency_limit: drop w_bits to allocate under those limits")
        if (self.bops_limit is not None or self.latency_limit is not None) \
                and self.allocator != "ilp":
            raise ConfigError("bops_limit/latency_limit need allocator='ilp'")
        if not targets and self.w_bits is None and self.bops_limit is None \
                and self.latency_limit is None:
            self.target_compression = 8.0
        for name in ("distill_batch", "calib_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r}: give an integer >= 1")

    def compress_config(self):
        """The :class:`hawq.pipeline.CompressConfig` carrying this budget (for allocate_plan)."""
        from hawq.pipeline import CompressConfig

        return CompressConfig(model=self.model, allocator=self.allocator, bits=self.bits,
                              a_bits=self.a_bits, target_compression=self.target_compression,
                              target_avg_bits=self.target_avg_bits,
                              target_bytes=self.target_bytes,
                              target_fraction=self.target_fraction,
                              bops_limit=self.bops_limit, latency_table=self.latency_table,
                              latency_limit=self.latency_limit,
                              pin_first_last=self.pin_first_last, seed=self.seed)


@dataclass
class ZeroQResult:
    """What :func:`zeroq` did and measured; ``to_dict`` is what ``metrics.json`` holds.

    Accuracies are fractions on the real test set (None with ``evaluate=False``); ``distill`` is
    :meth:`hawq.distill.DistillResult.to_dict` (None when ``data_source`` is not distilled);
    ``allocation`` is None for uniform ``w_bits``; ``seconds`` splits the wall time.
    """

    config: dict[str, Any]
    plan: dict[str, Any]
    layers: list[dict[str, Any]]
    allocation: dict[str, Any] | None
    fp32_accuracy: float | None
    accuracy: float | None
    budget: dict[str, Any]
    distill: dict[str, Any] | None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _source_data(cfg: ZeroQConfig, model: nn.Module, shape: tuple[int, ...], dataset: str,
                 progress: bool):
    """(inputs, DistillResult or None) for cfg.data_source."""
    if cfg.data_source == "distilled":
        from hawq.distill import distill_data

        res = distill_data(model, shape, batch_size=cfg.distill_batch,
                           iterations=cfg.distill_iters, lr=cfg.distill_lr, seed=cfg.seed,
                           init=cfg.distill_init, label_weight=cfg.distill_label_weight,
                           progress=progress)
        return res.data, res
    if cfg.data_source == "noise":
        return gaussian_data(shape, cfg.calib_samples, cfg.seed), None
    from hawq.data import load_dataset

    return load_dataset(dataset, "train", cfg.data_dir, cfg.calib_samples).tensors[0], None


def zeroq(config: ZeroQConfig | None = None, out_dir: str | Path | None = None,
          progress: bool = False, **overrides: Any) -> ZeroQResult:
    """Zero-shot quantization of ``config.model``: distil, measure sensitivity, allocate bits,
    quantize, calibrate on distilled data, evaluate on real test data (report only).

    ``config`` (or keyword ``overrides`` of :class:`ZeroQConfig` fields) says what to do; given
    ``out_dir``, writes ``plan.json``, ``metrics.json``, ``sensitivity.json``, ``frontier.png``,
    ``layers.png`` and ``distill.png`` atomically. Returns a :class:`ZeroQResult`.
    Cost: distillation (``distill_iters`` forward+backward passes on ``distill_batch`` inputs),
    the sensitivity (KL: 1 + L*B forwards on them; Hessian: <= max_probes HVPs), one calibration
    forward, and two passes over the test set when ``evaluate``.
    """
    import hawq
    from hawq.data import load_dataset
    from hawq.models import build_model, get_spec
    from hawq.pipeline import allocate_plan

    if config is None:
        config = ZeroQConfig(**overrides)
    elif overrides:
        config = ZeroQConfig(**{**asdict(config), **overrides})
    cfg = config
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    spec = get_spec(cfg.model)
    model = build_model(cfg.model, pretrained=True, data_dir=cfg.data_dir)
    shape = cfg.input_shape or spec.input_shape
    if not shape:
        from hawq.distill import infer_input_shape

        shape = infer_input_shape(model)
    shape = tuple(int(s) for s in shape)
    infos = hawq.layers(model, torch.zeros(1, *shape))
    names = [i.name for i in infos]
    params = np.array([i.params for i in infos], dtype=float)
    macs = np.array([i.macs for i in infos], dtype=float)
    quant = QuantConfig(w_clip=cfg.w_clip, a_calibration=cfg.a_calibration)
    ccfg = cfg.compress_config()
    if cfg.w_bits is None:  # fail fast on an impossible budget, before any distillation
        allocate_plan(ccfg, names, params, macs, np.zeros((len(names), len(cfg.bits))), {})
    times["setup"] = time.perf_counter() - t0

    test = None
    fp32 = None
    if cfg.evaluate:
        t0 = time.perf_counter()
        test = load_dataset(spec.dataset, "test", cfg.data_dir, cfg.test_samples)
        fp32 = hawq.evaluate(model, test, progress=progress).accuracy
        times["fp32_eval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data, dres = _source_data(cfg, model, shape, spec.dataset, progress)
    times["distill" if cfg.data_source == "distilled" else "data"] = time.perf_counter() - t0

    stats: dict[str, Any] = {"names": names, "bits": list(cfg.bits),
                             "sensitivity": cfg.sensitivity, "data_source": cfg.data_source}
    omega = None
    alloc = None
    if cfg.w_bits is None:
        t0 = time.perf_counter()
        if cfg.sensitivity == "kl":
            omega = kl_sensitivity(model, data, names, cfg.bits, quant, progress=progress)
        else:
            omega, hs = hessian_sensitivity(model, data, names, cfg.bits, quant, seed=cfg.seed,
                                            max_probes=cfg.hessian_max_probes,
                                            tol=cfg.hessian_tol, progress=progress)
            stats.update(hs)
        stats["omega"] = omega.tolist()
        times["sensitivity"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        alloc = allocate_plan(ccfg, names, params, macs, omega, stats)
        times["allocation"] = time.perf_counter() - t0
        chosen = [int(b) for b in alloc.bits]
    else:
        chosen = [cfg.w_bits] * len(names)
    plan = BitPlan({n: LayerSpec(b, cfg.a_bits) for n, b in zip(names, chosen)})

    t0 = time.perf_counter()
    hawq.quantize_(model, plan, quant)
    hawq.calibrate_(model, data)
    times["quantize_calibrate"] = time.perf_counter() - t0
    acc = None
    if cfg.evaluate:
        t0 = time.perf_counter()
        acc = hawq.evaluate(model, test, progress=progress).accuracy
        times["eval"] = time.perf_counter() - t0
    budget = hawq.budget_report(infos, plan, hawq.count_params(model))
    times["total"] = sum(times.values())

    rows = []
    for i, info in enumerate(infos):
        rows.append({"name": info.name, "type": info.type, "params": info.params,
                     "macs": info.macs, "w_bits": chosen[i], "a_bits": cfg.a_bits,
                     "omega": None if omega is None else [float(v) for v in omega[i]]})
    cdict = asdict(cfg)
    cdict["input_shape"] = list(shape)
    result = ZeroQResult(config=cdict, plan=plan.to_dict(), layers=rows,
                         allocation=None if alloc is None else alloc.to_dict(),
                         fp32_accuracy=fp32, accuracy=acc, budget=budget.to_dict(),
                         distill=None if dres is None else dres.to_dict(), seconds=times)
    if out_dir is not None:
        write_outputs(Path(out_dir), result, stats, omega, params, names)
    return result


def write_outputs(out: Path, result: ZeroQResult, stats: dict[str, Any],
                  omega: np.ndarray | None, params: np.ndarray, names: list[str]) -> None:
    """Write plan.json, metrics.json, sensitivity.json and the plots into ``out`` (atomically;
    a plot that fails is logged and skipped, never losing the JSON)."""
    from hawq.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    BitPlan.from_dict(result.plan).to_json(out / "plan.json")
    write_json(out / "sensitivity.json", stats)
    write_json(out / "metrics.json", result.to_dict())
    try:
        if omega is not None:
            from hawq.allocation import Allocation, pareto_frontier, uniform_points
            from hawq.plots import plot_frontier, plot_layer_bits

            bits = np.array(result.config["bits"])
            front = pareto_frontier(omega, params, bits, max_points=20000)
            plot_frontier(front, out / "frontier.png", chosen=Allocation(**result.allocation),
                          uniform=uniform_points(omega, params, bits),
                          title=f"{result.config['model']}: ZeroQ {result.config['sensitivity']}"
                                " sensitivity vs weight size")
            plot_layer_bits(names, [max(float(np.max(r)), 1e-12) for r in omega],
                            [r["w_bits"] for r in result.layers], out / "layers.png",
                            title=f"{result.config['model']}: max sensitivity and chosen bits")
        if result.distill is not None and result.distill["losses"]:
            _plot_distill(result.distill, out / "distill.png")
    except Exception as exc:  # a plot must never lose the run's results
        log.warning("plot skipped: %s", exc)


def _plot_distill(d: dict[str, Any], path: Path) -> None:
    from hawq.plots import _figure, _save

    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(np.arange(len(d["losses"])), d["losses"], color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("BatchNorm-statistics loss")
    red = d["reduction"]
    ax.set_title(f"ZeroQ distillation: {d['initial_loss']:.3g} -> {d['final_loss']:.3g} "
                 f"({red:.0f}x)" if math.isfinite(red) else "ZeroQ distillation")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
