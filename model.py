"""A hand-written XLM-R encoder with built-in LoRA and bottleneck adapters.

Loads and saves Hugging Face checkpoints (config.json + model.safetensors) and gives the same
numbers as `transformers`' XLMRobertaModel / ForTokenClassification / ForMaskedLM on the same
weights (at real tokens: padding is not computed); LoRA and the head move to and from peft adapter folders
(save_lora_adapter / load_lora_adapter). Parameter names split into three groups with one-line filters:
    PEFT (phi):   names containing "lora_" or "adapter"      -> is_peft(name)
    head (phi):   names starting with "classifier."          -> is_head(name)
    base (theta): everything else (encoder, lm_head)
"""
import json
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


@dataclass
class Config:
    """Architecture hyper-parameters; field names and defaults are those of xlm-roberta-base's config.json."""
    vocab_size: int = 250002
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    initializer_range: float = 0.02

    @classmethod
    def from_json(cls, path):
        """Read the fields we know from a Hugging Face config.json; other keys are ignored."""
        d = read_json(path)
        missing = [k for k in ARCHITECTURE_KEYS if k not in d]  # else a default's shape error would name a tensor
        if missing:
            raise CheckpointError(f"{path}: missing {', '.join(missing)} (in every XLM-R config.json)")
        cfg = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        for f in fields(cls):  # a wrong type or size would only fail later, deep inside the model's construction
            v = getattr(cfg, f.name)
            number = type(v) in (int, float) and math.isfinite(v)
            if f.type is int:
                low = int(f.name != "pad_token_id")
                want, ok = f"an integer >= {low}", type(v) is int and v >= low
            elif "dropout" in f.name:  # classifier_dropout may be null (hidden_dropout_prob is used then)
                want, ok = "a probability (0 to 1)", (v is None and f.type is not float) or (number and 0 <= v <= 1)
            elif f.type is float:
                want, ok = "a number > 0", number and v > 0
            else:
                continue
            if not ok:
                raise CheckpointError(f"{path}: {f.name} must be {want}, got {v!r}")
        if cfg.hidden_act != "gelu":  # XLM-R uses exact (erf) GELU; we implement no other
            raise CheckpointError(f"{path}: hidden_act must be 'gelu', got {cfg.hidden_act!r}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{path}: position_embedding_type must be 'absolute' (XLM-R's), got "
                                  f"{d['position_embedding_type']!r}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError(f"{path}: hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads")
        if cfg.pad_token_id >= cfg.vocab_size:
            raise CheckpointError(f"{path}: pad_token_id {cfg.pad_token_id} is not below vocab_size {cfg.vocab_size}")
        return cfg


ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass
class PeftConfig:
    """Which PEFT parameters (phi) the encoder carries. method: lora | houlsby | pfeiffer."""
    method: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")  # any of these projections
    adapter_size: int = 64
    adapter_act: str = "relu"  # relu | gelu | tanh

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        if self.method not in ("lora", "houlsby", "pfeiffer"):
            raise ValueError(f"PEFT method must be lora, houlsby or pfeiffer, got {self.method!r}")
        if set(self.lora_targets) - set(LORA_TARGETS) or not self.lora_targets:
            raise ValueError(f"lora_targets must be among {' '.join(LORA_TARGETS)}, got {self.lora_targets}")
        if self.adapter_act not in ACTS:
            raise ValueError(f"adapter_act must be one of {sorted(ACTS)}, got {self.adapter_act!r}")


ACTS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}
LORA_TARGETS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def init_(name, t, std, generator=None):
    """Initialise tensor t in place by its parameter name: Hugging Face's normal(0, std) for weights, zero biases,
    unit norms; LoRA A as in peft, LoRA B and adapter up-projections zero (a fresh PEFT module is a no-op)."""
    if name.endswith("lora_A"):
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    if name.endswith(".bias") or name.endswith("lora_B") or ".up." in name:
        return nn.init.zeros_(t)
    if "norm" in name.lower():
        return nn.init.ones_(t)
    return nn.init.normal_(t, std=std, generator=generator)


def fresh_phi(model, seed=None):
    """New PEFT + head tensors drawn from their initial distribution (a fresh start, as in downstream PEFT): from
    torch's RNG, or from `seed` alone (the draw torch.manual_seed(seed) then fresh_phi(model) gives)."""
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    return {n: init_(n, torch.empty_like(p), model.cfg.initializer_range, generator).requires_grad_()
            for n, p in model.named_parameters() if is_peft(n) or is_head(n)}


