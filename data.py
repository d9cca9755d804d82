"""Data for metapeft: NER readers, XLM-R tokenisation and label alignment,
batching, meta-learning episodes, and seqeval-exact entity F1.

Pipeline: read_split() -> list[Sentence] -> encode() -> list[Example]
-> batches() / episodes() -> model -> word_predictions() -> entity_f1().
"""
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Hugging Face `wikiann` ClassLabel order: decodes the integer `ner_tags` of a JSON record with no label list
WIKIANN_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
SPLIT_EXTS = ("tsv", "txt", "conll", "jsonl", "json")  # of `{lang}/{split}.{ext}`
FLAT_EXTS = ("tsv", "jsonl")  # of the flat `{split}-{lang}.{ext}` (XTREME's `dev-en.tsv`)
# Other names exporters give a split: Hugging Face `datasets` (WikiANN) calls the dev split `validation`.
SPLIT_NAMES = {"dev": ("dev", "validation", "valid", "val")}
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
    # PAN-X is told apart from CoNLL by its language prefix on the first token (tab-separated, or spaces as a copy
    # through an editor may leave them: read alike, not as CoNLL tokens with the prefix kept)
    panx = re.match(r"[a-z][a-z-]*:\S*[\t ]", first) is not None
    sents, words, tags = [], [], []
    for n, line in enumerate(lines + [""], start=1):
        line, where = line.rstrip(), f"{path}:{n}"
        if not line or line.startswith("-DOCSTART-"):
            if words:  # a sentence ends at a blank line (several in a row are fine)
                sents.append((words, tags))
                words, tags = [], []
            continue
        cols = line.split("\t") if panx and "\t" in line else line.split()
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
            raise DataError(f"{where}: expected a JSON object with 'tokens' and 'ner_tags' on each line ({e})") from None
        langs = rec.get("langs", [])
        for key, v, item in (("tokens", words, (str,)), ("ner_tags", raw, (str, int)), ("langs", langs, (str,))):
            if type(v) is not list or any(type(x) not in item for x in v):  # type(): a bool is no tag id
                raise DataError(f"{where}: '{key}' must be a list of {' or '.join(t.__name__ for t in item)}")
        if not isinstance(rec.get("lang", ""), str):
            raise DataError(f"{where}: 'lang' must be a string")
        if len(words) != len(raw):
            raise DataError(f"{where}: {len(words)} tokens but {len(raw)} ner_tags")
        names = label_names or rec.get("labels") or rec.get("label_names") or WIKIANN_LABELS
        tags = []
        for t in raw:
            if isinstance(t, int) and not 0 <= t < len(names):
                raise DataError(f"{where}: tag id {t} outside the label list {names}")
            tags.append(names[t] if isinstance(t, int) else t)
            _check_tag(tags[-1], where)
        for found in set(langs or [rec.get("lang")]) - {None}:
            lang = _set_lang(found, lang, where)
        if words:  # a record without tokens is no sentence (as a blank line in the column formats)
            sents.append((words, tags))
    return sents, lang


def read_ner(path, lang=None, label_names=None) -> list[Sentence]:
    """Read an NER file (PAN-X tsv, CoNLL columns or JSON lines, detected from the
    extension and content). The language comes from the data (PAN-X prefixes, JSON
    `lang`/`langs`), else from `lang`, else 'und'; a disagreement is a DataError.
    Integer JSON tags are decoded with `label_names`, the record's `labels` or
    `label_names` list, or else the HF wikiann order WIKIANN_LABELS."""
    path = Path(path)
    lines = read_text(path).splitlines()  # splitlines also eats CRLF
    if path.suffix in (".jsonl", ".json"):
        sents, lang = _read_jsonl(path, lines, lang, label_names)
    else:
        sents, lang = _read_columns(path, lines, lang)
    if not sents:
        raise DataError(f"{path}: no sentences found (expected token/tag lines or JSON records)")
    return [Sentence(w, t, lang or "und") for w, t in sents]


def read_text(path) -> str:
    """A UTF-8 text file's contents; an unreadable file or a byte that is not UTF-8 is a DataError naming the file
    (and the line)."""
    try:
        raw = Path(path).read_bytes()
        return raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark (Windows editors) is no text
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: byte 0x{raw[e.start]:02x} is not UTF-8 (expected UTF-8 text)") from None


