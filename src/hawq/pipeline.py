"""The end-to-end job: analyse sensitivities, allocate bits under a budget, quantize, evaluate.

:func:`compress` is what ``hawq compress`` runs; it returns a :class:`CompressResult` and, given
``out_dir``, writes ``plan.json``, ``metrics.json``, ``sensitivity.json`` and two PNG plots.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from hawq.errors import ConfigError, DataError
from hawq.hessian import check_probe_mode
from hawq.plan import BitPlan, LayerSpec, QuantConfig

log = logging.getLogger(__name__)

#: Sensitivity names: how Omega_i(b) is computed.
SENSITIVITIES = ("hawq-v2", "hawq-v1", "measured", "hybrid")
#: Method presets of issue 5: (sensitivity, allocator).
METHODS = {"hawq-v2": ("hawq-v2", "frontier"), "hawq-v1": ("hawq-v1", "v1-rule"),
           "ilp": (None, "ilp"),
           # channel-wise HAWQ (hawq.channelwise): DDPG ratios / Hessian-only channel groups
           "cw-hawq": ("hawq-v2", "cw-ddpg"), "cw-hessian": ("hawq-v2", "cw-groups")}


@dataclass
class CompressConfig:
    """Options of :func:`compress` (all serialisable).

    Budget: exactly one of ``target_compression`` (weights, vs FP32), ``target_avg_bits``,
    ``target_bytes`` (weights) or ``target_fraction`` (r between all-lowest and all-highest);
    ``bops_limit`` (G BOPs) and ``latency_table`` (JSON, layer -> {bits: latency}) need
    ``allocator='ilp'``.
    """

    model: str = "digits-cnn"
    data_dir: str | None = None
    method: str | None = None
    sensitivity: str = "hybrid"
    allocator: str = "ilp"
    bits: tuple[int, ...] = (2, 4, 8)
    a_bits: int = 8
    target_compression: float | None = None
    target_avg_bits: float | None = None
    target_bytes: float | None = None
    target_fraction: float | None = None
    bops_limit: float | None = None
    latency_table: str | None = None
    latency_limit: float | None = None
    pin_first_last: int | None = None
    hessian_samples: int = 256
    max_probes: int = 50
    tol: float = 1e-2
    probe_mode: str = "joint"  # Hutchinson: "joint" (1 HVP per probe) or "layer" (L per probe)
    calib_samples: int = 512
    test_samples: int | None = None
    w_clip: str = "minmax"
    bias_correct: bool = False  # empirical bias correction after quantizing (hawq.bias_correct_)
    # exchange search on the whole quantized model (hawq.refine.refine_plan): True, False or
    # "auto" (hybrid frontier/ILP plans averaging <= hawq.refine.AUTO_REFINE_MAX_BITS bits)
    refine: bool | str = "auto"
    refine_samples: int = 1024  # held-out training images after the calibration ones
    refine_candidates: int = 16  # exchanges measured per round
    seed: int = 0
    episodes: int = 100  # cw-hawq: DDPG episodes
    reward_samples: int = 1000  # cw-hawq: held-out training images for the reward
    channel_groups: int = 4  # cw-hessian: trace-sorted channel groups per layer

    def __post_init__(self) -> None:
        if self.method is not None:
            if self.method not in METHODS:
                raise ConfigError(f"method={self.method!r}: use one of {sorted(METHODS)}")
            sens, self.allocator = METHODS[self.method]
            self.sensitivity = sens or self.sensitivity
        check_probe_mode(self.probe_mode)
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(f"sensitivity={self.sensitivity!r}: use one of {SENSITIVITIES}")
        if self.allocator not in ("frontier", "ilp", "v1-rule", "cw-ddpg", "cw-groups"):
            raise ConfigError(f"allocator={self.allocator!r}: use 'frontier', 'ilp' or 'v1-rule'")
        self.bits = tuple(sorted(set(int(b) for b in self.bits)))
        targets = [t for t in (self.target_compression, self.target_avg_bits, self.target_bytes,
                               self.target_fraction) if t is not None]
        if len(targets) > 1:
            raise ConfigError("give one size target: target_compression, target_avg_bits, "
                              "target_bytes or target_fraction")
        if not targets and self.bops_limit is None and self.latency_limit is None:
            self.target_compression = 8.0
        if self.refine not in (True, False, "auto"):
            raise ConfigError(f"refine={self.refine!r}: use True, False or 'auto'")
        if self.refine is True and self.allocator not in ("frontier", "ilp"):
            raise ConfigError(f"refine=True refines a frontier or ILP plan, not allocator="
                              f"{self.allocator!r}: drop refine or use allocator='ilp'")
        if self.refine is not False and (self.refine_samples < 1 or self.refine_candidates < 1):
            raise ConfigError("refine_samples and refine_candidates must be >= 1")


@dataclass
class CompressResult:
    """Everything :func:`compress` measured; ``to_dict`` is what ``metrics.json`` holds."""

    config: dict[str, Any]
    plan: dict[str, Any]
    layers: list[dict[str, Any]]
    allocation: dict[str, Any]
    fp32_accuracy: float
    accuracy: float
    budget: dict[str, Any]
    uniform: dict[str, Any] = field(default_factory=dict)
    refinement: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def refine_wanted(cfg: CompressConfig) -> bool:
    """Whether ``cfg`` may refine its plan: ``refine=True``, or ``"auto"`` with the hybrid
    sensitivity and a frontier/ILP allocator (the plan's bits decide, :func:`refine_applies`)."""
    return cfg.refine is True or (cfg.refine == "auto" and cfg.sensitivity == "hybrid"
                                  and cfg.allocator in ("frontier", "ilp"))


def refine_applies(cfg: CompressConfig, bits: Sequence[float], params: np.ndarray) -> bool:
    """Whether ``cfg`` refines an allocated plan of weight ``bits``: always with ``refine=True``;
    with ``"auto"`` when :func:`refine_wanted` and :func:`hawq.refine.auto_refines` (the plan
    averages at most ``AUTO_REFINE_MAX_BITS`` bits per weight)."""
    from hawq.refine import auto_refines

    return cfg.refine is True or (refine_wanted(cfg) and auto_refines(bits, params))


def budget_from_config(cfg: CompressConfig):
    """The size :class:`hawq.budgets.Budget` named by ``cfg`` (None when only BOPs/latency)."""
    from hawq.budgets import Budget

    for kind, value in (("compression", cfg.target_compression), ("avg_bits", cfg.target_avg_bits),
                        ("bytes", cfg.target_bytes), ("fraction", cfg.target_fraction)):
        if value is not None:
            return Budget(kind, value)
    return None


def sensitivity_costs(model: torch.nn.Module, calib: Any, names: list[str], bits: tuple[int, ...],
                      sensitivity: str, quant: QuantConfig, *, hessian_samples: int = 256,
                      max_probes: int = 50, tol: float = 1e-2, seed: int = 0,
                      probe_mode: str = "joint", progress: bool = False,
                      bias_correct: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Omega (L×B) for ``sensitivity`` and the per-layer statistics behind it.

    Cost: ``hawq-v2`` one Hutchinson run (<= max_probes HVPs on ``hessian_samples`` images with
    ``probe_mode="joint"``, <= max_probes·L block HVPs with ``"layer"``);
    ``hawq-v1`` power iteration per layer; ``measured`` 1 + L·B forward passes over ``calib``;
    ``hybrid`` both a Hutchinson run and the measured losses. With ``bias_correct`` the
    measured losses are those left after bias correction (the plan is then chosen for a model
    that will be bias-corrected); one more forward pass.
    """
    from hawq.hessian import analyze
    from hawq.sensitivity import measured_loss_increase, omega_matrix, weight_errors

    x, y = calib.tensors
    hx, hy = x[:hessian_samples], y[:hessian_samples]
    stats: dict[str, Any] = {"names": names}
    errors = weight_errors(model, names, bits, quant)
    stats["weight_errors"] = errors.tolist()
    omega = np.zeros_like(errors)
    if sensitivity in ("hawq-v2", "hybrid"):
        res = analyze(model, (hx, hy), metric="trace", layers=names, seed=seed, tol=tol,
                      max_probes=max_probes, probe_mode=probe_mode, progress=progress)
        stats["hessian"] = res.to_dict()
        stats["probe_mode"] = probe_mode
        omega = omega_matrix([lh.avg_trace for lh in res.layers], errors)
    if sensitivity == "hawq-v1":
        res = analyze(model, (hx, hy), metric="eigen", layers=names, seed=seed, progress=progress)
        stats["hessian"] = res.to_dict()
        eig = [lh.eigenvalue if np.isscalar(lh.eigenvalue) else lh.eigenvalue[0]
               for lh in res.layers]
        omega = omega_matrix(eig, errors)
    if sensitivity in ("measured", "hybrid"):
        measured = measured_loss_increase(model, (x, y), names, bits, quant, progress=progress,
                                          bias_correct=bias_correct)
        stats["measured"] = measured.tolist()
        # measured losses below zero are noise around 0 at high bits: a cost is never negative
        omega = (np.maximum(measured, 0.0) if sensitivity == "measured"
                 else np.maximum(omega, measured))
    stats["omega"] = omega.tolist()
    return omega, stats


def load_latency_table(path: str, names: list[str], bits: tuple[int, ...]) -> np.ndarray:
    """Read ``{layer: {bits: latency}}`` JSON into an (L, B) matrix; every cell must be there."""
    from hawq.io import read_json

    table = read_json(path, "latency table")
    out = np.zeros((len(names), len(bits)))
    for i, name in enumerate(names):
        row = table.get(name) if isinstance(table, dict) else None
        if not isinstance(row, dict):
            raise ConfigError(f"latency table {path!r} has no entry for layer {name!r}: give "
                              "{layer: {bits: latency}} for every quantizable layer")
        for j, b in enumerate(bits):
            if str(b) not in row:
                raise ConfigError(f"latency table {path!r}, layer {name!r}: no latency for {b} "
                                  f"bits (have {sorted(row)})")
            out[i, j] = float(row[str(b)])
    return out


def allocation_limits(cfg: CompressConfig, names: list[str], macs: np.ndarray) -> dict[str, Any]:
    """The keyword arguments of :func:`hawq.allocation.allocate` that ``cfg`` sets besides the
    size budget: ``pinned`` and the BOPs/latency matrices and limits (also used to refine)."""
    bits = np.array(cfg.bits)
    pinned = None
    if cfg.pin_first_last is not None:
        if cfg.pin_first_last not in cfg.bits:
            raise ConfigError(f"pin_first_last={cfg.pin_first_last}: must be one of bits "
                              f"{cfg.bits}")
        j = cfg.bits.index(cfg.pin_first_last)
        pinned = {0: j, len(names) - 1: j}
    latency = None
    if cfg.latency_table:
        latency = load_latency_table(cfg.latency_table, names, cfg.bits)
    elif cfg.latency_limit is not None:
        raise ConfigError("latency_limit needs latency_table (JSON: {layer: {bits: latency}})")
    return {"pinned": pinned, "bops": macs[:, None] * bits[None, :] * cfg.a_bits,
            "bops_limit": None if cfg.bops_limit is None else cfg.bops_limit * 1e9,
            "latency": latency, "latency_limit": cfg.latency_limit}


def allocate_plan(cfg: CompressConfig, names: list[str], params: np.ndarray, macs: np.ndarray,
                  omega: np.ndarray, stats: dict[str, Any], limits: dict[str, Any] | None = None):
    """Run the configured allocator; returns the :class:`hawq.allocation.Allocation`.
    ``limits``: :func:`allocation_limits` of ``cfg`` when the caller already has them."""
    from hawq.allocation import allocate, hawq_v1_allocate

    bits = np.array(cfg.bits)
    budget = budget_from_config(cfg)
    limits = limits if limits is not None else allocation_limits(cfg, names, macs)
    if cfg.allocator == "v1-rule":
        if budget is None:
            raise ConfigError("the HAWQ-V1 rule needs a size target (e.g. target_compression)")
        layers = stats["hessian"]["layers"]
        eig = [lh["eigenvalue"] if np.isscalar(lh["eigenvalue"]) else lh["eigenvalue"][0]
               for lh in layers]
        return hawq_v1_allocate(np.array(eig) / params, params, bits, budget, omega=omega)
    return allocate(omega, params, bits, budget, cfg.allocator, **limits)


def quantize_evaluate(model: nn.Module, plan: BitPlan, quant: QuantConfig, calib: Any, test: Any,
                      calib_samples: int, infos: Sequence[Any], times: dict[str, float],
                      progress: bool = False, bias_correct: bool = False) -> tuple[Any, Any]:
    """Quantize ``model`` in place with ``plan``, calibrate activations on ``calib`` (and with
    ``bias_correct`` correct the biases, :func:`hawq.bias_correct_`), evaluate on ``test``;
    records ``times["quantize_eval"]``. Returns (EvalResult, BudgetReport).
    Cost: one forward over at most ``calib_samples`` inputs and one pass over ``test``."""
    import hawq
    from hawq.biascorr import quantize_calibrate_

    t0 = time.perf_counter()
    quantize_calibrate_(model, plan, quant, calib, calib_samples, bias_correct, progress)
    res = hawq.evaluate(model, test, progress=progress)
    times["quantize_eval"] = time.perf_counter() - t0
    return res, hawq.budget_report(infos, plan, hawq.count_params(model))


def compress(cfg: CompressConfig, out_dir: str | Path | None = None,
             progress: bool = False) -> CompressResult:
    """Analyse, allocate, quantize and evaluate ``cfg.model``; write results to ``out_dir``.

    Cost: one FP32 and one quantized pass over the test set, the sensitivity's cost (see
    :func:`sensitivity_costs`), one calibration pass over ``calib_samples`` training images.
    """
    import hawq
    from hawq.data import load_dataset
    from hawq.models import build_model, get_spec

    if cfg.allocator in ("cw-ddpg", "cw-groups"):
        from hawq.channelwise import compress_channelwise

        return compress_channelwise(cfg, out_dir, progress)
    torch.manual_seed(cfg.seed)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    spec = get_spec(cfg.model)
    model = build_model(cfg.model, pretrained=True, data_dir=cfg.data_dir)
    test = load_dataset(spec.dataset, "test", cfg.data_dir, cfg.test_samples)
    n_cal = max(cfg.calib_samples, cfg.hessian_samples)
    calib = load_dataset(spec.dataset, "train", cfg.data_dir,
                         n_cal + (cfg.refine_samples if refine_wanted(cfg) else 0))
    held = None
    if refine_wanted(cfg):
        held = calib.tensors[0][n_cal:]
        calib = TensorDataset(*(t[:n_cal] for t in calib.tensors))
        if len(held) == 0 and cfg.refine is True:
            raise DataError(f"refine needs held-out training images after the {n_cal} "
                            f"calibration ones; {spec.dataset} has no more: lower calib_samples")
    fp32 = hawq.evaluate(model, test, progress=progress)
    infos = hawq.layers(model, test.tensors[0][:1])
    names = [i.name for i in infos]
    params = np.array([i.params for i in infos], dtype=float)
    macs = np.array([i.macs for i in infos], dtype=float)
    quant = QuantConfig(w_clip=cfg.w_clip)
    limits = allocation_limits(cfg, names, macs)
    if cfg.allocator != "v1-rule":  # fail fast on an impossible budget, before any Hessian work
        allocate_plan(cfg, names, params, macs, np.zeros((len(names), len(cfg.bits))), {}, limits)
    times["setup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    omega, stats = sensitivity_costs(model, calib, names, cfg.bits, cfg.sensitivity, quant,
                                     hessian_samples=cfg.hessian_samples,
                                     max_probes=cfg.max_probes, tol=cfg.tol, seed=cfg.seed,
                                     probe_mode=cfg.probe_mode, progress=progress)
    if cfg.allocator == "v1-rule" and stats.get("hessian", {}).get("metric") != "eigen":
        from hawq.hessian import analyze

        x, y = calib.tensors
        stats["hessian"] = analyze(model, (x[:cfg.hessian_samples], y[:cfg.hessian_samples]),
                                   metric="eigen", layers=names, seed=cfg.seed,
                                   progress=progress).to_dict()
    times["sensitivity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    alloc = allocate_plan(cfg, names, params, macs, omega, stats, limits)
    times["allocation"] = time.perf_counter() - t0
    refinement = None
    do_refine = refine_applies(cfg, alloc.bits, params)
    if do_refine and len(held) == 0:  # only "auto" gets here: True raised above
        log.warning("refine='auto': no held-out training images after the %d calibration ones, "
                    "so the %.2f-bit plan is not refined; lower calib_samples", n_cal,
                    alloc.avg_bits)
    elif do_refine:
        from hawq.refine import refine_plan

        t0 = time.perf_counter()
        ref = refine_plan(model, held, names, cfg.bits, omega, alloc.choices, params,
                          budget_from_config(cfg), **limits,
                          candidates=cfg.refine_candidates, config=quant, progress=progress)
        alloc = ref.allocation
        refinement = {k: v for k, v in ref.to_dict().items() if k != "allocation"}
        times["refine"] = time.perf_counter() - t0
    plan = BitPlan({n: LayerSpec(int(b), cfg.a_bits) for n, b in zip(names, alloc.bits)})

    res, budget = quantize_evaluate(model, plan, quant, calib, test, cfg.calib_samples, infos,
                                    times, progress, bias_correct=cfg.bias_correct)

    layer_rows = []
    hess = {lh["name"]: lh for lh in stats.get("hessian", {}).get("layers", [])}
    for i, info in enumerate(infos):
        h = hess.get(info.name, {})
        layer_rows.append({"name": info.name, "type": info.type, "params": info.params,
                           "macs": info.macs, "w_bits": int(alloc.bits[i]), "a_bits": cfg.a_bits,
                           "trace": h.get("trace"), "avg_trace": h.get("avg_trace"),
                           "stderr": h.get("stderr"), "eigenvalue": h.get("eigenvalue"),
                           "omega": [float(v) for v in omega[i]]})
    result = CompressResult(config=asdict(cfg), plan=plan.to_dict(), layers=layer_rows,
                            allocation=alloc.to_dict(), fp32_accuracy=fp32.accuracy,
                            accuracy=res.accuracy, budget=budget.to_dict(),
                            refinement=refinement, seconds=times)
    if out_dir is not None:
        write_outputs(Path(out_dir), result, stats, omega, params, names)
    return result


def write_outputs(out: Path, result: CompressResult, stats: dict[str, Any], omega: np.ndarray,
                  params: np.ndarray, names: list[str]) -> None:
    """Write plan.json, metrics.json, sensitivity.json, frontier.png, layers.png into ``out``."""
    from hawq.allocation import pareto_frontier, uniform_points
    from hawq.io import write_json
    from hawq.plots import plot_frontier, plot_layer_bits

    out.mkdir(parents=True, exist_ok=True)
    BitPlan.from_dict(result.plan).to_json(out / "plan.json")
    write_json(out / "sensitivity.json", stats)
    write_json(out / "metrics.json", result.to_dict())
    bits = np.array(result.config["bits"])
    try:
        front = pareto_frontier(omega, params, bits, max_points=20000)
        from hawq.allocation import Allocation

        alloc = Allocation(**result.allocation)
        plot_frontier(front, out / "frontier.png", chosen=alloc,
                      uniform=uniform_points(omega, params, bits),
                      title=f"{result.config['model']}: total Omega vs weight size")
    except Exception as exc:  # a plot must never lose the run's results
        log.warning("frontier plot skipped: %s", exc)
    score = [row["avg_trace"] if row["avg_trace"] is not None else float(np.max(row["omega"]))
             for row in result.layers]
    plot_layer_bits(names, score, [row["w_bits"] for row in result.layers], out / "layers.png",
                    title=f"{result.config['model']}: sensitivity and chosen bits")


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, or a ConfigError that says what to pass when it is unusable."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device={name!r} is not a device ({e}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: this PyTorch sees no CUDA GPU "
                          f"(torch {torch.__version__}); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r}: only cpu and cuda are supported")
    return dev


def finetune_plan(model_name: str, plan: BitPlan, out_dir: str | Path | None = None, *,
                  config: Any = None, data_dir: str | None = None,
                  train_samples: int | None = None, test_samples: int | None = None,
                  a_avg_bits: float | None = None, a_bits_choices: tuple[int, ...] = (2, 4, 8),
                  resume: bool = False, progress: bool = False,
                  device: str = "cpu") -> dict[str, Any]:
    """Load ``model_name`` and its data, optionally choose mixed-precision activation bits
    (``a_avg_bits``: HAWQ-V2 activation traces under that average), fine-tune under ``plan``
    with :func:`hawq.finetune.finetune`, evaluate before and after on the test set, and write
    ``finetune.json``, ``plan.json``, ``model.pt`` (the quantized state dict) and the
    checkpoint into ``out_dir``. Returns the JSON-ready summary. ``device`` ("cpu", "cuda",
    "cuda:1") is where the model trains; batches move there one at a time.

    Cost: the fine-tuning's (see :mod:`hawq.finetune`) plus two passes over the test set.
    """
    import copy

    import hawq
    from hawq.data import load_dataset
    from hawq.finetune import FinetuneConfig, finetune
    from hawq.io import atomic_write_bytes, write_json
    from hawq.models import build_model, get_spec

    cfg = config or FinetuneConfig()
    dev = resolve_device(device)
    spec = get_spec(model_name)
    model = build_model(model_name, pretrained=True, data_dir=data_dir).to(dev)
    train = load_dataset(spec.dataset, "train", data_dir, train_samples)
    test = load_dataset(spec.dataset, "test", data_dir, test_samples)
    fp32 = hawq.evaluate(model, test, progress=progress).accuracy
    act = None
    if a_avg_bits is not None:
        from hawq.activations import activation_plan
        from hawq.budgets import Budget

        act = activation_plan(model, train, bits=a_bits_choices,
                              total=Budget("avg_bits", a_avg_bits), seed=cfg.seed)
        plan = act.apply(plan)
    ptq = copy.deepcopy(model)
    hawq.quantize_(ptq, plan)
    hawq.calibrate_(ptq, train, max_samples=cfg.calib_samples)
    before = hawq.evaluate(ptq, test, progress=progress).accuracy
    del ptq
    out = Path(out_dir) if out_dir is not None else None
    res = finetune(model, plan, train, cfg, checkpoint_dir=out, resume=resume,
                   progress=progress)
    after = hawq.evaluate(model, test, progress=progress).accuracy
    summary = {"model": model_name, "plan": plan.to_dict(), "fp32_accuracy": fp32,
               "ptq_accuracy": before, "accuracy": after, "finetune": res.to_dict(),
               "activations": act.to_dict() if act is not None else None}
    if out is not None:
        import io as _io

        out.mkdir(parents=True, exist_ok=True)
        plan.to_json(out / "plan.json")
        buf = _io.BytesIO()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
        atomic_write_bytes(out / "model.pt", buf.getvalue())
        write_json(out / "finetune.json", summary)
    return summary
