"""Job configurations and the one layer that turns them into command-line flags.

:class:`CompressConfig` (``hawq compress``, :func:`hawq.workflows.workflow.compress`) and
:class:`ZeroQConfig` (``hawq zeroq``, :func:`hawq.workflows.workflow.zeroq`) are plain dataclasses whose
fields carry their help text (``metadata={"help": ...}``), optionally a different flag name
(``"flag"``), hidden old spellings (``"aliases"``), the registry their value comes from
(``"choices"``: a callable returning the registered names) and an argument group (``"group"``).

The generic layer reads that metadata, so the CLI, the config checks and the report's rebuilt
command line cannot drift apart:

* :func:`add_config_args` adds one flag per field to an ``argparse`` parser;
* :func:`config_from_args` builds the dataclass back from the parsed namespace;
* :func:`config_to_argv` writes the flags that reproduce a config (non-default fields only);
* :func:`config_from_dict` rebuilds a config from its JSON record (``metrics.json``).

Method presets (:data:`METHODS`) name a (sensitivity, allocator) pair. Sensitivities come from
:data:`hawq.analysis.sensitivities.SENSITIVITIES`, allocators from :data:`hawq.maths.allocation.ALLOCATORS`
(plus the channel-wise ones, :data:`CHANNELWISE_ALLOCATORS`, run by the workflow), weight
clipping from :data:`hawq.maths.quantizers.W_CLIPS`, tasks from :data:`hawq.feed.tasks.TASKS` and model
names from :data:`hawq.modules.models.MODELS`: registering a new one makes it a valid value and flag
choice everywhere.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, is_dataclass
from typing import Any

from hawq.base.errors import ConfigError

__all__ = ["CHANNELWISE_ALLOCATORS", "CompressConfig", "DATA_SOURCES", "METHODS", "RANGES",
           "ZEROQ_SENSITIVITIES", "ZeroQConfig", "add_config_args", "allocator_names",
           "arg_type", "check_value", "config_from_args", "config_from_dict", "config_to_argv",
           "flag_of", "model_help", "non_negative_float", "non_negative_int", "positive_float",
           "positive_int", "sensitivity_names", "task_names", "unit_float", "w_clip_names",
           "zeroq_allocator_names"]

#: Method presets: name -> (sensitivity or None to keep the configured one, allocator).
METHODS: dict[str, tuple[str | None, str]] = {
    "hawq-v2": ("hawq-v2", "frontier"), "hawq-v1": ("hawq-v1", "v1-rule"),
    "ilp": (None, "ilp"),
    # channel-wise HAWQ (hawq.workflows.workflow): DDPG ratios / Hessian-only channel groups
    "cw-hawq": ("hawq-v2", "cw-ddpg"), "cw-hessian": ("hawq-v2", "cw-groups")}

#: Channel-wise allocators: the workflow runs them itself (per-channel bits), so they are not
#: entries of :data:`hawq.maths.allocation.ALLOCATORS` (which plans one bit width per layer).
CHANNELWISE_ALLOCATORS: tuple[str, ...] = ("cw-ddpg", "cw-groups")

#: Sensitivity measures of the zero-shot pipeline (:func:`hawq.workflows.workflow.zeroq`).
ZEROQ_SENSITIVITIES: tuple[str, ...] = ("kl", "hessian")

#: Where ZeroQ's sensitivity/calibration inputs come from: distilled from the BatchNorm statistics
#: (zero-shot), real training samples, or Gaussian noise (the ZeroQ paper's baselines).
DATA_SOURCES: tuple[str, ...] = ("distilled", "real", "noise")


# ----------------------------------------------------------------------------- registry names
# Each returns the registered names at call time (imports are lazy: the registries' modules
# import torch and the analysis code, and some of them import this module).

def sensitivity_names() -> list[str]:
    """Names in :data:`hawq.analysis.sensitivities.SENSITIVITIES` (``--sensitivity`` of compress)."""
    from hawq.analysis.sensitivities import SENSITIVITIES

    return SENSITIVITIES.names()


def allocator_names() -> list[str]:
    """Names in :data:`hawq.maths.allocation.ALLOCATORS` plus :data:`CHANNELWISE_ALLOCATORS`."""
    from hawq.maths.allocation import ALLOCATORS

    return [*ALLOCATORS.names(), *CHANNELWISE_ALLOCATORS]


def zeroq_allocator_names() -> list[str]:
    """Allocators that need only the cost matrix Omega (ZeroQ has no Hessian eigenvalues):
    :func:`hawq.maths.allocation.omega_allocators`."""
    from hawq.maths.allocation import omega_allocators

    return omega_allocators()


def w_clip_names() -> list[str]:
    """Names in :data:`hawq.maths.quantizers.W_CLIPS` (``--w-clip``)."""
    from hawq.maths.quantizers import W_CLIPS

    return W_CLIPS.names()


def a_calibration_names() -> list[str]:
    """Activation range calibrations (:data:`hawq.maths.plan.A_CALIBRATIONS`, ``--a-calibration``)."""
    from hawq.maths.plan import A_CALIBRATIONS

    return list(A_CALIBRATIONS)


def task_names() -> list[str]:
    """Names in :data:`hawq.feed.tasks.TASKS` (``--task``)."""
    from hawq.feed.tasks import TASKS

    return TASKS.names()


def probe_mode_names() -> list[str]:
    """Hutchinson probe modes (:data:`hawq.analysis.hessian.PROBE_MODES`)."""
    from hawq.analysis.hessian import PROBE_MODES

    return list(PROBE_MODES)


def method_names() -> list[str]:
    """Names of the :data:`METHODS` presets."""
    return list(METHODS)


def model_help() -> str:
    """Help of ``--model``: the built-in names (:data:`hawq.modules.models.MODELS`) and the factory form."""
    from hawq.modules.hf import MODEL_HELP
    from hawq.modules.models import MODELS

    return (f"built-in model ({', '.join(MODELS.names())}) or your own: 'pkg.module:factory' or "
            "'path/to/file.py:factory', imported with the current folder on the path; the "
            "factory returns an nn.Module, (model, task[, data]) or a dict with model/task/data; "
            + MODEL_HELP)


def _check(name: Any, names: list[str], argument: str) -> None:
    if name not in names:
        raise ConfigError(f"{argument}={name!r}: use one of {names}")


def _check_model(model: Any, cls: str) -> None:
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{cls}.model={type(model).__name__}: it takes a built-in model name or "
                          "'package.module:factory'; pass your nn.Module itself as "
                          f"hawq.{'zeroq' if cls == 'ZeroQConfig' else 'compress'}(model, data, "
                          "config=...)")


def _check_spec(spec: Any, argument: str) -> None:
    if spec is not None and (not isinstance(spec, str) or ":" not in spec):
        raise ConfigError(f"{argument}={spec!r}: give 'package.module:factory' or "
                          "'path/to/file.py:factory' (a function returning your data)")


def _check_positive(cfg: Any, names: Iterable[str]) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{name}={v!r}: give an integer >= 1")


# ----------------------------------------------------------------------------- value ranges
# A field's ``metadata["check"]`` names one of these ranges; ``__post_init__`` checks it
# (:func:`_check_ranges`) and :func:`add_config_args` gives the flag a parsing type that checks
# it too (:func:`arg_type`), so ``CompressConfig(test_samples=0)`` and ``--test-samples 0``
# fail alike, before any work.

#: Range name -> (test, what to give for an int, what to give for a float).
RANGES: dict[str, tuple[Callable[[float], bool], str, str]] = {
    "positive": (lambda v: v > 0, "an integer >= 1", "a number > 0"),
    "non-negative": (lambda v: v >= 0, "an integer >= 0", "a number >= 0"),
    "unit": (lambda v: 0 <= v <= 1, "0 or 1", "a number in [0, 1]"),
    "compression": (lambda v: v >= 1, "an integer >= 1",
                    ("a number >= 1 (the weight compression vs FP32, e.g. 8; below 1 would "
                     "allow a model larger than FP32)")),
    "avg-bits": (lambda v: 0 < v <= 32, "an integer in 1..32",
                 "a number in (0, 32] (average weight bits; FP32 is 32)"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in 0..4294967295", "an integer"),
}


def check_value(value: Any, kind: type, check: str, name: str) -> Any:
    """``value`` checked against the range ``check`` (a key of :data:`RANGES`) as a ``kind``
    (``int`` or ``float``; a float also takes an int, never a bool, NaN or inf). Returns it
    (an int given for a float stays an int). Raises :class:`ConfigError` ``"name=value: give
    ..."`` naming the range. Cost: nothing."""
    import math
    import numbers

    test, int_text, float_text = RANGES[check]
    want = int_text if kind is int else float_text
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or (kind is int and not isinstance(value, numbers.Integral)) \
            or not math.isfinite(value) or not test(value):
        raise ConfigError(f"{name}={value!r}: give {want}")
    return value


