"""`megatron-opd score` under torchrun (TP2 x PP2) against transformers, and its error messages."""

import json
import subprocess
import sys

import pytest
import torch

from megatron_opd.testing.tiny import write_jsonl


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
        # ids agree except where two candidates tie within float error
        ids = torch.tensor(row["topk_ids"])
        mismatch = ids != ref_ids
        assert (ref_vals.diff(dim=-1).abs()[mismatch[:, 1:]] < 1e-4).all() if mismatch.any() else True


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
    proc = _run(["score", "--model", model, "--input", str(inp), "--output", str(tmp_path / "o.jsonl")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"megatron-opd score: error: {expected}"
    assert not (tmp_path / "o.jsonl").exists()
