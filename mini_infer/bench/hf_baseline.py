"""The transformers baselines of `bench throughput`: continuous batching (`hf`) and padded `generate`
(`hf-static`), on the same requests and in the same process as the engine."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from mini_infer.bench.common import RunResult, load_model_config
from mini_infer.bench.workload import Workload


def load_hf_model(model: str, load_format: str, device: torch.device, dtype: torch.dtype, attn: str | None):
    """The same architecture in transformers: random weights for `dummy`, the checkpoint otherwise."""
    from transformers import AutoModelForCausalLM

    from mini_infer.model_loader import resolve_model_path

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn:
        kwargs["attn_implementation"] = attn
    if load_format == "dummy":
        with torch.device(device):
            hf_model = AutoModelForCausalLM.from_config(load_model_config(model, load_format), **kwargs)
    else:
        path = resolve_model_path(model, load_format)
        hf_model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    return hf_model.eval()


def _hf_generation_config(temperature: float, max_new_tokens: int, **extra: Any) -> Any:
    from transformers import GenerationConfig

    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    return GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=0, **sampling, **extra)


def _accepted(fn: Callable, **kwargs: Any) -> dict[str, Any]:
    """The kwargs `fn` takes: the continuous-batching API grew arguments across transformers 5.x."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def run_hf_continuous(
    hf_model: Any, workload: Workload, temperature: float, time_limit: float | None = None, progress: bool = False
) -> RunResult:
    """transformers' continuous batching (paged attention), one request per prompt, EOS disabled.

    This is the manager `generate_batch` wraps; it is driven directly because `generate_batch` takes a
    single max_new_tokens for all prompts, while this workload gives each request its own length.
    Its warmup (CUDA-graph capture) happens before the clock starts, as our engine's does at init.

    With `time_limit` the run stops once that many seconds have passed. The whole workload then takes
    longer than the elapsed time, so the result counts every requested token over that time: its tok/s
    is an upper bound on transformers' and any ratio against it a lower bound (`stopped_at_time_limit`).
    """
    gen_config = _hf_generation_config(temperature, max(workload.output_lens))
    gen_config.eos_token_id = -1  # no EOS: the request runs to its max_new_tokens (ignore_eos)
    cm_kwargs: dict[str, Any] = {"generation_config": gen_config, "block": True, "timeout": 30}
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        cm_kwargs["workload_hints"] = WorkloadHints(
            max_prompt_length=max(len(p) for p in workload.prompts),
            max_generated_length=max(workload.output_lens),
            num_requests=len(workload),
        )
    except (ImportError, TypeError):  # absent or shaped differently in this transformers version
        pass
    if hf_model.device.type == "cpu":  # left alone, it sizes its cache from all of the host's RAM
        from transformers import ContinuousBatchingConfig

        pages = sum(-(-(len(p) + o) // 256) for p, o in zip(workload.prompts, workload.output_lens))
        cm_kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
            num_blocks=pages + 1, max_batch_tokens=max(256, max(len(p) for p in workload.prompts))
        )
    cm = hf_model.continuous_batching_context_manager
    results: dict[str, int] = {}
    finish_seconds: list[float] = []
    bar = tqdm(total=len(workload), desc="hf", unit="req", disable=not progress, leave=False)
    with bar, cm(**_accepted(cm, **cm_kwargs)) as manager:
        attn_implementation = getattr(hf_model.config, "_attn_implementation", None)
        start = time.perf_counter()
        for i, (prompt, out_len) in enumerate(zip(workload.prompts, workload.output_lens)):
            manager.add_request(
                **_accepted(
                    manager.add_request, input_ids=prompt, request_id=f"hf-{i}", max_new_tokens=out_len, eos_token_id=-1
                )
            )
        while len(results) < len(workload):
            if time_limit is not None and time.perf_counter() - start > time_limit:
                break
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped early")
                continue
            if result.is_finished():
                if getattr(result, "error", None):
                    raise RuntimeError(f"transformers request {result.request_id} failed: {result.error}")
                results[result.request_id] = len(result.generated_tokens)
                finish_seconds.append(round(time.perf_counter() - start, 3))
                bar.update(1)
        wall = time.perf_counter() - start
    extra: dict[str, Any] = {"attn_implementation": attn_implementation, "finish_seconds": finish_seconds}
    output_tokens = sum(results.values())
    if len(results) < len(workload):
        extra.update(
            stopped_at_time_limit=time_limit, finished_requests=len(results), finished_output_tokens=output_tokens
        )
        output_tokens = workload.output_tokens  # all of it, in less time than it takes: an upper bound
    return RunResult(
        backend="hf",
        num_requests=len(workload),
        wall_seconds=wall,
        prompt_tokens=workload.prompt_tokens,
        output_tokens=output_tokens,
        extra=extra,
    )


def run_hf_static(
    hf_model: Any,
    workload: Workload,
    temperature: float,
    batch_size: int,
    cache_implementation: str | None,
    progress: bool = False,
) -> RunResult:
    """`model.generate` on left-padded batches in request order; each batch runs to its longest output.

    Only each request's own output length counts as output; the tokens generated past it are waste.
    """
    device = hf_model.device
    with torch.inference_mode():  # untimed warmup, as for the other backends
        warm = torch.tensor([workload.prompts[0][:16]] * 2, device=device)
        hf_model.generate(
            input_ids=warm,
            attention_mask=torch.ones_like(warm),
            generation_config=_hf_generation_config(temperature, 4, min_new_tokens=4),
        )
    useful = generated = 0
    bar = tqdm(total=len(workload), desc="hf-static", unit="req", disable=not progress, leave=False)
    start = time.perf_counter()
    for first in range(0, len(workload), batch_size):
        prompts = workload.prompts[first : first + batch_size]
        out_lens = workload.output_lens[first : first + batch_size]
        width = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        longest = max(out_lens)
        extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
        gen_config = _hf_generation_config(temperature, longest, min_new_tokens=longest, **extra)
        with torch.inference_mode():
            out = hf_model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gen_config
            )
        generated += (out.shape[1] - width) * len(prompts)
        useful += sum(min(o, out.shape[1] - width) for o in out_lens)
        bar.update(len(prompts))
    bar.close()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return RunResult(
        backend="hf-static",
        num_requests=len(workload),
        wall_seconds=wall,
        prompt_tokens=workload.prompt_tokens,
        output_tokens=useful,
        extra={
            "batch_size": batch_size,
            "generated_including_padding": generated,
            "cache_implementation": cache_implementation,
        },
    )


def shut_down_hf(hf_model: Any) -> None:
    destroy = getattr(hf_model, "destroy_cached_continuous_batching_manager", None)
    if callable(destroy):
        destroy()
