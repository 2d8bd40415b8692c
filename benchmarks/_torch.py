"""The same models in PyTorch, for torchdiffeq's `odeint` (issue 7, competitor 4).

Each builder returns `-∇L` as a torch function of one flat float64 vector laid out as
`ravel_pytree` lays out the JAX model's trainable leaves, so states compare entry by entry.
torch is imported here only: the harness runs without it and says so.
"""

import math
from collections.abc import Callable

import numpy as np


def available() -> str | None:
    """`None` if torch and torchdiffeq import, else why not."""
    try:
        import torch  # noqa: F401
        import torchdiffeq  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (`pip install torch==2.13.0 torchdiffeq`)"
    return None


def _velocity(loss_of_views: Callable, sizes: list[tuple[int, ...]]) -> Callable:
    """`f(t, y) = -∇L(y)` by reverse mode; `loss_of_views` takes one view per parameter."""
    import torch

    counts = [math.prod(s) for s in sizes]

    def velocity(t, y):
        del t
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            views = [v.view(s) for v, s in zip(torch.split(y, counts), sizes)]
            (grad,) = torch.autograd.grad(loss_of_views(*views), y)
        return -grad

    return velocity


def deep_linear(target: np.ndarray, shapes: list[tuple[int, int]]) -> Callable:
    """`½‖S − W_D ⋯ W_1‖²` (gflow's `deep_linear_loss`); `shapes` first layer first."""
    import torch

    S = torch.tensor(np.asarray(target), dtype=torch.float64)

    def loss(*weights):
        product = weights[0]
        for w in weights[1:]:
            product = w @ product
        return 0.5 * torch.sum((S - product) ** 2)

    return _velocity(loss, list(shapes))


def cooccurrence(X: np.ndarray, y: np.ndarray, a: np.ndarray, m: int, m1: int) -> Callable:
    """Yang et al.'s one-layer Transformer (gflow's `CooccurrenceTransformer`) with the mean
    logistic loss; trained `W_Q, W_K, W_V` `(m, d)` and `W` `(m1, m)`, fixed signs `a`.

    `X` is `(n, d, L)`, one token per column, as in gflow.
    """
    import torch

    X = torch.tensor(np.asarray(X), dtype=torch.float64)
    y = torch.tensor(np.asarray(y), dtype=torch.float64)
    a = torch.tensor(np.asarray(a), dtype=torch.float64)
    d = X.shape[1]
    scale = 1.0 / math.sqrt(m)

    def loss(W_Q, W_K, W_V, W):
        KX = torch.einsum("md,ndl->nml", W_K, X)
        QX = torch.einsum("md,ndl->nml", W_Q, X)
        # attention[n, k, l]: query l's softmax over keys k (gflow: softmax over axis 0).
        attention = torch.softmax(torch.einsum("nmk,nml->nkl", KX, QX) * scale, dim=1)
        pooled = torch.einsum("ndk,nk->nd", X, attention.sum(dim=2))
        outputs = (pooled @ W_V.T) @ (W.T @ a)
        return torch.nn.functional.softplus(-y * outputs).mean()

    return _velocity(loss, [(m, d), (m, d), (m, d), (m1, m)])


def attention_ffn(X: np.ndarray, y: np.ndarray, activation: str = "tanh",
                  attention: str = "exact") -> Callable:
    """Chen & Luo's attention + FFN (gflow's `AttentionFFN`) with the mean exponential loss
    `mean exp(−y f(X))`; trained `W_Q, W_K, W_V, W1` `(d, d)` and `W2` `(d,)`.

    **Arguments:**

    - `X`: the samples, `(n, s, d)`, tokens as rows, as in gflow; `y`: the `±1` labels, `(n,)`.
    - `activation`, `attention`: the model's static fields (`"tanh"` or `"identity"`,
        `"exact"` or `"linearized"` softmax).

    **Returns:**

    `f(t, y) = -∇L` on the flat vector `[W_Q, W_K, W_V, W1, W2]` (each row-major).
    """
    import torch

    if activation not in ("tanh", "identity") or attention not in ("exact", "linearized"):
        raise ValueError(f"no torch form of activation={activation!r}, attention={attention!r}")
    X = torch.tensor(np.asarray(X), dtype=torch.float64)
    y = torch.tensor(np.asarray(y), dtype=torch.float64)
    s, d = X.shape[1:]

    def loss(W_Q, W_K, W_V, W1, W2):
        # Only the last token's query row reaches the readout (as in gflow's `__call__`).
        logits = torch.einsum("nd,nkd->nk", X[:, -1] @ W_Q, X @ W_K) / math.sqrt(d)
        if attention == "exact":
            weights = torch.softmax(logits, dim=1)
        else:  # first order around the uniform distribution, as gflow's `_linearized_softmax`
            weights = (1.0 + logits - logits.mean(dim=1, keepdim=True)) / s
        hidden = torch.einsum("nk,nkd->nd", weights, X) @ W_V @ W1
        outputs = (torch.tanh(hidden) if activation == "tanh" else hidden) @ W2
        return torch.exp(-y * outputs).mean()

    return _velocity(loss, [(d, d)] * 4 + [(d,)])