def split_path(data_dir, split, lang) -> Path:
    """Locate a split: XTREME's flat `{split}-{lang}.tsv` (or .jsonl), or `{lang}/{split}.{ext}`, the split under
    any of its names (SPLIT_NAMES: dev may be `validation`, ...). No file, or more than one, is a DataError."""
    d, names = Path(data_dir), SPLIT_NAMES.get(split, (split,))
    candidates = ([d / f"{n}-{lang}.{e}" for n in names for e in FLAT_EXTS]
                  + [d / lang / f"{n}.{e}" for n in names for e in SPLIT_EXTS])
    found = [p for p in candidates if p.is_file()]
    if len(found) > 1:
        raise DataError(f"{d}: the {split} split of {lang!r} is ambiguous: "
                        f"{' and '.join(str(p.relative_to(d)) for p in found)} (expected one file)")
    if not found:
        alt = lambda xs: xs[0] if len(xs) == 1 else "{" + ",".join(xs) + "}"  # shell brace notation
        raise DataError(f"no {split} split for {lang!r} in {d}; looked for {alt(names)}-{lang}.{alt(FLAT_EXTS)} "
                        f"and {lang}/{alt(names)}.{alt(SPLIT_EXTS)}")
    return found[0]


def read_split(data_dir, split, lang) -> list[Sentence]:
    """Read one language's split from either directory layout (see split_path)."""
    return read_ner(split_path(data_dir, split, lang), lang)


def languages(data_dir, split) -> list[str]:
    """Sorted languages that have `split` (under any of its names) under data_dir, in either layout."""
    d, found = Path(data_dir), set()
    for n in SPLIT_NAMES.get(split, (split,)):
        found |= {p.name[len(n) + 1:-len(e) - 1] for e in FLAT_EXTS for p in d.glob(f"{n}-*.{e}")}
        found |= {p.parent.name for e in SPLIT_EXTS for p in d.glob(f"*/{n}.{e}")}
    return sorted(found)


# ----------------------------------------------------------------------------- labels

def label_list(sentences) -> list[str]:
    """'O', then B-T, I-T for each entity type T in sorted order."""
    types = sorted({t[2:] for s in sentences for t in s.tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]


def check_labels(sentences, labels, where):
    """Raise DataError if a tag in `sentences` is not among `labels` (e.g. the model's)."""
    known = set(labels)
    for i, s in enumerate(sentences, start=1):
        for tag in s.tags:
            if tag not in known:
                raise DataError(f"{where}: sentence {i}: label {tag!r} is not one of the labels {list(labels)} (the "
                                f"model's, or those of the source's training data)")


# ----------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # XLM-R's, which the pipeline relies on


def load_tokenizer(path) -> Tokenizer:
    """Load a `tokenizer.json` file, or one from a folder (e.g. an xlm-roberta checkpoint)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for a missing, unreadable or malformed file
        raise DataError(f"{file}: not a readable tokenizer.json ({e})") from None
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise DataError(f"{file}: no {', '.join(missing)} token (expected an XLM-R tokenizer)")
    return tok


def train_tokenizer(texts, vocab_size=8000) -> Tokenizer:
    """Train an XLM-R-shaped tokenizer on an iterable of strings: Unigram + Metaspace,
    <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> as the last id, `<s> $A </s>` template."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁")
    tok.decoder = decoders.Metaspace(replacement="▁")
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.model = _reproducible(tok, len(specials))
    tok.add_special_tokens(["<mask>"])  # appended after the learnt vocab, as in XLM-R
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return tok


def _reproducible(tok, n_special) -> models.Unigram:
    """The trained Unigram model with run-to-run noise removed. tokenizers' trainer visits the words in hash
    order, which leaves ~1e-11 float noise in the scores and reorders ties, and gives the characters it re-adds
    after pruning the scores min, min + 1e-4, ... in hash order. So: round the scores to 1e-4, put that bottom
    band (one 1e-4 step per character at most) at the minimum, and sort ties by piece."""
    model = json.loads(tok.to_str())["model"]
    special, learnt = model["vocab"][:n_special], model["vocab"][n_special:]
    low = min(s for _, s in learnt)
    band = low + 1e-4 * sum(len(p) == 1 for p, _ in learnt)
    learnt = sorted(((p, round(low if s < band else s, 4)) for p, s in learnt), key=lambda ps: (-ps[1], ps[0]))
    return models.Unigram([tuple(ps) for ps in special] + learnt, unk_id=model["unk_id"], byte_fallback=False)


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


# ----------------------------------------------------------------------------- synthetic testbed
# A small multilingual world in which the whole method runs on a laptop CPU (no real data can be downloaded).
# Abstract sentences (clauses with typed slots, fragments) are rendered into pseudo-languages, each with its own
# lexicon and syllables, one of four scripts, SVO/V2/SOV order, prepositions, postpositions or suffixes, articles
# and noun capitalisation. Entity names are shared verbatim between the Latin-script languages and transliterated
# into Cyrillic, Greek and katakana. The unlabeled corpus mixes monolingual text with parallel pairs and
# code-switched lines (the alignment anchors of real multilingual models). Every random.Random is seeded by a
# string (world seed, split, language), so a world is a function of its WorldConfig.

