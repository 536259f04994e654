"""Speculative decoding over CUDA graphs: with a draft model or an EAGLE-3 head, the target's passes and the
proposer's replay graphs (off CUDA: the same forward run eagerly over the graphs' static, padded buffers,
so what differs from the eager engine is the input path a GPU takes). Batched requests of different
lengths, chunked, join while others decode, so decode, prefill and mixed steps all run, and passes the
graphs do not hold (the head's pass over a whole prompt) fall back to eager. The drafts equal the eager
engine's, the emitted tokens equal transformers', and the replay counters show the graphs ran.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # test_eagle3's transformers imports bring triton in: for later Triton tests
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import PROMPTS, hf_greedy  # noqa: E402
from test_eagle3 import write_head  # noqa: E402

from mini_infer import LLM as _LLM  # noqa: E402
from mini_infer import SamplingParams  # noqa: E402
from mini_infer.scheduler import ScheduledSeq  # noqa: E402
from mini_infer.sequence import Sequence  # noqa: E402
from mini_infer.spec_decode.draft_model import DraftModel  # noqa: E402
from mini_infer.spec_decode.eagle3 import Eagle3Proposer  # noqa: E402
from mini_infer.worker.step_inputs import build_step_inputs  # noqa: E402

MAX_TOKENS = 30


def LLM(model: str, graphs: bool, **kwargs) -> _LLM:  # noqa: N802
    """float32, 4 sequences at a time in 32-token steps: decode graphs of 1..4 * (1 + k) rows, prefill graphs
    of 16 and 32 tokens. graphs: the graph input path (captured at start on a GPU), else eager everywhere."""
    llm = _LLM(model, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, enforce_eager=not graphs, **kwargs)
    runner = llm.llm_engine.model_runner
    if graphs and runner.graphs is None:
        runner.capture_cuda_graphs()
    return llm


@pytest.fixture(scope="module")
def head_path(tmp_path_factory) -> str:
    return write_head(tmp_path_factory.mktemp("eagle3-head"))


def record_drafts(monkeypatch, proposer: type) -> list:
    """Every verify run's (known tokens, drafts), as the proposer fills them in."""
    proposed = []
    real = proposer.before_forward

    def recording(self, out, forward):
        real(self, out, forward)
        proposed.extend(
            (s.seq.token_ids[: s.start + 1], list(s.draft_token_ids)) for s in out.seqs if s.draft_token_ids
        )

    monkeypatch.setattr(proposer, "before_forward", recording)
    return proposed


def generate(llm: _LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:6], params, use_tqdm=False)]


def check_transformers(llm: _LLM, stories_path: str, tokens: list[list[int]]) -> None:
    tokenizer = llm.get_tokenizer()
    for prompt, got in zip(PROMPTS[:6], tokens):
        expected = hf_greedy(stories_path, tokenizer.encode(prompt), MAX_TOKENS)
        assert got == (expected[: expected.index(2) + 1] if 2 in expected else expected), prompt


def check_graphs_ran(llm: _LLM, proposer_prefill: bool) -> None:
    runner = llm.llm_engine.model_runner
    target, proposer = runner.graphs, runner.proposer_graphs
    assert target.decode.sizes == [1, 2, 4, 8, 16] and target.prefill.sizes == [16, 32]
    assert target.decode.num_replays > 0 and target.prefill.num_replays > 0
    # the proposer's k - 1 or k decode passes per verify step replay its decode graphs too
    assert proposer.decode.num_replays > 2 * target.decode.num_replays
    assert (proposer.prefill.num_replays > 0) == proposer_prefill
    stats = llm.llm_engine.stats
    assert stats.spec_num_draft_tokens > 0 and stats.num_kv_blocks_used == 0


def test_self_draft_over_graphs_accepts_everything(stories_path):
    """The model as its own draft: drafts made by the draft's graph replays (tokens fed back on the device)
    are the target's own greedy tokens, so every one is accepted."""
    spec = {"method": "draft_model", "model": stories_path, "num_speculative_tokens": 3}
    llm = LLM(stories_path, True, speculative_config=spec)
    tokens = generate(llm)
    check_transformers(llm, stories_path, tokens)
    check_graphs_ran(llm, proposer_prefill=True)
    stats = llm.llm_engine.stats
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens


