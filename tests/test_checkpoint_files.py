"""Checkpoint files without processes: manifests refuse a missing, truncated or corrupted file by
name (in size or hash mode), outputs are published atomically or not at all, and the trainer's
checkpointer saves on its schedule and resumes from what it is told."""

import pytest

from megatron_opd.checkpoint.manifest import MANIFEST, verify_manifest, write_manifest
from megatron_opd.checkpoint.publish import STAGING_PREFIX, staged_output
from megatron_opd.train.checkpointing import STATE_FILE, TRACKER, Checkpointer, latest_checkpoint


def _checkpoint(root):
    (root / "model").mkdir(parents=True)
    (root / "model" / "__0_0.distcp").write_bytes(bytes(range(256)) * 8)
    (root / "trainer_state.json").write_text('{"step": 3}')
    write_manifest(root)
    return root / "model" / "__0_0.distcp"


def test_manifest_names_the_damaged_file(tmp_path):
    victim = _checkpoint(tmp_path / "ckpt")
    verify_manifest(tmp_path / "ckpt")
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    verify_manifest(tmp_path / "ckpt", mode="size")  # same size: only the hash sees it
    with pytest.raises(ValueError, match=f"{victim}: sha256 does not match {MANIFEST} \\(corrupted\\)"):
        verify_manifest(tmp_path / "ckpt")
    victim.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match=f"{victim}: size 2038 bytes, the manifest says 2048 \\(truncated"):
        verify_manifest(tmp_path / "ckpt", mode="size")
    victim.unlink()
    with pytest.raises(ValueError, match=f"{victim}: listed in {MANIFEST} but missing"):
        verify_manifest(tmp_path / "ckpt")
    verify_manifest(tmp_path / "ckpt", mode="none")
    (tmp_path / "ckpt" / MANIFEST).unlink()
    with pytest.raises(ValueError, match="no manifest.json; the checkpoint is incomplete"):
        verify_manifest(tmp_path / "ckpt")


def test_staged_output_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="half way"):
        with staged_output(out) as staging:
            (staging / "a.txt").write_text("a")
            raise RuntimeError("half way")
    assert not out.exists() and not list(tmp_path.glob(f"{STAGING_PREFIX}*"))
    with staged_output(out) as staging:
        (staging / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    with pytest.raises(ValueError, match="output directory exists and is not empty"):
        with staged_output(out):
            pass
    with staged_output(out, force=True) as staging:
        (staging / "b.txt").write_text("b")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_checkpointer_saves_on_schedule_and_resumes_from_the_tracker(tmp_path):
    def checkpointer(**kw):
        args = dict(every=2, keep_last=2, resume="auto", verify="hash", export_hf=False, config_yaml="",
                    tokenizer_src=None)
        return Checkpointer(tmp_path, **{**args, **kw})

    c = checkpointer()
    assert [done for done in range(1, 7) if c.due(done, 6)] == [2, 4]  # the last step: the final save
    assert not checkpointer(every=0).due(4, 6)
    assert c.restore(trainable=None) is None and latest_checkpoint(tmp_path) is None  # nothing saved yet
    assert checkpointer(resume="none").restore(trainable=None) is None
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / TRACKER).write_text("step_00000004\n")
    with pytest.raises(ValueError, match="names step_00000004, which is missing or incomplete"):
        latest_checkpoint(tmp_path)
    (root / "step_00000004").mkdir()
    (root / "step_00000004" / STATE_FILE).write_text("{}")
    assert latest_checkpoint(tmp_path) == root / "step_00000004"