@dataclass
class WorldConfig:
    """A world's knobs: corpus and split sizes, lexicon and name-pool sizes, and the probabilities of sentence and
    entity forms. The defaults are the calibrated world (study/README.md, "Calibration of the testbed")."""
    seed: int = 0
    languages: tuple = ("en", "de", "ru", "tr", "ja", "es", "el")  # the first is the source
    priming_only: tuple = ("es", "el")  # train and dev only: the query languages of priming, never tested
    n_unlabeled: int = 3000          # monolingual unlabeled sentences per language
    n_parallel: int = 2500           # en-X parallel lines per target language
    n_codeswitch: int = 2000         # code-switched lines per language
    n_train: int = 1000              # labeled sentences per language and split
    n_dev: int = 200
    n_test: int = 300
    n_nouns: int = 150               # concepts of the shared lexicon
    n_adjs: int = 50
    n_advs: int = 20
    verbs_per_class: int = 3         # verbs of each class in _VERBS
    n_first: int = 100               # first-name pool
    n_last: int = 150                # last-name pool
    n_loc: int = 120                 # place-name stems
    n_org: int = 80                  # organisation stems
    n_shared: int = 20               # names usable both as last name and place
    n_wordnames: int = 25            # names that are also common (en) words
    p_fragment: float = 0.1          # context-free fragments ("X", "X , Y", "X ( Y )")
    p_two_clauses: float = 0.25      # sentences of two clauses joined by "and"
    p_title: float = 0.25            # persons with a title ("president X")
    p_exonym: float = 0.05           # place names with language-specific forms
    p_keep_latin: float = 0.5        # entities left untransliterated in non-Latin scripts
    p_codeswitch_word: float = 0.5   # words and names taken from the other language in a code-switched line
    label_noise: float = 0.02        # silver-standard noise in labeled splits


# ----------------------------------------------------------------------------- languages

_LANGUAGES = {
    # articles: "en" a definite and an indefinite one, "de" those by gender too, "tr" an indefinite one only
    "en": dict(script="latin", order="SVO", adposition="pre", articles="en", capital_nouns=False),
    "de": dict(script="latin", order="V2", adposition="pre", articles="de", capital_nouns=True),
    "ru": dict(script="cyrl", order="SVO", adposition="pre", articles=None, capital_nouns=False),
    "tr": dict(script="latin", order="SOV", adposition="suffix", articles="tr", capital_nouns=False),
    "ja": dict(script="kana", order="SOV", adposition="post", articles=None, capital_nouns=False),
    "es": dict(script="latin", order="SVO", adposition="pre", articles="en", capital_nouns=False),
    "el": dict(script="grek", order="SVO", adposition="pre", articles="en", capital_nouns=False),
}
_HIRAGANA = list("あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめも"
                 "らりるれろがぎぐげござじずぜぞだでどばびぶべぼやゆよわ")
# syllable parts, "|"-separated: onsets, nuclei and codas of each language's words (ja's are hiragana) and of the
# names; "" is an empty part, and a part listed twice is drawn twice as often
_SYLLABLES = {lang: tuple(parts.split("|") for parts in inventory) for lang, inventory in {
    "en": ("b|c|d|f|g|h|j|k|l|m|n|p|r|s|t|v|w|th|sh|ch|br|st|tr|pl|gr|", "a|e|i|o|u|ea|oo|ai", "||n|r|s|t|ll|ck|nd|ng"),
    "de": ("b|d|f|g|h|k|l|m|n|p|r|s|t|w|z|sch|st|pf|kr|gr|", "a|e|i|o|u|ä|ö|ü|ei|au|ie", "|n|r|ch|t|ß|ng|rt|lz|ck"),
    "tr": ("b|c|ç|d|g|h|k|l|m|n|p|r|s|ş|t|y|z|", "a|e|ı|i|o|ö|u|ü", "||r|n|k|m|l|ş|z"),
    "ru": ("б|в|г|д|ж|з|к|л|м|н|п|р|с|т|ф|х|ц|ч|ш|ст|пр|кр|", "а|е|и|о|у|ы|я|ю", "||в|й|н|р|л|сть|к"),
    "es": ("b|c|d|f|g|l|m|n|p|r|s|t|v|ll|ch|", "a|e|i|o|u|ue|ie", "||n|s|r|l"),
    "el": ("β|γ|δ|ζ|θ|κ|λ|μ|ν|ξ|π|ρ|σ|τ|φ|χ|", "α|ε|η|ι|ο|υ|ω|ου", "||ς|ν|ρ"),
    "names": ("b|c|d|f|g|h|j|k|l|m|n|p|r|s|t|v|w|z|br|cl|dr|fr|gr|kr|st|tr|", "a|e|i|o|u|a|e|o|ia|ai",
              "|||n|r|s|l|m|nt|rd"),
}.items()}
# transliteration of each Latin letter
_TO_CYRILLIC = dict(zip("abcdefghijklmnopqrstuvwxyz", "а б к д е ф г х и дж к л м н о п к р с т у в в кс й з".split()))
_TO_GREEK = dict(zip("abcdefghijklmnopqrstuvwxyz", "α μπ κ ντ ε φ γ χ ι τζ κ λ μ ν ο π κ ρ σ τ ου β ου ξ ι ζ".split()))
# katakana by consonant, in vowel order a i u e o
_KANA_ROWS = {"": "アイウエオ", "k": "カキクケコ", "s": "サシスセソ", "t": "タチツテト", "n": "ナニヌネノ",
              "h": "ハヒフヘホ", "m": "マミムメモ", "y": "ヤイユエヨ", "r": "ラリルレロ", "w": "ワイウエヲ",
              "g": "ガギグゲゴ", "z": "ザジズゼゾ", "d": "ダヂヅデド", "b": "バビブベボ", "p": "パピプペポ"}