def arg_type(kind: type, check: str, flag: str = "value") -> Callable[[str], Any]:
    """An ``argparse`` ``type=`` function: parses the text as ``kind`` (``int``/``float``) and
    checks the range ``check`` (:data:`RANGES`); a bad value raises
    ``argparse.ArgumentTypeError`` saying what to give (argparse adds the flag)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        try:
            return check_value(value, kind, check, flag)
        except ConfigError:
            want = RANGES[check][1 if kind is int else 2]
            raise argparse.ArgumentTypeError(f"{text!r}: give {want}") from None

    parse.__name__ = f"{check}_{kind.__name__}"
    return parse


#: Parsing types for the CLI's own flags (outside the config classes).
positive_int = arg_type(int, "positive")
non_negative_int = arg_type(int, "non-negative")
positive_float = arg_type(float, "positive")
non_negative_float = arg_type(float, "non-negative")
unit_float = arg_type(float, "unit")


def _check_ranges(cfg: Any) -> None:
    """Check every field of ``cfg`` whose metadata names a range (None passes)."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        check = f.metadata.get("check")
        v = getattr(cfg, f.name)
        if check is None or v is None:
            continue
        tp = hints[f.name]
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) \
            else (tp,)
        check_value(v, int if int in args else float, check, f.name)