def is_peft(name):
    return "lora_" in name or "adapter" in name


def is_head(name):
    return name.startswith("classifier.")


def task_columns(x, weight, bias, tasks):
    """For T tasks' own tensors (weight [T, out, in], bias [T, out] or None: their phi, computed together), each
    token's product with its own task's: [tokens, T, out], 0 outside the token's own task (tasks [tokens, T]: each
    token's task, one-hot). One matmul over all tasks' weights: T times one task's arithmetic, which PEFT's narrow
    layers can afford, instead of T small matmuls (or padding every task to the largest one's tokens)."""
    y = F.linear(x, weight.flatten(0, 1), None if bias is None else bias.flatten())
    return y.unflatten(1, weight.shape[:2]) * tasks[:, :, None]


def through_narrow(x, w1, b1, w2, b2, tasks, act=None):
    """act(x w1^T + b1) w2^T + b2 with each token's own task's tensors (w1 [T, mid, in], w2 [T, out, mid], biases
    [T, ...] or None; see task_columns), for PEFT's narrow middles (LoRA's rank, an adapter's size): the middle as
    task columns, and the second matmul over all tasks' w2 side by side sums the token's own task's term only."""
    h = task_columns(x, w1, b1, tasks).flatten(1)
    h = h if act is None else act(h)  # act(0) = 0 (relu, gelu, tanh): other tasks' columns stay 0
    y = F.linear(h, w2.transpose(0, 1).flatten(1))
    return y if b2 is None else y + tasks @ b2


class Linear(nn.Linear):
    """nn.Linear plus an optional LoRA update (alpha / r) * B A. B starts at zero, so a fresh LoRA is a no-op.
    Its PEFT tensors (LoRA's; all of the head's) may carry a leading task dimension: T tasks' phi, their tokens'
    tasks then given as `tasks` (see task_columns)."""

    def __init__(self, n_in, n_out, r=0, alpha=1.0, dropout=0.0):
        super().__init__(n_in, n_out)
        self.r, self.merged = r, False
        if r:
            self.lora_A, self.lora_B = nn.Parameter(torch.empty(r, n_in)), nn.Parameter(torch.zeros(n_out, r))
            self.scaling = alpha / r
            self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x, tasks=None):
        if self.weight.ndim == 3:  # the head, one per task
            return task_columns(x, self.weight, self.bias, tasks).sum(1)
        y = F.linear(x, self.weight, self.bias)
        if not self.r or self.merged:
            return y
        x, B = self.lora_dropout(x), self.lora_B * self.scaling  # scaled B: r columns, not the output's
        if self.lora_A.ndim == 2:
            return y + F.linear(F.linear(x, self.lora_A), B)
        return y + through_narrow(x, self.lora_A, None, B, None, tasks)

    def delta(self):
        return self.scaling * self.lora_B @ self.lora_A

    @torch.no_grad()
    def merge(self, on=True):
        """Fold the LoRA update into (on=True) or out of (on=False) the base weight."""
        if self.r and self.merged != on:
            self.weight += self.delta() if on else -self.delta()
            self.merged = on


class Adapter(nn.Module):
    """Bottleneck adapter x + up(act(down(x))). up starts at zero, so a fresh adapter is the identity."""

    def __init__(self, dim, size, act):
        super().__init__()
        self.down, self.up, self.act = Linear(dim, size), Linear(size, dim), ACTS[act]

    def forward(self, x, tasks=None):
        """x [tokens, dim]; with a task dimension on the adapter's tensors, tasks as Linear takes it."""
        down, up = self.down, self.up
        if down.weight.ndim == 2:
            return x + up(self.act(down(x)))
        return x + through_narrow(x, down.weight, down.bias, up.weight, up.bias, tasks, self.act)


# Our module names inside a layer -> Hugging Face's, under roberta.encoder.layer.{i}.
LAYER_NAMES = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm",
}
EMBEDDING_NAMES = {"word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"}


