"""`megatron-opd score` under torchrun (TP2 x PP2) against transformers, and its error messages."""

import json
import subprocess
import sys

import pytest
import torch

from megatron_opd.utils import write_jsonl


def _run(args, nproc=1, timeout=300):
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "-m", "megatron_opd.cli"] if nproc > 1 else [sys.executable, "-m", "megatron_opd.cli"])
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout)


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


# (an unknown model_type and a layout that does not divide the world size have unit tests in
# test_config_errors.py: the same messages)
@pytest.mark.parametrize("case", ["missing_model", "bad_jsonl", "missing_input", "heads_not_divisible"])
def test_score_errors_are_one_line_naming_the_culprit(tiny_models, tmp_path, case):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [1, 2, 3]}])
    model = tiny_models["llama"]
    if case == "missing_model":
        model = str(tmp_path / "nope")
        expected = f"{tmp_path / 'nope'}: model directory does not exist"
    elif case == "bad_jsonl":
        inp.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, 999]}\n')
        expected = f"{inp}:2: token id 999 is outside the vocabulary [0, 300)"
    elif case == "missing_input":
        inp = tmp_path / "absent.jsonl"
        expected = f"{inp}: input file does not exist"
    layout = ["--tp", "4"] if case == "heads_not_divisible" else []
    if case == "heads_not_divisible":  # 4 query heads, 2 KV heads: tp=4 cannot split the KV heads
        expected = "num_key_value_heads=2 is not divisible by tp=4"
    proc = _run(["score", "--model", str(model), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                 *layout])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-opd score: error: ") and expected in last, last
    assert not (tmp_path / "o.jsonl").exists()
