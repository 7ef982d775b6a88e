"""Checkpoints cannot run code: a pickle payload planted in any pickled file we load (RNG states,
megatron's .metadata, common.pt, a bytes item inside a .distcp file) is refused, naming the file,
and never executed; signed manifests refuse a checkpoint changed after it was written; saving
starts no process (nothing can be orphaned when a rank dies mid-save)."""

import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron_opd.testing.multiprocess import run_distributed


class Payload:
    """What a hostile checkpoint would hold: unpickling it creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _plant(ckpt: Path, target: str, marker: str) -> Path:
    """Plant a payload in ``target`` of the checkpoint at ``ckpt``; the victim file's path."""
    from megatron_opd.checkpoint.trust import read_dcp_metadata

    if target == "rng":
        victim = ckpt / "rng" / "rank_00000.pt"
        state = torch.load(victim, weights_only=True)
        state["extra"] = Payload(marker)
        torch.save(state, victim)
        return victim
    part, what = target.split(":")
    directory = ckpt / part
    if what == "metadata":
        victim = directory / ".metadata"
        victim.write_bytes(pickle.dumps(Payload(marker)))
    elif what == "common":
        victim = directory / "common.pt"
        torch.save(Payload(marker), victim)
    else:  # a bytes item of a .distcp file, re-pointed at a payload appended to its file
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        meta = read_dcp_metadata(directory / ".metadata")
        index, info = next((i, s) for i, s in meta.storage_data.items()
                           if isinstance(meta.state_dict_metadata[i.fqn], BytesStorageMetadata))
        victim = directory / info.relative_path
        import io

        buf = io.BytesIO()
        torch.save(Payload(marker), buf)
        info.offset, info.length = victim.stat().st_size, len(buf.getvalue())
        with victim.open("ab") as f:
            f.write(buf.getvalue())
        (directory / ".metadata").write_bytes(pickle.dumps(meta))
    return victim


TARGETS = ["rng", "model:metadata", "model:common", "model:bytes_item", "optimizer:metadata",
           "optimizer:common"]


def _refuse_processes():
    """Make starting a process fail (fork, and spawn/forkserver's fork_exec); returns an undo."""
    import multiprocessing.util
    import os

    saved = os.fork, multiprocessing.util.spawnv_passfds

    def refuse(*args, **kwargs):
        raise AssertionError("a process was started")

    os.fork = multiprocessing.util.spawnv_passfds = refuse

    def undo():
        os.fork, multiprocessing.util.spawnv_passfds = saved
    return undo


def _checkpoint_checks(hf_dir: str, work: str) -> dict:
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.checkpoint.manifest import write_manifest
    from megatron_opd.train import checkpointing
    from megatron_opd.config import OptimConfig
    from megatron_opd.train.optim import optimizer_step

    work = Path(work)
    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(1, 1))
    trainable = OptimConfig(lr=1e-3).build(load_model(hf_dir, mp), total_steps=1)
    for p in trainable.model.module.parameters():  # one step, so that the optimizer has state
        p.main_grad.fill_(1e-3)
    optimizer_step(trainable)
    before = {k: v.clone() for k, v in trainable.model.module.state_dict().items() if torch.is_tensor(v)}
    undo = _refuse_processes()
    try:
        clean = checkpointing.save_checkpoint(trainable, run_dir=work / "run", step=1, config_yaml="{}\n",
                                              extra_state={}, keep_last=1)
    finally:
        undo()
    for p in trainable.model.module.parameters():
        p.data.zero_()
    checkpointing.load_checkpoint(trainable, clean)  # loads before anything is planted
    after = trainable.model.module.state_dict()
    out = {"round_trip": all(torch.equal(before[k], after[k]) for k in before)}
    for target in TARGETS:
        ckpt = work / target.replace(":", "_")
        shutil.copytree(clean, ckpt)
        marker = str(work / f"ran_{target.replace(':', '_')}")
        victim = _plant(ckpt, target, marker)
        write_manifest(ckpt)  # the manifest is unsigned: anyone can regenerate it
        errors = []
        try:
            checkpointing.load_checkpoint(trainable, ckpt)
        except ValueError as e:
            errors.append(str(e))
        if target.startswith("model:"):  # the same model directory as a converted checkpoint
            try:
                load_model(ckpt, mp)
            except ValueError as e:
                errors.append(str(e))
        out[target] = {"victim": str(victim), "errors": errors, "ran": Path(marker).exists()}
    # A converted checkpoint is signed when a key is set, and loads only while it is unchanged.
    import os

    from megatron_opd.checkpoint.convert import hf_to_mcore
    from megatron_opd.checkpoint.manifest import KEY_ENV

    os.environ[KEY_ENV] = "s3cret"
    try:
        hf_to_mcore(hf_dir, work / "converted", layout=parallel.ParallelLayout(1, 1))
        # the converter set up the model-parallel groups anew (the old ones are destroyed)
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(1, 1))
        load_model(work / "converted", mp)
        with (work / "converted" / "model" / "common.pt").open("ab") as f:
            f.write(b"\0")
        try:
            load_model(work / "converted", mp)
            out["signed"] = "loaded"
        except ValueError as e:
            out["signed"] = str(e)
    finally:
        del os.environ[KEY_ENV]
    return out


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """One 1-rank world: save a training checkpoint with process creation refused, plant payloads
    in copies of it, sign a converted checkpoint."""
    from megatron_opd.testing.tiny import make_hf_model

    work = tmp_path_factory.mktemp("checkpoints")
    hf_dir = make_hf_model(work / "hf", model_type="llama")
    return run_distributed(_checkpoint_checks, 1, str(hf_dir), str(work), timeout=600)[0]