_KANA_ROW_OF = {"c": "k", "l": "r", "v": "b", "f": "h", "j": "z", "q": "k"}  # for Latin consonants without one

# verb classes: (name, subject types, object types or None, [(preposition, its object types, probability)],
# probability of "in <year>"); type N is a common noun phrase
_VERBS = [
    ("born", ["PER"], None, [("in", ["LOC"], 1.0)], 0.6),
    ("work", ["PER"], None, [("at", ["ORG"], 1.0)], 0.1),
    ("play", ["PER"], None, [("for", ["ORG"], 1.0)], 0.2),
    ("visit", ["PER", "ORG"], ["LOC"], [], 0.2),
    ("found", ["PER"], ["ORG"], [("in", ["LOC"], 0.4)], 0.4),
    ("lead", ["PER"], ["ORG", "LOC"], [], 0.1),
    ("meet", ["PER"], ["PER"], [("in", ["LOC"], 0.5)], 0.1),
    ("acquire", ["ORG"], ["ORG"], [], 0.3),
    ("locate", ["ORG", "LOC"], None, [("in", ["LOC"], 1.0)], 0.0),
    ("flow", ["LOC"], None, [("through", ["LOC"], 1.0)], 0.0),
    ("announce", ["PER", "ORG"], ["N"], [], 0.2),
    ("win", ["PER", "ORG"], ["N"], [("in", ["LOC"], 0.3)], 0.3),
    ("move", ["PER", "ORG"], None, [("from", ["LOC"], 0.6), ("to", ["LOC"], 1.0)], 0.2),
    ("gen1", ["PER", "ORG", "LOC", "N"], ["N", "PER", "ORG", "LOC"], [("with", ["PER", "ORG", "N"], 0.3)], 0.1),
    ("gen2", ["PER", "ORG", "LOC", "N"], ["N", "PER", "ORG", "LOC"], [("near", ["LOC", "N"], 0.2)], 0.1),
    ("describe", ["N"], ["PER", "ORG", "LOC"], [("by", ["PER", "ORG"], 0.3)], 0.1),
]
_PREPOSITIONS = ["in", "at", "for", "with", "from", "to", "through", "near", "of", "by"]
# "subj"/"obj": ja's particles and tr's object suffix; articles by gender for de. No template uses "also", but its
# word is drawn with the lexicon, so it stays: dropping it would change every world.
_FUNCTION_WORDS = "and also subj obj def indef def_m def_f def_n indef_m indef_f indef_n".split()
# nouns 0..4 double as place suffixes (river, lake, ...), 5..14 as organisation suffixes
# (bank, group, university, ...), 15..22 as person titles (president, doctor, ...);
# adjective 0 ("new") doubles as a place prefix ("New X").
_PLACE_NOUNS, _ORG_NOUNS, _TITLE_NOUNS = range(0, 5), range(5, 15), range(15, 23)
_PUNCTUATION = {"kana": ("。", "、")}  # (full stop, comma) by script; "." and "," in the others


def _word(rng, syllables, n):
    """A word of n syllables: each an onset and a nucleus, the last and one in five of the others with a coda."""
    onsets, nuclei, codas = syllables
    return "".join(rng.choice(onsets) + rng.choice(nuclei) + (rng.choice(codas) if i == n - 1 or rng.random() < .2
                                                               else "") for i in range(n))


def _kana_word(rng, n):
    """A word of n hiragana, one in five ending in ん."""
    return "".join(rng.choice(_HIRAGANA) for _ in range(n)) + ("ん" if rng.random() < .2 else "")


