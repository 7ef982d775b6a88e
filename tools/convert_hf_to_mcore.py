#!/usr/bin/env python
"""HF -> megatron-core conversion (same as `megatron-opd convert hf-to-mcore`).

    torchrun --nproc-per-node 4 tools/convert_hf_to_mcore.py --hf HF_DIR --out OUT --tp 2 --pp 2
"""
import sys

from megatron_opd.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-mcore", *sys.argv[1:]]))
