"""Chen & Luo's own experiment: the anchor-function task, the synthetic decoder against a numpy
forward, Assumption-1 rates against numpy, singular-vector similarity, and a reduced
`rank-collapse` run through the command line."""

import json

import jax
import numpy as np
import pytest

import gflow
from gflow import measures
from gflow import InputError
from gflow.models import (Decoder, TokenData, decoder_accuracy,
                          decoder_cross_entropy as cross_entropy)
from gflow.tasks import anchor_function, anchor_shift


# --------------------------------------------------------------------------- task


@pytest.mark.parametrize("pairing", ["mod2", "pairs"])
def test_anchor_function_structure(pairing):
    n, s = 203, 10
    draw = anchor_function(n, jax.random.key(7), pairing=pairing)
    tokens, targets = np.asarray(draw.data.tokens), np.asarray(draw.data.targets)
    assert tokens.shape == (n, s) and targets.shape == (n,)
    is_anchor = (tokens >= 1) & (tokens <= 4)
    # Exactly one anchor per sequence, among the first s - 1 positions; keys elsewhere.
    np.testing.assert_array_equal(is_anchor.sum(axis=1), np.ones(n))
    assert not is_anchor[:, -1].any()
    keys = tokens[~is_anchor]
    assert keys.min() >= 5 and keys.max() <= 100
    position = np.argmax(is_anchor, axis=1)
    np.testing.assert_array_equal(position, np.asarray(draw.positions))
    anchors = tokens[np.arange(n), position]
    np.testing.assert_array_equal(anchors, np.asarray(draw.anchors))
    # Exact proportions: each anchor floor(n/4) or ceil(n/4) times, each position
    # floor(n/9) or ceil(n/9) times.
    counts = np.bincount(anchors, minlength=5)[1:]
    assert counts.sum() == n and counts.max() - counts.min() <= 1
    assert sorted(counts) == sorted([n // 4 + (i < n % 4) for i in range(4)])
    places = np.bincount(position, minlength=s - 1)
    assert places.sum() == n and places.max() - places.min() <= 1
    # Every target is the rule: the key after the anchor plus shift(a).
    shift = {"mod2": {1: 1, 2: 0, 3: 1, 4: 0}, "pairs": {1: 1, 2: 1, 3: 0, 4: 0}}[pairing]
    for row, a, p, y in zip(tokens, anchors, position, targets):
        assert y == row[p + 1] + shift[a]
        assert anchor_shift(int(a), pairing) == shift[a]
    assert targets.max() < 201
    # Reproducible by seed, different for another seed.
    again = anchor_function(n, jax.random.key(7), pairing=pairing)
    np.testing.assert_array_equal(np.asarray(again.data.tokens), tokens)
    other = anchor_function(n, jax.random.key(8), pairing=pairing)
    assert not np.array_equal(np.asarray(other.data.tokens), tokens)


def test_anchor_function_rejects_bad_input():
    for kwargs in (dict(n=0), dict(n=5, length=1), dict(n=5, pairing="odd"),
                   dict(n=5, vocab=100)):
        with pytest.raises(InputError):
            anchor_function(key=jax.random.key(0), **kwargs)


# --------------------------------------------------------------------------- model


def _numpy_logits(p, tokens, residual, activation, every):
    act = {"tanh": np.tanh, "identity": lambda x: x,
           "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))}[
        activation]
    r = 1.0 if residual else 0.0
    out = []
    for seq in tokens:
        H = p["E"][seq] + p["P"][: len(seq)]
        s, d = H.shape
        for l in range(p["W_Q"].shape[0]):
            scores = (H @ p["W_Q"][l]) @ (H @ p["W_K"][l]).T / np.sqrt(d)
            scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
            A = np.exp(scores - scores.max(axis=1, keepdims=True))
            A /= A.sum(axis=1, keepdims=True)
            H = r * H + A @ (H @ p["W_V"][l])
            if every:
                H = r * H + act(H @ p["W1"][l]) @ p["W2"][l]
        h = H[-1]
        if not every:
            h = r * h + act(h @ p["W1"]) @ p["W2"]
        out.append(h @ p["W_out"])
    return np.array(out)


def _numpy_loss(p, tokens, targets, **kw):
    z = _numpy_logits(p, tokens, **kw)
    m = z.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
    return float(np.mean(lse - z[np.arange(len(targets)), targets]))


def test_decoder_accuracy_is_the_arg_max_with_ties_counted_wrong():
    """Against NumPy's arg-max of the logits (a unique largest logit), for the targets and for
    other answers; a tie for the largest (all-zero logits) is a miss, not the first index."""
    V, s, n = 11, 5, 64
    model = Decoder.init(jax.random.key(3), vocab=V, length=s, d=6, m=8, std=0.8,
                         embedding_std=1.0, readout_std=1.0, activation="tanh",
                         residual=False, train_embeddings=False, train_readout=False)
    rng = np.random.default_rng(1)
    data = TokenData(rng.integers(0, V, (n, s)), rng.integers(0, V, n))
    top = np.argmax(np.asarray(model.logits(data.tokens)), axis=1)
    answers = np.where(rng.random(n) < 0.5, top, rng.integers(0, V, n))
    for wanted in (None, answers):
        expected = np.mean(top == (np.asarray(data.targets) if wanted is None else wanted))
        assert float(decoder_accuracy(model, data, wanted)) == expected
    assert 0.3 < np.mean(top == answers) < 1  # both hits and misses were counted
    zero = jax.tree_util.tree_map(lambda w: 0 * w if hasattr(w, "shape") else w, model)
    assert float(decoder_accuracy(zero, TokenData(data.tokens, np.zeros(n, int)))) == 0.0


# Chen & Luo's real-text model; their synthetic model (no residual, tanh, one layer) is
# checked against an exact numpy backward pass in the next test.
@pytest.mark.parametrize("variant", [
    dict(residual=True, activation="gelu", every=True, layers=2),
])
def test_decoder_loss_and_gradient_match_numpy(variant):
    """Loss to 1e-12 against the numpy forward; gradient against its central differences
    (the exact backward pass is checked at 1e-12 in the next test)."""
    V, s, d, m, n = 7, 4, 3, 4, 4
    layers = variant["layers"]
    model = Decoder.init(jax.random.key(2), vocab=V, length=s, d=d, m=m, layers=layers,
                         std=0.6, embedding_std=1.0, readout_std=0.5,
                         activation=variant["activation"], residual=variant["residual"],
                         train_embeddings=False, train_readout=False,
                         ffn_every_layer=variant["every"])
    rng = np.random.default_rng(0)
    data = TokenData(rng.integers(0, V, (n, s)), rng.integers(0, V, n))
    names = ("E", "P", "W_Q", "W_K", "W_V", "W1", "W2", "W_out")
    p = {k: np.asarray(getattr(model, k)) for k in names}
    kw = dict(residual=variant["residual"], activation=variant["activation"],
              every=variant["every"])
    tokens, targets = np.asarray(data.tokens), np.asarray(data.targets)
    loss = float(cross_entropy(model, data))
    assert abs(loss - _numpy_loss(p, tokens, targets, **kw)) <= 1e-12
    # Gradient of the trainable weights by central differences of the numpy loss
    # (step 1e-5: truncation error of order h^2 = 1e-10 times third derivatives).
    flow = gflow.GradientFlow(model, cross_entropy, data, trainable=model.trainable_spec())
    grad = jax.tree_util.tree_map(lambda v: -v, flow.combine(flow.velocity(flow.params)))
    h = 1e-5
    for name in ("W_Q", "W_K", "W_V", "W1", "W2"):
        g = np.asarray(getattr(grad, name))
        num = np.zeros_like(g)
        for idx in np.ndindex(g.shape):
            for sign in (1, -1):
                q = {k: v.copy() for k, v in p.items()}
                q[name][idx] += sign * h
                num[idx] += sign * _numpy_loss(q, tokens, targets, **kw) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=0, atol=1e-8)
    # Frozen parts do not move.
    spec = model.trainable_spec()
    assert spec.E is False and spec.P is False and spec.W_out is False


def test_decoder_gradient_exact_against_numpy_adjoint():
    """The tiny case at 1e-12: the hand-written numpy backward pass of the one-layer
    no-residual model (softmax attention of the last token, tanh FFN, fixed readout)."""
    V, s, d, m, n = 11, 4, 3, 6, 5
    model = Decoder.init(jax.random.key(5), vocab=V, length=s, d=d, m=m, std=0.7,
                         embedding_std=1.0, readout_std=0.5, residual=False,
                         train_embeddings=False, train_readout=False)
    rng = np.random.default_rng(1)
    data = TokenData(rng.integers(0, V, (n, s)), rng.integers(0, V, n))
    E, P = np.asarray(model.E), np.asarray(model.P)
    WQ, WK, WV = (np.asarray(getattr(model, k))[0] for k in ("W_Q", "W_K", "W_V"))
    W1, W2, Wo = np.asarray(model.W1), np.asarray(model.W2), np.asarray(model.W_out)
    grads = {k: 0.0 for k in ("W_Q", "W_K", "W_V", "W1", "W2")}
    loss = 0.0
    for seq, y in zip(np.asarray(data.tokens), np.asarray(data.targets)):
        H = E[seq] + P[:s]
        q, K = H[-1] @ WQ, H @ WK
        z = K @ q / np.sqrt(d)
        a = np.exp(z - z.max())
        a /= a.sum()
        c = a @ H  # context before W_V
        h = c @ WV
        u = h @ W1
        f = np.tanh(u)
        o = f @ W2
        logits = o @ Wo
        pr = np.exp(logits - logits.max())
        pr /= pr.sum()
        loss += -np.log(pr[y]) / n
        g_logits = (pr - np.eye(V)[y]) / n
        g_o = Wo @ g_logits
        grads["W2"] = grads["W2"] + np.outer(f, g_o)
        g_u = (W2 @ g_o) * (1 - f**2)
        grads["W1"] = grads["W1"] + np.outer(h, g_u)
        g_h = W1 @ g_u
        grads["W_V"] = grads["W_V"] + np.outer(c, g_h)
        g_a = H @ (WV @ g_h)
        g_z = a * (g_a - a @ g_a)
        g_q = K.T @ g_z / np.sqrt(d)
        g_K = np.outer(g_z, q) / np.sqrt(d)
        grads["W_Q"] = grads["W_Q"] + np.outer(H[-1], g_q)
        grads["W_K"] = grads["W_K"] + H.T @ g_K
    assert abs(float(cross_entropy(model, data)) - loss) <= 1e-12
    flow = gflow.GradientFlow(model, cross_entropy, data, trainable=model.trainable_spec())
    velocity = flow.combine(flow.velocity(flow.params))
    for name, g in grads.items():
        got = -np.asarray(getattr(velocity, name))
        got = got[0] if name in ("W_Q", "W_K", "W_V") else got
        np.testing.assert_allclose(got, g, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- measures


def _numpy_rates(W_v, W1, W2):
    d = len(W_v)
    a1 = sum(W2[i] * (W_v @ W1[:, i]) > 0 and W_v[i] * (W1[i] @ W2) > 0 for i in range(d))
    a2 = sum(
        np.dot(W2[i] * W1[:, i], W2[j] * W1[:, j]) > 0
        and np.dot(W_v[i] * W1[i], W_v[j] * W1[j]) > 0
        for i in range(d) for j in range(d)
    )
    return a1 / d, a2 / d**2


def test_assumption1_rates_match_numpy():
    rng = np.random.default_rng(3)
    for trial in range(5):
        d = 7
        W_v, W1, W2 = rng.normal(size=d), rng.normal(size=(d, d)), rng.normal(size=d)
        scale = 10.0 ** (-3 * trial)  # scale-free down to 1e-12
        got = np.asarray(measures.assumption1_rates(scale * W_v, scale * W1, scale * W2))
        np.testing.assert_allclose(got, _numpy_rates(W_v, W1, W2), rtol=0, atol=1e-15)
    # Constructed: all positive factors satisfy everything.
    d = 5
    W_v, W1, W2 = np.ones(d), rng.uniform(0.1, 1, (d, d)), rng.uniform(0.1, 1, d)
    np.testing.assert_array_equal(measures.assumption1_rates(W_v, W1, W2), [1.0, 1.0])
    # Nothing: a zero W_v makes every product vanish.
    np.testing.assert_array_equal(measures.assumption1_rates(np.zeros(d), W1, W2), [0.0, 0.0])
    # k small negative entries of W2 (small enough that every W1_i W2 stays positive): A1
    # loses those k, A2 keeps the pairs of equal sign.
    k = 2
    W2_mixed = W2 * np.where(np.arange(d) < k, -0.01, 1.0)
    assert np.all(W1 @ W2_mixed > 0)
    np.testing.assert_allclose(measures.assumption1_rates(W_v, W1, W2_mixed),
                               [(d - k) / d, ((d - k) ** 2 + k**2) / d**2])


def test_assumption1_observer_uses_the_target_direction():
    rng = np.random.default_rng(4)
    d = 6
    model = gflow.models.AttentionFFN.init(d, 0.3, jax.random.key(0))
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    got = np.asarray(gflow.observers.assumption1_rates(lambda m: (m.W_V, m.W1, m.W2), v)(model))
    want = _numpy_rates(v @ np.asarray(model.W_V), np.asarray(model.W1), np.asarray(model.W2))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)


def test_singular_vector_similarity():
    rng = np.random.default_rng(5)
    U, _, _ = np.linalg.svd(rng.normal(size=(6, 6)))
    U = U[:, :3]
    assert float(measures.singular_vector_similarity(U, U)) == pytest.approx(1.0, abs=1e-14)
    flipped = U * np.array([1.0, -1.0, 1.0])
    assert float(measures.singular_vector_similarity(U, flipped)) == pytest.approx(1.0, abs=1e-14)
    rolled = np.roll(U, 1, axis=1)  # each column orthogonal to its counterpart
    assert float(measures.singular_vector_similarity(U, rolled)) == pytest.approx(0.0, abs=1e-14)
    # Batched over save times, against numpy.
    A, B = rng.normal(size=(4, 6, 3)), rng.normal(size=(4, 6, 3))
    want = np.mean(np.abs(np.sum(A * B, axis=1))
                   / (np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1)), axis=1)
    np.testing.assert_allclose(measures.singular_vector_similarity(A, B), want, rtol=1e-13)


