"""The served teacher: a stock ``vllm serve`` server scores the student's sequences over HTTP
(:class:`TeacherClient`), and :class:`ServedTeacher` turns its per-token log-probs and top-k into
the signals of the student's packed micro-batches.

The client speaks vLLM's OpenAI-compatible ``/v1/completions`` with token-id prompts:
``{"prompt": [[ids], ...], "max_tokens": 0, "echo": true, "return_token_ids": true,
"prompt_logprobs": k}``. vLLM answers, per prompt, a list whose entry i >= 1 maps token ids (as
JSON string keys) to ``{"logprob", "rank"}`` for the given token ``ids[i]`` and the k best tokens
at that position; entry 0 is null. These are the model's raw log-probs (temperature 1), with
``-inf`` reported as ``-9999.0``. The server may be started with ``--skip-tokenizer-init``; it
then does not check token ids, and an id outside the vocabulary kills its engine, which is why
the client checks ids against ``vocab_size`` when given one.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from megatron_opd.parallel import ModelParallel
from megatron_opd.rollout.engine import ScoredSequence
from megatron_opd.teacher.signals import Need, TeacherSignal, teacher_tokens


class TeacherServerError(RuntimeError):
    """The served teacher could not be reached, refused a request, or answered unexpectedly."""


class TeacherTimeoutError(TeacherServerError, TimeoutError):
    """A request to the served teacher took longer than the configured timeout."""


def check_sequences(sequences: list[list[int]], *, vocab_size: int | None,
                    max_len: int | None) -> None:
    """Raise ``ValueError`` naming the first sequence that is empty, too long or out of vocab."""
    if not isinstance(sequences, (list, tuple)):
        raise TypeError(f"sequences must be a list of token-id lists, got {type(sequences).__name__}")
    for n, seq in enumerate(sequences):
        if not isinstance(seq, (list, tuple)) or not seq:
            raise ValueError(f"sequence {n}: expected a non-empty list of token ids")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in seq):
            raise TypeError(f"sequence {n}: token ids must be ints")
        if max_len is not None and len(seq) > max_len:
            raise ValueError(f"sequence {n} has {len(seq)} tokens; the teacher scores at most {max_len}")
        lo, hi = min(seq), max(seq)
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            bad = lo if lo < 0 else hi
            raise ValueError(f"sequence {n}: token id {bad} is outside the teacher's vocabulary "
                             f"[0, {vocab_size if vocab_size is not None else '...'})")


class TeacherClient:
    """Client of a teacher served by a stock ``vllm serve`` (OpenAI-compatible) server.

    Sequences are packed into requests of at most ``max_request_tokens`` tokens (in input order)
    and up to ``max_concurrency`` requests are in flight at once. Every request must complete
    within ``timeout`` seconds of being sent, else :class:`TeacherTimeoutError` (naming the URL
    and the timeout) is raised; a refused connection or an HTTP error raises
    :class:`TeacherServerError` at once. Nothing is retried.
    """

    def __init__(self, url: str, *, model: str | None = None, top_k: int = 0, timeout: float = 120.0,
                 max_concurrency: int = 4, max_request_tokens: int = 8192,
                 vocab_size: int | None = None):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"teacher url must look like http://host:port, got {url!r}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_request_tokens < 1:
            raise ValueError(f"max_request_tokens must be >= 1, got {max_request_tokens}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/").removesuffix("/v1")
        self.url = f"{parts.scheme}://{parts.netloc}{self._prefix}"
        self.model = model
        self.top_k = top_k
        self.timeout = float(timeout)
        self.max_concurrency = max_concurrency
        self.max_request_tokens = max_request_tokens
        self.vocab_size = vocab_size
        self.max_model_len: int | None = None  # read from /v1/models on first use

    # --- HTTP ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One HTTP exchange; socket operations time out after ``self.timeout`` seconds."""
        where = f"{self.url}{path}"
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, f"{self._prefix}{path}", body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (TimeoutError, socket.timeout):
            raise TeacherTimeoutError(f"teacher server at {where} did not answer within the timeout "
                                      f"of {self.timeout:g} s") from None
        except (ConnectionError, OSError, http.client.HTTPException) as e:
            raise TeacherServerError(f"cannot reach the teacher server at {where}: {e!r} "
                                     "(is `vllm serve` running there?)") from None
        finally:
            conn.close()
        if response.status != 200:
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw[:500].decode(errors="replace")
            raise TeacherServerError(f"teacher server at {where} answered HTTP {response.status}: {message}")
        try:
            return json.loads(raw) if raw.strip() else {}  # /health answers with no body
        except ValueError:
            raise TeacherServerError(f"teacher server at {where} answered with invalid JSON: "
                                     f"{raw[:200]!r}") from None

    def wait_until_ready(self, timeout: float) -> None:
        """Poll ``/health`` until the server answers 200, for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                self._request("GET", "/health")
                return
            except TeacherServerError as e:
                last = e
            time.sleep(0.5)
        raise TeacherTimeoutError(f"teacher server at {self.url} was not ready within {timeout:g} s "
                                  f"(last error: {last})")

    def _server_info(self) -> None:
        """Resolve the served model's name and context length from ``/v1/models`` (once)."""
        if self.max_model_len is not None:
            return
        served = {m["id"]: m for m in self._request("GET", "/v1/models").get("data", [])}
        if self.model is None:
            if len(served) != 1:
                raise ValueError(f"teacher server at {self.url} serves {sorted(served)}: pass model= "
                                 "to choose one")
            self.model = next(iter(served))
        if self.model not in served:
            raise ValueError(f"teacher server at {self.url} does not serve model {self.model!r} "
                             f"(it serves {sorted(served)})")
        self.max_model_len = int(served[self.model]["max_model_len"])

    # --- scoring ------------------------------------------------------------------------------

    def _batches(self, sequences: list[list[int]]) -> list[list[int]]:
        """Indices of consecutive sequences per request, at most ``max_request_tokens`` each
        (a longer sequence gets a request of its own)."""
        batches, current, tokens = [], [], 0
        for i, seq in enumerate(sequences):
            if current and tokens + len(seq) > self.max_request_tokens:
                batches.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += len(seq)
        if current:
            batches.append(current)
        return batches

    def _score_batch(self, sequences: list[list[int]]) -> list[ScoredSequence]:
        body = {"model": self.model, "prompt": [list(s) for s in sequences], "max_tokens": 0,
                "echo": True, "return_token_ids": True, "prompt_logprobs": self.top_k}
        choices = sorted(self._request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(sequences):
            raise TeacherServerError(f"teacher server at {self.url} returned {len(choices)} results "
                                     f"for {len(sequences)} sequences")
        return [_parse_prompt_logprobs(seq, c, self.top_k, self.url) for seq, c in zip(sequences, choices)]

    def score(self, sequences: list[list[int]]) -> list[ScoredSequence]:
        """Score ``sequences`` (token-id lists) with the served teacher; results in input order:
        ``logprobs[i] = log p(ids[i+1] | ids[:i+1])`` (``len - 1`` positions) and, with
        ``top_k > 0``, the ``top_k`` best ids and log-probs per position, best first."""
        self._server_info()
        # vLLM needs room for one generated token after the prompt.
        check_sequences(sequences, vocab_size=self.vocab_size, max_len=self.max_model_len - 1)
        batches = self._batches(sequences)
        results: list[ScoredSequence | None] = [None] * len(sequences)
        started: dict[int, float] = {}

        def run(b: int) -> list[ScoredSequence]:
            started[b] = time.monotonic()
            return self._score_batch([sequences[i] for i in batches[b]])

        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(batches)) or 1,
                                  thread_name_prefix="served-teacher")
        try:
            pending = {pool.submit(run, b): b for b in range(len(batches))}
            while pending:
                # Socket timeouts bound each read, not a whole exchange with a slow server: the
                # deadline per request is also enforced here.
                done, _ = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                for future in done:
                    b = pending.pop(future)
                    for i, scored in zip(batches[b], future.result()):
                        results[i] = scored
                now = time.monotonic()
                if any(now - started[b] > self.timeout for b in pending.values() if b in started):
                    raise TeacherTimeoutError(
                        f"teacher server at {self.url}/v1/completions did not answer within the "
                        f"timeout of {self.timeout:g} s")
        finally:
            # Never wait for a stuck request: its socket times out on its own.
            pool.shutdown(wait=False, cancel_futures=True)
        return results


