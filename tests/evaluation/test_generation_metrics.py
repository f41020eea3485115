"""FID and CLIP score over a prompt set: generation_metrics equals fid / clip
computed directly, checks its settings before sampling, reads prompt files
and data sources. Tiny random networks: the FID Inception of test_fid (as
.npz) and the CLIP checkpoint of test_clip."""
# Fixture arguments shadow the imported fixtures; some are only set-up.
# pylint: disable=redefined-outer-name,unused-argument
import json
import os
import sys

import numpy as np
import pytest
import scipy.linalg

from unimm.evaluation import clip
from unimm.evaluation import fid
from unimm.evaluation import generation_metrics as gm
from unimm.evaluation import inception
from unimm.inference import text_to_image

torch = pytest.importorskip("torch")  # the "torch-ref" / "test" extra
pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
# Fixtures are used by name: pytest finds them in this module's namespace.
# pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
from test_clip import checkpoint  # noqa: E402,F401
from test_fid import _images  # noqa: E402
from test_fid import _low_rank_sqrtm  # noqa: E402
from test_fid import _torch_one_thread  # noqa: E402,F401
from test_fid import reference  # noqa: E402,F401
from test_fid import weights_path  # noqa: E402,F401
# pylint: enable=g-import-not-at-top,unused-import,wrong-import-position

BATCH = 2  # prompts per sample_fn call; also the Inception batch
PROMPTS = ["a red circle", "two blue squares", "a photo of a cat"]


@pytest.fixture(scope="module")
def weights_npz(weights_path, tmp_path_factory):
  path = tmp_path_factory.mktemp("inception_npz") / "inception.npz"
  inception.convert_to_npz(weights_path, path)
  return str(path)


@pytest.fixture(scope="module")
def net(weights_npz):
  return fid.load_inception(weights_npz)


@pytest.fixture(scope="module")
def clip_dir(checkpoint):
  return checkpoint[0]


@pytest.fixture(scope="module")
def loaded_clip(clip_dir):
  return clip.load_clip(clip_dir)


@pytest.fixture
def clip_model(loaded_clip, clip_dir, monkeypatch):
  """The module's one loaded CLIP, also for generation_metrics' load_clip:
  each load builds new jitted encoders (~1 s of compiling each here)."""
  load_clip = clip.load_clip
  monkeypatch.setattr(clip, "load_clip", lambda directory, **kw: (
      loaded_clip if directory == clip_dir else load_clip(directory, **kw)))
  return loaded_clip


@pytest.fixture
def low_rank_sqrtm(monkeypatch):
  """A 2048 x 2048 sqrtm takes 30-80 s here; the products here have rank < 4."""
  monkeypatch.setattr(scipy.linalg, "sqrtm",
                      _low_rank_sqrtm(scipy.linalg.sqrtm))


GENERATED = _images(len(PROMPTS), 32, 32, seed=11)  # [3, 32, 32, 3]


class FakeSampler:
  """Image i for PROMPTS[i] (any other prompt: image 0); records calls."""

  def __init__(self, images=GENERATED, prompts=PROMPTS):
    self.images, self.index = images, {p: i for i, p in enumerate(prompts)}
    self.calls = []

  def __call__(self, prompts, batch_index):
    self.calls.append((list(prompts), batch_index))
    return self.images[[self.index.get(p, 0) for p in prompts]]


def test_fid_and_clip_score_equal_direct_computation(
    net, weights_npz, clip_dir, clip_model, tmp_path, low_rank_sqrtm):
  real = _images(3, 32, 32, seed=6, noise=0.1)
  reference_stats = fid.compute_statistics(net, real, batch_size=BATCH)
  stats_path = str(tmp_path / "real.npz")
  mu, sigma = reference_stats  # pytorch-fid's format, uncompressed: faster
  np.savez(stats_path, mu=mu, sigma=sigma)
  sampler = FakeSampler()
  result = gm.generation_metrics(
      sampler, PROMPTS + ["not used: past num_images"],
      inception_weights=weights_npz, fid_reference=stats_path,
      clip_dir=clip_dir, num_images=len(PROMPTS), batch_size=BATCH,
      workdir=str(tmp_path))
  # Two calls of BATCH prompts, the last padded with its first prompt.
  assert sampler.calls == [(PROMPTS[:2], 0), ([PROMPTS[2]] * 2, 1)]
  assert result["metrics_num_images"] == len(PROMPTS)
  expected_fid = fid.frechet_distance(
      *fid.compute_statistics(net, GENERATED, batch_size=BATCH),
      *reference_stats)
  print(f"FID {result['fid']:.9g} direct {expected_fid:.9g}")
  assert expected_fid > 0.1  # not a collapsed network
  assert abs(result["fid"] - expected_fid) <= 1e-9 * expected_fid
  # The same batch size: the same compiled encoders.
  expected_clip = clip.clip_score(clip_model, GENERATED, PROMPTS,
                                  batch_size=BATCH)
  print(f"CLIP score {result['clip_score']:.9g} direct {expected_clip:.9g}")
  assert expected_clip > 0
  assert abs(result["clip_score"] - expected_clip) <= 1e-9 * expected_clip


