"""Data for metapeft: NER readers, XLM-R tokenisation and label alignment,
batching, meta-learning episodes, and seqeval-exact entity F1.

Pipeline: read_split() -> list[Sentence] -> encode() -> list[Example]
-> batches() / episodes() -> model -> word_predictions() -> entity_f1().
"""
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Hugging Face `wikiann` ClassLabel order, used to decode integer `ner_tags` when a
# JSON record carries no label list of its own.
WIKIANN_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
SPLIT_EXTS = ("tsv", "txt", "conll", "jsonl", "json")
IGNORE = -100  # label id skipped by the loss and by word_predictions (as in XTREME)


class DataError(ValueError):
    """Bad input data; the message is one line naming the file/line or label."""


@dataclass
class Sentence:
    words: list[str]
    tags: list[str]
    lang: str


# ----------------------------------------------------------------------------- readers

def _check_tag(tag, where):
    if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
        raise DataError(f"{where}: tag {tag!r} is not IOB2 (expected O, B-TYPE or I-TYPE)")


def _set_lang(found, lang, where):
    """Return the language, raising if `found` disagrees with what is already known."""
    if lang is not None and found != lang:
        raise DataError(f"{where}: language {found!r} disagrees with {lang!r}")
    return found


def _read_columns(path, lines, lang):
    """PAN-X (`lang:token<TAB>TAG`) or CoNLL (`token ... TAG`) lines -> (sentences, lang)."""
    first = next((l for l in lines if l.strip() and not l.startswith("-DOCSTART-")), "")
    # PAN-X is told apart from CoNLL by its language prefix on the first token.
    panx = re.match(r"[a-z][a-z-]*:[^\t]*\t", first) is not None
    sents, words, tags = [], [], []
    for n, line in enumerate(lines + [""], start=1):
        line, where = line.rstrip(), f"{path}:{n}"
        if not line or line.startswith("-DOCSTART-"):
            if words:  # a sentence ends at a blank line (several in a row are fine)
                sents.append((words, tags))
                words, tags = [], []
            continue
        cols = line.split("\t") if panx else line.split()
        if len(cols) < 2:
            raise DataError(f"{where}: expected a token and a tag column, got {line!r}")
        word, tag = cols[0], cols[-1]
        if panx:
            prefix, sep, word = word.partition(":")  # the token itself may contain ':'
            if not sep:
                raise DataError(f"{where}: expected a 'lang:' prefix on the token, got {line!r}")
            lang = _set_lang(prefix, lang, where)
        _check_tag(tag, where)
        words.append(word)
        tags.append(tag)
    return sents, lang


