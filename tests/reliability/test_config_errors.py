"""Bad settings fail early and name the setting: an override of a field the
config lacks (the command line's one-line error: tests/test_main.py), an
eval count of 0, a resume with another model size."""
import os
import shutil
import sys

import pytest

from unimm import checkpoints
from unimm import config_lib
from unimm.train import tasks
from unimm.train import trainer

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "..", "train"))
import toy_task  # noqa: E402  pylint: disable=g-import-not-at-top


def test_unknown_field_names_the_missing_part():
  config = config_lib.load_config("configs/vit_vqgan_shapes.py:size=tiny")
  assert config_lib.unknown_field(config, "eval.num_images") is None
  assert "config has no field 'nonexistent'" in config_lib.unknown_field(
      config, "nonexistent")
  assert "is a value, not a group" in config_lib.unknown_field(
      config, "eval.num_images.x")


@pytest.mark.parametrize("field,value", [("num_images", 0),
                                         ("batch_size", -1),
                                         ("probe_prompts", -3)])
def test_eval_counts_fail_when_the_task_is_built(field, value):
  config = config_lib.load_config("configs/vit_vqgan_shapes.py:size=tiny")
  tasks.get_task(config)  # the config as shipped builds
  config.eval[field] = value
  with pytest.raises(ValueError, match=rf"config\.eval\.{field}={value!r}"):
    tasks.get_task(config)


def test_resume_with_another_model_size_names_the_setting(tmp_path):
  workdir = str(tmp_path / "w")
  config = toy_task.make_config(total_steps=2, checkpoint_every_steps=2,
                                log_every_steps=2)
  trainer.train(config, workdir, toy_task.ToyTask(config))
  saved = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  wider = toy_task.make_config(total_steps=4, checkpoint_every_steps=2,
                               log_every_steps=2, **{"model.hidden": 32})
  with pytest.raises(checkpoints.CheckpointMismatchError) as error:
    trainer.train(wider, workdir, toy_task.ToyTask(wider))
  message = str(error.value)
  assert "config.model.hidden: checkpoint 16, now 32" in message
  assert "(8, 16) in the checkpoint, (8, 32) in the config" in message
  # Not taken for damage: the checkpoint stays where it was.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == saved
  assert not os.path.exists(os.path.join(workdir, trainer.DAMAGED_DIR))
  shutil.rmtree(workdir)
