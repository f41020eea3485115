r"""Builds the unimm_shapes TFDS data set ahead of time (offline).

Example: python -m unimm.tools.build_shapes --image_size 32 [--data_dir DIR]

e.g. once into a data_dir shared by all hosts; the pipelines otherwise
build it on first use. Prints the data_dir of each size built. The data
set and its variants: unimm.data.tfds_shapes.
"""
from absl import app
from absl import flags
from absl import logging

from unimm.data import tfds_shapes


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The CLI flags (defined only when run as a program, or by tests)."""
  flags.DEFINE_multi_integer("image_size", [32], "Sizes to build.",
                             flag_values=flag_values)
  flags.DEFINE_string("data_dir", None, "Default: $UNIMM_DATA_DIR or "
                      "~/.cache/unimm/tfds.", flag_values=flag_values)
  flags.DEFINE_enum("variant", "", list(tfds_shapes.VARIANTS),
                    "small: the 512-example variants; large: 500,000 "
                    "training examples (32 px only).",
                    flag_values=flag_values)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Builds every --image_size; returns (and prints) their data_dirs."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  built = []
  for size in flag_values.image_size:
    built.append(tfds_shapes.build_shapes(size, flag_values.data_dir,
                                          variant=flag_values.variant))
    print(built[-1])
  return built


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: main(argv) and None)  # exit status 0, not the list
