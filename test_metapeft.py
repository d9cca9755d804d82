"""Tests for metapeft. transformers, peft and seqeval appear here only, as reference implementations."""
import errno
import functools
import hashlib
import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load, save, save_file
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import metapeft as mp
import model as model_module
from data import DataError, Example, Sentence
from model import CheckpointError, Config, Model, PeftConfig, atomic_write, fresh_phi, is_head, is_peft, \
    load_lora_adapter, load_peft, load_pretrained, save_lora_adapter, saved_peft_config, theta_phi

torch.set_num_threads(1)  # tiny models gain nothing from threads, and OpenMP stalls badly on a busy shared CPU

# ---------------------------------------------------------------------------------------------- model

TINY = [  # (layers, heads, hidden, intermediate, layer_norm_eps, max_position_embeddings)
    (1, 2, 16, 40, 1e-5, 40),
    (2, 4, 32, 48, 1e-12, 64),
    (3, 1, 24, 30, 1e-5, 130),
]


def hf_config(layers, heads, hidden, inter, eps, max_pos, **kw):
    from transformers import XLMRobertaConfig
    return XLMRobertaConfig(vocab_size=60, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=inter, layer_norm_eps=eps, max_position_embeddings=max_pos, **kw)


def padded_batch(seed=0, vocab=60, lengths=(12, 7, 3, 10)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1], ids[i, n:] = 0, 2, 1  # <s> ... </s> <pad>...
    return ids, ids.ne(1).long()


def hf_token_model(tmp_path, shape, num_labels=5, seed=0):
    from transformers import XLMRobertaForTokenClassification
    torch.manual_seed(seed)
    ref = XLMRobertaForTokenClassification(hf_config(*shape, num_labels=num_labels)).eval()
    ref.save_pretrained(tmp_path / "hf")
    return ref, tmp_path / "hf"


@pytest.mark.parametrize("shape", TINY)
def test_model_parity_with_transformers(tmp_path, shape):
    ref, path = hf_token_model(tmp_path, shape)
    ours = load_pretrained(path).eval()
    ids, mask = padded_batch()
    real = mask.bool()  # padding is not computed: its hidden states are 0
    with torch.no_grad():
        h_ref, h = ref.roberta(ids, attention_mask=mask).last_hidden_state, ours.encoder(ids, mask)
        assert (h - h_ref)[real].abs().max() < 1e-5 and not h[~real].any()
        assert (ours(ids, mask) - ref(ids, attention_mask=mask).logits)[real].abs().max() < 1e-5


@pytest.mark.parametrize("shape", TINY[:2])
def test_model_mlm_parity_and_lossless_roundtrip(tmp_path, shape):
    from transformers import XLMRobertaForMaskedLM
    torch.manual_seed(1)
    ref = XLMRobertaForMaskedLM(hf_config(*shape)).eval()
    ref.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf", mlm=True).eval()
    assert ours.classifier is None  # transformers' default id2label is no head
    ids, mask = padded_batch()
    with torch.no_grad():
        assert (ours.mlm_logits(ids, mask) - ref(ids, attention_mask=mask).logits)[mask.bool()].abs().max() < 1e-5
    ours.save_pretrained(tmp_path / "ours")
    back = XLMRobertaForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(ids, attention_mask=mask).logits - ref(ids, attention_mask=mask).logits).abs().max() < 1e-5
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_model_roundtrips(tmp_path, caplog):
    from transformers import AutoModelForTokenClassification
    ref, path = hf_token_model(tmp_path, TINY[1])
    ids, mask = padded_batch(seed=3)
    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    ours = load_pretrained(path, labels=labels).eval()  # other label names: a fresh head
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["id2label"] == {str(i): l for i, l in enumerate(labels)}
    with caplog.at_level("WARNING"):
        back = AutoModelForTokenClassification.from_pretrained(tmp_path / "ours").eval()
    assert "newly initialized" not in caplog.text and "MISSING" not in caplog.text
    with torch.no_grad():
        assert (back(ids, attention_mask=mask).logits - ours(ids, mask))[mask.bool()].abs().max() < 1e-5
        again = load_pretrained(tmp_path / "ours").eval()
        assert torch.equal(again(ids, mask), ours(ids, mask))  # our save -> our load: bit-identical
    assert again.labels == labels
    assert all(torch.equal(p, q) for p, q in zip(ours.state_dict().values(), again.state_dict().values()))


def test_model_loads_sharded_and_unprefixed_checkpoints(tmp_path):
    ref, path = hf_token_model(tmp_path, TINY[0])
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "config.json").write_text((path / "config.json").read_text())
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        # Old checkpoints: no roberta. prefix, position_ids buffers, a pooler.
        extra = {"embeddings.position_ids": torch.arange(40)[None], "pooler.dense.weight": torch.zeros(16, 16)}
        tensors = {k.removeprefix("roberta."): state[k] for k in part} | (extra if i else {})
        save_file(tensors, str(shard / name))
        weight_map |= {k: name for k in tensors}
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids, mask = padded_batch()
    with torch.no_grad():
        diff = load_pretrained(shard).eval()(ids, mask) - ref(ids, attention_mask=mask).logits
        assert diff[mask.bool()].abs().max() < 1e-5
    save_file(tensors | {keys[0]: state[keys[0]]}, str(shard / name))  # shard 1's first tensor, prefixed, in shard 2
    with pytest.raises(CheckpointError, match=f"00002.safetensors: tensor {keys[0]} is also in .*model-00001-of-00002"):
        load_pretrained(shard)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("roberta.encoder.layer.0.attention.self.key.bias"), "missing tensor(s): roberta.encoder.layer.0.attention.self.key.bias"),
    (lambda s: s.update({"roberta.encoder.layer.0.extra.weight": torch.zeros(2)}), "unexpected tensor(s): roberta.encoder.layer.0.extra.weight"),
    (lambda s: s.update({"roberta.encoder.layer.0.output.dense.bias": torch.zeros(3)}), "wrongly shaped tensor(s): roberta.encoder.layer.0.output.dense.bias (3,) (expected (16,))"),
])
def test_model_bad_checkpoint_names_the_key(tmp_path, edit, message):
    _, path = hf_token_model(tmp_path, TINY[0])
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    edit(state)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_pretrained(path)


PEFTS = [PeftConfig("lora", lora_r=4, lora_targets=("query", "key", "value", "attn_out", "ffn_in", "ffn_out")),
         PeftConfig("lora", lora_r=2, lora_targets=("query", "value")),
         PeftConfig("houlsby", adapter_size=8), PeftConfig("pfeiffer", adapter_size=8, adapter_act="gelu")]


def peft_count(cfg, p):
    """Closed-form PEFT parameter count per placement."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    if p.method == "lora":
        dims = {"query": (H, H), "key": (H, H), "value": (H, H), "attn_out": (H, H), "ffn_in": (H, I), "ffn_out": (I, H)}
        return L * sum(p.lora_r * sum(dims[t]) for t in p.lora_targets)
    per_adapter = 2 * H * p.adapter_size + p.adapter_size + H
    return L * per_adapter * (2 if p.method == "houlsby" else 1)


@pytest.mark.parametrize("peft", PEFTS)
def test_model_fresh_peft_changes_nothing_and_counts_match(tmp_path, peft):
    _, path = hf_token_model(tmp_path, TINY[1])
    base, with_peft = load_pretrained(path).eval(), load_pretrained(path, peft=peft).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(base(ids, mask), with_peft(ids, mask))
    theta, phi = theta_phi(with_peft)
    n_peft = sum(p.numel() for n, p in phi.items() if not n.startswith("classifier."))
    assert n_peft == peft_count(with_peft.cfg, peft) > 0
    assert set(theta) == {n for n, _ in base.named_parameters() if not n.startswith("classifier.")}


def train_a_little(model, steps=5):
    _, phi = theta_phi(model)
    opt = torch.optim.AdamW(phi.values(), lr=1e-2)
    ids, mask = padded_batch(seed=5)
    for _ in range(steps):
        loss = model(ids, mask).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_model_lora_merge_and_peft_save(tmp_path):
    _, path = hf_token_model(tmp_path, TINY[1])
    peft = PEFTS[0]
    model = load_pretrained(path, peft=peft).eval()
    train_a_little(model)
    ids, mask = padded_batch(seed=6)
    with torch.no_grad():
        unmerged = model(ids, mask)
        model.merge_peft()
        assert (model(ids, mask) - unmerged).abs().max() < 1e-5
        model.merge_peft(False)
        assert (model(ids, mask) - unmerged).abs().max() < 1e-5
        unmerged = model(ids, mask)  # unmerging subtracts the update again: equal up to rounding
    model.save_pretrained(tmp_path / "lora")
    model.save_pretrained(tmp_path / "merged", merge_peft=True)
    assert not (tmp_path / "merged" / "peft.safetensors").exists()
    with torch.no_grad():
        again = load_peft(load_pretrained(tmp_path / "lora", peft=peft), tmp_path / "lora").eval()
        assert torch.equal(again(ids, mask), unmerged)
        assert (load_pretrained(tmp_path / "merged").eval()(ids, mask) - unmerged).abs().max() < 1e-5
    with pytest.raises(CheckpointError, match="PEFT config"):
        load_peft(load_pretrained(tmp_path / "lora", peft=PEFTS[1]), tmp_path / "lora")
    adapters = load_pretrained(path, peft=PEFTS[2])
    with pytest.raises(ValueError, match="cannot be merged"):
        adapters.merge_peft()


def test_model_atomic_write_gives_new_files_the_umask_mode_and_fails_cleanly(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.safetensors", lambda f: save_file({"x": torch.zeros(1)}, f))  # safetensors: 0600
    finally:
        os.umask(mask)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644

    def disk_full(f):
        Path(f).write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(CheckpointError, match="b.json: not written \\(No space left on device\\)"):
        atomic_write(tmp_path / "b.json", disk_full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temp file left


def test_model_config_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="missing vocab_size, hidden_size, num_hidden_layers, num_attention_heads, "
                                              "intermediate_size"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(asdict(Config()) | {"hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="hidden_act must be 'gelu'"):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="lora_targets must be among"):
        PeftConfig(lora_targets=("dense",))


def peft_model_from(base, adapter):
    """peft's model for our adapter folder on a transformers checkpoint, failing on any missing or unexpected key."""
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained(base), adapter).eval()
    assert not [w for w in caught if "keys" in str(w.message)], [str(w.message) for w in caught]
    return model


def test_model_lora_exports_to_peft(tmp_path):
    _, path = hf_token_model(tmp_path, TINY[1])
    # attn_out and ffn_out are both "output.dense" in transformers: the export must tell them apart
    peft = PeftConfig("lora", lora_r=4, lora_alpha=6.0, lora_dropout=0.1, lora_targets=("query", "attn_out", "ffn_out"))
    ours = load_pretrained(path, peft=peft)
    train_a_little(ours)  # LoRA B and the head move away from their init (the base checkpoint keeps its own head)
    ours.eval()
    save_lora_adapter(ours, tmp_path / "adapter", base=path)
    theirs = peft_model_from(path, tmp_path / "adapter")
    config = theirs.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.task_type) == (4, 6.0, 0.1, "TOKEN_CLS")
    ids, mask = padded_batch(seed=2)
    with torch.no_grad():
        assert (theirs(input_ids=ids, attention_mask=mask).logits - ours(ids, mask))[mask.bool()].abs().max() < 1e-5
        back = load_lora_adapter(load_pretrained(path, peft=peft), tmp_path / "adapter").eval()
        assert torch.equal(back(ids, mask), ours(ids, mask))


def test_model_imports_a_lora_trained_with_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    ref, path = hf_token_model(tmp_path, TINY[1])
    theirs = get_peft_model(ref, LoraConfig(task_type="TOKEN_CLS", r=2, lora_alpha=5, lora_dropout=0.05,
                                            target_modules=["query", "value"]))
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = padded_batch(seed=5)
    for _ in range(4):
        loss = theirs(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    theirs.save_pretrained(tmp_path / "trained")
    peft = PeftConfig("lora", lora_r=2, lora_alpha=5.0, lora_dropout=0.05, lora_targets=("query", "value"))
    ours = load_lora_adapter(load_pretrained(path, peft=peft), tmp_path / "trained").eval()
    theirs.eval()
    ids, mask = padded_batch(seed=6)
    with torch.no_grad():
        assert (theirs(input_ids=ids, attention_mask=mask).logits - ours(ids, mask))[mask.bool()].abs().max() < 1e-5
    _, other_size = hf_token_model(tmp_path / "other", TINY[2])
    config = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    for folder, change in (("rslora", {"use_rslora": True}), ("narrow", {"target_modules": ["query"]})):
        shutil.copytree(tmp_path / "trained", tmp_path / folder)
        (tmp_path / folder / "adapter_config.json").write_text(json.dumps(config | change))
    for base, cfg, folder, message in [
        (path, replace(peft, lora_r=4), "trained", "lora_r 2 (the model's: 4)"),
        (path, replace(peft, lora_targets=("query", "key", "value")), "trained", "lora_targets ('query', 'value')"),
        (path, replace(peft, lora_dropout=0.0), "trained", "lora_dropout 0.05"),
        (other_size, peft, "trained", "tensor(s): base_model.model."),
        (path, peft, "rslora", "use_rslora=True"),
        (path, peft, "narrow", "LoRA tensors on ['attention.self.value'], which target_modules ['query'] does not name"),
        (path, replace(peft, method="houlsby"), "trained", "holds LoRA and a token-classification head"),
        (path, peft, "nothing", "not a peft adapter folder"),
    ]:
        with pytest.raises(CheckpointError, match=re.escape(message)) as e:
            load_lora_adapter(load_pretrained(base, peft=cfg), tmp_path / folder)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- data

def _write(path, text, newline="\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


def _tokenizer():
    rng = random.Random(0)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ber", "lin", "par", "is"]
    words = ["".join(rng.choices(syll, k=rng.randint(1, 4))) for _ in range(200)]
    texts = [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(400)]
    return data.train_tokenizer(texts, vocab_size=150), words


# ----------------------------------------------------------------------------- readers

def test_data_read_panx_crlf_colons_blank_runs(tmp_path):
    text = "en:New\tB-LOC\nen:York\tI-LOC \n\n\n\nen:http://a:b\tO\nen:Bob\tB-PER"  # no final newline
    p = _write(tmp_path / "test-en.tsv", text, newline="\r\n")
    sents = data.read_ner(p)
    assert sents == [Sentence(["New", "York"], ["B-LOC", "I-LOC"], "en"),
                     Sentence(["http://a:b", "Bob"], ["O", "B-PER"], "en")]


def test_data_read_byte_order_mark_and_spaced_panx(tmp_path):
    p = _write(tmp_path / "train-en.tsv", "\ufeffen:New B-LOC\nen:York  I-LOC\n\nen:a\tO\n")  # spaces for a tab
    assert data.read_ner(p) == [Sentence(["New", "York"], ["B-LOC", "I-LOC"], "en"), Sentence(["a"], ["O"], "en")]
    assert data.read_ner(_write(tmp_path / "b.txt", "\ufeffEU B-ORG\n"))[0].words == ["EU"]


def test_data_read_conll(tmp_path):
    text = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O  \n\n\nPeter NNP B-NP B-PER\n"
    p = _write(tmp_path / "de" / "train.txt", text, newline="\r\n")
    assert data.read_ner(p, "de") == [Sentence(["EU", "rejects"], ["B-ORG", "O"], "de"),
                                      Sentence(["Peter"], ["B-PER"], "de")]
    assert data.read_ner(p)[0].lang == "und"


def test_data_read_jsonl(tmp_path):
    recs = [{"tokens": ["Paris", "is"], "ner_tags": [5, 0], "langs": ["fr", "fr"]},
            {"tokens": ["Ann"], "ner_tags": ["B-PER"], "lang": "fr"},
            {"tokens": ["X"], "ner_tags": [1], "labels": ["O", "B-ORG"]}, {"tokens": [], "ner_tags": []}]
    p = _write(tmp_path / "train.jsonl", "\n\n".join(json.dumps(r) for r in recs))
    assert data.read_ner(p) == [Sentence(["Paris", "is"], ["B-LOC", "O"], "fr"),
                                Sentence(["Ann"], ["B-PER"], "fr"), Sentence(["X"], ["B-ORG"], "fr")]
    assert data.read_ner(p, label_names=["O", "B-A", "I-A", "B-B", "I-B", "B-C", "I-C"])[0].tags == ["B-C", "O"]


def test_data_directory_layouts(tmp_path):
    _write(tmp_path / "flat" / "train-en.tsv", "en:a\tO\n")
    _write(tmp_path / "flat" / "train-de.tsv", "de:b\tB-PER\n")
    _write(tmp_path / "flat" / "dev-fr.tsv", "fr:c\tO\n")
    _write(tmp_path / "nested" / "sw" / "test.conll", "d O\n")
    _write(tmp_path / "nested" / "yo" / "test.jsonl", json.dumps({"tokens": ["e"], "ner_tags": [0]}))
    assert data.languages(tmp_path / "flat", "train") == ["de", "en"]
    assert data.languages(tmp_path / "nested", "test") == ["sw", "yo"]
    assert data.split_path(tmp_path / "flat", "dev", "fr").name == "dev-fr.tsv"
    assert data.read_split(tmp_path / "flat", "train", "de") == [Sentence(["b"], ["B-PER"], "de")]
    assert data.read_split(tmp_path / "nested", "test", "sw") == [Sentence(["d"], ["O"], "sw")]
    assert data.read_split(tmp_path / "nested", "test", "yo") == [Sentence(["e"], ["O"], "yo")]


@pytest.mark.parametrize("name, text, lang, msg", [
    ("a.tsv", "en:a\tO\nen:b\n", None, "a.tsv:2: expected a token and a tag column"),
    ("a2.tsv", "en:a\tO\nb\tO\n", None, "a2.tsv:2: expected a 'lang:' prefix"),
    ("b.txt", "a O\nb B-FOO\n\nc X-PER\n", None, "b.txt:4: tag 'X-PER' is not IOB2"),
    ("c.txt", "a O\nb PER\n", None, "c.txt:2: tag 'PER' is not IOB2"),
    ("d.tsv", "en:a\tO\nde:b\tO\n", None, "d.tsv:2: language 'de' disagrees with 'en'"),
    ("e.tsv", "en:a\tO\n", "fr", "e.tsv:1: language 'en' disagrees with 'fr'"),
    ("f.tsv", "\n\r\n\n", None, "f.tsv: no sentences found"),
    ("g.jsonl", '{"tokens": ["a"], "ner_tags": [9]}\n', None, "g.jsonl:1: tag id 9 outside"),
    ("h.jsonl", '{"tokens": ["a"]}\n', None, "h.jsonl:1: expected a JSON object with 'tokens' and 'ner_tags'"),
    ("i.jsonl", '{"tokens": ["a"], "ner_tags": ["O"], "lang": "de"}', "en", "i.jsonl:1: language 'de' disagrees"),
    ("j.jsonl", '{"tokens": "ab", "ner_tags": [0, 0]}', None, "j.jsonl:1: 'tokens' must be a list of str$"),
    ("k.jsonl", '{"tokens": ["a", "b"], "ner_tags": [0, true]}', None, "k.jsonl:1: 'ner_tags' must be a list of str or int"),
    ("l.jsonl", '{"tokens": ["a"], "ner_tags": [0], "langs": "en"}', None, "l.jsonl:1: 'langs' must be a list of str"),
    ("m.jsonl", '{"tokens": ["a"], "ner_tags": [0], "lang": 5}', None, "m.jsonl:1: 'lang' must be a string"),
    ("n.jsonl", '{"tokens": [], "ner_tags": []}\n' * 2, None, "n.jsonl: no sentences found"),
])
def test_data_bad_input_raises(tmp_path, name, text, lang, msg):
    with pytest.raises(DataError, match=msg) as e:
        data.read_ner(_write(tmp_path / name, text), lang)
    assert "\n" not in str(e.value)


def test_data_validation_is_the_dev_split_in_language_folders(tmp_path):  # a Hugging Face `datasets` export
    rec = lambda word, tag: json.dumps({"tokens": [word], "ner_tags": [tag]})
    _write(tmp_path / "en" / "train.jsonl", rec("a", "O"))
    _write(tmp_path / "en" / "validation.jsonl", rec("b", "B-PER"))
    _write(tmp_path / "de" / "test.jsonl", rec("c", "O"))
    assert data.languages(tmp_path, "dev") == ["en"]
    assert data.languages(tmp_path, "train") == ["en"] and data.languages(tmp_path, "test") == ["de"]
    assert data.split_path(tmp_path, "dev", "en") == tmp_path / "en" / "validation.jsonl"
    assert data.read_split(tmp_path, "dev", "en") == [Sentence(["b"], ["B-PER"], "en")]
    assert data.read_split(tmp_path, "test", "de") == [Sentence(["c"], ["O"], "de")]
    with pytest.raises(DataError, match="no dev split for 'de'"):
        data.read_split(tmp_path, "dev", "de")


@pytest.mark.parametrize("name", ["validation-en.tsv", "validation-en.jsonl", "valid-en.tsv", "val-en.tsv"])
def test_data_validation_is_the_dev_split_in_the_flat_layout(tmp_path, name):
    text = "en:b\tB-PER\n" if name.endswith(".tsv") else json.dumps({"tokens": ["b"], "ner_tags": [1], "lang": "en"})
    _write(tmp_path / name, text)
    _write(tmp_path / "train-en.tsv", "en:a\tO\n")
    _write(tmp_path / "train-de.jsonl", json.dumps({"tokens": ["c"], "ner_tags": [0]}))
    assert data.languages(tmp_path, "dev") == ["en"]
    assert data.languages(tmp_path, "train") == ["de", "en"]
    assert data.read_split(tmp_path, "dev", "en") == [Sentence(["b"], ["B-PER"], "en")]
    assert data.read_split(tmp_path, "train", "de") == [Sentence(["c"], ["O"], "de")]


def test_data_dev_split_under_two_names_is_ambiguous(tmp_path):
    _write(tmp_path / "en" / "dev.tsv", "a O\n")
    _write(tmp_path / "en" / "validation.jsonl", json.dumps({"tokens": ["a"], "ner_tags": [0]}))
    _write(tmp_path / "validation-de.tsv", "de:a\tO\n")
    _write(tmp_path / "de" / "dev.conll", "a O\n")
    assert data.languages(tmp_path, "dev") == ["de", "en"]
    for lang, files in (("en", r"en/dev\.tsv and en/validation\.jsonl"), ("de", r"validation-de\.tsv and de/dev\.conll")):
        with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}: the dev split of '{lang}' is ambiguous: "
                                            rf"{files} \(expected one file\)$"):
            data.read_split(tmp_path, "dev", lang)


