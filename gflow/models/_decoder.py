"""A small causal decoder for next-token tasks: anchor functions (Zhang et al.; Chen & Luo)
and real text.

Shape convention: a sample is a sequence of `s` integer tokens from a vocabulary of size `V`;
a batch of samples is `(n, s)`, its targets `(n,)`. Hidden states are `H ∈ R^{s×d}`, tokens as
ROWS (as in `AttentionFFN`).

    H⁰ = E[tokens] + P                                   (token + position embeddings)
    Hˡ = r Hˡ⁻¹ + softmax(mask(Hˡ⁻¹ W_Qˡ W_Kˡᵀ Hˡ⁻¹ᵀ / √d)) Hˡ⁻¹ W_Vˡ,   l = 1..L  (causal)
    h  = r H^L_s + act(H^L_s W1) W2                      (FFN on the last token)
    logits = h W_out ∈ R^V,     loss = cross-entropy of logits against the target token

with `E ∈ R^{V×d}`, `P ∈ R^{s×d}`, `W_Qˡ, W_Kˡ, W_Vˡ ∈ R^{d×d}` (stacked on a leading layer
axis), `W1 ∈ R^{d×m}`, `W2 ∈ R^{m×d}`, `W_out ∈ R^{d×V}`, and `r = 1` with residual
connections (`residual=True`, the default), `r = 0` without (Chen & Luo's synthetic model). No
LayerNorm. With one FFN (`W1` a matrix) it sits after the last attention layer and, as only the
last token is read out and the FFN acts token-wise, it is evaluated on the last token alone.
With `W1 (L, d, m)`, `W2 (L, m, d)` every layer is a full block, attention then FFN on every
token, `Hˡ ← r Hˡ + act(Hˡ W1ˡ) W2ˡ` (the paper's 2-layer real-text model). The embeddings
`E, P` and the readout `W_out` are trainable or frozen (`Decoder.trainable_spec`).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

from .._errors import InputError

_ACTIVATIONS = {"tanh": jnp.tanh, "gelu": jax.nn.gelu, "identity": lambda x: x}
# Matrix fields of the decoder, in the order the presets report them.
WEIGHTS = ("W_Q", "W_K", "W_V", "W1", "W2", "W_out")


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


class TokenData(eqx.Module):
    """Token sequences with one next-token target each.

    **Fields:**

    - `tokens`: `(n, s)` integer tokens.
    - `targets`: `(n,)` integer target tokens (the token that follows the last position).
    """

    tokens: Int[Array, "n s"]
    targets: Int[Array, " n"]

    def __init__(self, tokens, targets):
        self.tokens = jnp.asarray(tokens, dtype=jnp.int32)
        self.targets = jnp.asarray(targets, dtype=jnp.int32)

    def __check_init__(self):
        if self.tokens.ndim != 2 or self.targets.shape != self.tokens.shape[:1]:
            raise InputError(
                f"TokenData needs tokens (n, s) and targets (n,), got {self.tokens.shape}, "
                f"{self.targets.shape}"
            )


class Decoder(eqx.Module):
    """The decoder of the module docstring (default float dtype: float64 with gflow).

    **Fields:** `E (V, d)`, `P (s, d)`, `W_Q, W_K, W_V (L, d, d)`, `W1 (d, m)` and `W2 (m, d)`
    (one FFN after the last layer) or `W1 (L, d, m)` and `W2 (L, m, d)` (an FFN in every
    layer), `W_out (d, V)`; static: `activation` (`"tanh"`, `"gelu"` or `"identity"`),
    `train_embeddings` (whether `trainable_spec` lets `E, P` evolve), `residual` (residual
    connections around attention and FFN), `train_readout` (whether `W_out` evolves).
    """

    E: Float[Array, "V d"]
    P: Float[Array, "s d"]
    W_Q: Float[Array, "L d d"]
    W_K: Float[Array, "L d d"]
    W_V: Float[Array, "L d d"]
    W1: Float[Array, "d m"]
    W2: Float[Array, "m d"]
    W_out: Float[Array, "d V"]
    activation: str = eqx.field(static=True, default="tanh")
    train_embeddings: bool = eqx.field(static=True, default=True)
    residual: bool = eqx.field(static=True, default=True)
    train_readout: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if self.activation not in _ACTIVATIONS:
            raise InputError(
                f"activation must be one of {', '.join(_ACTIVATIONS)}, got {self.activation!r}"
            )
        V, d = self.E.shape if self.E.ndim == 2 else (None, None)
        if V is None or self.P.ndim != 2 or self.P.shape[1] != d:
            raise InputError(f"E must be (V, d) and P (s, d), got {self.E.shape}, {self.P.shape}")
        for name in ("W_Q", "W_K", "W_V"):
            W = getattr(self, name)
            if W.ndim != 3 or W.shape[1:] != (d, d) or W.shape[0] != self.W_Q.shape[0]:
                raise InputError(f"{name} must be (L, {d}, {d}) like W_Q, got {W.shape}")
        if self.W_Q.shape[0] < 1:
            raise InputError("the decoder needs at least one attention layer")
        if self.W1.ndim == 3:
            if self.W1.shape[:2] != (self.W_Q.shape[0], d):
                raise InputError(f"W1 must be ({d}, m) or (L, {d}, m), got {self.W1.shape}")
            wanted = (self.W1.shape[0], self.W1.shape[2], d)
        elif self.W1.ndim == 2 and self.W1.shape[0] == d:
            wanted = self.W1.shape[::-1]
        else:
            raise InputError(f"W1 must be ({d}, m) or (L, {d}, m), got {self.W1.shape}")
        if self.W2.shape != wanted:
            raise InputError(f"W2 must be {wanted}, got {self.W2.shape}")
        if self.W_out.shape != (d, V):
            raise InputError(f"W_out must be ({d}, {V}), got {self.W_out.shape}")
        if all(_is_concrete(leaf) for leaf in jax.tree_util.tree_leaves(self)):
            for name in ("E", "P", *WEIGHTS):
                if not np.all(np.isfinite(np.asarray(getattr(self, name)))):
                    raise InputError(f"{name} has non-finite entries")

    @classmethod
    def init(
        cls,
        key: PRNGKeyArray,
        *,
        vocab: int,
        length: int,
        d: int,
        m: int,
        layers: int = 1,
        gamma: float | None = None,
        std: float | None = None,
        embedding_std: float | None = None,
        readout_std: float | None = None,
        activation: str = "tanh",
        train_embeddings: bool = True,
        residual: bool = True,
        train_readout: bool = True,
        ffn_every_layer: bool = False,
    ) -> "Decoder":
        """Gaussian initialization with an explicit scale.

        **Arguments:**

        - `key`: PRNG key. `vocab`, `length` (`s`), `d`, `m`, `layers`: sizes.
        - `gamma`: std of every entry is `d_in^{−gamma}` with `d_in` the matrix's fan-in
            (`V` for the one-hot-fed `E`, `s` for `P`, `d` for `W_Q, W_K, W_V, W1, W_out`,
            `m` for `W2`): Zhang et al.'s initialization rate.
        - `std`: alternatively one std for every weight matrix (exactly one of `gamma`, `std`).
        - `embedding_std`: std of `E, P`, overriding the rule above (e.g. `1` for frozen
            random embeddings under a small `std`).
        - `readout_std`: std of `W_out`, overriding the rule above (e.g. for a fixed readout).
        - `activation`, `train_embeddings`, `residual`, `train_readout`: as the fields.
        - `ffn_every_layer`: an FFN in every layer (`W1 (L, d, m)`, `W2 (L, m, d)`) instead of
            one after the last.
        """
        if (gamma is None) == (std is None):
            raise InputError("Decoder.init needs exactly one of gamma and std")
        if min(vocab, length, d, m, layers) < 1:
            raise InputError("Decoder sizes vocab, length, d, m, layers must all be >= 1")
        if std is not None and not std >= 0:
            raise InputError(f"std must be >= 0, got {std}")

        def scale(fan_in):
            return std if std is not None else fan_in ** (-gamma)

        shapes = {
            "E": ((vocab, d), vocab),
            "P": ((length, d), length),
            "W_Q": ((layers, d, d), d),
            "W_K": ((layers, d, d), d),
            "W_V": ((layers, d, d), d),
            "W1": (((layers, d, m) if ffn_every_layer else (d, m)), d),
            "W2": (((layers, m, d) if ffn_every_layer else (m, d)), m),
            "W_out": ((d, vocab), d),
        }
        keys = jax.random.split(key, len(shapes))
        arrays = {}
        for k, (name, (shape, fan_in)) in zip(keys, shapes.items()):
            s = scale(fan_in)
            if name in ("E", "P") and embedding_std is not None:
                s = embedding_std
            if name == "W_out" and readout_std is not None:
                s = readout_std
            arrays[name] = s * jax.random.normal(k, shape, dtype=float)
        return cls(**arrays, activation=activation, train_embeddings=train_embeddings,
                   residual=residual, train_readout=train_readout)

    def trainable_spec(self) -> "Decoder":
        """Filter spec for `GradientFlow(trainable=...)`: every weight, `E, P` only when
        `train_embeddings`, `W_out` only when `train_readout`."""
        spec = jax.tree_util.tree_map(lambda _: True, self)
        if not self.train_embeddings:
            spec = eqx.tree_at(lambda m: (m.E, m.P), spec, (False, False))
        if not self.train_readout:
            spec = eqx.tree_at(lambda m: m.W_out, spec, False)
        return spec

    def hidden(self, tokens: Int[Array, " s"]) -> Float[Array, " d"]:
        """The last token's hidden state after attention and FFN."""
        s = tokens.shape[0]
        d = self.E.shape[1]
        H = self.E[tokens] + self.P[:s]
        causal = jnp.tril(jnp.ones((s, s), dtype=bool))
        act = _ACTIVATIONS[self.activation]
        r = 1.0 if self.residual else 0.0
        every = self.W1.ndim == 3
        layers = self.W_Q.shape[0]
        for l in range(layers - 1):
            scores = (H @ self.W_Q[l]) @ (H @ self.W_K[l]).T / math.sqrt(d)
            scores = jnp.where(causal, scores, -jnp.inf)
            H = r * H + jax.nn.softmax(scores, axis=-1) @ (H @ self.W_V[l])
            if every:
                H = r * H + act(H @ self.W1[l]) @ self.W2[l]
        # Only the last token is read out: the last layer needs its query row alone (it sees
        # every token), and the products are ordered to cost O(s d + d²), not O(s d²).
        l = layers - 1
        query = self.W_K[l] @ (self.W_Q[l].T @ H[-1])
        weights = jax.nn.softmax(H @ query / math.sqrt(d))
        h = r * H[-1] + (weights @ H) @ self.W_V[l]
        if every:
            return r * h + act(h @ self.W1[l]) @ self.W2[l]
        return r * h + act(h @ self.W1) @ self.W2

    def __call__(self, tokens: Int[Array, " s"]) -> Float[Array, " V"]:
        """The next-token logits of one sequence."""
        return self.hidden(tokens) @ self.W_out

    def logits(self, tokens: Int[Array, "n s"]) -> Float[Array, "n V"]:
        """The next-token logits of a batch."""
        return jax.vmap(self)(tokens)


