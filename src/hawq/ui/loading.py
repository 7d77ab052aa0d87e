"""Loading the user's own objects named on the command line (``--model``, ``--data``).

A spec is ``"package.module:attr"`` (imported with the current folder on ``sys.path``, as
``python -m`` does) or ``"path/to/file.py:attr"``; ``attr`` may be dotted (``mod:Class.make``).
:func:`load_object` imports it and calls it with no arguments when it is a factory;
:func:`unpack_setup` / :func:`unpack_data` read what the factory returned.

Language models and text (:mod:`hawq.modules.hf`, :mod:`hawq.feed.text`) need no Python of the
user's: ``--model hf:DIR`` (a local Hugging Face folder), ``hf:DIR/FILE.gguf`` (a GGUF file) and
the built-in language models (``smollm2-135m``, ``minilm-l6``) resolve to a factory returning
``{"model", "task", "data"}``; ``--data text:FILE`` (a UTF-8 text file, or ``text:pydoc`` for the
standard library's English) is split by topic and tokenized with the model's tokenizer by
:func:`load_data`. ``hf:`` / ``text:`` name a path when it exists or no module ``hf`` / ``text``
is importable; otherwise the spec is read as a Python object as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from hawq.base.errors import ConfigError, HawqError
from hawq.modules.models import import_user_file

__all__ = ["DATA_KEYS", "DEFAULT_TASK", "SETUP_KEYS", "Setup", "call_factory", "language_model",
           "load_data", "load_object", "load_setup", "resolve_object", "settle_task",
           "text_source", "unpack_data", "unpack_setup"]

#: Keys of a data dict: calibration, held-out (refinement / reward) and test data.
DATA_KEYS = ("calib", "heldout", "test")
#: Keys a model factory's dict may hold.
SETUP_KEYS = ("model", "task", "data", *DATA_KEYS)
#: The task used when neither ``--task`` nor the model factory names one.
DEFAULT_TASK = "classification"

_FORM = "'package.module:factory' or 'path/to/file.py:factory'"


def _split(spec: Any, what: str) -> tuple[str, str]:
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"{what} {spec!r}: give {_FORM} (the attribute after a colon)")
    module, _, attr = spec.rpartition(":")
    if not module or not attr or (len(module) == 1 and module.isalpha()):  # "C:" drive only
        raise ConfigError(f"{what} {spec!r}: give {_FORM} (the attribute after a colon)")
    return module, attr


def _is_path(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def _import_file(path_text: str, what: str, spec: str) -> Any:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} {spec!r}: file {str(path)!r} does not exist (relative paths "
                          f"start at the current folder {os.getcwd()!r})")
    try:
        return import_user_file(path)
    except Exception as e:  # noqa: BLE001 - the user's file: its failure is theirs to fix
        raise ConfigError(f"{what} {spec!r}: running {str(path)!r} raised {type(e).__name__}: "
                          f"{e}") from e


def _import_module(module: str, what: str, spec: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does: modules beside the user are importable
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            raise ConfigError(
                f"{what} {spec!r}: no module named {missing!r} in {cwd} or on the Python "
                "path; give 'package.module:factory' importable from the current folder (run "
                f"hawq from the folder holding {missing.split('.')[0]}.py), "
                f"'path/to/{module.split('.')[-1]}.py:{spec.rpartition(':')[2]}', or install "
                "the package") from None
        raise ConfigError(f"{what} {spec!r}: importing {module!r} failed: {e}; install "
                          f"{missing or 'the missing package'}") from e
    except HawqError:
        raise
    except Exception as e:
        raise ConfigError(f"{what} {spec!r}: importing {module!r} raised {type(e).__name__}: "
                          f"{e}") from e


def _prefixed(spec: Any, prefix: str) -> str | None:
    """The path after ``prefix:`` when ``spec`` names a file or folder that way: the path exists,
    or no Python module named ``prefix`` is importable (then the path's absence is reported
    by the reader). None otherwise."""
    if not isinstance(spec, str) or not spec.startswith(prefix + ":") or len(spec) <= len(prefix) + 1:
        return None
    path = spec[len(prefix) + 1:]
    if Path(path).expanduser().exists():
        return path
    if Path(f"{prefix}.py").is_file() or Path(prefix, "__init__.py").is_file():
        return None  # the user's module beside them (the current folder is on the path)
    try:
        module = importlib.util.find_spec(prefix)
    except (ImportError, ValueError):
        module = None
    return path if module is None else None


def language_model(spec: Any) -> Any:
    """The factory (no arguments, returning ``{"model", "task", "data"}``) of a language model
    spec: a built-in language model name (a :data:`hawq.modules.models.MODELS` entry with a
    ``setup``) or ``"hf:DIR"`` / ``"hf:DIR/FILE.gguf"`` (:func:`hawq.modules.hf.lm_setup`);
    None for any other spec. Cost: a registry look-up and at most two ``stat`` calls."""
    from hawq.modules.models import MODELS

    if isinstance(spec, str) and spec in MODELS:
        return MODELS.get(spec).setup
    path = _prefixed(spec, "hf")
    if path is None:
        return None
    from hawq.modules.hf import lm_setup

    def factory() -> dict[str, Any]:
        return lm_setup("hf:" + path)

    factory.__qualname__ = factory.__name__ = f"hf:{path}"
    return factory


def text_source(spec: Any) -> str | None:
    """The text file (or ``"pydoc"``, the standard library's English) a ``--data text:FILE``
    spec names, else None (see :func:`_prefixed`)."""
    return _prefixed(spec, "text")


def resolve_object(spec: str, what: str = "object") -> Any:
    """The object ``spec`` (``"pkg.module:attr"`` or ``"path/to/file.py:attr"``) names, not
    called. Modules are imported with the current folder on ``sys.path``. A language model spec
    (``what="model"``: ``hf:DIR``, a built-in language model) gives its factory
    (:func:`language_model`). Raises :class:`ConfigError` saying what to do when there is no
    colon, the module or file is not found, importing it fails, or the attribute is missing
    (listing what the module has)."""
    if what == "model":
        factory = language_model(spec)
        if factory is not None:
            return factory
    module_name, attr = _split(spec, what)
    module = (_import_file(module_name, what, spec) if _is_path(module_name)
              else _import_module(module_name, what, spec))
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_")
                            and callable(getattr(module, n, None)))[:12]
            raise ConfigError(f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}; it "
                              f"has {public}")
        obj = getattr(obj, part)
    return obj


def call_factory(obj: Any, spec: str, what: str = "object") -> Any:
    """``obj()`` when ``obj`` is a factory (a function, a class, a method; not an ``nn.Module``
    instance or other data), else ``obj``. Raises :class:`ConfigError` when the factory needs
    arguments or raises (with the original message)."""
    if not callable(obj) or isinstance(obj, nn.Module):
        return obj
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        required = [p.name for p in sig.parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                           p.POSITIONAL_OR_KEYWORD,
                                                           p.KEYWORD_ONLY)]
        if required:
            raise ConfigError(f"{what} {spec!r} needs arguments {required}: hawq calls it with "
                              "none; give a function that takes no arguments (wrap yours)")
    try:
        return obj()
    except Exception as e:
        raise ConfigError(f"{what} {spec!r} raised {type(e).__name__}: {e}") from e


def load_object(spec: str, what: str = "object", call: bool = True) -> Any:
    """Import ``spec`` (``"pkg.module:attr"``, ``"path/to/file.py:attr"``) with the current
    folder on ``sys.path`` and, with ``call`` and when it is a factory, call it with no
    arguments; returns the object or the factory's result. ``what`` names it in errors
    ("model", "data"). Raises :class:`ConfigError` (one line, what to do) for a spec without a
    colon, a module or file not found, a missing attribute, a factory needing arguments or a
    factory that raises. Cost: the import and the factory's own."""
    obj = resolve_object(spec, what)
    return call_factory(obj, spec, what) if call else obj


@dataclass
class Setup:
    """What a model factory gave: the model (or None), its task (a :class:`hawq.feed.tasks.Task`, a
    registered name, a loss callable or None) and data splits (keys among
    :data:`DATA_KEYS`)."""

    model: nn.Module | None = None
    task: Any = None
    data: dict[str, Any] = field(default_factory=dict)


def unpack_data(obj: Any, what: str = "data") -> dict[str, Any]:
    """Data splits from what a data factory returned: a dict whose keys are among
    :data:`DATA_KEYS` (``calib``, ``heldout``, ``test``) is taken as is (None values dropped);
    anything else is one data object used as ``{"calib": obj}`` (a dict of tensors such as a
    Hugging Face batch included). Raises :class:`ConfigError` for None or for a dict mixing
    split keys with other keys."""
    if obj is None:
        raise ConfigError(f"{what} is None: return {{'calib': ..., 'heldout': ..., 'test': ...}} "
                          "or one data object (tensors, (inputs, targets), a dict of tensors, a "
                          "Dataset, a DataLoader)")
    if isinstance(obj, Mapping):
        keys = set(obj)
        split = keys & set(DATA_KEYS)
        if split and keys - set(DATA_KEYS):
            raise ConfigError(f"{what} has split keys {sorted(split)} and other keys "
                              f"{sorted(keys - set(DATA_KEYS))}: use only {list(DATA_KEYS)} "
                              "(each a data object)")
        if split:
            return {k: obj[k] for k in DATA_KEYS if obj.get(k) is not None}
    return {"calib": obj}


def unpack_setup(obj: Any, what: str = "model factory") -> Setup:
    """A :class:`Setup` from what a model factory returned: an ``nn.Module``; a dict with keys
    among :data:`SETUP_KEYS` (``model``, ``task``, ``data`` and the split keys ``calib``,
    ``heldout``, ``test``); or a tuple ``(model, task)`` / ``(model, task, data)``. ``data`` is
    read by :func:`unpack_data`. Raises :class:`ConfigError` naming the accepted forms."""
    if isinstance(obj, nn.Module):
        return Setup(model=obj)
    forms = ("return an nn.Module, (model, task), (model, task, data) or a dict with keys among "
             f"{list(SETUP_KEYS)}")
    if isinstance(obj, Mapping):
        unknown = set(obj) - set(SETUP_KEYS)
        if unknown or not obj:
            raise ConfigError(f"{what} returned a dict with keys {sorted(obj)}: {forms}")
        data = unpack_data(obj["data"], f"{what}'s data") if obj.get("data") is not None else {}
        for k in DATA_KEYS:
            if obj.get(k) is not None:
                if k in data and "data" in obj:
                    raise ConfigError(f"{what} returned {k!r} both at the top and inside 'data':"
                                      " give it once")
                data[k] = obj[k]
        model = obj.get("model")
    elif isinstance(obj, tuple) and len(obj) in (2, 3):
        model, task = obj[0], obj[1]
        data = unpack_data(obj[2], f"{what}'s data") if len(obj) == 3 and obj[2] is not None \
            else {}
        obj = {"task": task}
    else:
        raise ConfigError(f"{what} returned an object of type {type(obj).__name__}: {forms}")
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"{what} returned a model of type {type(model).__name__}: the model "
                          "must be a torch.nn.Module")
    return Setup(model=model, task=obj.get("task"), data=data)


