"""configs/common.py -> typed configs; each bad value gives its own clear error."""

import importlib.util
import os

import pytest

from sbam_jax import config as C
from sbam_jax import masking

_spec = importlib.util.spec_from_file_location(
    "common", os.path.join(os.path.dirname(__file__), "..", "configs", "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def test_defaults_build():
  m = C.build_model_config(common.model("large"))
  assert (m.embed_dim, m.depth, m.num_heads, m.patch_size) == (1024, 24, 16, 16)
  spec = C.build_masking_spec(common.masking(), global_batch=4096, num_devices=16)
  assert spec == masking.MaskingSpec("sbam", 0.75, 0.1, 0.5, 256)


@pytest.mark.parametrize("group,size", [("sample", 1), ("device", 32), ("global", 256)])
def test_group_sizes(group, size):
  assert C.group_size(group, global_batch=256, num_devices=8) == size


@pytest.mark.parametrize("make,match", [
    (lambda: C.build_model_config(common.model("base", depht=3)), "model.depht"),
    (lambda: C.build_model_config(common.model("giant")), "model.size"),
    (lambda: C.build_model_config(common.model("base", img_size=100)), "multiple of patch_size"),
    (lambda: C.build_masking_spec(common.masking(group="node"), global_batch=8, num_devices=2),
     "masking.group"),
    (lambda: C.build_masking_spec(common.masking(capacity="auto"), global_batch=8, num_devices=2),
     "masking.capacity"),
    (lambda: C.build_masking_spec(common.masking(mask_ratio=1.5), global_batch=8, num_devices=2),
     "mask_ratio"),
    (lambda: C.build_masking_spec(common.masking(), global_batch=10, num_devices=4),
     "does not split"),
])
def test_bad_configs_name_the_field(make, match):
  with pytest.raises(C.ConfigError, match=match):
    make()


def test_unknown_masking_key():
  cfg = common.masking()
  cfg.unlock()
  cfg.mask_ratio_var = 0.1
  with pytest.raises(C.ConfigError, match="masking.mask_ratio_var"):
    C.build_masking_spec(cfg, global_batch=8, num_devices=1)
