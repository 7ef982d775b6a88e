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


# --- what listens where -------------------------------------------------------------------------

def _listening() -> list[str]:
    """host:port of every TCP socket this process listens on."""
    import ipaddress
    import os
    import socket

    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    out = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in open(f"/proc/self/net/{table}").read().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            host, port = fields[1].split(":")
            raw = bytes.fromhex(host)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
            out.append(f"{ipaddress.ip_address(socket.inet_ntop(family, raw))}:{int(port, 16)}")
    return out


def _listen_after_collectives():
    dist.all_reduce(torch.ones(1))
    dist.barrier(group=dist.new_group(list(range(dist.get_world_size()))))
    return _listening()


def test_stores_and_gloo_listen_on_loopback_only_on_one_host(tmp_path):
    """A one-host job (a bare one-process command, or ranks with MASTER_ADDR=127.0.0.1) listens
    on loopback only: the store rank 0 hosts, and gloo's sockets."""
    import ipaddress
    import json
    import subprocess
    import sys
    from pathlib import Path

    bare = subprocess.run([sys.executable, "-c", "import json; from megatron_opd import parallel; "
                           "parallel.init_distributed(); import tests.test_multiprocess as t; "
                           "print(json.dumps(t._listen_after_collectives()))"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent,
                          env={k: v for k, v in __import__("os").environ.items()
                               if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME")})
    assert bare.returncode == 0, bare.stderr[-3000:]
    per_process = {"bare": json.loads(bare.stdout.strip().splitlines()[-1])}
    per_process.update(enumerate(run_distributed(_listen_after_collectives, 2, timeout=300)))
    assert all(per_process.values()), per_process  # the store on rank 0 / the bare process, gloo's sockets
    for who, addresses in per_process.items():
        for address in addresses:
            assert ipaddress.ip_address(address.rpartition(":")[0]).is_loopback, (who, address)


# --- naming a lost rank -------------------------------------------------------------------------

def _lost_ranks_seen_by_rank_0():
    import json
    import threading
    import time

    from megatron_opd import parallel

    members = parallel._MEMBERS
    if dist.get_rank() == 1:  # pose as a rank on another host, with a heartbeat
        members.store.set("members/1", json.dumps({"host": "node-elsewhere", "pid": 1, "pid_ns": ""}))
        threading.Thread(target=parallel._heartbeat, args=(members,), daemon=True).start()
    dist.barrier()
    beating = parallel.lost_ranks(wait_s=5) if dist.get_rank() == 0 else None
    dist.barrier()
    if dist.get_rank() == 1:
        members.stop.set()  # alive, but silent from now on
        time.sleep(0.5)
    dist.barrier()
    silent = parallel.lost_ranks(wait_s=5) if dist.get_rank() == 0 else None
    dist.barrier()
    return beating, silent


@pytest.mark.slow  # waits out a heartbeat timeout
def test_a_rank_on_another_host_is_named_lost_when_its_heartbeat_stops():
    beating, silent = run_distributed(_lost_ranks_seen_by_rank_0, 2, timeout=300)[0]
    assert beating == []
    assert silent == ["rank 1 (on node-elsewhere: no heartbeat for 5 s)"]
