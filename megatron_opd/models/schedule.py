"""Run micro-batches through megatron-core's pipeline schedule on a model's own process groups."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from megatron_opd.models.builder import ShardedModel

# output_fn(logits_shard [b, s, V/TP], micro_batch) on the last stage (within final_hidden_states:
# the final hidden states [b, s, h] instead):
#   training: returns (loss_sum, num_tokens, metrics_dict), megatron's per-token loss convention;
#   forward_only: returns anything, collected in order.
OutputFn = Callable[[torch.Tensor, dict], Any]


def _pass_through(hidden_states, weight=None, runtime_gather_output=None):
    return hidden_states, None


@contextlib.contextmanager
def final_hidden_states(model: ShardedModel) -> Iterator[None]:
    """Within: the last pipeline stage's output layer passes its input through, so the model
    returns its final hidden states (after the final norm) as ``[b, s, h]`` where it returned
    logits ``[b, s, V/TP]``, for a loss fused with :func:`output_weight`. Nothing else changes:
    the weight keeps its gradient hooks, and megatron's tied-embedding bookkeeping (which reads
    ``post_process``) is untouched. With sequence parallelism the hidden states are this rank's
    sequence shard ``[b, s/TP, h]`` (the output layer would have all-gathered them). No-op on
    other stages.
    """
    layer = getattr(model.module, "output_layer", None)
    if layer is None:
        yield
        return
    layer.forward = _pass_through  # an instance attribute: shadows ColumnParallelLinear.forward
    try:
        yield
    finally:
        del layer.forward


def gather_sequence_parallel(hidden_bsh: torch.Tensor, model: ShardedModel) -> torch.Tensor:
    """The whole sequence ``[b, s, h]`` from this rank's sequence-parallel shard ``[b, s/TP, h]``
    (the all-gather megatron's output layer does first); unchanged without sequence parallelism.
    The backward reduce-scatters: it sums the TP ranks' gradients, so a fused loss must leave its
    hidden-state gradient unreduced (``reduce_hidden_grad=not model.config.sequence_parallel``)."""
    if not model.config.sequence_parallel:
        return hidden_bsh
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    full_sbh = gather_from_sequence_parallel_region(hidden_bsh.transpose(0, 1),
                                                    tensor_parallel_output_grad=True, group=model.mp.tp_group)
    return full_sbh.transpose(0, 1)


def output_weight(model: ShardedModel) -> torch.nn.Parameter:
    """The last stage's output-layer weight shard ``[V_padded/TP, h]``: the word embeddings when
    they are tied and this stage holds them (PP = 1), else ``output_layer.weight`` (with PP > 1
    the last stage's copy of tied embeddings, whose gradient megatron adds to the first stage's)."""
    gpt = model.module
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def _schedule_groups(model: ShardedModel):
    """(p2p_communicator, pg_collection) for the schedule, or (None, None) for global state."""
    if model.mp.uses_global_state:
        return None, None
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    return P2PCommunicator(pp_group=model.mp.pp_group, config=model.config), model.mp.pg_collection


def run_schedule(model: ShardedModel | list, micro_batches: list[dict], output_fn: OutputFn, *,
                 forward_only: bool, ddp_module: torch.nn.Module | None = None) -> list:
    """Forward (and backward unless ``forward_only``) over ``micro_batches`` with PP and TP.

    Every rank of the model passes the same list of micro-batches (dicts with ``input_ids`` and
    ``position_ids``: ``[b, s]`` rows of one sequence each (causal, positions ``0..s-1``), or a
    THD pack ``[1, t]`` with ``packed_seq_params``; plus whatever ``output_fn`` reads). Returns
    what ``output_fn`` produced per micro-batch on the last stage (training: the metrics dicts),
    ``[]`` elsewhere. ``ddp_module`` is the DDP-wrapped module when training with megatron's DDP.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    module = ddp_module if ddp_module is not None else model.module
    it = iter(micro_batches)

    def forward_step(data_iterator, mod):
        batch = next(data_iterator)
        ids = batch["input_ids"] if model.mp.is_first_stage else None
        # A THD pack: attention and RoPE (positions from 0 in every sequence) follow cu_seqlens.
        output = mod(ids, batch["position_ids"], None, packed_seq_params=batch.get("packed_seq_params"))

        def loss_func(output_tensor, non_loss_data=False):
            return output_fn(output_tensor, batch)

        return output, loss_func

    p2p, pgs = _schedule_groups(model)
    kwargs = {} if p2p is None else {"p2p_communicator": p2p, "pg_collection": pgs}
    fb = get_forward_backward_func(pp_size=model.mp.layout.pp, vp_size=None)
    first = micro_batches[0]["input_ids"] if micro_batches else None
    seq_len = first.shape[1] if first is not None else 1
    mbs = first.shape[0] if first is not None else 1
    return fb(forward_step_func=forward_step, data_iterator=it, model=[module],
              num_microbatches=len(micro_batches), seq_length=seq_len, micro_batch_size=mbs,
              forward_only=forward_only, collect_non_loss_data=forward_only, **kwargs)
