"""Tests for metapeft. transformers, peft and seqeval appear here only, as reference implementations."""
import json
import os
import random
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import metapeft as mp
from data import DataError, Example, Sentence
from model import CheckpointError, Config, Model, PeftConfig, is_head, is_peft, load_lora_adapter, load_peft, \
    load_pretrained, save_lora_adapter, saved_peft_config, theta_phi

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
    with torch.no_grad():
        h_ref = ref.roberta(ids, attention_mask=mask).last_hidden_state
        assert (ours.encoder(ids, mask) - h_ref).abs().max() < 1e-5
        assert (ours(ids, mask) - ref(ids, attention_mask=mask).logits).abs().max() < 1e-5


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
        assert (ours.mlm_logits(ids, mask) - ref(ids, attention_mask=mask).logits).abs().max() < 1e-5
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
        assert (back(ids, attention_mask=mask).logits - ours(ids, mask)).abs().max() < 1e-5
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
        assert (load_pretrained(shard).eval()(ids, mask) - ref(ids, attention_mask=mask).logits).abs().max() < 1e-5


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


def test_model_config_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act must be 'gelu'"):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="LoRA targets"):
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
        assert (theirs(input_ids=ids, attention_mask=mask).logits - ours(ids, mask)).abs().max() < 1e-5
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
        assert (theirs(input_ids=ids, attention_mask=mask).logits - ours(ids, mask)).abs().max() < 1e-5
    _, other_size = hf_token_model(tmp_path / "other", TINY[2])
    (tmp_path / "rslora").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        text = (tmp_path / "trained" / name).read_bytes()
        (tmp_path / "rslora" / name).write_bytes(text.replace(b'"use_rslora": false', b'"use_rslora": true'))
    for base, cfg, folder, message in [
        (path, replace(peft, lora_r=4), "trained", "lora_r 2 (the model's: 4)"),
        (path, replace(peft, lora_targets=("query", "key", "value")), "trained", "lora_targets ('query', 'value')"),
        (path, replace(peft, lora_dropout=0.0), "trained", "lora_dropout 0.05"),
        (other_size, peft, "trained", "tensor(s): base_model.model."),
        (path, peft, "rslora", "use_rslora=True"),
        (path, replace(peft, method="houlsby"), "trained", "holds LoRA and a token-classification head"),
        (path, peft, "nothing", "not a peft adapter folder"),
    ]:
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
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


def test_data_read_conll(tmp_path):
    text = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O  \n\n\nPeter NNP B-NP B-PER\n"
    p = _write(tmp_path / "de" / "train.txt", text, newline="\r\n")
    assert data.read_ner(p, "de") == [Sentence(["EU", "rejects"], ["B-ORG", "O"], "de"),
                                      Sentence(["Peter"], ["B-PER"], "de")]
    assert data.read_ner(p)[0].lang == "und"


def test_data_read_jsonl(tmp_path):
    recs = [{"tokens": ["Paris", "is"], "ner_tags": [5, 0], "langs": ["fr", "fr"]},
            {"tokens": ["Ann"], "ner_tags": ["B-PER"], "lang": "fr"},
            {"tokens": ["X"], "ner_tags": [1], "labels": ["O", "B-ORG"]}]
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
])
def test_data_bad_input_raises(tmp_path, name, text, lang, msg):
    with pytest.raises(DataError, match=msg) as e:
        data.read_ner(_write(tmp_path / name, text), lang)
    assert "\n" not in str(e.value)


def test_data_missing_split_and_unknown_label(tmp_path):
    with pytest.raises(DataError, match=r"no dev split for 'xx'; tried .*dev-xx\.tsv.*xx/dev\.jsonl"):
        data.read_split(tmp_path, "dev", "xx")
    sents = [Sentence(["a", "b"], ["B-PER", "B-MISC"], "en")]
    with pytest.raises(DataError, match="test-de: sentence 0: label 'B-MISC' is not one of"):
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
                                if s == "train" or l not in cfg.priming_only] + ["tokenizer.json", "unlabeled.txt"])
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
    return torch.autograd.grad(loss, list(tensors))


def max_diff(xs, ys):
    return max((x - y).abs().max().item() for x, y in zip(xs, ys, strict=True))


