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
* tau != 1 and k < C: the top-k keep exactly their relative tempered weights p_i^(1/tau), but
  the tempered tail weight sum_tail p_j^(1/tau) is computed as if the tail were uniform. For
  tau > 1, x^(1/tau) is concave, so a uniform tail *overestimates* the tempered tail mass (an
  upper bound); for tau < 1 it underestimates it. With a peaked teacher and k >= 5 the tail is
  small and the error is small; this is the usual top-k approximation (FKD, TinyViT), made
  exact at tau = 1.
"""

from __future__ import annotations

import numpy as np


def topk_logprobs(logits, k: int):
    """(values float16 [n, k] sorted descending, ids int64 [n, k]) from full logits [n, C].

    The log_softmax runs in float32 so that the float16 rounding happens once, at the end.
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logp, k, dim=-1, largest=True, sorted=True)
    return values.half(), ids


def _as_tensor(x):
    import torch  # imported here so that opening a store does not pay for importing torch

    if isinstance(x, torch.Tensor):
        return x, True
    return torch.from_numpy(np.ascontiguousarray(x)), False


def soft_targets(values, ids, num_classes: int, tau: float = 1.0):
    """Soft targets [n, C] float32 at temperature tau from stored top-k log-probs (see module doc).

    values: [n, k] log-probabilities (any float dtype), ids: [n, k] class ids. Returns a torch
    tensor for torch input (on the same device), a numpy array for numpy input.
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
    if tail_classes > 0:
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


def hard_targets(ids):
    """The teacher's argmax as int64 class indices [n], from hard ids [n] or sorted top-k ids [n, k]."""
    t, is_torch = _as_tensor(ids)
    t = (t[:, 0] if t.dim() == 2 else t).long()
    return t if is_torch else t.numpy()
