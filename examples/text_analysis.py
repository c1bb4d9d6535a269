"""Text analysis: word counts and text statistics of a generated ~50k-word text, in 8 chunks.

Per chunk, `count_words` and `chunk_stats` run in parallel; two fan-in tasks merge them and
`report` returns {"top", "distinct", "stats"}. Run it with: dagkube run examples/text_analysis.py
"""

from __future__ import annotations

import random
import re
from collections import Counter
from itertools import pairwise
from typing import Any

import dagkube

SEED = 7
WORD_COUNT = 50_000
CHUNKS = 8
TOP = 20

_WORD = re.compile(r"[a-z]+")
_SENTENCE_END = re.compile(r"[.!?]")


def make_vocabulary(size: int, seed: int) -> list[str]:
    """`size` distinct pronounceable made-up words of 1 to 4 syllables."""
    rng = random.Random(seed)
    onsets = ["b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "st", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou"]
    words: dict[str, None] = {}  # a dict keeps insertion order, so the result is deterministic
    while len(words) < size:
        syllables = rng.choice([1, 2, 2, 3, 3, 4])
        words["".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables))] = None
    return list(words)


def make_text(word_count: int, seed: int) -> str:
    """Sentences of 4-16 words drawn with Zipf-like weights, so word frequencies are uneven."""
    rng = random.Random(seed)
    vocabulary = make_vocabulary(200, seed)
    weights = [1 / rank for rank in range(1, len(vocabulary) + 1)]
    sentences: list[str] = []
    written = 0
    while written < word_count:
        length = min(rng.randint(4, 16), word_count - written)
        words = rng.choices(vocabulary, weights=weights, k=length)
        words[0] = words[0].capitalize()
        if length > 5 and rng.random() < 0.3:
            words[2] += ","
        sentences.append(" ".join(words) + rng.choice(".!?"))
        written += length
    return " ".join(sentences)


def split_sentences(text: str, parts: int) -> list[str]:
    """Cut the text into `parts` chunks at sentence boundaries, so no word or sentence is split."""
    sentences = re.split(r"(?<=[.!?]) ", text)
    bounds = [len(sentences) * i // parts for i in range(parts + 1)]
    return [" ".join(sentences[start:end]) for start, end in pairwise(bounds)]


def text_stats(text: str) -> dict[str, Any]:
    """Sentences, words, characters (whitespace excluded, so chunking does not change the sum)
    and the longest word (ties broken alphabetically)."""
    words = _WORD.findall(text.lower())
    return {
        "sentences": len(_SENTENCE_END.findall(text)),
        "words": len(words),
        "characters": sum(1 for ch in text if not ch.isspace()),
        "longest_word": min(words, key=lambda w: (-len(w), w)) if words else "",
    }


def ranked(counts: Counter[str], limit: int) -> list[tuple[str, int]]:
    """The `limit` most frequent words, ties broken alphabetically (Counter.most_common breaks
    them by insertion order, which differs between chunked and whole-text counts)."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]


@dagkube.task
def count_words(chunk: str) -> Counter[str]:
    return Counter(_WORD.findall(chunk.lower()))


@dagkube.task
def chunk_stats(chunk: str) -> dict[str, Any]:
    return text_stats(chunk)


@dagkube.task
def merge_counts(counts: list[Counter[str]]) -> dict[str, Any]:
    total: Counter[str] = Counter()
    for chunk_counts in counts:
        total.update(chunk_counts)
    return {"top": ranked(total, TOP), "distinct": len(total)}


@dagkube.task
def merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    longest = [s["longest_word"] for s in stats if s["longest_word"]]
    return {
        "sentences": sum(s["sentences"] for s in stats),
        "words": sum(s["words"] for s in stats),
        "characters": sum(s["characters"] for s in stats),
        "longest_word": min(longest, key=lambda w: (-len(w), w)) if longest else "",
    }


@dagkube.task
def report(words: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    return {"top": words["top"], "distinct": words["distinct"], "stats": stats}


def build() -> dagkube.Workflow:
    chunks = split_sentences(make_text(WORD_COUNT, SEED), CHUNKS)
    counts = merge_counts([count_words(chunk) for chunk in chunks])
    stats = merge_stats([chunk_stats(chunk) for chunk in chunks])
    return dagkube.Workflow(report(counts, stats), name="text-analysis")


def verify(result: dict[str, Any]) -> None:
    text = make_text(WORD_COUNT, SEED)
    counts = Counter(re.findall(r"[a-z]+", text.lower()))
    words = text.split()
    expected_stats = {
        "sentences": sum(text.count(mark) for mark in ".!?"),
        "words": len(words),
        "characters": len("".join(words)),
        "longest_word": sorted(counts, key=lambda w: (-len(w), w))[0],
    }
    assert result["stats"] == expected_stats, (
        f"stats {result['stats']} differ from the whole-text ones {expected_stats}"
    )
    assert result["distinct"] == len(counts), (
        f"{result['distinct']} distinct words, expected {len(counts)}"
    )
    expected_top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP]
    assert list(result["top"]) == expected_top, (
        f"top-{TOP} words {result['top']} differ from the whole-text ones {expected_top}"
    )
    assert expected_stats["words"] == WORD_COUNT, "the generated text has the wrong length"