def test_reference_from_a_data_source_is_cached(
    net, weights_npz, tmp_path, monkeypatch, low_rank_sqrtm):
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  data_dir, num = str(tmp_path / "tfds"), 4
  settings = dict(inception_weights=weights_npz,
                  fid_reference="shapes_small:test", clip_dir="",
                  metrics_prompts="", metrics_num_images=num, batch_size=BATCH)
  # The split's first examples in the documented order (seed DATA_SEED).
  batch = next(iter(pipeline.image_text_dataset(
      "shapes_small", "test", batch_size=num, image_size=32, shuffle=True,
      seed=gm.DATA_SEED, num_epochs=1, data_dir=data_dir)))
  captions, real = list(batch["caption"]), batch["image"]
  # metrics_prompts "" takes the captions of fid_reference's split, so
  # sampling the real image of each caption gives FID ~ 0.
  sampler = FakeSampler(real, captions)
  result = gm.from_eval_config(settings, sampler, workdir=str(tmp_path),
                               image_size=32, data_dir=data_dir)
  assert [p for call, _ in sampler.calls for p in call][:num] == captions
  cached = [f for f in os.listdir(tmp_path / "eval")
            if f.startswith("fid_reference_shapes_small_test_4x32px")]
  assert len(cached) == 1
  mu, sigma = fid.load_stats(tmp_path / "eval" / cached[0])
  assert np.trace(sigma) > 1
  assert abs(result["fid"]) <= 1e-6 * np.trace(sigma)

  def not_again(*args, **kwargs):
    raise AssertionError("the cached reference statistics were not reused")

  monkeypatch.setattr(fid, "compute_statistics", not_again)
  again = gm.reference_statistics(
      net, "shapes_small:test", weights=weights_npz, num_images=num,
      image_size=32, cache_dir=str(tmp_path / "eval"), batch_size=BATCH,
      data_dir=data_dir)
  np.testing.assert_array_equal(again[0], mu)
  np.testing.assert_array_equal(again[1], sigma)


@pytest.mark.parametrize("settings, match", [
    (dict(inception_weights="MISSING.pth", fid_reference="REAL"),
     r"config\.eval\.inception_weights='MISSING\.pth' does not exist"),
    (dict(inception_weights="WEIGHTS", fid_reference="MISSING.npz"),
     r"config\.eval\.fid_reference='MISSING\.npz' does not exist"),
    (dict(inception_weights="WEIGHTS", fid_reference="nowhere:test"),
     r"config\.eval\.fid_reference='nowhere:test'.*SOURCE:SPLIT"),
    (dict(clip_dir="MISSING_DIR"),
     r"config\.eval\.clip_dir='MISSING_DIR' is not a directory"),
    (dict(inception_weights="WEIGHTS"),
     r"config\.eval\.fid_reference is empty"),
    (dict(fid_reference="REAL", clip_dir="CLIP"),
     r"config\.eval\.inception_weights is empty"),
    (dict(clip_dir="CLIP", num_images=0),
     r"config\.eval\.metrics_num_images=0"),
])
def test_bad_settings_fail_before_sampling(settings, match, weights_npz,
                                           clip_dir, tmp_path):
  real = str(tmp_path / "real.npz")
  fid.save_stats(real, np.zeros(2), np.eye(2))
  paths = {"WEIGHTS": weights_npz, "REAL": real, "CLIP": clip_dir}
  settings = {k: paths.get(v, v) for k, v in settings.items()}

  def sample_fn(prompts, index):
    raise AssertionError("sampled before the settings were checked")

  with pytest.raises(ValueError, match=match):
    gm.generation_metrics(sample_fn, PROMPTS, batch_size=BATCH,
                          workdir=str(tmp_path), **settings)