def test_data_missing_split_and_unknown_label(tmp_path):
    with pytest.raises(DataError) as e:  # one line naming the folder and the file names looked for
        data.read_split(tmp_path, "dev", "xx")
    assert str(e.value) == (f"no dev split for 'xx' in {tmp_path}; looked for {{dev,validation,valid,val}}-xx."
                            "{tsv,jsonl} and xx/{dev,validation,valid,val}.{tsv,txt,conll,jsonl,json}")
    with pytest.raises(DataError) as e:
        data.split_path(tmp_path, "train", "xx")
    assert str(e.value) == (f"no train split for 'xx' in {tmp_path}; looked for train-xx.{{tsv,jsonl}} and "
                            "xx/train.{tsv,txt,conll,jsonl,json}")
    sents = [Sentence(["a", "b"], ["B-PER", "B-MISC"], "en")]
    with pytest.raises(DataError, match="test-de: sentence 1: label 'B-MISC' is not one of"):
        data.check_labels(sents, ["O", "B-PER", "I-PER"], "test-de")


def test_data_label_list():
    sents = [Sentence(["a"] * 3, ["B-PER", "I-PER", "O"], "en"), Sentence(["a"], ["I-LOC"], "en"),
             Sentence(["a"], ["B-ORG"], "en")]
    assert data.label_list(sents) == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


# ----------------------------------------------------------------------------- tokenizer, alignment

def test_data_tokenizer_specials_and_save_load(tmp_path):
    tok, _ = _tokenizer()
    assert [tok.token_to_id(t) for t in ["<s>", "<pad>", "</s>", "<unk>"]] == [0, 1, 2, 3]
    assert tok.token_to_id("<mask>") == tok.get_vocab_size() - 1
    enc = tok.encode("kalo mine")
    assert enc.ids[0] == 0 and enc.ids[-1] == 2 and tok.decode(enc.ids) == "kalo mine"
    tok.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        assert data.load_tokenizer(path).encode("kalo mine").ids == enc.ids


def test_data_encode_words_keeps_every_word():
    tok, _ = _tokenizer()
    ids, word_ids = data.encode_words(tok, ["kalo", "", "mine"])
    assert sorted(set(word_ids)) == [0, 1, 2] and ids[word_ids.index(1)] == tok.token_to_id("<unk>")
    enc = tok.encode(["kalo", "mine"], is_pretokenized=True, add_special_tokens=False)
    assert data.encode_words(tok, ["kalo", "mine"]) == (enc.ids, enc.word_ids)


def test_data_labels_on_first_subwords_and_windowing():
    tok, vocab = _tokenizer()
    rng = random.Random(1)
    tags = ["O", "B-PER", "I-PER", "B-LOC"]
    sents = [Sentence(ws, [rng.choice(tags) for _ in ws], "en")
             for ws in ([rng.choice(vocab) for _ in range(n)] for n in (5, 17, 60, 1))]
    sents.append(Sentence(["kalo" * 30, "mi"], ["B-PER", "O"], "en"))  # one word longer than a window
    labels = data.label_list(sents)
    l2i = {l: i for i, l in enumerate(labels)}
    for stride in (None, 4):
        exs = data.encode(sents, tok, l2i, max_len=16, stride=stride)
        assert len(exs) > len(sents) and all(len(e.input_ids) <= 16 for e in exs)
        for e in exs:
            assert e.input_ids[0] == 0 and e.input_ids[-1] == 2
            assert len(e.input_ids) == len(e.labels) == len(e.words)
            assert all((lab != -100) == (w >= 0) for lab, w in zip(e.labels, e.words))
        # unwindowed reference: labels exactly on the first subword of each word (tokenizer's word_ids)
        short = data.encode(sents[:1], tok, l2i, max_len=128)[0]
        word_ids = tok.encode(sents[0].words, is_pretokenized=True, add_special_tokens=False).word_ids
        firsts = [j + 1 for j, w in enumerate(word_ids) if j == 0 or word_ids[j - 1] != w]
        assert [j for j, lab in enumerate(short.labels) if lab != -100] == firsts
        assert [short.labels[j] for j in firsts] == [l2i[t] for t in sents[0].tags]
        # feeding gold label ids back as predictions recovers every word's tag exactly once
        got = data.word_predictions(exs, [e.labels for e in exs], [len(s.words) for s in sents], labels)
        assert got == [s.tags for s in sents]


def test_data_word_predictions_detects_gaps():
    ex = Example([0, 5, 2], [-100, 1, -100], 0, [-1, 0, -1])
    with pytest.raises(AssertionError, match="sentence 0 word 1 got no prediction"):
        data.word_predictions([ex], [[0, 1, 0]], [2], ["O", "B-X"])
    with pytest.raises(AssertionError, match="predicted twice"):
        data.word_predictions([ex, ex], [[0, 1, 0]] * 2, [1], ["O", "B-X"])


# ----------------------------------------------------------------------------- batching, episodes

def _examples(n, lo=0, seed=0):
    rng = random.Random(seed)
    return [Example([0] + [lo + rng.randrange(100) for _ in range(k)] + [2], [-100] + [1] * k + [-100], i,
                    [-1] + list(range(k)) + [-1]) for i, k in enumerate(rng.randint(1, 30) for _ in range(n))]


def test_data_collate_padding():
    b = data.collate(_examples(3), pad_id=1)
    lens = b["attention_mask"].sum(1)
    assert b["input_ids"].shape[1] == lens.max() and b["input_ids"].dtype == torch.long
    for row, n in zip(range(3), lens):
        assert (b["input_ids"][row, n:] == 1).all() and (b["labels"][row, n:] == -100).all()
        assert (b["attention_mask"][row, :n] == 1).all() and (b["attention_mask"][row, n:] == 0).all()


def test_data_batches_deterministic_and_complete():
    exs = _examples(1000)
    key = lambda bs: [(b["input_ids"].tolist(), b["labels"].tolist()) for b in bs]
    a = data.batches(exs, 8, 1, shuffle=True, seed=3, epoch=2)
    assert key(a) == key(data.batches(exs, 8, 1, shuffle=True, seed=3, epoch=2))
    assert key(a) != key(data.batches(exs, 8, 1, shuffle=True, seed=3, epoch=3))
    seen = sorted(tuple(r[m.bool()].tolist()) for b in a for r, m in zip(b["input_ids"], b["attention_mask"]))
    assert seen == sorted(tuple(e.input_ids) for e in exs)
    plain = data.batches(exs, 8, 1)
    assert plain[0]["input_ids"][0, :len(exs[0].input_ids)].tolist() == exs[0].input_ids


