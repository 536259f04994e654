"""EAGLE-3 speculation with a random head in the format its authors publish (no EAGLE weights can be
downloaded here, and a head's weights do not change what is emitted, only how much is accepted):

- the head's drafts equal a reference built from transformers' own modules (its attention with q/k/v
  over the 2H concatenation, its norms and MLP) fed with transformers' hidden states of the target;
- the emitted tokens equal transformers' greedy tokens, whatever the head proposes;
- the checkpoint format is checked: draft-vocabulary mapping `d2t`, `t2d` ignored, missing tensors named.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS, _hf_model, hf_greedy
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from mini_infer import LLM as _LLM
from mini_infer import SamplingParams
from mini_infer.spec_decode.eagle3 import Eagle3Proposer

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, DRAFT_VOCAB = 64, 4, 2, 16, 96, 512, 96
AUX_LAYERS = [1, 2, 4]


def LLM(model: str, **kwargs) -> _LLM:  # noqa: N802
    """float32, so that exactness holds on a GPU too (dtype auto picks bf16 there)."""
    return _LLM(model, dtype="float32", **kwargs)


def head_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "num_hidden_layers": 1,
        "vocab_size": VOCAB,
        "draft_vocab_size": DRAFT_VOCAB,
        "target_hidden_size": HIDDEN,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": AUX_LAYERS},
    }


def head_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the published names; the draft vocabulary is a random subset of the target's
    (d2t holds target id - draft id), t2d marks it."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    kept = torch.randperm(VOCAB, generator=g)[:DRAFT_VOCAB].sort().values
    tensors = {
        "fc.weight": w(HIDDEN, 3 * HIDDEN, scale=0.1),
        "midlayer.self_attn.q_proj.weight": w(HEADS * HEAD_DIM, 2 * HIDDEN),
        "midlayer.self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, 2 * HIDDEN),
        "midlayer.self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, 2 * HIDDEN),
        "midlayer.self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
        "midlayer.mlp.gate_proj.weight": w(INTER, HIDDEN),
        "midlayer.mlp.up_proj.weight": w(INTER, HIDDEN),
        "midlayer.mlp.down_proj.weight": w(HIDDEN, INTER),
        "midlayer.input_layernorm.weight": 1 + w(HIDDEN, scale=0.1),
        "midlayer.hidden_norm.weight": 1 + w(HIDDEN, scale=0.1),
        "midlayer.post_attention_layernorm.weight": 1 + w(HIDDEN, scale=0.1),
        "norm.weight": 1 + w(HIDDEN, scale=0.1),
        "lm_head.weight": w(DRAFT_VOCAB, HIDDEN),
        "d2t": kept - torch.arange(DRAFT_VOCAB),
        "t2d": torch.zeros(VOCAB, dtype=torch.bool).index_fill_(0, kept, True),
    }
    return tensors


def write_head(path) -> str:
    """The random head in its published format, in folder `path`."""
    (path / "config.json").write_text(json.dumps(head_config()))
    save_file(head_tensors(), str(path / "model.safetensors"))
    return str(path)


@pytest.fixture(scope="module")
def head_path(tmp_path_factory) -> str:
    return write_head(tmp_path_factory.mktemp("eagle3-head"))


def eagle3(path: str, k: int) -> dict:
    return {"method": "eagle3", "model": path, "num_speculative_tokens": k}


class ReferenceHead(torch.nn.Module):
    """EAGLE-3's decoder layer from transformers' modules: full causal attention over the whole run."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        config = LlamaConfig(**{k: v for k, v in head_config().items() if k != "architectures"})
        config._attn_implementation = "eager"
        self.attn = LlamaAttention(config, 0)
        for name in ("q_proj", "k_proj", "v_proj"):  # they read [embedding ‖ hidden]: 2H wide
            out = tensors[f"midlayer.self_attn.{name}.weight"]
            setattr(self.attn, name, torch.nn.Linear(2 * HIDDEN, out.shape[0], bias=False))
        self.mlp, self.rotary = LlamaMLP(config), LlamaRotaryEmbedding(config)
        self.norms = torch.nn.ModuleDict({n: LlamaRMSNorm(HIDDEN, 1e-5) for n in ("input", "hidden", "post", "final")})
        names = {"input": "input_layernorm", "hidden": "hidden_norm", "post": "post_attention_layernorm"}
        with torch.no_grad():
            for module, prefix in ((self.attn, "midlayer.self_attn"), (self.mlp, "midlayer.mlp")):
                for name, param in module.named_parameters():
                    param.copy_(tensors[f"{prefix}.{name}"])
            for ours, theirs in names.items():
                self.norms[ours].weight.copy_(tensors[f"midlayer.{theirs}.weight"])
            self.norms["final"].weight.copy_(tensors["norm.weight"])
        self.fc, self.lm_head, self.d2t = tensors["fc.weight"], tensors["lm_head.weight"], tensors["d2t"]

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target token ids of each row's greedy draft, the pre-norm hidden states)."""
        n = embeds.shape[0]
        h = torch.cat((self.norms["input"](embeds), self.norms["hidden"](hidden)), dim=-1)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        cos_sin = self.rotary(h, torch.arange(n)[None])
        h = hidden + self.attn(h, cos_sin, mask)[0][0]
        h = h + self.mlp(self.norms["post"](h))
        best = (self.norms["final"](h) @ self.lm_head.T).argmax(-1)
        return best + self.d2t[best], h

    def drafts(self, target: torch.nn.Module, token_ids: list[int], k: int) -> list[int]:
        """The k drafts after token_ids: positions 0..n-2 read the target's hidden states (the residual
        stream entering the aux layers) and the next token; each later draft feeds its own hidden state."""
        embed = target.model.embed_tokens
        with torch.no_grad():
            states = target(torch.tensor([token_ids]), output_hidden_states=True).hidden_states
            hidden = torch.cat([states[i][0, :-1] for i in AUX_LAYERS], dim=-1) @ self.fc.T
            ids = torch.tensor(token_ids[1:])
            out = []
            for _ in range(k):
                best, h = self(embed(ids), hidden)
                out.append(int(best[-1]))
                ids, hidden = torch.cat((ids, best[-1:])), torch.cat((hidden, h[-1:]))
        return out


