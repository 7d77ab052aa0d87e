"""Attention models under hawq: keep analysis and quantization on differentiable, hookable code.

Two things in PyTorch's attention get in the way of hawq:

* ``F.scaled_dot_product_attention`` picks a fused kernel (on CPU the flash-attention kernel)
  whose backward has no derivative itself, so the Hessian engine's double backward fails. The
  math backend is plain matmul/softmax and twice differentiable.
* ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` have a
  "fast path" (``torch._native_multi_head_attention``, ``torch._transformer_encoder_layer_fwd``,
  nested tensors) taken in eval mode without grad. It reads the weights directly and never calls
  the submodules, so quantized twins, their activation quantizers and hawq's hooks are bypassed.

:func:`attention_safe` switches both off for the body of a ``with`` block and restores the
previous settings however the block ends; hawq's own passes (:func:`hawq.analysis.hessian.analyze`,
:func:`hawq.layers`, :func:`hawq.calibrate_`) use it. :func:`pin_slow_path_` makes the switch
permanent on the modules of a quantized model (done by :func:`hawq.quantize_`), so evaluating
it later outside hawq still runs the twins.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["attention_safe", "has_attention", "pin_slow_path_"]

#: module types whose forward may take a fused fast path or call scaled_dot_product_attention
ATTENTION_TYPES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder,
    nn.TransformerDecoderLayer, nn.Transformer)


def has_attention(model: nn.Module) -> bool:
    """True when ``model`` (or any submodule) is an ``nn.MultiheadAttention`` or a built-in
    transformer block. Custom modules that call ``F.scaled_dot_product_attention`` directly are
    not detected: use :func:`attention_safe` anyway (it is cheap). Cost: one walk over modules."""
    return any(isinstance(m, ATTENTION_TYPES) for m in model.modules())


def _math_sdpa() -> contextlib.AbstractContextManager:
    """A context forcing the math SDPA backend (twice differentiable), on any torch >= 2.1."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3
    except ImportError:
        sdpa_kernel = None
    if sdpa_kernel is not None:
        return sdpa_kernel(SDPBackend.MATH)
    cuda = torch.backends.cuda
    if all(hasattr(cuda, f) for f in ("enable_flash_sdp", "enable_mem_efficient_sdp",
                                      "flash_sdp_enabled", "mem_efficient_sdp_enabled")):
        return _flags_off(cuda)  # torch 2.1/2.2: the same global flags also steer the CPU
    return contextlib.nullcontext()


@contextlib.contextmanager
def _flags_off(cuda) -> Iterator[None]:
    flash, mem = cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled()
    math_on = cuda.math_sdp_enabled() if hasattr(cuda, "math_sdp_enabled") else None
    try:
        cuda.enable_flash_sdp(False)
        cuda.enable_mem_efficient_sdp(False)
        if math_on is not None:
            cuda.enable_math_sdp(True)
        yield
    finally:
        cuda.enable_flash_sdp(flash)
        cuda.enable_mem_efficient_sdp(mem)
        if math_on is not None:
            cuda.enable_math_sdp(math_on)


def _fastpath_api():
    mha = getattr(torch.backends, "mha", None)
    get = getattr(mha, "get_fastpath_enabled", None)
    put = getattr(mha, "set_fastpath_enabled", None)
    return (get, put) if get is not None and put is not None else (None, None)


def _module_switches(model: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """(module, attribute, value that turns its fast path off) for each built-in block."""
    out: list[tuple[nn.Module, str, object]] = []
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and hasattr(m, "activation_relu_or_gelu"):
            out.append((m, "activation_relu_or_gelu", 0))  # read only by the fast-path test
        elif isinstance(m, nn.TransformerEncoder) and hasattr(m, "use_nested_tensor"):
            out.append((m, "use_nested_tensor", False))
    return out


@contextlib.contextmanager
def attention_safe(model: nn.Module | None = None, math_sdpa: bool = True) -> Iterator[None]:
    """For the ``with`` body: no MHA/Transformer fast path, the math SDPA backend, and (with
    ``model``) float attention modules that call their ``out_proj``.

    The fast path is turned off with ``torch.backends.mha.set_fastpath_enabled(False)``; on a
    torch without that switch (2.1) the built-in transformer blocks of ``model`` are switched
    off one by one instead. ``math_sdpa`` forces ``SDPBackend.MATH``
    (``torch.nn.attention.sdpa_kernel``; the global ``enable_*_sdp`` flags on torch < 2.3),
    whose backward is twice differentiable. Every plain ``nn.MultiheadAttention`` of ``model``
    becomes a :class:`hawq.modules.qmodules.RoutedMultiheadAttention` (the same object, its class
    swapped) that computes the same function but calls ``out_proj`` as a module, so hooks on
    ``out_proj`` (layer tables, activation Hessians, calibration) see its input. Everything is
    restored when the block ends, also by an exception; blocks may nest. Yields None.

    Cost: setting a few global flags and one walk over ``model``'s modules; inside the block
    attention runs the unfused kernels (slower, an (L, S) score matrix per head in memory) plus
    one identity (E x E) matmul per token and attention module. Not thread-safe: the flags are
    process-wide.
    """
    from hawq.modules.qmodules import RoutedMultiheadAttention

    get, put = _fastpath_api()
    mods = list(model.modules()) if model is not None else []
    switches = _module_switches(model) if (get is None and model is not None) else []
    saved = [(m, a, getattr(m, a)) for m, a, _ in switches]
    routed = [m for m in mods if type(m) is nn.MultiheadAttention]
    previous = get() if get is not None else None
    with contextlib.ExitStack() as stack:
        try:
            if put is not None:
                put(False)
            for m, a, off in switches:
                setattr(m, a, off)
            for m in routed:
                m.__class__ = RoutedMultiheadAttention
            if math_sdpa:
                stack.enter_context(_math_sdpa())
            yield
        finally:
            if put is not None:
                put(previous)
            for m, a, value in saved:
                setattr(m, a, value)
            for m in routed:
                m.__class__ = nn.MultiheadAttention


def pin_slow_path_(model: nn.Module) -> list[str]:
    """Turn the fused fast path off for good on the transformer blocks of ``model`` that hold a
    quantized twin (its ``TransformerEncoderLayer``s and ``TransformerEncoder``s), so evaluating
    the quantized model with ``torch.no_grad()`` in eval mode runs the twins, not a fused kernel
    that reads the float weights around them. Only attributes that torch reads to decide on the
    fast path are changed; results of the float computation are unaffected.

    Returns the names of the modules changed. Cost: one walk over the modules; afterwards these
    blocks run the (slower) unfused eval path.
    """
    from hawq.modules.qmodules import QuantMixin

    names = {id(m): n for n, m in model.named_modules()}
    changed = []
    for m, attr, off in _module_switches(model):
        if any(isinstance(c, QuantMixin) for c in m.modules()) and getattr(m, attr) != off:
            setattr(m, attr, off)
            changed.append(names[id(m)])
    return changed
