"""Text data offline: the standard library's English prose, or any text file, split by topic and
tokenized for the ``causal-lm`` and ``embedding`` tasks.

Sources (each a dict *topic name -> text*):

* :func:`pydoc_topics`: ``pydoc_data.topics`` from Python's standard library, 79 topics of the
  language reference, about 465,000 characters of English (with code examples). No files.
* :func:`file_topics`: a UTF-8 text file the user gives (``--data text:FILE``), cut at blank
  lines into consecutive chunks that play the role of topics.

:func:`split_topics` deals whole topics to the ``calib`` / ``heldout`` / ``test`` splits (a
seeded shuffle, then by characters, 50/20/30 by default), so no text is in two splits.
:func:`token_sequences` turns a split into fixed-length token sequences (``causal-lm``: a dict
with ``input_ids`` and ``attention_mask``, N x seq_len); :func:`sentences` and
:func:`sentence_batches` into padded sentences (``embedding``). :func:`text_data` does all of it
for one task. A tokenizer is any Hugging Face tokenizer (called as ``tokenizer(texts, ...)``);
this module never imports ``transformers`` itself.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hawq.base.errors import ConfigError, DataError

__all__ = ["FRACTIONS", "SPLITS", "TEXT_TASKS", "file_topics", "pydoc_topics", "sentence_batches",
           "sentences", "split_topics", "text_data", "text_splits", "token_sequences"]

#: The splits text is dealt into, in order.
SPLITS = ("calib", "heldout", "test")
#: Default share of the characters per split (calibration, held-out, test).
FRACTIONS = (0.5, 0.2, 0.3)
#: The tasks text data is made for.
TEXT_TASKS = ("causal-lm", "embedding")


def pydoc_topics() -> dict[str, str]:
    """The standard library's ``pydoc_data.topics``: topic name -> text (79 topics, about
    465,000 characters). Raises :class:`DataError` when this Python was built without it.
    Cost: one import."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("this Python has no pydoc_data.topics (the built-in English text): "
                        "give --data text:FILE with a UTF-8 text file") from None
    return {str(k): str(v) for k, v in topics.items() if str(v).strip()}


def _paragraphs(text: str, longest: int) -> list[str]:
    """Paragraphs of ``text`` (cut at blank lines); one longer than ``longest`` characters is
    cut again after sentences (then at any whitespace) so no piece exceeds it much."""
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        if not para.strip():
            continue
        if len(para) <= longest:
            out.append(para)
            continue
        piece = ""
        for part in re.split(r"(?<=[.!?])\s+|\n", para):
            while len(part) > longest:  # no sentence ends: cut at whitespace
                cut = part.rfind(" ", 0, longest)
                cut = cut if cut > 0 else longest
                out.append(part[:cut])
                part = part[cut:].lstrip()
            if piece and len(piece) + len(part) + 1 > longest:
                out.append(piece)
                piece = ""
            piece = f"{piece} {part}" if piece else part
        if piece.strip():
            out.append(piece)
    return out


