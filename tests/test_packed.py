"""Packed (THD) micro-batches against each sequence run alone: logits, a token log-prob loss and
parameter gradients through megatron's pipeline schedule, for every family and TP/PP layout."""

import torch
import torch.distributed as dist

from megatron_opd.testing.multiprocess import run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # mistral: sliding window 6
# Two packs: unequal lengths with two of length 1, and one sequence that fills its pack.
PACKS = [[9, 1, 17, 4, 1, 12], [44]]


def _micro_batch(seqs: list[torch.Tensor], weights: list[torch.Tensor], packed: bool) -> dict:
    from megatron_opd.models.packing import packed_seq_params
    from megatron_opd.models.packing import packed_positions

    lengths = [len(s) for s in seqs]
    # next-token targets within each sequence; a sequence's last position has weight 0
    targets = torch.cat([torch.cat([s[1:], s.new_zeros(1)]) for s in seqs])
    batch = {"input_ids": torch.cat(seqs)[None], "targets": targets[None],
             "weights": torch.cat(weights)[None], "lengths": lengths}
    if packed:
        batch["position_ids"] = packed_positions(lengths, device="cpu")
        batch["packed_seq_params"] = packed_seq_params(lengths, device="cpu")
    else:
        assert len(seqs) == 1
        batch["position_ids"] = torch.arange(lengths[0])[None]
    return batch


def packed_vs_unpacked(models: dict, layouts: list) -> dict:
    """Run in every rank: per (family, tp, pp), the largest differences between a packed run
    and one micro-batch per sequence, on this rank's stage: logits and log-probs (last stage),
    the loss, and every local parameter gradient (relative to the largest gradient)."""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.losses import token_logprobs
    from megatron_opd.models.schedule import run_schedule
    from megatron_opd.testing.checks import gathered_logits

    g = torch.Generator().manual_seed(0)
    seqs = [[torch.randint(0, 300, (n,), generator=g) for n in pack] for pack in PACKS]
    weights = [[torch.cat([torch.rand(n - 1, generator=g), torch.zeros(1)]) for n in pack] for pack in PACKS]
    packed = [_micro_batch(s, w, packed=True) for s, w in zip(seqs, weights)]
    alone = [_micro_batch([s], [w], packed=False)
             for ss, ws in zip(seqs, weights) for s, w in zip(ss, ws)]

    results = {}
    for tp, pp in layouts:
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(tp, pp))
        for name, model_dir in models.items():
            model = load_model(model_dir, mp)
            model.config.calculate_per_token_loss = True  # the schedule leaves the summed loss alone
            model.module.train()

            def output_fn(logits, batch, model=model):
                lp = token_logprobs(logits, batch["targets"], vocab_size=model.arch.vocab_size,
                                    tp_group=model.mp.tp_group)
                loss = -(lp * batch["weights"]).sum()
                full = gathered_logits(model, logits.detach())[0]
                return loss, torch.tensor(1), {"logits": full.split(batch["lengths"]),
                                               "logprobs": lp.detach()[0].split(batch["lengths"]),
                                               "loss": loss.detach().clone()}

            runs = {}
            for kind, mbs in (("packed", packed), ("alone", alone)):
                for p in model.module.parameters():
                    p.grad = None
                out = run_schedule(model, mbs, output_fn, forward_only=False)
                grads = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}
                runs[kind] = (out, grads)
            (out_p, grads_p), (out_a, grads_a) = runs["packed"], runs["alone"]
            assert grads_p.keys() == grads_a.keys() and grads_p, name
            scale = max(v.abs().max().item() for v in grads_a.values())
            r = {"grad": max((grads_p[k] - grads_a[k]).abs().max().item() for k in grads_a) / scale}
            if mp.is_last_stage:
                logits_p = [x for o in out_p for x in o["logits"]]
                lp_p = [x for o in out_p for x in o["logprobs"]]
                assert len(logits_p) == len(out_a) == sum(len(p) for p in PACKS)
                r["logits"] = max((x - o["logits"][0]).abs().max().item() for x, o in zip(logits_p, out_a))
                r["logprobs"] = max((x - o["logprobs"][0]).abs().max().item() for x, o in zip(lp_p, out_a))
                total_p, total_a = sum(o["loss"] for o in out_p), sum(o["loss"] for o in out_a)
                r["loss"] = abs(total_p - total_a).item() / abs(total_a).item()
            results[(name, tp, pp)] = r
        dist.barrier()
    return results


def test_packed_matches_unpacked_every_family_and_layout(tiny_models):
    per_rank = run_distributed(packed_vs_unpacked, 4, {f: tiny_models[f] for f in FAMILIES}, LAYOUTS,
                               timeout=600)
    worst: dict = {}
    for r in per_rank:
        for key, diffs in r.items():
            for what, v in diffs.items():
                worst[key + (what,)] = max(worst.get(key + (what,), 0.0), v)
    for family in FAMILIES:
        for tp, pp in LAYOUTS:
            assert (family, tp, pp, "logits") in worst and (family, tp, pp, "grad") in worst
    limits = {"logits": 1e-5, "logprobs": 1e-5, "loss": 1e-6, "grad": 1e-5}
    bad = {k: v for k, v in worst.items() if not v <= limits[k[-1]]}
    assert not bad, f"packed vs one sequence per micro-batch: {bad}"
