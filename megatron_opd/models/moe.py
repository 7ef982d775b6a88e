"""Router and expert-load metrics of a built mixture-of-experts model, collected per step."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.models.builder import ShardedModel


class ExpertLoad:
    """Counts, by forward hooks on megatron's routers, the tokens each expert receives in each
    layer, the router's probabilities and logits; :meth:`collect` reduces them over the model's
    ranks and returns the step's metrics (and starts the next step from zero).

    A token counts once: under activation recompute the first forward runs without gradients
    (only the recomputation in backward has them), so a training forward counts when gradients
    are enabled; an eval forward always counts. Every rank of the model must call ``collect``.
    """

    def __init__(self, model: ShardedModel):
        if not model.arch.is_moe:
            raise ValueError(f"{model.arch.model_type} is not a mixture-of-experts model")
        self.model = model
        arch = model.arch
        device = next(model.module.parameters()).device
        shape = (arch.num_layers, arch.num_experts)
        self.counts = torch.zeros(shape, dtype=torch.float64, device=device)
        self.prob_sums = torch.zeros(shape, dtype=torch.float64, device=device)
        # per layer: tokens, sum of logsumexp(logits)^2; and the largest |logit|
        self.tokens = torch.zeros(arch.num_layers, dtype=torch.float64, device=device)
        self.z_sums = torch.zeros(arch.num_layers, dtype=torch.float64, device=device)
        self.logit_absmax = torch.zeros((), dtype=torch.float64, device=device)
        self._handles = [layer.mlp.router.register_forward_hook(self._hook(layer.layer_number - 1))
                         for layer in model.module.decoder.layers]

    def _hook(self, layer: int):
        def hook(router, inputs, output):
            if router.training and not torch.is_grad_enabled():
                return  # the no-grad first pass of a recomputed layer: the recomputation counts
            with torch.no_grad():
                _, routing_map = output
                hidden = inputs[0].reshape(-1, inputs[0].shape[-1])
                logits = torch.nn.functional.linear(hidden.double(), router.weight.double())
                self.counts[layer] += routing_map.sum(dim=0).double()
                self.prob_sums[layer] += torch.softmax(logits, dim=-1).sum(dim=0)
                self.tokens[layer] += logits.shape[0]
                self.z_sums[layer] += torch.logsumexp(logits, dim=-1).square().sum()
                self.logit_absmax.copy_(torch.maximum(self.logit_absmax, logits.abs().max()))
        return hook

    def collect(self) -> dict[str, float]:
        """The step's metrics over the whole model and batch (collective over all its ranks):
        min/max tokens per expert (over layers and experts), the largest per-layer ratio of the
        busiest expert's tokens to the mean, the Switch load-balancing loss averaged over layers
        (1.0 when perfectly balanced; logged whether or not it is trained on), the router's
        z-loss (mean squared logsumexp of the logits) and largest |logit|."""
        mp, arch = self.model.mp, self.model.arch
        sums = torch.cat([self.counts.reshape(-1), self.prob_sums.reshape(-1), self.tokens, self.z_sums])
        # Every rank of a stage routes its own tokens, except tensor-parallel ranks without
        # sequence parallelism, which all route the same ones.
        dist.all_reduce(sums, group=mp.tp_dp_group)
        if not self.model.config.sequence_parallel:
            sums /= mp.layout.tp
        dist.all_reduce(sums, group=mp.pp_group)  # each stage filled its own layers
        absmax = self.logit_absmax.clone()
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=mp.tp_dp_group)
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=mp.pp_group)
        n, L = arch.num_experts, arch.num_layers
        counts, probs, tokens, z = sums.split([L * n, L * n, L, L])
        counts, probs = counts.view(L, n), probs.view(L, n)
        for t in (self.counts, self.prob_sums, self.tokens, self.z_sums, self.logit_absmax):
            t.zero_()
        if not bool((tokens > 0).all()):
            return {}
        balance = (counts * probs).sum(dim=1) * n / (arch.moe_top_k * tokens * tokens)
        return {
            "moe/tokens_per_expert_min": counts.min().item(),
            "moe/tokens_per_expert_max": counts.max().item(),
            "moe/load_imbalance": (counts.max(dim=1).values / counts.mean(dim=1)).max().item(),
            "moe/load_balancing_loss": balance.mean().item(),
            "moe/router_z_loss": (z / tokens).mean().item(),
            "moe/router_logit_absmax": absmax.item(),
        }

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