# ----------------------------------------------------------------------------- meta-gradients

@pytest.mark.parametrize("method,K,meta_sgd", [("lora", 1, False), ("lora", 2, True),
                                               ("houlsby", 1, True), ("houlsby", 2, False)])
def test_prime_second_order_matches_finite_differences(method, K, meta_sgd):
    model = tiny_model(method)
    cfg = mp.PrimeConfig(inner_steps=K, inner_lr=0.5, meta_sgd=meta_sgd, outer="theta+phi", phi_start="meta")
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
        fd = (f(moved(1e-5)).item() - f(moved(-1e-5)).item()) / 2e-5
        along_d = lambda g: sum((gi * di).sum() for gi, di in zip(g, [v for group in d for v in group.values()]))
        assert abs(along_d(exact) - fd) < 1e-4 * abs(fd), (along_d(exact), fd)
        assert abs(along_d(first_order) - fd) > 1e-3 * abs(fd)  # the probe does see the second-order terms


def test_prime_first_order_is_query_gradient_at_adapted_phi():
    model = tiny_model()
    cfg = mp.PrimeConfig(inner_steps=2, inner_lr=0.5, first_order=True, outer="theta+phi", phi_start="meta")
    support, query = task()
    theta, phi0 = theta_phi(model)
    got = grads(mp.task_loss(model, theta, phi0, support, query, cfg), [*theta.values(), *phi0.values()])
    phi = {n: p.detach() for n, p in phi0.items()}  # plain SGD on detached values: inner gradients are constants
    for _ in range(cfg.inner_steps):
        phi = {n: p.requires_grad_() for n, p in phi.items()}
        g = grads(mp.ce_loss(model, {**theta, **phi}, support), phi.values())
        phi = {n: (p - cfg.inner_lr * gi).detach() for (n, p), gi in zip(phi.items(), g)}
    phi = {n: p.requires_grad_() for n, p in phi.items()}
    want = grads(mp.ce_loss(model, {**theta, **phi}, query), [*theta.values(), *phi.values()])
    assert max_diff(got, want) < 1e-10


@pytest.mark.parametrize("mode", ["prime", "maml"])
def test_prime_inner_loop_adapts_phi_only_and_never_writes_the_model(mode, monkeypatch):
    model = tiny_model()
    before = {n: (p.detach().clone(), p._version) for n, p in model.named_parameters()}
    passes, ce_loss = [], mp.ce_loss
    monkeypatch.setattr(mp, "ce_loss", lambda m, params, b: passes.append(params) or ce_loss(m, params, b))
    cfg = mp.PrimeConfig(mode=mode, inner_steps=2, inner_lr=0.5, outer="theta+phi", phi_start="meta")
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
    prime = grads(mp.meta_loss(model, tasks, mp.PrimeConfig(inner_steps=0, phi_start="meta")), params)
    multitask = grads(mp.meta_loss(model, [(q, q) for _, q in tasks], mp.PrimeConfig(mode="multitask")), params)
    assert max_diff(prime, multitask) < 1e-10


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
        cfg = mp.PrimeConfig(inner_steps=1, inner_lr=0.5, first_order=first_order, phi_start="meta")
        fused_enabled.clear()
        auto = grads(mp.task_loss(model, theta, phi, support, query, cfg), params)
        assert fused_enabled == expected  # two layers: support pass, then query pass
        with sdpa_kernel([SDPBackend.MATH]):
            math = grads(mp.task_loss(model, theta, phi, support, query, cfg), params)
        assert max_diff(auto, math) < 1e-6


# ----------------------------------------------------------------------------- helpers

def test_prime_config_validation():
    for bad in (dict(mode="reptile"), dict(outer="phi"), dict(phi_start="zero"), dict(inner_steps=-1),
                dict(outer="theta+phi"), dict(mode="multitask", meta_sgd=True), dict(inner_steps=0, meta_sgd=True)):
        with pytest.raises(ValueError):
            mp.PrimeConfig(**bad)
    with pytest.raises(ValueError, match="none"):
        mp.meta_loss(tiny_model(), [task()], mp.PrimeConfig(mode="none"))