def file_topics(path: str | os.PathLike, chunk_chars: int | None = None) -> dict[str, str]:
    """The UTF-8 text file ``path`` as topics: consecutive chunks of whole paragraphs of at
    least ``chunk_chars`` characters each (default: 1/30 of the file, between 200 and 4,000),
    named ``"<file name>#<i>"``. Raises :class:`DataError` naming the file when it does not
    exist, is not UTF-8 (the byte offset is given), or is too short for three chunks.
    Cost: one read of the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} does not exist (relative paths start at the "
                        f"current folder {os.getcwd()!r}): give --data text:FILE with a UTF-8 "
                        "text file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {str(path)!r} is not UTF-8 (byte {e.start}: {e.reason}): "
                        "convert it to UTF-8 (e.g. iconv -t utf-8)") from None
    except OSError as e:
        raise DataError(f"text file {str(path)!r} cannot be read ({e.strerror or e})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    size = len(text.strip())
    if chunk_chars is None:
        chunk_chars = min(4000, max(200, size // 30))
    if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 1:
        raise ConfigError(f"chunk_chars={chunk_chars!r}: give an integer >= 1")
    chunks, cur = [], ""
    for para in _paragraphs(text, 2 * chunk_chars):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= chunk_chars:
            chunks.append(cur)
            cur = ""
    if cur.strip():
        if chunks and len(cur) < chunk_chars // 2:
            chunks[-1] = f"{chunks[-1]}\n\n{cur}"
        else:
            chunks.append(cur)
    if len(chunks) < len(SPLITS):
        raise DataError(f"text file {str(path)!r} holds {size} characters in {len(chunks)} "
                        f"chunk(s): it needs at least {len(SPLITS)} (calibration, held-out, "
                        "test); give a longer text (a few thousand characters or more)")
    return {f"{path.name}#{i}": c for i, c in enumerate(chunks)}


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        fr = ()
    if len(fr) != len(SPLITS) or any(not f > 0 for f in fr):
        raise ConfigError(f"fractions={fractions!r}: give {len(SPLITS)} positive shares "
                          f"(calib, heldout, test), e.g. {FRACTIONS}")
    total = sum(fr)
    return tuple(f / total for f in fr)


def split_topics(topics: Mapping[str, str], fractions: Sequence[float] = FRACTIONS,
                 seed: int = 0) -> dict[str, list[str]]:
    """Deal whole topics to :data:`SPLITS`: the topic names, sorted then shuffled with ``seed``,
    fill ``calib`` until it holds its share of the characters, then ``heldout``, then ``test``
    (which takes the rest); every split gets at least one topic. Returns split -> topic names
    (disjoint, together all topics; the same for the same topics and seed whatever the dict
    order). Raises :class:`DataError` with fewer topics than splits. Cost: O(topics)."""
    fr = _check_fractions(fractions)
    names = sorted(k for k, v in topics.items() if v.strip())
    if len(names) < len(SPLITS):
        raise DataError(f"{len(names)} non-empty topic(s): text data needs at least "
                        f"{len(SPLITS)} (one per split {SPLITS}); give more text")
    random.Random(seed).shuffle(names)
    total = sum(len(topics[n]) for n in names)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    i, filled = 0, 0.0
    for k, split in enumerate(SPLITS):
        reserve = len(SPLITS) - 1 - k  # topics the later splits need at least
        target = filled + fr[k] * total
        while i < len(names) - reserve and (not out[split] or split == SPLITS[-1]
                                            or filled < target):
            if out[split] and split != SPLITS[-1] and filled + len(topics[names[i]]) / 2 > target:
                break  # this topic lies mostly beyond the share: leave it to the next split
            out[split].append(names[i])
            filled += len(topics[names[i]])
            i += 1
    return out


#: Paragraphs at least this long are kept once only (see :func:`text_splits`).
_DEDUP_CHARS = 40


def text_splits(topics: Mapping[str, str], fractions: Sequence[float] = FRACTIONS,
                seed: int = 0) -> dict[str, str]:
    """Split -> text: :func:`split_topics`'s topics of each split, paragraphs joined by blank
    lines, each paragraph of 40 characters or more kept at its first occurrence only (in the
    order calib, heldout, test): topics that quote each other (``pydoc_data.topics`` repeats
    about 82,000 characters across topics; ``if`` and ``else`` are the same text) never put the
    same paragraph into two splits. Cost: O(characters)."""
    seen: set[str] = set()
    out = {}
    for s, names in split_topics(topics, fractions, seed).items():
        kept = []
        for name in names:
            for para in re.split(r"\n[ \t]*\n", topics[name]):
                key = " ".join(para.split())
                if not key:
                    continue
                if len(key) >= _DEDUP_CHARS:
                    if key in seen:
                        continue
                    seen.add(key)
                kept.append(para)
        out[s] = "\n\n".join(kept)
    return out


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added."""
    if not callable(tokenizer):
        raise ConfigError(f"tokenizer is a {type(tokenizer).__name__}: give a Hugging Face "
                          "tokenizer (called as tokenizer(texts))")
    enc = tokenizer(texts, add_special_tokens=False)
    ids = enc["input_ids"] if isinstance(enc, Mapping) or hasattr(enc, "keys") else enc
    return [list(x) for x in ids]


