"""Where a 16-prompt stories260K run's time goes on a CPU: the runner's forward passes, its sampling, the
rest of `execute`, and the rest of the step loop (best of 10 runs). Run from the repo root."""

import random
import time

from mini_infer import LLM, SamplingParams

llm = LLM("../shared/models/stories260K", dtype="float32")
runner = llm.llm_engine.model_runner
acc = {"forward": 0.0, "sample": 0.0, "execute": 0.0}


def wrap(obj, name, key):
    f = getattr(obj, name)

    def g(*a, **k):
        s = time.perf_counter()
        r = f(*a, **k)
        acc[key] += time.perf_counter() - s
        return r

    setattr(obj, name, g)


wrap(runner, "_forward_with_aux", "forward")
wrap(runner, "_sample", "sample")
wrap(runner, "execute", "execute")
rng = random.Random(0)
prompts = [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(64)]} for _ in range(16)]
p = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
llm.generate(prompts, p, use_tqdm=False)
walls = []
for _ in range(10):
    for k in acc:
        acc[k] = 0.0
    t = time.perf_counter()
    llm.generate(prompts, p, use_tqdm=False)
    w = time.perf_counter() - t
    walls.append((w, dict(acc)))
w, a = min(walls, key=lambda x: x[0])
rest = a["execute"] - a["forward"] - a["sample"]
print(
    f"wall {w * 1e3:.1f} ms: forward {a['forward'] * 1e3:.1f}, sample {a['sample'] * 1e3:.1f}, "
    f"rest of execute {rest * 1e3:.1f}, outside execute {(w - a['execute']) * 1e3:.1f}"
)