def per_sample_cross_entropy(model: Decoder, data: TokenData) -> Float[Array, " n"]:
    """`logsumexp(logits) − logits[target]` of each sample."""
    logits = model.logits(data.tokens)
    target_logit = jnp.take_along_axis(logits, data.targets[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - target_logit


def cross_entropy(model: Decoder, data: TokenData) -> Scalar:
    """Mean next-token cross-entropy (natural log) of the batch.

    **Arguments:**

    - `model`: a `Decoder`.
    - `data`: `TokenData`.

    **Returns:**

    The scalar loss; `log V` for all-zero logits.
    """
    return jnp.mean(per_sample_cross_entropy(model, data))


def accuracy(model: Decoder, data: TokenData, answers: Int[Array, " n"] | None = None) -> Scalar:
    """Fraction of samples whose arg-max logit is `answers` (default: the targets); a tie for
    the largest logit counts as a miss (all-zero logits score 0).

    **Arguments:**

    - `model`: a `Decoder`.
    - `data`: `TokenData`.
    - `answers`: `(n,)` the tokens counted as right (default `data.targets`).

    **Returns:**

    The scalar accuracy.
    """
    answers = data.targets if answers is None else jnp.asarray(answers)
    logits = model.logits(data.tokens)
    answer = jnp.take_along_axis(logits, answers[:, None], axis=1)[:, 0]
    # The largest other logit (a max), not an arg-max: XLA's CPU arg-max, a reduction of
    # value-index pairs, cost a tenth of the forward pass it follows.
    vocab = jnp.arange(logits.shape[1])
    others = jnp.max(jnp.where(vocab == answers[:, None], -jnp.inf, logits), axis=1)
    return jnp.mean((answer > others).astype(float))
