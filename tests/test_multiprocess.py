"""The spawned-rank test harness: results come back in rank order, failures name the rank."""

import pytest
import torch
import torch.distributed as dist

from megatron_opd.testing.multiprocess import DistributedTestError, run_distributed


def _allreduce_rank():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _rank1_raises():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 would wait here forever without the harness's timeout


def test_results_in_rank_order():
    assert run_distributed(_allreduce_rank, 3) == [(0, 3.0), (1, 3.0), (2, 3.0)]


def test_failure_names_rank_and_exception():
    with pytest.raises(DistributedTestError) as e:
        run_distributed(_rank1_raises, 2, timeout=60)
    assert "rank 1" in str(e.value) and "boom on purpose" in str(e.value)