def load_data(spec: str, model: nn.Module | None = None, task: Any = None) -> dict[str, Any]:
    """The data splits ``--data spec`` gives: a text spec (``text:FILE``, ``text:pydoc``; see
    :func:`text_source`) is split by topic and tokenized with ``model``'s tokenizer
    (:func:`hawq.modules.hf.tokenizer_of`) for ``task`` (``causal-lm``: fixed-length
    sequences, ``embedding``: sentences; :func:`hawq.feed.text.text_data`); any other spec is
    :func:`load_object` read by :func:`unpack_data`. Raises :class:`ConfigError` when text data
    meets a model without a tokenizer or a task other than those two, :class:`DataError` for an
    unreadable or too short text file. Cost: one tokenizer pass over the text, or the factory's."""
    path = text_source(spec)
    if path is None:
        return unpack_data(load_object(spec, "data"), f"data {spec!r}")
    from hawq.feed.text import TEXT_TASKS, text_data
    from hawq.modules.hf import text_topics, tokenizer_of

    tokenizer = tokenizer_of(model) if model is not None else None
    if tokenizer is None:
        raise ConfigError(f"--data {spec!r}: text is tokenized with the model's tokenizer and "
                          "this model has none: use --model hf:DIR or a built-in language model "
                          "(smollm2-135m, minilm-l6), or give your model a .tokenizer attribute")
    name = getattr(task, "name", task)
    if name not in TEXT_TASKS:
        raise ConfigError(f"--data {spec!r}: text data is made for --task "
                          f"{' or '.join(TEXT_TASKS)}, not {name!r}")
    topics = text_topics("pydoc" if path == "pydoc" and not Path(path).exists() else path)
    return text_data(topics, tokenizer, name)


