"""How varied a sample of outputs is: repeats, distinct-n and self-BLEU.

All three run on the report's sample of texts (jobs/report/data.py), never on
every row. Words are sacreBLEU's 13a tokens, the tokenization its BLEU uses,
so distinct-n and self-BLEU count the same units.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

SELF_BLEU_TEXTS = 100  # each text is scored against all the others: the cost grows with the square (0.4 s here)


@dataclass
class Diversity:
    texts: int  # in the sample
    distinct_1: float | None  # distinct unigrams / all unigrams
    distinct_2: float | None
    self_bleu: float | None  # mean sentence BLEU of each text against the others; 100: all alike
    self_bleu_texts: int  # how many texts self-BLEU used
    empty: int  # texts with no words


def diversity(texts: list[str]) -> Diversity:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    words = [tokenize(t.strip()).split() for t in texts]
    scored = [t for t, w in zip(texts, words) if w][:SELF_BLEU_TEXTS]
    return Diversity(
        texts=len(texts),
        distinct_1=distinct_n(words, 1),
        distinct_2=distinct_n(words, 2),
        self_bleu=self_bleu(scored),
        self_bleu_texts=len(scored) if len(scored) > 1 else 0,
        empty=sum(1 for w in words if not w),
    )


def distinct_n(tokenized: list[list[str]], n: int) -> float | None:
    """Distinct n-grams over all n-grams in the texts (Li et al., 2016); None without any."""
    grams = Counter(tuple(words[i : i + n]) for words in tokenized for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else None


def self_bleu(texts: list[str]) -> float | None:
    """Self-BLEU (Zhu et al., 2018, Texygen): the mean BLEU of each text with all the
    others as its references, by sacreBLEU with effective order (short texts have no 4-grams)."""
    if len(texts) < 2:
        return None
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)
    scores = [bleu.sentence_score(text, texts[:i] + texts[i + 1 :]).score for i, text in enumerate(texts)]
    return sum(scores) / len(scores)


def most_repeated(texts: list[str], k: int = 10) -> list[tuple[str, int]]:
    """The k texts seen most often in the sample, if seen more than once, with their counts."""
    counts = Counter(t.strip() for t in texts)
    return [(text, n) for text, n in counts.most_common(k) if n > 1]