@pytest.mark.parametrize("pairing", ["cross", "same"])
def test_data_episodes_languages_and_determinism(pairing):
    langs = ["en", "de", "fr", "sw"]  # language k uses token ids [1000k, 1000k + 100)
    by_lang = {l: _examples(40, lo=1000 * (k + 1), seed=k) for k, l in enumerate(langs)}
    lang_of = lambda batch: {langs[int(t) // 1000 - 1] for t in batch["input_ids"][:, 1]}
    cfg = data.EpisodeConfig(source_langs=("en",), query_langs=("de", "fr"), pairing=pairing, tasks_per_step=6)
    eps = data.episodes(by_lang, cfg, pad_id=1, seed=7, step=11)
    assert len(eps) == 6
    for s, q in eps:
        assert s["input_ids"].shape[0] == q["input_ids"].shape[0] == 8
        ls, lq = lang_of(s), lang_of(q)
        assert len(ls) == len(lq) == 1
        if pairing == "cross":
            assert ls == {"en"} and lq <= {"de", "fr"}
        else:
            assert ls == lq and ls <= {"en", "de", "fr"}
            rows = lambda b: {tuple(r.tolist()) for r in b["input_ids"]}
            assert not rows(s) & rows(q)
    same = data.episodes(by_lang, cfg, pad_id=1, seed=7, step=11)
    other = data.episodes(by_lang, cfg, pad_id=1, seed=7, step=12)
    flat = lambda e: [t.tolist() for pair in e for b in pair for t in b.values()]
    assert flat(eps) == flat(same) and flat(eps) != flat(other)
    if pairing == "cross":  # default query_langs = every non-source language
        qs = {l for s, q in data.episodes(by_lang, data.EpisodeConfig(tasks_per_step=40), 1, 0, 0) for l in lang_of(q)}
        assert qs == {"de", "fr", "sw"}


def test_data_episodes_missing_language():
    with pytest.raises(DataError, match="no examples for configured language 'xx'"):
        data.episodes({"en": _examples(20)}, data.EpisodeConfig(query_langs=("xx",)), 1, 0, 0)


# ----------------------------------------------------------------------------- metrics

def test_data_entity_f1_matches_seqeval():
    from seqeval.metrics import classification_report
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
    seq = lambda n: [rng.choice(tags) for _ in range(n)]
    n_seqs = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns on zero division
        for _ in range(400):
            lens = [rng.randint(1, 12) for _ in range(rng.randint(1, 10))]
            gold = [seq(n) for n in lens]
            pred = [g if rng.random() < 0.3 else seq(len(g)) for g in gold]
            n_seqs += len(gold)
            ours = data.entity_f1(gold, pred)
            ref = classification_report(gold, pred, output_dict=True)
            micro = ref.pop("micro avg")
            for k in ("precision", "recall", "f1"):
                assert abs(ours[k] - micro[k if k != "f1" else "f1-score"]) < 1e-12
            types = {t for t in ref if not t.endswith(" avg")}
            assert set(ours["per_type"]) == types
            for t in types:
                o, r = ours["per_type"][t], ref[t]
                assert o["support"] == r["support"]
                assert all(abs(o[k] - r[k if k != "f1" else "f1-score"]) < 1e-12 for k in ("precision", "recall", "f1"))
    assert n_seqs >= 2000


def test_data_entity_f1_edge_cases():
    r = data.entity_f1([["O", "O"]], [["O", "O"]])
    assert (r["precision"], r["recall"], r["f1"], r["per_type"]) == (0.0, 0.0, 0.0, {})
    r = data.entity_f1([["B-PER", "I-PER", "I-LOC"]], [["I-PER", "I-PER", "B-LOC"]])
    assert r["f1"] == 1.0  # a leading I- starts a chunk, a type change ends one
    with pytest.raises(DataError, match="sentence 0 has 2 gold tags but 1 predicted"):
        data.entity_f1([["O", "O"]], [["O"]])
    with pytest.raises(DataError, match="1 gold sentences but 2 predicted"):
        data.entity_f1([["O"]], [["O"], ["O"]])
    assert data.macro_average({"de": {"f1": 0.5}, "fr": {"f1": 0.7}}) == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------------- testbed

_TINY = dict(n_unlabeled=150, n_parallel=40, n_codeswitch=30, n_train=120, n_dev=30, n_test=40)


def _files(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def _panx(path):
    """Tiny PAN-X parser: list of (lang, [(token, tag)])."""
    sents, cur = [], []
    for ln in open(path, encoding="utf-8").read().split("\n"):
        if not ln:
            if cur:
                sents.append(cur)
            cur = []
            continue
        tok, tag = ln.split("\t")
        lang, w = tok.split(":", 1)
        assert w and not any(c.isspace() for c in w)
        cur.append((lang, w, tag))
    assert not cur, "file must end with a blank line"
    return sents


def _script(w):
    for c in w:
        o = ord(c)
        if 0x400 <= o < 0x500:
            return "cyrl"
        if 0x3040 <= o < 0x3100:
            return "kana"
        if c.isalpha() and o < 0x250:
            return "latin"
    return None


def test_testbed_deterministic_and_seed_dependent(tmp_path):
    for d, seed in (("a", 3), ("b", 3), ("c", 4)):
        data.make_world(tmp_path / d, data.WorldConfig(seed=seed, **_TINY))
        data.write_tokenizer(tmp_path / d, vocab_size=600)  # the raw Unigram trainer differs run to run
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    cfg = data.WorldConfig()
    assert sorted(a) == sorted([f"{s}-{l}.tsv" for s in ("train", "dev", "test") for l in cfg.languages
                                if s != "test" or l not in cfg.priming_only] + ["tokenizer.json", "unlabeled.txt"])
    assert a == b
    assert sorted(a) == sorted(c) and all(a[f] != c[f] for f in a)


def test_testbed_panx_format_iob2_types_scripts(tmp_path):
    cfg = data.WorldConfig(**_TINY)
    data.make_world(tmp_path, cfg)
    scripts, ent_words = {}, {}
    for split, n in (("train", cfg.n_train), ("dev", cfg.n_dev), ("test", cfg.n_test)):
        for lang in [l for l in cfg.languages if split == "train" or l not in cfg.priming_only]:
            sents = _panx(tmp_path / f"{split}-{lang}.tsv")
            assert len(sents) == n
            types = set()
            for s in sents:
                prev = "O"
                for lg, w, tag in s:
                    assert lg == lang
                    assert tag == "O" or tag[:2] in ("B-", "I-") and tag[2:] in ("PER", "ORG", "LOC"), tag
                    if tag.startswith("I-"):
                        assert prev[2:] == tag[2:], (prev, tag)       # valid IOB2
                    if tag.startswith("B-"):
                        types.add(tag[2:])
                    prev = tag
                    scripts.setdefault(lang, set()).add(_script(w))
                    if tag != "O" and split == "train":
                        ent_words.setdefault(lang, set()).add(w)
            if split == "train":
                assert types == {"PER", "ORG", "LOC"}, (lang, types)
    assert "latin" in scripts["en"] and "cyrl" in scripts["ru"] and "kana" in scripts["ja"]
    assert len({sc for ss in scripts.values() for sc in ss if sc}) >= 3
    # names shared verbatim between Latin-script languages, transliterated elsewhere
    assert len(ent_words["en"] & ent_words["de"]) > 20
    assert len(ent_words["en"] & ent_words["tr"]) > 10
    cyr = [w for w in ent_words["ru"] if _script(w) == "cyrl"]
    assert len(cyr) > len(ent_words["ru"]) / 2
    assert data._translit("Sasha", "cyrl") == "Сасха" and data._translit("Tokimo", "kana") == "トキモ"
    # unlabeled: all languages, parallel lines mixing scripts, code-switched lines
    unl = open(tmp_path / "unlabeled.txt", encoding="utf-8").read().splitlines()
    assert len(unl) == len(cfg.languages) * (cfg.n_unlabeled + cfg.n_codeswitch) + (len(cfg.languages) - 1) * cfg.n_parallel
    mixed = [x for x in unl if len({_script(w) for w in x.split()} - {None}) >= 2]
    assert len(mixed) > cfg.n_parallel
    assert all(x.strip() and "\t" not in x for x in unl)


def test_testbed_tokenizer_xlmr_specials(tmp_path):
    data.make_world(tmp_path, data.WorldConfig(**_TINY))
    tok = data.write_tokenizer(tmp_path, vocab_size=600)
    assert os.path.exists(tmp_path / "tokenizer.json")
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert tok.token_to_id("<mask>") == tok.get_vocab_size() - 1
    enc = tok.encode("Duhelaim Nagis ДКГ ゲトレグラム 1920 .")
    assert enc.ids[0] == 0 and enc.ids[-1] == 2


# ---------------------------------------------------------------------------------------------- priming

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
TINY_CFG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_model(method="lora", dtype=torch.float64, seed=0):
    """A tiny model whose phi is random (not the no-op init), so every second-order path carries signal."""
    torch.manual_seed(seed)
    model = Model(Config(**TINY_CFG), NER_LABELS, PeftConfig(method=method, lora_r=2, adapter_size=4)).to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_peft(n) or is_head(n):
                p.normal_(std=0.3)
    return model


def prime_cfg(**kw):
    """A PrimeConfig of one second-order SGD step on the whole support batch, unless kw says otherwise: the tests'
    base case (the dataclass's defaults are the recipe for real runs)."""
    return mp.PrimeConfig(**{"inner_opt": "sgd", "inner_steps": 1, "inner_lr": 1e-3, "first_order": False,
                             "support_batches": 1} | kw)


def random_batch(gen, size=3, length=7):
    ids = torch.randint(3, TINY_CFG["vocab_size"], (size, length), generator=gen)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[0, -3:] = torch.tensor([2, 1, 1])  # one shorter, padded row
    labels = torch.randint(len(NER_LABELS), ids.shape, generator=gen).masked_fill(ids <= 2, data.IGNORE)
    return {"input_ids": ids, "attention_mask": ids.ne(1).long(), "labels": labels}


def task(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return random_batch(gen), random_batch(gen)


def grads(loss, tensors):
    return [g.to_dense() for g in torch.autograd.grad(loss, list(tensors))]  # meta_loss's embedding one is sparse


def max_diff(xs, ys):
    return max((x - y).abs().max().item() for x, y in zip(xs, ys, strict=True))


# ----------------------------------------------------------------------------- meta-gradients

@pytest.mark.parametrize("method,K,meta_sgd,opt", [("lora", 1, False, "sgd"), ("lora", 2, True, "sgd"),
                                                   ("houlsby", 1, True, "sgd"), ("houlsby", 2, False, "sgd"),
                                                   ("lora", 3, False, "adam"), ("houlsby", 2, True, "adam")])
def test_prime_second_order_matches_finite_differences(method, K, meta_sgd, opt):
    model = tiny_model(method)
    # Adam's step is about lr * sign(g) where |g| >> eps: too curved for finite differences at the tiny model's
    # ~1e-3 gradients unless eps is large (test_prime_inner_adam_is_torch_adamw checks the step at eps 1e-8).
    cfg = prime_cfg(inner_steps=K, inner_lr=0.5 if opt == "sgd" else 0.05, meta_sgd=meta_sgd, outer="theta+phi",
                         phi_start="meta", inner_opt=opt, inner_eps=0.1, inner_weight_decay=0.1)
    support, query = task()
    x = [*theta_phi(model), mp.make_inner_lrs(model, cfg) or {}]  # the meta-parameters: theta, phi0, inner lrs

    def f(x, config=cfg):  # the whole inner-loop-then-query-loss function
        return mp.task_loss(model, x[0], x[1], support, query, config, x[2] or None)

    flat = [t for group in x for t in group.values()]
    exact, first_order = grads(f(x), flat), grads(f(x, replace(cfg, first_order=True)), flat)
    gen = torch.Generator().manual_seed(2)
    for probe in ((0,), (1, 2)):  # a random direction in theta, then one in (phi0, inner lrs)
        d = [{n: torch.randn(t.shape, generator=gen, dtype=t.dtype) * (i in probe) for n, t in group.items()}
             for i, group in enumerate(x)]
        moved = lambda eps: [{n: t + eps * d[i][n] for n, t in group.items()} for i, group in enumerate(x)]
        fd = (f(moved(1e-6)).item() - f(moved(-1e-6)).item()) / 2e-6
        along_d = lambda g: sum((gi * di).sum() for gi, di in zip(g, [v for group in d for v in group.values()]))
        assert abs(along_d(exact) - fd) < 1e-4 * abs(fd), (along_d(exact), fd)
        assert abs(along_d(first_order) - fd) > 1e-3 * abs(fd)  # the probe does see the second-order terms


def torch_inner_loop(model, theta, phi0, supports, cfg):
    """phi after cfg.inner_steps steps of torch's own SGD / AdamW on leaf copies of phi0 (no graph to phi0), cycling
    through the batches `supports`."""
    phi = {n: p.detach().clone().requires_grad_() for n, p in phi0.items()}
    opt = torch.optim.SGD(phi.values(), cfg.inner_lr) if cfg.inner_opt == "sgd" else \
        mp.make_optimizer(phi, cfg.inner_lr, cfg.inner_weight_decay)
    for k in range(cfg.inner_steps):
        opt.zero_grad()
        mp.ce_loss(model, {**theta, **phi}, supports[k % len(supports)]).backward(inputs=list(phi.values()))
        opt.step()
    return phi


@pytest.mark.parametrize("opt,K,n", [("sgd", 2, 1), ("adam", 10, 2)])
def test_prime_first_order_is_query_gradient_at_adapted_phi(opt, K, n):
    """The first-order meta-gradient is the query gradient at phi adapted by torch's own optimizer, here with n
    support batches (one batch of n x 3 rows for task_loss) used in turn by the inner steps."""
    model = tiny_model()
    cfg = prime_cfg(inner_steps=K, inner_lr=0.5 if opt == "sgd" else 0.02, first_order=True, outer="theta+phi",
                         phi_start="meta", inner_opt=opt, support_batches=n)
    gen = torch.Generator().manual_seed(1)
    supports, query = [random_batch(gen) for _ in range(n)], random_batch(gen)
    support = {k: torch.cat([b[k] for b in supports]) for k in query}
    theta, phi0 = theta_phi(model)
    got = grads(mp.task_loss(model, theta, phi0, support, query, cfg), [*theta.values(), *phi0.values()])
    phi = torch_inner_loop(model, theta, phi0, supports, cfg)
    want = grads(mp.ce_loss(model, {**theta, **phi}, query), [*theta.values(), *phi.values()])
    # phi0's part passes straight through, times AdamW's decay factor (1 - lr wd) per step on matrices
    decay = (1 - cfg.inner_lr * cfg.inner_weight_decay) ** K if opt == "adam" else 1
    want = [*want[:len(theta)], *(w * decay if w.ndim >= 2 else w for w in want[len(theta):])]
    assert max_diff(got, want) < 1e-10


def test_prime_inner_adam_is_torch_adamw():
    """K functional inner AdamW steps give torch.optim.AdamW's parameters (matrices decay, vectors do not), also
    where a gradient is exactly zero (as a fresh LoRA A's), and from there a finite meta-gradient; their derivatives
    (w.r.t. the start, every gradient and the lr) match finite differences."""
    gen = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(4, 3, generator=gen, dtype=torch.float64), "b": torch.randn(3, generator=gen, dtype=torch.float64)}
    cfg = prime_cfg(inner_opt="adam", inner_lr=0.1, inner_betas=(0.8, 0.99), inner_eps=1e-6, inner_weight_decay=0.3)
    ref = {n: p.clone() for n, p in start.items()}
    opt = mp.make_optimizer(ref, cfg.inner_lr, cfg.inner_weight_decay)
    for group in opt.param_groups:
        group.update(betas=cfg.inner_betas, eps=cfg.inner_eps)
    ours, moments = list(start.values()), None
    for t in range(1, 6):
        g = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) * (t > 1) for n, p in start.items()}
        for n, p in ref.items():
            p.grad = g[n]
        opt.step()
        ours, moments = mp.inner_update(ours, list(g.values()), [cfg.inner_lr] * 2, moments, t, cfg)
    assert max_diff(ours, ref.values()) < 1e-14

    def k_steps(p, lr, *gs):
        moments = None
        for t, g in enumerate(gs, 1):
            (p,), moments = mp.inner_update([p], [g], [lr], moments, t, replace(cfg, inner_eps=1e-8))
        return p
    inputs = [torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(4)]
    assert torch.autograd.gradcheck(k_steps, (inputs[0], torch.tensor(0.1, dtype=torch.float64, requires_grad=True),
                                              *inputs[1:]), rtol=1e-4)
    model = tiny_model()  # a fresh phi: LoRA B = 0, so A's first inner gradient is zero (sqrt's gradient at 0)
    theta = theta_phi(model)[0]
    cfg = prime_cfg(inner_steps=2, inner_opt="adam", inner_lr=2e-3)
    g = grads(mp.task_loss(model, theta, fresh_phi(model), *task(), cfg), theta.values())
    assert all(x.isfinite().all() for x in g) and max(x.abs().max() for x in g) > 0


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_prime_truncated_backprop(opt):
    """inner_backprop = K is full second order; N < K makes the first K - N steps first order: for SGD, the
    full second-order gradient of N steps from phi_{K-N} = phi0 + (a constant)."""
    model = tiny_model()
    cfg = prime_cfg(inner_steps=3, inner_lr=0.5 if opt == "sgd" else 0.05, outer="theta+phi", phi_start="meta",
                         inner_opt=opt)
    support, query = task()
    theta, phi0 = theta_phi(model)
    params = [*theta.values(), *phi0.values()]
    full = grads(mp.task_loss(model, theta, phi0, support, query, cfg), params)
    assert max_diff(full, grads(mp.task_loss(model, theta, phi0, support, query, replace(cfg, inner_backprop=3)),
                                params)) == 0
    truncated = grads(mp.task_loss(model, theta, phi0, support, query, replace(cfg, inner_backprop=1)), params)
    assert max_diff(full, truncated) > 1e-3
    if opt == "sgd":
        shift = {n: torch_inner_loop(model, theta, phi0, [support], replace(cfg, inner_steps=2))[n].detach() - p.detach()
                 for n, p in phi0.items()}
        last = mp.task_loss(model, theta, {n: p + shift[n] for n, p in phi0.items()}, support, query,
                            replace(cfg, inner_steps=1))
        assert max_diff(truncated, grads(last, params)) < 1e-10


@pytest.mark.parametrize("mode", ["prime", "maml"])
def test_prime_inner_loop_adapts_phi_only_and_never_writes_the_model(mode, monkeypatch):
    model = tiny_model()
    before = {n: (p.detach().clone(), p._version) for n, p in model.named_parameters()}
    passes, ce_loss = [], mp.ce_loss
    monkeypatch.setattr(mp, "ce_loss", lambda m, params, b: passes.append(params) or ce_loss(m, params, b))
    cfg = prime_cfg(mode=mode, inner_steps=2, inner_lr=0.5, outer="theta+phi", phi_start="meta")
    mp.meta_loss(model, [task()], cfg).backward()
    adapted, (theta, phi) = passes[-1], theta_phi(model)  # the last pass is the query's
    for n, t in theta.items():
        assert adapted[n] is t if mode == "prime" else not torch.equal(adapted[n], t), n
    assert all(not torch.equal(adapted[n], p) for n, p in phi.items())
    assert all(torch.equal(p, before[n][0]) and p._version == before[n][1] for n, p in model.named_parameters())


def test_prime_zero_inner_steps_is_multitask_on_the_query_batches():
    """meta_loss(prime, K=0, phi0 = the model's phi) on [(S_i, Q_i)] has the gradient (w.r.t. theta and phi) of
    multitask training on the query batches alone, i.e. meta_loss(multitask) on [(Q_i, Q_i)]."""
    model = tiny_model()
    tasks = [task(1), task(2)]
    params = list(model.parameters())
    prime = grads(mp.meta_loss(model, tasks, prime_cfg(inner_steps=0, phi_start="meta")), params)
    multitask = grads(mp.meta_loss(model, [(q, q) for _, q in tasks], prime_cfg(mode="multitask")), params)
    assert max_diff(prime, multitask) < 1e-10


@pytest.mark.parametrize("mode", ["prime", "multitask", "maml"])
def test_prime_word_embedding_gradient_is_row_sparse_and_steps_are_exact(mode):
    """meta_loss gives the word embeddings a row-sparse gradient (dense in maml, whose inner loop adapts them) with
    the numbers of the dense one, nonzero on the meta-batch's tokens only; step() then takes the same AdamW steps."""
    cfg = prime_cfg(mode=mode, inner_steps=1, inner_lr=0.5, phi_start="meta", lr=1e-2)
    tasks = [task(1), task(2)]

    def dense_loss(model):  # meta_loss written out without it
        theta, phi = theta_phi(model)
        if mode == "multitask":
            return sum(mp.ce_loss(model, {**theta, **phi}, b) for t in tasks for b in t) / 4
        if mode == "maml":
            return sum(mp.task_loss(model, theta, phi, s, q, cfg) for s, q in tasks) / 2
        support, query = (mp.stack_tasks(batches, model.cfg.pad_token_id) for batches in zip(*tasks))  # as meta_loss
        return mp.task_loss(model, theta, {n: torch.stack([p, p]) for n, p in phi.items()}, support, query, cfg).mean()

    models = [tiny_model(), tiny_model()]
    params = [mp.outer_params(m, cfg) for m in models]
    name = "encoder.word_embeddings.weight"
    got = torch.autograd.grad(mp.meta_loss(models[0], tasks, cfg), list(params[0].values()))
    want = grads(dense_loss(models[0]), params[0].values())
    assert got[list(params[0]).index(name)].is_sparse == (mode != "maml")
    assert not models[0].encoder.word_embeddings.sparse  # only while meta_loss runs
    assert max_diff([g.to_dense() for g in got], want) < 1e-12
    rows = want[list(params[0]).index(name)].abs().sum(1).nonzero().flatten()
    assert set(rows.tolist()) <= {i for t in tasks for b in t for i in b["input_ids"].flatten().tolist()} - {1}
    opts = [mp.make_optimizer(p, cfg.lr, cfg.weight_decay) for p in params]
    scheds = [mp.make_scheduler(o, 0, 10) for o in opts]
    for _ in range(3):
        norms = [mp.step(loss, p, o, s, 0.01) for loss, p, o, s in
                 zip((mp.meta_loss(models[0], tasks, cfg), dense_loss(models[1])), params, opts, scheds)]
        assert norms[0] == pytest.approx(norms[1], rel=1e-12)
    assert max_diff(*(list(m.parameters()) for m in models)) < 1e-12


def test_prime_adamw_row_sparse_step_is_the_dense_step():
    """make_optimizer's AdamW on a row-sparse gradient (blocks of 3 rows here; a row given twice) is, bit for bit,
    torch's fused AdamW on the dense gradient: untouched rows decay too."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(10, 4, generator=gen)
    ours, ref = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt, want = mp.make_optimizer({"w": ours}, 0.1, 0.3), torch.optim.AdamW([ref], lr=0.1, weight_decay=0.3, fused=True)
    opt.block_bytes = 3 * 4 * 4
    for rows in ([1, 4, 1, 5], [9], [0, 1, 2, 3]):
        ours.grad = torch.sparse_coo_tensor(torch.tensor([rows]), torch.randn(len(rows), 4, generator=gen), (10, 4),
                                            check_invariants=True)
        ref.grad = ours.grad.to_dense()
        opt.step()
        want.step()
        assert torch.equal(ours, ref)
    assert not torch.equal(ours[7], start[7])  # never in a gradient, yet decayed
    assert all(torch.equal(opt.state[ours][k], want.state[ref][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_all_reduce_sums_every_tensor_small_ones_together():
    """step's gradient sum over processes: a tensor of `small` elements or more in a collective of its own, in
    place; the smaller ones in one collective per dtype. Every tensor comes back summed."""
    calls = []

    def as_two_processes(t):  # two processes holding the same tensors would sum to twice each
        calls.append((t.dtype, t.numel(), t))
        t.mul_(2)
    f64 = dict(dtype=torch.float64)
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(30, **f64), torch.randn(7), torch.randn(40, 2),
               torch.randn(3, **f64), torch.randn(2, 2)]
    before = [t.clone() for t in tensors]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mp.dist, "all_reduce", as_two_processes)
        mp.all_reduce_(tensors, small=20)
    assert all(torch.equal(t, 2 * b) for t, b in zip(tensors, before))
    assert [c[:2] for c in calls] == [(torch.float64, 30), (torch.float32, 80), (torch.float32, 28),
                                      (torch.float64, 3)]
    assert calls[0][2] is tensors[2] and calls[1][2] is tensors[4]


def test_prime_attention_kernels(monkeypatch):
    """Fused SDPA has no double backward; second order runs the support passes on the math kernel, first order
    and the query pass keep the default (fused) kernels, and the kernel choice does not change the numbers."""
    model = tiny_model()
    support, query = task()
    theta, phi = theta_phi(model)
    with pytest.raises(RuntimeError, match="derivative for .*flash_attention.* is not implemented"):
        g = torch.autograd.grad(mp.ce_loss(model, {**theta, **phi}, support), list(phi.values()), create_graph=True)
        grads(sum((x * x).sum() for x in g), theta.values())

    fused_enabled, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: fused_enabled.append(torch.backends.cuda.flash_sdp_enabled()) or sdpa(*a, **k))
    params = list(model.parameters())
    for first_order, expected in ((False, [False, False, True, True]), (True, [True] * 4)):
        cfg = prime_cfg(inner_steps=1, inner_lr=0.5, first_order=first_order, phi_start="meta")
        fused_enabled.clear()
        auto = grads(mp.task_loss(model, theta, phi, support, query, cfg), params)
        assert fused_enabled == expected  # two layers: support pass, then query pass
        with sdpa_kernel([SDPBackend.MATH]):
            math = grads(mp.task_loss(model, theta, phi, support, query, cfg), params)
        assert max_diff(auto, math) < 1e-6


# ----------------------------------------------------------------------------- task-batched meta-step
# meta_loss runs its tasks' inner loops as one (a leading task dimension); each task alone (a meta-batch of one) is
# the reference: the same meta-gradient within 1e-5 relative, whatever the options (in float64: the tiny model's
# float32 meta-gradient is itself ill-conditioned, ~25% from its float64 value, one path or the other).

def uneven_tasks(seeds=(1, 2, 3)):
    """Tasks whose batches differ in width and token count (the batched path pads them), one with fewer query rows."""
    tasks = []
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        support, query = random_batch(gen, size=4, length=6 + i), random_batch(gen, size=3 - (i == 1), length=9 - i)
        tasks.append((support, query))
    return tasks


BATCHED_CASES = [dict(method=m, inner_opt=o, **order, **start) for m in ("lora", "houlsby", "pfeiffer")
                 for o in ("sgd", "adam")
                 for order in (dict(first_order=True), dict(first_order=False), dict(first_order=False, inner_backprop=1))
                 for start in (dict(phi_start="fresh"), dict(phi_start="meta", outer="theta+phi", meta_sgd=True))]
BATCHED_CASES += [dict(method="lora", mode="maml", inner_opt=o, first_order=f) for o in ("sgd", "adam") for f in (True, False)]


@pytest.mark.parametrize("case", BATCHED_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_prime_batched_meta_gradient_is_each_tasks_own(case):
    case = dict(case)
    model = tiny_model(case.pop("method"))
    cfg = prime_cfg(inner_steps=2, support_batches=2, inner_lr=0.1 if case["inner_opt"] == "sgd" else 0.01, **case)
    tasks, seeds = uneven_tasks(), [11, 12, 13]
    inner_lrs = mp.make_inner_lrs(model, cfg)
    params = list(mp.outer_params(model, cfg, inner_lrs).values())
    batched = grads(mp.meta_loss(model, tasks, cfg, inner_lrs, seeds), params)
    one_at_a_time = []
    for task_, seed in zip(tasks, seeds):  # as train.py did before: reseed, then a meta-batch of one
        torch.manual_seed(seed)
        one_at_a_time.append(grads(mp.meta_loss(model, [task_], cfg, inner_lrs) / len(tasks), params))
    want = [sum(g) for g in zip(*one_at_a_time)]
    scale = max(g.abs().max().item() for g in want)
    assert scale > 0 and max_diff(batched, want) <= 1e-5 * scale


def test_prime_batched_forward_is_each_tasks_own():
    """The encoder with a task dimension gives each task's logits, phi its own (T LoRAs and heads)."""
    model = tiny_model().eval()
    theta, _ = theta_phi(model)
    phis = [fresh_phi(model, seed) for seed in (1, 2, 3)]
    for phi in phis:
        for n, p in phi.items():
            p.data.normal_(std=0.3)
    queries = [q for _, q in uneven_tasks()]
    stacked = mp.stack_tasks(queries, 1)
    logits = functional_call(model, {**theta, **{n: torch.stack([p[n] for p in phis]) for n in phis[0]}},
                             (stacked["input_ids"], stacked["attention_mask"]))
    for t, (q, phi) in enumerate(zip(queries, phis)):
        alone = functional_call(model, {**theta, **phi}, (q["input_ids"], q["attention_mask"]))
        rows, width = q["input_ids"].shape
        real = q["attention_mask"].bool()
        assert (logits[t, :rows, :width][real] - alone[real]).abs().max() < 1e-12


def test_prime_fresh_phi_from_a_seed_is_the_reseeded_draw():
    model = tiny_model()
    torch.manual_seed(7)
    reseeded = fresh_phi(model)
    assert all(torch.equal(reseeded[n], p) for n, p in fresh_phi(model, 7).items())


def test_prime_refuses_a_support_batch_smaller_than_support_batches():
    support, query = task()  # 3 rows
    with pytest.raises(ValueError, match=r"^the support batch has 3 rows, fewer than support_batches=4$"):
        mp.meta_loss(tiny_model(), [(support, query)], prime_cfg(support_batches=4))


# ----------------------------------------------------------------------------- helpers

def test_prime_config_validation():
    for bad in (dict(mode="reptile"), dict(outer="phi"), dict(phi_start="zero"), dict(inner_steps=-1),
                dict(outer="theta+phi"), dict(mode="multitask", meta_sgd=True), dict(inner_steps=0, meta_sgd=True),
                dict(inner_opt="lion"), dict(inner_steps=2, inner_backprop=3), dict(inner_backprop=-1),
                dict(inner_steps=2, inner_backprop=1, first_order=True), dict(support_batches=0)):
        with pytest.raises(ValueError):
            mp.PrimeConfig(**bad)
    with pytest.raises(ValueError, match="none"):
        mp.meta_loss(tiny_model(), [task()], mp.PrimeConfig(mode="none"))


def test_prime_outer_update_helpers():
    model = tiny_model()
    cfg = prime_cfg(freeze_embeddings=True, meta_sgd=True, inner_lr=0.1, lr=1e-2, warmup=2)
    lrs = mp.make_inner_lrs(model, cfg)
    assert set(lrs) == {n for n in dict(model.named_parameters()) if is_peft(n) or is_head(n)}
    params = mp.outer_params(model, cfg, lrs)
    theta, phi = theta_phi(model)
    assert not any(n.startswith("encoder.") and "layers" not in n for n in params)  # embeddings frozen
    assert not set(phi) & set(params) and len(params) == len(theta) - 5 + len(lrs)  # 3 embeddings + LayerNorm w, b
    sched_lrs = []
    opt = mp.make_optimizer(params, cfg.lr, cfg.weight_decay)
    sched = mp.make_scheduler(opt, cfg.warmup, total=4)
    assert [len(g["params"]) for g in opt.param_groups] == [sum(p.ndim >= 2 for p in params.values()),
                                                            sum(p.ndim < 2 for p in params.values())]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(4):
        sched_lrs.append(opt.param_groups[0]["lr"])
        norm = mp.step(mp.meta_loss(model, [task()], cfg, lrs), params, opt, sched, cfg.clip)
        assert norm > 0 and all(p.grad is None for p in model.parameters())
    assert sched_lrs == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in params), n  # phi (fresh each task) and embeddings untouched
    assert all(lrs[n].item() != cfg.inner_lr for n in phi if "lora_A" not in n)  # learned (a fresh A has no grad)


