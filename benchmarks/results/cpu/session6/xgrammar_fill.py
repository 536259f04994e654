"""xgrammar's bitmask fill and token accept per row, json_object with any whitespace, 64 matchers advanced
over one JSON text, one row at a time and as one batch call: `python xgrammar_fill.py .gpu/bpe151k`
(the 151k stand-in of benchmarks/make_tokenizer.py). On this 2-core machine, others' tests running, it
printed: `loop: 40 steps x 64 rows: fill 139.6 us/row, accept 3.2 us/row` and `batch: ... fill 134.0
us/row, accept 2.9 us/row` (the batch call's threads found no idle core)."""

import sys
import time

import xgrammar as xgr
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1])
V = 151936
info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V, stop_token_ids=[tok.eos_token_id])
c = xgr.GrammarCompiler(info, max_threads=2)
s = time.perf_counter()
g = c.compile_json_schema('{"type": "object"}', any_whitespace=True)
print("compile", time.perf_counter() - s)
n = 64
text = '{"name": "abc", "value": [1, 2, 3], "nested": {"x": "hello world this is text", "y": 12.5}, "z": true'
ids = tok.encode(text)
print(len(ids), "tokens")
mask = xgr.allocate_token_bitmask(n, V)
for mode in ("loop", "batch"):
    ms = [xgr.GrammarMatcher(g) for _ in range(n)]
    b = xgr.BatchGrammarMatcher("auto")
    t_fill = t_acc = 0
    for t in ids:
        s = time.perf_counter()
        if mode == "loop":
            for i, m in enumerate(ms):
                m.fill_next_token_bitmask(mask, i)
        else:
            b.batch_fill_next_token_bitmask(ms, mask, list(range(n)))
        t_fill += time.perf_counter() - s
        s = time.perf_counter()
        for m in ms:
            assert m.accept_token(t), t
        t_acc += time.perf_counter() - s
    print(
        f"{mode}: {len(ids)} steps x {n} rows: fill {t_fill / len(ids) / n * 1e6:.1f} us/row, "
        f"accept {t_acc / len(ids) / n * 1e6:.1f} us/row"
    )
