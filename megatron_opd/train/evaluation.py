"""Task metrics on held-out prompts: greedy answers from the student's engine, checked by exact
match of a reference answer or by the last \\boxed{...} of a math solution."""

from __future__ import annotations

import re

from megatron_opd.rollout.engine import RolloutEngine, SamplingConfig
from megatron_opd.train.data import PromptRecord, Sequence


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


def completion_text(token_ids: list[int], tokenizer, *, stop_token_ids) -> str:
    ids = [t for t in token_ids if t not in stop_token_ids]
    return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else " ".join(map(str, ids))


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
        text = completion_text(c.token_ids, tokenizer, stop_token_ids=stop_token_ids)
        correct += bool(check(text, r.metadata.get("answer", "")))
    return correct


class Verifier:
    """Verifier-weighted distillation (``loss.verifier``): each sampled completion is scored with an
    evaluation metric against its row's ``answer`` (reward r = 1 if right, else 0), and its weight
    becomes ``weight * (1 - r + r * correct_weight)``: ``correct_weight=0`` trains only on what the
    verifier rejects, 1 changes nothing but logs the reward."""

    def __init__(self, metric: str, tokenizer, *, stop_token_ids: list[int], correct_weight: float):
        if metric not in METRICS:
            raise ValueError(f"loss.verifier must be one of {tuple(METRICS)}, got {metric!r}")
        self.check, self.metric, self.tokenizer = METRICS[metric], metric, tokenizer
        self.stop_token_ids, self.correct_weight = list(stop_token_ids), correct_weight

    def __call__(self, seq: Sequence, record: PromptRecord) -> None:
        """Score ``seq`` (the model's tokens of its completion; environment tokens left out) and
        set its ``reward`` and ``weight``."""
        if "answer" not in record.metadata:
            raise ValueError(f"prompt {record.index} has no 'answer' field to verify against (loss.verifier="
                             f"{self.metric})")
        completion = [t for t, m in zip(seq.tokens[seq.prompt_len:], seq.completion_mask) if m]
        text = completion_text(completion, self.tokenizer, stop_token_ids=self.stop_token_ids)
        seq.reward = float(bool(self.check(text, record.metadata["answer"])))
        seq.weight *= 1.0 - seq.reward + seq.reward * self.correct_weight
