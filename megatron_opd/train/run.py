"""`megatron-opd train`: parse the recipe, build, train, close."""

from __future__ import annotations

import os

from megatron_opd.config import load_config
from megatron_opd.utils import log0


def describe_layouts(cfg, world_size: int) -> str:
    lines = [f"world size {world_size}"]
    for name, m in (("student", cfg.student), ("teacher", cfg.teacher)):
        if name == "teacher" and cfg.teacher.served_url:
            lines.append(f"teacher: served at {cfg.teacher.served_url}")
            continue
        dp = world_size // (m.tp * m.pp)
        experts = f" ep={m.ep} (expert dp={world_size // (m.pp * m.ep * m.tp)})" if m.ep > 1 else ""
        lines.append(f"{name}: tp={m.tp} pp={m.pp} dp={dp}{experts} ({m.path})")
    return "\n".join(lines)


def dry_run(cfg, world: int) -> tuple[str, bool]:
    """Validate for ``world`` GPUs and describe the layouts, per-GPU and host memory (no GPU
    needed); (the text, whether the plan fits)."""
    from pathlib import Path

    from megatron_opd.memory import estimate, fits, format_table, host_table
    from megatron_opd.models.config import ArchConfig

    cfg.validate(world_size=world)
    out = [cfg.to_yaml(), describe_layouts(cfg, world)]
    archs = {}
    for name, m in (("student", cfg.student), ("teacher", cfg.teacher)):
        if not m.path:
            continue
        if not (Path(m.path) / "config.json").is_file():
            out.append(f"{name}: no config.json at {m.path}; memory not estimated")
            continue
        arch = ArchConfig.from_hf_dir(m.path)
        arch.check_parallel(tp=m.tp, pp=m.pp, ep=m.ep, what=name)
        archs[name] = arch
    dp = world // (cfg.student.tp * cfg.student.pp)
    if cfg.train.prompts_per_step < dp:
        raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} is smaller than the "
                         f"student's data-parallel size {dp}")
    ok = True
    if "student" in archs:
        rows = estimate(cfg, archs["student"], archs.get("teacher"), world_size=world)
        out.append(format_table(rows, gpu_memory_gb=cfg.train.gpu_memory_gb))
        host, host_ok = host_table(cfg, archs["student"], archs.get("teacher"), world_size=world,
                                   host_memory_gb=cfg.train.host_memory_gb)
        out.append(host)
        ok = fits(rows, gpu_memory_gb=cfg.train.gpu_memory_gb) and host_ok
    return "\n".join(out), ok


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        text, ok = dry_run(cfg, world)
        print(text)
        if not ok:
            log0("dry run: the plan does not fit (see the memory lines above)")
        return 0 if ok else 1
    from megatron_opd.train.loop import Trainer

    trainer = Trainer(cfg)
    log0("\n" + describe_layouts(cfg, trainer.mp.layout.tp * trainer.mp.layout.pp * trainer.mp.dp_size))
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0
