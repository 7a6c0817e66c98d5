"""Teacher labels in and out of the store: top-k log-probabilities, and the soft targets rebuilt from them.

What is stored
--------------
For a teacher's full logits z (C classes) the store keeps, per view, the top-k of

    l_i = z_i - logsumexp(z)        (log-probabilities, log_softmax at tau = 1)

in float16, sorted descending, and their class ids. Log-probabilities rather than raw logits
because they carry the one number a top-k of raw logits loses: the probability mass outside
the top-k,

    r = 1 - sum_{i in topk} exp(l_i),

so no separate log-sum-exp field is needed. And softmax at any temperature only needs logits
up to an additive constant, which l_i are.

Rebuilding a target (soft_targets)
----------------------------------
The stored information defines the distribution P: p_i = exp(l_i) on the top-k classes and the
tail mass r spread uniformly over the other C - k classes, q = r / (C - k) each. The target at
temperature tau is P tempered:

    t_i = p_i^(1/tau) / Z        for i in the top-k,
    t_j = q^(1/tau)   / Z        for the C - k others,    Z = sum_topk p_i^(1/tau) + (C - k) q^(1/tau).

* tau = 1: t_i = p_i = softmax(z)_i exactly for the top-k (up to float16 rounding of l_i) and the
  tail keeps exactly its true total mass r; only how r splits among tail classes is approximated
  (uniformly). Any loss that is linear in the target over the tail classes sees no difference
  beyond that split.
* k = C: there is no tail and t = softmax(z / tau) exactly at every tau.
* tau != 1 and k < C, no stored tail: the top-k keep exactly their relative tempered weights
  p_i^(1/tau), but the tempered tail weight sum_tail p_j^(1/tau) is computed as if the tail were
  uniform. For tau > 1, x^(1/tau) is concave, so a uniform tail *overestimates* the tempered tail
  mass (an upper bound); for tau < 1 it underestimates it. This is the usual top-k approximation
  (FKD, TinyViT), and it is not small: with the real Lite0 teacher on DeiT views, top-10, tau 3,
  the total-variation distance to the teacher's softmax(z / 3) is about 0.17 (benchmarks/soft_topk.py).

The stored tempered tail (StoreSpec.taus, ``precompute --tau T``)
----------------------------------------------------------------
For each temperature tau the user plans, the store can also keep one float16 per view:

    tail_lse(tau) = logsumexp_{j not in topk} (l_j / tau)      (-inf when k = C)

which is log of the exact tempered tail weight. With it, at that tau,

    Z   = sum_topk exp(l_i / tau) + exp(tail_lse)       exact (up to float16 rounding)
    t_i = exp(l_i / tau) / Z                            exact for the top-k
    t_j = exp(tail_lse) / (C - k) / Z                   the tail's total mass exact; its split among
                                                        the C - k tail classes is still uniform

so every top-k weight and the tail mass equal the teacher's softmax(z / tau) to float16 precision.
What remains is how the tail mass splits among tail classes (the store does not know), which is
uniform: at tau = 1 that is the only error there ever was. ``verify --tau T`` and precompute's
meta ``soft_error_*`` measure what is left (total variation and KL to the teacher's full
softmax(z / tau)).
"""

from __future__ import annotations

import numpy as np

from .meta import SOFT_ERROR


