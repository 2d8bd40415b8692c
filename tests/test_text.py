"""The text corpus and windows, and a short flow of the `text` preset."""

import jax
import numpy as np
import pytest

import gflow
from gflow import InputError
from gflow.presets import text
from gflow.tasks import text_task
# Private: the text task's pipeline (corpus, tokenizer, vocabulary, encoder), tested step by
# step; `gflow.tasks` exports only the data builder.
from gflow.tasks._text import UNKNOWN, corpus_text, encode, tokenize, vocabulary


def test_corpus_and_tokenization():
    text_ = corpus_text()
    assert len(text_) > 100_000 and text_ == text_.lower()
    assert tokenize("a+b  cd_1.", "word") == ["a", "+", "b", "cd_1", "."]
    assert tokenize("ab c", "char") == ["a", "b", " ", "c"]
    vocab = vocabulary(list("aabbbc"), 3)
    assert vocab == [UNKNOWN, "b", "a"]  # by frequency; "c" falls out
    np.testing.assert_array_equal(encode(list("abcz"), vocab), [2, 1, 0, 0])
    with pytest.raises(InputError):
        tokenize("x", "byte")


@pytest.mark.parametrize("level", ["char", "word"])
def test_windows_are_deterministic_and_consistent(level):
    data, vocab = text_task(50, 6, 24, jax.random.key(5), level=level)
    again, vocab2 = text_task(50, 6, 24, jax.random.key(5), level=level)
    np.testing.assert_array_equal(np.asarray(data.tokens), np.asarray(again.tokens))
    np.testing.assert_array_equal(np.asarray(data.targets), np.asarray(again.targets))
    assert vocab == vocab2 and len(vocab) == 24
    other, _ = text_task(50, 6, 24, jax.random.key(6), level=level)
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(data.tokens))
    # Every window plus its target is a contiguous run of the encoded corpus.
    ids = encode(tokenize(corpus_text(), level), vocab)
    tokens, targets = np.asarray(data.tokens), np.asarray(data.targets)
    assert tokens.shape == (50, 6) and tokens.max() < 24 and tokens.min() >= 0
    run = np.lib.stride_tricks.sliding_window_view(ids, 7)
    for window, target in zip(tokens, targets):
        full = np.append(window, target)
        assert np.any(np.all(run == full, axis=1))


def test_text_short_flow():
    # The paper's real-text model: 2 residual layers, GeLU; eps small for near-uniform logits.
    problem = text(n=48, length=6, vocab_size=12, level="char", d=8, m=8, layers=2, eps=1e-3,
                   embedding_std=1.0, seed=0, activation="gelu", escape_fraction=0.5)
    traj = gflow.solve(problem.flow, 10.0, ts=gflow.log_grid(0.0, 10.0, 8), rtol=1e-6,
                       observers=problem.observers, transitions=problem.transitions,
                       snapshots=problem.snapshots)
    assert traj.status == "completed"
    loss = np.asarray(traj.observables["loss"])
    assert loss[0] == pytest.approx(np.log(12), abs=1e-3)  # eps-small logits: near uniform
    assert np.all(np.diff(loss) <= 1e-8 * loss[0]) and loss[-1] < loss[0] - 0.1
    # Frozen embeddings stay bit-identical; per-group observables have one entry per group.
    np.testing.assert_array_equal(np.asarray(traj.final.E), np.asarray(problem.flow.model.E))
    for name in ("stable_rank", "relative_change", "norm"):
        assert traj.observables[name].shape == (8, 11)  # 5 groups per layer, W_out
    # Effective ranks and cosine matrices are snapshots: at t0, the transition (if reached)
    # and t1.
    assert "effective_rank" not in traj.observables and "cosine" not in traj.observables
    assert traj.snapshot_labels[0] == "t0" and traj.snapshot_labels[-1] == "end"
    assert traj.snapshots["effective_rank"].shape == (len(traj.snapshot_labels), 11)
    np.testing.assert_allclose(traj.observables["relative_change"][0], 0.0, atol=1e-15)
    W_out = np.asarray(traj.final.W_out)
    assert traj.observables["norm"][-1][10] == pytest.approx(np.linalg.norm(W_out), rel=1e-12)
    W2_layer2 = np.asarray(traj.final.W2)[1]
    assert traj.observables["norm"][-1][9] == pytest.approx(np.linalg.norm(W2_layer2), rel=1e-12)
    preds = problem.predict(traj)
    ranks = traj.snapshot("end")["effective_rank"]
    for layer in (1, 2):
        entry = preds[f"attention_rank_below_outer_layer{layer}"]
        block = ranks[5 * (layer - 1): 5 * layer]
        assert entry.measured == pytest.approx(np.mean(block[:2]))
        assert entry.predicted == pytest.approx(np.mean(block[2:]))
        assert entry.kind == "bound" and entry.holds == (entry.measured < entry.predicted)
    assert preds["loss_below_unigram"].measured == pytest.approx(loss[-1])
