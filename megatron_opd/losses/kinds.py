"""The divergences on rows of log-probs: the summed terms, the loss, and the analytic gradient.

Each kind sees log-probs and probabilities of the student (``logp``, ``p``) and the teacher
(``logq``, ``q``) over a support (a vocab shard, or top-k buckets). ``sums`` gives per-row partial
sums that add up across shards; ``loss`` turns the total into the per-token loss plus the one
scalar the gradient needs; ``grad_`` gives dD/ds from the log-probs (overwriting them), the
gradient w.r.t. the student's tempered logits s = z / T, for the entries of the row.

For any D(p) with p = softmax(s): dD/ds_j = p_j (g_j - sum_i p_i g_i), g = dD/dp. Per kind:
  forward KL  D = sum q log(q / p)                       dD/ds = p - q
  reverse KL  D = sum p log(p / q)                       dD/ds = p (log p - log q - D)
  JSD(beta)   D = beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p
                                                         dD/ds = (1 - beta) p (log p - log m - KL(p || m))
All terms are products of a probability with a difference of finite log-probs (-inf logits are
floored at LOG_ZERO), so p = 0 gives 0, never 0 * log 0.

``reverse_kl_advantage`` is not a divergence's gradient but a policy gradient (arXiv 2604.13016's
top-k OPD): each entry x of the support has the advantage A_x = -w_x (log p_x - log q_x), w the
student's probability renormalized over the support, and the gradient is that of the surrogate
-sum_x sg(A_x) log p_x, i.e. dL/ds = c - p sum c with c_x = w_x (log p_x - log q_x); the value is
sum c. Over the full vocabulary (or top-k buckets with their tail) w = p and this is reverse KL's
own gradient; it differs when a top-k support drops its tail (``without_rest``): then log p, log q
stay the full distributions' (the rest bucket normalizes them) and only the k selected tokens
carry an advantage.
"""

from __future__ import annotations

import torch


def _weighted_diff(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row ``sum w * (a - b)`` -> ``[c]``."""
    return torch.linalg.vecdot(w, a - b)


class ForwardKL:
    """KL(p_teacher || p_student), the distillation loss of classic KD."""

    def sums(self, logp, logq, p, q) -> torch.Tensor:
        return _weighted_diff(q, logq, logp).unsqueeze(-1)

    def loss(self, sums_cf: torch.Tensor) -> tuple[torch.Tensor, None]:
        return sums_cf[:, 0], None

    def grad_(self, logp, logq, aux: None) -> torch.Tensor:
        """Overwrites ``logp`` and ``logq``."""
        return logp.exp_().sub_(logq.exp_())


class ReverseKL:
    """KL(p_student || p_teacher), mode-seeking; the on-policy distillation default."""

    def sums(self, logp, logq, p, q) -> torch.Tensor:
        return _weighted_diff(p, logp, logq).unsqueeze(-1)

    def loss(self, sums_cf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sums_cf[:, 0], sums_cf[:, 0]

    def grad_(self, logp, logq, kl_c: torch.Tensor) -> torch.Tensor:
        """Overwrites ``logp`` and ``logq``."""
        p = logp.exp()
        return logp.sub_(logq).sub_(kl_c.unsqueeze(-1)).mul_(p)


class JSD:
    """Generalised Jensen-Shannon divergence with mixture m = beta * q + (1 - beta) * p, 0 < beta < 1."""

    def __init__(self, beta: float):
        assert 0.0 < beta < 1.0, beta
        self.beta = beta

    def _log_mixture(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        # m = 0 only where p and q both underflow; the floor keeps 0 * log m finite there.
        return torch.lerp(p, q, self.beta).clamp_min_(torch.finfo(p.dtype).tiny).log_()

    def sums(self, logp, logq, p, q) -> torch.Tensor:
        logm = self._log_mixture(p, q)
        return torch.stack([_weighted_diff(q, logq, logm), _weighted_diff(p, logp, logm)], dim=-1)

    def loss(self, sums_cf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kl_qm, kl_pm = sums_cf.unbind(-1)
        return self.beta * kl_qm + (1.0 - self.beta) * kl_pm, kl_pm

    def grad_(self, logp, logq, kl_pm_c: torch.Tensor) -> torch.Tensor:
        """Overwrites ``logp`` and ``logq``."""
        p = logp.exp()
        logm = self._log_mixture(p, logq.exp_())
        return logp.sub_(logm).sub_(kl_pm_c.unsqueeze(-1)).mul_(p).mul_(1.0 - self.beta)


class ReverseKLAdvantage:
    """The support's reverse-KL terms as per-token advantages of a policy gradient (see the module
    docstring). ``exclude_last``: the last entry of a row (a top-k tail bucket) normalizes the
    log-probs but carries no advantage."""

    needs_rest = True  # without a tail bucket, the log-probs of the top-k are still the full ones

    def __init__(self, exclude_last: bool = False):
        self.exclude_last = exclude_last

    def without_rest(self) -> "ReverseKLAdvantage":
        return ReverseKLAdvantage(exclude_last=True)

    def _terms(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        """c = w (log p - log q) per entry (0 on an excluded last entry)."""
        if not self.exclude_last:
            return logp.exp() * (logp - logq)
        sel_p, sel_q = logp[:, :-1], logq[:, :-1]
        w = (sel_p - torch.logsumexp(sel_p, dim=-1, keepdim=True)).exp()
        return torch.nn.functional.pad(w * (sel_p - sel_q), (0, 1))

    def sums(self, logp, logq, p, q) -> torch.Tensor:
        return self._terms(logp, logq).sum(dim=-1, keepdim=True)

    def loss(self, sums_cf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sums_cf[:, 0], sums_cf[:, 0]

    def grad_(self, logp, logq, sum_c: torch.Tensor) -> torch.Tensor:
        """c - p sum(c): the surrogate's gradient w.r.t. s (d log p_x / ds = onehot(x) - p)."""
        c = self._terms(logp, logq)
        return c.sub_(logp.exp_().mul_(sum_c.unsqueeze(-1)))


REVERSE_KL_ADVANTAGE = "reverse_kl_advantage"
KINDS = ("forward_kl", "reverse_kl", "jsd", REVERSE_KL_ADVANTAGE)


def make_divergence(kind: str, beta: float):
    """The divergence for ``kind``; JSD at beta 0 and 1 is forward and reverse KL (TRL's GKD convention)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if kind == REVERSE_KL_ADVANTAGE:
        return ReverseKLAdvantage()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return ForwardKL()
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return ReverseKL()
    return JSD(float(beta))
