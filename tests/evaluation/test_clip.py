"""CLIP: unimm's port equals transformers' CLIPModel, CLIPTokenizer and
CLIPImageProcessor on a tiny random checkpoint that the test writes (the
Hugging Face layout, with a BPE vocabulary learned here on a few captions)."""
import collections
import json
import os
import shutil

import jax
import numpy as np
import pytest

from unimm.evaluation import clip

torch = pytest.importorskip("torch")  # the "torch-ref" / "test" extra
transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

CORPUS = ("a photo of a cat. a photo of a dog on the grass; two dogs and "
          "three cats, the best photo of the year! it's the dog's toy. "
          "a painting of the sea at night, photographed in 2024.")
TEXTS = [
    "A photo of a CAT!",
    "two dogs, 3 cats; 42 birds... and 1,000.5 fish",
    "it's the dog's toy -- isn't it? they'll see; we'd REALLY go",
    "  multiple   spaces\tand\nnewlines  ",
    "Café naïve résumé, ÜBER Straße",
    "emoji 🐱🐶 and symbols #$%&*()[]{}<>/\\|~`^_ +=",
    "",
    "the best photo of the sea at night " * 12,  # > 77 tokens: truncated
]


def _learn_bpe(text: str, num_merges: int) -> list[tuple[str, str]]:
  """Tiny BPE training (most frequent pair, ties by pair) over CLIP words."""
  byte_chars = clip.bytes_to_unicode()
  words = collections.Counter(
      "".join(byte_chars[b] for b in w.encode()) for w in
      clip.split_words(text.lower()))
  splits = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for w, parts in splits.items():
      for pair in zip(parts, parts[1:]):
        pairs[pair] += words[w]
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    for w, parts in splits.items():
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      splits[w] = merged
  return merges


