"""`megatron-opd train --dry-run`: validate a recipe for a cluster (no GPU needed), describe its
layouts, per-GPU memory and host memory, and rehearse the step of each rank role on fake tensors."""

from __future__ import annotations

from pathlib import Path

from megatron_opd.config import Config
from megatron_opd.models.config import ArchConfig
from megatron_opd.train.memory import MemoryRow, estimate, fits, format_table, host_table
from megatron_opd.train.rehearsal import RoleReport, rehearsal_ranks, rehearse_rank

# How far a measured part may stray from the estimate before the dry run points at the docs.
TOLERANCE = 0.2


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


def dry_run(cfg: Config, world: int, *, rehearse: bool = True) -> tuple[str, bool]:
    """Validate for ``world`` GPUs and describe the layouts, per-GPU and host memory, then (with
    ``rehearse``) run the step of each rank role on fake tensors and print what it measured beside
    the estimate; (the text, whether the plan fits)."""
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
    phases = cfg.phases()
    rows = None
    for ph in phases:
        if len(phases) > 1:
            c = ph.config
            out.append(f"phase {ph.index}: steps {ph.start + 1}-{ph.end}, loss.kind={c.loss.kind}, "
                       f"rollout.lmbda={c.rollout.lmbda}, rollout.n={c.rollout.n}, "
                       f"rollout.steps_per_generation={c.rollout.steps_per_generation}, optim.lr={c.optim.lr}")
        if "student" in archs:
            rows = estimate(ph.config, archs["student"], archs.get("teacher"), world_size=world)
            out.append(format_table(rows, gpu_memory_gb=cfg.train.gpu_memory_gb))
            host, host_ok = host_table(ph.config, archs["student"], archs.get("teacher"), world_size=world,
                                       host_memory_gb=cfg.train.host_memory_gb)
            out.append(host)
            ok = ok and fits(rows, gpu_memory_gb=cfg.train.gpu_memory_gb) and host_ok
    if rows is not None:
        moe = [name for name, arch in archs.items() if arch.is_moe]
        if rehearse and moe:
            out.append(f"rehearsal: not run: the {' and '.join(moe)} {'is a' if len(moe) == 1 else 'are'} "
                       "mixture of experts, whose token dispatch reads counts on the host, which fake "
                       "tensors cannot give yet; the memory above is the estimate alone")
        elif rehearse:
            print("\n".join(out), flush=True)  # the plan first: the rehearsal takes a while
            out = []
            reports = [rehearse_rank(cfg, archs["student"], archs.get("teacher"), rank=r, world_size=world)
                       for r in rehearsal_ranks(cfg, world)]
            text, measured_ok = rehearsal_table(reports, rows, gpu_memory_gb=cfg.train.gpu_memory_gb)
            out.append(text)
            ok = ok and measured_ok
    return "\n".join(out), ok


def _compare(what: str, measured: float | None, estimated: float | None) -> str:
    m = "-" if measured is None else f"{measured:10.2f}"
    e = "-" if estimated is None else f"{estimated:10.2f}"
    flag = ""
    if measured is not None and estimated is not None and max(measured, estimated) > 0.01:
        off = abs(measured - estimated) / max(estimated, 1e-9)
        flag = f"  {off:+.0%}".replace("+", "") + (" OFF" if off > TOLERANCE else "")
    return f"  {what:48s} {m:>10s} {e:>10s}{flag}"


def rehearsal_table(reports: list[RoleReport], rows: list[MemoryRow], *, gpu_memory_gb: float) -> tuple[str, bool]:
    """What each rank's rehearsal measured beside the estimate, per GPU in GiB; (text, fits)."""
    student = rows[0]
    teacher = rows[1] if len(rows) > 1 else None
    lines = ["rehearsal: one training step per rank role on fake tensors (nothing allocated; the engine "
             "stays analytic: vLLM cannot run on fake tensors)"]
    ok = True
    for r in reports:
        m = r.measured
        stage = f"student stage {r.student_stage}" + (f", teacher stage {r.teacher_stage}" if r.teacher_stage is not None else "")
        lines.append(f"rank {r.rank} ({stage}), {r.seconds:.0f} s{'; ' + '; '.join(r.notes) if r.notes else ''}")
        lines.append(f"  {'per GPU, GiB':48s} {'measured':>10s} {'estimated':>10s}")
        lines.append(_compare("student parameters", m.get("student parameters"), student.parameters))
        lines.append(_compare("student gradients", m.get("student gradients"), student.gradients))
        lines.append(_compare("student optimizer", m.get("student optimizer"), student.optimizer))
        lines.append(_compare("student activations + logits (peak)", m.get("student update peak"),
                              student.activations + student.logits))
        if teacher is not None:
            lines.append(_compare("teacher parameters", m.get("teacher parameters"), teacher.parameters))
            lines.append(_compare("teacher forward (peak)", m.get("teacher forward peak"),
                                  teacher.activations + teacher.logits))
        for part in ("micro-batches", "weight sync peak"):
            if part in m:
                lines.append(_compare(part, m[part], None))
        if "peak of the step" in m:
            planned = sum(row.total for row in rows) - student.engine
            lines.append(_compare("peak of the step (estimate: all but the engine)", m["peak of the step"], planned))
            total = m["peak of the step"] + student.engine
            fits_here = total <= gpu_memory_gb
            ok = ok and fits_here
            lines.append(f"  with the rollout engine's budget ({student.engine:.2f}): {total:.2f} GiB, "
                         f"{'fits' if fits_here else 'DOES NOT FIT'} in {gpu_memory_gb:g} GiB (train.gpu_memory_gb)")
    if any(" OFF" in line for line in lines):
        lines.append(f"parts marked OFF differ from the estimate by more than {TOLERANCE:.0%}: docs/gpu.md says "
                     "where the estimate and the code part ways")
    return "\n".join(lines), ok
