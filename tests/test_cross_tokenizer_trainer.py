"""The trainer with a teacher that has its own tokenizer (loss.cross_tokenizer=span): the char-level
student at TP 2 distils from a teacher that reads the task in digit pairs at TP 1. The first step's
loss and divergence equal a float64 reference built from transformers on both models (each text
scored through each model's own tokenization, spans from the tokens' strings), and later steps stay
finite with every trained token in an aligned span."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_opd.config import load_config
from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny_task import add_pair_teacher, base_overrides

pytestmark = pytest.mark.vllm

STEPS = 3


def xtok_overrides(root: Path, run_dir: Path, steps: int) -> list[str]:
    return base_overrides(root, run_dir, steps) + [
        f"teacher.path={root / 'teacher_pairs'}", "teacher.tp=1", "loss.kind=sampled_reverse_kl",
        "loss.cross_tokenizer=span", "loss.min_aligned_fraction=0.9"]


def _train_cross_tokenizer(root: str, run_dir: str) -> dict:
    from megatron_opd import parallel
    from megatron_opd.train.data import pack_micro_batches
    from megatron_opd.train.loop import Trainer
    from megatron_opd.train.metrics import step_metrics

    trainer = Trainer(load_config(None, xtok_overrides(Path(root), Path(run_dir), STEPS)))
    # Step 0 by its phases, to keep its sequences for the reference.
    seqs = trainer.rollouts.for_step(0)
    mbs = pack_micro_batches(seqs, budget=trainer.cfg.data.micro_batch_tokens, device=parallel.device())
    signals = trainer.teacher.signals(mbs, trainer.mp)
    update = trainer.update_student(0, mbs, signals)
    first = step_metrics(update.outputs, seqs, trainer.mp)
    trainer.sync.sync(trainer.engine)
    later = [trainer.step(step) for step in range(1, STEPS)]
    trainer.close()
    return {"seqs": [(s.tokens, s.prompt_len) for s in seqs], "first": first,
            "later": [{k: v for k, v in m.items() if isinstance(v, float)} for m in later]}


def _units(tok, ids: list[int]) -> list[str]:
    """Each token's text, a special token as one unit of its own."""
    special = set(tok.all_special_ids)
    return ["\0" if i in special else tok.convert_ids_to_tokens(i) for i in ids]


def _teacher_ids(s_tok, t_tok, completion: list[int]) -> list[int]:
    """The teacher's tokenization of the student's completion: its own encoding of each run of text,
    the student's <eos> / <pad> as the teacher's </s> / <pad>."""
    out, run = [], ""
    for i in completion:
        if i in s_tok.all_special_ids:
            out += t_tok(run, add_special_tokens=False)["input_ids"] if run else []
            run = ""
            out.append(t_tok.eos_token_id if i == s_tok.eos_token_id else t_tok.pad_token_id)
        else:
            run += s_tok.convert_ids_to_tokens(i)
    return out + (t_tok(run, add_special_tokens=False)["input_ids"] if run else [])


def _ends(units: list[str]) -> list[int]:
    ends, pos = [], 0
    for u in units:
        pos += len(u)
        ends.append(pos)
    return ends


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1))[:, 0]


