"""The served teacher against a real `vllm serve` on localhost: its log-probs and top-k match
transformers (float64) and a vLLM engine in this process; a dead or stopped server gives a clear
error within the timeout; requests are batched and run concurrently, results in input order."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from megatron_opd.teacher.served import TeacherClient, TeacherServerError, TeacherTimeoutError, check_sequences
from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.utils import free_port

TOP_K = 5
MAX_MODEL_LEN = 128
LENGTHS = [1, 2, 9, 30, 127, 17, 64, 5]


def _sequences():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in LENGTHS]


class Server:
    def __init__(self, model_dir: str, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--served-model-name", "tiny-teacher", "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--enforce-eager", "--skip-tokenizer-init",
               "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(64 << 20),
               "--max-logprobs", "20", "--max-num-seqs", "16"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
        with open(log_path, "w") as log:
            # Own session, so teardown can kill the API server and its engine processes together.
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        client = TeacherClient(self.url, timeout=2.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                client.wait_until_ready(1.0)
                return
            except TeacherServerError:
                pass
        raise RuntimeError(f"vllm serve not ready after {timeout:.0f}s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        def signal_group(sig):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

        signal_group(signal.SIGCONT)
        signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        # The engine processes share the session: none may outlive the API server.
        signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    srv = Server(tiny_models["llama"], tmp_path_factory.mktemp("vllm_serve") / "server.log")
    try:
        srv.wait_ready(180)
        yield srv
    finally:
        srv.stop()


def _reference(model_dir, sequences):
    """transformers' log_softmax in float64: per-token log-probs and top-k (values, ids)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    out = []
    with torch.no_grad():
        for seq in sequences:
            logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0, :-1], dim=-1)
            token = logp.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
            out.append((token, *logp.topk(TOP_K, dim=-1)))
    return out


def _assert_topk_close(ids, lps, ref_vals, ref_ids):
    ids = torch.tensor(ids).reshape(ref_ids.shape)
    lps = torch.tensor(lps, dtype=torch.float64).reshape(ref_vals.shape)
    assert torch.allclose(lps, ref_vals, atol=1e-4), (lps - ref_vals).abs().max()
    # ids agree except where two candidates tie within float error
    mismatch = ids != ref_ids
    if mismatch.any():
        gaps = (ref_vals[:, :-1] - ref_vals[:, 1:]).abs()
        near_tie = torch.zeros_like(mismatch)
        near_tie[:, :-1] |= gaps < 1e-4
        near_tie[:, 1:] |= gaps < 1e-4
        assert not (mismatch & ~near_tie).any(), (ids, ref_ids)


@pytest.mark.vllm
def test_served_scores_match_transformers_fp64(server, tiny_models):
    sequences = _sequences()
    # Small requests so that several run concurrently.
    teacher = TeacherClient(server.url, top_k=TOP_K, timeout=60, max_concurrency=3,
                            max_request_tokens=80, vocab_size=300)
    scored = teacher.score(sequences)
    assert teacher.model == "tiny-teacher" and teacher.max_model_len == MAX_MODEL_LEN
    assert len(teacher._batches(sequences)) > 3
    ref = _reference(tiny_models["llama"], sequences)
    for seq, s, (token, ref_vals, ref_ids) in zip(sequences, scored, ref):
        assert len(s.logprobs) == len(seq) - 1 == len(s.topk_ids) == len(s.topk_logprobs)
        if len(seq) == 1:
            continue
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), token, atol=1e-4)
        _assert_topk_close(s.topk_ids, s.topk_logprobs, ref_vals, ref_ids)


def _engine_scores(model_dir, sequences, top_k):
    """The same scores from a vLLM engine in this process, started on the HF checkpoint."""
    from megatron_opd.models.config import ArchConfig
    from megatron_opd.rollout.engine import RolloutEngine

    engine = RolloutEngine(ArchConfig.from_hf_dir(model_dir), kv_cache_bytes=64 << 20,
                           max_model_len=MAX_MODEL_LEN, model_dir=model_dir)
    try:
        check_sequences(sequences, vocab_size=engine.arch.vocab_size, max_len=MAX_MODEL_LEN - 1)
        return engine.score([list(s) for s in sequences], top_k=top_k)
    finally:
        engine.close()


