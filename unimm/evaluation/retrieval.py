"""Caption-image retrieval by a model's own likelihood: no probe, no download.

For N held-out (image, caption) pairs a generative model scores every image
against every caption, scores[i, j] = log p(image_i | caption_j), and each
image ranks the N captions by that score. Recall@k is the fraction of
images whose true caption (j = i, or any caption with the same text) is
among the k best; a model that ignores its text ranks at random, chance
recall@k = min(k, N) / N when the captions all differ.

  scores = score_matrix(score_pairs, n, batch_size=64)
  report = recall_at_k(scores, captions=captions)  # r1, r5, chance, pairs

Model-agnostic: `score_pairs(image_index [R], caption_index [R]) -> [R]`
is whatever scores a batch of pairs (for Parti, unimm.train.parti_task's
teacher-forced sum of log-probabilities over the image tokens).
"""
from collections.abc import Callable, Sequence
import math

import numpy as np

KS = (1, 5)


def score_matrix(score_pairs: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 num_pairs: int, *, batch_size: int,
                 num_captions: int | None = None) -> np.ndarray:
  """scores [num_pairs, num_captions]: score_pairs over every (image, caption).

  Args:
    score_pairs: (image_index int [R], caption_index int [R]) -> scores [R]
      (R = batch_size on every call: the last chunk is padded with pair
      (0, 0) and cut, so a compiled scorer sees one shape).
    num_pairs: the number of images N (rows).
    batch_size: pairs per call.
    num_captions: columns (default num_pairs).

  Returns:
    float64 [N, C]; row i, column j is the score of image i given caption j.
  """
  num_captions = num_pairs if num_captions is None else num_captions
  if num_pairs < 0 or num_captions < 0:
    raise ValueError(f"num_pairs={num_pairs}, num_captions={num_captions}; "
                     "expected >= 0.")
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size}; expected > 0.")
  image_index, caption_index = (x.reshape(-1) for x in np.meshgrid(
      np.arange(num_pairs), np.arange(num_captions), indexing="ij"))
  total = len(image_index)
  out = np.zeros(total, np.float64)
  for begin in range(0, total, batch_size):
    images = image_index[begin:begin + batch_size]
    captions = caption_index[begin:begin + batch_size]
    count = len(images)
    pad = batch_size - count
    if pad:
      images = np.concatenate([images, np.zeros(pad, images.dtype)])
      captions = np.concatenate([captions, np.zeros(pad, captions.dtype)])
    scores = np.asarray(score_pairs(images, captions), np.float64)
    if scores.shape != (batch_size,):
      raise ValueError(f"score_pairs returned shape {scores.shape} for "
                       f"{batch_size} pairs; expected ({batch_size},).")
    out[begin:begin + count] = scores[:count]
  return out.reshape(num_pairs, num_captions)


def _text_key(caption) -> str:
  """A caption's text with case and spacing set aside."""
  return " ".join(str(caption).lower().split())


def _same_text(captions, n: int) -> np.ndarray:
  """bool [N, N]: captions i and j have the same text (whitespace and case
  aside); the identity without captions."""
  if captions is None:
    return np.eye(n, dtype=bool)
  if len(captions) != n:
    raise ValueError(f"{len(captions)} captions for a [{n}, {n}] score "
                     "matrix; expected one caption per image.")
  texts = np.array([_text_key(c) for c in captions],
                   dtype=object)
  return texts[:, None] == texts[None, :]


def true_caption_ranks(scores, captions: Sequence[str] | None = None
                       ) -> np.ndarray:
  """int [N]: the rank (1 = best) of caption i among row i of scores [N, N].

  captions (optional): the N caption texts. A caption with the same text
  as the true one is as true (a data set whose captions come from labels
  has many): the rank is then that of the best-scoring true caption among
  the captions that differ from it, so duplicates neither help nor hurt.
  Ties count against the model: a different caption scoring exactly as high
  as the true one ranks ahead of it (a constant scorer ranks every true
  caption behind all the different ones). NaN scores count as -inf, so a
  NaN true score ranks last.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
    raise ValueError(f"scores must be a square [N images, N captions] "
                     f"matrix; got shape {scores.shape}.")
  scores = np.where(np.isnan(scores), -np.inf, scores)
  if not len(scores):
    return np.zeros(0, np.int64)
  same = _same_text(captions, len(scores))  # [N, N], the diagonal True
  best_true = np.where(same, scores, -np.inf).max(axis=1)  # [N]
  ahead = (scores >= best_true[:, None]) & ~same  # [N, N]
  return (1 + ahead.sum(axis=1)).astype(np.int64)


def recall_at_k(scores, ks: Sequence[int] = KS,
                captions: Sequence[str] | None = None) -> dict:
  """Retrieval of the true caption from scores [N images, N captions].

  Args:
    scores: scores[i, j] = log p(image_i | caption_j) (any score where
      higher means a better match); caption i belongs to image i.
    ks: the recall cut-offs.
    captions: the N caption texts, when several images may share a
      caption's text (true_caption_ranks).

  Returns:
    {"retrieval_r{k}": fraction of images whose true caption ranks <= k,
     "retrieval_chance_r{k}": the mean over images of the chance that a
     random order puts one of its g true captions among the first k,
     1 - C(N - g, k) / C(N, k) (min(k, N) / N when all differ),
     "retrieval_pairs": N, and with captions "retrieval_distinct_captions"};
    empty for N = 0.
  """
  ranks = true_caption_ranks(scores, captions)
  n = len(ranks)
  if not n:
    return {}
  true_counts = _same_text(captions, n).sum(axis=1)  # g per image
  result = {}
  for k in ks:
    k = int(k)
    result[f"retrieval_r{k}"] = float((ranks <= k).mean())
    result[f"retrieval_chance_r{k}"] = float(np.mean([
        1.0 if k >= n else k / n if g == 1 else
        1.0 - math.comb(n - g, k) / math.comb(n, k) for g in true_counts]))
  result["retrieval_pairs"] = n
  if captions is not None:
    result["retrieval_distinct_captions"] = len(
        {_text_key(c) for c in captions})
  return result
