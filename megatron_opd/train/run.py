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
        lines.append(f"{name}: tp={m.tp} pp={m.pp} dp={dp} ({m.path})")
    return "\n".join(lines)


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world_size=world)
        print(cfg.to_yaml())
        print(describe_layouts(cfg, world))
        return 0
    from megatron_opd.train.loop import Trainer

    trainer = Trainer(cfg)
    log0("\n" + describe_layouts(cfg, trainer.mp.layout.tp * trainer.mp.layout.pp * trainer.mp.dp_size))
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0