def test_drafts_equal_the_reference_head(stories_path, head_path, monkeypatch):
    proposed = []  # (the sequence's known tokens, its drafts) of every verify run
    real = Eagle3Proposer.before_forward

    def recording(self, out, forward):
        real(self, out, forward)
        runs = [s for s in out.seqs if s.draft_token_ids]
        proposed.extend((s.seq.token_ids[: s.start + 1], list(s.draft_token_ids)) for s in runs)

    monkeypatch.setattr(Eagle3Proposer, "before_forward", recording)
    llm = LLM(stories_path, speculative_config=eagle3(head_path, 3))
    llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert len(proposed) > 10
    reference = ReferenceHead(head_tensors())
    target = _hf_model(stories_path)
    for known, drafts in proposed[:: max(1, len(proposed) // 8)]:
        assert drafts == reference.drafts(target, known, len(drafts)), known


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_tokens_equal_transformers(stories_path, head_path, k):
    llm = LLM(stories_path, speculative_config=eagle3(head_path, k), enable_prefix_caching=True)
    tokenizer = llm.get_tokenizer()
    prompts = [*PROMPTS[:5], PROMPTS[2]]  # the repeat hits the prefix cache
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(stories_path, tokenizer.encode(prompt), 40)
        expected = expected[: expected.index(2) + 1] if 2 in expected else expected
        assert out.outputs[0].token_ids == expected, prompt
    stats = llm.llm_engine.stats
    assert stats.spec_num_draft_tokens > 50 * k and stats.num_kv_blocks_used == 0


def test_chunked_prefill_and_preemption_keep_the_tokens(stories_path, head_path):
    """Prompts split into chunks and sequences preempted (recompute) mid-speculation: the head's pending
    hidden states follow the sequence, and the tokens stay transformers'."""
    llm = LLM(
        stories_path,
        speculative_config=eagle3(head_path, 3),
        max_num_batched_tokens=16,
        enable_chunked_prefill=True,
        num_gpu_blocks_override=8,
    )
    tokenizer = llm.get_tokenizer()
    outs = llm.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)
    for prompt, out in zip(PROMPTS[:4], outs):
        expected = hf_greedy(stories_path, tokenizer.encode(prompt), 30)
        expected = expected[: expected.index(2) + 1] if 2 in expected else expected
        assert out.outputs[0].token_ids == expected, prompt
    stats = llm.llm_engine.stats
    assert stats.num_preemptions > 0 and stats.num_kv_blocks_used == 0


def test_bad_heads_are_refused(stories_path, head_path, tmp_path):
    with pytest.raises(ValueError, match="speculative_config"):
        LLM(stories_path, speculative_config={"method": "eagle3", "num_speculative_tokens": 2})
    (tmp_path / "config.json").write_text(json.dumps({**head_config(), "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="not an EAGLE-3 head"):
        LLM(stories_path, speculative_config=eagle3(str(tmp_path), 2))
    (tmp_path / "config.json").write_text(json.dumps(head_config()))
    tensors = head_tensors()
    tensors["d2t"][-1] = VOCAB  # the last draft id would map past the target's vocabulary
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="d2t maps draft ids outside"):
        LLM(stories_path, speculative_config=eagle3(str(tmp_path), 2))
    del tensors["fc.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks.*fc.weight"):
        LLM(stories_path, speculative_config=eagle3(str(tmp_path), 2))
