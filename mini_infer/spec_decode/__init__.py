"""Speculative decoding: proposers of draft tokens (n-gram, a draft model) and the rejection sampler that
verifies them, so the tokens are distributed exactly as without speculation."""
