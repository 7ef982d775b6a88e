"""Packed (THD) micro-batches against each sequence run alone, through the trainer's own path: its
micro-batches (``train.data.micro_batch``, padded to a token multiple), the in-process teacher's
signals (logit shards, top-k, sampled-token log-probs) and the student's objective (loss, metrics,
parameter gradients) through megatron's pipeline schedule, for every family and TP/PP layout."""

import pytest
import torch
import torch.distributed as dist

from megatron_opd.testing.multiprocess import run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # mistral: sliding window 6
# Two packs: unequal lengths with two of length 1 (padded to a multiple of 8, as sequence
# parallelism at TP8 would need: 4 padding tokens), and one sequence that fills its pack.
PACKS = [[9, 1, 17, 4, 1, 12], [44]]
MULTIPLES = [8, 1]
TOP_K = 5


def _sequences() -> list:
    """The trainer's sequences of PACKS: prompts of a third, a masked tool token, rollout log-probs
    and weights on some."""
    from megatron_opd.train.data import Sequence

    g = torch.Generator().manual_seed(0)
    seqs = []
    for n in (n for pack in PACKS for n in pack):
        prompt = max(1, n // 3)
        mask = [int(j != 2) for j in range(n - prompt)]
        on_policy = len(seqs) % 2 == 0
        rollout = (-torch.rand(n - prompt, generator=g)).tolist() if on_policy else None
        seqs.append(Sequence(0, len(seqs), torch.randint(0, 300, (n,), generator=g).tolist(), prompt, mask,
                             rollout_logprobs=rollout, on_policy=on_policy, weight=0.5 + len(seqs) / 10))
    return seqs


def _micro_batches(seqs: list) -> tuple[list[dict], list[dict]]:
    """(the packs of PACKS, one micro-batch per sequence), as the trainer builds them."""
    from megatron_opd.train.data import micro_batch

    packed, start = [], 0
    for pack, multiple in zip(PACKS, MULTIPLES):
        indices = list(range(start, start + len(pack)))
        packed.append(dict(micro_batch(seqs, indices, device="cpu", multiple_of=multiple), index=len(packed)))
        start += len(pack)
    alone = [dict(micro_batch(seqs, [i], device="cpu"), index=i) for i in range(len(seqs))]
    assert packed[0]["padding"] == 4 and packed[1]["padding"] == 0
    return packed, alone


def _rows(tensor: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    """A per-token tensor of a micro-batch split into its sequences (padding dropped)."""
    return list(tensor[: sum(batch["lengths"])].split(batch["lengths"]))


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def _teacher_diffs(teacher, packed: list[dict], alone: list[dict], student_mp) -> tuple[dict, list]:
    """Per signal, the largest packed-vs-alone difference (on the student's last stage), and the
    logit signals of both (for the student's objective)."""
    from megatron_opd.teacher.megatron import SIGNAL_FIELDS
    from megatron_opd.teacher.signals import Need

    diffs, logits = {}, None
    for need in (Need.LOGITS, Need.TOPK, Need.TOKEN):
        teacher.need = need
        sig_p, sig_a = teacher.signals(packed, student_mp), teacher.signals(alone, student_mp)
        if need == Need.LOGITS:
            logits = (sig_p, sig_a)
        if not student_mp.is_last_stage:
            continue
        for field in SIGNAL_FIELDS[need]:
            rows_p = [r for s, b in zip(sig_p, packed) for r in _rows(getattr(s, field), b)]
            rows_a = [getattr(s, field) for s in sig_a]
            if field == "topk_ids":
                diffs["teacher_topk_ids"] = float(not all(torch.equal(x, y) for x, y in zip(rows_p, rows_a)))
            else:
                diffs[f"teacher_{field}"] = _max_diff(rows_p, rows_a)
    return diffs, logits


def _student_runs(model, objective, packed: list[dict], alone: list[dict], signals) -> dict:
    """Forward and backward of the packs and of the sequences alone through the trainer's
    objective; per run: the objective's metrics, the gathered logits per sequence, the gradients."""
    from megatron_opd.models.schedule import run_schedule
    from megatron_opd.testing.checks import gathered_logits

    runs = {}
    for kind, mbs, sigs in (("packed", packed, signals[0]), ("alone", alone, signals[1])):
        def output_fn(output, batch, sigs=sigs):
            loss_sum, num_tokens, metrics = objective(output, batch, sigs[batch["index"]])
            metrics["logits"] = _rows(gathered_logits(model, output.detach())[0], batch)
            return loss_sum, num_tokens, metrics

        for p in model.module.parameters():
            p.grad = None
        out = run_schedule(model, mbs, output_fn, forward_only=False)
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}
        runs[kind] = (out, grads)
    return runs


def packed_vs_unpacked(models: dict, layouts: list) -> dict:
    """Run in every rank: per (family, tp, pp), the largest differences between the packs and one
    micro-batch per sequence, on this rank's stage: the teacher's signals, the student's logits,
    loss and metrics (last stage), and every local parameter gradient (relative to the largest)."""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.teacher.megatron import MegatronTeacher
    from megatron_opd.teacher.signals import Need
    from megatron_opd.train.objective import make_objective

    packed, alone = _micro_batches(_sequences())
    results = {}
    for tp, pp in layouts:
        layout = parallel.ParallelLayout(tp, pp)
        mp = parallel.initialize_global_model_parallel(layout)
        for name, model_dir in models.items():
            teacher = MegatronTeacher.load(model_dir, layout, need=Need.LOGITS, top_k=TOP_K, temperature=1.3)
            r, signals = _teacher_diffs(teacher, packed, alone, mp)
            model = load_model(model_dir, mp)
            model.config.calculate_per_token_loss = True  # as the trainer's optimizer sets it
            model.module.train()
            objective = make_objective(model, kind="jsd", beta=0.3, support="full", top_k=0, temperature=1.0,
                                       chunk_size=16, fused_linear=False, teacher_output_weight=None,
                                       teacher_temperature=1.3, rollout_temperature=1.0)
            runs = _student_runs(model, objective, packed, alone, signals)
            (out_p, grads_p), (out_a, grads_a) = runs["packed"], runs["alone"]
            assert grads_p.keys() == grads_a.keys() and grads_p, name
            scale = max(v.abs().max().item() for v in grads_a.values())
            r["grad"] = max((grads_p[k] - grads_a[k]).abs().max().item() for k in grads_a) / scale
            if mp.is_last_stage:
                r["logits"] = _max_diff([x for o in out_p for x in o["logits"]], [o["logits"][0] for o in out_a])
                for key in ("loss_sum", "divergence_sum", "mismatch_sum", "loss_tokens", "topk_overlap_sum"):
                    total_p = sum(o[key] for o in out_p if key in o)
                    total_a = sum(o[key] for o in out_a if key in o)
                    r[key] = abs(total_p - total_a).item() / abs(total_a).item()
            results[(name, tp, pp)] = r
        dist.barrier()
    return results


@pytest.mark.slow  # a 4-rank world over every family and layout
def test_packed_matches_unpacked_every_family_and_layout(tiny_models):
    per_rank = run_distributed(packed_vs_unpacked, 4, {f: tiny_models[f] for f in FAMILIES}, LAYOUTS,
                               timeout=900)
    worst: dict = {}
    for r in per_rank:
        for key, diffs in r.items():
            for what, v in diffs.items():
                worst[key + (what,)] = max(worst.get(key + (what,), 0.0), v)
    limits = {"logits": 1e-5, "loss_sum": 1e-6, "divergence_sum": 1e-6, "mismatch_sum": 1e-6,
              "loss_tokens": 0.0, "topk_overlap_sum": 1e-6, "grad": 1e-5, "teacher_logits": 1e-5,
              "teacher_topk_ids": 0.0, "teacher_topk_logprobs": 1e-5, "teacher_token_logprobs": 1e-5}
    for family in FAMILIES:
        for tp, pp in LAYOUTS:
            for what in limits:
                assert (family, tp, pp, what) in worst, (family, tp, pp, what)
    bad = {k: v for k, v in worst.items() if not v <= limits[k[-1]]}
    assert not bad, f"packed vs one sequence per micro-batch: {bad}"


def test_the_teacher_pads_a_pack_to_its_own_multiple_and_cuts_back():
    """A teacher under sequence parallelism needs a multiple of its TP: its row grows by a padding
    sequence of its own after the student's, and its outputs are cut back to the student's row."""
    from megatron_opd.teacher.megatron import _unwire, _wire
    from megatron_opd.train.data import micro_batch

    seqs = _sequences()[:3]  # 9 + 1 + 17 = 27 tokens
    wire = _wire(micro_batch(seqs, [0, 1, 2], device="cpu", multiple_of=4))  # + 1 padding
    mb = _unwire(wire, "cpu", 6)
    assert mb["length"] == 28 and mb["input_ids"].shape == (1, 30)
    assert torch.equal(mb["input_ids"][:, :28], wire["input_ids"]) and mb["input_ids"][0, 28:].tolist() == [0, 0]
    assert mb["packed_seq_params"].cu_seqlens_q.tolist() == [0, 9, 10, 27, 30]
    assert mb["position_ids"][0, 27:].tolist() == [0, 1, 2]
    assert _unwire(wire, "cpu", 1)["packed_seq_params"].cu_seqlens_q.tolist() == [0, 9, 10, 27, 28]