def _translit(name, script):
    """Deterministic transliteration of an ASCII Latin name into another script."""
    if script == "latin":
        return name
    if script in ("cyrl", "grek"):
        table = _TO_CYRILLIC if script == "cyrl" else _TO_GREEK
        out = "".join(table.get(c.lower(), c) for c in name)
        return out.upper() if name.isupper() and len(name) > 1 else out[:1].upper() + out[1:]
    if name.isupper():                         # acronyms stay Latin in kana languages
        return name
    # katakana: a vowel, or a consonant and its vowel, is one kana; a consonant with no vowel after it is its row's
    # u-kana (o-kana for t and d, ン for n); x is "ks"; other characters are dropped
    s, out, i = name.lower(), [], 0
    while i < len(s):
        c = s[i]
        if c in "aiueo":
            out.append(_KANA_ROWS[""]["aiueo".index(c)]); i += 1
            continue
        row = _KANA_ROW_OF.get(c, c)
        if c == "x":
            out.append("ク"); row = "s"
        if row not in _KANA_ROWS:
            i += 1
            continue
        if i + 1 < len(s) and s[i + 1] in "aiueo":
            out.append(_KANA_ROWS[row]["aiueo".index(s[i + 1])]); i += 2
        else:
            out.append("ン" if row == "n" else _KANA_ROWS[row][4 if row in "td" else 2]); i += 1
    return "".join(out)


def _exonym(name, rng):
    """A place name's own form in another language: one vowel changed (60%, if it has one) or an ending added."""
    vowels = "aeiou"
    at = [i for i, c in enumerate(name) if c in vowels]
    if at and rng.random() < .6:
        i = rng.choice(at)
        return name[:i] + rng.choice([v for v in vowels if v != name[i]]) + name[i + 1:]
    return name + rng.choice(["en", "ia", "o", "a", "ie"])


# ----------------------------------------------------------------------------- world

def _build_world(cfg):
    """What a world's files share: each language's lexicon (a word per concept: nouns N0.., adjectives A0..,
    adverbs R0.., verbs V_<class>_<k>, P_<preposition>, F_<function word>) and noun genders, names, exonyms."""
    rng = random.Random(f"world-{cfg.seed}")
    concepts = ([f"N{i}" for i in range(cfg.n_nouns)] + [f"A{i}" for i in range(cfg.n_adjs)]
                + [f"R{i}" for i in range(cfg.n_advs)]
                + [f"V_{v[0]}_{k}" for v in _VERBS for k in range(cfg.verbs_per_class)]
                + [f"P_{p}" for p in _PREPOSITIONS] + [f"F_{f}" for f in _FUNCTION_WORDS])
    lex, gender = {}, {}
    for lang in cfg.languages:
        spec, lex_rng, words = _LANGUAGES[lang], random.Random(f"lex-{cfg.seed}-{lang}"), {}
        kana = spec["script"] == "kana"
        for c in concepts:
            for _ in range(1000):  # redraw a word another concept has (after 1000 draws, keep it)
                # prepositions and function words are short; kana words get a syllable more (a kana has no coda)
                n = (lex_rng.choice([1, 1, 2]) if c[0] in "PF" else lex_rng.choice([1, 2, 2, 3])) + kana
                word = _kana_word(lex_rng, n) if kana else _word(lex_rng, _SYLLABLES[lang], n)
                if word not in words.values():
                    break
            words[c] = word
        lex[lang] = {c: w[:1].upper() + w[1:] if spec["capital_nouns"] and c[0] == "N" else w
                     for c, w in words.items()}
        gender[lang] = {f"N{i}": lex_rng.choice("mfn") for i in range(cfg.n_nouns)}

    taken = set()

    def new_names(n, n_syllables=(2, 3)):
        """n capitalised names of at least 3 letters, none in another pool."""
        out = []
        while len(out) < n:
            w = _word(rng, _SYLLABLES["names"], rng.choice(n_syllables)).capitalize()
            if len(w) >= 3 and w not in taken:
                taken.add(w); out.append(w)
        return out
    pools = {"first": new_names(cfg.n_first), "last": new_names(cfg.n_last), "place": new_names(cfg.n_loc),
             "org": new_names(cfg.n_org, (1, 2, 3)), "last_or_place": new_names(cfg.n_shared)}
    nouns = range(_TITLE_NOUNS.stop, cfg.n_nouns)  # the nouns that are no suffix or title
    pools["common_word"] = [lex[cfg.languages[0]][f"N{i}"].capitalize() for i in rng.sample(nouns, cfg.n_wordnames)]
    pools["two_word_place"] = [f"{rng.choice(pools['place'])} {rng.choice(pools['place'])}" for _ in range(30)]
    exonyms = {}
    for name in pools["place"]:
        if rng.random() < cfg.p_exonym:
            for lang in cfg.languages[1:]:
                if rng.random() < .6:  # most other languages, not all, have a form of their own
                    exonyms[(lang, name)] = _exonym(name, rng)
    return dict(lex=lex, gender=gender, pools=pools, exonyms=exonyms, p_latin=cfg.p_keep_latin)


