"""Training parity with PyTorch: clip_jax's train step against transformers' CLIPModel trained
by torch.optim.AdamW, the same tiny model (exported by clip_jax.export) and the same batches.

The reference optimizer is the paper's recipe as open_clip writes it: decoupled weight decay on
every parameter of two or more dimensions, none on gains, biases and the logit scale (its
`exclude = p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in name`), the logit scale clamped to
[0, ln 100] after each step, and optionally torch's clip_grad_norm_ before the step.

Checked over 20 steps: every step's loss within 1e-4 (relative) and, after the last step, every
parameter within PARAM_TOL of its scale. A negative control trains clip_jax with big_vision's
"kernels" rule (no decay on the embeddings, clip_jax's rule before the paper's) and checks that
it is caught.
"""
import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from clip_jax import convert, export, params_io  # noqa: E402
from clip_jax import sharding as shd  # noqa: E402
from clip_jax import step as st  # noqa: E402
from clip_jax.models import scan_params  # noqa: E402
from configs.common import get_config  # noqa: E402

from test_convert_utils import random_tokens  # noqa: E402

STEPS, BATCH, LR = 20, 8, 1e-3
LOSS_RTOL = 1e-4
# max |jax - torch| <= PARAM_TOL * max |torch| for every parameter after 20 steps. Measured
# (float32, 2-core CPU): at most 2.7e-5 (losses: 3e-7 relative without decay, 3e-6 with decay
# and clipping). The "kernels" rule leaves the unused rows of the token embedding 0.4%
# (20 * lr * wd) above the reference.
PARAM_TOL = 1e-4
# Except the attention's key bias: its exact gradient is zero (softmax over keys ignores a
# shift shared by every key), so both sides move it only by rounding noise that Adam scales up
# by lr / eps; it must stay that small on both sides (measured: at most 7e-5).
KEY_BIAS_MAX = 0.01 * LR * STEPS


def run_config(weight_decay: float, grad_clip_norm: float, decay_rule: str = "paper"):
  c = get_config()
  c.model = "tiny"
  c.batch_size = BATCH
  c.total_steps = STEPS
  c.mesh.data = 1  # one device: the reference is one process too (other meshes: test_step)
  c.optimizer.update(learning_rate=LR, b1=0.9, b2=0.98, eps=1e-6, weight_decay=weight_decay,
                     grad_clip_norm=grad_clip_norm, schedule="constant", warmup_steps=0,
                     decay_rule=decay_rule)
  return c


def batches():
  rng = np.random.default_rng(7)
  tokens = random_tokens(BATCH * STEPS, seed=3)
  rng.shuffle(tokens)
  for i in range(STEPS):
    images = rng.standard_normal((BATCH, 32, 32, 3)).astype(np.float32)
    yield images, tokens[i * BATCH:(i + 1) * BATCH]


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
  """(clip_jax params on the host, the CLIPConfig, the same model exported to Hugging Face)."""
  c = run_config(0.0, 0.0)
  mesh = shd.create_mesh(c, devices=jax.devices()[:1])
  state, _ = st.create_train_state(c, mesh, jax.random.PRNGKey(0))
  params = jax.tree.map(np.asarray, jax.device_get(state.params))
  model_config = st.model_config_from(c)
  root = tmp_path_factory.mktemp("parity")
  params_io.save_params(root / "ckpt", params, model_config)
  export.export(root / "ckpt", root / "hf", fmt="hf")
  return params, model_config, root / "hf"


def train_jax(c, params):
  mesh = shd.create_mesh(c, devices=jax.devices()[:1])
  state, shardings = st.create_train_state(c, mesh, jax.random.PRNGKey(0), params=params)
  train_step = st.make_train_step(c, mesh, shardings)
  losses, grad_norms = [], []
  for images, tokens in batches():
    batch = {"images": jax.device_put(images, shd.batch_sharding(mesh)),
             "tokens": jax.device_put(tokens, shd.batch_sharding(mesh))}
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
    grad_norms.append(float(metrics["grad_norm"]))
  return np.array(losses), jax.tree.map(np.asarray, jax.device_get(state.params)), grad_norms


