"""Prompt moderation: the last step before a prompt reaches a diffusion model.

Captions of real photos can carry people's names, and captioners or LLMs can produce explicit words; neither
belongs in a public challenge image. This removes unsafe terms, titled names ("Dr. Jane Doe"), names introduced by
"named"/"called", handles, e-mail addresses and links, then tidies whitespace and length.
"""

import re

__all__ = ["UNSAFE_TERMS", "moderate_prompt"]

UNSAFE_TERMS: tuple[str, ...] = (
    "nsfw", "nude", "nudes", "nudity", "naked", "topless", "porn", "porno", "pornographic", "explicit",
    "sex", "sexual", "sexy", "erotic", "fetish", "genitals", "gore", "gory", "dismembered", "corpse",
)

_NAME = r"[A-Z][a-z'\-]+(?:\s+[A-Z][a-z'\-]+)*"
_PATTERNS = (
    (re.compile(r"https?://\S+|www\.\S+"), ""),
    (re.compile(r"\b[\w.+\-]+@[\w\-]+\.[\w.\-]+\b"), ""),
    (re.compile(r"@\w+"), ""),
    (re.compile(rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Dame|Lady|Lord)\.?\s+{_NAME}"), "a person"),
    (re.compile(rf"\b(named|called)\s+{_NAME}"), ""),
)
_UNSAFE = re.compile(r"\b(?:" + "|".join(map(re.escape, UNSAFE_TERMS)) + r")\b", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def moderate_prompt(text: str, max_chars: int = 500) -> str:
    """`text` without names, unsafe terms or control characters, on one line, at most `max_chars` long."""
    text = _CONTROL.sub(" ", text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    text = _UNSAFE.sub("", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", text)).strip(" ,;:")
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0]
    return text
