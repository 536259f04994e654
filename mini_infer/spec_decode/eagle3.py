"""EAGLE-3 proposals: a one-layer head that reads the target's own hidden states.

The head, as its authors publish it (`midlayer.*`, `fc`, `norm`, `lm_head`, `d2t`): `fc` fuses the
target's residual stream entering three of its layers (low, middle, high) into one hidden state; the
decoder layer attends over [norm(embedding of the next token) ‖ norm(that hidden state)]; its LM head
covers a draft vocabulary whose ids map to the target's by `d2t` offsets. The head at position p takes
the token at p + 1 and the target's hidden state at p, and predicts the token at p + 2; later drafts feed
the head's own hidden state back.

The head keeps a KV cache of its one layer in the target's block tables. A step's target pass leaves
its positions' hidden states here; the next step, when every next token is known (speculation runs
synchronous steps), runs the head over them (writing its cache) and its last position gives the first
draft; k - 1 head decodes give the rest. Each pass goes through the runner's `forward` (the head's
CUDA graphs where they hold it, the hidden states a static input); the drafts and hidden states stay on
the device from pass to pass, and the host reads the k drafts at once. Greedy drafts (q one-hot) are
verified like n-gram drafts, so the tokens keep the target's distribution whatever the head's weights:
tests use random heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig

from mini_infer.kernels import KernelOps
from mini_infer.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mini_infer.layers.linear import QKVParallelLinear, ReplicatedLinear
from mini_infer.layers.rotary import build_cos_sin_cache
from mini_infer.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, RMSNorm
from mini_infer.sampler import to_device
from mini_infer.scheduler import SchedulerOutput
from mini_infer.worker.step_inputs import Forward, StepInputs, build_decode_rows

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


def aux_layer_ids(head_config: PretrainedConfig, num_target_layers: int) -> tuple[int, int, int]:
    """The target layers whose incoming residual stream the head reads: the config's, else EAGLE-3's
    (2, L // 2, L - 3)."""
    ids = (getattr(head_config, "eagle_config", None) or {}).get("eagle_aux_hidden_state_layer_ids")
    return tuple(ids) if ids else (2, num_target_layers // 2, num_target_layers - 3)


class Eagle3Layer(nn.Module):
    def __init__(self, config: PretrainedConfig, ops: KernelOps, cos_sin_cache: torch.Tensor) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.self_attn = LlamaAttention(config, ops, cos_sin_cache)
        attn = self.self_attn  # its q, k and v read the concatenation, twice the hidden size
        attn.qkv_proj = QKVParallelLinear(
            2 * hidden,
            attn.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=getattr(config, "attention_bias", False),
            ops=ops,
        )
        self.mlp = LlamaMLP(config, ops)
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps, ops)
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps, ops)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor) -> tuple:
        residual = hidden.clone()  # the norm below adds into it in place
        h = torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), dim=-1)
        h = self.post_attention_layernorm(self.self_attn(positions, h), residual)
        return self.mlp(h), residual


class Eagle3Head(nn.Module):
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping  # the same fused q/k/v, gate/up

    def __init__(self, config: PretrainedConfig, target_config: PretrainedConfig, ops: KernelOps) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.draft_vocab_size = getattr(config, "draft_vocab_size", None) or config.vocab_size
        target_hidden = getattr(config, "target_hidden_size", None) or target_config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        cache = build_cos_sin_cache(config, head_dim, target_config.max_position_embeddings)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.fc = ReplicatedLinear(3 * target_hidden, hidden, bias=False, ops=ops)
        self.midlayer = Eagle3Layer(config, ops, cache)
        self.norm = RMSNorm(hidden, config.rms_norm_eps, ops)
        self.lm_head = ParallelLMHead(self.draft_vocab_size, hidden, ops)
        self.d2t = nn.Parameter(torch.zeros(self.draft_vocab_size, dtype=torch.int64), requires_grad=False)
        self.embed_tokens: VocabParallelEmbedding | None = None  # the checkpoint's, or the target's

    def attention_layers(self) -> list[nn.Module]:
        return [self.midlayer.self_attn.attn]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor) -> tuple:
        """(normed hidden states for the LM head, the pre-norm ones that the next draft step takes)."""
        h, residual = self.midlayer(positions, self.embed_tokens(ids), hidden)
        return self.norm(h, residual), residual

    def draft_tokens(self, normed: torch.Tensor) -> torch.Tensor:
        """The greedy draft of each row, as a target token id."""
        best = self.lm_head.compute_logits(normed).argmax(dim=-1)
        return best + self.d2t[best]

    def load(self, path: Path, target_embedding: VocabParallelEmbedding) -> None:
        params = dict(self.named_parameters())
        loaded, own_embedding = set(), None
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    if name == "t2d":  # the inverse map: not needed to propose
                        continue
                    if name.endswith("embed_tokens.weight"):
                        own_embedding = tensor
                        continue
                    name, shard = name.removeprefix("model."), None
                    for part, (ours, shard_id) in self.packed_modules_mapping.items():
                        if f".{part}." in name:
                            name, shard = name.replace(f".{part}.", f".{ours}."), shard_id
                    if name not in params:
                        raise ValueError(f"EAGLE-3 checkpoint tensor {name!r} matches no part of the head")
                    param = params[name]
                    loader = getattr(param, "weight_loader", None)
                    if loader is None:
                        param.data.copy_(tensor)
                    else:
                        loader(param, tensor, shard)
                    loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"EAGLE-3 checkpoint in {path} lacks {missing[:6]}")
        targets = torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t
        vocab = target_embedding.weight.shape[0]
        if int(targets.min()) < 0 or int(targets.max()) >= vocab:
            raise ValueError(f"EAGLE-3 head in {path}: d2t maps draft ids outside the target's {vocab} tokens")
        if own_embedding is None:
            self.embed_tokens = target_embedding
        else:
            self.embed_tokens = VocabParallelEmbedding(*own_embedding.shape).to(own_embedding.device)
            self.embed_tokens.weight.data.copy_(own_embedding)


