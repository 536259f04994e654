"""OutputProcessor: from sampled tokens to what clients see (text, stop strings, logprobs, RequestOutputs).

Requests live here from add to finish. The scheduler has already appended each step's tokens and
ended sequences on EOS, stop tokens and length; this adds the text (incremental detokenization), ends
sequences on stop strings, and records logprobs so that the sampled tokens' texts join to the output
text exactly. A fault while one request is processed fails that request alone (finish_reason "error").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from mini_infer.detokenizer import DecodeWindow, Detokenizer, find_stop_string, visible_text
from mini_infer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from mini_infer.sampler import SamplerOutput
from mini_infer.scheduler import Scheduler, SchedulerOutput
from mini_infer.sequence import Sequence

logger = logging.getLogger(__name__)


def is_device_fault(exc: BaseException) -> bool:
    """A fault that leaves the device unusable for every request (a sticky CUDA error), as opposed to one
    that a request's own data or a bug in its processing caused."""
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    message = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in message for marker in ("CUDA error", "CUBLAS_STATUS", "device-side assert", "illegal memory access")
    )


@dataclass
class SeqOutput:
    """What the client sees of one sequence, built up as its tokens arrive."""

    seq: Sequence
    text: str = ""
    window: DecodeWindow = field(default_factory=DecodeWindow)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # entry 0 is None, as in vLLM
    prompt_token_texts: list[str] | None = None

    def __post_init__(self) -> None:
        # decoding windows are positions in seq.token_ids: the output starts after the prompt
        self.window = DecodeWindow(self.seq.num_prompt_tokens, self.seq.num_prompt_tokens)
        if self.seq.params.logprobs is not None:
            self.logprobs = []
        if self.seq.params.prompt_logprobs is not None:
            self.prompt_logprobs = []


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[SeqOutput]
    arrival_time: float
    final_only: bool = False
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(o.seq.is_finished for o in self.outputs)

    @property
    def uses_penalties(self) -> bool:
        return self.outputs[0].seq.params.uses_penalties


def _text_at_finish(request: RequestState, out: SeqOutput) -> bool:
    """Whether a sequence's text is decoded once, when it finishes, instead of token by token: nothing
    reads it before (final-only output, no stop strings, no per-token logprobs). One decode of the whole
    output is the text the incremental one would join to (detokenizer.py), at a fraction of the calls."""
    return request.final_only and not out.seq.params.stop and out.logprobs is None