def _read_jsonl(path, lines, lang, label_names):
    """JSON lines with `tokens`, `ner_tags` (strings, or ints into a label list), `lang(s)`."""
    sents = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
            words, raw = rec["tokens"], rec["ner_tags"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{where}: expected a JSON object with 'tokens' and 'ner_tags' ({e})") from None
        if len(words) != len(raw):
            raise DataError(f"{where}: {len(words)} tokens but {len(raw)} ner_tags")
        names = label_names or rec.get("labels") or rec.get("label_names") or WIKIANN_LABELS
        tags = []
        for t in raw:
            if isinstance(t, int) and not 0 <= t < len(names):
                raise DataError(f"{where}: tag id {t} outside the label list {names}")
            tags.append(names[t] if isinstance(t, int) else t)
            _check_tag(tags[-1], where)
        for found in set(rec.get("langs") or [rec.get("lang")]) - {None}:
            lang = _set_lang(found, lang, where)
        sents.append((list(words), tags))
    return sents, lang


def read_ner(path, lang=None, label_names=None) -> list[Sentence]:
    """Read an NER file (PAN-X tsv, CoNLL columns or JSON lines, detected from the
    extension and content). The language comes from the data (PAN-X prefixes, JSON
    `lang`/`langs`), else from `lang`, else 'und'; a disagreement is a DataError.
    Integer JSON tags are decoded with `label_names`, the record's `labels` or
    `label_names` list, or else the HF wikiann order WIKIANN_LABELS."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()  # splitlines also eats CRLF
    if path.suffix in (".jsonl", ".json"):
        sents, lang = _read_jsonl(path, lines, lang, label_names)
    else:
        sents, lang = _read_columns(path, lines, lang)
    if not sents:
        raise DataError(f"{path}: no sentences found (expected token/tag lines or JSON records)")
    return [Sentence(w, t, lang or "und") for w, t in sents]


def split_path(data_dir, split, lang) -> Path:
    """Locate a split: XTREME's flat `{split}-{lang}.tsv`, or `{lang}/{split}.{ext}`."""
    d = Path(data_dir)
    tried = [d / f"{split}-{lang}.tsv"] + [d / lang / f"{split}.{ext}" for ext in SPLIT_EXTS]
    for p in tried:
        if p.is_file():
            return p
    raise DataError(f"no {split} split for {lang!r}; tried {', '.join(map(str, tried))}")


def read_split(data_dir, split, lang) -> list[Sentence]:
    """Read one language's split from either directory layout (see split_path)."""
    return read_ner(split_path(data_dir, split, lang), lang)


def languages(data_dir, split) -> list[str]:
    """Sorted languages that have `split` under data_dir, in either layout."""
    d = Path(data_dir)
    flat = {p.name[len(split) + 1:-4] for p in d.glob(f"{split}-*.tsv")}
    nested = {p.parent.name for ext in SPLIT_EXTS for p in d.glob(f"*/{split}.{ext}")}
    return sorted(flat | nested)


# ----------------------------------------------------------------------------- labels

def label_list(sentences) -> list[str]:
    """'O', then B-T, I-T for each entity type T in sorted order."""
    types = sorted({t[2:] for s in sentences for t in s.tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]


def check_labels(sentences, labels, where):
    """Raise DataError if a tag in `sentences` is not among `labels` (e.g. the model's)."""
    known = set(labels)
    for i, s in enumerate(sentences):
        for tag in s.tags:
            if tag not in known:
                raise DataError(f"{where}: sentence {i}: label {tag!r} is not one of the model's labels {list(labels)}")


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(path) -> Tokenizer:
    """Load a `tokenizer.json` file, or one from a folder (e.g. an xlm-roberta checkpoint)."""
    path = Path(path)
    return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))


