"""`megatron-opd score` under torchrun (TP2 x PP2) against transformers, and its error messages."""

import json
import re
import subprocess
import sys

import pytest
import torch

from megatron_opd.utils import write_jsonl


def _run(args, nproc=1, timeout=300):
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "-m", "megatron_opd.cli"] if nproc > 1 else [sys.executable, "-m", "megatron_opd.cli"])
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_score_matches_transformers_log_softmax_and_topk(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models["qwen2_tied"]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 300, (int(n),), generator=g).tolist()
            for n in torch.randint(1, 24, (9,), generator=g)]
    write_jsonl(tmp_path / "in.jsonl", [{"input_ids": s} for s in seqs])
    out = tmp_path / "out.jsonl"
    proc = _run(["score", "--model", model_dir, "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(out), "--top-k", "5", "--tp", "2", "--pp", "2",
                 "--max-tokens", "40"], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(seqs)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for seq, row in zip(seqs, rows):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0, :-1].double(), dim=-1)
        ref = logp.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
        assert len(row["logprobs"]) == len(seq) - 1
        if len(seq) == 1:
            continue
        assert torch.allclose(torch.tensor(row["logprobs"], dtype=torch.float64), ref, atol=1e-4)
        ref_vals, ref_ids = logp.topk(5, dim=-1)
        assert torch.allclose(torch.tensor(row["topk_logprobs"], dtype=torch.float64), ref_vals, atol=1e-4)
        # each returned log-prob belongs to its id, and the ids are the reference's, except that
        # candidates whose log-probs tie within float error may come in either order
        ids = torch.tensor(row["topk_ids"])
        assert torch.allclose(logp.gather(-1, ids), ref_vals, atol=1e-4)
        for pos in range(len(seq) - 1):
            for j in range(5):
                if ids[pos, j] != ref_ids[pos, j]:
                    tied = (ref_vals[pos] - ref_vals[pos, j]).abs() < 1e-4
                    assert int(ids[pos, j]) in ref_ids[pos][tied].tolist() or \
                        (logp[pos] - ref_vals[pos, j]).abs().lt(1e-4).sum() > 1, (pos, j, ids[pos], ref_ids[pos])


# The command's error path before and after the model is built; the messages of the others (a
# missing input, bad JSONL lines, an unknown model_type, a layout that does not split the model)
# have unit tests: test_token_jsonl_errors_name_the_file_and_line, test_config_errors.py.
@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_model", "bad_jsonl"])
def test_score_errors_are_one_line_naming_the_culprit(tiny_models, tmp_path, case):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [1, 2, 3]}])
    model = tiny_models["llama"]
    if case == "missing_model":
        model = str(tmp_path / "nope")
        expected = f"{tmp_path / 'nope'}: model directory does not exist"
    else:
        inp.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, 999]}\n')
        expected = f"{inp}:2: token id 999 is outside the vocabulary [0, 300)"
    proc = _run(["score", "--model", str(model), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-opd score: error: ") and expected in last, last
    assert not (tmp_path / "o.jsonl").exists()


def test_token_jsonl_errors_name_the_file_and_line(tmp_path):
    from megatron_opd.commands.score import read_token_jsonl

    path = tmp_path / "in.jsonl"
    assert read_token_jsonl(write_jsonl(path, [{"input_ids": [1, 2]}, {"input_ids": [3]}]), vocab_size=5) == [[1, 2], [3]]
    for text, message in (('{"input_ids": [1]}\n{"input_ids": [1, 9]}\n', ":2: token id 9 is outside the vocabulary [0, 5)"),
                          ('{"input_ids": []}\n', ':1: expected {"input_ids": [int, ...]} with at least one token'),
                          ("[1, 2]\n", ":1: each line must be a JSON object"),
                          ("{oops\n", ":1: not valid JSON")):
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{path}{message}")):
            read_token_jsonl(path, vocab_size=5)
    with pytest.raises(ValueError, match="input file does not exist"):
        read_token_jsonl(tmp_path / "absent.jsonl", vocab_size=5)


def test_micro_batches_group_by_length_within_the_token_budget():
    from megatron_opd.commands.score import make_micro_batches

    seqs = [[1] * n for n in (5, 1, 9, 3, 3, 8)]
    batches = make_micro_batches(seqs, [0, 1, 2, 3, 4, 5], max_tokens=12, device="cpu")
    assert sorted(i for b in batches for i in b["indices"]) == list(range(6))
    for b in batches:
        rows, length = b["input_ids"].shape
        assert rows * length <= 12 or rows == 1
        assert length == max(len(seqs[i]) for i in b["indices"])
        assert b["position_ids"].tolist() == [list(range(length))] * rows
