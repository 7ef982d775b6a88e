"""`megatron-opd train`: parse the recipe, build, train, close (or, with ``--dry-run``, plan)."""

from __future__ import annotations

import os

from megatron_opd.config import load_config
from megatron_opd.train.dry_run import describe_layouts, dry_run
from megatron_opd.train.loop import Trainer
from megatron_opd.utils import log0


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        text, ok = dry_run(cfg, world)
        print(text)
        if not ok:
            log0("dry run: the plan does not fit (see the memory lines above)")
        return 0 if ok else 1
    trainer = Trainer(cfg)
    log0("\n" + describe_layouts(cfg, trainer.mp.layout.tp * trainer.mp.layout.pp * trainer.mp.dp_size))
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0