def _check_bit_list(bits: Any, name: str = "bits") -> tuple[int, ...]:
    """``bits`` (candidate weight bit widths) as a sorted tuple without repeats, each checked by
    :func:`hawq.maths.quantizers.check_bits` (symmetric: 2..8, 16/32). Raises
    :class:`ConfigError` for a string, a scalar, a non-integer or an unsupported width."""
    from hawq.maths.quantizers import check_bits

    if isinstance(bits, (str, bytes)) or not isinstance(bits, Iterable):
        raise ConfigError(f"{name}={bits!r}: give a tuple of candidate weight bit widths, e.g. "
                          "(2, 4, 8)")
    out = tuple(sorted({check_bits(b, name, symmetric=True) for b in bits}))
    if not out:
        raise ConfigError(f"{name} is empty: give candidate weight bit widths, e.g. (2, 4, 8)")
    return out


def _default_target(cfg: Any, *others: Any) -> bool:
    """Whether ``cfg`` names no size target and none of ``others`` (then compression 8)."""
    return all(v is None for v in (cfg.target_compression, cfg.target_avg_bits,
                                   cfg.target_bytes, cfg.target_fraction, *others))


def _targets(cfg: Any) -> list[float]:
    return [t for t in (cfg.target_compression, cfg.target_avg_bits, cfg.target_bytes,
                        cfg.target_fraction) if t is not None]


def _f(default: Any = MISSING, help: str | Callable[[], str] = "", *,
       default_factory: Any = MISSING, **meta: Any) -> Any:
    """A dataclass field with its CLI metadata (``help`` and the keys :func:`add_config_args`
    reads)."""
    md = {"help": help, **meta}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=md)
    return field(default=default, metadata=md)


_BUDGET = "budget (give one size target; BOPs/latency limits need --allocator ilp)"
_MODEL = "model, data and task"


#: The budget fields CompressConfig and ZeroQConfig share, defined once (:func:`_budget`).
_BUDGET_FIELDS: dict[str, dict[str, Any]] = {  # name -> _f(**spec)
    "bits": dict(default=(2, 4, 8), help="candidate weight bit widths"),
    "a_bits": dict(default=8, help="activation bits"),
    "target_avg_bits": dict(help="average weight bits", check="avg-bits"),
    "target_bytes": dict(help="quantized weight bytes", check="positive"),
    "target_fraction": dict(help="r in [0, 1] between all-lowest and all-highest bits (HAWQ-V3)",
                            check="unit"),
    "bops_limit": dict(help="BOPs limit in G (MACs x w_bits x a_bits)", flag="--bops",
                       metavar="G", check="positive"),
    "latency_table": dict(help="JSON {layer: {bits: latency}} for --latency-limit",
                          metavar="FILE"),
    "latency_limit": dict(help="total latency limit (needs --latency-table)", check="positive"),
    "pin_first_last": dict(help="keep the first and last layer at BITS (one of --bits)",
                           metavar="BITS"),
}


