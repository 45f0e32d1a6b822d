"""Checkpointer: every item round-trips, keep policy, restore onto another mesh, a crash in
the middle of a save leaves no complete-looking step, restore_params of a workdir."""
import json
import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clip_jax import checkpoint as ckpt_lib
from clip_jax.models import get_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def _make_state(mesh, scale=1.0):
  tx = optax.adamw(1e-3)

  def init():
    params = {"w": scale * jnp.arange(64.0).reshape(8, 8), "b": jnp.ones(8)}
    return _State(step=jnp.array(3, jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init)
  axis = mesh.axis_names[0]
  shardings = jax.tree.map(
      lambda x: NamedSharding(mesh, P(axis) if x.ndim and x.shape[0] % mesh.size == 0 else P()),
      abstract)
  return jax.jit(init, out_shardings=shardings)(), abstract, shardings


def _save(checkpointer, step, state, model_config=None):
  return checkpointer.save(
      step, state, data_state={"next_index": step * 16}, rng=jax.random.key(7),
      config_json=json.dumps({"seed": 0, "step": step}),
      model_config=model_config or get_model_config("tiny"))


def test_round_trip_onto_another_mesh_and_keep_policy(tmp_path):
  mesh8 = Mesh(np.array(jax.devices()), ("fsdp",))
  state, _, _ = _make_state(mesh8)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), checkpoint_every=2, keep_checkpoints=2,
                                       keep_every=4)
  saved = [s for s in range(1, 11) if _save(checkpointer, s, state)]
  checkpointer.wait()
  assert saved == [2, 4, 6, 8, 10]                   # every checkpoint_every steps
  assert checkpointer.all_steps() == [4, 8, 10]      # the latest 2 and every 4th
  assert _save(checkpointer, 11, state) is False
  # `force`: the end of a run and preemption save off the interval.
  assert checkpointer.save(11, state, data_state={}, rng=jax.random.key(0), config_json="{}",
                           model_config=get_model_config("tiny"), force=True)
  checkpointer.close()

  # A different mesh: one device, everything replicated.
  mesh1 = Mesh(np.array(jax.devices()[:1]), ("data",))
  _, abstract, shardings1 = _make_state(mesh1)
  reader = ckpt_lib.Checkpointer(str(tmp_path), checkpoint_every=2, keep_checkpoints=2)
  assert reader.latest_step() == 11
  restored, data_state, rng = reader.restore(10, abstract, shardings1)
  reader.close()
  assert data_state == {"next_index": 160}
  np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(7)))
  for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                                 jax.tree.leaves(shardings1)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == sharding
  config_file = tmp_path / "checkpoints" / "10" / "config" / "metadata"
  assert json.loads(config_file.read_text()) == {"seed": 0, "step": 10}


def test_restore_params_of_a_workdir_and_step_dir(tmp_path):
  from clip_jax.models import count_params, create_model, init_params
  model_config = get_model_config("tiny")
  params = init_params(create_model(model_config), jax.random.key(1))
  tx = optax.adamw(1e-3)
  state = _State(step=jnp.array(5), params=params, opt_state=tx.init(params))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), checkpoint_every=1, keep_checkpoints=3)
  _save(checkpointer, 5, state, model_config)
  _save(checkpointer, 6, jax.tree.map(lambda x: x + 1, state), model_config)
  checkpointer.close()
  for path, offset in ((tmp_path, 1), (tmp_path / "checkpoints" / "5", 0)):
    got, got_config = ckpt_lib.restore_params(str(path))
    assert got_config == model_config
    assert count_params(got) == count_params(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b) + offset), got, params)
  with pytest.raises(ValueError, match="does not exist"):
    ckpt_lib.restore_params(str(tmp_path / "nope"))


_CRASH_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from clip_jax import checkpoint as ckpt_lib
    from clip_jax.models import get_model_config

    workdir = sys.argv[1]
    state = {"w": jnp.ones((256, 256)), "step": jnp.array(1)}
    checkpointer = ckpt_lib.Checkpointer(workdir, checkpoint_every=1, keep_checkpoints=5)
    def save(step):
      checkpointer.save(step, state, data_state={}, rng=jax.random.key(0), config_json="{}",
                        model_config=get_model_config("tiny"))
    save(1)
    checkpointer.wait()

    async def die(self, *args, **kwargs):  # every item is written; the commit never happens
      os.kill(os.getpid(), signal.SIGKILL)
    atomicity.AtomicRenameTemporaryPath.finalize = die
    save(2)
    checkpointer.wait()
    print("not killed")
""")


def test_crash_in_the_middle_of_a_save_leaves_no_complete_step(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == -9, proc.stdout + proc.stderr
  names = os.listdir(tmp_path / "checkpoints")
  assert "1" in names and "2" not in names
  assert any(name.startswith("2.") for name in names), names  # the half-written temporary dir
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), checkpoint_every=1, keep_checkpoints=5)
  assert checkpointer.all_steps() == [1]
  assert checkpointer.latest_step() == 1
  checkpointer.close()