# --------------------------------------------------------------------------- the preset


def test_reduced_rank_collapse_transitions_and_states_there(tmp_path, capsys):
    """The three transitions in order, in one solve; the observables recorded at each located
    transition (transitions.npz) meet its criterion there, and the heat-map columns are those
    states; the conserved quantities hold to the solver's tolerance."""
    from conftest import REDUCED_RANK_COLLAPSE

    # Private: the in-process command line, exactly what the console script `gflow-solve` runs.
    from gflow._cli import main

    out = tmp_path / "run"
    args = [a for o in REDUCED_RANK_COLLAPSE for a in ("--set", o)]
    assert main(["rank-collapse", *args, "--out", str(out)]) == 0
    # The report fits a terminal of 100 columns: the long measured strings of the qualitative
    # predictions and the criteria wrap under their rows.
    report = capsys.readouterr().out.splitlines()
    assert max(map(len, report)) <= 100, max(report, key=len)
    assert any(line.startswith("      measured: effective") for line in report)
    summary = json.loads((out / "summary.json").read_text())
    times = summary["transitions"]
    assert list(times) == ["condensation", "stage2_onset", "kq_collapse"]
    assert 0 < times["condensation"] < times["stage2_onset"] < times["kq_collapse"] < 300
    predictions = summary["predictions"]
    assert summary["stats"].get("passes", 1) == 1  # the figures needed no second solve
    traj = gflow.load(out)
    # The default preset's observables (16 of them, matrices included) in a short repr.
    assert len(repr(traj)) <= 1000 and len(repr(traj).splitlines()) <= 6
    assert traj.components["stable_rank"] == ("W_Q", "W_K", "W_V", "W1", "W2")
    assert list(traj.to_xarray()["stable_rank_component"].values)[:2] == ["W_Q", "W_K"]
    from gflow.figures import heatmap_times
    assert heatmap_times(traj) == {"t0": 0.0, **times, "end": 300.0}
    # The state recorded at each transition meets its criterion there (the condition is 0).
    assert list(traj.at_transitions) == list(times)
    for name, t in times.items():
        at = traj.at_transitions[name]
        assert not any(traj.ts == t)  # no save time there: the engine observed the root
        sr, rc = at["stable_rank"], at["relative_change"]
        if name == "condensation":
            level = 0.4 * np.mean(traj.observables["stable_rank"][0, 2:])
            assert np.mean(sr[2:]) == pytest.approx(level, rel=1e-4)
            assert rc[0] < 0.1 * rc[2]  # W_Q has not moved; W_V has
        elif name == "stage2_onset":
            assert rc[0] == pytest.approx(0.2, rel=1e-4)
        else:
            assert max(sr[:2]) == pytest.approx(3.0, rel=1e-4)
    # Conserved quantities: drift tiny against the size of the quantities themselves (an
    # integration check, taken at the snapshots: t0, the transitions, the chosen times, t1).
    assert "conserved_drift" not in traj.observables
    drift = np.max(traj.snapshots["conserved_drift"])
    scale = np.max(traj.observables["norm"]) ** 2
    at_t0 = traj.snapshots["conserved_drift"][list(traj.snapshot_labels).index("t0")]
    assert np.max(at_t0) < 1e-14 * scale  # rounding only
    assert drift < 1e-4 * scale
    assert (out / "figures" / "chen_luo_fig1.png").is_file()
    assert (out / "figures" / "chen_luo_fig2.png").is_file()
    row = predictions["attention_collapses_below_outer"]
    assert row["kind"] == "qualitative" and row["holds"] in (True, False)
    # The held-out loss and accuracy are snapshots (their forward pass on the held-out set is
    # not an ordinary save time's): at the end they are those of the final model, recomputed
    # here, and the prediction row reports them there.
    from gflow import presets

    assert "held_out_loss" not in traj.observables
    problem = presets.build(presets.resolve("rank-collapse", list(REDUCED_RANK_COLLAPSE)))
    final = gflow.load(out, like=problem.flow.combine(problem.flow.params)).final
    held_out = problem.snapshots["held_out_loss"].held_out
    end = list(traj.snapshot_labels).index("end")
    assert traj.snapshot_ts[end] == 300.0
    assert traj.snapshots["held_out_loss"][end] == pytest.approx(
        float(cross_entropy(final, held_out)), rel=1e-12)
    held = float(np.mean(np.argmax(np.asarray(final.logits(held_out.tokens)), axis=1)
                         == np.asarray(held_out.targets)))
    assert traj.snapshots["held_out_accuracy"][end] == held
    assert predictions["held_out_accuracy"]["measured"].startswith(f"held-out {held:.3g}, train ")
