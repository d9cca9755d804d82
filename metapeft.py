"""Priming a pretrained encoder for parameter-efficient fine-tuning with meta-learning (Gheini et al., 2023).

theta = the pretrained encoder, phi = PEFT parameters + token-classification head (README, "The algorithm").
Priming is MAML whose inner loop simulates PEFT (K AdamW or SGD steps on phi over support batches, theta fixed) and
whose outer loop updates theta (optionally phi's initialisation too) from the query loss at the adapted phi:

    for each task (S, Q):  phi = phi0;  K times: phi = phi - alpha * grad_phi L(S; theta, phi)   (or an AdamW step)
    meta_loss = mean over tasks of L(Q; theta, phi)          -> optimizer step on theta (, phi0)

Everything is functional (torch.func.functional_call over dicts of tensors): the inner loop never writes to
the module, so no deepcopy and no per-task optimizer. The primed model is saved with model.save_pretrained,
which already writes theta and the head in the Hugging Face layout and the PEFT init to peft.safetensors.
Also here: the optimizer/scheduler/step helpers shared by every training stage, evaluation, and the MLM loss.
"""
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
from model import EMBEDDING_NAMES, fresh_phi, is_head, is_peft, theta_phi


@dataclass
class PrimeConfig:
    """Priming hyper-parameters. mode: prime (the paper) | maml (inner loop = full fine-tuning) |
    multitask (plain training of theta and phi on the priming data) | none (no priming stage)."""
    mode: str = "prime"
    # The defaults are the recipe the study selected (study/README.md), at xlm-roberta-base's learning rates: the inner
    # loop simulates the downstream fine-tuning as it is run, K AdamW steps at its lr, each on a new support batch.
    inner_steps: int = 20            # K simulated PEFT steps per task
    inner_opt: str = "adam"          # adam: torch.optim.AdamW's update, functional, fresh moments per task | sgd
    inner_lr: float = 5e-4           # alpha: the downstream PEFT lr (plain SGD needs a far larger one)
    inner_betas: tuple[float, float] = (0.9, 0.999)
    inner_eps: float = 1e-8
    inner_weight_decay: float = 0.01  # adam only: decoupled, on matrices, as make_optimizer
    # The support batch is split by rows into this many batches that the inner steps cycle through, as fine-tuning sees
    # a new batch each step (1: every step sees the whole support batch).
    support_batches: int = 20
    meta_sgd: bool = False           # learn one inner lr per adapted tensor (Meta-SGD), starting at inner_lr
    first_order: bool = True         # drop the inner loop's second derivatives (FOMAML)
    # Truncated back-propagation: only the last N inner steps are second order, the earlier ones first order (their
    # gradients are constants: theta's influence through them is dropped, phi0's gradient passes as in first_order).
    inner_backprop: int = 0          # N; 0 = all K steps (second order unless first_order)
    outer: str = "theta"             # theta | theta+phi: the outer loop also meta-learns phi's initialisation
    phi_start: str = "fresh"         # fresh: each task starts from a new draw, as downstream PEFT | meta: from phi0
    freeze_embeddings: bool = False  # keep the embedding layer fixed during priming
    lr: float = 2e-5                 # outer AdamW
    weight_decay: float = 0.01
    warmup: int = 100                # outer steps of linear warm-up
    clip: float = 1.0                # max global grad norm (0 = no clipping)

    def __post_init__(self):
        for field, allowed in (("mode", ("prime", "maml", "multitask", "none")), ("outer", ("theta", "theta+phi")),
                               ("phi_start", ("fresh", "meta")), ("inner_opt", ("sgd", "adam"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {' | '.join(allowed)}, got {getattr(self, field)!r}")
        if self.inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {self.inner_steps}")
        if self.support_batches < 1:
            raise ValueError(f"support_batches must be >= 1, got {self.support_batches}")
        if not 0 <= self.inner_backprop <= self.inner_steps or (self.inner_backprop and self.first_order):
            raise ValueError(f"inner_backprop must be in [0, inner_steps={self.inner_steps}] and needs second order, "
                             f"got {self.inner_backprop}{' with first_order' * self.first_order}")
        if self.outer == "theta+phi" and self.phi_start != "meta":
            raise ValueError("outer='theta+phi' needs phi_start='meta' (a fresh start would ignore the learned init)")
        if self.meta_sgd and (self.mode not in ("prime", "maml") or self.inner_steps == 0):
            raise ValueError("meta_sgd needs an inner loop (mode prime or maml, inner_steps > 0)")


def frozen(name, cfg):
    """Whether a parameter stays fixed throughout priming."""
    return cfg.freeze_embeddings and name.startswith("encoder.") and name.split(".")[1] in EMBEDDING_NAMES


def adapted(name, cfg):
    """Whether the inner loop updates a parameter: phi only when simulating PEFT, everything in vanilla MAML."""
    return is_peft(name) or is_head(name) or (cfg.mode == "maml" and not frozen(name, cfg))


# ----------------------------------------------------------------------------- the algorithm

def task_loss(model, theta, phi0, support, query, cfg, inner_lrs=None):
    """L(Q; theta, phi_K) for one task, phi_K = K SGD or AdamW steps on L(S; theta, .) from phi0 (all of theta+phi
    in maml mode; S split by rows into cfg.support_batches batches, cycled). Differentiable w.r.t. theta, phi0 and
    inner_lrs; second order unless cfg.first_order, through the last cfg.inner_backprop steps only if it is set.
    Several tasks at once: phi0's tensors and the batches' with a leading task dimension (as meta_loss stacks them)
    give the tasks' losses [tasks]."""
    rows = support["input_ids"].shape[-2]
    if rows < cfg.support_batches:  # else some inner steps would see an empty (or a one-row) batch
        raise ValueError(f"the support batch has {rows} rows, fewer than support_batches={cfg.support_batches}")
    params = {**theta, **phi0}  # phi = phi0
    inner = [n for n in params if adapted(n, cfg)]
    alpha, moments = [inner_lrs[n] for n in inner] if inner_lrs else [cfg.inner_lr] * len(inner), None
    matrices = [model.get_parameter(n).ndim >= 2 for n in inner]  # weight decay's, whatever the task dimension
    supports = [dict(zip(support, parts))
                for parts in zip(*(t.tensor_split(cfg.support_batches, dim=-2) for t in support.values()))]
    K = cfg.inner_steps
    for k in range(K):
        second = not cfg.first_order and k >= K - (cfg.inner_backprop or K)
        # Fused SDPA kernels have no double backward; only second-order support passes are differentiated twice.
        with sdpa_kernel([SDPBackend.MATH]) if second else nullcontext():
            loss = ce_loss(model, params, supports[k % len(supports)])
        # With a task dimension, task t's loss depends on its own phi only: the gradient of the sum is, for each
        # task, its own loss's gradient (one backward pass for all of them).
        grads = torch.autograd.grad(loss.sum(), [params[n] for n in inner], create_graph=second)  # else: detached
        new, moments = inner_update([params[n] for n in inner], grads, alpha, moments, k + 1, cfg, matrices)
        params |= zip(inner, new)  # new dict entries, not in-place writes
    return ce_loss(model, params, query)


def meta_loss(model, tasks, cfg, inner_lrs=None, seeds=None):
    """The priming objective on a meta-batch [(support, query), ...]: mean query loss after the inner loop, or for
    multitask the mean plain loss of the model's own theta and phi on every support and query batch.
    The tasks' inner loops run as one (task_loss with a task dimension: the base encoder's ops once for all tasks);
    maml's one task at a time (its inner loop adapts theta itself). seeds: one per task, for its fresh phi (the draw
    torch.manual_seed(seed) then fresh_phi would give); None: drawn from torch's RNG, in task order."""
    if cfg.mode == "none":
        raise ValueError("mode 'none' has no priming loss")
    theta, phi = theta_phi(model)
    with row_sparse_embedding_gradient(model, cfg.mode != "maml"):
        if cfg.mode == "multitask":
            batches = [b for task in tasks for b in task]
            return sum(ce_loss(model, {**theta, **phi}, b) for b in batches) / len(batches)
        starts = [phi if cfg.phi_start == "meta" else fresh_phi(model, seed) for seed in seeds or [None] * len(tasks)]
        if cfg.mode == "maml":
            return sum(task_loss(model, theta, phi0, s, q, cfg, inner_lrs)
                       for phi0, (s, q) in zip(starts, tasks, strict=True)) / len(tasks)
        phi0 = {n: torch.stack([start[n] for start in starts]) for n in phi}
        support, query = (stack_tasks(batches, model.cfg.pad_token_id) for batches in zip(*tasks))
        return task_loss(model, theta, phi0, support, query, cfg, inner_lrs).mean()


def ce_loss(model, params, batch, total=None):
    """Token cross-entropy (labels -100 ignored) of the model evaluated with the given parameter tensors: the mean
    over the batch's labelled tokens, or their sum / total when the batch is part of one with `total` of them.
    A batch with a task dimension (and params with one on phi) gives each task's loss: [tasks]."""
    # Columns that are padding in every row (a support batch is padded as a whole, then split; tasks are padded to
    # the widest) change nothing but attention's cost: cut.
    real_columns = batch["attention_mask"].flatten(0, -2).any(0)
    width = int(real_columns.cumsum(0).argmax()) + 1
    ids, mask, labels = (batch[k][..., :width] for k in ("input_ids", "attention_mask", "labels"))
    logits = functional_call(model, params, (ids, mask))
    losses = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=data.IGNORE, reduction="none")
    rows_and_seq = (-2, -1)
    return losses.view(labels.shape).sum(rows_and_seq) / (labels.ne(data.IGNORE).sum(rows_and_seq) if total is None
                                                          else total)


def stack_tasks(batches, pad_id):
    """Batches (one per task) as one batch with a leading task dimension, each padded to the widest and the longest."""
    rows, width = (max(b["input_ids"].shape[i] for b in batches) for i in (0, 1))
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": data.IGNORE}
    return {k: torch.stack([F.pad(b[k], (0, width - b[k].shape[1], 0, rows - b[k].shape[0]), value=fill[k])
                            for b in batches]) for k in fill}


# ----------------------------------------------------------------------------- the inner update

def inner_update(ps, gs, lrs, moments, t, cfg, matrices=None):
    """New values of tensors ps (new tensors, nothing in place) after the inner optimizer's step t = 1, 2, ... with
    gradients gs, one lr per tensor: SGD, or exactly torch.optim.AdamW's step; moments: the previous (m, v) or None.
    matrices: which tensors take weight decay (default: those of 2 or more dimensions, as make_optimizer).
    Foreach ops, one per line over all tensors: a small model's inner loop is otherwise per-tensor op overhead."""
    if cfg.inner_opt == "sgd":  # p = p - lr g
        return torch._foreach_sub(ps, torch._foreach_mul(gs, lrs)), None
    # AdamW, for each tensor p with gradient g at step t:
    #   m = b1 m + (1 - b1) g          the gradient's running mean (starting at 0)
    #   v = b2 v + (1 - b2) g^2        its square's running mean
    #   p = p (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    # i.e. decoupled weight decay (matrices only), then a step along the bias-corrected mean over the bias-corrected
    # root mean square: about lr in size whatever the gradient's scale.
    b1, b2 = cfg.inner_betas
    m, v = torch._foreach_mul(gs, 1 - b1), torch._foreach_mul(torch._foreach_mul(gs, 1 - b2), gs)
    if moments:
        m, v = (torch._foreach_add(new, torch._foreach_mul(old, b)) for new, old, b in zip((m, v), moments, (b1, b2)))
    # sqrt' is infinite at 0 (a fresh LoRA A's gradient is 0): flooring v keeps the meta-gradient finite (m = 0 there)
    root = torch._foreach_div(torch._foreach_sqrt(torch._foreach_maximum(v, 1e-36)), math.sqrt(1 - b2 ** t))
    step = torch._foreach_div(torch._foreach_mul(m, [lr / (1 - b1 ** t) for lr in lrs]),
                              torch._foreach_add(root, cfg.inner_eps))
    matrices = [p.ndim >= 2 for p in ps] if matrices is None else matrices
    decay = [1 - lr * cfg.inner_weight_decay * matrix for lr, matrix in zip(lrs, matrices)]
    return torch._foreach_sub(torch._foreach_mul(ps, decay), step), (m, v)


def make_inner_lrs(model, cfg):
    """Meta-SGD's learnable inner learning rates, one scalar per adapted tensor (raw, not log: Adam's ~lr-sized
    steps then move them by a useful fraction), or None without meta_sgd."""
    if not cfg.meta_sgd:
        return None
    return {n: torch.tensor(cfg.inner_lr, dtype=p.dtype, requires_grad=True)
            for n, p in model.named_parameters() if adapted(n, cfg)}


# ----------------------------------------------------------------------------- the outer update (shared by all stages)

def outer_params(model, cfg, inner_lrs=None):
    """{name: tensor} the outer optimizer updates: theta less frozen embeddings, plus phi's init when it is
    meta-learned (or trained, in multitask), plus Meta-SGD's inner learning rates."""
    theta, phi = theta_phi(model)
    out = {n: p for n, p in theta.items() if not frozen(n, cfg)}
    if cfg.outer == "theta+phi" or cfg.mode == "multitask":
        out |= phi
    return out | {f"inner_lr.{n}": lr for n, lr in (inner_lrs or {}).items()}


def make_optimizer(named_params, lr, weight_decay):
    """AdamW over {name: tensor}; matrices decay, vectors (biases, LayerNorm, Meta-SGD lrs) do not."""
    params = list(named_params.values())
    return AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)


def make_scheduler(opt, warmup, total):
    """Linear warm-up from 0 over `warmup` steps, then linear decay to 0 at step `total` (as Hugging Face's)."""
    def factor(s):
        return s / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def step(loss, params, opt, sched, clip):
    """Backward into params ({name: tensor}) only, clip their global grad norm, step, zero grads.
    Returns the norm before clipping. A non-finite norm (a NaN loss gives one) skips the step: parameters, optimizer
    and schedule stay as they were; the caller sees the norm and decides whether to go on."""
    tensors = list(params.values())
    # inputs= keeps gradients off what is not trained (fresh phi, a fixed phi0, frozen embeddings), and skips
    # computing them at all: no vocab x hidden embedding gradient when the embeddings are frozen.
    if loss.requires_grad:  # not so in a process that got no share of the step's work
        loss.backward(inputs=tensors)
    if dist.is_initialized():  # under torchrun: each loss is its process's share, so their gradients sum to the step's
        for t in tensors:  # summed before the check below, so every process sees the same norm and skips alike
            # all_reduce takes dense tensors only: meta_loss's sparse embedding gradient is made dense here
            t.grad = torch.zeros_like(t) if t.grad is None else t.grad.to_dense()
        all_reduce_([t.grad for t in tensors])
    for p in tensors:  # meta_loss's word-embedding gradient is row-sparse: norm and clipping act on its rows
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    grads = [p.grad.values() if p.grad.is_sparse else p.grad for p in tensors if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if clip:  # as torch.nn.utils.clip_grad_norm_
        torch._foreach_mul_(grads, torch.clamp(clip / (total + 1e-6), max=1.0))
    norm = total.item()
    if math.isfinite(norm):
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


def all_reduce_(tensors, small=2**17):
    """Sum each tensor over the processes, in place. Those under `small` elements are summed together, one
    collective per dtype: a collective's fixed cost (~1 ms with gloo on a CPU) is most of a small tensor's, and one by
    one the testbed encoder's 69 cost a tenth of its meta-step. Larger ones are summed as they are, uncopied."""
    together = {}
    for t in tensors:
        if t.numel() < small:
            together.setdefault(t.dtype, []).append(t)
        else:
            dist.all_reduce(t)
    for group in together.values():
        flat = torch.cat([t.flatten() for t in group])
        dist.all_reduce(flat)
        torch._foreach_copy_(group, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in group]), group)])