def drafts_as_eagerly(monkeypatch, path: str, spec: dict, proposer: type, proposer_prefill: bool) -> None:
    """The proposer's drafts over graphs equal the eager engine's, and the tokens stay transformers'."""
    drafts = record_drafts(monkeypatch, proposer)
    eager_tokens = generate(LLM(path, False, speculative_config=spec))
    eager_drafts = list(drafts)
    drafts.clear()
    llm = LLM(path, True, speculative_config=spec)
    tokens = generate(llm)
    assert len(eager_drafts) > 20 and drafts == eager_drafts
    assert tokens == eager_tokens
    check_transformers(llm, path, tokens)
    check_graphs_ran(llm, proposer_prefill=proposer_prefill)


def test_draft_model_over_graphs_drafts_as_eagerly(stories_path, qwen3_path, monkeypatch):
    """A different (random) draft model."""
    spec = {"method": "draft_model", "model": qwen3_path, "num_speculative_tokens": 3}
    drafts_as_eagerly(monkeypatch, stories_path, spec, DraftModel, proposer_prefill=True)


def test_eagle3_over_graphs_drafts_as_eagerly(stories_path, head_path, monkeypatch):
    """The head's passes over graphs (its hidden states a static input, the target's aux hidden states out of
    the target's graphs)."""
    spec = {"method": "eagle3", "model": head_path, "num_speculative_tokens": 3}
    drafts_as_eagerly(monkeypatch, stories_path, spec, Eagle3Proposer, proposer_prefill=False)


def test_a_mixed_step_splits_into_its_parts_as_built_alone():
    """StepInputs.split: the decode rows (a verify run among them) and the prefill chunks of a mixed step,
    each as build_step_inputs lays out that part alone (what the decode and the prefill graph each run)."""
    verify = Sequence("v", 0, list(range(20)), SamplingParams())
    verify.block_table = [7, 3]
    plain = Sequence("d", 0, list(range(5)), SamplingParams())
    plain.block_table = [1]
    first = Sequence("p", 0, list(range(40)), SamplingParams())
    first.block_table = [4, 5, 6]
    second = Sequence("q", 0, list(range(9)), SamplingParams())
    second.block_table = [2]
    decodes = [ScheduledSeq(verify, 19, 4, True, 3, [101, 102, 103]), ScheduledSeq(plain, 4, 1, True, 0)]
    prefills = [ScheduledSeq(first, 16, 24, True, 0), ScheduledSeq(second, 0, 5, False, 0)]
    flat = build_step_inputs(decodes + prefills, 2, 16, {}, {0: -1})
    got = flat.split()
    want = build_step_inputs(decodes, 2, 16, {}, {0: -1}), build_step_inputs(prefills, 0, 16, {}, {0: -1})
    for part, alone in zip(got, want):
        width = alone.block_tables.shape[1]
        assert not part.block_tables[:, width:].any()  # the flat table is only wider
        part.block_tables = part.block_tables[:, :width]
        for name, value in vars(alone).items():
            assert np.array_equal(getattr(part, name), value), name


@pytest.mark.parametrize("method", ["eagle3", "draft_model"])
def test_graph_reserve_counts_every_graphs_outputs(stories_path, qwen3_path, head_path, method):
    """What the KV profiling reserves for graph outputs is what the captured graphs keep: one static output
    per captured size of every graph set, each replay returning it. An EAGLE-3 target's: hidden and 3 aux
    hidden states per token; the head's (decode graphs only): normed and pre-norm hidden states; a draft
    model's (decode and prefill graphs): its hidden states."""
    path = head_path if method == "eagle3" else qwen3_path
    spec = {"method": method, "model": path, "num_speculative_tokens": 3}
    runner = LLM(stories_path, True, speculative_config=spec).llm_engine.model_runner
    measured = runner._profile_run([5, 3])
    kept = 0
    with torch.inference_mode():  # as the runner replays them
        for graphs in (runner.graphs, runner.proposer_graphs):
            for graph_set in (graphs.decode, graphs.prefill):
                for replay in graph_set.replays.values():
                    kept += sum(t.numel() * t.element_size() for t in replay())
    assert kept == runner._graph_output_bytes(measured)
    decode, prefill = 1 + 2 + 4 + 8 + 16, 16 + 32  # tokens of the graph sizes (check_graphs_ran)
    hidden = runner.hidden_size
    if method == "eagle3":
        assert measured == 4 * hidden * 4  # float32
        head_hidden = runner.proposer.head.config.hidden_size
        assert runner.proposer_graphs.prefill.sizes == []
        assert kept == ((decode + prefill) * 4 * hidden + decode * 2 * head_hidden) * 4
    else:
        assert measured == hidden * 4
        draft_hidden = runner.proposer.model.config.hidden_size
        assert runner.proposer_graphs.prefill.sizes == [16, 32]
        assert kept == (decode + prefill) * (hidden + draft_hidden) * 4
