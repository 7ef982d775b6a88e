"""Task metrics on held-out prompts: greedy answers from the student's engine, checked by exact
match of a reference answer or by the last \\boxed{...} of a math solution."""

from __future__ import annotations

import re

from megatron_opd.rollout.engine import RolloutEngine, SamplingConfig
from megatron_opd.train.data import PromptRecord


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    out = []
    while i < len(text):
        ch = text[i]
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return "".join(out)
        out.append(ch)
        i += 1
    return None


def _number(s: str):
    try:
        return float(re.sub(r"[,\s$]", "", s))
    except ValueError:
        return None


def exact_match(completion: str, answer: str) -> bool:
    return normalize(completion) == normalize(str(answer))


def boxed_math(completion: str, answer: str) -> bool:
    got = last_boxed(completion)
    if got is None:
        return False
    ref = last_boxed(str(answer)) or str(answer)
    a, b = _number(got), _number(ref)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return normalize(got).replace(" ", "") == normalize(ref).replace(" ", "")


METRICS = {"exact_match": exact_match, "boxed_math": boxed_math}


def count_correct(engine: RolloutEngine, records: list[PromptRecord], tokenizer, *, metric: str,
                  max_new_tokens: int, stop_token_ids: list[int]) -> int:
    """How many of ``records`` (each with metadata ``answer``) the engine's greedy answer gets right."""
    if not records:
        return 0
    check = METRICS[metric]
    outs = engine.generate([r.prompt_ids for r in records],
                           SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                                          stop_token_ids=tuple(stop_token_ids)),
                           prompt_indices=[r.index for r in records])
    correct = 0
    for r, c in zip(records, outs):
        ids = [t for t in c.token_ids if t not in stop_token_ids]
        text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else " ".join(map(str, ids))
        correct += bool(check(text, r.metadata.get("answer", "")))
    return correct
