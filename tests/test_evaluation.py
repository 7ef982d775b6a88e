"""Task metrics: exact match and boxed-answer math checking."""

import pytest

from megatron_opd.train.evaluation import boxed_math, exact_match, last_boxed


@pytest.mark.parametrize("completion,answer,ok", [
    ("8691", "8691", True),
    ("  8691 \n", "8691", True),
    ("8 691", "8691", False),
    ("8690", "8691", False),
])
def test_exact_match(completion, answer, ok):
    assert exact_match(completion, answer) is ok


@pytest.mark.parametrize("completion,answer,ok", [
    (r"so the answer is \boxed{42}.", "42", True),
    (r"\boxed{41} no wait \boxed{42}", "42", True),           # the last box counts
    (r"\boxed{1,000}", "1000", True),                          # numbers compare as numbers
    (r"\boxed{0.5}", r"\boxed{\frac{1}{2}}", False),           # no symbolic algebra
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", True),            # nested braces, same text
    (r"\boxed{x + 1}", "x+1", True),
    ("42", "42", False),                                       # no box, no credit
    (r"\boxed{42", "42", False),                               # unbalanced
])
def test_boxed_math(completion, answer, ok):
    assert boxed_math(completion, answer) is ok


def test_last_boxed_handles_nesting():
    assert last_boxed(r"a \boxed{\sqrt{2}} b") == r"\sqrt{2}"
    assert last_boxed("none") is None


def test_verifier_scores_the_models_tokens_and_reweights_by_the_documented_formula():
    """reward r = the metric on the completion (environment tokens and stop tokens left out);
    weight *= 1 - r + r * correct_weight."""
    from megatron_opd.train.data import PromptRecord, Sequence
    from megatron_opd.train.evaluation import Verifier

    verifier = Verifier("exact_match", None, stop_token_ids=[2], correct_weight=0.25)
    record = PromptRecord(0, [5, 6], metadata={"answer": "7 8"})
    # prompt 5 6, then 7, a tool token 9 (not the model's), 8 and the stop token
    right = Sequence(0, 0, [5, 6, 7, 9, 8, 2], 2, [1, 0, 1, 1], weight=2.0)
    wrong = Sequence(0, 1, [5, 6, 7, 7, 2], 2, [1, 1, 1], weight=2.0)
    verifier(right, record)
    verifier(wrong, record)
    assert (right.reward, right.weight) == (1.0, 0.5) and (wrong.reward, wrong.weight) == (0.0, 2.0)
    with pytest.raises(ValueError, match=r"prompt 3 has no 'answer' field to verify against \(loss.verifier=exact_match\)"):
        verifier(Sequence(3, 0, [5, 7], 1, [1]), PromptRecord(3, [5]))
    with pytest.raises(ValueError, match="loss.verifier must be one of"):
        Verifier("f1", None, stop_token_ids=[], correct_weight=1.0)


def _reward_metrics():
    import torch.distributed as dist

    from megatron_opd.train.data import Sequence
    from megatron_opd.train.metrics import step_metrics

    class OneReplica:  # every rank its own replica, tp = pp = 1
        is_last_stage, tp_rank, pp_rank = True, 0, 0

    rank = dist.get_rank()
    seqs = [Sequence(0, i, [1, 2, 3], 2, [1], reward=float(i < rank + 1)) for i in range(2)] + \
        [Sequence(1, 0, [1, 2], 1, [1])]  # not scored
    return step_metrics([], seqs, OneReplica())


def test_reward_mean_is_over_the_scored_samples_of_every_replica():
    from megatron_opd.testing.multiprocess import run_distributed

    out = run_distributed(_reward_metrics, 2)
    # rank 0: rewards 1, 0; rank 1: 1, 1 -> 3 of 4 scored samples
    assert out[0]["rollout/reward_mean"] == out[1]["rollout/reward_mean"] == 0.75