def open_clip_param_groups(model, weight_decay: float):
  """open_clip's main.py: no decay on gains, biases, norms and the logit scale."""
  def exclude(name, p):
    return p.ndim < 2 or any(s in name for s in ("bn", "ln", "norm", "bias", "logit_scale"))
  named = list(model.named_parameters())
  return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
          {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def train_torch(hf_dir, weight_decay: float, grad_clip_norm: float):
  torch.manual_seed(0)
  model = transformers.CLIPModel.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(open_clip_param_groups(model, weight_decay), lr=LR,
                          betas=(0.9, 0.98), eps=1e-6)
  losses = []
  for images, tokens in batches():
    out = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)),
                pixel_values=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                return_loss=True)
    opt.zero_grad()
    out.loss.backward()
    if grad_clip_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(100))
    losses.append(out.loss.item())
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()
           if not k.endswith("position_ids")}
  return np.array(losses), state


def as_params(hf_state, model_config):
  """A Hugging Face state dict as our (scanned) params tree."""
  return scan_params(convert.openai_to_params(convert.hf_to_openai(hf_state), model_config))


def split_key_bias(params):
  """(params without the attention's key biases, the key biases of both towers)."""
  params = jax.tree.map(np.array, params)
  key_biases = []
  for tower in ("visual", "text"):
    qkv_bias = params[tower]["transformer"]["resblocks"]["attn"]["qkv"]["bias"]  # [L, 3, H, hd]
    key_biases.append(qkv_bias[:, 1].copy())
    qkv_bias[:, 1] = 0.0
  return params, np.stack(key_biases)


def param_errors(params, reference) -> dict[str, float]:
  """Per leaf: max |a - b| / max |b|."""
  flat = jax.tree_util.tree_flatten_with_path(reference)[0]
  ours = jax.tree_util.tree_leaves(params)
  return {jax.tree_util.keystr(path): float(np.abs(np.asarray(a, np.float64) - b).max()
                                            / max(float(np.abs(b).max()), 1e-12))
          for (path, b), a in zip(flat, ours)}


@pytest.fixture(scope="module")
def references(initial):
  _, _, hf_dir = initial
  return {key: train_torch(hf_dir, *key) for key in [(0.0, 0.0), (0.2, 0.0), (0.2, 1.0)]}


@pytest.mark.parametrize("weight_decay,grad_clip_norm", [(0.0, 0.0), (0.2, 0.0), (0.2, 1.0)],
                         ids=["no_wd", "wd", "wd_clip"])
def test_training_matches_pytorch(initial, references, weight_decay, grad_clip_norm):
  params0, model_config, _ = initial
  ref_losses, ref_state = references[(weight_decay, grad_clip_norm)]
  losses, params, grad_norms = train_jax(run_config(weight_decay, grad_clip_norm), params0)
  assert ref_losses[-1] < ref_losses[0] - 0.05, ref_losses  # it trains
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
  params, key_bias = split_key_bias(params)
  reference, ref_key_bias = split_key_bias(as_params(ref_state, model_config))
  errors = param_errors(params, reference)
  worst = max(errors, key=errors.get)
  assert errors[worst] <= PARAM_TOL, (worst, errors[worst])
  assert np.abs(key_bias).max() < KEY_BIAS_MAX and np.abs(ref_key_bias).max() < KEY_BIAS_MAX
  if grad_clip_norm:  # clipping was active: the unclipped norm exceeded the bound
    assert sum(g > grad_clip_norm for g in grad_norms) >= STEPS // 2, grad_norms


def test_old_decay_rule_is_caught(initial, references):
  # big_vision's "kernels" rule exempts the embeddings, so rows of the token embedding that no
  # batch uses keep their values while the reference decays them: the check above fails.
  params0, model_config, _ = initial
  _, ref_state = references[(0.2, 0.0)]
  _, params, _ = train_jax(run_config(0.2, 0.0, decay_rule="kernels"), params0)
  errors = param_errors(params, as_params(ref_state, model_config))
  assert errors["['text']['token_embedding']"] > 10 * PARAM_TOL  # 4e-3
  unused = np.setdiff1d(np.arange(49408), np.concatenate([t.ravel() for _, t in batches()]))
  np.testing.assert_array_equal(params["text"]["token_embedding"][unused],
                                params0["text"]["token_embedding"][unused])
  ref_tok = as_params(ref_state, model_config)["text"]["token_embedding"][unused]
  np.testing.assert_allclose(ref_tok, params0["text"]["token_embedding"][unused]
                             * (1 - LR * 0.2) ** STEPS, rtol=1e-5)
