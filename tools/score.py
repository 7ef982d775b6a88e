#!/usr/bin/env python
"""Per-token log-probs and top-k (same as `megatron-opd score`)."""
import sys

from megatron_opd.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