def test_prime_mlm_masking():
    torch.manual_seed(0)
    model = Model(Config(**TINY_CFG), mlm=True)
    ids = torch.randint(3, TINY_CFG["vocab_size"] - 1, (400, 30))
    ids[:, 0], ids[:, -1], ids[:50, -5], ids[:50, -4:] = 0, 2, 2, 1  # 50 padded rows
    batch = {"input_ids": ids, "attention_mask": ids.ne(1).long()}
    seen, mask_id = [], TINY_CFG["vocab_size"] - 1
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    losses = [mp.mlm_loss(model, batch, mask_id, TINY_CFG["vocab_size"], torch.Generator().manual_seed(7)) for _ in "ab"]
    assert losses[0].item() == losses[1].item() and torch.equal(*seen)  # the generator alone decides the masking
    inputs, real = seen[0], ids > 2
    assert torch.equal(inputs[~real], ids[~real])  # <s>, <pad>, </s> are never touched
    masked, replaced = (inputs == mask_id).float().sum() / real.sum(), (inputs != ids).float().sum() / real.sum()
    assert abs(masked - 0.12) < 0.01 and abs(replaced - 0.135) < 0.01  # 15% * 80%; 15% * (80% + 10% * 49/50)
    empty = {"input_ids": torch.tensor([[0, 2, 1]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    assert mp.mlm_loss(model, empty, mask_id, TINY_CFG["vocab_size"], torch.Generator()).item() == 0.0


# ----------------------------------------------------------------------------- a short priming run

def world(seed=0):
    """Three toy languages: own function words and entity cues ("mr"/"in" analogues), shared entity names."""
    rng = random.Random(seed)
    word = lambda syl: "".join(rng.choices(syl, k=rng.randint(1, 3)))
    names = {t: [[word(["Ka", "Lo", "Mi", "Ne", "Ru", "To"]) + word(["ra", "si", "on"])
                  for _ in range(rng.randint(1, 2))] for _ in range(30)] for t in ("PER", "LOC")}
    langs = {}
    for lang, syl in (("aa", ["ba", "de", "fi", "go"]), ("bb", ["zu", "xe", "wi", "qo"]), ("cc", ["ty", "py", "ly"])):
        lexicon, cue = [word(syl) for _ in range(40)], {t: word(syl) + "x" for t in names}
        sents = []
        for _ in range(160):
            words, tags = [], []
            for _ in range(rng.randint(2, 6)):
                if rng.random() < 0.3:
                    t = rng.choice(list(names))
                    name = rng.choice(names[t])
                    words += [cue[t], *name]
                    tags += ["O", f"B-{t}"] + [f"I-{t}"] * (len(name) - 1)
                else:
                    words.append(rng.choice(lexicon))
                    tags.append("O")
            sents.append(data.Sentence(words, tags, lang))
        langs[lang] = sents
    return langs


def test_prime_short_run_lowers_query_loss_and_saves(tmp_path):
    langs = world()
    tok = data.train_tokenizer([" ".join(s.words) for ss in langs.values() for s in ss], vocab_size=250)
    pad = tok.token_to_id("<pad>")
    label2id = {l: i for i, l in enumerate(NER_LABELS)}
    train = {l: data.encode(s[:120], tok, label2id, max_len=32) for l, s in langs.items()}
    held = {l: data.encode(s[120:], tok, label2id, max_len=32) for l, s in langs.items()}
    torch.manual_seed(0)
    Model(Config(**{**TINY_CFG, "vocab_size": tok.get_vocab_size()})).save_pretrained(tmp_path / "plm")
    model = load_pretrained(tmp_path / "plm", labels=NER_LABELS, peft=PeftConfig(lora_r=4))
    cfg = prime_cfg(inner_lr=0.3, lr=3e-3, warmup=3)
    episodes = data.EpisodeConfig(source_langs=("aa",), support_size=8, query_size=8, tasks_per_step=2)
    held_out = data.episodes(held, episodes, pad, seed=1, step=0)

    def held_out_loss():
        torch.manual_seed(123)  # the same fresh phi draws before and after priming
        return mp.meta_loss(model, held_out, cfg).item()

    before, steps = held_out_loss(), 30
    params = mp.outer_params(model, cfg)
    opt = mp.make_optimizer(params, cfg.lr, cfg.weight_decay)
    sched = mp.make_scheduler(opt, cfg.warmup, steps)
    for t in range(steps):
        mp.step(mp.meta_loss(model, data.episodes(train, episodes, pad, seed=0, step=t), cfg), params, opt, sched,
                cfg.clip)
    after = held_out_loss()
    assert after < 0.8 * before, (before, after)

    sents = langs["bb"][120:]
    scores = mp.evaluate(model, held["bb"], sents, NER_LABELS, pad)
    assert 0.0 <= scores["f1"] <= 1.0 and set(scores) == {"precision", "recall", "f1", "per_type"}

    model.save_pretrained(tmp_path / "primed")
    ids = data.batches(held["cc"], 8, pad)[0]
    x = (ids["input_ids"], ids["attention_mask"])
    reloaded = load_peft(load_pretrained(tmp_path / "primed", peft=PeftConfig(lora_r=4)), tmp_path / "primed")
    with torch.no_grad():
        assert torch.allclose(reloaded(*x), model(*x), atol=1e-6)
        transformers = pytest.importorskip("transformers")
        hf = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "primed").eval()
        ours = load_pretrained(tmp_path / "primed").eval()  # the encoder and head alone, as Hugging Face sees them
        real = x[1].bool()  # padding is not computed
        assert torch.allclose(ours(*x)[real], hf(*x).logits[real], atol=1e-5)


def bench_script(name):
    """bench/<name>.py as a module (bench/ is a folder of scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parent / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_meta_steps_agree_with_the_reference(tmp_path, capsys):
    """bench/run.py's variants at a tiny size: ours and the transformers + peft reference take the meta-step with the
    same gradient norm (first and second order, and the recipe's 20 inner AdamW steps), and the encoders agree."""
    import argparse
    bench = bench_script("run")
    args = dict(layers=1, vocab=100, batch=2, seq=8, steps=1, threads=1, device="cpu", dtype="fp32", no_padding=False,
                ckpt=str(tmp_path))
    bench.write_checkpoints(argparse.Namespace(**args), tmp_path)
    out = {}
    for name in ("parity", "meta_ours_1", "meta_reference_1", "meta_ours_2", "meta_reference_2", "recipe_ours",
                 "recipe_reference"):
        bench.child(argparse.Namespace(**args, child=name))
        out[name] = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["parity"]["parity_fp32_max_abs_diff"] < 1e-5
    for variant in ("meta_{}_1", "meta_{}_2", "recipe_{}"):
        ours, ref = (out[variant.format(who)]["grad_norm_first"] for who in ("ours", "reference"))
        assert ours == pytest.approx(ref, rel=1e-5) and ours > 0


# ---------------------------------------------------------------------------------------------- train.py

import train  # noqa: E402
from study import experiment, probe  # noqa: E402

TINY_RUN = ["--tiny-hidden", "32", "--tiny-layers", "1", "--max-len", "48", "--batch-size", "8", "--tasks", "2",
            "--support-size", "4", "--query-size", "4", "--ckpt-every", "2", "--eval-batch-size", "16",
            "--inner-steps", "2", "--support-batches", "2",  # the default inner loop, shortened
            "--procs", "1"]  # all in this process: spawned ones would not see the tests' monkeypatches
JOBS_1 = ["--jobs", "1"]  # the same for study/experiment.py's cells


@pytest.fixture(scope="module")
def tiny_testbed(tmp_path_factory):
    """A tiny testbed world and a tiny MLM-pretrained encoder made by the pretrain stage."""
    root = tmp_path_factory.mktemp("testbed")
    data.make_world(root / "data", data.WorldConfig(**_TINY))
    data.write_tokenizer(root / "data", vocab_size=600)
    train.main(["--stage", "pretrain", "--data", str(root / "data"), "--out", str(root / "pre"),
                "--pretrain-steps", "4", *TINY_RUN])
    return root / "pre" / "model", root / "data"


def run_cli(*argv, main=train.main):
    """main(argv), train.py's or a study script's (experiment.main, probe.main): its exit code."""
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def test_train_stages_chain_on_a_tiny_testbed(tiny_testbed, tmp_path, capsys):
    model, world = tiny_testbed
    assert json.loads((model / "config.json").read_text())["architectures"] == ["XLMRobertaForMaskedLM"]
    pre = json.loads((model.parent / "pretrain.json").read_text())
    assert pre["loss_after"] < pre["loss_before"]
    mlm = load_pretrained(model, mlm=True)  # the MLM head too: unexpected or missing keys would raise
    tok = data.load_tokenizer(model)
    assert mlm.mlm_logits(torch.tensor([tok.encode("Duhelaim Nagis .").ids])).shape[-1] == tok.get_vocab_size()
    common = ["--data", world, *TINY_RUN]
    assert run_cli("--stage", "prime", "--model", model, "--out", tmp_path / "p", "--prime-steps", 3, *common) == 0
    assert not (tmp_path / "p" / "model" / "peft.safetensors").exists()  # --outer theta: phi was never learned
    argv = ["--stage", "finetune", "--model", tmp_path / "p" / "model", "--finetune-steps", 4, "--phi-init", "primed"]
    fails_cleanly(capsys, [*argv, "--out", tmp_path / "f0", *common], "has no meta-learned PEFT init")
    meta = ["--outer", "theta+phi", "--phi-start", "meta"]
    assert run_cli("--stage", "prime", "--model", model, "--out", tmp_path / "pm", "--prime-steps", 3, *meta,
                   *common) == 0
    argv[3] = tmp_path / "pm" / "model"
    assert run_cli(*argv, "--out", tmp_path / "f", *common) == 0
    assert run_cli("--stage", "eval", "--model", tmp_path / "f" / "model", "--out", tmp_path / "e", *common) == 0
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert set(results["f1"]) == {"en", "de", "ru", "tr", "ja"}
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["stage"] == "prime" and config["prime_steps"] == 3 and config["mode"] == "prime"
    lines = [json.loads(l) for l in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3] and all("meta_loss" in l for l in lines)
    from transformers import AutoModelForTokenClassification
    AutoModelForTokenClassification.from_pretrained(tmp_path / "f" / "model")  # loads in transformers


def weights(folder):
    out = {}
    for name in ("model.safetensors", "peft.safetensors"):
        if not (folder / name).exists():  # a primed model has phi only where priming learned it
            continue
        with safe_open(str(folder / name), "pt") as f:
            out |= {f"{name}:{k}": f.get_tensor(k) for k in f.keys()}
    return out


@pytest.mark.parametrize("stage, extra", [("prime", ["--prime-steps", 6, "--meta-sgd"]),
                                          ("prime", ["--prime-steps", 6, "--inner-opt", "adam", "--inner-steps", 2,
                                                     "--no-first-order", "--inner-backprop", 1, "--support-batches", 2]),
                                          ("finetune", ["--finetune-steps", 6, "--eval-every", 2])])
def test_train_resume_after_a_kill_is_bit_identical(tiny_testbed, tmp_path, monkeypatch, stage, extra):
    model, world = tiny_testbed
    argv = ["--stage", stage, "--model", model, "--data", world, *TINY_RUN, *extra]
    assert run_cli(*argv, "--out", tmp_path / "whole") == 0
    real_step, calls = mp.step, []

    def killed_after_4(*a, **k):  # dies in step 5, after the checkpoint at step 4
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(mp, "step", killed_after_4)
    with pytest.raises(KeyboardInterrupt):
        run_cli(*argv, "--out", tmp_path / "killed")
    monkeypatch.setattr(mp, "step", real_step)
    monkeypatch.setattr(torch, "load", None)  # checkpoints are tensors and JSON: resuming never needs torch.load
    assert not (tmp_path / "killed" / "model").exists()
    assert run_cli(*argv, "--out", tmp_path / "killed", "--resume") == 0
    a, b = weights(tmp_path / "whole" / "model"), weights(tmp_path / "killed" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


SIGNAL_TO_RANK_1 = """import os, signal, sys, metapeft, train
real_step, calls = metapeft.step, []
def signalled_in_5(*a, **k):  # rank 1 alone gets a SIGTERM in step 5
    calls.append(1)
    if len(calls) == 5 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return real_step(*a, **k)
metapeft.step = signalled_in_5
train.main(sys.argv[1:])
"""


def torchrun(script, *argv):
    """Run script (from this folder) with 2 gloo processes on the CPU; returns the exit code."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": here}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(command + [str(a) for a in argv], cwd=here, env=env, capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stderr


@pytest.mark.parametrize("stage, extra", [("prime", ["--prime-steps", 6, "--tasks", 3, "--meta-sgd"]),
                                          ("finetune", ["--finetune-steps", 4, "--eval-every", 2, "--micro-batch", 3])])
def test_train_torchrun_gives_the_one_process_weights(tiny_testbed, tmp_path, stage, extra):
    # 3 tasks or micro-batches of (3, 3, 2) sentences: shared unevenly by the 2 processes
    model, world = tiny_testbed
    argv = ["--stage", stage, "--model", model, "--data", world, *TINY_RUN, *extra]
    assert run_cli(*argv, "--out", tmp_path / "one") == 0
    code, log = torchrun("train.py", *argv, "--out", tmp_path / "two")
    assert code == 0, log[-3000:]
    one, two = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert one.keys() == two.keys() and max((one[k] - two[k]).abs().max() for k in one) < 1e-6
    assert (tmp_path / "one" / "metrics.jsonl").read_text().count("\n") == \
        (tmp_path / "two" / "metrics.jsonl").read_text().count("\n")  # rank 0 alone writes
    if stage == "prime":  # --procs 2: the same 2 processes, started by train.py itself
        here = os.path.dirname(os.path.abspath(__file__))
        done = subprocess.run([sys.executable, "train.py", *map(str, argv), "--procs", "2", "--out", tmp_path / "p2"],
                              cwd=here, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stderr.count("prime: model saved") == 1, done.stderr[-3000:]
        procs = weights(tmp_path / "p2" / "model")
        assert max((one[k] - procs[k]).abs().max() for k in one) < 1e-6
        assert json.loads((tmp_path / "p2" / "config.json").read_text())["procs"] == 2
    if stage == "finetune":  # a bad input: one line from rank 0, no traceback from any process of ours
        code, log = torchrun("train.py", *argv, "--model", tmp_path / "nowhere", "--out", tmp_path / "bad")
        assert code != 0 and log.count("error: --model") == 1 and "[rank1]" not in log, log[-3000:]
        return
    # A signal to one process stops both after the same step (no deadlock), with rank 0's checkpoint of it.
    (tmp_path / "signal_to_rank_1.py").write_text(SIGNAL_TO_RANK_1)
    code, log = torchrun(tmp_path / "signal_to_rank_1.py", *argv, "--out", tmp_path / "killed")
    assert code != 0 and "stopped by SIGTERM after step 5, checkpoint saved" in log, log[-3000:]
    assert not (tmp_path / "killed" / "model").exists()
    code, log = torchrun("train.py", *argv, "--out", tmp_path / "killed", "--resume")
    assert code == 0 and "resumed from" in log, log[-3000:]
    again = weights(tmp_path / "killed" / "model")
    assert all(torch.equal(again[k], two[k]) for k in two)


def test_train_export_and_import(tiny_testbed, tmp_path, monkeypatch, capsys):
    from transformers import AutoModel, XLMRobertaForMaskedLM
    model, world = tiny_testbed
    common = ["--data", world, *TINY_RUN]
    assert run_cli("--stage", "prime", "--model", model, "--out", tmp_path / "p", "--prime-steps", 2, *common) == 0
    primed = tmp_path / "p" / "model"
    for fmt in ("hf-mlm", "hf-base"):
        assert run_cli("--stage", "export", "--model", primed, "--format", fmt, "--out", tmp_path / fmt) == 0
        assert (tmp_path / fmt / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    mlm, info = XLMRobertaForMaskedLM.from_pretrained(tmp_path / "hf-mlm", output_loading_info=True)
    base, base_info = AutoModel.from_pretrained(tmp_path / "hf-base", output_loading_info=True)
    for i in (info, base_info):
        assert not any(i[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), i
    ours = load_pretrained(primed, mlm=True).eval()
    ids, mask = padded_batch(vocab=ours.cfg.vocab_size)
    with torch.no_grad():
        hidden = ours.encoder(ids, mask)
        real = mask.bool()  # padding is not computed
        assert (base.eval()(ids, attention_mask=mask).last_hidden_state - hidden)[real].abs().max() < 1e-5
        assert (mlm.eval().roberta(ids, attention_mask=mask).last_hidden_state - hidden)[real].abs().max() < 1e-5
        assert (mlm(ids, attention_mask=mask).logits - ours.mlm_logits(ids, mask))[real].abs().max() < 1e-5
    pretrained = load_pretrained(model, mlm=True)  # priming changed the encoder, not the MLM head it started with
    assert all(torch.equal(p, q) for p, q in zip(ours.lm_head.parameters(), pretrained.lm_head.parameters()))
    assert not torch.equal(ours.encoder.layers[0].query.weight, pretrained.encoder.layers[0].query.weight)

    assert run_cli("--stage", "finetune", "--model", primed, "--out", tmp_path / "f", "--finetune-steps", 3,
                   *common) == 0
    tuned = tmp_path / "f" / "model"
    assert run_cli("--stage", "export", "--model", tuned, "--format", "peft", "--out", tmp_path / "adapter") == 0
    theirs = peft_model_from(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"], tmp_path / "adapter")
    ours = load_peft(load_pretrained(tuned, peft=saved_peft_config(tuned)), tuned).eval()
    with torch.no_grad():
        assert (theirs(input_ids=ids, attention_mask=mask).logits - ours(ids, mask))[mask.bool()].abs().max() < 1e-5
    # The adapter back in: fine-tuning from it for 0 steps saves the same model.
    assert run_cli("--stage", "finetune", "--model", primed, "--out", tmp_path / "g", "--finetune-steps", 0,
                   "--phi-init", tmp_path / "adapter", *common) == 0
    a, b = weights(tuned), weights(tmp_path / "g" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    adapter = tmp_path / "adapter"
    for argv, message in [(["--stage", "finetune", "--lora-r", 4, "--phi-init", adapter], "lora_r 8"),
                          (["--stage", "finetune", "--peft", "houlsby", "--phi-init", adapter], "holds LoRA"),
                          (["--stage", "export", "--format", "peft"], "has no LoRA parameters")]:
        fails_cleanly(capsys, [*argv, "--model", primed if argv[1] == "finetune" else tmp_path / "hf-mlm",
                               "--out", tmp_path / "bad", *common], message)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: checked before any work
    for argv, message in [(["--stage", "export", "--model", tuned], "runs in one process"),
                          (["--tasks", 1], "--tasks 1: fewer tasks than the 2 processes"),
                          (["--stage", "finetune", "--batch-size", 4, "--micro-batch", 4], "--micro-batch 4: a batch "
                           "of 4 has fewer micro-batches than the 2 processes")]:
        fails_cleanly(capsys, [*argv, "--out", tmp_path / "bad"], message)


# ----------------------------------------------------------------------------- rehearsal at xlm-roberta-base's shape

@pytest.fixture(scope="module")
def xlmr_panx(tmp_path_factory):
    """bench/rehearsal.py's inputs, small: transformers' XLMRobertaForMaskedLM with xlm-roberta-base's vocabulary and
    width (250,002 x 768) and 1 layer in the hub layout, its 250,002-piece XLM-R-layout tokenizer.json, and PAN-X's
    40 languages in XTREME's layout (40 train, 20 dev, 20 test sentences each)."""
    rehearsal, root = bench_script("rehearsal"), tmp_path_factory.mktemp("xlmr")
    rehearsal.write_checkpoint(root / "model", layers=1)
    rehearsal.write_tokenizer(root / "model")
    rehearsal.write_panx(root / "panx", {"train": 40, "dev": 20, "test": 20})
    yield root / "model", root / "panx", rehearsal.PANX_LANGS
    shutil.rmtree(root)  # 0.8 GB: pytest keeps the folders of its last runs


def shown(err, stage):
    """(split, language) of the progress lines `stage` printed for each evaluated set's last batch."""
    return {m[:2] for m in re.findall(rf"^{stage} (\w+)-(\w+) (\d+)/\3 \| \d+ sent/s ETA 0m00s$", err, re.M)}


def test_rehearsal_of_the_readme_real_data_commands_at_xlmr_base_shape(xlmr_panx, tmp_path, monkeypatch, capsys):
    """The README's real-data commands, prime -> finetune -> eval -> export with few steps, at xlm-roberta-base's
    vocabulary and width on a 40-language PAN-X folder: what the 3,000-piece, 7-language testbed cannot show
    (vocabulary-sized buffers, per-language loops, default language sets). eval scores exactly the asked test sets
    and the dev sets of the languages the model was primed on, with a progress line for each."""
    model, panx, langs = xlmr_panx
    tok = data.load_tokenizer(model)
    assert tok.get_vocab_size() == 250_002
    assert [tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == [0, 1, 2, 3, 250_001]  # <s> <pad> </s> <unk> <mask>
    assert all(data.languages(panx, split) == langs for split in ("train", "dev", "test")) and len(langs) == 40
    monkeypatch.setattr(train, "PROGRESS_DELAY", 0.0)  # every loop shows its progress, however quick
    common = ["--data", panx, "--procs", 1]  # one process: the second would hold a second copy of the weights
    fails_cleanly(capsys, ["--stage", "prime", "--model", model, *common, "--out", tmp_path / "p0"],  # no default:
                  "choose among " + ",".join(l for l in langs if l != "en"))  # priming on all leaves no target
    prime, tuned, evaluated, exported = (tmp_path / s for s in ("prime", "finetune", "eval", "export"))
    assert run_cli("--stage", "prime", "--model", model, *common, "--source", "en", "--prime-langs", "de,es,nl,ru,zh",
                   "--eval-langs", "ar,he,hi,ja,ko,my,ta,th,tr", "--prime-steps", 1, "--inner-steps", 2,
                   "--support-batches", 2, "--tasks", 2, "--prime-warmup", 0, "--out", prime) == 0
    err = capsys.readouterr().err
    assert re.search(r"^load train 6/6 \| \d+ sent/s ETA 0m00s$", err, re.M), err
    step = json.loads((prime / "metrics.jsonl").read_text())
    assert step["step"] == 1 and math.isfinite(step["meta_loss"]) and step["grad_norm"] > 0
    assert json.loads((prime / "model" / "priming.json").read_text()) == {
        "source": "en", "prime_langs": ["de", "es", "nl", "ru", "zh"], "mode": "prime"}
    assert run_cli("--stage", "finetune", "--model", prime / "model", *common, "--finetune-steps", 2,
                   "--out", tuned) == 0
    err = capsys.readouterr().err
    assert shown(err, "finetune") == {("dev", "en")}, err
    assert (tuned / "model" / "priming.json").read_bytes() == (prime / "model" / "priming.json").read_bytes()
    assert run_cli("--stage", "eval", "--model", tuned / "model", *common, "--eval-langs", "ar,ja,sw",
                   "--out", evaluated) == 0
    err, results = capsys.readouterr().err, json.loads((evaluated / "results.json").read_text())
    assert set(results["f1"]) == {"en", "ar", "ja", "sw"}  # the asked test sets, and the primed-on dev sets
    assert set(results["dev_f1"]) == {"en", "de", "es", "nl", "ru", "zh"}
    assert shown(err, "eval") == {("test", l) for l in results["f1"]} | {("dev", l) for l in results["dev_f1"]}, err
    assert run_cli("--stage", "export", "--model", prime / "model", "--format", "hf-mlm", "--out", exported) == 0
    assert "export: writing" in capsys.readouterr().err and (exported / "priming.json").exists()
    assert (exported / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["XLMRobertaForMaskedLM"]
    key = "roberta.embeddings.word_embeddings.weight"
    embeddings = lambda folder: safe_open(folder / "model.safetensors", "pt").get_tensor(key)
    primed, out = embeddings(prime / "model"), embeddings(exported)
    assert out.shape == (250_002, 768) and torch.equal(out, primed)
    del out
    assert not torch.equal(primed, embeddings(model))  # priming moved the embeddings
    shutil.rmtree(tmp_path)  # 5 GB of runs (priming's checkpoint holds AdamW's moments): pytest keeps its last runs


def fails_cleanly(capsys, argv, message, main=train.main):
    """main(argv) exits with code 2 and prints one line, 'error: ...' with message in it (and no traceback: any
    exception but SystemExit would fail the test)."""
    capsys.readouterr()
    assert run_cli(*argv, main=main) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def copy_with(src, dst, name, content):
    """A copy of folder src at dst whose file `name` holds content: bytes, a function of the original's bytes, or
    None (no such file)."""
    shutil.copytree(src, dst)
    if content is None:
        (dst / name).unlink()
    else:
        (dst / name).write_bytes(content((src / name).read_bytes()) if callable(content) else content)
    return dst


def cached_testbed(world, testbed):
    """--testbed for a testbed cache (world seed 0) holding a copy of `world`."""
    shutil.copytree(world, testbed.parent / f"{testbed.name}-0" / "data")
    return testbed


def more_tokens(raw):
    tok = data.Tokenizer.from_str(raw.decode())
    tok.add_tokens(["extra1", "extra2"])
    return tok.to_str().encode()


def tensor_as(key, fn):
    """A safetensors file's bytes -> the same with tensor `key` replaced by fn(it)."""
    return lambda raw: save({k: fn(v) if k == key else v for k, v in load(raw).items()})


def config_with(**changes):
    """A config.json's bytes -> the same with `changes` made (None: the key deleted)."""
    return lambda raw: json.dumps({k: v for k, v in (json.loads(raw) | changes).items() if v is not None}).encode()


def bad_config(what, message, **changes):
    """A BAD_INPUTS case: the model with `changes` made to its config.json (config_with)."""
    return (what, lambda m, w, t: ["--data", w, "--model", copy_with(m, t / "m", "config.json", config_with(**changes))],
            f"m/config.json: {message}", False)


def not_utf8_on_line_3(raw):
    first, second, rest = raw.split(b"\n", 2)
    return b"\n".join([first, second, b"\xff" + rest])


QUERY_BIAS = "roberta.encoder.layer.0.attention.self.query.bias"
BAD_INPUTS = [  # (what, argv from (model, world, tmp_path), what the error line says, rejected before the run folder)
    # the seven cases of issue 13
    ("finetune --data alone", lambda m, w, t: ["--stage", "finetune", "--data", w], "--data without --model", True),
    ("truncated safetensors", lambda m, w, t: ["--data", w, "--model", copy_with(m, t / "m", "model.safetensors",
                                                                                 lambda raw: raw[:-9])],
     "m/model.safetensors: not a readable safetensors file", False),
    ("--tasks 0", lambda m, w, t: ["--model", m, "--data", w, "--tasks", 0], "--tasks 0: must be >= 1", True),
    ("--max-len 1", lambda m, w, t: ["--model", m, "--data", w, "--max-len", 1], "--max-len 1: must be >= 3", True),
    ("non-UTF-8 data", lambda m, w, t: ["--model", m, "--data", copy_with(w, t / "w", "train-en.tsv", not_utf8_on_line_3)],
     "w/train-en.tsv:3: byte 0xff is not UTF-8", False),
    ("--prime-steps -5", lambda m, w, t: ["--model", m, "--data", w, "--prime-steps", -5],
     "--prime-steps -5: must be >= 0", True),
    ("--inner-lr nan", lambda m, w, t: ["--model", m, "--data", w, "--inner-lr", "nan"],
     "--inner-lr nan: must be a finite number > 0", True),
    # flags and their combinations
    ("--lora-dropout 1", lambda m, w, t: ["--lora-dropout", 1], "--lora-dropout 1.0: must be in [0, 1)", True),
    ("--tiny-hidden 48", lambda m, w, t: ["--tiny-hidden", 48], "--tiny-hidden 48: must be a multiple of 32", True),
    ("--tasks two", lambda m, w, t: ["--tasks", "two"], "argument --tasks: invalid int value: 'two'", True),
    ("--stage train", lambda m, w, t: ["--stage", "train"], "argument --stage: invalid choice: 'train'", True),
    ("--mode reptile", lambda m, w, t: ["--mode", "reptile"], "argument --mode: invalid choice: 'reptile'", True),
    ("--methods", lambda m, w, t: [experiment.main, "--methods", "none,best"], "unknown method 'best'", True),
    ("--outer", lambda m, w, t: ["--outer", "theta+phi"], "--outer='theta+phi' needs --phi-start='meta'", True),
    ("--inner-backprop", lambda m, w, t: ["--inner-steps", 1, "--no-first-order", "--inner-backprop", 2],
     "--inner-backprop must be in [0, --inner-steps=1]",
     True),
    ("--lora-targets", lambda m, w, t: ["--lora-targets", "query,foo"], "--lora-targets must be among", True),
    ("list with a repeat", lambda m, w, t: ["--eval-langs", "de,de"],
     "--eval-langs 'de,de': expected a comma-separated list, no item empty or repeated", True),
    ("empty list", lambda m, w, t: ["--prime-langs", ""], "--prime-langs '': expected a comma-separated list", True),
    ("--eval-langs the source", lambda m, w, t: ["--model", m, "--data", w, "--eval-langs", "de,en"],
     "--eval-langs de,en: en is the source language, expected others", False),
    ("probe without --model", lambda m, w, t: [probe.main], "probe: give the primed encoder", True),
    ("probe curve too short", lambda m, w, t: [probe.main, "--model", m, "--base", m, "--finetune-steps", 4],
     "--finetune-steps 4: the learning curve needs at least 25", True),
    ("--text", lambda m, w, t: ["--text", "corpus.txt"], "--text corpus.txt: only for --stage pretrain", True),
    ("--out a file", lambda m, w, t: ["--out", _write(t / "file", "x")], "file: exists and is not a folder", True),
    ("--out under a file", lambda m, w, t: ["--model", m, "--data", w, "--out", _write(t / "file", "x") / "run"],
     "file/run: Not a directory", True),
    ("export onto --model", lambda m, w, t: ["--stage", "export", "--model", copy_with(m, t / "m", "config.json",
                                                                                      lambda raw: raw), "--out", t / "m"],
     "m: is the --model folder (the export would overwrite its input)", True),
    ("--per-world", lambda m, w, t: [experiment.main, "--per-world", "--data", w], "--per-world: only on the testbed",
     True),
    ("--prime-peft, --phi-init primed", lambda m, w, t: [experiment.main, "--prime-peft", "houlsby", "--phi-init",
                                                         "primed"], "--phi-init primed: priming learns a houlsby", True),
    ("--max-len > positions", lambda m, w, t: ["--model", m, "--data", w, "--max-len", 49],
     "--max-len 49: {m} has position embeddings for at most 48 tokens", False),
    ("--eval-langs", lambda m, w, t: ["--model", m, "--data", w, "--eval-langs", "xx"],
     "--eval-langs: no test split for 'xx'", False),
    ("--eval-langs no test", lambda m, w, t: ["--model", m, "--data", w, "--eval-langs", "es"],
     "--eval-langs: no test split for 'es'", False),
    ("--curve-langs", lambda m, w, t: ["--stage", "finetune", "--model", m, "--data", w, "--curve-langs", "de,xx"],
     "--curve-langs: no dev split for 'xx'", False),
    ("--phi-init primed", lambda m, w, t: ["--stage", "finetune", "--model", m, "--data", w, "--phi-init", "primed"],
     "has no meta-learned PEFT init", False),
    ("--model alone, not the testbed's", lambda m, w, t: ["--testbed", cached_testbed(w, t / "tb"), "--model",
                                                          copy_with(m, t / "m", "tokenizer.json", more_tokens)],
     "m is not a testbed model: give --data", True),
    # files
    ("no config.json", lambda m, w, t: ["--model", t, "--data", w], "--model {t}: no config.json", True),
    ("no source language", lambda m, w, t: ["--model", m, "--data", copy_with(w, t / "w", "train-en.tsv", None)],
     "no train split for the source language 'en'", False),
    ("safetensors of ints", lambda m, w, t: ["--data", w, "--model", copy_with(m, t / "m", "model.safetensors",
                                                                               tensor_as(QUERY_BIAS, torch.Tensor.long))],
     f"m/model.safetensors: tensor {QUERY_BIAS} is I64, expected one of F16, BF16, F32, F64", False),
    ("not safetensors", lambda m, w, t: ["--data", w, "--model", copy_with(m, t / "m", "model.safetensors", b"{}")],
     "m/model.safetensors: not a readable safetensors file", False),
    ("config.json not JSON", lambda m, w, t: ["--data", w, "--model", copy_with(m, t / "m", "config.json", b"{")],
     "m/config.json: not a readable JSON file", False),
    bad_config("config.json value", "num_attention_heads must be an integer >= 1, got '1'", num_attention_heads="1"),
    bad_config("config.json dropout", "hidden_dropout_prob must be a probability (0 to 1), got 1.5",
               hidden_dropout_prob=1.5),
    bad_config("config.json key missing", "missing hidden_size (in every XLM-R config.json)", hidden_size=None),
    bad_config("config.json positions", "position_embedding_type must be 'absolute' (XLM-R's), got 'relative_key'",
               position_embedding_type="relative_key"),
    bad_config("config.json pad", "pad_token_id 0, but the tokenizer's <pad> is 1", pad_token_id=0),
    ("NaN weights", lambda m, w, t: ["--data", w, "--model", copy_with(m, t / "m", "model.safetensors",
                                                                       tensor_as(QUERY_BIAS, lambda v: v / 0 * 0))],
     f"m/model.safetensors: tensor {QUERY_BIAS} has non-finite values", False),
    ("tokenizer.json unreadable", lambda m, w, t: ["--data", w, "--model", copy_with(m, t / "m", "tokenizer.json", b"")],
     "m/tokenizer.json: not a readable tokenizer.json", False),
    ("tokenizer > embeddings", lambda m, w, t: ["--data", w, "--model", copy_with(m, t / "m", "tokenizer.json",
                                                                                  more_tokens)],
     "m/tokenizer.json: token ids up to 602, but the model's embedding matrix has 601 rows", False),
    ("peft.safetensors unreadable", lambda m, w, t: ["--stage", "finetune", "--data", w, "--phi-init", "primed",
                                                     "--model", copy_with(m, t / "m", "peft.safetensors", b"x")],
     "m/peft.safetensors: not a readable safetensors file", False),
    ("peft.safetensors without config", lambda m, w, t: ["--stage", "finetune", "--data", w, "--phi-init", "primed",
                                                         "--model", copy_with(m, t / "m", "peft.safetensors",
                                                                              save({"x": torch.zeros(1)}))],
     "m/peft.safetensors: expected a valid peft_config in its metadata", False),
    # export, peft adapters, torchrun
    ("--micro-batch -1", lambda m, w, t: ["--micro-batch", -1], "--micro-batch -1: must be >= 0", True),
    ("--format onnx", lambda m, w, t: ["--format", "onnx"], "argument --format: invalid choice: 'onnx'", True),
    ("export without --out", lambda m, w, t: ["--stage", "export", "--model", m, "--out", ""],
     "--stage export needs --out", True),
    ("--phi-init not a folder", lambda m, w, t: ["--stage", "finetune", "--model", m, "--data", w, "--phi-init",
                                                 t / "nowhere"], "nowhere: not fresh, primed or a folder", True),
    ("--phi-init not an adapter", lambda m, w, t: ["--stage", "finetune", "--model", m, "--data", w, "--phi-init", m],
     "{m}: not a peft adapter folder", False),
]


@pytest.mark.parametrize("what, argv, message, early", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_train_bad_input_is_one_line(tiny_testbed, tmp_path, capsys, what, argv, message, early):
    model, world = tiny_testbed
    argv = argv(model, world, tmp_path)
    main = argv.pop(0) if callable(argv[0]) else train.main  # a study script's flags, or train.py's
    fails_cleanly(capsys, [*TINY_RUN, "--out", tmp_path / "run", *argv], message.format(m=model, t=tmp_path), main)
    assert (tmp_path / "run").exists() != early  # early: rejected before the run folder is made


def test_train_overlap_warning(tiny_testbed, tmp_path, capsys):
    model, world = tiny_testbed
    run_cli("--model", model, "--data", world, "--prime-langs", "de", "--eval-langs", "de,ru", "--prime-steps", 1,
            "--out", tmp_path / "overlap", *TINY_RUN)
    assert "priming languages ['de'] are also evaluated on" in capsys.readouterr().err


def test_train_eval_scores_the_asked_sets_and_the_priming_languages_of_the_model(tiny_testbed, tmp_path, capsys):
    """eval's dev sets: the source and --prime-langs, else the languages the model was primed on (priming.json, carried
    by finetune), else those with no test split; on a folder where every language has a test split (PAN-X) a model
    never primed gets the source's alone, and prime without --prime-langs refuses, naming the languages."""
    model, world = tiny_testbed
    panx = tmp_path / "panx"  # the testbed without its priming-only languages: every language has a test split
    shutil.copytree(world, panx, ignore=shutil.ignore_patterns("*-es.tsv", "*-el.tsv"))
    steps = [*TINY_RUN, "--finetune-steps", 1, "--prime-steps", 1]
    results = lambda out: json.loads((tmp_path / out / "results.json").read_text())
    fails_cleanly(capsys, ["--stage", "prime", "--model", model, "--data", panx, "--out", tmp_path / "p0", *steps],
                  f"--prime-langs: not given, and every language in {panx} with training data has a test split "
                  f"(no default: priming on all would leave no zero-shot target); choose among de,ja,ru,tr")
    assert run_cli("--stage", "finetune", "--model", model, "--data", panx, "--out", tmp_path / "f", *steps) == 0
    assert run_cli("--stage", "eval", "--model", tmp_path / "f" / "model", "--data", panx, "--eval-langs", "ja",
                   "--out", tmp_path / "e", *steps) == 0
    assert set(results("e")["f1"]) == {"en", "ja"} and set(results("e")["dev_f1"]) == {"en"}
    assert "eval: test sets en, ja; dev sets en (the source and priming languages)" in capsys.readouterr().err
    assert run_cli("--stage", "prime", "--model", model, "--data", panx, "--prime-langs", "ru,tr", "--out",
                   tmp_path / "p", *steps) == 0
    assert run_cli("--stage", "finetune", "--model", tmp_path / "p" / "model", "--data", panx, "--out",
                   tmp_path / "pf", *steps) == 0
    for out, flags, dev in (("pe", [], {"en", "ru", "tr"}), ("pe2", ["--prime-langs", "de"], {"en", "de"})):
        assert run_cli("--stage", "eval", "--model", tmp_path / "pf" / "model", "--data", panx, "--out", tmp_path / out,
                       *flags, *steps) == 0
        assert set(results(out)["f1"]) == {"en", "de", "ja", "ru", "tr"} and set(results(out)["dev_f1"]) == dev
    assert run_cli("--stage", "eval", "--model", tmp_path / "pf" / "model", "--data", world, "--out", tmp_path / "we",
                   *steps) == 0  # on the testbed with its es, el: the recorded languages still
    assert set(results("we")["dev_f1"]) == {"en", "ru", "tr"}


def test_train_inner_optimizer_flags():
    for argv, opt, lr, decay in ((["--data", "panx"], "adam", 5e-4, 0.01), ([], "adam", 5e-3, 0.01),  # testbed preset
                                 (["--finetune-lr", "1e-3", "--weight-decay", "0"], "adam", 5e-3, 0),  # its own flag
                                 (["--inner-opt", "sgd", "--inner-lr", "0.3"], "sgd", 0.3, 0.01)):
        cfg = train.prime_config(train.parse_args(argv), "prime")
        assert (cfg.inner_opt, cfg.inner_lr, cfg.inner_weight_decay) == (opt, lr, decay)


def test_readme_python_block_runs_a_priming_loop(tiny_testbed, tmp_path, monkeypatch):
    """The README's Python API block, run as written on the shipped testbed encoder and a tiny world's data (its two
    paths the only change): the loop primes theta and saves a model that loads again."""
    readme = (Path(train.__file__).parent / "README.md").read_text()
    block = re.search(r"^## Python API\n.*?```python\n(.*?)```", readme, re.S | re.M)[1]
    paths = '"xlm-roberta-base/", "panx/"'
    assert block.count(paths) == 1
    monkeypatch.chdir(tmp_path)  # it saves to primed/
    torch.manual_seed(0)
    scope = {}
    exec(block.replace(paths, f"{str(train.WORLD0)!r}, {str(tiny_testbed[1])!r}"), scope)
    before = load_pretrained(train.WORLD0)
    primed = load_pretrained(tmp_path / "primed", peft=PeftConfig("lora", lora_r=8))
    assert primed.labels == scope["labels"] and primed.labels[0] == "O"
    moved = [n for n, p in before.encoder.named_parameters() if not torch.equal(p, primed.encoder.get_parameter(n))]
    assert len(moved) == len(list(before.encoder.parameters())), "the outer loop left some of theta as it was"


def test_train_defaults_are_primeconfig_and_peftconfig_and_the_readme_recipe():
    """One source of truth: the CLI's defaults are the dataclasses' (real data), the testbed preset changes only the
    flags it names, and the README's recipe table shows exactly these values."""
    real, testbed = train.parse_args(["--data", "panx"]), train.parse_args([])
    assert real.presets == [] and testbed.presets == ["testbed"]
    cfg, peft = train.prime_config(real, "prime"), train.peft_config(real)
    assert cfg == mp.PrimeConfig() and peft == PeftConfig()
    assert real.finetune_lr == cfg.inner_lr  # the inner loop simulates the downstream fine-tuning
    assert {k for k in vars(real) if getattr(real, k) != getattr(testbed, k)} == set(train.PRESETS["testbed"]) | {
        "presets", "data"}
    readme = (Path(train.__file__).parent / "README.md").read_text()
    rows = {m[1]: (m[2], m[3]) for m in re.finditer(r"^\| `(--[\w-]+)` \| ([^|]+) \| ([^|]+) \|", readme, re.M)}
    flags = ["--inner-opt", "--inner-steps", "--support-batches", "--first-order", "--inner-lr", "--finetune-lr",
             "--prime-lr", "--prime-warmup", "--prime-steps", "--lora-targets", "--lora-r"]
    assert set(flags) <= set(rows), sorted(set(flags) - set(rows))
    for flag in flags:
        value = lambda a: getattr(a, flag[2:].replace("-", "_"))
        shown = lambda v: v.strip().strip("`")
        assert [shown(v) for v in rows[flag]] == [str(value(a)).replace("True", "on") for a in (real, testbed)], flag


def test_train_resume_under_torchrun_with_more_processes_than_the_default_tasks(tmp_path, monkeypatch):
    argv = ["--stage", "prime", "--tasks", "8", "--out", str(tmp_path / "run")]
    monkeypatch.setenv("WORLD_SIZE", "5")
    train.start_run(train.parse_args(argv), "prime")
    assert train.start_run(train.parse_args(argv + ["--resume"]), "prime") == tmp_path / "run"  # no `--tasks 4` error


def test_requirements_name_a_torch_that_has_every_api_used():
    """requirements.txt's torch floor is at least the release that brought each newer torch API the code calls."""
    since = {"torch.nn.utils.get_total_norm": (2, 6), "torch.nn.attention.sdpa_kernel": (2, 3),
             "torch.func.functional_call": (2, 0)}
    here = Path(train.__file__).parent
    source = "".join((here / f).read_text() for f in ("metapeft.py", "model.py", "train.py", "data.py"))
    for api in since:
        module, name = api.rsplit(".", 1)
        assert name in source and hasattr(importlib.import_module(module), name)
    floor = re.search(r"^torch>=(\d+)\.(\d+)", (here / "requirements.txt").read_text(), re.M)
    assert tuple(map(int, floor.groups())) >= max(since.values())


def test_world0_ships_byte_identical_and_matches_its_regenerated_world(tmp_path):
    for name, digest in train.WORLD0_SHA256.items():
        assert hashlib.sha256((train.WORLD0 / name).read_bytes()).hexdigest() == digest, name
    args = train.parse_args(["--testbed", str(tmp_path / "tb")])
    # the world's text and tokenizer are regenerated on every machine; the encoder is the shipped one
    assert train.testbed(args, 0) == (train.WORLD0, tmp_path / "tb-0" / "data")
    assert (tmp_path / "tb-0" / "data" / "tokenizer.json").read_bytes() == (train.WORLD0 / "tokenizer.json").read_bytes()
    assert not (tmp_path / "tb-0" / "pretrain").exists()  # nothing pretrained


def test_train_every_numeric_flag_has_a_range():
    import argparse
    parser = experiment.make_parser  # train.py's flags and the experiment's
    numeric = {k for k, v in vars(train.parse_args([], parser)).items() if type(v) in (int, float)}
    types = {a.dest: a.type for a in parser()._actions if a.dest in numeric}
    assert set(types) == numeric
    for check in types.values():  # each flag's type is a range (train.number), which refuses -1
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            check("-1")
    quick = train.parse_args(["--preset", "quick", "--prime-steps", "2"], parser)  # defaults, not given flags
    assert (quick.prime_steps, quick.finetune_steps, quick.seeds) == (2, 300, 2)


def test_train_bad_checkpoints_are_one_line(tiny_testbed, tmp_path, capsys):
    model, world = tiny_testbed
    argv = ["--model", model, "--data", world, *TINY_RUN, "--prime-steps", 2]
    assert run_cli(*argv, "--out", tmp_path / "run") == 0 and run_cli(*argv, "--out", tmp_path / "other", "--lora-r", 4) == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    fails_cleanly(capsys, [*argv, "--out", tmp_path / "run"], f"--out {tmp_path / 'run'}: not empty (")
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before  # not started over
    argv.append("--resume")
    ckpt = tmp_path / "run" / "checkpoint-prime-prime.safetensors"
    fails_cleanly(capsys, [*argv, "--out", tmp_path / "run", "--lora-r", 4], "--resume: flags differ from the run in")
    fails_cleanly(capsys, argv, "--resume needs --out")
    # a run from before --patience existed: the flag at its default is no difference (the checks below reach the
    # checkpoint), at another value it is one
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "patience"}))
    fails_cleanly(capsys, [*argv, "--out", tmp_path / "run", "--patience", 3], "--resume: flags differ from the run in "
                  f"{tmp_path / 'run'}: patience")
    shutil.copyfile(tmp_path / "other" / ckpt.name, ckpt)
    fails_cleanly(capsys, [*argv, "--out", tmp_path / "run"], f"{ckpt}: not a checkpoint of this run (")
    save_file({"x": torch.zeros(1)}, ckpt)
    fails_cleanly(capsys, [*argv, "--out", tmp_path / "run"], f"{ckpt}: not a checkpoint of this run (")
    ckpt.write_bytes(ckpt.read_bytes()[:-1])
    fails_cleanly(capsys, [*argv, "--out", tmp_path / "run"], f"{ckpt}: not a readable safetensors file")
    (tmp_path / "run" / "config.json").write_text("[]")
    fails_cleanly(capsys, [*argv, "--out", tmp_path / "run"], f"{tmp_path / 'run' / 'config.json'}: expected a JSON object")


def checkpoint(path):
    """(metadata state, tensors) of a train.py checkpoint."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["train_state"]), {k: f.get_tensor(k) for k in f.keys()}


def test_train_nonfinite_loss_stops_keeps_the_last_checkpoint_and_resumes(tiny_testbed, tmp_path, monkeypatch, capsys):
    model, world = tiny_testbed
    argv = ["--model", model, "--data", world, *TINY_RUN, "--prime-steps", 6]
    assert run_cli(*argv, "--out", tmp_path / "whole") == 0
    real_loss, calls = mp.meta_loss, []

    def nan_in_step_5(*a, **k):
        calls.append(1)
        return real_loss(*a, **k) * (math.nan if len(calls) == 5 else 1.0)  # once a step (its tasks together)

    monkeypatch.setattr(mp, "meta_loss", nan_in_step_5)
    capsys.readouterr()
    assert run_cli(*argv, "--out", tmp_path / "nan") == 2
    ckpt = tmp_path / "nan" / "checkpoint-prime-prime.safetensors"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: prime-prime: non-finite meta_loss, grad_norm at step 5: stopped, {ckpt} kept "
        f"(--skip-nonfinite N skips up to N such steps)")
    meta, tensors = checkpoint(ckpt)
    assert meta["step"] == 4 and all(t.isfinite().all() for t in tensors.values() if t.is_floating_point())
    assert not (tmp_path / "nan" / "model").exists()
    monkeypatch.setattr(mp, "meta_loss", real_loss)
    assert run_cli(*argv, "--out", tmp_path / "nan", "--resume") == 0
    a, b = weights(tmp_path / "whole" / "model"), weights(tmp_path / "nan" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)

    calls.clear()  # with --skip-nonfinite 1 the NaN step is skipped (no update) and counted
    monkeypatch.setattr(mp, "meta_loss", nan_in_step_5)
    assert run_cli(*argv, "--out", tmp_path / "skip", "--skip-nonfinite", 1) == 0
    lines = [json.loads(l) for l in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [l.get("nonfinite_skipped") for l in lines] == [None] * 4 + [1, None] and lines[4]["meta_loss"] is None
    assert all(t.isfinite().all() for t in weights(tmp_path / "skip" / "model").values())


def test_train_sigterm_checkpoints_at_a_step_and_resumes_to_the_same_weights(tiny_testbed, tmp_path):
    model, world = tiny_testbed
    argv = [str(a) for a in ["--model", model, "--data", world, *TINY_RUN, "--prime-steps", 6, "--ckpt-every", 4]]
    # A real process that is sent SIGTERM during step 3; it finishes the step, checkpoints it and exits 128 + 15.
    driver = ("import os, signal, sys, metapeft\nstep, calls = metapeft.step, []\n"
              "def terminated_in_step_3(*a):\n    calls.append(1)\n"
              "    if len(calls) == 3:\n        os.kill(os.getpid(), signal.SIGTERM)\n    return step(*a)\n"
              "metapeft.step = terminated_in_step_3\nimport train\ntrain.main(sys.argv[1:])\n")
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", driver, *argv, "--out", str(out)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (f"prime-prime: stopped by SIGTERM after step 3, checkpoint saved in {out}; "
                                            f"to go on, run the same command with --resume --out {out}")
    assert checkpoint(out / "checkpoint-prime-prime.safetensors")[0]["step"] == 3 and not (out / "model").exists()
    assert run_cli(*argv, "--out", out, "--resume") == 0
    assert run_cli(*argv, "--out", tmp_path / "whole") == 0
    a, b = weights(tmp_path / "whole" / "model"), weights(out / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- checkpoints of earlier code

def test_train_resumes_a_checkpoint_written_before_the_reorder(tmp_path, monkeypatch, capsys):
    """testdata/pretrain-e516686 (its make.sh): with the code of commit e516686, a pretrain run stopped after
    step 3 of 6, and the same run uninterrupted. Today's code resumes the first to the second's steps and weights."""
    shutil.copytree(Path(__file__).parent / "testdata" / "pretrain-e516686", tmp_path / "f")
    monkeypatch.chdir(tmp_path / "f")  # the runs' config.json name the data folder relative to it
    argv = ["--stage", "pretrain", "--data", "world", "--tiny-hidden", 32, "--tiny-layers", 1, "--max-len", 48,
            "--batch-size", 8, "--pretrain-steps", 6, "--ckpt-every", 2, "--threads", 1]
    threads = torch.get_num_threads()
    try:
        assert run_cli(*argv, "--out", "run", "--resume") == 0
    finally:
        torch.set_num_threads(threads)
    assert "pretrain: resumed from run/checkpoint-pretrain.safetensors at step 3" in capsys.readouterr().err
    resumed, whole = ([json.loads(l) for l in Path(run, "metrics.jsonl").read_text().splitlines()]
                      for run in ("run", "whole"))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6] and resumed[:3] == whole[:3]
    for a, b in zip(resumed[3:], whole[3:]):  # steps 4-6 go on from the old checkpoint: the same batches, masks
        assert a["tokens"] == b["tokens"] and a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    a, b = weights(Path("run", "model")), weights(Path("whole", "model"))
    # bit-identical on the machine that made the fixture; another CPU's kernels may round differently
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max() for k in a) < 1e-6


# ----------------------------------------------------------------------------- faults: collisions, dead processes
# Real processes on the tiny testbed: `--procs 2` (a launcher and one started process), 6 steps, a checkpoint every 2.
# A fault is planted by a sitecustomize module on the processes' PYTHONPATH (so it reaches the processes train.py
# starts itself): METAPEFT_TEST_FAULT="RANK STEP SIGNAL PAUSE" sends SIGNAL to process RANK in its STEP-th step
# (-1: none), and every step first sleeps PAUSE seconds.

FAULT = """import os
if "METAPEFT_TEST_FAULT" in os.environ:
    import signal, time, metapeft
    rank, at, signum, pause = os.environ["METAPEFT_TEST_FAULT"].split()
    real_step, calls = metapeft.step, []
    def step(*a, **k):
        calls.append(1)
        time.sleep(float(pause))
        if len(calls) == int(at) and os.environ.get("RANK") == rank:
            os.kill(os.getpid(), int(signum))
        return real_step(*a, **k)
    metapeft.step = step
"""


@pytest.fixture(scope="module")
def procs_2(tiny_testbed, tmp_path_factory):
    """launch(out, *flags, fault=...): a started `train.py --procs 2` run (Popen, stderr piped), and the folder of the
    same run uninterrupted."""
    model, world = tiny_testbed
    site = tmp_path_factory.mktemp("fault")
    (site / "sitecustomize.py").write_text(FAULT)
    here = os.path.dirname(os.path.abspath(__file__))
    argv = ["train.py", "--model", model, "--data", world, *TINY_RUN[:-2], "--procs", 2, "--prime-steps", 6]

    def launch(out, *flags, fault="-1 0 0 0"):
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{site}{os.pathsep}{here}",
                            "METAPEFT_TEST_FAULT": fault}
        return subprocess.Popen([sys.executable, *map(str, argv), "--out", str(out), *map(str, flags)], cwd=here,
                                env=env, stderr=subprocess.PIPE, text=True)

    whole = site / "whole"
    assert launch(whole).wait(300) == 0
    return launch, whole


def ended(*procs):
    """[(exit code, stderr)] of launched runs, once no process of theirs is left (none has their --out in argv)."""
    ends = [(proc.communicate(timeout=300)[1], proc.returncode)[::-1] for proc in procs]
    outs = {proc.args[proc.args.index("--out") + 1] for proc in procs}
    for _ in range(50):  # a process killed with its launcher goes a moment later
        left = [p for p in Path("/proc").glob("[0-9]*") if outs & set(p.joinpath("cmdline").read_bytes().decode(
            errors="replace").split("\0")) and p.joinpath("stat").read_text().split()[2] != "Z"] \
            if sys.platform.startswith("linux") else []
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes left running on {outs}: {left}"
    return ends


def same_run(a, b):
    """The model of run folder b is byte for byte a's, and b's metrics.jsonl holds one line per step."""
    assert all((a / "model" / f).read_bytes() == (b / "model" / f).read_bytes()
               for f in ("model.safetensors", "config.json", "tokenizer.json"))
    assert [json.loads(l)["step"] for l in (b / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_fault_a_killed_process_stops_the_run_in_one_line_and_it_resumes_to_the_same_bytes(procs_2, tmp_path):
    launch, whole = procs_2
    out = tmp_path / "run"
    [(code, err)] = ended(launch(out, fault=f"1 3 {signal.SIGKILL} 0"))  # the started process, in step 3
    assert code == 2 and "Traceback" not in err and "gloo" not in err, err
    assert err.splitlines()[-1] == (f"error: process 1 of 2 stopped (killed by signal 9) at step 3; the last "
                                    f"checkpoint is step 2: resume with the same command and --resume --out {out}")
    assert checkpoint(out / "checkpoint-prime-prime.safetensors")[0]["step"] == 2
    [(code, err)] = ended(launch(out, "--resume", fault=f"0 3 {signal.SIGKILL} 0"))  # the launcher, in step 5
    assert code == -signal.SIGKILL and "resumed from" in err and "Traceback" not in err, err
    assert checkpoint(out / "checkpoint-prime-prime.safetensors")[0]["step"] == 4 and not (out / "model").exists()
    [(code, err)] = ended(launch(out, "--resume"))
    assert code == 0, err
    same_run(whole, out)


def test_fault_of_two_launches_into_one_folder_one_runs_and_one_is_refused(procs_2, tmp_path):
    launch, whole = procs_2
    out = tmp_path / "run"
    runs = [launch(out, fault="-1 0 0 0.5") for _ in range(2)]  # slow steps: the second comes while the first runs
    (code_a, err_a), (code_b, err_b) = ended(*runs)
    assert sorted([code_a, code_b]) == [0, 2], (err_a, err_b)
    refused = (err_a if code_a else err_b).splitlines()
    assert len(refused) == 1 and re.fullmatch(
        rf"error: --out {re.escape(str(out))}: (in use by another run \(process \d+ on .+\): wait for it to end, or "
        rf"give another folder|not empty .*)", refused[0]), refused
    same_run(whole, out)


def test_fault_a_folder_in_use_is_refused_and_left_alone(tiny_testbed, tmp_path, capsys):
    model, world = tiny_testbed
    argv = ["--model", model, "--data", world, *TINY_RUN, "--prime-steps", 2, "--out", tmp_path / "run"]
    assert run_cli(*argv) == 0
    files = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    held = train.hold_lock(tmp_path / "run", wait=False)  # as another process running there would (its own lock file)
    try:
        for more, main in (([], train.main), (["--resume"], train.main), (["--seeds", 1, *JOBS_1], experiment.main)):
            fails_cleanly(capsys, [*argv, *more], f"--out {tmp_path / 'run'}: in use by another run (process "
                          f"{os.getpid()} on {socket.gethostname()}): wait for it to end, or give another folder", main)
        assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == files  # nothing touched
    finally:
        os.close(held)
    assert run_cli(*argv, "--resume") == 0  # released: the kernel drops a lock with its file (or process)


def last_line(capsys, *argv):
    """The last line main(argv) printed, which exited with code 2 and no traceback."""
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def test_fault_a_failed_write_names_the_file_and_keeps_the_last_checkpoint(tiny_testbed, tmp_path, monkeypatch,
                                                                            capsys):
    model, world = tiny_testbed
    argv = ["--model", model, "--data", world, *TINY_RUN, "--prime-steps", 6]
    assert run_cli(*argv, "--out", tmp_path / "whole") == 0
    out, real_save, calls = tmp_path / "full", train.save_file, []

    def disk_full_at_the_second(tensors, path, **kw):  # the checkpoint of step 4: half written, then ENOSPC
        calls.append(1)
        if len(calls) == 2:
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(tensors, path, **kw)

    monkeypatch.setattr(train, "save_file", disk_full_at_the_second)
    ckpt = out / "checkpoint-prime-prime.safetensors"
    assert last_line(capsys, *argv, "--out", out) == (f"error: {ckpt}: not written (No space left on device); the last "
                                                      f"checkpoint is step 2: resume with the same command and --resume "
                                                      f"--out {out}")
    assert checkpoint(ckpt)[0]["step"] == 2 and not list(out.glob("*.tmp"))
    monkeypatch.undo()
    real_write = train.atomic_write

    def read_only_model(path, write):  # the model folder refuses its weights
        if Path(path).name == "model.safetensors":
            raise CheckpointError(f"{path}: not written (Permission denied)")
        return real_write(path, write)

    monkeypatch.setattr(model_module, "atomic_write", read_only_model)
    assert last_line(capsys, *argv, "--out", out, "--resume") == \
        f"error: {out / 'model' / 'model.safetensors'}: not written (Permission denied)"
    monkeypatch.undo()
    assert checkpoint(ckpt)[0]["step"] == 6 and run_cli(*argv, "--out", out, "--resume") == 0
    a, b = weights(tmp_path / "whole" / "model"), weights(out / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_train_continued_mlm_is_seeded(tiny_testbed, tmp_path):
    model, world = tiny_testbed
    dropout = copy_with(model, tmp_path / "m", "config.json",
                        config_with(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))  # as XLM-R's
    argv = ["--stage", "pretrain", "--model", dropout, "--data", world, *TINY_RUN, "--pretrain-steps", 3]
    assert run_cli(*argv, "--out", tmp_path / "a") == 0 and run_cli(*argv, "--out", tmp_path / "b") == 0
    a, b = ((tmp_path / run / "model" / "model.safetensors").read_bytes() for run in "ab")
    assert a == b != (dropout / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------- study/

from xml.etree import ElementTree  # noqa: E402

from study import figures  # noqa: E402

STUDY = Path(__file__).resolve().parent / "study"


def test_study_scripts_import_and_explain_themselves(capsys):
    """Every Python file of study/ imports without running anything and answers --help; none is named like a module of
    the standard library (which it would shadow for the scripts beside it)."""
    files = sorted(STUDY.glob("*.py")) + sorted(STUDY.glob("*/*.py"))
    assert {"experiment", "probe", "figures", "verdict", "pool", "selection"} <= {f.stem for f in files}
    for f in files:
        assert f.stem not in sys.stdlib_module_names, f
        module = importlib.import_module(".".join(f.relative_to(STUDY.parent).with_suffix("").parts))
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0 and "usage:" in capsys.readouterr().out, f


def test_no_core_module_imports_matplotlib():
    code = "import sys, data, model, metapeft, train; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=STUDY.parent).returncode == 0


VERDICT = "{py} -m study.analysis.verdict {wt}/runs/{study}/cells/experiment.json {n}"
V6_TABLE = "(cd {wt} && {py} -m study.v6.table runs/v6/study --worlds {n})"  # it prints the verdict


@pytest.mark.parametrize("study, pin, first, last, script, last_step", [
    ("v4", "528169d", 1001, 1060, "bash study/v4.sh", VERDICT),
    ("v5", "528169d", 2001, 2160, "bash $REPO/study/v5/v5.sh", VERDICT),
    ("v6", "5747e2d", 3001, 3340, "NAME=study bash study/v6/run.sh", V6_TABLE)])
def test_study_reproduce_dry_run_names_the_pinned_commit(study, pin, first, last, script, last_step, tmp_path):
    commit, wt = (STUDY / study / "COMMIT").read_text().strip(), tmp_path / "worktree"

    def reproduce(*argv):
        return subprocess.run(["bash", "study/reproduce.sh", *map(str, argv)], cwd=STUDY.parent, capture_output=True,
                              text=True, env=os.environ | {"WORKTREE": str(wt), "PY": sys.executable})

    run = reproduce(study, "--dry-run")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.replace(str(STUDY.parent), "$REPO").splitlines()
    py = sys.executable.replace(str(STUDY.parent), "$REPO")  # CI's Python is in the repository's .venv
    assert commit.startswith(pin) and f"worlds {first}-{last}" in lines[0] and lines[0].endswith(commit)
    assert lines[1:] == [f"+ git worktree add --detach {wt} {commit}",
                         f"+ (cd {wt} && FIRST={first} N={last - first + 1} PY={py} {script})",
                         *lines[3:-1], "+ " + last_step.format(py=py, wt=wt, study=study, n=last - first + 1)]
    assert all(str(wt) in line for line in lines[1:]) and not wt.exists()  # a dry run makes nothing
    part = reproduce(study, first + 1, first + 2, "--dry-run")
    assert part.returncode == 0 and f"FIRST={first + 1} N=2 " in part.stdout
    for bad in (["v0"], [study, 1, 2], [study, first], [study, last, first]):
        run = reproduce(*bad, "--dry-run")
        assert run.returncode == 2 and run.stdout == "" and len(run.stderr.splitlines()) == 1, bad


def test_study_v6_archive_keeps_finished_worlds_and_restores_the_same_table(tmp_path, capsys):
    from study.v6 import archive, table
    run, store, pooled, rng = tmp_path / "run", tmp_path / "cells", tmp_path / "pooled", random.Random(0)

    def finish(world, cell, f1):
        path = archive.results_path(run, world, cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        scores = {lang: f1 + rng.random() / 10 for lang in ("en", "de", "ja", "ru", "tr")}
        path.write_text(json.dumps({"f1": scores, "target_avg_f1": statistics.mean(list(scores.values())[1:]),
                                    "dev_f1": {"en": f1}, "detail": {}}))
    for world in (7, 8, 9):
        for cell in table.CELLS:
            finish(world, cell, rng.random())
    finish(10, "none -> lora", 0.5)  # a world begun, not finished: not archived
    assert archive.save(run, store) == [7, 8, 9] and sorted(f.name for f in store.iterdir()) == [
        "7.json", "8.json", "9.json"]
    record = json.loads((store / "7.json").read_text())
    assert record["cpu"] and set(record["cells"]) == set(table.CELLS) and "detail" not in record["cells"]["none -> lora"]
    assert archive.restore(pooled, store) == [7, 8, 9]
    for folder in (run, pooled):  # the table of the restored archive is the table of the cells it was saved from
        table.main([str(folder), "--worlds", "3", "--save", str(tmp_path / folder.name)])
    tables = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("run", "pooled")]
    assert tables[0]["seeds"] == [7, 8, 9] and tables[0] == tables[1]
    before = (store / "7.json").read_text()
    finish(7, "none -> lora", 0.9)  # a rerun elsewhere: the archived (first, complete) world is kept
    assert archive.save(run, store) == [] and (store / "7.json").read_text() == before
    with pytest.raises(SystemExit, match="no such run folder"):
        archive.main(["save", str(tmp_path / "missing"), "--archive", str(store)])


def test_study_power_analysis_gives_v5s_logged_figures(capsys):
    from study.analysis import power
    power.main([str(STUDY / "results" / "v4.json"), "prime - multitask", "160"])
    out = capsys.readouterr().out
    rows = [line.split(" | ")[2] for line in out.splitlines() if line.startswith("| 160 |")]
    assert "sd 3.17" in out and [round(float(p), 2) for p in rows] == [0.97, 0.94, 0.97]  # study/LOG.md, v5
    power.main([str(STUDY / "results" / "v4.json"), "prime - multitask", "160", "--sd", "3.49", "--sd-worlds", "160"])
    wider = [float(line.split(" | ")[2]) for line in capsys.readouterr().out.splitlines() if line.startswith("| 160")]
    assert all(w < p for w, p in zip(wider, map(float, rows)))  # a larger spread decides less often


def test_study_verdict_of_the_committed_tables_is_the_logged_one():
    from study.analysis.verdict import verdict
    v4, v5 = (json.loads((STUDY / "results" / f"{s}.json").read_text()) for s in ("v4", "v5"))
    assert verdict(v5, 160) == ["prime - multitask: +0.81 [+0.27, +1.36], wins 94/160: differs (prime higher)"]
    assert verdict(v4, 60) == ["prime - multitask: +0.43 [-0.39, +1.25], wins 32/60: undecided",
                               "prime - maml: +2.11 [+1.20, +3.01], wins 40/60: differs (prime higher)"]
    assert verdict(v4, 61)[0].endswith("(PARTIAL: 60 of 61 worlds, descriptive, not the verdict)")
    one = {"seeds": [2001], "paired": {"prime - multitask": {"avg": {"mean": 1.5, "ci95": None, "wins": 1, "n": 1}}}}
    assert verdict(one, 160) == ["prime - multitask: +1.50 on one world: no interval (PARTIAL: 1 of 160 worlds)"]


def test_study_figures_are_the_committed_ones_and_deterministic(tmp_path, capsys):
    figures.main(["study", "--out", str(tmp_path / "a")])
    figures.main(["study", "answer", "--out", str(tmp_path / "b")])
    drawn = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert drawn == sorted(f"{n}.{e}" for n in figures.STUDY_FIGURES for e in ("svg", "png")) == sorted(
        p.name for p in (STUDY / "figures").iterdir())
    for name in drawn:
        svg = (tmp_path / "a" / name).read_bytes()
        if name.endswith(".png"):
            assert svg.startswith(b"\x89PNG") and len(svg) > 10_000
            continue
        root = ElementTree.fromstring(svg)
        assert root.tag == "{http://www.w3.org/2000/svg}svg" and len(root.findall(".//{*}path")) > 20
        assert b"<dc:date>" not in svg and svg == (STUDY / "figures" / name).read_bytes(), name  # data and figure agree
    assert (tmp_path / "b" / "answer.svg").read_bytes() == (tmp_path / "a" / "answer.svg").read_bytes()
    assert (tmp_path / "b" / "answer.png").read_bytes() == (tmp_path / "a" / "answer.png").read_bytes()


def drawn(fig, gid):
    """The (x, y) data of the artist with this gid in a figure."""
    found = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, gid
    a = found[0]
    return (a.get_xdata(), a.get_ydata()) if hasattr(a, "get_xdata") else tuple(zip(*a.get_offsets()))


def test_study_figures_draw_the_numbers_of_the_results():
    results = STUDY / "results"
    v4, v5 = (json.loads((results / f"{s}.json").read_text()) for s in ("v4", "v5"))
    answer = figures.draw_answer(results)
    assert list(drawn(answer, "ci:v5:prime - multitask")[0]) == v5["paired"]["prime - multitask"]["avg"]["ci95"]
    assert list(drawn(answer, "mean:v5:prime - multitask")[0]) == [v5["paired"]["prime - multitask"]["avg"]["mean"]]
    for name, stem in figures.STUDIES:  # every study's every interval
        report = json.loads((results / f"{stem}.json").read_text())
        for comparison in figures.COMPARISONS:
            if comparison in report["paired"]:
                assert list(drawn(answer, f"ci:{name}:{comparison}")[0]) == report["paired"][comparison]["avg"]["ci95"]
    assert not [a for ax in answer.axes for a in ax.get_children() if a.get_gid() == "ci:v5:prime - maml"]
    spread = figures.draw_spread(results)
    x = drawn(spread, "worlds:v5:prime - multitask")[0]
    assert len(x) == 160 and sum(d > 0 for d in x) == 94 == v5["paired"]["prime - multitask"]["avg"]["wins"]
    assert statistics.mean(x) == pytest.approx(v5["paired"]["prime - multitask"]["avg"]["mean"], abs=1e-12)
    assert len(drawn(spread, "worlds:v4:prime - maml")[0]) == 60
    languages = figures.draw_languages(results)
    for lang in ("en", "de", "ja", "ru", "tr", "avg"):
        assert list(drawn(languages, f"ci:v4:prime - none:{lang}")[0]) == v4["paired"]["prime - none"][lang]["ci95"]
    probe = figures.draw_probe(results)
    assert list(drawn(probe, "curve:prime:target avg")[1]) == [42.0, 44.6, 42.5, 47.0, 43.1]  # the probe's table
    assert list(drawn(probe, "curve:base:source")[1]) == [53.3, 76.0, 83.6, 85.9, 87.5]
    bars = [a for ax in probe.axes for a in ax.patches if a.get_gid() == "theta:multitask"]
    assert [round(b.get_height(), 6) for b in bars] == [21.9, 28.6, 29.6, 31.1, 33.3, 27.8]


def test_study_thesis_figure_draws_v6_final_table_else_the_partial_one(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(STUDY / "results", results)
    (results / "v6.json").unlink(missing_ok=True)
    partial = json.loads((results / "v6-study-partial.json").read_text())
    fig = figures.draw_thesis(results)
    for comparison in figures.V6_COMPARISONS:
        assert list(drawn(fig, f"ci:v6:{comparison}")[0]) == partial["paired"][comparison]["avg"]["ci95"]
        assert len(drawn(fig, f"worlds:v6:{comparison}")[0]) == len(partial["seeds"])
    assert partial["partial"] and "PARTIAL" in fig.get_suptitle()
    final = partial | {"partial": False, "seeds": partial["seeds"][:3]}  # the final table wins over a partial one
    (results / "v6.json").write_text(json.dumps(final))
    fig = figures.draw_thesis(results)
    assert len(drawn(fig, f"worlds:v6:{figures.V6_COMPARISONS[0]}")[0]) == 3 and "PARTIAL" not in fig.get_suptitle()
    (results / "v6.json").unlink()
    (results / "v6-study-partial.json").unlink()
    with pytest.raises(figures.FigureError, match="v6.json: missing"):
        figures.draw_thesis(results)


def test_study_figures_name_a_missing_or_malformed_file(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(STUDY / "results", results)
    (results / "v5.json").write_text('{"seeds": [1, 2], "paired": ')
    (results / "probe-v4-world1001-prime.md").write_text("| layer group | change |\n|---|---|\n| all | big |\n")
    v4 = json.loads((results / "v4.json").read_text())
    del v4["scores"]["maml"]
    (results / "v4.json").write_text(json.dumps(v4))
    for name, expected in (("answer", f"{results / 'v5.json'}: not valid JSON"),
                           ("spread", f"{results / 'v5.json'}: not valid JSON"),
                           ("probe", f"{results / 'probe-v4-world1001-prime.md'}: expected probe.py's tables")):
        with pytest.raises(SystemExit) as e:
            figures.main(["study", name, "--results", str(results), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {expected}") and err.count("\n") == 1, err
    shutil.copy(STUDY / "results" / "v5.json", results / "v5.json")
    (results / "final.json").unlink()
    for name, expected in (("answer", f"{results / 'final.json'}: missing"),
                           ("spread", f"{results / 'v4.json'}: no scores/maml (expected an experiment.json)")):
        with pytest.raises(SystemExit):
            figures.main(["study", name, "--results", str(results), "--out", str(tmp_path / "out")])
        assert capsys.readouterr().err == f"error: {expected}\n"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.svg"))


def test_figures_run_draws_prime_and_finetune_runs_overlaid_and_live(tiny_testbed, tmp_path, capsys):
    model, world = tiny_testbed
    common = ["--data", world, *TINY_RUN]
    assert run_cli("--stage", "prime", "--model", model, "--out", tmp_path / "p", "--prime-steps", 3, *common) == 0
    for name, encoder in (("primed", tmp_path / "p" / "model"), ("base", model)):
        assert run_cli("--stage", "finetune", "--model", encoder, "--out", tmp_path / name, "--finetune-steps", 6,
                       "--eval-every", 2, *common) == 0
    figures.main(["run", str(tmp_path / "p")])
    figures.main(["run", str(tmp_path / "primed"), str(tmp_path / "base"), "--out", str(tmp_path / "both")])
    assert (tmp_path / "p" / "curves.svg").stat().st_size > 1000 and (tmp_path / "both.png").exists()
    metrics = [json.loads(l) for l in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()]
    fig = figures.draw_run([tmp_path / "primed", tmp_path / "base"])
    assert [ax.get_title() for ax in fig.axes] == ["loss", "gradient norm", "learning rate", "source dev F1"]
    dev = [(m["step"], m["dev_f1"]) for m in metrics if "dev_f1" in m]
    assert list(zip(*drawn(fig, f"dev_f1:{tmp_path / 'base'}"))) == dev and len(dev) == 3
    best = max(dev, key=lambda p: p[1])
    assert list(zip(*drawn(fig, f"best:{tmp_path / 'base'}"))) == [best]
    assert [ax.get_title() for ax in figures.draw_run([tmp_path / "p"]).axes] == ["meta-loss", "gradient norm",
                                                                                  "learning rate"]
    live = tmp_path / "live"
    live.mkdir()
    text = (tmp_path / "base" / "metrics.jsonl").read_text()
    (live / "metrics.jsonl").write_text(text[:-20])  # a line still being written
    assert len(drawn(figures.draw_run([live]), f"loss:{live}")[0]) == len(metrics) - 1
    (live / "metrics.jsonl").write_text(text.replace("\n", "\nnot json\n", 1))
    capsys.readouterr()  # the runs' progress
    for folder, expected in ((live, f"{live / 'metrics.jsonl'}:2: not a JSON object"),
                             (tmp_path / "none", f"{tmp_path / 'none' / 'metrics.jsonl'}: missing")):
        with pytest.raises(SystemExit) as e:
            figures.main(["run", str(folder)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {expected}") and err.count("\n") == 1


def test_experiment_writes_the_table(tiny_testbed, tmp_path):
    model, world = tiny_testbed
    argv = ["--model", model, "--data", world, "--out", tmp_path / "x", "--seeds", 2,
            "--methods", "none,prime", "--prime-steps", 2, "--finetune-steps", 2, *TINY_RUN, *JOBS_1]
    assert run_cli(*argv, main=experiment.main) == 0
    table = (tmp_path / "x" / "experiment.md").read_text()
    result = json.loads((tmp_path / "x" / "experiment.json").read_text())
    summary, diff = result["summary"], result["paired"]["prime - none"]
    assert set(summary) == {"none", "prime"} and set(summary["prime"]) == {"en", "de", "ja", "ru", "tr", "avg", "select"}
    dev = json.loads((tmp_path / "x" / "seed1" / "prime" / "results.json").read_text())["dev_f1"]
    assert set(dev) == {"en", "es", "el"}  # selection sees the source and priming languages only, never a target
    assert result["scores"]["prime"]["1"]["select"] == pytest.approx(50 * (dev["es"] + dev["el"]))
    assert "| prime - none |" in table
    avg = {m: [json.loads((tmp_path / "x" / f"seed{s}" / m / "results.json").read_text())["target_avg_f1"] * 100
               for s in (0, 1)] for m in ("none", "prime")}
    assert summary["prime"]["avg"]["mean"] == pytest.approx(sum(avg["prime"]) / 2)
    d = [p - n for p, n in zip(avg["prime"], avg["none"])]
    half = 12.7062 * abs(d[0] - d[1]) / 2  # t(0.975, 1) * stdev / sqrt(2), with stdev = |d0 - d1| / sqrt(2)
    assert diff["avg"]["mean"] == pytest.approx(sum(d) / 2) and diff["avg"]["wins"] == sum(x > 0 for x in d)
    assert diff["avg"]["ci95"] == pytest.approx([sum(d) / 2 - half, sum(d) / 2 + half], abs=1e-3)
    assert set(diff) == set(summary["prime"]) and result["scores"]["prime"]["1"]["avg"] == avg["prime"][1]
    assert table.startswith("| method | en (source) |") and "| prime |" in table and f"| {diff['avg']['wins']}/2 |" in table
    mtime = (tmp_path / "x" / "seed0" / "prime" / "results.json").stat().st_mtime
    assert run_cli(*argv, main=experiment.main) == 0  # finished cells are kept, not rerun
    assert (tmp_path / "x" / "seed0" / "prime" / "results.json").stat().st_mtime == mtime
    assert run_cli(*argv[:9], "prime,none", *argv[10:], main=experiment.main) == 0  # whatever the order of --methods
    assert (tmp_path / "x" / "experiment.md").read_text().splitlines()[2] == table.splitlines()[3]


def test_experiment_cell_is_the_mean_of_its_prime_and_finetune_seeds(tiny_testbed, tmp_path):
    model, world = tiny_testbed
    steps = ["--prime-steps", 2, "--finetune-steps", 3, "--eval-every", 1, "--threads", 1, *TINY_RUN]
    argv = ["--model", model, "--data", world, "--out", tmp_path / "x", "--seed", 5, "--seeds", 1, "--methods",
            "none,prime", "--prime-seeds", 2, "--finetune-seeds", 2, *JOBS_1, *steps]
    assert run_cli(*argv, main=experiment.main) == 0
    result = json.loads((tmp_path / "x" / "experiment.json").read_text())
    single = {}  # the same runs as single stages: prime with seed p, fine-tune its model with seed f, evaluate
    for p in (None, 5, 1005):
        primed = model if p is None else tmp_path / f"p{p}" / "model"
        if p is not None:
            assert run_cli("--stage", "prime", "--model", model, "--data", world, "--seed", p, "--out",
                           tmp_path / f"p{p}", *steps) == 0
        for f in (5, 1005):
            out = tmp_path / f"p{p}-f{f}"
            assert run_cli("--stage", "finetune", "--model", primed, "--data", world, "--seed", f, "--out",
                           out / "ft", *steps) == 0
            assert run_cli("--stage", "eval", "--model", out / "ft" / "model", "--data", world, "--out", out / "ev",
                           *steps) == 0
            single[p, f] = json.loads((out / "ev" / "results.json").read_text())["target_avg_f1"]
    runs = {m: [(r.get("prime_seed"), r["finetune_seed"], r["target_avg_f1"]) for r in result["runs"][m]["5"]]
            for m in ("none", "prime")}
    assert runs["none"] == [(5, f, single[None, f]) for f in (5, 1005)]  # none: one unprimed encoder, 2 fine-tunings
    assert runs["prime"] == [(p, f, single[p, f]) for p in (5, 1005) for f in (5, 1005)]
    for m, keys in (("none", [(None, 5), (None, 1005)]), ("prime", [(p, f) for p in (5, 1005) for f in (5, 1005)])):
        assert result["scores"][m]["5"]["avg"] == 100 * statistics.mean(single[k] for k in keys)  # bit for bit
    assert "Each cell is the mean of its runs (none 2, prime 4" in (tmp_path / "x" / "experiment.md").read_text()
    mtime = (tmp_path / "x" / "seed5" / "prime" / "results.json").stat().st_mtime
    assert run_cli(*argv, main=experiment.main) == 0  # finished cells are kept; one with fewer runs is run again
    assert (tmp_path / "x" / "seed5" / "prime" / "results.json").stat().st_mtime == mtime
    assert run_cli(*argv[:-len(steps)], "--prime-seeds", 1, "--finetune-seeds", 1, *steps, main=experiment.main) == 0
    assert "runs" not in json.loads((tmp_path / "x" / "seed5" / "prime" / "results.json").read_text())


# ----------------------------------------------------------------------------- priming for one PEFT method,
# fine-tuning with another (study v6: prime[X] -> Y)

def test_experiment_primes_for_one_peft_method_and_finetunes_with_another(tiny_testbed, tmp_path):
    model, world = tiny_testbed
    steps = ["--prime-steps", 2, "--finetune-steps", 3, "--eval-every", 1, "--threads", 1, "--adapter-size", 4,
             *TINY_RUN]
    argv = ["--model", model, "--data", world, "--out", tmp_path / "x", "--seed", 3, "--seeds", 1, "--methods",
            "none,prime", "--peft", "lora", *JOBS_1, *steps]
    assert run_cli(*argv, "--prime-peft", "houlsby", main=experiment.main) == 0
    assert run_cli(*argv, main=experiment.main) == 0  # the matched cell beside it, named as before
    cell = tmp_path / "x" / "seed3" / "prime-houlsby"
    config = json.loads((cell / "config.json").read_text())
    assert config["peft"] == "lora" and config["prime_peft"] == "houlsby"
    assert config["primed_with"]["mode"] == "prime" and config["primed_with"]["peft"]["method"] == "houlsby"
    assert config["primed_with"]["peft"]["adapter_size"] == 4
    assert json.loads((cell / "prime" / "model" / "primed.json").read_text()) == config["primed_with"]
    assert saved_peft_config(cell / "finetune" / "model").method == "lora"  # fine-tuned with LoRA, from a fresh phi
    matched = json.loads((tmp_path / "x" / "seed3" / "prime" / "config.json").read_text())["primed_with"]
    assert matched["peft"]["method"] == "lora"
    # the same cell as train.py's stages: prime for Houlsby adapters, then fine-tune that encoder with LoRA
    common = ["--data", world, "--seed", 3, *steps]
    assert run_cli("--stage", "prime", "--model", model, "--out", tmp_path / "p", "--peft", "houlsby", *common) == 0
    assert json.loads((tmp_path / "p" / "config.json").read_text())["peft"] == "houlsby"
    assert (tmp_path / "p" / "model" / "model.safetensors").read_bytes() == \
        (cell / "prime" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "p" / "model" / "model.safetensors").read_bytes() != \
        (tmp_path / "x" / "seed3" / "prime" / "prime" / "model" / "model.safetensors").read_bytes()  # LoRA-primed
    assert run_cli("--stage", "finetune", "--model", tmp_path / "p" / "model", "--out", tmp_path / "f", "--peft",
                   "lora", *common) == 0
    ft = json.loads((tmp_path / "f" / "config.json").read_text())
    assert ft["peft"] == "lora" and ft["primed_with"] == config["primed_with"]
    a, b = weights(tmp_path / "f" / "model"), weights(cell / "finetune" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "x" / "seed3" / "none" / "config.json").read_text())["primed_with"] is None
    # the table names the crossed cell by both methods, and pairs it with the others
    assert run_cli(*argv, "--prime-peft", "houlsby", main=experiment.main) == 0
    result = json.loads((tmp_path / "x" / "experiment.json").read_text())
    assert set(result["scores"]) == {"none", "prime[houlsby] -> lora"}
    assert set(result["paired"]) == {"prime[houlsby] -> lora - none"}
    assert "| prime[houlsby] -> lora |" in (tmp_path / "x" / "experiment.md").read_text()


def test_experiment_finetunes_a_given_primed_model_as_its_own_priming_would(tiny_testbed, tmp_path, capsys):
    model, world = tiny_testbed
    argv = ["--model", model, "--data", world, "--seed", 3, "--seeds", 1, "--methods", "prime", "--prime-peft",
            "houlsby", "--prime-steps", 2, "--finetune-steps", 3, "--eval-every", 1, "--threads", 1, "--adapter-size",
            4, *JOBS_1, *TINY_RUN]
    assert run_cli(*argv, "--out", tmp_path / "a", "--peft", "lora", main=experiment.main) == 0
    primed = tmp_path / "a" / "seed3" / "prime-houlsby" / "prime" / "model"  # primed for Houlsby adapters
    assert run_cli(*argv, "--out", tmp_path / "b", "--peft", "houlsby", main=experiment.main) == 0  # primes again
    assert run_cli(*argv, "--out", tmp_path / "c", "--peft", "houlsby", "--primed", primed, main=experiment.main) == 0
    own, given = tmp_path / "b" / "seed3" / "prime", tmp_path / "c" / "seed3" / "prime"
    assert (own / "prime").is_dir() and not (given / "prime").exists()  # no second priming
    a, b = weights(own / "finetune" / "model"), weights(given / "finetune" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((given / "config.json").read_text())
    assert config["primed_with"] == json.loads((primed / "primed.json").read_text()) | {"model": str(primed)}
    capsys.readouterr()
    # a model these flags would not have primed, or a cell of several primings: a one-line error, nothing run
    for bad, says in ((["--prime-peft", "lora"], "primed.json says"), (["--adapter-size", 8], "primed.json says"),
                      (["--seeds", 2], "--seeds 1"), (["--methods", "prime,maml"], "one priming method"),
                      (["--primed", tmp_path], "no primed.json")):
        assert run_cli(*argv, "--out", tmp_path / "d", "--peft", "houlsby", "--primed", primed, *bad,
                       main=experiment.main) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "d" / "seed3").exists()


def test_train_patience_rule_stops_at_the_right_step():
    curve = [0.1, 0.3, 0.2, 0.3, 0.25, 0.4, 0.1, 0.2, 0.3]  # the tie at eval 4 is no improvement
    stops = lambda patience: [n for n in range(1, len(curve) + 1) if train.patience_exhausted(curve[:n], patience)]
    assert stops(3)[0] == 5 and stops(1)[0] == 3 and stops(4) == [] and stops(0) == []


def test_train_finetune_stops_early_and_a_stopped_run_stays_stopped(tiny_testbed, tmp_path):
    model, world = tiny_testbed
    argv = ["--stage", "finetune", "--model", model, "--data", world, "--out", tmp_path / "f", *TINY_RUN,
            "--finetune-steps", 40, "--eval-every", 1, "--patience", 2, "--ckpt-every", 100]
    assert run_cli(*argv) == 0
    lines = [json.loads(l) for l in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    f1s = [l["dev_f1"] for l in lines]
    assert len(lines) < 40 and train.patience_exhausted(f1s, 2) and not train.patience_exhausted(f1s[:-1], 2)
    before = weights(tmp_path / "f" / "model")
    assert run_cli(*argv, "--resume") == 0
    assert (tmp_path / "f" / "metrics.jsonl").read_text().count("\n") == len(lines)
    after = weights(tmp_path / "f" / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_experiment_t_quantile():
    for dof, t in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (8, 2.3060), (30, 2.0423), (1000, 1.9623)):
        assert experiment.t_quantile(0.975, dof) == pytest.approx(t, abs=2e-4)


def test_train_progress_eta_rounds_to_whole_seconds(capsys):
    # 1 step in 19.96 s, 9 to go: 179.64 s, which is 3m00s (it once printed 2m60s)
    train.show_progress(train.progress_line("x", 1, 10, {"loss": 0.5}, steps_per_s=1 / 19.96, tokens_per_s=0), 1, 10,
                        last=True)
    assert capsys.readouterr().err.strip().endswith("| 0 tok/s ETA 3m00s")


def test_train_progress_of_a_loop_shows_each_twentieth_once_after_its_delay(monkeypatch, capsys):
    for delay, lines in ((0.0, 20), (60.0, 0)):  # a quick loop prints nothing
        monkeypatch.setattr(train, "PROGRESS_DELAY", delay)
        report = train.progress("eval test-de", 1000, "sent")
        for done in [*range(30, 1000, 30), 1000]:  # batches of 30 sentences: a line per 50 passed, and the last
            report(done)
        err = capsys.readouterr().err.splitlines()
        assert len(err) == lines
        assert all(re.fullmatch(r"eval test-de \d+/1000 \| \d+ sent/s ETA \dm\d\ds", l) for l in err)
        assert not err or err[-1].startswith("eval test-de 1000/1000 ") and err[-1].endswith("ETA 0m00s")


def test_experiment_jobs_2_gives_the_same_table_as_jobs_1(tiny_testbed, tmp_path):
    model, world = tiny_testbed
    argv = ["--model", model, "--data", world, "--seeds", 2, "--methods", "none,multitask",
            "--prime-steps", 2, "--finetune-steps", 3, "--eval-every", 1, *TINY_RUN]
    torch.set_num_threads(2)  # what a process has by default on 2 cores: a --jobs 1 cell must not run at it
    try:
        assert run_cli(*argv, "--out", tmp_path / "j1", "--jobs", 1, main=experiment.main) == 0
        assert torch.get_num_threads() == 1  # --threads 0: one per cell
    finally:
        torch.set_num_threads(1)
    assert run_cli(*argv, "--out", tmp_path / "j2", "--jobs", 2, main=experiment.main) == 0
    assert (tmp_path / "j1" / "experiment.md").read_bytes() == (tmp_path / "j2" / "experiment.md").read_bytes()
    assert (tmp_path / "j1" / "experiment.json").read_bytes() == (tmp_path / "j2" / "experiment.json").read_bytes()
    assert "finetune: best en dev F1" in (tmp_path / "j2" / "seed1" / "multitask" / "log.txt").read_text()
    a, b = (weights(tmp_path / j / "seed1" / "multitask" / "finetune" / "model") for j in ("j1", "j2"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_experiment_sigterm_ends_its_cells_and_resumes_to_the_same_table(tiny_testbed, tmp_path):
    model, world = tiny_testbed
    argv = [str(a) for a in ["--model", model, "--data", world, "--seeds", 2, "--methods", "none,prime", "--prime-steps", 10, "--finetune-steps", 40, "--patience", 0, *TINY_RUN,
                             "--jobs", 2]]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "study/experiment.py", *argv, "--out", str(out)], stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)), start_new_session=True)
    while not list(out.glob("seed*/*/log.txt")) and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(2)  # the cells are under way
    proc.send_signal(signal.SIGTERM)  # to the experiment's process alone
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert proc.stderr.read().splitlines()[-1] == (f"experiment: stopped by SIGTERM, its finished cells kept; to go "
                                                   f"on, run the same command with --resume --out {out}")
    for _ in range(50):  # no process of its session is left (the cells' included)
        try:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)
        except ProcessLookupError:
            break
    else:
        raise AssertionError("processes of the stopped experiment are still running")
    assert not (out / "experiment.json").exists()
    assert run_cli(*argv, "--out", out, "--resume", main=experiment.main) == 0
    assert run_cli(*argv, "--out", tmp_path / "whole", main=experiment.main) == 0
    assert (out / "experiment.json").read_bytes() == (tmp_path / "whole" / "experiment.json").read_bytes()


def test_experiment_per_world_builds_one_world_per_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "WorldConfig", functools.partial(data.WorldConfig, **_TINY))
    monkeypatch.setattr(data, "write_tokenizer", functools.partial(data.write_tokenizer, vocab_size=600))
    argv = ["--per-world", "--testbed", tmp_path / "tb", "--seed", 3, "--seeds", 2, "--methods", "none",
            "--pretrain-steps", 2, "--finetune-steps", 2, *TINY_RUN, *JOBS_1]
    assert run_cli(*argv, "--out", tmp_path / "x", main=experiment.main) == 0
    worlds = [(tmp_path / f"tb-{s}" / "data" / "train-en.tsv").read_text() for s in (3, 4)]
    assert worlds[0] != worlds[1] and (tmp_path / "tb-4" / "pretrain" / "model" / "model.safetensors").exists()
    tokenizer = lambda folder: (folder / "tokenizer.json").read_bytes()
    for s, other in ((3, 4), (4, 3)):  # each cell's model has its own world's tokenizer
        tuned = tokenizer(tmp_path / "x" / f"seed{s}" / "none" / "finetune" / "model")
        assert tuned == tokenizer(tmp_path / f"tb-{s}" / "data") != tokenizer(tmp_path / f"tb-{other}" / "data")
    assert run_cli(*argv, "--out", tmp_path / "y", "--model", tmp_path / "tb-3" / "pretrain" / "model",
                   main=experiment.main) == 2


def test_probe_on_a_tiny_world(tiny_testbed, tmp_path):
    model, world = tiny_testbed
    assert run_cli("--stage", "prime", "--model", model, "--out", tmp_path / "p", "--prime-steps", 2, "--data", world,
                   *TINY_RUN) == 0
    common = ["--data", world, *TINY_RUN, "--probe-episodes", 2]
    primed = tmp_path / "p" / "model"
    # the probe's episodes are priming's: a new support batch per inner step (--support-batches) works there too
    assert run_cli("--model", primed, "--base", model, "--out", tmp_path / "probe-batches", "--finetune-steps", 25,
                   "--inner-steps", 5, "--support-batches", 5, *common, main=probe.main) == 0  # > --support-size
    assert run_cli("--model", primed, "--base", model, "--out", tmp_path / "probe", "--finetune-steps", 50,
                   *common, main=probe.main) == 0
    r = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert list(r["theta_change"]) == ["embeddings", "layer 0", "all"] and all(0 < c < 0.1 for c in r["theta_change"].values())
    langs = ["el", "es", "de", "ja", "ru", "tr"]
    assert sorted(r["meta_loss"]["primed"]) == sorted(langs) and r["meta_loss"]["primed"] != r["meta_loss"]["base"]
    assert set(r["dev_f1_curve"]["base"]) == {"25", "50"} and set(r["dev_f1_curve"]["primed"]["50"]) == {"en", *langs[2:], "target avg"}
    curve = [json.loads(l) for l in (tmp_path / "probe" / "finetune-primed" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in curve if "dev_f1_ja" in l] == [25, 50]  # patience off, eval every 25 steps
    assert "| layer 0 |" in (tmp_path / "probe" / "probe.md").read_text()
    # the same encoder as both: no change, and the same fresh phi and episodes give the same losses
    assert run_cli("--model", model, "--base", model, "--out", tmp_path / "same", "--finetune-steps", 25, *common,
                   main=probe.main) == 0
    same = json.loads((tmp_path / "same" / "probe.json").read_text())
    assert same["theta_change"]["all"] == 0 and same["meta_loss"]["base"] == same["meta_loss"]["primed"]