def _budget(name: str) -> Any:
    """A fresh dataclass field for the shared budget field ``name`` (default None)."""
    spec = dict(_BUDGET_FIELDS[name])
    return _f(spec.pop("default", None), spec.pop("help"), group=_BUDGET, **spec)


def _check_job(cfg: Any) -> None:
    """The checks CompressConfig and ZeroQConfig share: task, data spec, model, weight bit
    list (normalised in place) and activation bits."""
    from hawq.maths.quantizers import check_bits

    _check(cfg.task, task_names(), "task")
    _check_spec(cfg.data, "data")
    _check_model(cfg.model, type(cfg).__name__)
    cfg.bits = _check_bit_list(cfg.bits)
    check_bits(cfg.a_bits, "a_bits")


# ----------------------------------------------------------------------------- compress

@dataclass
class CompressConfig:
    """Options of :func:`hawq.workflows.workflow.compress` (``hawq compress``); JSON-serialisable.

    Budget: at most one of ``target_compression`` (weights, vs FP32), ``target_avg_bits``,
    ``target_bytes`` (weights) or ``target_fraction`` (r between all-lowest and all-highest),
    default compression 8 when none (and no BOPs/latency limit) is given; ``bops_limit`` (G BOPs)
    and ``latency_table`` (JSON, layer -> {bits: latency}) + ``latency_limit`` need an ILP
    allocator. ``method`` (a :data:`METHODS` preset) sets the sensitivity and the allocator.
    Raises :class:`ConfigError` naming the field for an invalid value.
    """

    model: str = _f("digits-cnn", model_help, group=_MODEL, metavar="MODEL")
    data_dir: str | None = _f(None, "folder with cifar10.npz and resnet*_cifar10.pt for the "
                              "built-in models (default: $HAWQ_DATA, else ../shared/data)",
                              group=_MODEL, metavar="DIR")
    method: str | None = _f(None, "preset (sensitivity + allocator): hawq-v2 = trace Omega + "
                            "Pareto frontier; hawq-v1 = eigenvalue ordering rule; ilp = integer "
                            "program over --sensitivity; cw-hawq = per-channel bits, ratios by "
                            "DDPG; cw-hessian = per-channel bits by Omega over trace-sorted "
                            "channel groups", choices=method_names, group="method")
    sensitivity: str = _f("hybrid", "how Omega_i(b) is computed (hybrid: max of the Hessian "
                          "Omega and the measured single-layer loss increase)",
                          choices=sensitivity_names, group="method")
    allocator: str = _f("ilp", "how bits are chosen from Omega under the budget",
                        choices=allocator_names, group="method")
    bits: tuple[int, ...] = _budget("bits")
    a_bits: int = _budget("a_bits")
    target_compression: float | None = _f(None, "weight compression vs FP32 (e.g. 8 = average "
                                          "4 bits); 8 when no target or limit is given",
                                          group=_BUDGET, check="compression")
    target_avg_bits: float | None = _budget("target_avg_bits")
    target_bytes: float | None = _budget("target_bytes")
    target_fraction: float | None = _budget("target_fraction")
    bops_limit: float | None = _budget("bops_limit")
    latency_table: str | None = _budget("latency_table")
    latency_limit: float | None = _budget("latency_limit")
    pin_first_last: int | None = _budget("pin_first_last")
    hessian_samples: int = _f(256, "samples for the Hessian (the first of the calibration data)",
                              aliases=("--samples",), group="sensitivity", check="positive")
    max_probes: int = _f(50, "Hutchinson probes at most", group="sensitivity", check="positive")
    tol: float = _f(1e-2, "Hutchinson: stop at this relative standard error of the trace",
                    group="sensitivity", check="non-negative")
    probe_mode: str = _f("auto", "Hessian traces: 'auto' (default: 'gn' for classifiers with "
                         "the built-in cross-entropy, else 'joint'), 'gn' (exact Gauss-Newton "
                         "trace + Hutchinson on the remainder), 'joint' (one HVP per probe for "
                         "all layers) or 'layer' (each layer alone: L HVPs per probe)",
                         choices=probe_mode_names, group="sensitivity")
    calib_samples: int = _f(512, "calibration samples (activation ranges, measured losses)",
                            group="quantization", check="positive")
    test_samples: int | None = _f(None, "limit the test samples (default: all)",
                                  group="quantization", check="positive")
    w_clip: str = _f("minmax", "weight clipping: minmax (full range) or mse (MSE-optimal "
                     "clipping search, best at 2-4 bits)", choices=w_clip_names,
                     group="quantization")
    bias_correct: bool = _f(False, "after quantizing, correct each layer's bias so its mean "
                            "output per channel matches FP32 on the calibration data "
                            "(hawq.bias_correct_)", group="quantization")
    refine: bool | str = _f("auto", "after allocating, try exchanges (one layer a bit width up, "
                            "one down, same budget) measured on the whole quantized model on "
                            "--refine-samples held-out samples (hawq.post.refine.refine_plan); "
                            "default 'auto': only hybrid plans averaging <= 3.5 weight bits, "
                            "where the per-layer cost model is weakest; --no-refine: never",
                            group="refinement")
    refine_samples: int = _f(1024, "held-out samples for refinement (built-in models: the "
                             "training samples after the calibration ones)", group="refinement",
                             check="positive")
    refine_candidates: int = _f(16, "exchanges measured per refinement round",
                                group="refinement", check="positive")
    seed: int = _f(0, "random seed", group=_MODEL, check="seed")
    episodes: int = _f(100, "cw-hawq: DDPG episodes", group="channel-wise methods",
                       check="positive")
    reward_samples: int = _f(1000, "cw-hawq: held-out samples for the DDPG reward",
                             group="channel-wise methods", check="positive")
    channel_groups: int = _f(4, "cw-hessian: trace-sorted channel groups per layer",
                             group="channel-wise methods", check="positive")
    compare_uniform: bool = _f(True, "also quantize and evaluate the uniform plan of the same "
                               "size (one more calibration and test pass)", group="quantization")
    task: str = _f("classification", "how the model is fed and judged (hawq.feed.tasks.TASKS)",
                   choices=task_names, group=_MODEL)
    data: str | None = _f(None, "your data: 'pkg.module:factory' or 'path/to/file.py:factory' "
                          "returning {'calib': ..., 'heldout': ..., 'test': ...} or one data "
                          "object (tensors, (inputs, targets), dicts of tensors, a Dataset, a "
                          "DataLoader) used for calibration; default: the built-in model's "
                          "dataset", group=_MODEL, metavar="SPEC")

    def __post_init__(self) -> None:
        from hawq.maths.allocation import omega_allocators

        if self.method is not None:
            _check(self.method, method_names(), "method")
            sens, self.allocator = METHODS[self.method]
            self.sensitivity = sens or self.sensitivity
        _check(self.probe_mode, probe_mode_names(), "probe_mode")
        _check(self.sensitivity, sensitivity_names(), "sensitivity")
        _check(self.allocator, allocator_names(), "allocator")
        _check(self.w_clip, w_clip_names(), "w_clip")
        _check_job(self)
        _check_ranges(self)
        if len(_targets(self)) > 1:
            raise ConfigError("give one size target: target_compression, target_avg_bits, "
                              "target_bytes or target_fraction")
        if _default_target(self, self.bops_limit, self.latency_limit):
            self.target_compression = 8.0
        if self.refine not in (True, False, "auto"):
            raise ConfigError(f"refine={self.refine!r}: use True, False or 'auto'")
        if self.refine is True and self.allocator not in omega_allocators():
            raise ConfigError(f"refine=True refines a plan chosen from Omega "
                              f"({omega_allocators()}), not allocator={self.allocator!r}: drop "
                              "refine or use allocator='ilp'")
        if self.refine is not False and (self.refine_samples < 1 or self.refine_candidates < 1):
            raise ConfigError("refine_samples and refine_candidates must be >= 1")
        _check_positive(self, ("hessian_samples", "max_probes", "calib_samples", "test_samples",
                               "episodes", "reward_samples", "channel_groups"))

    def derived_fields(self) -> tuple[str, ...]:
        """Fields whose value ``__post_init__`` derives from the others (the preset's
        sensitivity/allocator, the default compression 8): a rebuilt command leaves them out."""
        out: list[str] = []
        if self.method is not None:
            sens, _ = METHODS[self.method]
            out += ["allocator"] if sens is None else ["sensitivity", "allocator"]
        if self.target_compression == 8.0 and self.bops_limit is None \
                and self.latency_limit is None and len(_targets(self)) == 1:
            out.append("target_compression")
        return tuple(out)


