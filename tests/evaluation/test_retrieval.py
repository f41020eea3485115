"""Tests for caption-image retrieval by a model's own scores."""
import numpy as np
import pytest

from unimm.evaluation import retrieval


def test_perfect_scores_recall_everything():
  scores = np.full((8, 8), -10.0)
  np.fill_diagonal(scores, -1.0)
  report = retrieval.recall_at_k(scores)
  assert report == {"retrieval_r1": 1.0, "retrieval_r5": 1.0,
                    "retrieval_chance_r1": 1 / 8, "retrieval_chance_r5": 5 / 8,
                    "retrieval_pairs": 8}


def test_reversed_scores_rank_the_true_caption_last():
  # Row i scores caption j by |i - j|: the true caption scores lowest.
  n = 10
  i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  scores = np.abs(i - j).astype(float)
  np.testing.assert_array_equal(retrieval.true_caption_ranks(scores),
                                np.full(n, n))
  report = retrieval.recall_at_k(scores)
  assert report["retrieval_r1"] == 0.0 and report["retrieval_r5"] == 0.0
  assert report["retrieval_chance_r1"] == 0.1
  assert report["retrieval_chance_r5"] == 0.5


def test_ranks_count_ties_against_the_model():
  scores = np.array([[0.0, 0.0, -1.0],    # tie with one other: rank 2
                     [-5.0, -2.0, -3.0],  # best: rank 1
                     [0.0, 1.0, 0.0]])    # one better, one tie: rank 3
  np.testing.assert_array_equal(retrieval.true_caption_ranks(scores),
                                [2, 1, 3])
  # A scorer blind to the caption (every column equal) never retrieves.
  constant = np.tile(np.arange(6.0)[:, None], (1, 6))
  report = retrieval.recall_at_k(constant)
  assert report["retrieval_r1"] == 0.0 and report["retrieval_r5"] == 0.0


def test_captions_with_the_true_text_count_as_true():
  # Images 0 and 2 share a caption's text (as label-made captions do).
  captions = ["a digit seven", "a digit one", "A digit  seven"]
  scores = np.array([[-2.0, -3.0, -1.0],   # the twin scores best: rank 1
                     [-1.0, -2.0, -3.0],   # one different caption ahead: 2
                     [-1.0, -4.0, -5.0]])  # the twin's score counts: 1
  np.testing.assert_array_equal(
      retrieval.true_caption_ranks(scores, captions), [1, 2, 1])
  # Without the texts the twin counts as a wrong caption.
  np.testing.assert_array_equal(retrieval.true_caption_ranks(scores),
                                [2, 2, 3])
  report = retrieval.recall_at_k(scores, ks=(1,), captions=captions)
  assert report["retrieval_r1"] == pytest.approx(2 / 3)
  assert report["retrieval_distinct_captions"] == 2
  # Chance: a random order puts one of g true captions first with g / N.
  assert report["retrieval_chance_r1"] == pytest.approx((2 + 1 + 2) / 9)
  # A scorer blind to the caption stays at or below chance.
  blind = np.tile(np.arange(3.0)[:, None], (1, 3))
  assert retrieval.recall_at_k(blind, ks=(1,),
                               captions=captions)["retrieval_r1"] == 0.0
  with pytest.raises(ValueError, match="2 captions for a \\[3, 3\\]"):
    retrieval.true_caption_ranks(scores, captions[:2])


def test_nan_true_score_ranks_last():
  scores = np.array([[np.nan, -3.0, -4.0], [-1.0, -0.5, np.nan],
                     [0.0, 0.0, 1.0]])
  np.testing.assert_array_equal(retrieval.true_caption_ranks(scores),
                                [3, 1, 1])


def test_fewer_pairs_than_k():
  scores = np.array([[-1.0, 0.0, -3.0], [-2.0, 0.0, -2.0],
                     [0.0, -1.0, -5.0]])
  report = retrieval.recall_at_k(scores)
  # Ranks 2, 1, 3: R@1 = 1/3, and R@5 = 1 as it is by chance with 3 pairs.
  assert report["retrieval_r1"] == pytest.approx(1 / 3)
  assert report["retrieval_r5"] == 1.0
  assert report["retrieval_chance_r5"] == 1.0
  assert report["retrieval_chance_r1"] == pytest.approx(1 / 3)
  assert report["retrieval_pairs"] == 3
  assert retrieval.recall_at_k(np.zeros((0, 0))) == {}


def test_rejects_non_square_scores():
  with pytest.raises(ValueError, match="square"):
    retrieval.recall_at_k(np.zeros((3, 4)))


def test_score_matrix_covers_every_pair_in_fixed_batches():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(5, 5))
  sizes = []

  def score_pairs(images, captions):
    sizes.append(len(images))
    return table[images, captions]

  scores = retrieval.score_matrix(score_pairs, 5, batch_size=7)
  np.testing.assert_array_equal(scores, table)
  assert sizes == [7] * 4  # 25 pairs: 3 full chunks, one padded to 7
  with pytest.raises(ValueError, match="returned shape"):
    retrieval.score_matrix(lambda i, j: np.zeros(3), 2, batch_size=4)
