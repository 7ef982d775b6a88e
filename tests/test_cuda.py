"""What only a GPU can check (`pytest -m cuda`; `make gpu-check` runs these and prints one table).

Each test compares what runs on CUDA with the CPU / fp32 reference, and records what it measured
(``record_property("measured", ...)``) for the summary table. Without CUDA every test here is
skipped, never faked; a test that needs vLLM or Transformer Engine runs only where that package
imports, and is listed as not run otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GiB = 1 << 30
QWEN_VOCAB = 151936  # Qwen2.5's vocabulary: where logits, not weights, decide the memory
# bf16 against the fp32 reference (bf16 keeps 8 bits of mantissa); see tests/test_bf16.py.
BF16_LOGIT_TOL = 0.15
BF16_GRAD_REL_TOL = 0.05
BF16_LOSS_REL_TOL = 0.02
FP32_TOL = 1e-4  # fp32 on CUDA against fp64 / fp32 on CPU: reduction order only


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, both on the CPU in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def world():
    """torch.distributed on one rank with NCCL, as the trainer starts it (collective code paths
    run for real at world size 1)."""
    from megatron_opd import parallel

    parallel.init_distributed()
    assert parallel.backend() == "nccl"
    yield
    parallel.shutdown_distributed()


# --- the losses ---------------------------------------------------------------------------------

def _reference(s, t, kind, beta, vocab):
    logp = torch.log_softmax(s[..., :vocab].double(), -1)
    logq = torch.log_softmax(t[..., :vocab].double(), -1)
    p, q = logp.exp(), logq.exp()
    if kind == "forward_kl":
        return (q * (logq - logp)).sum(-1)
    if kind == "reverse_kl":
        return (p * (logp - logq)).sum(-1)
    logm = torch.log(beta * q + (1 - beta) * p)
    return beta * (q * (logq - logm)).sum(-1) + (1 - beta) * (p * (logp - logm)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_divergences_on_cuda_match_cpu_float64(dtype, record_property):
    """Every kind, value and gradient, on CUDA logits (padded vocabulary, masked tokens) against the
    float64 reference on the CPU (for bf16: on the same bf16 values)."""
    from megatron_opd.losses import vocab_parallel_divergence

    g = torch.Generator().manual_seed(0)
    vocab, width = 1000, 1024
    s_cpu = (torch.randn(37, width, generator=g) * 3).to(dtype)
    t_cpu = (torch.randn(37, width, generator=g) * 3).to(dtype)
    mask = torch.rand(37, generator=g) > 0.2
    worst = {}
    for kind, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)):
        s = s_cpu.cuda().requires_grad_()
        out = vocab_parallel_divergence(s, t_cpu.cuda(), kind=kind, beta=beta, vocab_size=vocab,
                                        loss_mask=mask.cuda(), chunk_size=16)
        out.sum().backward()
        ref_in = s_cpu.double().requires_grad_()
        ref = torch.where(mask, _reference(ref_in, t_cpu.double(), kind, beta, vocab), 0.0)
        ref.sum().backward()
        worst[kind] = (_rel(out, ref), _rel(s.grad, ref_in.grad))
    value = max(v for v, _ in worst.values())
    grad = max(g_ for _, g_ in worst.values())
    record_property("measured", f"value rel err {value:.1e}, grad rel err {grad:.1e}")
    assert value < FP32_TOL
    assert grad < (FP32_TOL if dtype == torch.float32 else 1e-2)


def test_fused_linear_loss_on_cuda_matches_cpu_float64(record_property):
    """The loss fused with both output layers (bf16 hidden states and weights, as in training):
    value and the gradients of hidden states and weight, against the logits computed in float64."""
    from megatron_opd.losses import fused_linear_divergence_sum

    g = torch.Generator().manual_seed(1)
    n, h, vocab, width = 45, 64, 1000, 1024
    hs, ws = torch.randn(n, h, generator=g), torch.randn(width, h, generator=g) / 8
    ht, wt = torch.randn(n, 96, generator=g), torch.randn(width, 96, generator=g) / 8
    hs, ws, ht, wt = (x.to(torch.bfloat16) for x in (hs, ws, ht, wt))
    h_cuda, w_cuda = hs.cuda().requires_grad_(), ws.cuda().requires_grad_()
    total, _ = fused_linear_divergence_sum(h_cuda, w_cuda, ht.cuda(), wt.cuda(), kind="reverse_kl",
                                           vocab_size=vocab, chunk_size=8)
    total.backward()
    h64, w64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    ref = _reference(h64 @ w64.t(), ht.double() @ wt.double().t(), "reverse_kl", 0.5, vocab).sum()
    ref.backward()
    errs = (_rel(total, ref), _rel(h_cuda.grad, h64.grad), _rel(w_cuda.grad, w64.grad))
    record_property("measured", "value / dH / dW rel err " + " / ".join(f"{e:.1e}" for e in errs))
    assert errs[0] < 1e-3 and errs[1] < 3e-2 and errs[2] < 3e-2  # bf16 matmuls and gradients, fp32 loss math


@pytest.mark.parametrize("num_tokens", [8192])
def test_losses_at_a_152k_vocabulary_stay_under_the_logits_floor(num_tokens, record_property):
    """Peak memory of forward + backward at Qwen2.5's vocabulary, beside 10 N V bytes: what a loss
    that materialises the logits holds at least (both models' bf16 logits, an fp32 log-softmax
    and the bf16 gradient: 2 + 2 + 4 + 2 bytes per logit). On logits, ours adds the gradient and
    chunk temporaries to its inputs; fused with the output layers, logits exist one chunk at a time."""
    from megatron_opd.losses import fused_linear_divergence_sum, vocab_parallel_divergence

    n, v, h = num_tokens, QWEN_VOCAB, 1536
    floor = 10 * n * v
    rows = {}
    torch.manual_seed(0)
    s = (torch.randn(n, v, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    t = (torch.randn(n, v, device="cuda") * 2).to(torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    vocab_parallel_divergence(s, t, kind="reverse_kl").sum().backward()
    torch.cuda.synchronize()
    rows["logits"] = (torch.cuda.max_memory_allocated() - start, start)
    del s, t
    hs = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ws = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) / 40).requires_grad_()
    ht = torch.randn(n, 3584, device="cuda", dtype=torch.bfloat16)
    wt = torch.randn(v, 3584, device="cuda", dtype=torch.bfloat16) / 60
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    total, _ = fused_linear_divergence_sum(hs, ws, ht, wt, kind="reverse_kl")
    total.backward()
    torch.cuda.synchronize()
    rows["fused"] = (torch.cuda.max_memory_allocated() - start, start)
    extra_logits, inputs_logits = rows["logits"]
    extra_fused = rows["fused"][0]
    record_property("measured", f"N={n} V={v}: 10NV floor {floor / GiB:.2f} GiB | on logits: inputs "
                                f"{inputs_logits / GiB:.2f} + peak extra {extra_logits / GiB:.2f} GiB | "
                                f"fused (h 1536/3584): peak extra {extra_fused / GiB:.2f} GiB")
    assert inputs_logits + extra_logits < floor
    assert extra_fused < 0.5 * floor


# --- packed (THD) attention ----------------------------------------------------------------------

PACKED_LENGTHS = [300, 1, 1024, 77, 513, 1, 130]  # unequal, two of length 1


def _attention_float64(q, k, v, lengths, window):
    """Per sequence, float64 causal attention (within ``window`` if given) over a dense mask of
    that sequence alone; GQA by repeating keys and values."""
    out, start = [], 0
    rep = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = (x[start:start + n] for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
        pos = torch.arange(n)
        allowed = pos[None, :] <= pos[:, None]
        if window is not None:
            allowed &= pos[:, None] - pos[None, :] < window
        scores = torch.einsum("ihd,jhd->hij", qs, ks) / qs.shape[-1] ** 0.5
        out.append(torch.einsum("hij,jhd->ihd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vs))
        start += n
    return torch.cat(out)


def varlen_vs_float64(device: str, dtype: torch.dtype, window: int | None) -> tuple[float, float]:
    """(output, q/k/v gradient) max errors relative to the largest reference value, of
    ``varlen_attention`` on ``device`` in ``dtype`` against float64 per sequence on the CPU (on the
    same rounded inputs)."""
    from megatron_opd.models.varlen import varlen_attention

    g = torch.Generator().manual_seed(0)
    t = sum(PACKED_LENGTHS)
    cpu = [torch.randn(t, heads, 64, generator=g).to(dtype) for heads in (8, 2, 2)]  # GQA 8 over 2
    upstream = torch.randn(t, 8, 64, generator=g).to(dtype)
    qkv = [x.to(device, copy=True).requires_grad_() for x in cpu]
    cu = [0] + torch.tensor(PACKED_LENGTHS).cumsum(0).tolist()
    out = varlen_attention(*qkv, cu, scale=64 ** -0.5, window=window)
    out.backward(upstream.to(device))
    ref_in = [x.double().requires_grad_() for x in cpu]
    ref = _attention_float64(*ref_in, PACKED_LENGTHS, window)
    ref.backward(upstream.double())
    grad = max(_rel(x.grad, r.grad) for x, r in zip(qkv, ref_in))
    return _rel(out, ref), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varlen_attention_on_cuda_matches_float64_per_sequence(dtype, record_property):
    """Our packed (THD) attention, plain torch (no megatron-core needed): the core attention of the
    local spec, which runs where Transformer Engine is absent. Causal and sliding-window (Mistral),
    GQA, unequal lengths with two of length 1, against float64 per sequence."""
    errs = {w: varlen_vs_float64("cuda", dtype, w) for w in (None, 96)}
    record_property("measured", "; ".join(f"window {w}: out rel err {o:.1e}, grad rel err {gr:.1e}"
                                          for w, (o, gr) in errs.items()))
    # bf16: 8 bits of mantissa in the output and in the gradients' matmuls (measured on the CPU's
    # kernels: 2.5e-3 and 1.3e-2)
    out_tol, grad_tol = (FP32_TOL, FP32_TOL) if dtype == torch.float32 else (2e-2, BF16_GRAD_REL_TOL)
    assert all(o < out_tol and gr < grad_tol for o, gr in errs.values()), errs


def test_packed_attention_memory_on_cuda_grows_with_tokens_not_their_square(record_property):
    """Forward + backward of 64-token sequences packed into 2k and 16k tokens (bf16, 32 heads over
    8 groups of 128): what it allocates beyond its inputs grows with the tokens (8x), not with
    their square (64x, a dense mask's score matrix)."""
    from megatron_opd.models.varlen import varlen_attention

    extra = {}
    for tokens in (2048, 16384):
        q = torch.randn(tokens, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(tokens, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        upstream = torch.randn_like(q)
        cu = list(range(0, tokens + 1, 64))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        varlen_attention(q, k, v, cu, scale=128 ** -0.5).backward(upstream)
        torch.cuda.synchronize()
        extra[tokens] = torch.cuda.max_memory_allocated() - start
        del q, k, v, upstream
    ratio = extra[16384] / extra[2048]
    record_property("measured", f"peak extra 2k {extra[2048] / 2**20:.0f} MiB, 16k {extra[16384] / 2**20:.0f} MiB "
                                f"(x{ratio:.1f}; a dense fp32 score matrix at 16k: {4 * 32 * 16384**2 / GiB:.0f} GiB)")
    assert ratio < 10


# --- the model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megatron_opd.testing.tiny import make_hf_model

    return str(make_hf_model(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2", tie_word_embeddings=True))


def test_model_forward_and_backward_on_cuda_match_the_cpu_reference(world, tiny_hf, record_property):
    """megatron's GPTModel on CUDA (local spec, or TE's where installed), fp32 and bf16: logits
    against transformers' fp32 forward on the CPU, bf16 gradients against the fp32 ones."""
    from transformers import AutoModelForCausalLM

    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.losses import token_logprobs
    from megatron_opd.config import OptimConfig
    from megatron_opd.train.optim import forward_backward

    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = hf(ids).logits[0]
    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(1, 1))
    batch = {"input_ids": ids.cuda(), "position_ids": torch.arange(24, device="cuda")[None]}
    logits, grads = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = load_model(tiny_hf, mp, params_dtype=dtype)
        assert all(p.device.type == "cuda" and p.dtype == dtype for p in model.module.parameters())
        t = OptimConfig(lr=1e-3).build(model, total_steps=10)

        def output_fn(z, b):
            lp = token_logprobs(z[:, :-1], b["input_ids"][:, 1:], vocab_size=300)
            return -lp.sum(), torch.tensor(lp.numel(), device=z.device), {"logits": z.detach()[0, :, :300].float()}

        out = forward_backward(t, [batch], output_fn)
        logits[name] = out[0]["logits"].cpu()
        grads[name] = {n: p.main_grad.detach().cpu() for n, p in model.module.named_parameters()}
    fp32_err = _rel(logits["fp32"], ref)
    bf16_diff = (logits["bf16"] - ref).abs().max().item()
    grad_err = max(((grads["bf16"][k] - g).norm() / g.norm()).item() for k, g in grads["fp32"].items())
    record_property("measured", f"fp32 logits rel err {fp32_err:.1e}; bf16 logits max|diff| {bf16_diff:.3f}; "
                                f"bf16 grads rel err {grad_err:.3f}")
    assert fp32_err < FP32_TOL
    assert bf16_diff < BF16_LOGIT_TOL
    assert grad_err < BF16_GRAD_REL_TOL


@pytest.fixture(scope="module")
def megatron_core():
    """Skips a test where megatron-core is not installed (before ``world`` starts NCCL)."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")


def test_packed_model_on_cuda_matches_each_sequence_alone(megatron_core, world, tiny_hf, record_property):
    """A THD pack through megatron's GPTModel on CUDA (TE's attention in THD format where TE is
    installed, else the local spec with our VarlenAttention): logits per sequence against each
    sequence run alone; bf16, and fp32 on the local spec (TE's fused THD kernels are 16-bit)."""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.models.packing import packed_inputs
    from megatron_opd.models.schedule import run_schedule

    lengths = [9, 1, 14]
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    packed = {"input_ids": ids, **packed_inputs(lengths, device="cuda")}
    alone = [{"input_ids": part, "position_ids": torch.arange(n, device="cuda")[None]}
             for part, n in zip(ids.split(lengths, dim=1), lengths)]
    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(1, 1))
    diffs = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = load_model(tiny_hf, mp, params_dtype=dtype)
        if model.te_spec and dtype == torch.float32:
            continue
        logits = lambda mbs: run_schedule(model, mbs, lambda z, b: z.detach().float().cpu()[0], forward_only=True)
        row, parts = logits([packed])[0], torch.cat(logits(alone))
        diffs[name] = (row - parts).abs().max().item()
        spec = "TE" if model.te_spec else "local"
    record_property("measured", f"{spec} spec, packed vs alone logits max|diff|: "
                                + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert diffs["bf16"] < BF16_LOGIT_TOL and diffs.get("fp32", 0.0) < FP32_TOL, diffs


# --- the trainer --------------------------------------------------------------------------------

class WeightSink:
    """Where vLLM is absent, the rollout engine's place in the weight sync: it consumes the HF
    tensors the bridge gathers and regroups (that code runs for real) and checks their device."""

    def __init__(self):
        self.version = 0
        self.devices: set[str] = set()
        self.bytes = 0

    def update_weights(self, named_tensors) -> int:
        for _, t in named_tensors:
            self.devices.add(t.device.type)
            self.bytes += t.numel() * t.element_size()
        self.version += 1
        return self.version

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def big_vocab_task(tmp_path_factory):
    """The demo's arithmetic data with a student and a teacher at Qwen2.5's vocabulary (the task's
    tokenizer uses the first ids; the rest is padding the loss must handle). Weights drawn with
    std 1/sqrt(fan-in), so that the distributions are far from uniform and bf16 rounding shows."""
    from megatron_opd.tasks import arithmetic as task
    from megatron_opd.testing.tiny import make_hf_model

    root = tmp_path_factory.mktemp("task152k")
    task.write_datasets(root, num_train=2000, num_eval=16)
    for name, hidden, seed in (("teacher", 384, 0), ("student", 256, 1)):
        config = task.llama_config(hidden=hidden, heads=4, layers=2)
        config.update(vocab_size=QWEN_VOCAB)
        make_hf_model(root / name, config.pop("model_type"), seed=seed, **config)
        task.make_tokenizer(root / name)
    return root


def _trainer_step(root: Path, run_dir: Path, dtype: str, *, fused: bool, on_policy: bool = False) -> dict:
    import gc

    from megatron_opd.config import load_config
    from megatron_opd.train.loop import Trainer

    overrides = [
        f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}",
        f"data.train_path={root / 'train.jsonl'}", f"train.run_dir={run_dir}", "train.steps=1",
        "train.prompts_per_step=256", "data.micro_batch_tokens=4096", f"student.dtype={dtype}",
        f"teacher.dtype={dtype}", f"loss.fused_linear={str(fused).lower()}", "loss.kind=reverse_kl",
        "optim.lr=1e-4", "optim.clip_grad=1.0", "rollout.max_new_tokens=8", "rollout.kv_cache_gb=1",
        "rollout.mismatch_threshold=null", "logging.tensorboard=false", "logging.progress_bar=false",
        "eval.every=0", "checkpoint.resume=none",
    ]
    # Off-policy on the dataset's completions needs no rollout engine for the samples: where vLLM
    # is absent, a sink takes the engine's place in the weight sync.
    overrides += ["rollout.lmbda=1"] if on_policy else ["rollout.lmbda=0", "rollout.offpolicy_source=dataset"]
    sink = None if on_policy else WeightSink()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    trainer = Trainer(load_config(None, overrides), engine=sink)
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert {p.dtype for p in trainer.student.module.parameters()} == {expected}
    assert {p.dtype for p in trainer.teacher.model.module.parameters()} == {expected}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    metrics = trainer.step(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    trainer.close()
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    out = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "peak_extra": peak,
           "models": start - before, "gap": metrics.get("rollout/logprob_abs_diff_max")}
    if sink is not None:
        out.update(sink_devices=sorted(sink.devices), sink_bytes=sink.bytes)
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
def test_trainer_bf16_step_with_nccl_at_a_152k_vocabulary(world, big_vocab_task, tmp_path, fused, record_property):
    """One step of the real trainer (teacher phase, megatron's schedule, the loss, the optimizer,
    the weight sync's gather and regroup, metrics reduced over NCCL) at world size 1, bf16 against
    the same step in fp32; peak memory of the step beside the 10 N V floor of its micro-batch."""
    runs = {d: _trainer_step(big_vocab_task, tmp_path / d, d, fused=fused) for d in ("fp32", "bf16")}
    b, f = runs["bf16"], runs["fp32"]
    loss_err = abs(b["loss"] - f["loss"]) / abs(f["loss"])
    norm_err = abs(b["grad_norm"] - f["grad_norm"]) / f["grad_norm"]
    n = 4096  # the micro-batch token budget (the step's tokens fit one micro-batch)
    floor = 10 * n * QWEN_VOCAB
    record_property("measured", f"loss bf16 {b['loss']:.4f} vs fp32 {f['loss']:.4f} (rel {loss_err:.1e}), "
                                f"grad norm rel {norm_err:.1e}; step peak over the models: bf16 "
                                f"{b['peak_extra'] / GiB:.2f} GiB, fp32 {f['peak_extra'] / GiB:.2f} GiB "
                                f"(10NV floor at N={n}: {floor / GiB:.2f} GiB); models + optimizer: bf16 "
                                f"{b['models'] / GiB:.2f} GiB, fp32 {f['models'] / GiB:.2f} GiB")
    assert b["sink_devices"] == ["cuda"] and b["sink_bytes"] > 0
    assert loss_err < BF16_LOSS_REL_TOL and norm_err < 0.1
    assert b["models"] < f["models"]
    if fused:
        assert b["peak_extra"] < 0.5 * floor


def test_trainer_vs_vllm_logprob_gap_on_cuda(world, big_vocab_task, tmp_path, record_property):
    """Needs vLLM's GPU build: one on-policy step per dtype; the largest trainer-vs-engine log-prob
    difference of a sampled token after the weight sync (rollout.mismatch_threshold's measure)."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    gaps = {d: _trainer_step(big_vocab_task, tmp_path / d, d, fused=True, on_policy=True)["gap"]
            for d in ("fp32", "bf16")}
    record_property("measured", "trainer-vs-vLLM max |logprob diff|: "
                                + ", ".join(f"{d} {g:.2e}" for d, g in gaps.items()))
    assert gaps["fp32"] < 1e-3 and gaps["bf16"] < 0.5


def test_transformer_engine_spec_matches_the_local_spec(world, tiny_hf, record_property):
    """Needs Transformer Engine: the TE layer spec's logits against the local spec's."""
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.models import builder
    from megatron_opd.models.schedule import run_schedule

    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(1, 1))
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    batch = {"input_ids": ids, "position_ids": torch.arange(24, device="cuda")[None]}
    outs = {}
    for te in (True, False):
        available = builder.transformer_engine_available
        builder.transformer_engine_available = lambda te=te: te
        try:
            model = load_model(tiny_hf, mp)
        finally:
            builder.transformer_engine_available = available
        assert model.te_spec == te
        outs[te] = run_schedule(model, [batch], lambda z, b: z.detach().float().cpu(), forward_only=True)[0]
    err = _rel(outs[True], outs[False])
    record_property("measured", f"TE vs local spec logits rel err {err:.1e}")
    assert err < 1e-3


def test_environment(record_property):
    """What the check ran on (always passes where CUDA is present)."""
    import importlib.util

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("megatron.core", "transformers", "vllm", "transformer_engine"):
        spec = importlib.util.find_spec(pkg.split(".")[0])
        if spec is None:
            versions[pkg] = "absent"
            continue
        from importlib.metadata import PackageNotFoundError, version

        dist_name = {"megatron.core": "megatron-core", "transformer_engine": "transformer-engine"}.get(pkg, pkg)
        try:
            versions[pkg] = version(dist_name)
        except PackageNotFoundError:
            versions[pkg] = "present"
    props = torch.cuda.get_device_properties(0)
    record_property("measured", f"{props.name}, {props.total_memory / GiB:.0f} GiB; " + json.dumps(versions))
