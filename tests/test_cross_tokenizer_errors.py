"""Named errors of cross-tokenizer distillation (loss.cross_tokenizer): a missing tokenizer on either
side or one that is not its model's (before any weight loads), an alignment that covers too little of
a completion (loss.min_aligned_fraction, naming the step, prompt and sample), a chat template that
cannot render (naming the sample), and the recipe fields that do not fit together."""

from __future__ import annotations

import shutil

import pytest

from megatron_opd.config import LossConfig, load_config
from megatron_opd.tasks.arithmetic import make_pair_tokenizer, make_tokenizer
from megatron_opd.testing.tiny_tokenizers import make_byte_level_bpe, make_sentencepiece_bpe
from megatron_opd.train.alignment import AlignmentError
from megatron_opd.train.data import PromptRecord, Sequence, load_prompts
from megatron_opd.train.experience import align_to_teacher
from megatron_opd.utils import write_jsonl

SPAN = ["loss.kind=sampled_reverse_kl", "loss.cross_tokenizer=span"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from megatron_opd.testing.tiny_task import add_pair_teacher, make_task_dir

    root = make_task_dir(tmp_path_factory.mktemp("xtok_task"), num_train=20)
    add_pair_teacher(root)
    for name, src in (("teacher_no_tokenizer", "teacher_pairs"), ("student_no_tokenizer", "student")):
        shutil.copytree(root / src, root / name, ignore=shutil.ignore_patterns("tokenizer*"))
    # A model whose tokenizer has ids it has no rows for: the char-level model with the pair tokenizer.
    shutil.copytree(root / "student", root / "student_wrong_tokenizer")
    make_pair_tokenizer(root / "student_wrong_tokenizer")
    return root


@pytest.mark.parametrize("student, teacher, message", [
    ("student", "teacher_no_tokenizer", "needs the teacher's tokenizer: none next to teacher.path="),
    ("student_no_tokenizer", "teacher_pairs", "needs the student's tokenizer: none next to student.path="),
    ("student_wrong_tokenizer", "teacher_pairs", "its tokenizer has 114 token ids, its model 14 rows"),
])
def test_trainer_refuses_missing_or_wrong_tokenizers_before_loading(task, tmp_path, monkeypatch, student, teacher,
                                                                     message):
    import torch.distributed as dist

    from megatron_opd import parallel
    from megatron_opd.train import loop
    from megatron_opd.train.loop import Trainer

    def reached(*args, **kwargs):
        raise AssertionError("reached the models before refusing the tokenizers")

    monkeypatch.setattr(parallel, "initialize_global_model_parallel", reached)
    monkeypatch.setattr(loop, "load_model", reached)
    monkeypatch.setattr(parallel, "init_distributed", lambda **kw: None)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    overrides = [f"student.path={task / student}", f"teacher.path={task / teacher}",
                 f"data.train_path={task / 'train.jsonl'}", f"train.run_dir={tmp_path / 'run'}", *SPAN]
    with pytest.raises(AlignmentError, match=message):
        Trainer(load_config(None, overrides))


@pytest.mark.parametrize("overrides, message", [
    (["loss.cross_tokenizer=span"], "loss.cross_tokenizer=span is the span-level sampled reverse KL: set "
                                    "loss.kind=sampled_reverse_kl"),
    (["loss.cross_tokenizer=shared"], "loss.cross_tokenizer must be one of ('none', 'span')"),
    ([*SPAN, "loss.min_aligned_fraction=1.5"], "loss.min_aligned_fraction must be in [0, 1], got 1.5"),
    ([*SPAN, "loss.fused_linear=true"], "set loss.fused_linear=false"),
    ([*SPAN, "loss.special_tokens=[a]"], "loss.special_tokens: expected a mapping"),
    ([*SPAN, "loss.special_tokens={a: 1}"], "loss.special_tokens must map student special-token strings"),
    ([*SPAN, "teacher.served_url=http://127.0.0.1:1", "loss.top_k=2", "teacher.path="],
     "with a served teacher needs teacher.path"),
    ([*SPAN, "rollout.lmbda=0.5", "rollout.offpolicy_source=teacher"], "the teacher's samples are in its own "
                                                                       "token ids"),
])
def test_config_refuses_cross_tokenizer_fields_that_do_not_fit(overrides, message):
    base = ["student.path=s", "teacher.path=t", "data.train_path=x.jsonl"]
    with pytest.raises(ValueError) as e:
        load_config(None, base + overrides).validate()
    assert message in str(e.value)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok_error_tokenizers")
    return {"bpe_tool": make_byte_level_bpe(root / "bpe", vocab_size=300, extra_special=("<tool>",), seed=2),
            "sp": make_sentencepiece_bpe(root / "sp", vocab_size=350, add_bos=True),
            "char": make_tokenizer(root / "char"), "pair": make_pair_tokenizer(root / "pair")}


def _pair(toks, student: str, teacher: str, fraction: float):
    loss = LossConfig(kind="sampled_reverse_kl", cross_tokenizer="span", min_aligned_fraction=fraction)
    s, t = toks[student], toks[teacher]
    return loss.tokenizer_pair(s, t, student_path="s", teacher_path="t", student_vocab=len(s), teacher_vocab=len(t))


def test_alignment_below_min_aligned_fraction_names_the_sample(toks):
    s = toks["bpe_tool"]
    prompt = s("the student", add_special_tokens=False)["input_ids"]
    # Mostly a special token the teacher has no counterpart of: units only the student has.
    text = s(" learns", add_special_tokens=False)["input_ids"]
    completion = text + [s.convert_tokens_to_ids("<tool>")] * 12
    records = [PromptRecord(7, prompt, prompt_text="the student")]

    def seqs():
        return [Sequence(7, 1, prompt + completion, len(prompt), [1] * len(completion))]

    with pytest.raises(AlignmentError) as e:
        align_to_teacher(_pair(toks, "bpe_tool", "sp", 0.9), seqs(), records, step=3)
    assert "step 3, prompt 7, sample 1" in str(e.value) and "loss.min_aligned_fraction=0.9" in str(e.value)
    covered = len(b" learns") / (len(b" learns") + 12)
    assert f"covers {covered:.3f}" in str(e.value)
    ok = seqs()  # the threshold is the recipe's: below this sequence's coverage it trains
    align_to_teacher(_pair(toks, "bpe_tool", "sp", 0.3), ok, records, step=3)
    assert ok[0].alignment.coverage == pytest.approx(covered)


def test_chat_template_that_cannot_render_names_the_sample(toks, tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    toks["char"].chat_template = template
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "12+34="}]}])
    records = load_prompts(path, toks["char"], vocab_size=14, max_prompt_tokens=16)
    assert records[0].messages == [{"role": "user", "content": "12+34="}]
    completion = toks["char"]("64", add_special_tokens=False)["input_ids"]

    def seqs():
        return [Sequence(0, 2, records[0].prompt_ids + completion, len(records[0].prompt_ids), [1, 1])]

    pair = _pair(toks, "char", "pair", 0.5)
    with pytest.raises(AlignmentError, match="step 5, prompt 0, sample 2: chat messages need a chat template on "
                                             "both sides; the teacher tokenizer has none"):
        align_to_teacher(pair, seqs(), records, step=5)
    toks["pair"].chat_template = "{{ raise_exception('the teacher has no user role') }}"
    with pytest.raises(AlignmentError, match="step 5, prompt 0, sample 2: the teacher's chat template cannot "
                                             "render these messages: .*the teacher has no user role"):
        align_to_teacher(pair, seqs(), records, step=5)
    toks["pair"].chat_template = template
    rendered = seqs()
    align_to_teacher(pair, rendered, records, step=5)
    assert rendered[0].alignment.teacher_ids == toks["pair"]("12+34=64", add_special_tokens=False)["input_ids"]
