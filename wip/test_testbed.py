import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testbed import WorldConfig, make_world, write_tokenizer  # noqa: E402

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
    make_world(tmp_path / "a", WorldConfig(seed=3, **_TINY))
    make_world(tmp_path / "b", WorldConfig(seed=3, **_TINY))
    make_world(tmp_path / "c", WorldConfig(seed=4, **_TINY))
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    langs = WorldConfig().languages
    assert sorted(a) == sorted([f"{s}-{l}.tsv" for s in ("train", "dev", "test") for l in langs] + ["unlabeled.txt"])
    assert a == b
    assert sorted(a) == sorted(c) and all(a[f] != c[f] for f in a)


def test_testbed_panx_format_iob2_types_scripts(tmp_path):
    cfg = WorldConfig(**_TINY)
    make_world(tmp_path, cfg)
    scripts, ent_words = {}, {}
    for split, n in (("train", cfg.n_train), ("dev", cfg.n_dev), ("test", cfg.n_test)):
        for lang in cfg.languages:
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
    from testbed import _translit
    assert _translit("Sasha", "cyrl") == "Сасха" and _translit("Tokimo", "kana") == "トキモ"
    # unlabeled: all languages, parallel lines mixing scripts, code-switched lines
    unl = open(tmp_path / "unlabeled.txt", encoding="utf-8").read().splitlines()
    assert len(unl) == len(cfg.languages) * (cfg.n_unlabeled + cfg.n_codeswitch) + (len(cfg.languages) - 1) * cfg.n_parallel
    mixed = [x for x in unl if len({_script(w) for w in x.split()} - {None}) >= 2]
    assert len(mixed) > cfg.n_parallel
    assert all(x.strip() and "\t" not in x for x in unl)


def test_testbed_tokenizer_xlmr_specials(tmp_path):
    make_world(tmp_path, WorldConfig(**_TINY))
    tok = write_tokenizer(tmp_path, vocab_size=600)
    assert os.path.exists(tmp_path / "tokenizer.json")
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert tok.token_to_id("<mask>") == tok.get_vocab_size() - 1
    enc = tok.encode("Duhelaim Nagis ДКГ ゲトレグラム 1920 .")
    assert enc.ids[0] == 0 and enc.ids[-1] == 2
