"""A tiny OPD set-up for trainer tests: arithmetic data and random student/teacher models in the
demo's shapes (no warm start), plus the recipe overrides that make a run take seconds."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_opd.tasks import arithmetic as task
from megatron_opd.utils import read_jsonl


def make_task_dir(root: str | Path, *, num_train: int = 2000) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(root)
    task.write_datasets(root, num_train=num_train, num_eval=64)
    # Multi-turn rows: after the model's first answer, a scripted "tool" turn (never trained on);
    # a per-row weight of 0 (loss.weight_field=weight) must silence the loss.
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()[:200]]
    with (root / "train_tools.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt_ids": task.encode(r["prompt"]), "weight": 0.0,
                                "tool_responses": [task.encode("=" + r["answer"][:2])]}) + "\n")
    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**task.llama_config(hidden=64, heads=2, layers=2)))
        model.save_pretrained(root / name)
        task.make_tokenizer(root / name)
    return root


def add_pair_teacher(root: str | Path, *, seed: int = 2) -> Path:
    """A random teacher in the demo's student shape that reads the task in digit pairs
    (``make_pair_tokenizer``: another vocabulary, other ids, EOS ``</s>``), at ``root/teacher_pairs``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(root) / "teacher_pairs"
    enc = task.ENCODINGS["pairs"]
    torch.manual_seed(seed)
    config = task.llama_config(hidden=64, heads=2, layers=2, vocab_size=enc.vocab_size, eos_id=enc.eos_id)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).save_pretrained(out)
    enc.make_tokenizer(out)
    return out


def base_overrides(root: str | Path, run_dir: str | Path, steps: int) -> list[str]:
    root = Path(root)
    return [f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}",
            f"data.train_path={root / 'train.jsonl'}", f"data.eval_path={root / 'eval.jsonl'}",
            f"train.run_dir={run_dir}", f"train.steps={steps}", "train.prompts_per_step=16",
            "student.tp=2", "teacher.tp=2", "data.micro_batch_tokens=104", "rollout.max_new_tokens=5",
            "rollout.kv_cache_gb=0.0625", "rollout.bucket_mb=1", "optim.lr=3e-3", "optim.decay=constant",
            "logging.tensorboard=false", "logging.progress_bar=false", "eval.every=0",
            "rollout.mismatch_threshold=1e-4"]


def losses(run_dir: str | Path) -> dict:
    """step -> (loss, grad_norm, trainer-vs-rollout mismatch) from a run's metrics.jsonl."""
    rows = [row for _, row in read_jsonl(Path(run_dir) / "metrics.jsonl")]
    return {r["step"]: (r["loss"], r["grad_norm"], r.get("rollout/logprob_abs_diff_max")) for r in rows if "loss" in r}