def train_tokenizer(texts, vocab_size=8000) -> Tokenizer:
    """Train an XLM-R-shaped tokenizer on an iterable of strings: Unigram + Metaspace,
    <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> as the last id, `<s> $A </s>` template."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁")
    tok.decoder = decoders.Metaspace(replacement="▁")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(["<mask>"])  # appended after the learnt vocab, as in XLM-R
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return tok


def _word_pieces(tokenizer, words):
    """Subword ids per word; a word the tokenizer drops entirely gets <unk> so it is still predicted."""
    enc = tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
    pieces = [[] for _ in words]
    for i, w in zip(enc.ids, enc.word_ids):
        pieces[w].append(i)
    unk = tokenizer.token_to_id("<unk>")
    return [p or [unk] for p in pieces]


def encode_words(tokenizer, words) -> tuple[list[int], list[int]]:
    """Subword ids of pre-split words (no special tokens) and the word index of each."""
    pieces = _word_pieces(tokenizer, words)
    return [i for p in pieces for i in p], [w for w, p in enumerate(pieces) for _ in p]


# ----------------------------------------------------------------------------- alignment

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # label id on each word's first subword, IGNORE elsewhere
    sent: int          # index of the sentence this window comes from
    words: list[int]   # word index (within the sentence) whose first subword is here, else -1


def _windows(lengths, budget, stride):
    """Split words (given their subword counts) into windows (ctx, start, end):
    words start..end-1 are labelled here, ctx..start-1 are unlabelled left context
    of at most `stride` subwords. Every word is labelled in exactly one window."""
    start = 0
    while start < len(lengths):
        ctx, used = start, 0
        while ctx > 0 and used + lengths[ctx - 1] <= stride:
            ctx, used = ctx - 1, used + lengths[ctx - 1]
        end, used = start + 1, used + lengths[start]  # always take one word, even if too long
        while end < len(lengths) and used + lengths[end] <= budget:
            end, used = end + 1, used + lengths[end]
        yield ctx, start, end
        start = end


def encode(sentences, tokenizer, label2id, max_len=128, stride=None) -> list[Example]:
    """Tokenise and label sentences as `<s> subwords </s>` examples of at most max_len
    ids. Long sentences are split at word boundaries into several windows, each
    starting with up to `stride` subwords of unlabelled left context (default none);
    a word longer than a window keeps only its first subwords."""
    budget, stride = max_len - 2, stride or 0
    assert 0 <= stride < budget, "left context must leave room for a labelled subword"
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    out = []
    for si, s in enumerate(sentences):
        pieces = _word_pieces(tokenizer, s.words)
        for ctx, start, end in _windows([len(p) for p in pieces], budget, stride):
            ids, labels, words = [], [], []
            for w in range(ctx, end):
                first = w >= start
                ids += pieces[w]
                labels += [label2id[s.tags[w]] if first else IGNORE] + [IGNORE] * (len(pieces[w]) - 1)
                words += [w if first else -1] + [-1] * (len(pieces[w]) - 1)
            out.append(Example([bos] + ids[:budget] + [eos], [IGNORE] + labels[:budget] + [IGNORE],
                               si, [-1] + words[:budget] + [-1]))
    return out


# ----------------------------------------------------------------------------- batching

def collate(examples, pad_id) -> dict:
    """Pad examples to the longest one: LongTensors input_ids, attention_mask, labels."""
    n = max(len(e.input_ids) for e in examples)
    pad = lambda seq, v: seq + [v] * (n - len(seq))
    return {"input_ids": torch.tensor([pad(e.input_ids, pad_id) for e in examples]),
            "attention_mask": torch.tensor([pad([1] * len(e.input_ids), 0) for e in examples]),
            "labels": torch.tensor([pad(e.labels, IGNORE) for e in examples])}


def batches(examples, batch_size, pad_id, shuffle=False, seed=0, epoch=0) -> list[dict]:
    """Collated batches covering every example once. Unshuffled keeps the input order
    (for evaluation); shuffled is length-bucketed to save padding and is a pure
    function of (seed, epoch), so a resumed run replays the same batches."""
    order = list(range(len(examples)))
    if shuffle:
        rng = random.Random(seed * 1_000_003 + epoch)
        rng.shuffle(order)
        group = batch_size * 50  # sort within groups of ~50 batches: little padding, still random
        order = [i for g in range(0, len(order), group)
                 for i in sorted(order[g:g + group], key=lambda i: len(examples[i].input_ids))]
    chunks = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(chunks)
    return [collate([examples[i] for i in c], pad_id) for c in chunks]


# ----------------------------------------------------------------------------- episodes

@dataclass
class EpisodeConfig:
    source_langs: tuple[str, ...] = ("en",)
    query_langs: tuple[str, ...] = ()  # () = every language in the data except the sources
    support_size: int = 8              # examples per support batch
    query_size: int = 8                # examples per query batch
    tasks_per_step: int = 4            # tasks (support, query pairs) per meta-step
    pairing: str = "cross"             # "cross": query in a non-source language; "same": one language per task


def episodes(examples_by_lang, cfg, pad_id, seed, step) -> list[tuple[dict, dict]]:
    """The meta-batch of meta-step `step`: tasks_per_step (support, query) batch pairs.
    A pure function of (seed, step), so a resumed run sees the same episodes."""
    sources = list(cfg.source_langs)
    queries = [l for l in cfg.query_langs or sorted(examples_by_lang) if l not in sources]
    langs = sources + queries
    if cfg.pairing not in ("cross", "same"):
        raise ValueError(f"pairing must be 'cross' or 'same', got {cfg.pairing!r}")
    if cfg.pairing == "cross" and not queries:
        raise DataError(f"no query language other than the sources {sources} in {sorted(examples_by_lang)}")
    for lang in langs:
        if not examples_by_lang.get(lang):
            raise DataError(f"episodes: no examples for configured language {lang!r}")
    rng = random.Random(seed * 1_000_003 + step)

    def draw(lang, k):
        exs = examples_by_lang[lang]
        if len(exs) < k:
            raise DataError(f"episodes: language {lang!r} has {len(exs)} examples, a batch needs {k}")
        return [exs[i] for i in rng.sample(range(len(exs)), k)]

    tasks = []
    for _ in range(cfg.tasks_per_step):
        if cfg.pairing == "cross":
            support, query = draw(rng.choice(sources), cfg.support_size), draw(rng.choice(queries), cfg.query_size)
        else:  # one draw, split in two, keeps support and query disjoint
            both = draw(rng.choice(langs), cfg.support_size + cfg.query_size)
            support, query = both[:cfg.support_size], both[cfg.support_size:]
        tasks.append((collate(support, pad_id), collate(query, pad_id)))
    return tasks


# ----------------------------------------------------------------------------- evaluation

def word_predictions(examples, pred_ids, n_words_per_sentence, id2label) -> list[list[str]]:
    """One predicted tag per word per sentence, from per-example predicted label ids
    aligned with input_ids (padding beyond an example's length is ignored)."""
    out = [[None] * n for n in n_words_per_sentence]
    for ex, pred in zip(examples, pred_ids, strict=True):
        for j, w in enumerate(ex.words):
            if w >= 0:
                assert out[ex.sent][w] is None, f"sentence {ex.sent} word {w} predicted twice"
                out[ex.sent][w] = id2label[int(pred[j])]
    for i, tags in enumerate(out):
        assert None not in tags, f"sentence {i} word {tags.index(None)} got no prediction"
    return out


def _entities(tags):
    """(type, start, end) chunks with conlleval/seqeval semantics for IOB2 tags: an
    I-X continues a chunk only right after B-X/I-X; otherwise it starts one."""
    chunks, start, typ = [], None, None
    for i, tag in enumerate(tags + ["O"]):
        prefix, t = tag[0], tag[2:]
        if prefix == "I" and start is not None and t == typ:
            continue
        if start is not None:
            chunks.append((typ, start, i - 1))
            start = None
        if prefix in ("B", "I"):
            start, typ = i, t
    return chunks


def _prf(tp, n_pred, n_gold):
    """Precision, recall, F1 with 0.0 on zero division (seqeval's default)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def entity_f1(gold, pred) -> dict:
    """Entity-level micro precision/recall/F1 plus `per_type` {type: p, r, f1, support},
    exactly as seqeval's default (non-strict) mode computes them."""
    if len(gold) != len(pred):
        raise DataError(f"entity_f1: {len(gold)} gold sentences but {len(pred)} predicted")
    g, p = set(), set()
    for i, (gs, ps) in enumerate(zip(gold, pred)):
        if len(gs) != len(ps):
            raise DataError(f"entity_f1: sentence {i} has {len(gs)} gold tags but {len(ps)} predicted")
        g |= {(i, *c) for c in _entities(list(gs))}
        p |= {(i, *c) for c in _entities(list(ps))}
    per_type = {}
    for t in sorted({c[1] for c in g | p}):
        gt, pt = {c for c in g if c[1] == t}, {c for c in p if c[1] == t}
        per_type[t] = {**_prf(len(gt & pt), len(pt), len(gt)), "support": len(gt)}
    return {**_prf(len(g & p), len(p), len(g)), "per_type": per_type}


def macro_average(per_lang) -> float:
    """Mean F1 over languages, given {lang: entity_f1(...) result}."""
    return sum(r["f1"] for r in per_lang.values()) / len(per_lang) if per_lang else 0.0