def topk_logprobs(logits, k: int):
    """(values float16 [n, k] sorted descending, ids int64 [n, k]) from full logits [n, C].

    The log_softmax runs in float32 so that the float16 rounding happens once, at the end.
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logp, k, dim=-1, largest=True, sorted=True)
    return values.half(), ids


def tail_logsumexp(logits, ids, taus) -> np.ndarray:
    """float16 [n, len(taus)]: logsumexp over the classes not in ids of log_softmax(logits) / tau.

    logits: full teacher logits [n, C]; ids: the stored top-k class ids [n, k]. Computed in float32
    and rounded once. -inf where there is no tail (k = C).
    """
    import torch

    logp = torch.log_softmax(torch.as_tensor(logits).float(), dim=-1)
    tail = logp.scatter(1, torch.as_tensor(ids).long().to(logp.device), float("-inf"))
    cols = [torch.logsumexp(tail / float(t), dim=1) for t in taus]
    out = torch.stack(cols, dim=1) if cols else tail.new_zeros((len(tail), 0))
    return out.half().cpu().numpy()


def _as_tensor(x):
    import torch  # imported here so that opening a store does not pay for importing torch

    if isinstance(x, torch.Tensor):
        return x, True
    return torch.from_numpy(np.ascontiguousarray(x)), False


def soft_targets(values, ids, num_classes: int, tau: float = 1.0, tail_lse=None):
    """Soft targets [n, C] float32 at temperature tau from stored top-k log-probs (see module doc).

    values: [n, k] log-probabilities (any float dtype), ids: [n, k] class ids. tail_lse: [n], the
    stored tail_logsumexp column *at this tau* (exact tempered tail mass), or None for the uniform-
    tail approximation. Returns a torch tensor for torch input (on the same device), a numpy array
    for numpy input.
    """
    import torch

    v, is_torch = _as_tensor(values)
    i, _ = _as_tensor(ids)
    v = v.float()
    n, k = v.shape
    tail_classes = num_classes - k
    # p_i^(1/tau) in log space; the tail share r is clamped because float16 rounding can push
    # sum(exp(l)) a hair above 1.
    log_top = v / tau
    if tail_classes > 0 and tail_lse is not None:
        # the tempered tail's exact total weight, split uniformly among the tail classes
        lse, _ = _as_tensor(tail_lse)
        lse = lse.to(v.device).float().reshape(n, 1)
        log_z = torch.logsumexp(torch.cat([log_top, lse], dim=1), dim=1)
        log_tail = lse - float(np.log(tail_classes))
        out = (log_tail - log_z.unsqueeze(1)).exp().expand(n, num_classes).contiguous()
    elif tail_classes > 0:
        r = (1.0 - v.exp().sum(dim=1)).clamp(min=0.0)
        log_q = torch.log(r / tail_classes)  # -inf when r == 0: the tail then gets no mass
        log_tail = (log_q / tau).unsqueeze(1)
        log_z = torch.logsumexp(torch.cat([log_top, log_tail + np.log(tail_classes)], dim=1), dim=1)
        out = (log_tail - log_z.unsqueeze(1)).exp().expand(n, num_classes).contiguous()
    else:
        log_z = torch.logsumexp(log_top, dim=1)
        out = torch.zeros(n, num_classes, dtype=torch.float32, device=v.device)
    out.scatter_(1, i.long(), (log_top - log_z.unsqueeze(1)).exp())
    return out if is_torch else out.numpy()


def target_error(logits, target, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(total variation [n], KL(teacher || target) [n]) of rebuilt targets [n, C] against the
    teacher's full softmax(logits / tau), in float64. Zero rebuilt probabilities are clamped to the
    smallest float32 so that the KL stays finite (it is then large: the rebuild lost that class)."""
    import torch

    z = torch.as_tensor(logits).double().cpu()
    q = torch.as_tensor(target).double().cpu()
    logp = torch.log_softmax(z / tau, dim=1)
    p = logp.exp()
    tv = 0.5 * (p - q).abs().sum(dim=1)
    kl = (p * (logp - q.clamp_min(torch.finfo(torch.float32).tiny).log())).sum(dim=1)
    return tv.numpy(), kl.clamp_min(0.0).numpy()


def hard_targets(ids):
    """The teacher's argmax as int64 class indices [n], from hard ids [n] or sorted top-k ids [n, k]."""
    t, is_torch = _as_tensor(ids)
    t = (t[:, 0] if t.dim() == 2 else t).long()
    return t if is_torch else t.numpy()


def recorded_soft_error(meta: dict, tau: float) -> dict | None:
    """What precompute measured at temperature tau (meta ``soft_error_rank*``, summed over ranks):
    {"views", "stored": {"tv_mean", "tv_max", "kl_mean", "kl_max"}, "uniform": {...}}, or None."""
    totals: dict = {}
    for key, entry in meta.items():
        if not key.startswith(SOFT_ERROR) or not isinstance(entry, dict):
            continue
        for name, (total, peak, views) in entry.items():
            t, rebuild, metric = name.split("/")
            if not np.isclose(float(t), tau, rtol=1e-6, atol=0):
                continue
            acc = totals.setdefault((rebuild, metric), [0.0, 0.0, 0])
            acc[0], acc[1], acc[2] = acc[0] + total, max(acc[1], peak), acc[2] + views
    if not totals:
        return None
    out: dict = {"views": max(v[2] for v in totals.values())}
    for (rebuild, metric), (total, peak, views) in totals.items():
        out.setdefault(rebuild, {})[f"{metric}_mean"] = total / max(views, 1)
        out[rebuild][f"{metric}_max"] = peak
    return out