# ----------------------------------------------------------------------------- zeroq

@dataclass
class ZeroQConfig:
    """Options of :func:`hawq.workflows.workflow.zeroq` (``hawq zeroq``); JSON-serialisable.

    Size target: one of ``target_compression`` (weights vs FP32; default 8), ``target_avg_bits``,
    ``target_bytes``, ``target_fraction``; or ``w_bits`` for uniform quantization (no
    sensitivity or allocation). ``bops_limit`` (G BOPs) and ``latency_table``/``latency_limit``
    need ``allocator='ilp'`` (as in :class:`CompressConfig`). ``data_source`` picks the inputs
    for sensitivity and calibration: ``"distilled"`` (zero-shot, the default), ``"real"``
    (``calib_samples`` training samples) or ``"noise"`` (``calib_samples`` N(0, 1) inputs).
    ``distill_label_weight`` (default 10) adds a cross-entropy term toward round-robin class
    labels to ZeroQ's BN loss (see :func:`hawq.analysis.distill.distill_data`); 0 is ZeroQ's own loss.
    ``evaluate`` measures FP32 and quantized metrics on the real test data (report only).
    """

    model: str = _f("resnet20", model_help, group=_MODEL, metavar="MODEL")
    data_dir: str | None = _f(None, "folder with cifar10.npz and resnet*_cifar10.pt for the "
                              "built-in models (default: $HAWQ_DATA, else ../shared/data)",
                              group=_MODEL, metavar="DIR")
    bits: tuple[int, ...] = _budget("bits")
    a_bits: int = _budget("a_bits")
    w_bits: int | None = _f(None, "uniform weight bits instead of a mixed-precision budget",
                            group=_BUDGET)
    target_compression: float | None = _f(None, "weight compression vs FP32 (e.g. 8 = average "
                                          "4 bits); 8 when no target, --w-bits or limit is "
                                          "given", group=_BUDGET, check="compression")
    target_avg_bits: float | None = _budget("target_avg_bits")
    target_bytes: float | None = _budget("target_bytes")
    target_fraction: float | None = _budget("target_fraction")
    bops_limit: float | None = _budget("bops_limit")
    latency_table: str | None = _budget("latency_table")
    latency_limit: float | None = _budget("latency_limit")
    pin_first_last: int | None = _budget("pin_first_last")
    sensitivity: str = _f("kl", "kl (ZeroQ: KL of the outputs) or hessian (HAWQ-V2 trace on "
                          "the distilled data)", choices=lambda: list(ZEROQ_SENSITIVITIES),
                          group="method")
    allocator: str = _f("frontier", "frontier (ZeroQ's Pareto frontier) or an allocator that "
                        "needs only Omega", choices=zeroq_allocator_names, group="method")
    data_source: str = _f("distilled", "inputs for sensitivity and calibration (distilled: "
                          "zero-shot)", choices=lambda: list(DATA_SOURCES), group="method")
    distill_batch: int = _f(32, "distilled inputs", group="distillation", check="positive")
    distill_iters: int = _f(500, "distillation iterations", group="distillation",
                            check="non-negative")
    distill_lr: float = _f(0.5, "distillation learning rate", group="distillation",
                           check="positive")
    distill_init: str = _f("uniform", "initial distilled inputs: uniform (the reference's) or "
                           "gaussian", group="distillation")
    distill_label_weight: float = _f(10.0, "weight of a cross-entropy term toward round-robin "
                                     "class labels added to ZeroQ's BN loss (0 = ZeroQ's own "
                                     "loss)", group="distillation", check="non-negative")
    input_shape: tuple[int, ...] | None = _f(None, "per-sample input shape, e.g. 3,32,32 "
                                             "(default: the model's, or inferred)",
                                             group="distillation", metavar="D1,D2,...")
    calib_samples: int = _f(512, "calibration samples for --data-source real/noise",
                            group="quantization", check="positive")
    hessian_max_probes: int = _f(50, "--sensitivity hessian: Hutchinson probes at most",
                                 flag="--max-probes", group="quantization", check="positive")
    hessian_tol: float = _f(1e-2, "--sensitivity hessian: relative standard error target",
                            flag="--tol", group="quantization", check="non-negative")
    w_clip: str = _f("minmax", "weight clipping: minmax (full range) or mse (MSE-optimal "
                     "clipping search)", choices=w_clip_names, group="quantization")
    a_calibration: str = _f("minmax", "activation ranges: minmax or percentile",
                            choices=a_calibration_names, group="quantization")
    evaluate: bool = _f(True, "measure FP32 and quantized metrics on the real test data "
                        "(report only)", aliases=("--no-eval",), group="quantization")
    test_samples: int | None = _f(None, "limit the test samples (default: all)",
                                  group="quantization", check="positive")
    compare_uniform: bool = _f(True, "also quantize and evaluate the uniform plan of the same "
                               "size (one more calibration and test pass)", group="quantization")
    seed: int = _f(0, "random seed", group=_MODEL, check="seed")
    task: str = _f("classification", "how the model is fed and judged (hawq.feed.tasks.TASKS)",
                   choices=task_names, group=_MODEL)
    data: str | None = _f(None, "your test data: 'pkg.module:factory' returning {'test': ...} "
                          "or one data object (report only; default: the built-in model's "
                          "test split)", group=_MODEL, metavar="SPEC")

    def __post_init__(self) -> None:
        from hawq.maths.quantizers import check_bits

        _check(self.sensitivity, list(ZEROQ_SENSITIVITIES), "sensitivity")
        _check(self.allocator, zeroq_allocator_names(), "allocator")
        _check(self.data_source, list(DATA_SOURCES), "data_source")
        _check(self.w_clip, w_clip_names(), "w_clip")
        _check(self.a_calibration, a_calibration_names(), "a_calibration")
        _check_job(self)
        if self.w_bits is not None:
            check_bits(self.w_bits, "w_bits", symmetric=True)
        _check_ranges(self)
        if self.input_shape is not None:
            shape = self.input_shape
            if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable) or not shape:
                raise ConfigError(f"input_shape={shape!r}: give the per-sample shape as a tuple "
                                  "of positive integers, e.g. (3, 32, 32)")
            self.input_shape = tuple(check_value(d, int, "positive", "input_shape entry")
                                     for d in shape)
        targets = _targets(self)
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
        if _default_target(self, self.w_bits, self.bops_limit, self.latency_limit):
            self.target_compression = 8.0
        _check_positive(self, ("distill_batch", "calib_samples"))

    def derived_fields(self) -> tuple[str, ...]:
        """Fields ``__post_init__`` derived (the default compression 8): left out of a rebuilt
        command."""
        if self.target_compression == 8.0 and self.w_bits is None and self.bops_limit is None \
                and self.latency_limit is None and len(_targets(self)) == 1:
            return ("target_compression",)
        return ()

    def compress_config(self) -> CompressConfig:
        """The :class:`CompressConfig` carrying this budget (for the allocation steps)."""
        return CompressConfig(model=self.model, allocator=self.allocator, bits=self.bits,
                              a_bits=self.a_bits, target_compression=self.target_compression,
                              target_avg_bits=self.target_avg_bits,
                              target_bytes=self.target_bytes,
                              target_fraction=self.target_fraction,
                              bops_limit=self.bops_limit, latency_table=self.latency_table,
                              latency_limit=self.latency_limit,
                              pin_first_last=self.pin_first_last, seed=self.seed)