def token_sequences(text: str, tokenizer: Any, seq_len: int = 128,
                    limit: int | None = None) -> dict[str, torch.Tensor]:
    """``text`` tokenized (paragraph by paragraph, ids concatenated) and cut into sequences of
    ``seq_len`` tokens (the last partial one dropped): ``{"input_ids": N x seq_len int64,
    "attention_mask": ones}``, the first ``limit`` sequences when given. Raises
    :class:`ConfigError` for ``seq_len`` < 2 and :class:`DataError` when the text has fewer than
    ``seq_len`` tokens. Cost: one tokenizer pass over the text (about 0.5 s per 100,000
    characters with a fast tokenizer)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len={seq_len!r}: give an integer >= 2 (tokens per sequence)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit={limit!r}: give the number of sequences (>= 1) or None")
    paras = [p + "\n\n" for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    ids: list[int] = []
    for chunk in _encode(tokenizer, paras):
        ids.extend(chunk)
        if limit is not None and len(ids) >= limit * seq_len:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one sequence of "
                        f"seq_len={seq_len}: give more text or a smaller seq_len")
    if limit is not None:
        n = min(n, limit)
    x = torch.tensor(ids[:n * seq_len], dtype=torch.int64).view(n, seq_len)
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


def sentences(text: str, min_words: int = 4, max_words: int = 48) -> list[str]:
    """English sentences of ``text``: paragraphs joined into lines, cut after ``.``, ``!`` or
    ``?`` before a capital letter; kept when they have ``min_words``..``max_words`` words and
    are mostly letters (code and tables dropped). Deterministic, in text order. Cost: O(len)."""
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        lines = [ln.strip() for ln in para.splitlines()]
        if any(ln.startswith((">>>", "...", "|", "+-", "*", "=")) for ln in lines if ln):
            continue  # code, tables, rules
        flat = " ".join(ln for ln in lines if ln)
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", flat):
            s = s.strip()
            words = s.split()
            if not min_words <= len(words) <= max_words or not s.endswith((".", "!", "?")):
                continue
            letters = sum(c.isalpha() or c.isspace() for c in s)
            if letters >= 0.85 * len(s):
                out.append(s)
    return out


def sentence_batches(sents: Sequence[str], tokenizer: Any, max_len: int = 64,
                     limit: int | None = None) -> dict[str, torch.Tensor]:
    """Sentences tokenized as one padded batch: ``{"input_ids": N x L int64, "attention_mask":
    N x L}`` (L the longest, at most ``max_len``; longer sentences truncated; the tokenizer's
    special tokens added), the first ``limit`` sentences when given. Raises :class:`DataError`
    for no sentences. Cost: one tokenizer call."""
    sents = list(sents)[:limit] if limit is not None else list(sents)
    if not sents:
        raise DataError("no sentences: the text has no English sentences of 4 to 48 words; "
                        "give more prose")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ConfigError(f"max_len={max_len!r}: give an integer >= 2 (tokens per sentence)")
    enc = tokenizer(sents, padding="longest", truncation=True, max_length=max_len,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(),
            "attention_mask": enc["attention_mask"].long()}


def text_data(topics: Mapping[str, str], tokenizer: Any, task: str = "causal-lm", *,
              seq_len: int = 128, max_len: int = 64, fractions: Sequence[float] = FRACTIONS,
              seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """``{"calib": ..., "heldout": ..., "test": ...}`` for ``task`` from ``topics`` split by
    :func:`split_topics`: ``causal-lm`` -> :func:`token_sequences` of ``seq_len`` tokens,
    ``embedding`` -> :func:`sentence_batches` of :func:`sentences` (at most ``max_len`` tokens).
    Raises :class:`ConfigError` for another task, :class:`DataError` for too little text.
    Cost: one tokenizer pass over all the text (about 2 s for :func:`pydoc_topics`)."""
    name = getattr(task, "name", task)
    if name not in TEXT_TASKS:
        raise ConfigError(f"text data is made for the tasks {list(TEXT_TASKS)}, not {name!r}: "
                          "pass --task causal-lm or --task embedding (or give tokenized data "
                          "of your own with --data pkg.module:factory)")
    out = {}
    for split, text in text_splits(topics, fractions, seed).items():
        try:
            out[split] = (token_sequences(text, tokenizer, seq_len) if name == "causal-lm"
                          else sentence_batches(sentences(text), tokenizer, max_len))
        except DataError as e:
            raise DataError(f"the {split} split: {e}") from None
    return out