def _parse_prompt_logprobs(seq: list[int], choice: dict, top_k: int, url: str) -> ScoredSequence:
    """One ``/v1/completions`` choice -> :class:`ScoredSequence` of the given ``seq``."""
    if choice.get("prompt_token_ids") is not None and list(choice["prompt_token_ids"]) != list(seq):
        raise TeacherServerError(f"teacher server at {url} scored different tokens than were sent")
    steps = choice.get("prompt_logprobs")
    if not isinstance(steps, list) or len(steps) != len(seq):
        raise TeacherServerError(f"teacher server at {url} returned no prompt_logprobs of length "
                                 f"{len(seq)} (got {type(steps).__name__})")
    result = ScoredSequence(logprobs=[])
    for pos, (tok, step) in enumerate(zip(seq[1:], steps[1:]), 1):
        entries = {int(t): v for t, v in step.items()}
        if tok not in entries:
            raise TeacherServerError(f"teacher server at {url}: position {pos} lacks the log-prob of "
                                     f"the given token {tok}")
        result.logprobs.append(float(entries[tok]["logprob"]))
        if top_k:
            best = sorted((v["rank"], t, float(v["logprob"]))
                          for t, v in entries.items() if v["rank"] <= top_k)
            result.topk_ids.append([t for _, t, _ in best[:top_k]])
            result.topk_logprobs.append([lp for _, _, lp in best[:top_k]])
    return result


