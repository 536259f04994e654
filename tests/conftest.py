"""Shared fixtures: the ../shared model fixtures, transformers as the oracle, tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_MODELS = Path(os.environ.get("MINI_INFER_SHARED_MODELS", REPO.parent / "shared" / "models"))
STORIES = SHARED_MODELS / "stories260K"
QWEN3 = SHARED_MODELS / "tiny-random-qwen3"

# Eight prompts for the parity tests; two share a long prefix so the prefix cache is exercised.
PROMPTS = [
    "Once upon a time",
    "The cat sat on the",
    "Lily and Tom went to the park. They saw a big dog. The dog was",
    "Lily and Tom went to the park. They saw a big dog. The dog ran",
    "One day, a little bird",
    "Ben had a red ball.",
    "The sun was hot and",
    "Sara",
]

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config: pytest.Config) -> None:
    if not STORIES.is_dir():
        raise pytest.UsageError(f"test fixtures not found at {SHARED_MODELS} (set MINI_INFER_SHARED_MODELS)")


@pytest.fixture(scope="session")
def stories_path() -> str:
    return str(STORIES)


@pytest.fixture(scope="session")
def qwen3_path() -> str:
    return str(QWEN3)


def hf_greedy(model_path: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation (without the prompt)."""
    model = _hf_model(model_path)
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt_ids) :].tolist()


def hf_step_logprobs(model_path: str, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the log-softmax of each step's logits: [steps, vocab]."""
    return model_step_logprobs(_hf_model(model_path), prompt_ids, max_new_tokens)


def model_step_logprobs(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """hf_step_logprobs for a model already built (a PEFT model, say)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    logprobs = torch.stack([s[0].float().log_softmax(-1) for s in out.logits])
    return out.sequences[0, len(prompt_ids) :].tolist(), logprobs


_HF_CACHE: dict[str, torch.nn.Module] = {}


def assert_matches_hf(outputs, expected, tol: float = 1e-4) -> None:
    """Each output's greedy tokens equal transformers' and its logprobs are within tol of its
    (hf_step_logprobs' (tokens, [steps, vocab] log-softmax) per output)."""
    for out, (tokens, logprobs) in zip(outputs, expected, strict=True):
        completion = out.outputs[0]
        assert completion.token_ids == tokens
        for step, entry in enumerate(completion.logprobs):
            for token, lp in entry.items():
                assert abs(lp.logprob - logprobs[step, token].item()) < tol, (step, token)


def _hf_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if path not in _HF_CACHE:
        _HF_CACHE[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF_CACHE[path]
