"""Statistics of the default synthetic world: run `python wip/testbed_stats.py [out_dir]`."""
import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testbed import WorldConfig, make_world, write_tokenizer  # noqa: E402


def read(path):
    sents, cur = [], []
    for ln in open(path, encoding="utf-8"):
        ln = ln.rstrip("\n")
        if not ln:
            if cur:
                sents.append(cur)
            cur = []
        else:
            tok, tag = ln.split("\t")
            cur.append((tok.split(":", 1)[1], tag))
    return sents + ([cur] if cur else [])


def spans(tags):
    out, start = set(), None
    for i, t in enumerate(tags + ["O"]):
        if start is not None and not t.startswith("I-" + tags[start][2:]):
            out.add((start, i, tags[start][2:])); start = None
        if t.startswith("B-"):
            start = i
    return out


def f1(gold, pred):
    tp = npred = ngold = 0
    for g, p in zip(gold, pred):
        G, P = spans(g), spans(p)
        tp += len(G & P); npred += len(P); ngold += len(G)
    pr, rc = tp / max(npred, 1), tp / max(ngold, 1)
    return 2 * pr * rc / max(pr + rc, 1e-9)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="testbed_")
    cfg = WorldConfig()
    t0 = time.time(); make_world(out, cfg); t_gen = time.time() - t0
    t0 = time.time(); tok = write_tokenizer(out); t_tok = time.time() - t0
    print(f"out_dir={out}\ngenerate: {t_gen:.2f}s   tokenizer (vocab {tok.get_vocab_size()}): {t_tok:.2f}s")
    data = {(s, l): read(os.path.join(out, f"{s}-{l}.tsv")) for s in ("train", "dev", "test") for l in cfg.languages}
    unl = open(os.path.join(out, "unlabeled.txt"), encoding="utf-8").read().splitlines()
    print(f"unlabeled lines: {len(unl)}  tokens: {sum(len(x.split()) for x in unl)}")
    print("\nlang  train/dev/test sents  tokens/sent  train entities PER/ORG/LOC  multiword%  subwords/word")
    vocab = {}
    for l in cfg.languages:
        tr = data[("train", l)]
        c = collections.Counter(t[2:] for s in tr for _, t in s if t.startswith("B-"))
        ents = [e for s in tr for e in spans([t for _, t in s])]
        multi = sum(e[1] - e[0] > 1 for e in ents) / max(len(ents), 1)
        words = [w for s in tr for w, _ in s]
        nsub = sum(len(tok.encode(s_, is_pretokenized=True, add_special_tokens=False).ids)
                   for s_ in ([w for w, _ in s] for s in tr[:300]))
        nw = sum(len(s) for s in tr[:300])
        print(f"{l:4}  {len(tr)}/{len(data[('dev', l)])}/{len(data[('test', l)])}"
              f"           {len(words) / len(tr):5.1f}        {c['PER']:4d}/{c['ORG']:4d}/{c['LOC']:4d}"
              f"              {100 * multi:4.1f}        {nsub / nw:.2f}")
        vocab[l] = {w for (s_, l_), ss in data.items() if l_ == l for s in ss for w, _ in s}
    print("\nword-type overlap (Jaccard %, labeled files) ")
    print("     " + " ".join(f"{l:>5}" for l in cfg.languages))
    for a in cfg.languages:
        print(f"{a:4} " + " ".join(f"{100 * len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b]):5.1f}"
                                   for b in cfg.languages))
    ent_vocab = {l: {w for s in data[("train", l)] for w, t in s if t != "O"} for l in cfg.languages}
    src = cfg.languages[0]
    print("\nentity-word overlap with source (share of test entity tokens seen as entity words in en train):")
    for l in cfg.languages:
        toks = [w for s in data[("test", l)] for w, t in s if t != "O"]
        print(f"  {l}: {100 * sum(w in ent_vocab[src] for w in toks) / len(toks):.1f}%")
    # lookup baseline: most frequent tag of each word in en train (unknown capitalised -> B-PER)
    cnt = collections.defaultdict(collections.Counter)
    for s in data[("train", src)]:
        for w, t in s:
            cnt[w][t] += 1
    best = {w: c.most_common(1)[0][0] for w, c in sorted(cnt.items())}
    print("\nlookup baseline F1 (en-train word->tag table) on test:")
    for l in cfg.languages:
        ts = data[("test", l)]
        pred = [[best.get(w, "O") for w, _ in s] for s in ts]
        print(f"  {l}: {100 * f1([[t for _, t in s] for s in ts], pred):.1f}")
    print("\nexamples:")
    for l in cfg.languages:
        for s in data[("train", l)][:3]:
            print(f"  {l}: " + " ".join(w + ("" if t == "O" else "/" + t) for w, t in s))
    print("  unlabeled:"); [print("    " + x) for x in unl[:6]]


if __name__ == "__main__":
    main()