def reference(root: Path, seqs) -> tuple[float, float, int]:
    """(sum over trained tokens of the per-token loss, sum of the span log-ratios, trained tokens) in
    float64: per span, the student's log-probs of its characters minus the teacher's of its tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = [AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float64).eval()
              for name in ("student", "teacher_pairs")]
    s_tok, t_tok = (AutoTokenizer.from_pretrained(root / name) for name in ("student", "teacher_pairs"))
    loss, divergence, tokens = 0.0, 0.0, 0
    for ids, p_len in seqs:
        completion = ids[p_len:]
        t_prompt = t_tok(s_tok.decode(ids[:p_len]), add_special_tokens=False)["input_ids"]
        t_completion = _teacher_ids(s_tok, t_tok, completion)
        with torch.no_grad():
            s_lp = _logprobs(models[0], ids)[p_len - 1:]
            t_lp = _logprobs(models[1], t_prompt + t_completion)[len(t_prompt) - 1:]
        s_ends, t_ends = _ends(_units(s_tok, completion)), _ends(_units(t_tok, t_completion))
        assert s_ends[-1] == t_ends[-1]
        bounds = sorted(set(s_ends) & set(t_ends))
        s_span = [bounds.index(next(b for b in bounds if b >= e)) for e in s_ends]
        t_span = [bounds.index(next(b for b in bounds if b >= e)) for e in t_ends]
        ratio = torch.zeros(len(bounds), dtype=torch.float64)
        ratio.index_add_(0, torch.tensor(s_span), s_lp)
        ratio.index_add_(0, torch.tensor(t_span), -t_lp)
        loss += float((ratio[s_span] * s_lp).sum())
        divergence += float(ratio.sum())
        tokens += len(completion)
    return loss, divergence, tokens


def test_cross_tokenizer_trainer_matches_reference(task_dir, tmp_path):
    add_pair_teacher(task_dir)
    out = run_distributed(_train_cross_tokenizer, 2, str(task_dir), str(tmp_path / "run"), timeout=900)[0]
    first = out["first"]
    loss, divergence, tokens = reference(task_dir, out["seqs"])
    assert first["loss_tokens"] == tokens
    assert first["xtok/span_coverage"] == 1.0
    assert math.isclose(first["loss"], loss / tokens, rel_tol=1e-5, abs_tol=1e-6), (first["loss"], loss / tokens)
    assert math.isclose(first["divergence"], divergence / tokens, rel_tol=1e-5, abs_tol=1e-6), \
        (first["divergence"], divergence / tokens)
    assert abs(divergence) > 0.1  # a real signal: two random models disagree
    for m in out["later"]:
        assert m["skipped_steps"] == 0 and m["xtok/span_coverage"] > 0.9, m
        assert all(math.isfinite(m[k]) for k in ("loss", "divergence", "grad_norm")) and m["grad_norm"] > 0, m
        assert m["rollout/logprob_abs_diff_max"] <= 1e-4, m


def _served_and_in_process(root: str, served_url: str, work: str) -> dict:
    import json

    from megatron_opd.train.loop import Trainer

    root, work = Path(root), Path(work)
    engine, out = None, {}
    for name, teacher in (("served", [f"teacher.served_url={served_url}", "teacher.served_model=tiny-teacher"]),
                          ("in_process", [])):
        overrides = xtok_overrides(root, work / name, 2) + ["loss.top_k=1", *teacher]
        trainer = Trainer(load_config(None, overrides), engine=engine)
        engine = trainer.engine
        trainer.train()
        trainer.close()
        rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        out[name] = {r["step"]: (r["loss"], r["divergence"]) for r in rows}
    return out


def test_served_teacher_with_its_own_tokenizer_matches_the_in_process_one(task_dir, tmp_path):
    """A `vllm serve` of the digit-pair teacher scores the teacher's tokens of every rollout: the
    losses equal those of the same teacher in process (teacher.path holds its tokenizer)."""
    import test_served_teacher
    from test_served_teacher import Server

    add_pair_teacher(task_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_served_teacher, "MAX_MODEL_LEN", 32)  # the teacher's positions
        server = Server(str(task_dir / "teacher_pairs"), tmp_path / "server.log")
    try:
        server.wait_ready(240)
        out = run_distributed(_served_and_in_process, 2, str(task_dir), server.url, str(tmp_path / "runs"),
                              timeout=900, env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})[0]
    finally:
        server.stop()
    served, local = out["served"], out["in_process"]
    assert sorted(served) == sorted(local) == [1, 2]
    for step in (1, 2):
        for a, b in zip(served[step], local[step]):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (served, local)
    assert abs(local[1][1]) > 0.1  # a real signal