class OutputProcessor:
    def __init__(self, detokenizer: Detokenizer | None, scheduler: Scheduler) -> None:
        self.detokenizer = detokenizer
        self.scheduler = scheduler
        self.requests: dict[str, RequestState] = {}
        self.num_penalty_requests = 0  # while any, the engine steps synchronously (penalties read every token)
        self.generation_tokens = 0

    def add(self, request: RequestState) -> None:
        self.requests[request.request_id] = request
        self.num_penalty_requests += request.uses_penalties

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        self.num_penalty_requests -= request.uses_penalties
        for out in request.outputs:
            if not out.seq.is_finished:
                self.scheduler.finish(out.seq, "abort")

    def process(
        self, step: SchedulerOutput, taken: list[tuple[Sequence, int]], result: SamplerOutput
    ) -> list[RequestOutput]:
        """Outputs of the requests that moved: `taken` are (sequence, row in result) of the tokens the
        scheduler appended for `step`."""
        outputs: list[RequestOutput] = []
        moved: dict[str, RequestState] = {}
        for s in step.prefills:
            # a sequence its first token finishes (max_tokens=1) keeps them; an aborted request is gone
            if s.seq.seq_id in result.prompt_logprobs and s.seq.request_id in self.requests:
                try:
                    self._record_prompt_logprobs(s.seq, *result.prompt_logprobs[s.seq.seq_id])
                except Exception as exc:
                    self._fault(exc, s.seq, outputs)
        logprobs = result.logprobs
        for seq, row, num_taken in taken:
            request = self.requests.get(seq.request_id)
            if request is None:
                continue
            entries = logprobs[row] if logprobs else None
            if not isinstance(entries, list):  # no logprobs, or one token's: a verified run has a list
                entries = [entries] * num_taken
            out, end = request.outputs[seq.index], len(seq.token_ids) - num_taken
            try:
                for entry in entries[:num_taken]:
                    end += 1
                    if not self._take_token(request, out, entry, end):
                        break
            except Exception as exc:
                self._fault(exc, seq, outputs)
                continue
            moved[seq.request_id] = request
        for request in moved.values():
            if request.request_id not in self.requests:  # failed: its last output is out already
                continue
            if request.finished:
                outputs.append(self._finish(request))
            elif not request.final_only:
                outputs.append(self._make_output(request))
        return outputs

    def fail(self, request_ids: list[str]) -> list[RequestOutput]:
        """Ends requests whose step failed: finish_reason "error", their blocks freed, a final output each."""
        return [self._fail(self.requests[rid]) for rid in request_ids if rid in self.requests]

    def _fault(self, exc: Exception, seq: Sequence, outputs: list[RequestOutput]) -> None:
        """A fault in one request's processing fails that request only (a device fault, everything)."""
        if is_device_fault(exc):
            raise exc
        logger.exception("request %s failed while processing its output; the others go on", seq.request_id)
        if seq.request_id in self.requests:
            outputs.append(self._fail(self.requests[seq.request_id]))

    def _fail(self, request: RequestState) -> RequestOutput:
        for out in request.outputs:
            if not out.seq.is_finished:
                self.scheduler.finish(out.seq, "error")
        return self._finish(request)

    def _finish(self, request: RequestState) -> RequestOutput:
        del self.requests[request.request_id]
        if self.detokenizer is not None:  # an aborted or failed request's text, where it waited for the end
            for out in request.outputs:
                if _text_at_finish(request, out) and out.window.read_offset < len(out.seq.token_ids):
                    ids, skip = out.seq.token_ids, out.seq.params.skip_special_tokens
                    out.text += self.detokenizer.new_text(ids, out.window, skip, flush=True)
        self.num_penalty_requests -= request.uses_penalties
        return self._make_output(request)

    # -- one token ------------------------------------------------------------------------------
    def _take_token(self, request: RequestState, out: SeqOutput, logprobs: tuple | None, end: int) -> bool:
        """The text, logprobs and stop strings of token end - 1 (the newest, or one of a verified run);
        the scheduler may have ended the sequence on it already (a stop string still wins over "length").
        False when a stop string ends the sequence here (the run's later tokens are dropped)."""
        self.generation_tokens += 1
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        detokenizer = self.detokenizer
        if detokenizer is None and out.logprobs is None:  # token ids only (a preset without a tokenizer)
            return True
        seq, params = out.seq, out.seq.params
        ids = seq.token_ids if end == len(seq.token_ids) else seq.token_ids[:end]
        token = ids[-1]
        want_logprobs = logprobs is not None and out.logprobs is not None
        if want_logprobs:
            alternatives = self._alternative_texts(out, ids, logprobs)
        text = ""
        if detokenizer is not None and not _text_at_finish(request, out):
            text = detokenizer.new_text(ids, out.window, params.skip_special_tokens)
            out.text += text
        if want_logprobs:
            self._record_logprobs(out, token, logprobs, text, alternatives)
        if (
            text
            and params.stop
            and seq.finish_reason in (None, "length")
            and end - seq.num_prompt_tokens >= params.min_tokens
            and (hit := find_stop_string(out.text, params, len(text)))
        ):
            stop, cut = hit
            out.text = out.text[:cut]
            self._trim_logprob_texts(out)
            self.scheduler.finish(seq, "stop", stop, num_tokens=end)
            return False
        if seq.is_finished and end == len(seq.token_ids) and detokenizer is not None:
            tail = detokenizer.new_text(ids, out.window, params.skip_special_tokens, flush=True)
            out.text += tail
            if tail and out.logprobs:
                last = out.logprobs[-1][token]
                last.decoded_token = (last.decoded_token or "") + tail
        return True

    def _alternative_texts(self, out: SeqOutput, ids: list[int], logprobs: tuple) -> dict[int, str | None]:
        """The text of each top-logprob alternative to ids[-1], decoded in the context before it."""
        top_ids = [t for t in logprobs[2][: out.seq.params.logprobs] if t != ids[-1]]
        if self.detokenizer is None:
            return dict.fromkeys(top_ids)
        skip = out.seq.params.skip_special_tokens
        texts = self.detokenizer.next_token_texts(ids, out.window, top_ids, skip, end=len(ids) - 1)
        return dict(zip(top_ids, texts))

    def _record_logprobs(
        self, out: SeqOutput, token: int, logprobs: tuple, text: str, alternatives: dict[int, str | None]
    ) -> None:
        """The sampled token's text is what it added to the output, so a request's tokens join to its text."""
        sampled_lp, rank, top_ids, top_lps = logprobs
        entry = {token: Logprob(sampled_lp, rank, text if self.detokenizer is not None else None)}
        for r, (t, lp) in enumerate(zip(top_ids[: out.seq.params.logprobs], top_lps), start=1):
            entry.setdefault(t, Logprob(lp, r, alternatives.get(t)))
        out.logprobs.append(entry)
        out.cumulative_logprob += sampled_lp

    def _trim_logprob_texts(self, out: SeqOutput) -> None:
        """A stop string cut the text: cut the tokens' texts from the end to match."""
        if not out.logprobs:
            return
        pairs = list(zip(out.logprobs, out.seq.output_token_ids))
        excess = sum(len(e[t].decoded_token or "") for e, t in pairs) - len(out.text)
        for entry, t in reversed(pairs):
            if excess <= 0:
                break
            piece = entry[t].decoded_token or ""
            cut = min(excess, len(piece))
            entry[t].decoded_token = piece[: len(piece) - cut]
            excess -= cut

    def _record_prompt_logprobs(self, seq: Sequence, first: int, rows: list[tuple]) -> None:
        """Prompt logprobs of positions first, first + 1, ...; positions recomputed after a preemption
        are already there and skipped."""
        out = self.requests[seq.request_id].outputs[seq.index]
        prompt = seq.prompt_token_ids
        if not out.prompt_logprobs:
            out.prompt_logprobs.append(None)
        if out.prompt_token_texts is None and self.detokenizer is not None:
            out.prompt_token_texts = self.detokenizer.token_texts(prompt, seq.params.skip_special_tokens)
        texts = out.prompt_token_texts
        decode = self.detokenizer.decode if self.detokenizer is not None else (lambda t: None)
        k = seq.params.prompt_logprobs
        for position, (lp, rank, top_ids, top_lps) in enumerate(rows, start=first):
            if position < len(out.prompt_logprobs):
                continue
            token = prompt[position]
            entry = {token: Logprob(lp, rank, texts[position] if texts is not None else None)}
            for r, (t, v) in enumerate(zip(top_ids[:k], top_lps), start=1):
                entry.setdefault(t, Logprob(v, r, decode(t)))
            out.prompt_logprobs.append(entry)

    def _make_output(self, r: RequestState) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=o.seq.index,
                text=visible_text(o.text, o.seq.params, o.seq.is_finished),
                token_ids=o.seq.output_token_ids,
                cumulative_logprob=o.cumulative_logprob if o.logprobs is not None else None,
                logprobs=list(o.logprobs) if o.logprobs is not None else None,
                finish_reason=o.seq.finish_reason,
                stop_reason=o.seq.stop_reason,
            )
            for o in r.outputs
        ]
        first = r.outputs[0]
        scheduled = [o.seq.first_scheduled_time for o in r.outputs if o.seq.first_scheduled_time is not None]
        metrics = RequestMetrics(
            r.arrival_time,
            min(scheduled) if scheduled else None,
            r.first_token_time,
            time.monotonic() if r.finished else None,
        )
        prompt_logprobs = list(first.prompt_logprobs) if first.prompt_logprobs is not None else None
        return RequestOutput(
            r.request_id,
            r.prompt,
            r.prompt_token_ids,
            completions,
            r.finished,
            first.seq.num_cached_tokens,
            metrics,
            prompt_logprobs=prompt_logprobs,
        )
