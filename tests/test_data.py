"""Prompt data: JSONL and parquet rows (chat messages, text, token ids, completions, metadata),
errors that name the file and line, the tokenizer compatibility check, the step sampler and
sequence packing."""

import json

import pytest
import torch

from megatron_opd.train.data import (Sequence, check_tokenizers, load_prompts, micro_batch,
                                     pack_sequences, step_prompt_indices)

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from megatron_opd.testing.tiny import make_sentencepiece_tokenizer

    tok = AutoTokenizer.from_pretrained(str(make_sentencepiece_tokenizer(tmp_path_factory.mktemp("tok"))))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROWS = [
    {"messages": [{"role": "user", "content": "the student learns"}], "answer": "42"},
    {"prompt": "add the digit", "completion": "sum carry", "reward": 0.5},
    {"prompt_ids": [1, 7, 9], "completion_ids": [11, 2]},
]


def _check_rows(records, tokenizer):
    chat, text, ids = records
    rendered = tokenizer.apply_chat_template(ROWS[0]["messages"], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<assistant> ")
    assert chat.prompt_ids == list(tokenizer.apply_chat_template(
        ROWS[0]["messages"], add_generation_prompt=True, tokenize=True, return_dict=False))
    assert chat.completion_ids is None and chat.metadata == {"answer": "42"}
    assert text.prompt_ids == tokenizer("add the digit")["input_ids"]
    assert text.completion_ids == tokenizer("sum carry", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert text.metadata == {"reward": 0.5}
    assert (ids.prompt_ids, ids.completion_ids, ids.metadata) == ([1, 7, 9], [11, 2], {})
    assert [r.index for r in records] == [0, 1, 2]


def test_jsonl_rows_of_every_kind(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "train.jsonl", ROWS[:1] + [""] + ROWS[1:])  # blank lines are skipped
    _check_rows(load_prompts(path, tokenizer, vocab_size=300, max_prompt_tokens=64), tokenizer)


def test_parquet_rows_of_every_kind(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # parquet columns are shared: a field a row does not have is null there, not present
    keys = sorted({k for r in ROWS for k in r})
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({k: [r.get(k) for r in ROWS] for k in keys}), path)
    _check_rows(load_prompts(path, tokenizer, vocab_size=300, max_prompt_tokens=64), tokenizer)


@pytest.mark.parametrize("line,message", [
    ('{"prompt_ids": [1, 2]', "train.jsonl:2: not valid JSON"),
    ('[1, 2]', "train.jsonl:2: each line must be a JSON object"),
    ('{"text": "x"}', "train.jsonl:2: a row needs 'messages', 'prompt' or 'prompt_ids'"),
    ('{"prompt_ids": [1, 400]}', "train.jsonl:2: prompt_ids: token id 400 is outside the vocabulary [0, 300)"),
    ('{"prompt_ids": "1 2"}', "train.jsonl:2: prompt_ids: expected a list of token ids"),
    ('{"prompt_ids": []}', "train.jsonl:2: the prompt is empty"),
    ('{"prompt_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9]}', "train.jsonl:2: prompt has 9 tokens, more than data.max_prompt_tokens=8"),
    ('{"messages": [{"role": "user"}]}', "train.jsonl:2: messages must be a list of {role, content} objects"),
    ('{"prompt": 5}', "train.jsonl:2: prompt must be a string"),
    ('{"prompt_ids": [1], "completion_ids": [1, -1]}', "train.jsonl:2: completion_ids: token id -1"),
])
def test_malformed_rows_name_file_and_line(tmp_path, tokenizer, line, message):
    path = _jsonl(tmp_path / "train.jsonl", [{"prompt_ids": [1, 2]}, line])
    with pytest.raises(ValueError) as e:
        load_prompts(path, tokenizer, vocab_size=300, max_prompt_tokens=8)
    assert message in str(e.value) and str(path) in str(e.value)


def test_text_rows_without_a_tokenizer_are_refused(tmp_path):
    for row, message in (({"prompt": "hi"}, "text prompts need a tokenizer"),
                         ({"prompt_ids": [1], "completion": "hi"}, "text completions need a tokenizer"),
                         ({"messages": [{"role": "user", "content": "hi"}]}, "chat messages need a tokenizer with a chat template")):
        path = _jsonl(tmp_path / "x.jsonl", [row])
        with pytest.raises(ValueError, match=f"x.jsonl:1: {message}"):
            load_prompts(path, None, vocab_size=300, max_prompt_tokens=8)
    with pytest.raises(ValueError, match="missing.jsonl: data file does not exist"):
        load_prompts(tmp_path / "missing.jsonl", None, vocab_size=300, max_prompt_tokens=8)


def test_tokenizer_check_allows_padding_and_refuses_real_mismatches(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    from megatron_opd.testing.tiny import make_sentencepiece_tokenizer

    check_tokenizers(tokenizer, tokenizer, student_vocab=300, teacher_vocab=384)  # padding only
    other = AutoTokenizer.from_pretrained(str(make_sentencepiece_tokenizer(
        tmp_path / "other", corpus=["completely different words here"] * 50 + ["zebra quartz"] * 50,
        vocab_size=60)))
    with pytest.raises(ValueError, match="teacher and student tokenizers disagree at token id"):
        check_tokenizers(tokenizer, other, student_vocab=300, teacher_vocab=300)


def test_step_sampler_is_a_deterministic_stream_of_epoch_permutations():
    steps = [step_prompt_indices(10, step=s, prompts_per_step=4, seed=3, shuffle=True) for s in range(5)]
    flat = sum(steps, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation each epoch
    assert steps[3] == step_prompt_indices(10, step=3, prompts_per_step=4, seed=3, shuffle=True)
    assert step_prompt_indices(10, step=1, prompts_per_step=4, seed=3, shuffle=False) == [4, 5, 6, 7]


def _seq(n_prompt, n_completion, *, masked=()):
    mask = [0 if i in masked else 1 for i in range(n_completion)]
    return Sequence(0, 0, list(range(1, n_prompt + n_completion + 1)), n_prompt, mask,
                    rollout_logprobs=[-0.5] * n_completion, weight=2.0)


def test_packing_respects_the_token_budget_and_masks_prompts_tools_and_boundaries():
    seqs = [_seq(3, 4), _seq(5, 5), _seq(2, 2, masked={0}), _seq(20, 5), _seq(1, 3)]
    packs = pack_sequences(seqs, budget=12)
    assert sorted(i for p in packs for i in p) == list(range(len(seqs)))
    for p in packs:
        assert sum(len(seqs[i].tokens) for i in p) <= 12 or len(p) == 1  # an oversized one alone
    mb = micro_batch(seqs, [0, 2], device="cpu")
    # seq 0: 3 prompt + 4 completion tokens; targets shift by one; the last position predicts nothing
    assert mb["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 0] + [0, 0, 1, 0]]
    assert mb["targets"][0, :6].tolist() == seqs[0].tokens[1:]
    assert mb["weights"].unique().tolist() == [2.0] and mb["lengths"] == [7, 4]
    # THD: no [L, L] mask; each sequence its own segment of cu_seqlens, positions from 0
    assert "attention_mask" not in mb and mb["padding"] == 0
    assert mb["packed_seq_params"].qkv_format == "thd"
    assert mb["packed_seq_params"].cu_seqlens_q.tolist() == [0, 7, 11]
    assert mb["packed_seq_params"].cu_seqlens_q.dtype == torch.int32
    assert mb["packed_seq_params"].max_seqlen_q == 7
    assert mb["position_ids"].tolist() == [list(range(7)) + list(range(4))]
    # padded to a multiple of 4 (sequence parallelism at TP4): one padding sequence, no loss
    padded = micro_batch(seqs, [0, 2], device="cpu", multiple_of=4)
    assert padded["padding"] == 1 and padded["input_ids"].shape == (1, 12)
    assert padded["packed_seq_params"].cu_seqlens_q.tolist() == [0, 7, 11, 12]
    assert padded["loss_mask"][0, 11] == 0 and padded["weights"][0, 11] == 0
    assert torch.equal(padded["loss_mask"][:, :11], mb["loss_mask"]) and padded["lengths"] == [7, 4]
    assert micro_batch(seqs, [0, 2], device="cpu", multiple_of=11)["padding"] == 0
    assert torch.equal(micro_batch(seqs, [1], device="cpu")["input_ids"], torch.tensor([seqs[1].tokens]))
