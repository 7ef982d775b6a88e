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