def test_parti_eval_adds_clip_score_to_the_report(clip_dir, clip_model,
                                                  tmp_path, monkeypatch):
  """ParTask.evaluate: settings checked before sampling, then the probe set
  and the metrics prompts sampled with the eval settings (batch i of the
  metrics with seed + 1 + i), clip_score in report.json."""
  here = os.path.dirname(__file__)
  sys.path.insert(0, os.path.join(here, "..", "..", "configs"))
  import parti_shapes  # pylint: disable=g-import-not-at-top
  from unimm.evaluation import probe  # pylint: disable=g-import-not-at-top
  from unimm.inference import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from unimm.inference import text_to_image  # pylint: disable=g-import-not-at-top
  from unimm.sampling import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from unimm.train import parti_task  # pylint: disable=g-import-not-at-top
  config = parti_shapes.get_config("size=tiny")
  config.data.pretokenized_dir = str(tmp_path / "no_data")  # no held-out loss
  assert not gm.check_eval_config(parti_task.ParTask(config).eval_config)
  calls = []

  class FakeModel:
    """What task.sampler(params) gives, minus the model: it records what the
    eval asks for; the settings are the real ones of the config."""

    def __init__(self, params):
      del params
      self.settings = settings_lib.eval_settings(
          text_to_image.SAMPLING_DEFAULTS, config)

    def sampling_params(self):
      return sampler_lib.SamplingParams.from_config(self.settings, 512)

    def sample(self, prompts, **kwargs):
      calls.append((list(prompts), dict(kwargs, **self.settings)))
      return FakeSampler()(prompts, 0)

  sample = FakeModel

  config.eval.update(clip_dir="/no/such/clip", num_single=2, num_pair=2,
                     batch_size=BATCH, num_grid_samples=2, seed=5)
  task = parti_task.ParTask(config)
  monkeypatch.setattr(task, "sampler", sample)
  with pytest.raises(ValueError, match=r"config\.eval\.clip_dir"):
    task.evaluate(None, {}, str(tmp_path), step=0)
  assert not calls  # nothing was sampled

  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("\n".join(PROMPTS) + "\n")
  config.eval.update(clip_dir=clip_dir, metrics_prompts=str(prompts_file),
                     metrics_num_images=len(PROMPTS))
  task = parti_task.ParTask(config)
  monkeypatch.setattr(task, "sampler", sample)
  # No probe network (test_parti_task covers the probe metrics).
  monkeypatch.setattr(probe, "get_probe", lambda *args, **kwargs: None)
  monkeypatch.setattr(probe, "prompt_accuracy", lambda *args, **kwargs: {
      "prompt_accuracy_single": 0.5})
  monkeypatch.setattr(probe, "probe_fd", lambda *args, **kwargs: 1.0)
  monkeypatch.setattr(probe, "reconstruction_accuracy",  # no tokenizer here
                      lambda *args, **kwargs: {"prompt_accuracy_single": 0.8,
                                               "prompt_accuracy_pair": 0.6})
  task.evaluate(None, {}, str(tmp_path), step=3)
  report = json.load(open(tmp_path / "eval" / "report.json"))
  # Every sampling setting, as the eval's config gives it.
  sampling = dict(text_to_image.SAMPLING_DEFAULTS, cfg_scale=1.5,
                  temperature=0.7, top_k=0, top_p=1.0, batch_size=BATCH)
  assert [kw for _, kw in calls] == [dict(seed=5, **sampling),
                                     dict(seed=6, **sampling),
                                     dict(seed=7, **sampling)]
  assert [p for p, _ in calls[1:]] == [PROMPTS[:2], [PROMPTS[2]] * 2]
  expected = clip.clip_score(clip_model, GENERATED, PROMPTS,
                             batch_size=BATCH)
  assert report["clip_score"] == pytest.approx(expected, rel=1e-9)
  assert report["metrics_num_images"] == len(PROMPTS)
  assert "fid" not in report and "prompt_accuracy_single" in report


def test_parti_prompts_capped_by_num_images(clip_dir, clip_model,
                                            parti_prompts_tsv, tmp_path):
  """A prompts file in PartiPrompts.tsv's format (tests/conftest.py)."""
  from unimm.tokenizers import text  # pylint: disable=g-import-not-at-top
  path = str(parti_prompts_tsv.path)
  every = text.read_prompts(path)
  assert every == parti_prompts_tsv.prompts and len(every) > 5
  num = 5
  settings = dict(inception_weights="", fid_reference="", clip_dir=clip_dir,
                  metrics_prompts=path, metrics_num_images=num,
                  batch_size=BATCH)
  assert gm.load_prompts(path, num_images=num) == every[:num]
  images = _images(num, 32, 32, seed=18)  # one cos > 0 (random CLIP)
  sampler = FakeSampler(images, every[:num])
  result = gm.from_eval_config(settings, sampler, workdir=str(tmp_path),
                               image_size=32)
  assert set(result) == {"clip_score", "metrics_num_images"}
  assert result["metrics_num_images"] == num
  assert sampler.calls == [(every[:2], 0), (every[2:4], 1), ([every[4]] * 2,
                                                             2)]
  expected = clip.clip_score(clip_model, images, every[:num],
                             batch_size=BATCH)
  print(f"CLIP score {result['clip_score']:.9g} direct {expected:.9g}")
  assert expected > 0
  assert abs(result["clip_score"] - expected) <= 1e-9 * expected