def test_checkpoint_save_starts_no_process_and_round_trips(checked):
    assert checked["round_trip"]


def test_planted_pickle_payload_is_refused_in_every_file_we_load(checked):
    results = checked
    for target in TARGETS:
        r = results[target]
        assert not r["ran"], (target, r)
        expected = 2 if target.startswith("model:") else 1
        assert len(r["errors"]) == expected, (target, r)
        for message in r["errors"]:
            assert message.startswith(r["victim"]) and "refused to load" in message, (target, message)


def test_signed_converted_checkpoint_is_refused_once_changed(checked):
    results = checked
    assert re.search(r"converted/model/common.pt: size (\d+) bytes, the manifest says \d+ \(truncated",
                     results["signed"]), results["signed"]


def test_rng_state_with_a_payload_is_refused_by_load_plain(tmp_path):
    from megatron_opd.checkpoint.trust import load_plain

    path = tmp_path / "rank_00000.pt"
    torch.save({"torch": torch.get_rng_state(), "tracker": {"model-parallel-rng": torch.get_rng_state()}}, path)
    assert set(load_plain(path)) == {"torch", "tracker"}
    torch.save({"torch": Payload(str(tmp_path / "ran"))}, path)
    with pytest.raises(ValueError, match="refused to load"):
        load_plain(path, "RNG state")
    assert not (tmp_path / "ran").exists()


def test_signed_manifest_refuses_unsigned_resigned_or_extended_checkpoints(tmp_path, monkeypatch):
    from megatron_opd.checkpoint.manifest import KEY_ENV, write_manifest, verify_manifest

    ckpt = tmp_path / "ckpt"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "model" / "__0_0.distcp").write_bytes(b"weights")
    (ckpt / "trainer_state.json").write_text('{"step": 1}')
    write_manifest(ckpt)  # no key: unsigned
    verify_manifest(ckpt)
    monkeypatch.setenv(KEY_ENV, "s3cret")
    with pytest.raises(ValueError, match=f"not signed, and {KEY_ENV} is set"):
        verify_manifest(ckpt, mode="none")  # a key makes verification mandatory
    write_manifest(ckpt)
    verify_manifest(ckpt, mode="none")
    # changed, and the manifest regenerated with another key
    (ckpt / "model" / "__0_0.distcp").write_bytes(b"payload")
    monkeypatch.setenv(KEY_ENV, "guess")
    write_manifest(ckpt)
    monkeypatch.setenv(KEY_ENV, "s3cret")
    with pytest.raises(ValueError, match="signature does not match"):
        verify_manifest(ckpt)
    # changed, with the signed manifest kept: the hash is checked even with checkpoint.verify=size
    monkeypatch.setenv(KEY_ENV, "s3cret")
    (ckpt / "model" / "__0_0.distcp").write_bytes(b"weights")
    write_manifest(ckpt)
    (ckpt / "model" / "__0_0.distcp").write_bytes(b"wEights")
    with pytest.raises(ValueError, match="sha256 does not match"):
        verify_manifest(ckpt, mode="size")
    (ckpt / "model" / "__0_0.distcp").write_bytes(b"weights")
    verify_manifest(ckpt)
    (ckpt / "model" / "__1_0.distcp").write_bytes(b"extra")
    with pytest.raises(ValueError, match=r"__1_0.distcp: not in the signed manifest.json"):
        verify_manifest(ckpt)
