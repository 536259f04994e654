"""The xgrammar backend: a StructuredOutputsParams becomes a CompiledGrammar (cached by its spec).

xgrammar is imported here only, so an engine whose requests never ask for structured outputs runs
without it installed."""

from __future__ import annotations

import json

from mini_infer.sampling_params import StructuredOutputsParams


def import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - the dev/structured extras install it
        raise ValueError("structured outputs need xgrammar: pip install 'mini-infer[structured]'") from e
    return xgrammar


def choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of the strings: JSON's string escapes are also xgrammar's."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class XgrammarBackend:
    """Compiles specs against one tokenizer; thread-safe (xgrammar releases the GIL while compiling)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        xgr = import_xgrammar()
        self.xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.batch = xgr.BatchGrammarMatcher(max_threads="auto")

    def compile(self, spec: StructuredOutputsParams):
        """A CompiledGrammar; ValueError with the compiler's message when the spec does not compile."""
        c = self.compiler
        try:
            if spec.json is not None:
                schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
                return c.compile_json_schema(schema, any_whitespace=not spec.disable_any_whitespace)
            if spec.json_object:  # OpenAI's json_object: an object, not any JSON value
                return c.compile_json_schema('{"type": "object"}', any_whitespace=not spec.disable_any_whitespace)
            if spec.regex is not None:
                return c.compile_regex(spec.regex)
            if spec.choice is not None:
                return c.compile_grammar(choice_grammar(spec.choice))
            return c.compile_grammar(spec.grammar)
        except Exception as e:  # xgrammar raises RuntimeError / its own errors with the parser's message
            raise ValueError(f"structured_outputs: the {spec.kind} does not compile: {e}") from e

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)  # rollback is unbounded (verification rolls back drafts)

    def bitmask(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)

    def fill_bitmasks(self, matchers: list, bitmask, rows: list[int]) -> None:
        """Fills row rows[i] of bitmask for matchers[i], over xgrammar's threads."""
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
