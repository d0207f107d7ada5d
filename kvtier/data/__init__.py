"""Text shipped with kvtier: the needle-in-a-haystack document for long-context checks, and
default.toml, the documented defaults that kvtier.config reads.

Strings only: it never loads a model or touches the KV cache.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

NEEDLE_SENTENCE = "The secret passphrase for the vault is amber falcon 42."
NEEDLE_QUESTION = "What is the secret passphrase for the vault?"
NEEDLE_ANSWER = "amber falcon 42"

# needle.txt: an original operations handbook of 4,567 tokens under SmolLM2's tokenizer, with
# NEEDLE_SENTENCE as its own paragraph at 50% of the tokens; needle_messages() under SmolLM2's chat
# template is 4,608 tokens, and greedy SmolLM2-135M-Instruct answers
# 'The secret passphrase for the vault is "Amber Falcon 42"' (measured on CPU, fp32, transformers 5.24).


@cache
def needle_document() -> str:
    """The handbook text with the needle sentence in its middle."""
    text = resources.files(__name__).joinpath("needle.txt").read_text(encoding="utf-8")
    assert NEEDLE_SENTENCE in text, "needle.txt lost its needle sentence"
    return text


def needle_messages() -> list[dict[str, str]]:
    """One user chat message: the document, then the question (the wording SmolLM2-135M answers)."""
    return [{"role": "user", "content": f"{needle_document().rstrip()}\n\n{NEEDLE_QUESTION}"}]


def needle_found(answer: str) -> bool:
    """Whether a generated answer states NEEDLE_ANSWER; case and spacing do not matter."""
    return NEEDLE_ANSWER in " ".join(answer.lower().split())