def _local_name(world, lang, name):
    """A name as `lang` writes it: its exonym there if it has one, in the language's script."""
    return _translit(world["exonyms"].get((lang, name), name), _LANGUAGES[lang]["script"])


# ----------------------------------------------------------------------------- abstract sentences

def _entity(rng, world, typ):
    """An entity of type PER, ORG or LOC: its parts are ("name", a name) or ("word", a concept). Each type mixes its
    usual forms with harder ones whose type only the context or a suffix tells: a name from another type's pool,
    an acronym, a bare stem. The shares are set by hand."""
    pools, r = world["pools"], rng.random()
    name = lambda *of: ("name", rng.choice([n for pool in of for n in pools[pool]]))  # a name from these pools
    if typ == "PER":
        if r < .5:                                          # "Ann Smith"
            parts = [name("first"), name("last")]
        elif r < .7:                                        # "Smith"
            parts = [name("last")]
        elif r < .8:                                        # "Ann"
            parts = [name("first")]
        elif r < .9:                                        # a last name that is also a place or a word
            parts = [name("first"), name("last_or_place", "common_word")]
        else:                                               # "Ann Mary Smith"
            parts = [name("first"), name("first"), name("last")]
    elif typ == "ORG":
        suffix = ("word", f"N{rng.choice(_ORG_NOUNS)}")
        if r < .3:                                          # "Kanto Bank"
            parts = [name("org"), suffix]
        elif r < .45:                                       # a place's organisation: "Berlin University"
            parts = [name("place", "last_or_place"), suffix]
        elif r < .55:                                       # a person's: "Smith Group"
            parts = [name("last"), suffix]
        elif r < .7:                                        # an acronym: "KLM"
            parts = [("name", "".join(rng.choice("ABCDEFGHIKLMNOPRSTUV") for _ in range(rng.choice([2, 3, 3, 4]))))]
        elif r < .9:                                        # a bare stem: "Kanto"
            parts = [name("org")]
        else:                                               # a common word, with a suffix half the time
            parts = [name("common_word")] + ([suffix] if rng.random() < .5 else [])
    else:
        if r < .45:                                         # "Berlin"
            parts = [name("place")]
        elif r < .6:                                        # "New Berlin"
            parts = [("word", "A0"), name("place")]
        elif r < .75:                                       # "Berlin River"
            parts = [name("place"), ("word", f"N{rng.choice(_PLACE_NOUNS)}")]
        elif r < .87:                                       # a place that is also a last name
            parts = [name("last_or_place")]
        else:                                               # two stems: "San Remo"
            parts = [("name", n) for n in rng.choice(pools["two_word_place"]).split()]
    return dict(kind="ent", type=typ, label=typ, parts=parts, latin=rng.random() < world["p_latin"])


def _phrase(rng, world, cfg, typ, depth=0):
    """A noun phrase: an entity of type PER/ORG/LOC, or for N a common noun with an article (2 in 3), an adjective
    (35%) and an "of" genitive holding an entity (30%; always at depth 1, as in "president of X"). Depth bounds the
    nesting: only a top-level entity takes an apposition ("X, president of Y,": 6%)."""
    if typ != "N":
        e = _entity(rng, world, typ)
        if typ == "PER" and rng.random() < cfg.p_title:
            e["title"] = f"N{rng.choice(_TITLE_NOUNS)}"
        if depth == 0 and rng.random() < .06:
            e["appos"] = _phrase(rng, world, cfg, "N", depth=1)
        return e
    phrase = dict(kind="np", noun=f"N{rng.randrange(cfg.n_nouns)}", det=rng.choice(["def", "indef", None]),
                  adj=f"A{rng.randrange(cfg.n_adjs)}" if rng.random() < .35 else None)
    if depth == 1 or depth == 0 and rng.random() < .3:
        phrase["gen"] = _phrase(rng, world, cfg, rng.choice(["PER", "ORG", "LOC"]), depth + 1)
    return phrase


def _clause(rng, world, cfg):
    """A clause of a random verb class (_VERBS): subject, object and prepositional phrases of its types, an adverb
    (20%) and "in <year>" at the class's rate."""
    verb, subj_types, obj_types, preps, p_year = _VERBS[rng.randrange(len(_VERBS))]
    c = dict(verb=f"V_{verb}_{rng.randrange(cfg.verbs_per_class)}",
             subj=_phrase(rng, world, cfg, rng.choice(subj_types)),
             obj=_phrase(rng, world, cfg, rng.choice(obj_types)) if obj_types else None, pps=[],
             adv=f"R{rng.randrange(cfg.n_advs)}" if rng.random() < .2 else None)
    for prep, types, p in preps:
        if rng.random() < p:
            c["pps"].append((prep, _phrase(rng, world, cfg, rng.choice(types))))
    if rng.random() < p_year:
        c["pps"].append(("in", dict(kind="num", text=str(rng.randint(1850, 2020)))))
    return c


