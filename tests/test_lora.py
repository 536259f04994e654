"""Multi-LoRA: two random PEFT adapters on tiny-random-qwen3 against transformers + PEFT (greedy tokens
identical, per-step logprobs within 1e-4), in one batch that mixes both adapters and the base model;
slots taking turns (LRU), registration at run time, the prefix cache kept apart per adapter, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import QWEN3, assert_matches_hf, hf_step_logprobs, model_step_logprobs

from mini_infer import LLM, LoRARequest, SamplingParams
from mini_infer.lora.request import LoRARequest as _LoRARequest

peft = pytest.importorskip("peft")

STEPS = 12
PROMPTS = [
    [1, 400, 301, 260, 290, 334, 267, 41, 73, 300, 285, 389, 290, 411, 266, 280, 322],
    [1, 77, 300, 12, 99, 401],
    [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
]
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=STEPS, logprobs=5, ignore_eos=True)


def _make_adapter(path: Path, seed: int, **config) -> str:
    """A PEFT LoRA adapter with random A and B (B is zero by default: it would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(QWEN3, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        # every target, rank 8, alpha / r scaling
        "all": _make_adapter(root / "all", 1, r=8, lora_alpha=16, target_modules=ALL_MODULES),
        # a lower rank on a few targets (k, v and up_proj only: the fused projections' other slices stay 0),
        # with rsLoRA's alpha / sqrt(r)
        "some": _make_adapter(
            root / "some", 2, r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "v_proj", "up_proj"]
        ),
    }


def _peft_expected(adapter_path: str | None, prompts: list[list[int]]):
    """transformers + PEFT: (greedy tokens, [steps, vocab] logprobs) per prompt."""
    if adapter_path is None:
        return [hf_step_logprobs(str(QWEN3), p, STEPS) for p in prompts]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(QWEN3, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_path).eval()
    return [model_step_logprobs(model, p, STEPS) for p in prompts]


@pytest.fixture(scope="module")
def expected(adapters):
    return {name: _peft_expected(path, PROMPTS) for name, path in [("base", None), *adapters.items()]}


def _requests(adapters: dict[str, str]) -> dict[str, LoRARequest]:
    return {"all": LoRARequest("all", 1, adapters["all"]), "some": LoRARequest("some", 2, adapters["some"])}


def test_exported_name():
    assert LoRARequest is _LoRARequest


def test_mixed_batch_matches_peft(adapters, expected):
    """Both adapters and the base model in one batch, every prompt under each: identical to PEFT."""
    loras = _requests(adapters)
    llm = LLM(str(QWEN3), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    names = ["all", "some", "base"]
    prompts = [p for _ in names for p in PROMPTS]
    lora_list = [loras.get(name) for name in names for _ in PROMPTS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False, lora_request=lora_list)
    for i, name in enumerate(names):
        assert_matches_hf(outs[i * len(PROMPTS) : (i + 1) * len(PROMPTS)], expected[name])
    # the adapters change the model: their tokens are not the base model's
    assert all(expected[name][0][0] != expected["base"][0][0] for name in ("all", "some"))


def test_slots_take_turns_and_run_time_registration(adapters, expected):
    """max_loras=1 with two adapters: the scheduler runs one adapter's requests at a time, the slot is
    rewritten in between (least recently used out), and results are unchanged. Registration at run
    time: add_lora / list_loras / remove_lora, and a removed adapter comes back on its next request."""
    loras = _requests(adapters)
    llm = LLM(str(QWEN3), dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8)
    assert llm.add_lora(loras["some"]) is True
    assert llm.add_lora(loras["some"]) is False  # already there
    assert llm.list_loras() == {2}
    lora_list = [loras["all"], loras["some"], None, loras["some"], loras["all"]]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False, lora_request=lora_list)
    want = [expected["all"][0], expected["some"][1], expected["base"][2], expected["some"][0], expected["all"][1]]
    assert_matches_hf(outs, want)
    assert llm.list_loras() == {1, 2}
    assert llm.remove_lora(1) is True and llm.remove_lora(1) is False
    assert llm.list_loras() == {2}
    assert llm.llm_engine.lora_manager.slots.keys() <= {2}
    with pytest.raises(ValueError, match="already adapter"):
        llm.add_lora(LoRARequest("other", 2, adapters["all"]))
    outs = llm.generate({"prompt_token_ids": PROMPTS[2]}, GREEDY, use_tqdm=False, lora_request=loras["all"])
    assert_matches_hf(outs, [expected["all"][2]])


