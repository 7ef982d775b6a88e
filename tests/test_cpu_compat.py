"""Canary for the megatron-core CPU shims: fails loudly when a megatron-core upgrade breaks them."""

import re
from importlib.metadata import version
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.cpu_compat import CUDA_LITERAL_MODULES, FLOAT16_TYPE_CHECK
from megatron_opd.testing.multiprocess import run_distributed

# Files with a literal device="cuda" that no CPU code path of ours reaches (FSDP, CUDA graphs,
# inference server, NVSHMEM resharding, energy monitoring, fp8, activation offloading, MoE's
# fused index converter and megatron-training's MoE metrics writer track_moe_metrics...).
UNREACHED_CUDA_LITERALS = {
    "fp8_utils.py", "energy_monitor.py", "nccl_allocator.py", "full_cuda_graph.py",
    "pipeline_parallel/fine_grained_activation_offload.py", "pipeline_parallel/hybrid_cp_schedule.py",
    "pipeline_parallel/utils.py", "transformer/moe/moe_utils.py", "ssm/mamba_block.py",
    "fusions/fused_indices_converter.py",
}
UNREACHED_PREFIXES = ("resharding/", "inference/", "distributed/fsdp/")


def test_megatron_core_is_the_pinned_version():
    assert version("megatron-core") == "0.16.1", (
        "cpu_compat patches megatron-core 0.16.1 internals: re-check every shim, then move the pin")


def test_every_hard_coded_cuda_allocation_is_routed_or_known_unreached():
    import megatron.core

    root = Path(megatron.core.__file__).parent
    pattern = re.compile(r"""device\s*=\s*["']cuda["']""")
    routed = {m.removeprefix("megatron.core.").replace(".", "/") + ".py" for m in CUDA_LITERAL_MODULES}
    unknown = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if pattern.search(path.read_text(errors="ignore")):
            if rel not in routed and rel not in UNREACHED_CUDA_LITERALS and not rel.startswith(UNREACHED_PREFIXES):
                unknown.append(rel)
    assert not unknown, f"new hard-coded device='cuda' in megatron-core files: {unknown}"


def test_bf16_optimizer_still_sorts_parameters_by_cuda_type_name():
    """The bf16 shim exists for this check in megatron's bf16 optimizer (tests/test_bf16.py runs
    the shimmed optimizer for real)."""
    import inspect

    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    assert FLOAT16_TYPE_CHECK in inspect.getsource(Float16OptimizerWithFloat16Params.__init__)


def _exercise_shims(model_dir: str, ckpt_dir: str) -> dict:
    """TP2 training step with dropout and activation recompute, clipping, and a dist checkpoint
    save/load: every shimmed path runs for real."""
    from megatron.core import dist_checkpointing

    from megatron_opd import cpu_compat, parallel
    from megatron_opd.checkpoint.hf_weights import load_hf_weights
    from megatron_opd.losses import token_logprobs
    from megatron_opd.models import ArchConfig, build_model
    from megatron_opd.config import OptimConfig
    from megatron_opd.train.optim import forward_backward, optimizer_step

    assert cpu_compat.is_applied()
    assert torch.cuda.current_device() == "cpu"
    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(2, 1))
    arch = ArchConfig.from_hf_dir(model_dir)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "position_ids": torch.arange(9).expand(2, -1)}
    grads = {}
    for recompute in (False, True):
        parallel.seed(7, mp)
        model = build_model(arch, mp, recompute=recompute, config_extra={"hidden_dropout": 0.1})
        load_hf_weights(model, model_dir)
        t = OptimConfig(lr=1e-3, clip_grad=0.01).build(model, total_steps=1)

        def output_fn(logits, b):
            lp = token_logprobs(logits[:, :-1], b["input_ids"][:, 1:], vocab_size=300, tp_group=mp.tp_group)
            return -lp.sum(), torch.tensor(lp.numel()), {}

        parallel.seed(11, mp)  # same dropout masks in both runs
        forward_backward(t, [batch], output_fn)
        grads[recompute] = {n: p.main_grad.clone() for n, p in model.module.named_parameters()}
        applied, norm = optimizer_step(t)
        assert applied and norm > 0.01  # clipping engaged
    same = all(torch.equal(grads[False][n], grads[True][n]) for n in grads[False])
    sd = model.module.sharded_state_dict()
    dist_checkpointing.save(sd, ckpt_dir)  # megatron's own path, manager queue included
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    with torch.no_grad():
        for p in model.module.parameters():
            p.zero_()
    loaded = dist_checkpointing.load(model.module.sharded_state_dict(), ckpt_dir)
    model.module.load_state_dict(loaded)
    restored = all(torch.equal(before[n], p) for n, p in model.module.named_parameters())
    dist.barrier()
    return {"recompute_bit_identical": same, "checkpoint_restored": restored}


def test_shims_run_dropout_recompute_clipping_and_dist_checkpoint(tiny_models, tmp_path):
    (tmp_path / "ckpt").mkdir()
    results = run_distributed(_exercise_shims, 2, tiny_models["llama"], str(tmp_path / "ckpt"))
    for r in results:
        assert r == {"recompute_bit_identical": True, "checkpoint_restored": True}


def _moe_shims() -> dict:
    """The MoE shims are in place, and the uneven list collectives (what gloo refuses, megatron's
    all-to-all dispatcher needs at expert TP > 1) give what an equal-size reference gives."""
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    rank = dist.get_rank()
    group = dist.new_group([0, 1])
    sizes = [3, 5]
    mine = torch.arange(sizes[rank] * 2, dtype=torch.float32).reshape(-1, 2) + 100 * rank
    gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=sizes)
    reference = torch.cat([torch.arange(n * 2, dtype=torch.float32).reshape(-1, 2) + 100 * r
                           for r, n in enumerate(sizes)])
    full = torch.arange(16, dtype=torch.float32).reshape(8, 2) * (rank + 1)
    scattered = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
    expected = (torch.arange(16, dtype=torch.float32).reshape(8, 2) * 3).split(sizes)[rank]
    stream = token_dispatcher.torch.cuda.Stream()
    return {"te_general_gemm": moe_utils.te_general_gemm, "gather": torch.equal(gathered, reference),
            "reduce_scatter": torch.equal(scattered, expected),
            "host_splits": type(token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)).__name__,
            "stream": stream.record_event().synchronize() is None}


def test_moe_shims_route_streams_gemm_and_uneven_collectives():
    for r in run_distributed(_moe_shims, 2):
        assert r == {"te_general_gemm": None, "gather": True, "reduce_scatter": True, "host_splits": "ndarray",
                     "stream": True}
