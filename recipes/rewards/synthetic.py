"""Synthetic rewards for quick seq2seq RL demos (`reward.type: callable`).

increasing_numbers: RL4LMs' "increasing numbers in text" task. Of the numbers a reply contains,
count the run that keeps increasing from the first one, and divide by the reply's length in words
(at least `min_words`): "3 5 8 9" scores 1.0, "3 5 2 9" 0.5, "the 3 a 5" 0.5, no number 0.
"""
from __future__ import annotations


def _run_length(numbers: list[float]) -> int:
    if not numbers:
        return 0
    run, last = 1, numbers[0]
    for n in numbers[1:]:
        if n <= last:
            break
        run, last = run + 1, n
    return run


def _number(word: str):
    try:
        return float(word)
    except ValueError:
        return None


def increasing_numbers(prompts: list[str], responses: list[str], min_words: int = 4) -> list[float]:
    scores = []
    for reply in responses:
        words = reply.split()
        numbers = [n for n in map(_number, words) if n is not None]
        scores.append(_run_length(numbers) / max(len(words), min_words))
    return scores