@pytest.mark.vllm
def test_served_matches_an_engine_in_process(server, tiny_models):
    sequences = _sequences()
    served = TeacherClient(server.url, top_k=TOP_K, timeout=60).score(sequences)
    local = run_distributed(_engine_scores, 1, tiny_models["llama"], sequences, TOP_K,
                            timeout=300, env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})[0]
    worst = 0.0
    for a, b in zip(served, local):
        assert len(a.logprobs) == len(b.logprobs)
        if not a.logprobs:
            continue
        worst = max(worst, (torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max().item(),
                    (torch.tensor(a.topk_logprobs) - torch.tensor(b.topk_logprobs)).abs().max().item())
        _assert_topk_close(a.topk_ids, a.topk_logprobs, torch.tensor(b.topk_logprobs, dtype=torch.float64),
                           torch.tensor(b.topk_ids))
    assert worst <= 1e-4, worst


@pytest.mark.vllm
def test_requests_run_concurrently_and_results_keep_input_order(server):
    in_flight, peak, lock = 0, 0, threading.Lock()

    class Recording(TeacherClient):
        def _score_batch(self, sequences):
            nonlocal in_flight, peak
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            try:
                time.sleep(0.3)  # keep the request open long enough for the others to start
                return super()._score_batch(sequences)
            finally:
                with lock:
                    in_flight -= 1

    sequences = _sequences()
    one_by_one = TeacherClient(server.url, timeout=60, max_request_tokens=1).score(sequences)
    teacher = Recording(server.url, timeout=60, max_concurrency=3, max_request_tokens=1)
    for a, b in zip(teacher.score(sequences), one_by_one):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    assert peak == 3


@pytest.mark.vllm
def test_stopped_server_times_out_with_a_clear_error(server):
    sequences = _sequences()
    teacher = TeacherClient(server.url, top_k=2, timeout=3.0, max_request_tokens=64)
    teacher.score(sequences[:2])  # reachable and resolved
    os.kill(server.proc.pid, signal.SIGSTOP)  # the API server stops answering; its socket stays open
    try:
        start = time.monotonic()
        with pytest.raises(TeacherTimeoutError) as err:
            teacher.score(sequences)
        elapsed = time.monotonic() - start
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert elapsed < 3.0 + 1.0, elapsed
    assert server.url in str(err.value) and "3 s" in str(err.value), err.value
    assert len(teacher.score(sequences[:3])) == 3  # and it serves again once resumed


def test_dead_server_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TeacherServerError, match=f"cannot reach the teacher server at {url}"):
        TeacherClient(url, timeout=5.0).score([[1, 2, 3]])
    assert time.monotonic() - start < 5.0


@pytest.mark.vllm
def test_bad_requests_are_refused_with_the_reason(server):
    teacher = TeacherClient(server.url, vocab_size=300, top_k=2)
    with pytest.raises(ValueError, match="sequence 1: token id 300 is outside the teacher's vocabulary"):
        teacher.score([[1, 2], [5, 300]])
    with pytest.raises(ValueError, match=f"sequence 0 has {MAX_MODEL_LEN} tokens; the teacher scores at "):
        teacher.score([[1] * MAX_MODEL_LEN])
    with pytest.raises(TeacherServerError, match="HTTP 400: Requested prompt logprobs of 50"):
        TeacherClient(server.url, top_k=50).score([[1, 2, 3]])
    with pytest.raises(ValueError, match="does not serve model 'other'"):
        TeacherClient(server.url, model="other").score([[1, 2, 3]])


def _train_both(student: str, teacher_dir: str, served_url: str, work: str) -> dict:
    """Two steps of the trainer with the teacher served over HTTP, then with the same model as an
    in-process teacher (same student, same samples): step -> loss of each."""
    import json
    from pathlib import Path

    from megatron_opd.config import load_config
    from megatron_opd.utils import write_jsonl
    from megatron_opd.train.loop import Trainer

    work = Path(work)
    g = torch.Generator().manual_seed(4)
    write_jsonl(work / "prompts.jsonl", [{"prompt_ids": torch.randint(3, 300, (int(n),), generator=g).tolist()}
                                         for n in torch.randint(2, 9, (32,), generator=g)])
    common = [f"student.path={student}", f"data.train_path={work / 'prompts.jsonl'}", "train.steps=2",
              "train.prompts_per_step=8", "student.tp=2", "teacher.tp=2", "loss.kind=forward_kl",
              "loss.support=teacher_topk_input", f"loss.top_k={TOP_K}", "data.micro_batch_tokens=64",
              "rollout.max_new_tokens=6", "rollout.kv_cache_gb=0.0625", "logging.tensorboard=false",
              "logging.progress_bar=false", "rollout.mismatch_threshold=1e-4", "optim.lr=1e-2"]
    engine, out = None, {}
    for name, teacher in (("served", [f"teacher.served_url={served_url}", "teacher.served_model=tiny-teacher"]),
                          ("in_process", [f"teacher.path={teacher_dir}"])):
        trainer = Trainer(load_config(None, common + teacher + [f"train.run_dir={work / name}"]), engine=engine)
        engine = trainer.engine
        trainer.train()
        trainer.close()
        rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        out[name] = {r["step"]: r["loss"] for r in rows}
    return out


