#!/usr/bin/env python
"""megatron-core -> HF conversion (same as `megatron-opd convert mcore-to-hf`).

    torchrun --nproc-per-node 2 tools/convert_mcore_to_hf.py --mcore CKPT --out HF_DIR --tp 2
"""
import sys

from megatron_opd.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "mcore-to-hf", *sys.argv[1:]]))
