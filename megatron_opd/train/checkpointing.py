"""Training checkpoints: student weights, optimizer state, RNG, data position and config, written
to a staging directory, published by one rename, and only then named by the tracker file.

Layout of ``<run_dir>/checkpoints``::

    latest                 the tracker: name of the newest complete checkpoint (written last)
    step_00000100/         megatron_opd.json, model/ (loadable by `convert mcore-to-hf` and
                           `score`), optimizer/, rng/rank_*.pt, trainer_state.json, config.yaml
    .staging-step_.../     a save in progress (its writer holds .staging-step_....lock) or an
                           interrupted one: never picked, removed at the next start or save
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.checkpoint import mcore, publish
from megatron_opd.checkpoint.convert import write_hf_model
from megatron_opd.checkpoint.manifest import verify_manifest, write_manifest
from megatron_opd.checkpoint.publish import staging_lock, staging_name
from megatron_opd.checkpoint.trust import check_dist_checkpoint, load_plain
from megatron_opd.utils import atomic_write_text, log0, rank

TRACKER = "latest"
STATE_FILE = "trainer_state.json"
OPTIMIZER_SUBDIR = "optimizer"
VERIFY_MODES = ("hash", "size", "none")  # what loading checks of a checkpoint's manifest


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint the tracker names, if it exists and is complete; else None."""
    root = checkpoints_dir(run_dir)
    tracker = root / TRACKER
    if not tracker.is_file():
        return None
    path = root / tracker.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{tracker} names {path.name}, which is missing or incomplete")
    return path


def _rank0() -> bool:
    return dist.get_rank() == 0


def save_checkpoint(trainable, *, run_dir: str | Path, step: int, config_yaml: str,
                    extra_state: dict, keep_last: int, source_hf_dtype: str = "float32",
                    tokenizer_src: str | Path | None = None) -> Path:
    """Save (collective). The checkpoint becomes visible only once complete: files are written
    into a staging directory, a manifest of their sizes and hashes is added, the directory is
    renamed, and only then is the tracker updated."""
    root = checkpoints_dir(run_dir)
    name = step_dir_name(step)
    box = [staging_name(name) if _rank0() else None]
    dist.broadcast_object_list(box, src=0)
    staging = root / box[0]
    with staging_lock(staging) if _rank0() else contextlib.nullcontext():
        if _rank0():
            publish.remove_stale_staging(root, "step_")  # interrupted saves of earlier runs
            staging.mkdir()
            (staging / OPTIMIZER_SUBDIR).mkdir()
            (staging / "rng").mkdir()
        dist.barrier()
        model = trainable.model
        mcore.save_model(model, staging, extra_meta={"hf_dtype": source_hf_dtype})
        model_sd = model.module.sharded_state_dict()
        optim_sd = trainable.optimizer.sharded_state_dict(model_sd)
        mcore.dist_save(optim_sd, staging / OPTIMIZER_SUBDIR)
        torch.save(_rng_state(), staging / "rng" / f"rank_{dist.get_rank():05d}.pt")
        dist.barrier()
        if _rank0():
            (staging / "config.yaml").write_text(config_yaml)
            if tokenizer_src is not None and Path(tokenizer_src).is_dir():
                mcore.copy_tokenizer_files(tokenizer_src, staging)
            (staging / STATE_FILE).write_text(json.dumps({"step": step, **extra_state}, indent=2))
        dist.barrier()
        write_manifest(staging)
        if _rank0():
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            atomic_write_text(root / TRACKER, name + "\n")
            _prune(root, keep_last=keep_last, keep=name)
    dist.barrier()
    return root / name


def remove_stale_staging(run_dir: str | Path) -> None:
    """Remove the staging directories of saves that were interrupted (rank 0, at start)."""
    publish.remove_stale_staging(checkpoints_dir(run_dir), "step_")


def _prune(root: Path, *, keep_last: int, keep: str) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(trainable, path: str | Path, *, verify: str = "hash") -> dict:
    """Restore model, optimizer and this rank's RNG from ``path`` after checking its manifest
    (``verify``: hash, size or none); returns the trainer state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{path}: not a complete training checkpoint (no {STATE_FILE})")
    verify_manifest(path, mode=verify)
    meta = mcore.read_meta(path)
    model = trainable.model
    if meta["padded_vocab_size"] != model.padded_vocab_size:
        raise ValueError(f"{path}: padded vocabulary {meta['padded_vocab_size']} != the model's "
                         f"{model.padded_vocab_size} (was it saved with a different student?)")
    for part in (mcore.MODEL_SUBDIR, OPTIMIZER_SUBDIR):
        check_dist_checkpoint(path / part)
    loaded = dist_checkpointing.load(model.module.sharded_state_dict(), str(path / mcore.MODEL_SUBDIR))
    with torch.no_grad():
        model.module.load_state_dict(loaded, strict=True)
    optim_sd = trainable.optimizer.sharded_state_dict(model.module.sharded_state_dict(), is_loading=True)
    trainable.optimizer.load_state_dict(dist_checkpointing.load(optim_sd, str(path / OPTIMIZER_SUBDIR)))
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        _set_rng_state(load_plain(rng_file, "RNG state"))
    else:
        log0(f"{path}: no RNG state for this world size; RNG streams restart from the seed")
    return json.loads(state_file.read_text())


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """The trainer's checkpoints as the ``checkpoint`` config section asks: where a run resumes
    from, when it saves, and the final HF export."""

    def __init__(self, run_dir: str | Path, *, every: int, keep_last: int, resume: str, verify: str,
                 export_hf: bool, config_yaml: str, tokenizer_src: str | Path | None):
        self.run_dir = Path(run_dir)
        self.every, self.keep_last, self.resume, self.verify = every, keep_last, resume, verify
        self.export_hf, self.config_yaml, self.tokenizer_src = export_hf, config_yaml, tokenizer_src

    def restore(self, trainable) -> dict | None:
        """Load the checkpoint to resume from into ``trainable``; its trainer state, or None.
        Staging directories of interrupted saves are removed first (rank 0)."""
        if rank() == 0:
            remove_stale_staging(self.run_dir)
        if self.resume == "none":
            return None
        path = latest_checkpoint(self.run_dir) if self.resume == "auto" else Path(self.resume)
        if path is None:
            return None
        state = load_checkpoint(trainable, path, verify=self.verify)
        log0(f"resumed from {path} at step {int(state['step'])}")
        return state

    def due(self, done: int, total_steps: int) -> bool:
        """Whether to save after ``done`` steps (the last step is saved by :meth:`finish`)."""
        return bool(self.every) and done % self.every == 0 and done < total_steps

    def save(self, trainable, step: int, *, extra_state: dict) -> Path:
        path = save_checkpoint(trainable, run_dir=self.run_dir, step=step, config_yaml=self.config_yaml,
                               extra_state=extra_state, keep_last=self.keep_last, tokenizer_src=self.tokenizer_src)
        log0(f"saved {path}")
        return path

    def export(self, model) -> None:
        """The student as an HF model in ``<run_dir>/hf`` (fp32), when asked for."""
        if self.export_hf:
            write_hf_model(model, self.run_dir / "hf", dtype=torch.float32, max_shard_bytes=5 * 10**9, force=True,
                           tokenizer_src=self.tokenizer_src)
