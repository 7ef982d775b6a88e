"""`megatron-opd score` under torchrun (TP2 x PP2) against transformers, and its error messages."""

import json
import re
import subprocess
import sys

import pytest
import torch

from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.utils import write_jsonl


def _run(args, nproc=1, timeout=300):
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "-m", "megatron_opd.cli"] if nproc > 1 else [sys.executable, "-m", "megatron_opd.cli"])
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout)


def _check_against_transformers(model_dir, seqs, rows, *, top_k=5, atol=1e-4):
    from transformers import AutoModelForCausalLM

    assert len(rows) == len(seqs)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for seq, row in zip(seqs, rows):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0, :-1].double(), dim=-1)
        ref = logp.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
        assert len(row["logprobs"]) == len(seq) - 1
        if len(seq) == 1:
            continue
        assert torch.allclose(torch.tensor(row["logprobs"], dtype=torch.float64), ref, atol=atol)
        ref_vals, ref_ids = logp.topk(top_k, dim=-1)
        assert torch.allclose(torch.tensor(row["topk_logprobs"], dtype=torch.float64), ref_vals, atol=atol)
        # each returned log-prob belongs to its id, and the ids are the reference's, except that
        # candidates whose log-probs tie within float error may come in either order
        ids = torch.tensor(row["topk_ids"])
        assert torch.allclose(logp.gather(-1, ids), ref_vals, atol=atol)
        for pos in range(len(seq) - 1):
            for j in range(top_k):
                if ids[pos, j] != ref_ids[pos, j]:
                    tied = (ref_vals[pos] - ref_vals[pos, j]).abs() < atol
                    assert int(ids[pos, j]) in ref_ids[pos][tied].tolist() or \
                        (logp[pos] - ref_vals[pos, j]).abs().lt(atol).sum() > 1, \
                        (pos, j, ids[pos], ref_ids[pos])


def _sequences(seed, num, max_len):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (int(n),), generator=g).tolist()
            for n in torch.randint(1, max_len, (num,), generator=g)]


@pytest.mark.slow
def test_score_matches_transformers_log_softmax_and_topk(tiny_models, tmp_path):
    model_dir = tiny_models["qwen2_tied"]
    seqs = _sequences(3, 9, 24)
    write_jsonl(tmp_path / "in.jsonl", [{"input_ids": s} for s in seqs])
    out = tmp_path / "out.jsonl"
    proc = _run(["score", "--model", model_dir, "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(out), "--top-k", "5", "--tp", "2", "--pp", "2",
                 "--micro-batch-tokens", "40"], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    _check_against_transformers(model_dir, seqs, rows)


def _score_packed_and_alone(model_dir, seqs, layouts, budget):
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.commands.score import score_sequences

    out = {}
    for tp, pp in layouts:
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(tp, pp), what="score")
        model = load_model(model_dir, mp)
        for tokens in (budget, 1):  # 1: every sequence in a micro-batch of its own
            out[(tp, pp, tokens)] = score_sequences(model, seqs, top_k=5, micro_batch_tokens=tokens,
                                                    show_progress=False)
    return out


@pytest.mark.slow
def test_packed_scoring_matches_transformers_and_unpacked_at_tp2_and_pp2(tiny_models):
    """Mistral (sliding window 6) at TP2 and PP2, two data-parallel replicas each: packs of up
    to 48 tokens match transformers, and match scoring every sequence alone, row by row."""
    model_dir = tiny_models["mistral"]
    seqs = _sequences(4, 14, 30) + [[7]]  # a length-1 sequence among others
    layouts = [(2, 1), (1, 2)]
    out = run_distributed(_score_packed_and_alone, 4, model_dir, seqs, layouts, 48, timeout=600)[0]
    for tp, pp in layouts:
        packed, alone = out[(tp, pp, 48)], out[(tp, pp, 1)]
        _check_against_transformers(model_dir, seqs, packed)
        for p, a in zip(packed, alone):
            assert p.keys() == a.keys()
            assert torch.allclose(torch.tensor(p["logprobs"]), torch.tensor(a["logprobs"]), atol=1e-5)
            assert torch.allclose(torch.tensor(p["topk_logprobs"]), torch.tensor(a["topk_logprobs"]),
                                  atol=1e-5)


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


def test_micro_batches_pack_sequences_within_the_token_budget():
    from megatron_opd.commands.score import make_micro_batches

    seqs = [[1] * n for n in (5, 1, 9, 3, 3, 8, 14)]
    batches = make_micro_batches(seqs, list(range(7)), micro_batch_tokens=12, device="cpu")
    assert sorted(i for b in batches for i in b["indices"]) == list(range(7))
    for b in batches:
        assert b["lengths"] == [len(seqs[i]) for i in b["indices"]]
        assert b["input_ids"].shape == (1, sum(b["lengths"]))
        assert sum(b["lengths"]) <= 12 or len(b["indices"]) == 1
        assert b["position_ids"].tolist() == [[p for n in b["lengths"] for p in range(n)]]
        assert b["packed_seq_params"].cu_seqlens_q.tolist() == \
            [sum(b["lengths"][:k]) for k in range(len(b["lengths"]) + 1)]
    # under sequence parallelism at TP4: each row padded by a sequence of its own to a multiple of 4
    for b in make_micro_batches(seqs, list(range(7)), micro_batch_tokens=12, device="cpu", multiple_of=4):
        total = sum(b["lengths"])
        assert b["input_ids"].shape[1] % 4 == 0 and b["input_ids"].shape[1] - total < 4
        assert b["input_ids"][0, total:].tolist() == [0] * (b["input_ids"].shape[1] - total)
        cu = b["packed_seq_params"].cu_seqlens_q.tolist()
        assert cu[-1] == b["input_ids"].shape[1] and cu[len(b["lengths"])] == total


def _scoring_peak_bytes(model_dir, tokens_per_pack, seq_len):
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.commands.score import score_sequences
    from megatron_opd.testing.memory import peak_extra_bytes

    torch.set_num_threads(1)
    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(1, 1), what="score")
    model = load_model(model_dir, mp)
    g = torch.Generator().manual_seed(0)
    peaks = {}
    score_sequences(model, [[1, 2, 3]] * 4, show_progress=False)  # warm-up
    for tokens in tokens_per_pack:
        seqs = torch.randint(0, 300, (tokens // seq_len, seq_len), generator=g).tolist()
        peaks[tokens] = peak_extra_bytes(
            lambda: score_sequences(model, seqs, micro_batch_tokens=tokens, show_progress=False))
    return peaks


def test_scoring_memory_per_token_stays_flat_from_2k_to_16k_packs(tiny_models):
    """A 16k-token pack of 64-token sequences takes less than 2x the peak memory per token of a
    2k-token pack (the dense [L, L] mask path grew 8x per token: 64x in all)."""
    peaks = run_distributed(_scoring_peak_bytes, 1, tiny_models["llama"], [2048, 16384], 64, timeout=300)[0]
    per_token = {t: p / t for t, p in peaks.items()}
    assert per_token[16384] < 2 * per_token[2048], peaks