# ----------------------------------------------------------------------------- dataclass <-> CLI

def _kind(cls: type, f: Field) -> tuple[str, type | None]:
    """(kind, scalar type) of a config field: kind is "bool", "tristate" (bool | str, e.g.
    refine), "ints" (tuple[int, ...]) or "scalar" (int/float/str, optional or not)."""
    tp = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) \
        else (tp,)
    args = tuple(a for a in args if a is not type(None))
    if args == (bool,):
        return "bool", bool
    if set(args) == {bool, str}:
        return "tristate", None
    if len(args) == 1 and typing.get_origin(args[0]) is tuple:
        return "ints", int
    if len(args) == 1 and args[0] in (int, float, str):
        return "scalar", args[0]
    raise TypeError(f"{cls.__name__}.{f.name}: type {tp} has no command-line form")


def flag_of(f: Field) -> str:
    """The command-line flag of a config field (``metadata['flag']`` or ``--field-name``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. "
                                         "2,4,8") from None


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return str(v)


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = (),
                    groups: dict[str, Any] | None = None,
                    only: Iterable[str] | None = None) -> dict[str, Any]:
    """Add one flag per field of the config dataclass ``cls`` to ``parser`` (fields in ``skip``
    left out; with ``only``, just those fields); ``dest`` is the field name, the default the
    field's. Fields with the same
    ``metadata['group']`` share an argument group (``groups``: title -> group, reused and
    returned so callers can add their own flags to a group).

    Forms: ``bool`` -> ``--x/--no-x``; ``bool | str`` (``refine``) -> ``--x/--no-x`` with the
    string default; ``tuple[int, ...]`` -> a comma list; ``int``/``float``/``str`` (optional or
    not) -> a typed value; ``metadata['choices']`` (a callable, read now) -> argparse choices;
    ``metadata['aliases']`` -> hidden old spellings. Raises TypeError for a field type with no
    command-line form (a bug in the config class)."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    groups = {} if groups is None else groups
    skip = set(skip)
    if only is not None:
        only = set(only)
        unknown = only - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
        skip |= {f.name for f in fields(cls)} - only
    for f in fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        kind, scalar = _kind(cls, f)
        title = f.metadata.get("group")
        target = parser
        if title:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        help_ = f.metadata.get("help") or ""
        help_ = help_() if callable(help_) else help_
        default = _default(f)
        flag = flag_of(f)
        kw: dict[str, Any] = {"dest": f.name, "default": default}
        if kind in ("bool", "tristate"):
            kw["action"] = argparse.BooleanOptionalAction
            shown = ({True: "on", False: "off"}[default] if isinstance(default, bool)
                     else default)
            help_ += f" (default: {shown})"
        else:
            kw["type"] = (_ints if kind == "ints" else
                          arg_type(scalar, f.metadata["check"], flag)
                          if f.metadata.get("check") else scalar)
            choices = f.metadata.get("choices")
            if choices is not None:
                kw["choices"] = list(choices())
            if "metavar" in f.metadata:
                kw["metavar"] = f.metadata["metavar"]
            elif kind == "ints":
                kw["metavar"] = "B1,B2,..."
            elif choices is None:
                kw["metavar"] = {int: "N", float: "X", str: "TEXT"}[scalar]
            if default is not None:
                help_ += f" (default: {_show(default)})"
        kw["help"] = help_.replace("%", "%%")
        target.add_argument(flag, **kw)
        for alias in f.metadata.get("aliases", ()):
            akw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                   "help": argparse.SUPPRESS}
            if kind in ("bool", "tristate"):
                akw["action"] = "store_false" if alias.startswith("--no-") else "store_true"
            else:
                akw.update({k: kw[k] for k in ("type", "choices") if k in kw})
            target.add_argument(alias, **akw)
    return groups


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The ``cls`` config from a namespace parsed with :func:`add_config_args` (fields the
    namespace lacks keep their defaults; ``overrides`` win). Raises :class:`ConfigError` from
    the config's checks."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def config_from_dict(cls: type, record: Mapping[str, Any]) -> Any:
    """The ``cls`` config from its JSON record (``asdict`` of one, e.g. ``metrics.json``'s
    ``config``): unknown keys are ignored, lists become tuples. Raises :class:`ConfigError`
    from the config's checks."""
    names = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names}
    return cls(**values)


def config_to_argv(cfg: Any) -> list[str]:
    """The flags that rebuild ``cfg`` with :func:`add_config_args`'s parser: one per field whose
    value differs from the field's default (fields the config derives itself, see its
    ``derived_fields``, are left out). ``config_from_args`` of the parsed flags equals ``cfg``."""
    if not is_dataclass(cfg):
        raise TypeError(f"{cfg!r} is not a config dataclass")
    derived = set(cfg.derived_fields()) if hasattr(cfg, "derived_fields") else set()
    out: list[str] = []
    for f in fields(cfg):
        if f.name in derived or f.metadata.get("cli") is False:
            continue
        v, d = getattr(cfg, f.name), _default(f)
        if isinstance(v, list):
            v = tuple(v)
        if v is None or v == d:
            continue
        kind, _ = _kind(type(cfg), f)
        flag = flag_of(f)
        if kind in ("bool", "tristate") and isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        elif kind == "tristate":
            raise ConfigError(f"{f.name}={v!r} has no command-line form: use True, False or "
                              f"{d!r}")
        else:
            out += [flag, _show(v)]
    return out


def config_dict(cfg: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` of a config (the JSON record :func:`config_from_dict` reads)."""
    return asdict(cfg)
