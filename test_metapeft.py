"""Tests for metapeft. transformers, peft and seqeval appear here only, as reference implementations."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import CheckpointError, Config, Model, PeftConfig, load_peft, load_pretrained, theta_phi

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
