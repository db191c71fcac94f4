"""Evaluation: perplexity in the quantization papers' protocol (`jaxsun.eval.perplexity`)."""

from jaxsun.eval.perplexity import PerplexityResult, text_perplexity, token_perplexity

__all__ = ["PerplexityResult", "text_perplexity", "token_perplexity"]
