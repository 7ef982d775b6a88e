"""Recovering from a crash at any moment: a torn last line of metrics.jsonl, staging directories
left by killed writers."""

import json

import pytest

from megatron_opd.train.metrics import MetricsLogger


def _logger(run_dir, start_step):
    return MetricsLogger(run_dir, total_steps=5, start_step=start_step, tensorboard=False, progress_bar=False)


def test_torn_last_metrics_line_is_dropped_with_a_warning_naming_the_file(tmp_path, capsys):
    jsonl = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}, {"step": 3, "loss": 0.3}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # killed mid-write
    logger = _logger(tmp_path, start_step=2)  # resumed from step 2's checkpoint
    logger.log(3, {"loss": 0.25}, console=False)
    logger.close()
    assert f"{jsonl}:4: dropped a torn last line" in capsys.readouterr().err
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == rows[:2] + [{"step": 3, "loss": 0.25}]
    # a last row cut just before its newline is complete: kept, and the next row starts a new line
    jsonl.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]))
    logger = _logger(tmp_path, start_step=2)
    logger.log(3, {"loss": 0.25}, console=False)
    logger.close()
    assert [json.loads(line)["step"] for line in jsonl.read_text().splitlines()] == [1, 2, 3]


def test_damaged_metrics_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{jsonl}:2: not valid JSON"):
        _logger(tmp_path, start_step=3)


def _hold_staging(staging: str, ready, release) -> None:
    from pathlib import Path

    from megatron_opd.checkpoint.publish import staging_lock

    with staging_lock(Path(staging)):
        Path(staging).mkdir()
        ready.set()
        release.wait(60)
        Path(staging).rename(Path(staging).parent / "published")


def test_stale_staging_is_removed_at_the_next_start_and_a_running_writers_is_kept(tmp_path):
    import multiprocessing as mp
    import os
    import signal

    from megatron_opd.checkpoint.publish import remove_stale_staging, staged_output

    ctx = mp.get_context("spawn")
    # a writer killed mid-write (its lock file stays, unlocked), one still running, and a
    # leftover from before locks existed
    procs = {}
    for name in (".staging-out-dead0000", ".staging-out-live0000"):
        ready, release = ctx.Event(), ctx.Event()
        procs[name] = (ctx.Process(target=_hold_staging, args=(str(tmp_path / name), ready, release)), release)
        procs[name][0].start()
        assert ready.wait(60)
    (tmp_path / ".staging-out-dead0000" / "model").mkdir()
    os.kill(procs[".staging-out-dead0000"][0].pid, signal.SIGKILL)
    procs[".staging-out-dead0000"][0].join()
    (tmp_path / ".staging-out-legacy00").mkdir()
    (tmp_path / ".staging-other-dead0000").mkdir()  # another output's: not this start's business
    for old in (".staging-out-legacy00", ".staging-other-dead0000"):
        os.utime(tmp_path / old, (1, 1))
    try:
        with staged_output(tmp_path / "out") as staging:  # the next start of a write to `out`
            (staging / "weights").write_text("w")
            assert staging.name.startswith(".staging-out-") and (tmp_path / f"{staging.name}.lock").is_file()
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == [".staging-other-dead0000", ".staging-out-live0000", ".staging-out-live0000.lock", "out"]
    finally:
        procs[".staging-out-live0000"][1].set()
        procs[".staging-out-live0000"][0].join()
    assert remove_stale_staging(tmp_path, "other-") == [tmp_path / ".staging-other-dead0000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "published"]  # the live writer finished
