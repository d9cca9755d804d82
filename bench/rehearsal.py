"""The README's real-data commands (prime -> finetune -> eval -> export) on a stand-in for xlm-roberta-base and PAN-X:
per stage the wall time, its data loading and tokenization, time per step or per 1,000 sentences, and peak memory.
The last line printed is one JSON object (also written to --json).

    python bench/rehearsal.py --out /tmp/rehearsal                     # full shape: 12 layers, PAN-X's sizes
    python bench/rehearsal.py --out /tmp/r --layers 1 --scale 0.01     # a smoke run

Nothing can be downloaded on this project's machines, so the inputs are built (once; kept in --out):
  model/   transformers' XLMRobertaForMaskedLM at xlm-roberta-base's configuration (vocabulary 250,002, width 768,
           --layers layers, 514 positions), random weights, in the hub layout (config.json, model.safetensors)
           with tokenizer.json: a Unigram model over 250,002 synthetic pieces in XLM-R's layout (<s>, <pad>, </s>,
           <unk> ids 0-3, <mask> last), Metaspace pre-tokenizer, `<s> $A </s>` template
  panx/    XTREME's panx_processed_maxlen128 layout for PAN-X's 40 languages: train-en.tsv, dev-de.tsv,
           test-ar.tsv, ... with `lang:token<TAB>TAG` lines (IOB2 PER/ORG/LOC), PANX_SIZES sentences per split
           and language (train 20,000, dev and test 10,000: PAN-X's sizes for its large languages) times --scale
  panx-small/  the same at --small-scale, for the stages whose full size is impractical on a CPU (fine-tuning's
           dev evaluation and eval: 10,000 sentences per set)
test_metapeft.py's rehearsal test builds the same inputs (1 layer, small sizes) with these functions.
"""
import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# PAN-X (XTREME's panx_processed_maxlen128): its 40 languages, and the script each is written in.
PANX_SCRIPTS = {
    "latin": "af de en es et eu fi fr hu id it jv ms nl pt sw tl tr vi yo", "cyrillic": "bg kk ru", "greek": "el",
    "arabic": "ar fa ur", "hebrew": "he", "devanagari": "hi mr", "bengali": "bn", "tamil": "ta", "telugu": "te",
    "malayalam": "ml", "thai": "th", "georgian": "ka", "myanmar": "my", "cjk": "ja zh", "hangul": "ko"}
PANX_LANGS = sorted(lang for langs in PANX_SCRIPTS.values() for lang in langs.split())
SCRIPT_OF = {lang: script for script, langs in PANX_SCRIPTS.items() for lang in langs.split()}
ALPHABETS = {  # a contiguous block of letters per script (enough for words and subword pieces)
    "latin": "abcdefghijklmnopqrstuvwxyzäöüéèàçñ", "cyrillic": "абвгдежзийклмнопрстуфхцчшщыэюя",
    "greek": "αβγδεζηθικλμνξοπρστυφχψω", "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي", "hebrew": "אבגדהוזחטיכלמנסעפצקרשת",
    "devanagari": "अआइईउऊएऐओऔकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह", "bengali": "অআইঈউঊএঐওঔকখগঘচছজঝটঠডঢণতথদধনপফবভমযরলশষসহ",
    "tamil": "அஆஇஈஉஊஎஏஐஒஓகஙசஞடணதநபமயரலவழளறன", "telugu": "అఆఇఈఉఊఎఏఐఒఓకఖగఘచఛజఝటఠడఢణతథదధనపఫబభమయరలవశషసహ",
    "malayalam": "അആഇഈഉഊഎഏഐഒഓകഖഗഘചഛജഝടഠഡഢണതഥദധനപഫബഭമയരലവശഷസഹ", "thai": "กขคฆงจฉชซญฎฏฐฑฒณดตถทธนบปผฝพฟภมยรลวศษสหฬอฮ",
    "georgian": "აბგდევზთიკლმნოპჟრსტუფქღყშჩცძწჭხჯჰ", "myanmar": "ကခဂဃငစဆဇဈညဋဌဍဎဏတထဒဓနပဖဗဘမယရလဝသဟဠအ",
    "cjk": "".join(map(chr, range(0x4E00, 0x4E00 + 300))) + "".join(map(chr, range(0x3041, 0x3094))),
    "hangul": "".join(map(chr, range(0xAC00, 0xAC00 + 300)))}