def _write_tokenizer(directory: str) -> dict[str, int]:
  chars = list(clip.bytes_to_unicode().values())
  merges = _learn_bpe(CORPUS, 60)
  tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
  tokens += [clip.BOS_TOKEN, clip.EOS_TOKEN]  # the last ids, as CLIP's
  vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return vocab


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(directory, the torch CLIPModel saved there)."""
  directory = str(tmp_path_factory.mktemp("clip"))
  vocab = _write_tokenizer(directory)
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32,
                       intermediate_size=64, num_attention_heads=4,
                       num_hidden_layers=2, max_position_embeddings=77,
                       hidden_act="quick_gelu",
                       bos_token_id=vocab[clip.BOS_TOKEN],
                       eos_token_id=vocab[clip.EOS_TOKEN],
                       pad_token_id=vocab[clip.EOS_TOKEN]),
      vision_config=dict(hidden_size=48, intermediate_size=96,
                         num_attention_heads=4, num_hidden_layers=2,
                         image_size=32, patch_size=8, hidden_act="gelu"),
      projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # unit-scale weights (the init's 0.02 makes every
    for p in model.parameters():  # embedding alike), non-trivial norms/biases
      if p.ndim >= 2:
        p.normal_(0, p[0].numel() ** -0.5)
      else:
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(directory)
  transformers.CLIPImageProcessorPil(
      size={"shortest_edge": 32},
      crop_size={"height": 32, "width": 32}).save_pretrained(directory)
  return directory, model


def _features(output) -> np.ndarray:
  """get_*_features returns a tensor (v4) or an output (v5)."""
  if not isinstance(output, torch.Tensor):
    output = output.pooler_output
  return output.detach().numpy()


def _relative_error(got, want) -> float:
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _images(seed: int, n: int, height: int, width: int) -> np.ndarray:
  """Smooth-ish random uint8 images (noise on a gradient)."""
  rng = np.random.default_rng(seed)
  base = np.linspace(0, 200, width)[None, :, None] + np.linspace(
      0, 50, height)[:, None, None]
  return np.clip(base + rng.integers(0, 60, (n, height, width, 3)), 0,
                 255).astype(np.uint8)


def test_tokenizer_matches_transformers(checkpoint):
  directory, _ = checkpoint
  reference = transformers.CLIPTokenizer.from_pretrained(directory)
  want = reference(TEXTS, padding="max_length", truncation=True,
                   max_length=77).input_ids
  tokenizer = clip.ClipTokenizer.from_directory(directory)
  got = tokenizer(TEXTS)
  assert got.shape == (len(TEXTS), 77)
  np.testing.assert_array_equal(got, np.asarray(want))
  assert len(tokenizer.tokenize(TEXTS[-1])) > 75  # truncation was exercised
  merged = [i for row in got for i in row if 512 <= i < tokenizer.bos_id]
  assert len(set(merged)) > 10  # the learned merges were exercised


def test_preprocessing_matches_transformers(checkpoint, tmp_path):
  directory, _ = checkpoint
  processor = transformers.CLIPImageProcessorPil.from_pretrained(directory)
  rng = np.random.default_rng(3)
  images = [_images(0, 1, 41, 67)[0],  # wide: resize to 32x52, crop
            _images(1, 1, 70, 45)[0],  # tall
            rng.integers(0, 256, (30, 50), np.uint8),  # grayscale [H, W]
            rng.integers(0, 256, (50, 36, 4), np.uint8)]  # RGBA
  model = clip.load_clip(directory)
  for image in images:
    image_3d = image[..., None] if image.ndim == 2 else image
    want = processor(images=image_3d, return_tensors="np").pixel_values[0]
    got = model.preprocess([image])[0]
    assert got.shape == (32, 32, 3)
    np.testing.assert_allclose(got, want.transpose(1, 2, 0), atol=1e-6,
                               rtol=0)
  # Without preprocessor_config.json: CLIPImageProcessor's defaults.
  defaults = clip.ClipPreprocessing.from_directory(str(tmp_path),
                                                   image_size=32)
  np.testing.assert_allclose(defaults(images[0]), model.preprocess(
      images[:1])[0], atol=0)


def test_embeddings_and_score_match_transformers(checkpoint):
  directory, reference = checkpoint
  model = clip.load_clip(directory, batch_size=3)  # 2 batches, one padded
  images = _images(0, 5, 40, 56)
  captions = TEXTS[:5]
  processor = transformers.CLIPImageProcessorPil.from_pretrained(directory)
  pixels = processor(images=list(images), return_tensors="pt").pixel_values
  tokens = transformers.CLIPTokenizer.from_pretrained(directory)(
      captions, padding="max_length", truncation=True, max_length=77,
      return_tensors="pt")
  with torch.no_grad():
    want_image = _features(reference.get_image_features(pixel_values=pixels))
    want_text = _features(reference.get_text_features(**tokens))
    want_logits = reference(pixel_values=pixels,
                            **tokens).logits_per_image.numpy()
  got_image = model.encode_images(images)
  got_text = model.encode_texts(captions)
  assert got_image.shape == got_text.shape == (5, 24)
  image_error = _relative_error(got_image, want_image)
  text_error = _relative_error(got_text, want_text)
  print(f"CLIP parity: image {image_error:.2e}, text {text_error:.2e}")
  assert image_error <= 1e-4 and text_error <= 1e-4

  cos = torch.nn.functional.cosine_similarity(
      torch.tensor(want_image), torch.tensor(want_text), dim=-1)
  assert (cos < 0).any() and (cos > 0).any()  # the clamp matters here
  want_score = float((100 * cos.clamp(min=0)).mean())
  got_score = clip.clip_score(model, images, captions)
  print(f"CLIP score: {got_score:.6f} vs {want_score:.6f}")
  assert abs(got_score - want_score) <= 1e-3
  logits = jax.jit(model.network.apply)({"params": model.params},
                                        model.preprocess(images),
                                        model.tokenizer(captions))
  assert _relative_error(np.asarray(logits), want_logits) <= 1e-4


@pytest.mark.parametrize("legacy", [True, False])
def test_eos_pooling_matches_transformers(checkpoint, tmp_path, legacy):
  source, _ = checkpoint
  directory = str(tmp_path / "clip")
  shutil.copytree(source, directory)
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  eos = 2 if legacy else 7
  config["text_config"]["eos_token_id"] = eos
  with open(path, "w") as f:
    json.dump(config, f)
  rng = np.random.default_rng(5)
  ids = rng.integers(8, 500, (4, 16))
  ids[np.arange(4), [3, 9, 15, 6]] = 7
  ids[1, 12] = 7  # a second eos: the first one counts
  argmax, first_eos = ids.argmax(-1), (ids == 7).argmax(-1)
  assert (argmax != first_eos).all()  # the two rules pool different tokens
  reference = transformers.CLIPModel.from_pretrained(directory).eval()
  with torch.no_grad():
    want = _features(reference.get_text_features(input_ids=torch.tensor(ids)))
  model = clip.load_clip(directory)
  assert model.config.text.eos_token_id == eos
  got = model.encode_text_ids(ids)
  assert _relative_error(got, want) <= 1e-4


def test_a_wrong_shape_names_the_tensor(checkpoint, tmp_path):
  source, _ = checkpoint
  directory = str(tmp_path / "clip")
  shutil.copytree(source, directory)
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["vision_config"]["intermediate_size"] = 80  # the saved fc1 is 96
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=(
      r"'vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight' has shape "
      r"\(96, 48\); config\.json implies \(80, 48\)")):
    clip.load_clip(directory)


def test_missing_files_are_clear_errors(checkpoint, tmp_path):
  source, _ = checkpoint
  with pytest.raises(ValueError, match="No CLIP config.*config.json"):
    clip.load_clip(str(tmp_path))
  shutil.copy(os.path.join(source, "config.json"), tmp_path)
  with pytest.raises(ValueError, match="model.safetensors"):
    clip.load_clip(str(tmp_path))
  shutil.copy(os.path.join(source, "model.safetensors"), tmp_path)
  model = clip.load_clip(str(tmp_path))  # no tokenizer: images still work
  assert model.encode_images(_images(0, 1, 32, 32)).shape == (1, 24)
  with pytest.raises(ValueError, match="vocab.json and merges.txt"):
    model.encode_texts(["a cat"])


def test_other_file_layouts(checkpoint, tmp_path):
  """tokenizer.json only (CLIPTokenizer.save_pretrained in transformers 5),
  sharded safetensors and pytorch_model.bin load to the same model."""
  source, reference = checkpoint
  images = _images(2, 2, 32, 32)
  want = clip.load_clip(source).encode_images(images)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(source)
  for layout in ("sharded", "torch"):
    directory = str(tmp_path / layout)
    if layout == "sharded":
      reference.save_pretrained(directory, max_shard_size="100KB")
      assert os.path.exists(os.path.join(directory,
                                         "model.safetensors.index.json"))
    else:
      os.makedirs(directory)
      torch.save(reference.state_dict(),
                 os.path.join(directory, "pytorch_model.bin"))
      shutil.copy(os.path.join(source, "config.json"), directory)
    tokenizer.save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):  # only tokenizer.json is read
      if os.path.exists(os.path.join(directory, name)):
        os.remove(os.path.join(directory, name))
    model = clip.load_clip(directory)
    np.testing.assert_array_equal(model.encode_images(images), want)
    np.testing.assert_array_equal(
        model.tokenizer(TEXTS),
        tokenizer(TEXTS, padding="max_length", truncation=True,
                  max_length=77).input_ids)
