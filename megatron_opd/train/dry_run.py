"""`megatron-opd train --dry-run`: validate a recipe for a cluster (no GPU needed) and describe its
layouts, per-GPU memory and host memory."""

from __future__ import annotations

from pathlib import Path

from megatron_opd.config import Config
from megatron_opd.models.config import ArchConfig
from megatron_opd.train.memory import estimate, fits, format_table, host_table


def describe_layouts(cfg: Config, world_size: int) -> str:
    lines = [f"world size {world_size}"]
    for name, m in (("student", cfg.student), ("teacher", cfg.teacher)):
        if name == "teacher" and cfg.teacher.served_url:
            lines.append(f"teacher: served at {cfg.teacher.served_url}")
            continue
        dp = world_size // (m.tp * m.pp)
        experts = f" ep={m.ep} (expert dp={m.layout.expert_data_parallel_size(world_size)})" if m.ep > 1 else ""
        lines.append(f"{name}: tp={m.tp} pp={m.pp} dp={dp}{experts} ({m.path})")
    return "\n".join(lines)


def dry_run(cfg: Config, world: int) -> tuple[str, bool]:
    """Validate for ``world`` GPUs and describe the layouts, per-GPU and host memory; (the text,
    whether the plan fits)."""
    cfg.validate(world_size=world)
    out = [cfg.to_yaml(), describe_layouts(cfg, world)]
    archs = {}
    for name, m in (("student", cfg.student), ("teacher", cfg.teacher)):
        if not m.path:
            continue
        if not (Path(m.path) / "config.json").is_file():
            out.append(f"{name}: no config.json at {m.path}; memory not estimated")
            continue
        archs[name] = ArchConfig.from_hf_dir(m.path)
    if "student" in archs:
        cfg.check_models(archs["student"], archs.get("teacher"))
    elif "teacher" in archs:
        archs["teacher"].check_parallel(tp=cfg.teacher.tp, pp=cfg.teacher.pp, ep=cfg.teacher.ep, what="teacher")
    ok = True
    if "student" in archs:
        rows = estimate(cfg, archs["student"], archs.get("teacher"), world_size=world)
        out.append(format_table(rows, gpu_memory_gb=cfg.train.gpu_memory_gb))
        host, host_ok = host_table(cfg, archs["student"], archs.get("teacher"), world_size=world,
                                   host_memory_gb=cfg.train.host_memory_gb)
        out.append(host)
        ok = fits(rows, gpu_memory_gb=cfg.train.gpu_memory_gb) and host_ok
    return "\n".join(out), ok