# ----------------------------------------------------------------------------- evaluation and MLM

@torch.no_grad()
def evaluate(model, examples, sentences, labels, pad_id, batch_size=32, progress=None):
    """Entity-level precision/recall/F1 (data.entity_f1's dict) of the model's argmax tags on `examples`
    (data.encode of `sentences`) against the sentences' gold tags; labels[i] names label id i. progress(n), if
    given, is called after each batch with the number of examples done."""
    training, device = model.training, next(model.parameters()).device
    model.eval()
    preds = []
    for b in data.batches(examples, batch_size, pad_id):
        preds += model(b["input_ids"].to(device), b["attention_mask"].to(device)).argmax(-1).tolist()
        if progress:
            progress(len(preds))
    model.train(training)
    pred_tags = data.word_predictions(examples, preds, [len(s.words) for s in sentences], labels)
    return data.entity_f1([s.tags for s in sentences], pred_tags)


def mlm_loss(model, batch, mask_id, vocab_size, generator, prob=0.15):
    """BERT's masked-LM loss: pick `prob` of the tokens other than <s>, <pad>, </s> (ids 0-2); of those 80%
    become <mask>, 10% a random token, 10% stay; cross-entropy on the picked ones. `generator` (a CPU
    torch.Generator) alone decides the masking, whatever the batch's device."""
    ids = batch["input_ids"]
    u = torch.rand(2, *ids.shape, generator=generator).to(ids.device)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator).to(ids.device)
    picked = (u[0] < prob) & (ids > 2)
    inputs = torch.where(picked & (u[1] < 0.8), mask_id, ids)
    inputs = torch.where(picked & (u[1] >= 0.9), random_ids, inputs)
    # the LM head (its vocab-wide decoder is a third of a tiny model's compute) runs on the picked positions only
    logits = model.lm_head(model.encoder(inputs, batch["attention_mask"])[picked], model.encoder.word_embeddings.weight)
    loss = F.cross_entropy(logits, ids[picked], reduction="sum")
    return loss / picked.sum().clamp(min=1)  # a short batch may pick nothing: a zero loss, not an empty mean's NaN


