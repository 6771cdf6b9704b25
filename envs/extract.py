"""Answer extraction: the one rule that turns a model's raw text into the answer we score.

`extract_answer` is a pure function. The raw text itself is never thrown away: the caller keeps it
in `Turn.action`, and environments put the extracted answer next to it in `StepResult.info`.
"""

from __future__ import annotations

import re

ANSWER_MARKER = re.compile(r"\banswer\s*(?::|is\b)", re.IGNORECASE)
NUMBER_PATTERN = re.compile(r"(?:(?<![\w.])-)?\d+(?:\.\d+)?")
GOLD_NUMBER_PATTERN = re.compile(r"-?\d+(?:\.\d+)?")
QUOTES = ('"', "'", "\u201c\u201d", "\u2018\u2019")


def extract_answer(raw: str, gold: str | None = None) -> str:
    """Extract the final answer from a model's raw output.

    The rule, step by step:

    1. Candidate line. If the text holds an answer marker ("ANSWER:", "Answer:", "answer is",
       "final answer is"; case-insensitive, i.e. the word "answer" followed by ":" or "is"), take
       the text after the LAST marker up to the end of that line, dropping leading ":" and spaces.
       If that rest of the line is empty, take the next non-empty line after the marker.
       Without a marker, take the first non-empty line.
    2. Clean up: strip whitespace, markdown bold markers ("**", "__") and backticks, one pair of
       matching surrounding quotes (only when the quote character does not also occur inside,
       so "'a', 'b'" stays whole), and trailing periods.
    3. Equals sign. If the candidate contains "=" (and the gold answer, when given, does not),
       keep what follows the last "=", and clean up again as in step 2.
    4. Numbers. If the gold answer is a number (an integer or decimal such as "-3" or "2.5"),
       take the last number in the candidate, if it holds any. A minus sign counts only when it
       does not follow a letter or digit, so "10-3" gives "3" and "x = -3" gives "-3".

    Returns "" when the output is empty. The raw output is never modified; the caller keeps it.
    """
    candidate = _candidate_line(raw)
    candidate = _clean(candidate)
    if "=" in candidate and (gold is None or "=" not in gold):
        candidate = _clean(candidate.rsplit("=", 1)[1])
    if gold is not None and GOLD_NUMBER_PATTERN.fullmatch(gold.strip()):
        numbers = NUMBER_PATTERN.findall(candidate)
        if numbers:
            candidate = numbers[-1]
    return candidate


def _candidate_line(raw: str) -> str:
    """Step 1: the rest of the line after the last answer marker, else the first non-empty line."""
    markers = list(ANSWER_MARKER.finditer(raw))
    if markers:
        rest = raw[markers[-1].end() :]
        first_line, _, following = rest.partition("\n")
        first_line = first_line.lstrip(": \t")
        if first_line.strip():
            return first_line
        return _first_nonempty_line(following)
    return _first_nonempty_line(raw)


def _first_nonempty_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line
    return ""


def _clean(candidate: str) -> str:
    """Step 2: whitespace, markdown bold and backticks, surrounding quotes, trailing periods."""
    text = candidate.replace("**", "").replace("__", "").replace("`", "").strip()
    text = text.rstrip(".").strip()
    for quote in QUOTES:
        opening, closing = quote[0], quote[-1]
        inner = text[1:-1]
        if len(text) >= 2 and text[0] == opening and text[-1] == closing:
            if opening not in inner and closing not in inner:
                text = inner.strip()
                break
    return text.rstrip(".").strip()
