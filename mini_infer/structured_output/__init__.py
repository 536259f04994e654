"""Structured outputs: grammars (JSON schema, regex, choice, EBNF) compiled by xgrammar, a per-step token
bitmask for the constrained rows, and one matcher per sequence advanced on the tokens it takes."""

from mini_infer.structured_output.manager import StructuredOutputManager

__all__ = ["StructuredOutputManager"]
