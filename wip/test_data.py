"""Tests for data.py (readers, alignment, batching, episodes, metrics)."""
import json
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import DataError, Example, Sentence  # noqa: E402


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