def load_eagle3_head(
    path: Path, target: nn.Module, ops: KernelOps, dtype: torch.dtype, device: torch.device
) -> Eagle3Head:
    from transformers import AutoConfig

    data = json.loads((path / "config.json").read_text())
    if not set(data.get("architectures") or []) & set(ARCHITECTURES):
        raise ValueError(f"{path} is not an EAGLE-3 head (architectures {data.get('architectures')})")
    config = AutoConfig.for_model("llama", **{k: v for k, v in data.items() if k not in ("model_type",)})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            head = Eagle3Head(config, target.config, ops)
    finally:
        torch.set_default_dtype(previous)
    head.load(path, target.model.embed_tokens)
    return head.eval()


class Eagle3Proposer:
    prefill_graphs = False  # every pass of the head is decode rows

    def __init__(self, head: Eagle3Head, block_size: int) -> None:
        self.head, self.block_size = head, block_size
        # per sequence: (it, first position, the target's fused hidden states from there) awaiting the head
        self.pending: dict[int, tuple] = {}

    @property
    def model(self) -> Eagle3Head:
        """What the runner's forward runs: head(ids, positions, hidden)."""
        return self.head

    def attention_layers(self) -> list[nn.Module]:
        return self.head.attention_layers()

    def graph_inputs(self) -> dict[str, int]:
        """The hidden state each row reads, a static buffer of the head's graphs."""
        return {"hidden": self.head.config.hidden_size}

    def graph_output_features(self) -> int:
        """Features per row of the head's output, which each of its graphs keeps: normed and pre-norm."""
        return 2 * self.head.config.hidden_size

    def after_forward(
        self, out: SchedulerOutput, inputs: StepInputs, aux: torch.Tensor | None, forward: Forward
    ) -> None:
        """Keeps this step's hidden states, fused by fc, for the head's pass next step."""
        fused, offset = self.head.fc(aux), 0
        for s in out.seqs:
            self.pending[s.seq.seq_id] = (s.seq, s.start, fused[offset : offset + s.num_new_tokens])
            offset += s.num_new_tokens

    def before_forward(self, out: SchedulerOutput, forward: Forward) -> None:
        """Runs the head over the positions the last steps left (their next tokens are known now), then
        proposes the drafts of the runs this step verifies."""
        for seq_id in [i for i, (seq, _, _) in self.pending.items() if seq.is_finished]:
            del self.pending[seq_id]
        rows, hidden_parts = [], []
        for s in out.seqs:
            entry = self.pending.pop(s.seq.seq_id, None)
            if entry is None:
                continue
            _, first, fused = entry
            end = min(first + len(fused), s.start, len(s.seq.token_ids) - 1)  # verified positions only
            if end > first:
                rows.append((s, first, end))
                hidden_parts.append(fused[: end - first])
        if not rows:
            return
        tokens = [s.seq.token_ids[p + 1] for s, first, end in rows for p in range(first, end)]
        positions = [p for _, first, end in rows for p in range(first, end)]
        owners = [s for s, first, end in rows for _ in range(first, end)]
        inputs = build_decode_rows(tokens, positions, owners, self.block_size)
        normed, prenorm = forward(inputs, hidden=torch.cat(hidden_parts))
        ends = np.cumsum([end - first for _, first, end in rows]) - 1  # each sequence's last row
        # the runs to draft for, the longest first (the runs still drafting are a prefix), and their last rows
        runs = sorted(
            ((s, int(row)) for (s, _, _), row in zip(rows, ends) if s.draft_token_ids),
            key=lambda r: -len(r[0].draft_token_ids),
        )
        if not runs:
            return
        last = to_device([row for _, row in runs], torch.int64, normed.device)
        drafts, hidden = [self.head.draft_tokens(normed[last])], prenorm[last]
        verify = [s for s, _ in runs]
        for j in range(1, len(verify[0].draft_token_ids)):
            verify = [s for s in verify if j < len(s.draft_token_ids)]
            n = len(verify)
            inputs = build_decode_rows([0] * n, [s.start + j - 1 for s in verify], verify, self.block_size)
            normed, hidden = forward(inputs, input_ids=drafts[-1][:n], hidden=hidden[:n])
            drafts.append(self.head.draft_tokens(normed))
        values = iter(torch.cat(drafts).tolist())  # one read back for the k passes
        for j, made in enumerate(drafts):
            for s, _ in runs[: len(made)]:
                s.draft_token_ids[j] = next(values)