def test_prime_outer_update_helpers():
    model = tiny_model()
    cfg = mp.PrimeConfig(freeze_embeddings=True, meta_sgd=True, inner_lr=0.1, lr=1e-2, warmup=2)
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
    model.mlm_logits = lambda inputs, mask: seen.append(inputs) or Model.mlm_logits(model, inputs, mask)
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
    cfg = mp.PrimeConfig(inner_lr=0.3, lr=3e-3, warmup=3)
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
        assert torch.allclose(ours(*x), hf(*x).logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------- train.py

import train  # noqa: E402

TINY_RUN = ["--tiny-hidden", "32", "--tiny-layers", "1", "--max-len", "48", "--batch-size", "8", "--tasks", "2",
            "--support-size", "4", "--query-size", "4", "--ckpt-every", "2", "--eval-batch-size", "16"]


@pytest.fixture(scope="module")
def tiny_testbed(tmp_path_factory):
    """A tiny testbed world and a tiny MLM-pretrained encoder made by the pretrain stage."""
    root = tmp_path_factory.mktemp("testbed")
    data.make_world(root / "data", data.WorldConfig(**_TINY))
    data.write_tokenizer(root / "data", vocab_size=600)
    train.main(["--stage", "pretrain", "--data", str(root / "data"), "--out", str(root / "pre"),
                "--pretrain-steps", "4", *TINY_RUN])
    return root / "pre" / "model", root / "data"


def run_cli(*argv):
    try:
        train.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def test_train_stages_chain_on_a_tiny_testbed(tiny_testbed, tmp_path):
    model, world = tiny_testbed
    assert json.loads((model / "config.json").read_text())["architectures"] == ["XLMRobertaForMaskedLM"]
    pre = json.loads((model.parent / "pretrain.json").read_text())
    assert pre["loss_after"] < pre["loss_before"]
    mlm = load_pretrained(model, mlm=True)  # the MLM head too: unexpected or missing keys would raise
    tok = data.load_tokenizer(model)
    assert mlm.mlm_logits(torch.tensor([tok.encode("Duhelaim Nagis .").ids])).shape[-1] == tok.get_vocab_size()
    common = ["--data", world, *TINY_RUN]
    assert run_cli("--stage", "prime", "--model", model, "--out", tmp_path / "p", "--prime-steps", 3, *common) == 0
    assert run_cli("--stage", "finetune", "--model", tmp_path / "p" / "model", "--out", tmp_path / "f",
                   "--finetune-steps", 4, "--phi-init", "primed", *common) == 0
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
        with safe_open(str(folder / name), "pt") as f:
            out |= {f"{name}:{k}": f.get_tensor(k) for k in f.keys()}
    return out


@pytest.mark.parametrize("stage, extra", [("prime", ["--prime-steps", 6, "--meta-sgd"]),
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
    assert not (tmp_path / "killed" / "model").exists()
    assert run_cli(*argv, "--out", tmp_path / "killed", "--resume") == 0
    a, b = weights(tmp_path / "whole" / "model"), weights(tmp_path / "killed" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


KILLED_AFTER_4 = """import sys, metapeft, train
real_step, calls = metapeft.step, []
def killed_after_4(*a, **k):  # every process dies in step 5, after the checkpoint at step 4
    calls.append(1)
    if len(calls) == 5:
        raise SystemExit("killed")
    return real_step(*a, **k)
metapeft.step = killed_after_4
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
    if stage == "finetune":
        return
    (tmp_path / "killed_after_4.py").write_text(KILLED_AFTER_4)
    code, log = torchrun(tmp_path / "killed_after_4.py", *argv, "--out", tmp_path / "killed")
    assert code != 0 and "killed" in log and not (tmp_path / "killed" / "model").exists()
    code, log = torchrun("train.py", *argv, "--out", tmp_path / "killed", "--resume")
    assert code == 0 and "resumed from" in log, log[-3000:]
    again = weights(tmp_path / "killed" / "model")
    assert all(torch.equal(again[k], two[k]) for k in two)


def test_train_export_and_import(tiny_testbed, tmp_path, monkeypatch):
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
        assert (base.eval()(ids, attention_mask=mask).last_hidden_state - hidden).abs().max() < 1e-5
        assert (mlm.eval().roberta(ids, attention_mask=mask).last_hidden_state - hidden).abs().max() < 1e-5
        assert (mlm(ids, attention_mask=mask).logits - ours.mlm_logits(ids, mask)).abs().max() < 1e-5
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
        assert (theirs(input_ids=ids, attention_mask=mask).logits - ours(ids, mask)).abs().max() < 1e-5
    # The adapter back in: fine-tuning from it for 0 steps saves the same model.
    assert run_cli("--stage", "finetune", "--model", primed, "--out", tmp_path / "g", "--finetune-steps", 0,
                   "--phi-init", tmp_path / "adapter", *common) == 0
    a, b = weights(tuned), weights(tmp_path / "g" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    adapter = tmp_path / "adapter"
    for argv, message in [(["--stage", "finetune", "--lora-r", 4, "--phi-init", adapter], "lora_r 8"),
                          (["--stage", "finetune", "--peft", "houlsby", "--phi-init", adapter], "holds LoRA"),
                          (["--stage", "export", "--format", "peft"], "has no LoRA parameters")]:
        code = run_cli(*argv, "--model", primed if argv[1] == "finetune" else tmp_path / "hf-mlm",
                       "--out", tmp_path / "bad", *common)
        assert isinstance(code, str) and message in code and "\n" not in code, code
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
    assert "runs in one process" in run_cli("--stage", "export", "--model", tuned, "--out", tmp_path / "bad")


def test_train_bad_input_is_one_line(tiny_testbed, tmp_path, capsys):
    model, world = tiny_testbed
    (tmp_path / "empty").mkdir()
    (tmp_path / "nosource").mkdir()
    (tmp_path / "nosource" / "train-de.tsv").write_text("de:Berlin\tB-LOC\n")
    cases = [
        (["--model", tmp_path / "empty", "--data", world], "--model {}: no config.json".format(tmp_path / "empty")),
        (["--model", model, "--data", tmp_path / "nosource"], "no train split for the source language 'en'"),
        (["--model", model, "--data", world, "--eval-langs", "xx"], "unknown language 'xx'"),
        (["--model", model, "--data", world, "--outer", "theta+phi"], "outer='theta+phi' needs phi_start='meta'"),
        (["--model", model], "give both --model and --data"),
        (["--stage", "finetune", "--model", model, "--data", world, "--phi-init", "primed"], "has no PEFT init"),
    ]
    for argv, message in cases:
        code = run_cli(*argv, "--out", tmp_path / "run", *TINY_RUN)
        assert isinstance(code, str) and code.startswith("error: ") and message in code and "\n" not in code, code
    for argv in (["--stage", "train"], ["--mode", "reptile"]):
        assert run_cli(*argv) == 2 and "invalid choice" in capsys.readouterr().err
    run_cli("--model", model, "--data", world, "--prime-langs", "de", "--eval-langs", "de,ru", "--prime-steps", 1,
            "--out", tmp_path / "overlap", *TINY_RUN)
    assert "priming languages ['de'] are also evaluated on" in capsys.readouterr().err


def test_train_experiment_writes_the_table(tiny_testbed, tmp_path):
    model, world = tiny_testbed
    argv = ["--stage", "experiment", "--model", model, "--data", world, "--out", tmp_path / "x", "--seeds", 2,
            "--methods", "none,prime", "--prime-steps", 2, "--finetune-steps", 2, *TINY_RUN]
    assert run_cli(*argv) == 0
    table = (tmp_path / "x" / "experiment.md").read_text()
    summary = json.loads((tmp_path / "x" / "experiment.json").read_text())
    assert set(summary) == {"none", "prime"} and set(summary["prime"]) == {"en", "de", "ja", "ru", "tr", "avg"}
    scores = [json.loads((tmp_path / "x" / f"seed{s}" / "prime" / "results.json").read_text())["target_avg_f1"]
              for s in (0, 1)]
    assert summary["prime"]["avg"]["mean"] == pytest.approx(100 * sum(scores) / 2)
    assert table.startswith("| method | en (source) |") and "| prime |" in table
    mtime = (tmp_path / "x" / "seed0" / "prime" / "results.json").stat().st_mtime
    assert run_cli(*argv) == 0  # finished cells are kept, not rerun
    assert (tmp_path / "x" / "seed0" / "prime" / "results.json").stat().st_mtime == mtime
