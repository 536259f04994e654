#!/usr/bin/env bash
# Serving benchmark on a GPU machine: `mini-infer serve` with a Llama-3-8B-shaped model (random
# weights, no tokenizer, so prompts go as token ids) loaded by `mini-infer bench serve` at several
# Poisson request rates (~200 input / ~180 output tokens, ignore_eos) and once all at once.
#
# Where fastapi/uvicorn/pydantic are missing, carry the wheels in .whl/ (see docs/serving.md).
# Writes server.log, bench.log, serve_sweep.json/.png, serve_all_at_once.json and metrics.txt to
# $OUT (default benchmarks/results/serve_gpu) and prints a short table last. Every stage is
# bounded; the whole run stays inside BUDGET_S seconds.
#
#   OUT=/some/dir bash benchmarks/serve_gpu.sh
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/serve_gpu.sh    # the same plumbing on a CPU, tiny model
#
# Knobs (environment): BUDGET_S (560), PORT (8000), MODEL (llama-3-8b), RATES (4,8,16,32,inf),
# SWEEP_PROMPTS (200), BURST_PROMPTS (1000), DTYPE (bfloat16), TOKEN_RANGE ("1000 120000": prompt ids),
# SERVE_ARGS (extra serve flags, e.g. "--max-num-seqs 512").
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
START=$(date +%s)
if [[ "${SMOKE:-0}" == 1 ]]; then
    : "${MODEL:=tiny-llama}" "${DTYPE:=float32}" "${TOKEN_RANGE:=3 500}" "${RATES:=10,inf}"
    : "${SWEEP_PROMPTS:=16}" "${BURST_PROMPTS:=32}" "${BUDGET_S:=240}"
fi
BUDGET_S=${BUDGET_S:-560}
OUT=${OUT:-benchmarks/results/serve_gpu}
PORT=${PORT:-8000}
MODEL=${MODEL:-llama-3-8b}
RATES=${RATES:-4,8,16,32,inf}
SWEEP_PROMPTS=${SWEEP_PROMPTS:-200}
BURST_PROMPTS=${BURST_PROMPTS:-1000}
DTYPE=${DTYPE:-bfloat16}
TOKEN_RANGE=${TOKEN_RANGE:-1000 120000}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
say() { echo "[serve_gpu +$(( $(date +%s) - START ))s] $*"; }

# 1. The server's Python packages: wheels carried in .whl/, installed outside the image when missing.
if ! $PY -c "import fastapi, uvicorn, pydantic" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { say "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
$PY -c "import fastapi, uvicorn, pydantic, prometheus_client, httpx, torch, importlib.util as u; \
print('fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'torch', torch.__version__, \
'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, \
'http parser', 'httptools' if u.find_spec('httptools') else 'h11 (pure Python: carry httptools)', \
'loop', 'uvloop' if u.find_spec('uvloop') else 'asyncio')" || { say "missing packages"; exit 1; }

# 2. The server, in the background; stopped on exit whatever happens.
say "starting mini-infer serve --model $MODEL --load-format dummy ${SERVE_ARGS:-}"
$PY -m mini_infer.entrypoints.serve_cli --model "$MODEL" --load-format dummy --dtype "$DTYPE" \
    --max-model-len 2048 --host 127.0.0.1 --port "$PORT" --served-model-name "$MODEL" --disable-access-log \
    ${SERVE_ARGS:-} \
    > "$OUT/server.log" 2>&1 &
SERVER=$!
stop_server() {
    $PY - "$PORT" > "$OUT/metrics.txt" 2>/dev/null <<'EOF'
import sys, httpx
print(httpx.get(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).text)
EOF
    kill -INT "$SERVER" 2>/dev/null
    for _ in $(seq 10); do kill -0 "$SERVER" 2>/dev/null || return; sleep 1; done
    kill -9 "$SERVER" 2>/dev/null
}
trap stop_server EXIT

HEALTH_TIMEOUT=$(( $(left) < 300 ? $(left) : 300 ))
$PY - "$PORT" "$HEALTH_TIMEOUT" "$SERVER" <<'EOF' || { say "server never became healthy"; tail -40 "$OUT/server.log"; exit 1; }
import os, sys, time, httpx
port, limit, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
start = time.time()
while time.time() - start < limit:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server process exited")
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
            print(f"healthy after {time.time() - start:.0f}s")
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(1)
sys.exit(f"no /health after {limit:.0f}s")
EOF
grep -E "KV pool|serving model" "$OUT/server.log" | tail -2

BENCH=($PY -m mini_infer.bench.serve --base-url "http://127.0.0.1:$PORT" --model "$MODEL"
       --random-prompt-format token-ids --random-token-range $TOKEN_RANGE --random-input-len 200
       --random-output-len 180 --ignore-eos --disable-tqdm --warmup 8 --timeout 300)

# 3. The sweep over Poisson rates (plus inf), each rate bounded by --max-duration.
if (( $(left) > 60 )); then
    say "sweep: rates $RATES, $SWEEP_PROMPTS prompts each"
    timeout $(( $(left) - 30 )) "${BENCH[@]}" --num-prompts "$SWEEP_PROMPTS" --sweep "$RATES" --max-duration 100 \
        --label "mini-infer serve, Llama-3-8B shape (dummy weights), 200 in / 180 out" \
        --result-file "$OUT/serve_sweep.json" --plot "$OUT/serve_sweep.png" 2>&1 | tee "$OUT/bench.log"
fi

# 4. All at once: the number to hold against vLLM's ~37 req/s on an H100.
if (( $(left) > 40 )); then
    say "all at once: $BURST_PROMPTS prompts"
    timeout $(( $(left) - 15 )) "${BENCH[@]}" --num-prompts "$BURST_PROMPTS" --request-rate inf --seed 100 \
        --max-duration $(( $(left) - 25 )) --result-file "$OUT/serve_all_at_once.json" 2>&1 | tee -a "$OUT/bench.log"
fi

# 5. The short table, last.
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from mini_infer.bench.serve import format_sweep_table
out = Path(sys.argv[1])
runs = []
if (out / "serve_sweep.json").exists():
    runs += json.loads((out / "serve_sweep.json").read_text())["runs"]
if (out / "serve_all_at_once.json").exists():
    burst = json.loads((out / "serve_all_at_once.json").read_text())
    burst["request_rate"] = f"inf/{burst['num_prompts']}"
    runs.append(burst)
print("\n=== mini-infer serve, Llama-3-8B shape, ~200 in / 180 out tokens ===")
print(format_sweep_table(runs) if runs else "no results")
EOF
say "done; files in $OUT"