def test_removing_an_adapter_in_use_is_refused(adapters):
    loras = _requests(adapters)
    llm = LLM(str(QWEN3), dtype="float32", enable_lora=True, max_lora_rank=8)
    engine = llm.llm_engine
    engine.add_request("r", {"prompt_token_ids": PROMPTS[0]}, GREEDY, lora_request=loras["all"])
    with pytest.raises(ValueError, match="in use by 1 unfinished"):
        engine.remove_lora(1)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.remove_lora(1) is True


def test_prefix_cache_is_kept_apart_per_adapter(adapters, expected):
    """The same prompt under the base model, adapter 1, adapter 1 again and adapter 2: only the repeat hits."""
    loras = _requests(adapters)
    llm = LLM(str(QWEN3), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": PROMPTS[2] * 2}  # 40 tokens: two full blocks
    hits = []
    for lora in [None, loras["all"], loras["all"], loras["some"]]:
        before = engine.stats.prefix_cache_hits
        llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False, lora_request=lora)
        hits.append(engine.stats.prefix_cache_hits - before)
    assert hits == [0, 0, 32, 0]


def test_cuda_graph_path_with_adapters(adapters, expected):
    """The graphs' static, padded inputs (run eagerly off CUDA) carry the adapter index too."""
    loras = _requests(adapters)
    llm = LLM(str(QWEN3), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=4)
    llm.llm_engine.model_runner.capture_cuda_graphs()
    assert llm.llm_engine.model_runner.graphs is not None
    lora_list = [loras["some"], None, loras["all"]]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False, lora_request=lora_list)
    assert_matches_hf(outs, [expected["some"][0], expected["base"][1], expected["all"][2]])
    assert llm.llm_engine.model_runner.graphs.decode.num_replays > 0


def _count_lora_kernels(llm: LLM) -> list[int]:
    """Wraps every LoRA projection's shrink to count its calls: [calls]."""
    calls = [0]
    for method in llm.llm_engine.lora_manager.layers.values():
        shrink = method.ops.lora_shrink

        def counted(*args, _shrink=shrink):
            calls[0] += 1
            return _shrink(*args)

        method.ops = dataclasses.replace(method.ops, lora_shrink=counted)
    return calls


@pytest.mark.parametrize("graphs", [False, True])
def test_steps_without_adapters_skip_the_kernels(adapters, expected, graphs):
    """enable_lora, but no token of the step has an adapter: no LoRA kernel runs (eagerly: no LoRAIndex;
    with graphs: the decode graphs captured without LoRA), and the tokens are the base model's. A batch that
    mixes an adapter in runs the kernels and still matches PEFT."""
    loras = _requests(adapters)
    llm = LLM(
        str(QWEN3),
        dtype="float32",
        enable_lora=True,
        max_loras=2,
        max_lora_rank=8,
        max_num_seqs=4,
        cuda_graph_prefill=False,  # prefill chunks run eagerly: a prefill graph would launch the (empty) kernels
    )
    runner = llm.llm_engine.model_runner
    if graphs:
        runner.capture_cuda_graphs()
        assert set(runner.graphs.decode.replays) == {(s, v) for s in runner.graphs.decode.sizes for v in (False, True)}
    calls = _count_lora_kernels(llm)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=[None] * len(PROMPTS))
    assert_matches_hf(outs, expected["base"])
    assert calls[0] == 0
    if graphs:
        assert runner.graphs.decode.num_replays > 0
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=[loras["all"], None, loras["some"]])
    assert_matches_hf(outs, [expected["all"][0], expected["base"][1], expected["some"][2]])
    assert calls[0] > 0