def _sentence(rng, world, cfg, noise=0.0):
    """An abstract sentence: one or two clauses, or a fragment without context (as WikiANN has many): an entity
    (45%), two joined by a comma (25%) or parentheses (15%), or a common noun phrase (15%)."""
    if rng.random() < cfg.p_fragment:
        r, types = rng.random(), ["PER", "ORG", "LOC"]
        if r < .45:
            s = dict(kind="frag", items=[_entity(rng, world, rng.choice(types))], form="one")
        elif r < .7:
            s = dict(kind="frag", items=[_entity(rng, world, rng.choice(types)) for _ in range(2)], form="comma")
        elif r < .85:
            s = dict(kind="frag", items=[_entity(rng, world, rng.choice(types)) for _ in range(2)], form="paren")
        else:
            s = dict(kind="frag", items=[_phrase(rng, world, cfg, "N", 1)], form="one")
    else:
        s = dict(kind="sent", clauses=[_clause(rng, world, cfg)])
        if rng.random() < cfg.p_two_clauses:
            s["clauses"].append(_clause(rng, world, cfg))
    if noise:
        _add_noise(s, rng, noise)
    return s


def _add_noise(node, rng, p):
    """Silver-standard labels: each entity's label becomes another type or O with probability p."""
    if isinstance(node, dict):
        if node.get("kind") == "ent" and rng.random() < p:
            node["label"] = rng.choice([t for t in ("PER", "ORG", "LOC", "O") if t != node["type"]])
        for k in sorted(node):
            _add_noise(node[k], rng, p)
    elif isinstance(node, (list, tuple)):
        for x in node:
            _add_noise(x, rng, p)


# ----------------------------------------------------------------------------- rendering

class _Renderer:
    """Renders abstract sentences into (token, tag) lists in one language. Code-switched: with `switch_lang`, each
    word and name comes from that language with probability p_switch (drawn from `rng`)."""

    def __init__(self, world, lang, switch_lang=None, p_switch=0.0, rng=None):
        self.world, self.lang, self.spec = world, lang, _LANGUAGES[lang]
        self.switch_lang, self.p_switch, self.rng = switch_lang, p_switch, rng

    def _pick_lang(self):
        return self.switch_lang if self.switch_lang and self.rng.random() < self.p_switch else self.lang

    def word(self, concept):
        return self.world["lex"][self._pick_lang()][concept]

    def name(self, name, latin=False):
        lang = self._pick_lang()
        return name if latin else _local_name(self.world, lang, name)

    def entity(self, e):
        toks = []
        for kind, v in e["parts"]:
            toks += self.name(v, e["latin"]).split() if kind == "name" else [self.word(v)]
        if self.lang == "ru" and e["parts"][-1][0] == "word" and e["type"] == "LOC":
            toks = toks[-1:] + toks[:-1]               # "река X" instead of "X River"
        if self.spec["script"] != "kana":
            toks = [t[:1].upper() + t[1:] for t in toks]
        label = e["label"]
        out = [(t, "O" if label == "O" else ("B-" if i == 0 else "I-") + label) for i, t in enumerate(toks)]
        if "title" in e:
            t = (self.word(e["title"]), "O")
            out = out + [t] if self.spec["order"] == "SOV" else [t] + out
        if "appos" in e:
            comma = (_PUNCTUATION.get(self.spec["script"], (".", ","))[1], "O")
            out = out + [comma] + self.phrase(e["appos"]) + [comma]
        return out

    def phrase(self, n):
        if n["kind"] == "ent":
            return self.entity(n)
        if n["kind"] == "num":
            return [(n["text"], "O")]
        articles, out = self.spec["articles"], []
        if n["det"] and articles == "en":
            out.append((self.word("F_" + n["det"]), "O"))
        elif n["det"] and articles == "de":
            out.append((self.word(f"F_{n['det']}_{self.world['gender'][self.lang][n['noun']]}"), "O"))
        elif n["det"] == "indef" and articles == "tr":
            out.append((self.word("F_indef"), "O"))
        if n["adj"]:
            out.append((self.word(n["adj"]), "O"))
        out.append((self.word(n["noun"]), "O"))
        if "gen" in n:
            g = self.phrase(n["gen"])
            if self.spec["adposition"] == "pre":
                out = out + [(self.word("P_of"), "O")] + g
            else:
                out = self.adposition("of", g) + out
        return out

    def adposition(self, prep, toks):
        """toks with the preposition `prep` as this language puts it: before, after, or as a suffix."""
        w = self.word("P_" + prep)
        if self.spec["adposition"] == "pre":
            return [(w, "O")] + toks
        if self.spec["adposition"] == "post":
            return toks + [(w, "O")]
        return self.suffixed(toks, w)                  # Turkish-style suffix: "Ankara'da"

    def suffixed(self, toks, w):
        """toks with w joined to the last word (an apostrophe after a name or a number)."""
        i = max(j for j, (t, _) in enumerate(toks) if t not in ",、()" or j == 0)
        t, tag = toks[i]
        sep = "'" if tag != "O" or t[:1].isupper() or t.isdigit() else ""
        return toks[:i] + [(t + sep + w, tag)] + toks[i + 1:]

    def clause(self, c):
        S = self.phrase(c["subj"])
        V = [(self.word(c["verb"]), "O")]
        O = self.phrase(c["obj"]) if c["obj"] else []
        PP = [t for p, n in c["pps"] for t in self.adposition(p, self.phrase(n))]
        A = [(self.word(c["adv"]), "O")] if c["adv"] else []
        order = self.spec["order"]
        if order == "SOV":
            if self.lang == "ja":
                S = S + [(self.word("F_subj"), "O")]
                O = O + [(self.word("F_obj"), "O")] if O else O
            elif O:
                O = self.suffixed(O, self.word("F_obj"))
            return A + S + PP + O + V
        if order == "V2" and A:
            return A + V + S + O + PP
        return S + V + O + PP + A

    def render(self, s):
        end, comma = _PUNCTUATION.get(self.spec["script"], (".", ","))
        if s["kind"] == "frag":
            items = [self.phrase(x) for x in s["items"]]
            if s["form"] == "one":
                return items[0]
            if s["form"] == "comma":
                return items[0] + [(comma, "O")] + items[1]
            return items[0] + [("(", "O")] + items[1] + [(")", "O")]
        out = []
        for i, c in enumerate(s["clauses"]):
            if i:
                out += [(comma, "O"), (self.word("F_and"), "O")]
            out += self.clause(c)
        out.append((end, "O"))
        t, tag = out[0]
        if self.spec["script"] != "kana":
            out[0] = (t[:1].upper() + t[1:], tag)
        return out


