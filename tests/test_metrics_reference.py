"""validate's metric helpers agree with scikit-learn's (the reference implementation).

The package computes them with numpy (a few lines each) rather than depend on scikit-learn and
SciPy at run time; this test holds the two to the same numbers on random labels.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

from onnxprune.validation.compare import classification_scores, cosine_similarity

labels_and_predictions = st.integers(1, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 6), min_size=n, max_size=n),
        st.lists(st.integers(0, 6), min_size=n, max_size=n),
    )
)


@settings(max_examples=80, deadline=None)
@given(labels_and_predictions)
def test_classification_scores_match_scikit_learn(pair) -> None:
    labels, predictions = (np.array(x) for x in pair)
    ours = classification_scores(labels, predictions)
    p, r, f, _ = precision_recall_fscore_support(
        labels, predictions, average="macro", zero_division=0
    )
    assert ours.accuracy == accuracy_score(labels, predictions)
    assert np.isclose(ours.precision, p) and np.isclose(ours.recall, r)
    assert np.isclose(ours.f1, f)


def test_cosine_matches_scikit_learn_row_by_row() -> None:
    rng = np.random.default_rng(0)
    ref, new = rng.standard_normal((16, 3, 5)), rng.standard_normal((16, 3, 5))
    expected = np.diag(sk_cosine(ref.reshape(16, -1), new.reshape(16, -1)))
    assert np.allclose(cosine_similarity(ref, new), expected)