def test_triton_kernels_in_the_engine(adapters, expected):
    """kernel_backend="triton" (the interpreter on CPU): the same tokens and logprobs through the tiled kernels."""
    pytest.importorskip("triton")
    loras = _requests(adapters)
    llm = LLM(str(QWEN3), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, kernel_backend="triton")
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=5, ignore_eos=True)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS[:2]], params, use_tqdm=False, lora_request=[loras["all"], None]
    )
    want = [(expected["all"][0][0][:3], expected["all"][0][1]), (expected["base"][1][0][:3], expected["base"][1][1])]
    assert_matches_hf(outs, want)


def test_bad_input(adapters, tmp_path):
    loras = _requests(adapters)
    base = LLM(str(QWEN3), dtype="float32")
    with pytest.raises(ValueError, match="enable_lora"):
        base.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, use_tqdm=False, lora_request=loras["all"])
    llm = LLM(str(QWEN3), dtype="float32", enable_lora=True, max_lora_rank=4)
    with pytest.raises(ValueError, match="rank 8, above max_lora_rank=4"):
        llm.add_lora(loras["all"])
    with pytest.raises(ValueError, match="lora requests for"):
        llm.generate([[1, 2], [3, 4]], GREEDY, use_tqdm=False, lora_request=[loras["some"]])
    with pytest.raises(ValueError, match="not a folder"):
        llm.add_lora(LoRARequest("missing", 3, str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="positive integer"):
        LoRARequest("zero", 0, adapters["some"])
    # a target we cannot apply: the embedding
    emb = _make_adapter(tmp_path / "emb", 3, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(ValueError, match="embed_tokens.* is not a LoRA A/B matrix of a linear layer"):
        llm.add_lora(LoRARequest("emb", 4, emb))
    # DoRA: refused by its config
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in Path(adapters["some"]).iterdir():
        (dora / f.name).write_bytes(f.read_bytes())
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        llm.add_lora(LoRARequest("dora", 5, str(dora)))
    assert llm.list_loras() == set()
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(str(QWEN3), enable_lora=True, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="max_loras"):
        LLM(str(QWEN3), enable_lora=True, max_loras=0)


def test_server_picks_the_adapter_by_model_name(adapters):
    """--lora-modules at startup, the `model` field picking the adapter, /v1/models listing them, and
    adapters loaded and unloaded at run time; texts equal offline generate's with the same adapter."""
    import httpx
    from test_server import ServerThread

    from mini_infer import EngineConfig, LLMEngine
    from mini_infer.async_engine import AsyncLLMEngine
    from mini_infer.entrypoints.openai.api_server import build_app

    config = dict(model=str(QWEN3), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    loras = _requests(adapters)
    offline = LLM(**config)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = {
        name: offline.generate("Once upon a time", params, use_tqdm=False, lora_request=loras.get(name))[0]
        .outputs[0]
        .text
        for name in ("all", "some", "base")
    }
    assert len(set(want.values())) == 3
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(**config)))
    app = build_app(engine, ["base"], lora_modules=[("all", adapters["all"])])
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:

        def complete(model: str) -> httpx.Response:
            return client.post("/v1/completions", json={**body, "model": model})

        models = client.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["base", "all"] and models[1]["parent"] == "base"
        assert complete("all").json()["choices"][0]["text"] == want["all"]
        assert complete("base").json()["choices"][0]["text"] == want["base"]
        missing = complete("some")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

        load = client.post("/v1/load_lora_adapter", json={"lora_name": "some", "lora_path": adapters["some"]})
        assert load.status_code == 200, load.text
        assert complete("some").json()["choices"][0]["text"] == want["some"]
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "some", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
        assert chat.status_code == 200 and chat.json()["model"] == "some"
        again = client.post("/v1/load_lora_adapter", json={"lora_name": "some", "lora_path": adapters["some"]})
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
        bad = client.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nowhere"})
        assert bad.status_code == 400 and "not a folder" in bad.json()["error"]["message"]

        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "all"}).status_code == 200
        assert complete("all").status_code == 404
        gone = client.post("/v1/unload_lora_adapter", json={"lora_name": "all"})
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "some"]
    engine.shutdown()
