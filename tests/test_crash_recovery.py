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