# ----------------------------------------------------------------------------- row-sparse word-embedding gradients
# A meta-step's tokens are a few hundred rows of a vocab x hidden embedding: meta_loss makes their gradient row-sparse,
# step() norms and clips its rows, and this AdamW steps it without ever making a dense vocab x hidden gradient.

@contextmanager
def row_sparse_embedding_gradient(model, on):
    """While on, the word embeddings' gradient is row-sparse (a sparse tensor, which step() and AdamW take as it is)
    rather than a dense vocab x hidden tensor from every forward pass. Not in maml, whose inner loop adapts the
    embeddings (and differentiates their gradient again)."""
    embeddings = model.encoder.word_embeddings
    embeddings.sparse = on
    try:
        yield
    finally:
        embeddings.sparse = False


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW, fused (one pass over each tensor, not ~10: 10x faster on a CPU), that also takes the row-
    sparse gradient meta_loss gives the word embeddings. Such a tensor is updated a block of rows at a time by the
    same fused kernel, with the block's gradient made dense in one reused buffer: every row, untouched ones too
    (weight decay, moment decay), takes exactly the step of the dense gradient, and no vocab x hidden gradient is
    ever made. The state is torch's (step, exp_avg, exp_avg_sq)."""

    block_bytes = 2**24  # of the reused dense buffer

    def __init__(self, params, lr):
        super().__init__(params, lr=lr, fused=True)

    @torch.no_grad()
    def step(self):
        sparse = {p: p.grad for group in self.param_groups for p in group["params"]
                  if p.grad is not None and p.grad.is_sparse}
        for p in sparse:
            p.grad = None  # hidden from the dense step
        super().step()
        for group in self.param_groups:
            for p in group["params"]:
                if p in sparse:
                    p.grad = sparse[p]
                    self._sparse_step(p, sparse[p].coalesce(), group)

    def _sparse_step(self, p, grad, group):
        state = self.state[p]
        if not state:  # as torch's fused AdamW starts it
            state |= {"step": torch.zeros((), device=p.device), "exp_avg": torch.zeros_like(p),
                      "exp_avg_sq": torch.zeros_like(p)}
        state["step"] += 1
        rows, values = grad.indices()[0], grad.values()  # coalesced: sorted, unique rows
        block = max(1, self.block_bytes // (p[0].numel() * p.element_size()))
        starts = range(0, len(p), block)
        ends = torch.searchsorted(rows, torch.tensor([*starts[1:], len(p)], device=rows.device)).tolist()
        dense, first = torch.zeros_like(p[:block]), 0
        for start, last in zip(starts, ends):
            n, local = min(block, len(p) - start), rows[first:last] - start
            dense[local] = values[first:last]
            torch._fused_adamw_([p[start:start + n]], [dense[:n]], [state["exp_avg"][start:start + n]],
                                [state["exp_avg_sq"][start:start + n]], [], [state["step"]], lr=group["lr"],
                                beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
                                eps=group["eps"], amsgrad=False, maximize=False)
            dense[local], first = 0, last