@pytest.mark.vllm
def test_trainer_with_a_served_teacher_matches_the_in_process_one(server, tiny_models, tmp_path):
    # the server serves tiny_models["llama"]; the student is another model of the same vocabulary
    out = run_distributed(_train_both, 2, tiny_models["llama_tied"], tiny_models["llama"], server.url,
                          str(tmp_path), timeout=600,
                          env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})[0]
    served, local = out["served"], out["in_process"]
    assert sorted(served) == sorted(local) == [1, 2]
    for step in (1, 2):
        assert served[step] > 0 and abs(served[step] - local[step]) <= 1e-4 * max(1.0, local[step]), (served, local)


# ---------------------------------------------------------------- without a server

def _choice(seq, steps):
    """A /v1/completions choice as vLLM writes it: token ids as JSON string keys."""
    return {"index": 0, "prompt_token_ids": seq,
            "prompt_logprobs": [None] + [{str(t): {"logprob": lp, "rank": r} for t, (lp, r) in step.items()}
                                         for step in steps]}


def test_prompt_logprobs_are_parsed_per_position_best_first():
    from megatron_opd.teacher.served import _parse_prompt_logprobs

    seq = [5, 7, 9]
    # position 1: the given token 7 is not in the top-2; position 2: it is the best
    steps = [{7: (-3.0, 4), 11: (-0.5, 1), 12: (-1.5, 2)}, {9: (-0.1, 1), 3: (-9999.0, 2)}]
    scored = _parse_prompt_logprobs(seq, _choice(seq, steps), 2, "http://h")
    assert scored.logprobs == [-3.0, -0.1]
    assert scored.topk_ids == [[11, 12], [9, 3]] and scored.topk_logprobs == [[-0.5, -1.5], [-0.1, -9999.0]]
    with pytest.raises(TeacherServerError, match="position 2 lacks the log-prob of the given token 9"):
        _parse_prompt_logprobs(seq, _choice(seq, [steps[0], {3: (-1.0, 1)}]), 2, "http://h")
    with pytest.raises(TeacherServerError, match="scored different tokens than were sent"):
        _parse_prompt_logprobs([5, 7, 8], _choice(seq, steps), 2, "http://h")
    with pytest.raises(TeacherServerError, match="returned no prompt_logprobs of length 3"):
        _parse_prompt_logprobs(seq, _choice(seq, steps[:1]), 2, "http://h")


def test_client_arguments_and_sequences_are_checked_before_any_request():
    with pytest.raises(ValueError, match="teacher url must look like http://host:port"):
        TeacherClient("ftp://h:1")
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        TeacherClient("h:8000", max_concurrency=0)
    client = TeacherClient("http://h:8000/v1", max_request_tokens=5)
    assert client.url == "http://h:8000"
    assert client._batches([[1] * 3, [1] * 2, [1] * 9, [1]]) == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="sequence 1: expected a non-empty list of token ids"):
        check_sequences([[1], []], vocab_size=10, max_len=None)
    with pytest.raises(ValueError, match="sequence 0 has 4 tokens; the teacher scores at most 3"):
        check_sequences([[1, 2, 3, 4]], vocab_size=10, max_len=3)


def test_packed_micro_batches_are_split_back_into_their_sequences():
    from megatron_opd.teacher.served import _sequences
    from megatron_opd.train.data import Sequence, pack_micro_batches

    seqs = [Sequence(i, 0, list(range(10 * i, 10 * i + n)), 1, [1] * (n - 1)) for i, n in enumerate((3, 5, 2, 4))]
    mbs = pack_micro_batches(seqs, budget=8, device="cpu")
    assert sorted(s for mb in mbs for s in _sequences(mb)) == sorted(s.tokens for s in seqs)
    for mb in mbs:
        assert [seqs[i].tokens for i in mb["seq_indices"]] == _sequences(mb)