def settle_task(given: Any, from_factory: Any, default: str = DEFAULT_TASK) -> Any:
    """The task a run uses: ``given`` (``--task``, a config's ``task``) when it names another
    task than ``default`` or the factory named none; else the factory's task. ``--task
    classification`` (the default) thus never overrides a factory's own task."""
    if given is not None and (given != default or from_factory is None):
        return given
    return from_factory if from_factory is not None else default


def load_setup(model_spec: str, data_spec: str | None = None, task: Any = None,
               default_task: str = DEFAULT_TASK) -> Setup:
    """The user's model, task and data named by specs, as the CLI reads them: ``model_spec``
    (``"pkg.module:factory"`` / ``"path/to/file.py:factory"``, ``hf:DIR``, a built-in language
    model) is called and read by :func:`unpack_setup`; ``data_spec`` (optional) is read by
    :func:`load_data` and replaces the data the model factory returned; the task is :func:`settle_task` of ``task``
    and the factory's. Returns a :class:`Setup` whose model is in eval mode. Raises
    :class:`ConfigError` (one line, what to do) for unusable specs or a factory that returns no
    model. Cost: the imports and the factories' own (each factory is called once)."""
    setup = unpack_setup(load_object(model_spec, "model"), f"model {model_spec!r}")
    if setup.model is None:
        raise ConfigError(f"model {model_spec!r} returned no model: return an nn.Module, "
                          "(model, task[, data]) or a dict with 'model'")
    setup.model.eval()
    setup.task = settle_task(task, setup.task, default_task)
    if data_spec:
        setup.data = load_data(data_spec, setup.model, setup.task)
    return setup