class Layer(nn.Module):
    """Post-LayerNorm transformer block; Houlsby adapters sit after attention and FFN, Pfeiffer after FFN only."""

    def __init__(self, cfg, peft):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        lora = peft is not None and peft.method == "lora"

        def linear(name, n_in, n_out):
            if lora and name in peft.lora_targets:
                return Linear(n_in, n_out, peft.lora_r, peft.lora_alpha, peft.lora_dropout)
            return Linear(n_in, n_out)

        self.n_heads, self.p_attn = cfg.num_attention_heads, cfg.attention_probs_dropout_prob
        self.query, self.key, self.value = (linear(n, H, H) for n in ("query", "key", "value"))
        self.attn_out, self.attn_norm = linear("attn_out", H, H), nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.ffn_in, self.ffn_out = linear("ffn_in", H, I), linear("ffn_out", I, H)
        self.ffn_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        method = peft.method if peft else None
        adapter = lambda on: Adapter(H, peft.adapter_size, peft.adapter_act) if on else None
        self.adapter_attn = adapter(method == "houlsby")
        self.adapter_ffn = adapter(method in ("houlsby", "pfeiffer"))

    def forward(self, x, tasks, blocks):
        """x: [tokens, hidden], the real tokens; tasks: their tasks, one-hot [tokens, T] (None: no task dimension);
        blocks: attention's layout, as Encoder.attention_blocks gives it."""
        where, keep, masks = blocks
        q, k, v = (unpack(p(x, tasks), where).split([m.numel() for m in masks])
                   for p in (self.query, self.key, self.value))
        a = torch.cat([self.attend(*qkv, m) for *qkv, m in zip(q, k, v, masks)]).index_select(0, keep)
        h = self.dropout(self.attn_out(a, tasks))
        x = self.attn_norm(x + (h if self.adapter_attn is None else self.adapter_attn(h, tasks)))
        h = self.dropout(self.ffn_out(F.gelu(self.ffn_in(x, tasks)), tasks))
        return self.ffn_norm(x + (h if self.adapter_ffn is None else self.adapter_ffn(h, tasks)))

    def attend(self, q, k, v, mask):
        """One task's attention: q, k, v [rows * seq, hidden] in its block's layout, mask [rows, seq] its keys."""
        q, k, v = (t.view(*mask.shape, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # [rows, heads, seq, .]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                           dropout_p=self.p_attn if self.training else 0.0)
        return a.transpose(1, 2).flatten(0, 1).flatten(1)


def unpack(x, where, fill=0):
    """Row where[i] of x, or `fill` where where[i] == len(x) (a padding position). index_select, not x[where]: on
    a CPU its gather and its backward (index_add_) are 3-4x faster than advanced indexing's (index_put_)."""
    return torch.cat([x, x.new_full((1, *x.shape[1:]), fill)]).index_select(0, where)


class Encoder(nn.Module):
    """Embeddings (RoBERTa position ids) + layers; returns the last hidden state [batch, seq, hidden], 0 at
    positions the attention mask hides. With a leading task dimension (input_ids [tasks, batch, seq], the PEFT
    tensors [tasks, ...] as Linear takes them) the tasks run together: [tasks, batch, seq, hidden]."""

    def __init__(self, cfg, peft=None):
        super().__init__()
        H, pad = cfg.hidden_size, cfg.pad_token_id
        self.pad = pad
        self.word_embeddings = nn.Embedding(cfg.vocab_size, H, padding_idx=pad)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, H, padding_idx=pad)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, H)
        self.LayerNorm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.layers = nn.ModuleList(Layer(cfg, peft) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids, attention_mask=None):
        ids = input_ids.view(-1, *input_ids.shape[-2:])  # [tasks, rows, seq]; one task without a task dimension
        real = ids.ne(self.pad)
        positions = torch.cumsum(real, -1) * real + self.pad  # counted from pad+1 over non-pad tokens
        mask = real if attention_mask is None else attention_mask.view_as(ids).bool()
        # Only the real tokens (mask True) go through the token-wise work, no FLOPs on padding: x is [tokens, hidden],
        # task by task, row by row. Attention and the output put them in padded layouts by gathering rows of [x; 0].
        at = mask.flatten().nonzero().squeeze(1)
        slot = torch.full((mask.numel(),), len(at), device=ids.device).index_put_((at,), torch.arange(len(at)))
        tasks = None
        if input_ids.ndim == 3:
            tasks = F.one_hot(at // mask[0].numel(), len(ids)).to(self.word_embeddings.weight.dtype)
        # Each distinct token looked up once: its embedding gradient is one row per pass, so the row-sparse gradient
        # (metapeft.row_sparse_embedding_gradient) sums the same few values as the dense one
        tokens, inverse = ids.flatten().index_select(0, at).unique(return_inverse=True)
        x = (self.word_embeddings(tokens).index_select(0, inverse)
             + self.position_embeddings(positions.flatten().index_select(0, at))
             + self.token_type_embeddings.weight[0])
        x = self.dropout(self.LayerNorm(x))
        blocks = self.attention_blocks(mask, slot.view(mask.shape))
        for layer in self.layers:
            x = layer(x, tasks, blocks)
        return unpack(x, slot).view(*input_ids.shape, -1)

    @staticmethod
    def attention_blocks(mask, slot):
        """Attention's layout, for mask [tasks, rows, seq] and slot (x's row at each position, len(x) at padding):
        each task's rows padded to its own longest row, as the task alone would be (no attention over another task's
        padding), one block per task. Returns where (x's row at each position of the blocks, one after the other),
        keep (the blocks' position of each row of x) and masks (each block's [rows, width] key mask)."""
        widths = (mask.any(1) * torch.arange(1, mask.shape[-1] + 1, device=mask.device)).amax(1).clamp(min=1)
        masks = [m[:, :w] for m, w in zip(mask, widths.tolist())]
        masks = [m | ~m.any(1, keepdim=True) for m in masks]  # a row of padding only (tasks of fewer rows): a key
        where = torch.cat([s[:, :m.shape[1]].flatten() for s, m in zip(slot, masks)])
        n = int(mask.sum())
        real = (where < n).nonzero().squeeze(1)
        keep = torch.empty(n, dtype=torch.long, device=mask.device).index_put_((where[real],), real)
        return where, keep, masks


class LMHead(nn.Module):
    """Hugging Face's MLM head; the decoder is tied to the word embeddings, so it is passed in, not stored."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden_size
        self.dense, self.layer_norm = nn.Linear(H, H), nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h, embedding):
        return F.linear(self.layer_norm(F.gelu(self.dense(h))), embedding, self.bias)


class Model(nn.Module):
    """XLM-R encoder with a token-classification head (labels) and optionally the MLM head."""

    def __init__(self, cfg, labels=(), peft=None, mlm=False):
        super().__init__()
        self.cfg, self.labels, self.peft = cfg, list(labels), peft
        self.encoder = Encoder(cfg, peft)
        p = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.dropout = nn.Dropout(p)
        self.classifier = Linear(cfg.hidden_size, len(self.labels)) if self.labels else None
        self.lm_head = LMHead(cfg) if mlm else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                init_(name, p, cfg.initializer_range)
            for emb in (self.encoder.word_embeddings, self.encoder.position_embeddings):
                emb.weight[cfg.pad_token_id].zero_()

    def forward(self, input_ids, attention_mask=None):
        """Token-classification logits [batch, seq, num_labels] ([tasks, batch, seq, num_labels]: see Encoder)."""
        h = self.encoder(input_ids, attention_mask)
        tasks = None
        if input_ids.ndim == 3:  # each position's task, for the head's own per task
            tasks = torch.eye(len(h), dtype=h.dtype, device=h.device).repeat_interleave(h[0, ..., 0].numel(), 0)
        return self.classifier(self.dropout(h.flatten(0, -2)), tasks).view(*h.shape[:-1], -1)

    def mlm_logits(self, input_ids, attention_mask=None):
        """Masked-LM logits [batch, seq, vocab]."""
        return self.lm_head(self.encoder(input_ids, attention_mask), self.encoder.word_embeddings.weight)

    def merge_peft(self, on=True):
        """Fold LoRA into the base weights (on=True) or back out. Adapters are non-linear and cannot be merged."""
        if self.peft and self.peft.method != "lora":
            raise ValueError(f"{self.peft.method} adapters cannot be merged into the base weights")
        for m in self.modules():
            if isinstance(m, Linear):
                m.merge(on)

    def hf_state_dict(self, merge_peft=False):
        """Base + head tensors under Hugging Face's key names (LoRA folded in if merge_peft)."""
        out = {}
        for name, p in self.named_parameters():
            if is_peft(name):
                continue
            t = p.detach()
            if merge_peft and name.endswith(".weight"):
                m = self.get_submodule(name[: -len(".weight")])
                if isinstance(m, Linear) and m.r and not m.merged:
                    t = t + m.delta().detach()
            out[hf_key(name)] = t.contiguous()
        return out

    def save_pretrained(self, path, merge_peft=False, layout=None):
        """Write config.json + model.safetensors in a Hugging Face layout (LAYOUTS): "token" (the default with a
        classifier), "mlm" (the default with only the MLM head) or "base" (the encoder alone, plus a fresh pooler:
        XLM-R's MLM training never trains one, and transformers' XLMRobertaModel expects it); and the PEFT
        parameters with their config in peft.safetensors unless they are merged in. Atomic writes."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if merge_peft and self.peft and self.peft.method != "lora":
            raise ValueError(f"{self.peft.method} adapters cannot be merged into the base weights")
        layout = layout or ("token" if self.classifier is not None else "mlm" if self.lm_head is not None else "base")
        arch, head = LAYOUTS[layout]
        if head and getattr(self, head) is None:
            raise CheckpointError(f"the {arch} layout needs a {head}, and this model has none")
        config = {**asdict(self.cfg), "architectures": [arch], "model_type": "xlm-roberta",
                  "bos_token_id": 0, "eos_token_id": 2, "position_embedding_type": "absolute"}
        if self.labels and layout == "token":
            config["id2label"] = dict(enumerate(self.labels))
            config["label2id"] = {l: i for i, l in enumerate(self.labels)}
        atomic_write(path / "config.json", lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))
        state = {k: t for k, t in self.hf_state_dict(merge_peft).items()
                 if k.startswith("roberta.") or head and k.startswith(head + ".")}
        if layout == "base":
            H, dtype = self.cfg.hidden_size, self.encoder.LayerNorm.weight.dtype
            weight = torch.randn(H, H, generator=torch.Generator().manual_seed(0), dtype=dtype)
            state = {k.removeprefix("roberta."): t for k, t in state.items()} | {
                "pooler.dense.weight": weight * self.cfg.initializer_range,
                "pooler.dense.bias": torch.zeros(H, dtype=dtype)}
        atomic_write(path / "model.safetensors", lambda f: save_file(state, f, metadata={"format": "pt"}))
        (path / LM_HEAD_FILE).unlink(missing_ok=True)  # stale: copy_lm_head writes it after saving
        peft_file = path / PEFT_FILE
        if self.peft and not merge_peft:
            phi = {n: p.detach().contiguous() for n, p in self.named_parameters() if is_peft(n)}
            meta = {"peft_config": json.dumps(asdict(self.peft))}  # one key: a second one's order would vary
            atomic_write(peft_file, lambda f: save_file(phi, f, metadata=meta))
        elif peft_file.exists():
            peft_file.unlink()


LAYOUTS = {"token": ("XLMRobertaForTokenClassification", "classifier"), "mlm": ("XLMRobertaForMaskedLM", "lm_head"),
           "base": ("XLMRobertaModel", None)}  # layout -> (architecture, head saved with the encoder)
PEFT_FILE, LM_HEAD_FILE = "peft.safetensors", "lm_head.safetensors"


WRITING = threading.Lock()  # held by atomic_write: a thread that ends the process (train.py's watch) waits for it


def atomic_write(path, write):
    """Call write(tmp_path), then rename over path: a killed run never leaves a half-written file. A failed write
    (disk full, no permission) is a CheckpointError naming path; path keeps what it held and no temp file is left,
    also when the write is interrupted (Ctrl-C)."""
    tmp = f"{path}.tmp"
    with WRITING:
        try:
            write(tmp)
            mask = os.umask(0)  # safetensors creates its files owner-only: give them the mode any new file gets
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, (OSError, SafetensorError)):
                raise CheckpointError(f"{path}: not written ({getattr(e, 'strerror', None) or e})") from None
            raise


def hf_key(name):
    """Our parameter name -> Hugging Face's key (encoder.layers.3.query.weight -> roberta.encoder.layer.3....)."""
    module, _, leaf = name.rpartition(".")
    parts = module.split(".")
    if parts[0] != "encoder":
        return name  # classifier.* and lm_head.* are named as in Hugging Face
    if parts[1] == "layers":
        return f"roberta.encoder.layer.{parts[2]}.{LAYER_NAMES[parts[3]]}.{leaf}"
    return f"roberta.embeddings.{parts[1]}.{leaf}"


def theta_phi(model):
    """Split parameters into dicts for torch.func.functional_call: theta (base) and phi (PEFT + head)."""
    theta, phi = {}, {}
    for name, p in model.named_parameters():
        (phi if is_peft(name) or is_head(name) else theta)[name] = p
    return theta, phi


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not match the model it is loaded into; the message names it."""


def read_json(path):
    """The JSON object in a file; anything else is a CheckpointError naming the file."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


@contextmanager
def open_safetensors(file):
    """safe_open, with a missing, truncated or foreign file reported as a CheckpointError that names it."""
    try:
        open(file, "rb").close()  # safetensors reports any file it cannot open as missing, unreadable ones too
        with safe_open(str(file), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes weights may be stored in


def _weight_files(path):
    """model.safetensors or its shards, then the MLM head kept by copy_lm_head if there is one."""
    head = [path / LM_HEAD_FILE] if (path / LM_HEAD_FILE).exists() else []
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"] + head
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a 'weight_map' object (tensor name -> file)")
        return [path / f for f in sorted(set(map(str, weight_map.values())))] + head
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _file_key(key):
    """Normalise a checkpoint key to Hugging Face's ForTokenClassification names; None for keys we ignore."""
    if key.endswith("position_ids") or key.startswith(("pooler.", "roberta.pooler.", "lm_head.decoder.")):
        return None  # buffers, the unused pooler, and the decoder tied to the embeddings / lm_head.bias
    if key.startswith(("roberta.", "classifier.", "lm_head.")):
        return key
    return "roberta." + key


def load_pretrained(path, labels=None, num_labels=None, peft=None, mlm=False):
    """Load a Hugging Face XLM-R checkpoint directory (config.json + model.safetensors or a sharded index).

    labels (or num_labels) size the token-classification head, loaded from classifier.* when the checkpoint
    has one for the same labels and freshly initialised otherwise; with neither, the checkpoint's own head
    (if any) and id2label are used. peft adds fresh PEFT parameters (load_peft loads saved ones).
    mlm=True loads the MLM head. Tensors are copied one at a time into the model, so only one full copy
    of the weights is ever held.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json")
    cfg = Config.from_json(path / "config.json")
    id2label = read_json(path / "config.json").get("id2label") or {}
    if not isinstance(id2label, dict) or set(id2label) != {str(i) for i in range(len(id2label))}:
        raise CheckpointError(f"{path / 'config.json'}: id2label must map 0, 1, ... n-1 to label names")
    saved = [id2label[str(i)] for i in range(len(id2label))]
    index = {}  # Hugging Face key -> (file, key as stored, shape)
    for file in _weight_files(path):
        with open_safetensors(file) as f:
            for key in f.keys():
                if (k := _file_key(key)) in index:  # which one would win is up to the order files are read in
                    raise CheckpointError(f"{file}: tensor {key} is also in {index[k][0]}")
                if k:
                    index[k] = (file, key, tuple(_float_slice(f, file, key).get_shape()))
    if not labels and not num_labels and "classifier.weight" in index:
        num_labels = index["classifier.weight"][2][0]
        labels = saved if len(saved) == num_labels else None
    labels = list(labels) if labels else [f"LABEL_{i}" for i in range(num_labels or 0)]
    model = Model(cfg, labels, peft, mlm)
    want = {hf_key(n): p for n, p in model.named_parameters() if not is_peft(n)}
    if not (saved in ([], labels) and "classifier.weight" in index
            and index["classifier.weight"][2] == tuple(want.get("classifier.weight", torch.empty(0)).shape)):
        index = {k: v for k, v in index.items() if not k.startswith("classifier.")}  # a head for other labels
    if not mlm:
        index = {k: v for k, v in index.items() if not k.startswith("lm_head.")}
    missing = [k for k in want if k not in index and not k.startswith("classifier.")]
    unexpected = [key for k, (_, key, _) in index.items() if k not in want]
    wrong = [f"{key} {shape} (expected {tuple(want[k].shape)})"
             for k, (_, key, shape) in index.items() if k in want and shape != tuple(want[k].shape)]
    _check_tensors(path, missing, unexpected, wrong)
    for file in {file for file, _, _ in index.values()}:
        with open_safetensors(file) as f, torch.no_grad():
            for k, (in_file, key, _) in index.items():
                if in_file == file:
                    _copy_finite(want[k], f, file, key)
    return model


def _float_slice(f, file, key):
    """f.get_slice(key), checked to hold floating-point numbers."""
    t = f.get_slice(key)
    if t.get_dtype() not in FLOAT_DTYPES:
        raise CheckpointError(f"{file}: tensor {key} is {t.get_dtype()}, expected one of {', '.join(FLOAT_DTYPES)}")
    return t


def all_finite(t):
    """Whether a float tensor holds no NaN or inf: its min and max carry them, and need no tensor-sized buffer (as
    isfinite's would: 192 MB for xlm-roberta's embeddings)."""
    return t.numel() == 0 or all(math.isfinite(v.item()) for v in torch.aminmax(t.detach()))


def _copy_finite(dst, f, file, key):
    """dst.copy_(tensor `key` of the open safetensors file f); a NaN or inf in it is an error naming it (loaded, it
    would only show later, as a NaN loss or an F1 of 0)."""
    t = f.get_tensor(key)
    if not all_finite(t):
        raise CheckpointError(f"{file}: tensor {key} has non-finite values (NaN or inf)")
    dst.copy_(t)


def _check_tensors(path, missing, unexpected, wrong):
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)):
        if keys:
            more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
            raise CheckpointError(f"{path}: {what} tensor(s): {', '.join(keys[:10])}{more}")


def copy_lm_head(src, dst):
    """Keep src's MLM head with a checkpoint made from it (a primed or fine-tuned model, saved with another
    head): its lm_head.* tensors go to dst/lm_head.safetensors, where load_pretrained(dst, mlm=True) finds them.
    Priming and fine-tuning never train the MLM head, so this is the head the encoder was pretrained with."""
    head = {}
    for file in _weight_files(Path(src)):
        with open_safetensors(file) as f:
            head |= {k: f.get_tensor(k) for k in f.keys() if k.startswith("lm_head.") and _file_key(k)}
    if head:  # a source without one (a token-classification checkpoint) leaves none
        atomic_write(Path(dst) / LM_HEAD_FILE, lambda f: save_file(head, f, metadata={"format": "pt"}))


def saved_peft_config(path):
    """The PeftConfig stored with a checkpoint directory's peft.safetensors, or None if it has none."""
    file = Path(path) / PEFT_FILE
    if not file.exists():
        return None
    with open_safetensors(file) as f:
        meta = f.metadata() or {}
    try:
        return PeftConfig(**json.loads(meta["peft_config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: expected a valid peft_config in its metadata ({e})") from None


def load_peft(model, path):
    """Load saved PEFT parameters (peft.safetensors in a checkpoint directory) into a model with the same PEFT config."""
    file = Path(path) / PEFT_FILE
    saved = saved_peft_config(path)
    if saved is None:
        raise CheckpointError(f"{file}: not found (this checkpoint has no saved PEFT parameters)")
    with open_safetensors(file) as f:
        if saved != model.peft:
            raise CheckpointError(f"{file}: PEFT config {saved} does not match the model's {model.peft}")
        want = {n: p for n, p in model.named_parameters() if is_peft(n)}
        if set(f.keys()) != set(want):
            raise CheckpointError(f"{file}: PEFT tensors differ from the model's: {sorted(set(f.keys()) ^ set(want))[:10]}")
        wrong = [k for k in f.keys() if tuple(_float_slice(f, file, k).get_shape()) != tuple(want[k].shape)]
        if wrong:
            raise CheckpointError(f"{file}: wrongly shaped tensor(s): {', '.join(wrong[:10])}")
        with torch.no_grad():
            for k in f.keys():
                _copy_finite(want[k], f, file, k)
    return model


# A peft adapter folder: adapter_config.json + adapter_model.safetensors, our LoRA and head tensors named
#   encoder.layers.{i}.{t}.lora_A  <->  base_model.model.roberta.encoder.layer.{i}.{LAYER_NAMES[t]}.lora_A.weight
#   classifier.weight              <->  base_model.model.classifier.weight      (peft's modules_to_save)
# (lora_B and classifier.bias alike). peft's LoRA scales B A by lora_alpha / r, as ours does.
ADAPTER_CONFIG, ADAPTER_FILE = "adapter_config.json", "adapter_model.safetensors"
LORA_KEY = re.compile(r"base_model\.model\.roberta\.encoder\.layer\.\d+\.(.+)\.lora_[AB]\.weight")
# peft options whose other values we do not implement
UNSUPPORTED_LORA = {"use_rslora": False, "use_dora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
                    "rank_pattern": {}, "alpha_pattern": {}}


def peft_key(name):
    """Our LoRA or head parameter name -> its key in peft's adapter_model.safetensors."""
    return "base_model.model." + hf_key(name) + ("" if is_head(name) else ".weight")


def _lora_and_head(model, path):
    if model.peft is None or model.peft.method != "lora" or model.classifier is None:
        raise CheckpointError(f"{path}: a peft adapter folder holds LoRA and a token-classification head; the model "
                              f"has PEFT {model.peft and model.peft.method} and {len(model.labels)} labels")
    return {peft_key(n): p for n, p in model.named_parameters() if is_peft(n) or is_head(n)}


def save_lora_adapter(model, path, base=None):
    """Write the model's LoRA parameters and head as a peft adapter folder (task type TOKEN_CLS, the head in
    modules_to_save), for peft.PeftModel.from_pretrained on the transformers model of checkpoint `base`."""
    path, p = Path(path), model.peft
    state = {k: t.detach().contiguous() for k, t in _lora_and_head(model, path).items()}
    modules = "|".join(re.escape(LAYER_NAMES[t]) for t in p.lora_targets)
    config = {"peft_type": "LORA", "task_type": "TOKEN_CLS", "base_model_name_or_path": base and str(base),
              "r": p.lora_r, "lora_alpha": p.lora_alpha, "lora_dropout": p.lora_dropout,
              "target_modules": rf"roberta\.encoder\.layer\.\d+\.({modules})", "modules_to_save": ["classifier"],
              "inference_mode": True, **UNSUPPORTED_LORA}
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / ADAPTER_CONFIG, lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))
    atomic_write(path / ADAPTER_FILE, lambda f: save_file(state, f, metadata={"format": "pt"}))


def load_lora_adapter(model, path):
    """Load a peft LoRA adapter folder (e.g. trained with peft on the transformers model, or written by
    save_lora_adapter) into a model with the same LoRA config. Another rank, alpha, dropout or set of targets,
    another model size or label count, or peft options we do not implement are a CheckpointError."""
    path = Path(path)
    want = _lora_and_head(model, path)
    if not (path / ADAPTER_CONFIG).exists() or not (path / ADAPTER_FILE).exists():
        raise CheckpointError(f"{path}: not a peft adapter folder (no {ADAPTER_CONFIG} or {ADAPTER_FILE})")
    cfg = read_json(path / ADAPTER_CONFIG)
    odd = [f"{k}={cfg[k]!r}" for k, v in UNSUPPORTED_LORA.items() if cfg.get(k) not in (None, v)]
    if cfg.get("peft_type") != "LORA" or odd:
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r} {' '.join(odd)}: only plain LoRA is "
                              f"supported")
    with open_safetensors(path / ADAPTER_FILE) as f:
        shapes = {k: tuple(_float_slice(f, path / ADAPTER_FILE, k).get_shape()) for k in f.keys()}
        inverse = {v: k for k, v in LAYER_NAMES.items()}
        modules = {m[1] for k in shapes if (m := LORA_KEY.fullmatch(k))}
        if modules - set(inverse):
            raise CheckpointError(f"{path}: LoRA on {sorted(modules - set(inverse))}, which this model does not have")
        targets = cfg.get("target_modules")
        # peft loads only what its target_modules name (a regex for the whole module name, or names it ends in)
        full = lambda m: f"roberta.encoder.layer.0.{m}"
        named = lambda m: re.fullmatch(targets, full(m)) if isinstance(targets, str) else \
            any(full(m) == t or full(m).endswith("." + t) for t in targets)
        if targets is not None and not all(named(m) for m in modules):
            raise CheckpointError(f"{path}: LoRA tensors on {sorted(m for m in modules if not named(m))}, which "
                                  f"target_modules {targets!r} does not name")
        saved = {"lora_r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "lora_dropout": cfg.get("lora_dropout"),
                 "lora_targets": tuple(t for t in LORA_TARGETS if LAYER_NAMES[t] in modules)}
        diff = [f"{k} {v!r} (the model's: {getattr(model.peft, k)!r})"
                for k, v in saved.items() if v != getattr(model.peft, k)]
        if diff:
            raise CheckpointError(f"{path}: LoRA config differs: {', '.join(diff)}")
        _check_tensors(path, sorted(want.keys() - shapes.keys()), sorted(shapes.keys() - want.keys()),
                       [f"{k} {s} (expected {tuple(want[k].shape)})" for k, s in shapes.items()
                        if k in want and s != tuple(want[k].shape)])
        with torch.no_grad():
            for k, p in want.items():
                _copy_finite(p, f, path / ADAPTER_FILE, k)
    return model