PANX_SIZES = {"train": 20_000, "dev": 10_000, "test": 10_000}  # sentences per language at --scale 1
VOCAB_SIZE, WIDTH = 250_002, 768  # xlm-roberta-base's
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3; <mask> is the last id


def write_checkpoint(folder, layers, seed=0):
    """transformers' XLMRobertaForMaskedLM at xlm-roberta-base's configuration with `layers` layers, random weights,
    saved in the hub layout (config.json, model.safetensors)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM
    torch.manual_seed(seed)
    config = XLMRobertaConfig(vocab_size=VOCAB_SIZE, hidden_size=WIDTH, num_hidden_layers=layers,
                              num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                              type_vocab_size=1, layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1, eos_token_id=2)
    XLMRobertaForMaskedLM(config).save_pretrained(folder)


def write_tokenizer(folder, seed=0):
    """tokenizer.json in XLM-R's layout with its 250,002 ids: a Unigram model over synthetic pieces (every letter of
    every PAN-X script, alone and after the word-start marker, then random 2-4 letter pieces), <s>, <pad>, </s>,
    <unk> ids 0-3, <mask> the last id, Metaspace pre-tokenization and the `<s> $A </s>` template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    rng, letters = random.Random(seed), list(dict.fromkeys("".join(ALPHABETS.values())))
    pieces = dict.fromkeys([c for c in letters] + ["▁" + c for c in letters] + ["▁"])
    while len(pieces) < VOCAB_SIZE - len(SPECIALS) - 1:
        alphabet = ALPHABETS[rng.choice(list(ALPHABETS))]
        pieces["▁" * (rng.random() < 0.5) + "".join(rng.choices(alphabet, k=rng.randint(2, 4)))] = None
    vocab = [(s, 0.0) for s in SPECIALS] + [(p, -rng.uniform(6, 14)) for p in pieces] + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁")
    tok.decoder = decoders.Metaspace(replacement="▁")
    tok.add_special_tokens([*SPECIALS, "<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    Path(folder).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(folder) / "tokenizer.json"))


def write_panx(folder, sizes, langs=PANX_LANGS, seed=0):
    """XTREME's panx_processed_maxlen128 layout: {split}-{lang}.tsv with `lang:token<TAB>TAG` lines, a blank line
    after each sentence; sizes[split] sentences per language (5-25 words, IOB2 PER/ORG/LOC entities of 1-3 words
    drawn from a per-language lexicon)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for lang in langs:
        rng, alphabet = random.Random(f"{seed}-{lang}"), ALPHABETS[SCRIPT_OF[lang]]
        lexicon = ["".join(rng.choices(alphabet, k=rng.randint(1 + (SCRIPT_OF[lang] in ("cjk", "hangul")), 9)))
                   for _ in range(3000)]
        for split, n in sizes.items():
            lines = []
            for _ in range(n):
                words, tags = [], []
                while len(words) < rng.randint(5, 25):
                    if rng.random() < 0.15:
                        typ, k = rng.choice(("PER", "ORG", "LOC")), rng.randint(1, 3)
                        words += rng.choices(lexicon, k=k)
                        tags += [f"B-{typ}"] + [f"I-{typ}"] * (k - 1)
                    else:
                        words.append(rng.choice(lexicon))
                        tags.append("O")
                lines += [f"{lang}:{w}\t{t}" for w, t in zip(words, tags)] + [""]
            (folder / f"{split}-{lang}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def scaled(scale):
    return {split: max(10, round(n * scale)) for split, n in PANX_SIZES.items()}


def make_inputs(out, layers, scale, small_scale):
    """out/model (checkpoint + tokenizer), out/panx and out/panx-small, each built once (a `.done` file marks it)."""
    built = {}
    for name, make in (("model", lambda d: (write_checkpoint(d, layers), write_tokenizer(d))),
                       ("panx", lambda d: write_panx(d, scaled(scale))),
                       ("panx-small", lambda d: write_panx(d, scaled(small_scale)))):
        folder = out / name
        if not (folder / ".done").exists():
            t0 = time.time()
            make(folder)
            (folder / ".done").write_text("")
            built[name] = round(time.time() - t0, 1)
            print(f"rehearsal: built {folder} in {built[name]} s", file=sys.stderr, flush=True)
    return built


def run_stage(name, argv):
    """train.py with argv in a child process: its wall and CPU time, peak resident memory (its own, not its
    --procs children's), the load average before and after, and its stderr lines, each with the seconds since
    the start."""
    t0, lines, load = time.time(), [], os.getloadavg()[0]
    child = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, argv)], stderr=subprocess.PIPE,
                             text=True, cwd=ROOT)
    for line in child.stderr:
        lines.append((time.time() - t0, line.rstrip("\n")))
        print(f"  [{lines[-1][0]:7.1f} s] {lines[-1][1]}", file=sys.stderr, flush=True)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"rehearsal: stage {name} failed: {lines[-1][1] if lines else status}")
    return {"wall_s": round(time.time() - t0, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "load_average": [round(load, 1), round(os.getloadavg()[0], 1)]}, lines


def at(lines, pattern, last=False):
    """Seconds since the stage's start of the first (or last) stderr line matching the regex `pattern`."""
    times = [t for t, line in lines if re.search(pattern, line)]
    return round(times[-1 if last else 0], 1) if times else None


def rate(lines, pattern):
    """The rate (`N sent/s`) that the last stderr line matching `pattern` reports."""
    found = [re.search(r"([\d.]+) sent/s", line) for _, line in lines if re.search(pattern, line)]
    return float(found[-1][1]) if found and found[-1] else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the inputs (kept) and the runs")
    p.add_argument("--layers", type=int, default=12, help="encoder layers (xlm-roberta-base: 12)")
    p.add_argument("--scale", type=float, default=1.0, help="PAN-X's sizes times this, for prime")
    p.add_argument("--small-scale", type=float, default=0.05, help="sizes for finetune and eval")
    p.add_argument("--prime-langs", default="de,es,nl,ru,zh")
    p.add_argument("--eval-langs", default="ar,ja,sw")
    p.add_argument("--steps", type=int, default=3, help="meta-steps and fine-tuning steps")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    args = p.parse_args()
    built = make_inputs(args.out, args.layers, args.scale, args.small_scale)
    model, panx, small, runs = args.out / "model", args.out / "panx", args.out / "panx-small", args.out / "runs"
    stamp = time.strftime("%H%M%S")
    prime, tuned, evaluated, exported = (runs / f"{s}-{stamp}" for s in ("prime", "finetune", "eval", "export"))
    # K = 2 inner steps (the recipe's 20 cost 10x); one process (the default on 2 cores starts two, each holding a
    # copy of the model): the peak memory is the whole run's
    few = ["--inner-steps", 2, "--support-batches", 2, "--procs", 1]
    stages = {  # the README's commands, on the CPU, with few steps
        "prime": ["--stage", "prime", "--model", model, "--data", panx, "--source", "en", "--prime-langs",
                  args.prime_langs, "--eval-langs", args.eval_langs, "--prime-steps", args.steps, *few, "--out", prime],
        "finetune": ["--stage", "finetune", "--model", prime / "model", "--data", small, "--finetune-steps",
                     args.steps, "--out", tuned],
        "eval": ["--stage", "eval", "--model", tuned / "model", "--data", small, "--eval-langs", args.eval_langs,
                 "--out", evaluated],
        "export": ["--stage", "export", "--model", prime / "model", "--format", "hf-mlm", "--out", exported]}
    report = {}
    for name, argv in stages.items():
        print(f"rehearsal: {name}", file=sys.stderr, flush=True)
        report[name], lines = run_stage(name, argv)
        report[name]["load_done_s"] = at(lines, r"^load \w+ .*ETA", last=True)
        steps = [t for t, line in lines if re.match(rf"^{name}\S* \d+/{args.steps} ", line)]
        if len(steps) > 1:  # the first step includes the warm-up (allocations, page faults)
            report[name]["s_per_step"] = round((steps[-1] - steps[0]) / (len(steps) - 1), 2)
        for lang in ["en", *args.eval_langs.split(",")] * (name == "eval"):
            sent_s = rate(lines, rf"^eval test-{lang} ")
            report[name][f"test_{lang}_s_per_1000_sentences"] = round(1000 / sent_s, 1) if sent_s else None
    results = json.loads((evaluated / "results.json").read_text())
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    report = {"machine": {"cpu": re.search(r"Model name:\s*(.*)", lscpu)[1], "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "layers": args.layers, "vocab": VOCAB_SIZE, "width": WIDTH, "prime_sizes": scaled(args.scale),
              "small_sizes": scaled(args.small_scale), "steps": args.steps, "built_s": built, "stages": report,
              "eval_test_sets": sorted(results["f1"]), "eval_dev_sets": sorted(results["dev_f1"])}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
