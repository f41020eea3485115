"""The command-line tools (unimm/tools/): each answers --help with its flags
and an example, and runs its library function from parsed flags."""
import os
import subprocess
import sys

from absl import flags
import pytest

from unimm.data import convert
from unimm.data import interleaved
from unimm.data import tfds_shapes
from unimm.tokenizers import text as text_lib
from unimm.tools import build_shapes
from unimm.tools import convert as convert_tool
from unimm.tools import train_text_tokenizer

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "data")))
import test_convert  # noqa: E402  pylint: disable=g-import-not-at-top

TOOLS = {
    "convert": "--tar_shards",
    "build_shapes": "--variant",
    "train_text_tokenizer": "--captions_file",
    "pretokenize": "--tokenizer_workdir",
    "pack_interleaved": "--num_documents",
}


def _parse(define, argv) -> flags.FlagValues:
  flag_values = flags.FlagValues()
  define(flag_values)
  flag_values(["tool", *argv])
  return flag_values


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_help_lists_flags_and_an_example(tool):
  result = subprocess.run(
      [sys.executable, "-m", f"unimm.tools.{tool}", "--help"],
      capture_output=True, text=True, timeout=120, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode in (0, 1), result.stderr[-2000:]  # absl: 1
  assert f"Example: python -m unimm.tools.{tool}" in result.stdout
  assert TOOLS[tool] in result.stdout


def test_convert_flags_add_a_split_and_check_size(tmp_path):
  images_dir, captions = test_convert._image_folder(tmp_path)  # pylint: disable=protected-access
  out = str(tmp_path / "out")
  flag_values = _parse(convert_tool.define_flags, [
      f"--out={out}", f"--image_size={test_convert.SIZE}",
      f"--images_dir={images_dir}", f"--captions={captions}",
      "--num_shards=1", "--num_workers=0", "--split=test"])
  assert convert_tool.run(flag_values) == 0
  assert test_convert._read_all(out, "test").keys() >= {"stripes", "palette"}  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="--image_size 16"):
    convert.convert(out=out, image_size=32, images_dir=images_dir,
                    captions=captions)


def test_build_shapes_builds_each_size(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(tfds_shapes, "build_shapes",
                      lambda size, data_dir, variant: calls.append(
                          (size, data_dir, variant)) or data_dir)
  flag_values = _parse(build_shapes.define_flags, [
      "--image_size=32", "--image_size=64", f"--data_dir={tmp_path}",
      "--variant=small"])
  assert build_shapes.main(["build_shapes"], flag_values) == [
      str(tmp_path)] * 2
  assert calls == [(32, str(tmp_path), "small"), (64, str(tmp_path), "small")]


def test_train_text_tokenizer_from_captions_file(tmp_path, capsys):
  captions = [f"a {size} {color} {shape}" for size in ("small", "big")
              for color in ("red", "green", "blue", "yellow")
              for shape in ("circle", "square", "star", "cross")] * 4
  captions_file = tmp_path / "captions.txt"
  captions_file.write_text("\n".join(captions))
  prefix = tmp_path / "out" / "spiece"
  path = train_text_tokenizer.main(["train_text_tokenizer"], _parse(
      train_text_tokenizer.define_flags, [
          f"--output={prefix}", "--vocab_size=40",
          f"--captions_file={captions_file}"]))
  assert path == str(prefix) + ".model"
  assert "vocab_size=" in capsys.readouterr().out
  tokenizer = text_lib.TextTokenizer.load(path)
  assert tokenizer.decode(tokenizer.encode(captions[:3], 64).ids) == (
      captions[:3])
  with pytest.raises(ValueError, match="exactly one of"):
    train_text_tokenizer.main(["train_text_tokenizer"], _parse(
        train_text_tokenizer.define_flags, [
            f"--output={prefix}", "--source=shapes",
            f"--captions_file={captions_file}"]))


def test_train_text_tokenizer_from_shapes(tmp_path):
  path = train_text_tokenizer.main(["train_text_tokenizer"], _parse(
      train_text_tokenizer.define_flags, [
          f"--output={tmp_path / 'spiece'}", "--vocab_size=64",
          "--source=shapes", "--num_captions=200"]))
  assert 3 < text_lib.TextTokenizer.load(path).vocab_size <= 64


def test_train_text_tokenizer_on_interleaved_document_texts(tmp_path):
  """--source interleaved covers the edit instructions' words too."""
  path = train_text_tokenizer.main(["train_text_tokenizer"], _parse(
      train_text_tokenizer.define_flags, [
          f"--output={tmp_path / 'spiece'}", "--vocab_size=96",
          "--source=interleaved", "--num_captions=300"]))
  tokenizer = text_lib.TextTokenizer.load(path)
  instructions = [t for t in interleaved.document_texts(300)
                  if t.split()[0] in ("move", "make", "turn", "add",
                                      "remove")]
  assert instructions
  assert tokenizer.decode(tokenizer.encode(instructions, 64).ids) == (
      instructions)