# ----------------------------------------------------------------------------- files

def make_world(out_dir, cfg=None):
    """Write a world into out_dir: {train,dev,test}-{lang}.tsv (PAN-X format; no test split for cfg.priming_only)
    and unlabeled.txt (each language's monolingual and code-switched lines, en-X parallel pairs, shuffled)."""
    cfg = cfg or WorldConfig()
    os.makedirs(out_dir, exist_ok=True)
    world = _build_world(cfg)
    for split, n in (("train", cfg.n_train), ("dev", cfg.n_dev), ("test", cfg.n_test)):
        for lang in [l for l in cfg.languages if split != "test" or l not in cfg.priming_only]:
            rng, renderer, lines = random.Random(f"{split}-{cfg.seed}-{lang}"), _Renderer(world, lang), []
            for _ in range(n):
                for t, tag in renderer.render(_sentence(rng, world, cfg, cfg.label_noise)):
                    lines.append(f"{lang}:{t}\t{tag}\n")
                lines.append("\n")
            with open(os.path.join(out_dir, f"{split}-{lang}.tsv"), "w", encoding="utf-8", newline="\n") as f:
                f.writelines(lines)
    rng = random.Random(f"unlabeled-{cfg.seed}")
    lines, source = [], _Renderer(world, cfg.languages[0])
    text = lambda toks: " ".join(t for t, _ in toks)
    for lang in cfg.languages:
        renderer, others = _Renderer(world, lang), [x for x in cfg.languages if x != lang]
        lines += [text(renderer.render(_sentence(rng, world, cfg))) for _ in range(cfg.n_unlabeled)]
        for _ in range(cfg.n_codeswitch):
            switcher = _Renderer(world, lang, rng.choice(others), cfg.p_codeswitch_word, rng)
            lines.append(text(switcher.render(_sentence(rng, world, cfg))))
        if lang != cfg.languages[0]:
            for _ in range(cfg.n_parallel):
                s = _sentence(rng, world, cfg)
                pair = [text(source.render(s)), text(renderer.render(s))]
                if rng.random() < .5:  # either side first
                    pair.reverse()
                lines.append(" ".join(pair))
    rng.shuffle(lines)
    with open(os.path.join(out_dir, "unlabeled.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(x + "\n" for x in lines)


def write_tokenizer(out_dir, vocab_size=3000):
    """Train the testbed's Unigram tokenizer on unlabeled.txt + all train files; save tokenizer.json."""
    out_dir = Path(out_dir)
    texts = [l for l in (out_dir / "unlabeled.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
    for lang in languages(out_dir, "train"):
        texts += [" ".join(s.words) for s in read_split(out_dir, "train", lang)]
    tok = train_tokenizer(texts, vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    return tok