class ServedTeacher:
    """The :class:`~megatron_opd.teacher.signals.Teacher` of a served model: the student's last
    stage (TP rank 0) sends its micro-batches' sequences to the server and shares the top-k or
    sampled-token log-probs with its TP peers."""

    def __init__(self, client: TeacherClient, *, need: Need):
        if need not in (Need.TOPK, Need.TOKEN):
            raise ValueError(f"a served teacher gives top-k or sampled-token log-probs, not {need.value}")
        self.client, self.need, self.top_k = client, need, client.top_k
        self.model = None  # served elsewhere

    def signals(self, micro_batches: list[dict], student: ModelParallel) -> list[TeacherSignal | None]:
        if not student.is_last_stage:
            return [None] * len(micro_batches)
        box = [self._score(micro_batches) if student.tp_rank == 0 else None]
        if student.layout.tp > 1:
            src = student.global_rank(tp_rank=0, pp_rank=student.pp_rank)
            dist.broadcast_object_list(box, src=src, group=student.tp_group)
        return box[0]

    def _score(self, micro_batches: list[dict]) -> list[TeacherSignal]:
        """Score every packed sequence in one call; lay the results out like the micro-batches."""
        rows = [teacher_tokens(mb) for mb in micro_batches]  # the teacher's own ids when it has its own tokenizer
        packed = [_sequences(row) for row in rows]
        scored = iter(self.client.score([s for seqs in packed for s in seqs]))
        signals = []
        for row, seqs in zip(rows, packed):
            L = row["input_ids"].shape[1]
            sig = TeacherSignal(token_logprobs=torch.zeros(L),
                                topk_ids=torch.zeros(L, self.top_k, dtype=torch.long),
                                topk_logprobs=torch.full((L, self.top_k), -1e4))
            off = 0
            for s in seqs:
                sc = next(scored)
                n = len(s) - 1
                sig.token_logprobs[off:off + n] = torch.tensor(sc.logprobs[:n])
                if self.need == Need.TOPK:
                    sig.topk_ids[off:off + n] = torch.tensor(sc.topk_ids[:n])
                    sig.topk_logprobs[off:off + n] = torch.tensor(sc.topk_logprobs[:n])
                off += len(s)
            signals.append(sig)
        return signals

    def output_weight(self, student: ModelParallel) -> None:
        """A served teacher never sends hidden states: there is no output layer to fuse with."""
        return None

    def close(self) -> None:
        pass


def _sequences(micro_batch: dict) -> list[list[int]]:
    """The token lists packed into ``micro_batch`` (its row split at the sequence lengths)."""
    ids = micro_batch["input_ids"][0].tolist()
    out, off = [], 0
    for n in micro_batch["lengths"]:
        out.append(ids[off:off + n])
        off += n
    return out
