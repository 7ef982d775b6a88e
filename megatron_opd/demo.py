"""`make demo`: the main job on an embedded default, built locally with nothing downloaded.

Until the OPD trainer lands this scores text with a tiny Llama at TP=2 through
`megatron-opd score` under torchrun, and prints each token's log-probability.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN_DIR = Path("runs/demo")
TEXTS = ["the student learns from the teacher", "distill the model answer 123"]


def main() -> int:
    from transformers import AutoTokenizer

    from megatron_opd.testing.tiny import make_hf_model, make_sentencepiece_tokenizer, write_jsonl

    model_dir = RUN_DIR / "tiny-llama"
    if not (model_dir / "config.json").exists():
        make_hf_model(model_dir, "llama", tie_word_embeddings=True)
        make_sentencepiece_tokenizer(model_dir, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [{"input_ids": tok(t)["input_ids"]} for t in TEXTS]
    write_jsonl(RUN_DIR / "input.jsonl", rows)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m",
           "megatron_opd.cli", "score", "--model", str(model_dir), "--input",
           str(RUN_DIR / "input.jsonl"), "--output", str(RUN_DIR / "scores.jsonl"),
           "--top-k", "3", "--tp", "2", "--force"]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    for row, scored in zip(rows, (RUN_DIR / "scores.jsonl").read_text().splitlines()):
        logprobs = json.loads(scored)["logprobs"]
        pieces = tok.convert_ids_to_tokens(row["input_ids"])
        print(" ".join(f"{p}({lp:.2f})" for p, lp in zip(pieces[1:], logprobs)))
    print(f"wrote {RUN_DIR / 'scores.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
