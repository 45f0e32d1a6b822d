"""StepProfiler: a trace of exactly the configured window of steps lands in WORKDIR/profile;
the trace summary's op attribution."""
import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from clip_jax.profiling import DEFAULT_START_STEP, StepProfiler


def _traces(logdir):
  return glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)


def _event_names(path):
  data = jax.profiler.ProfileData.from_file(path)
  return {e.name for plane in data.planes for line in plane.lines for e in line.events}


def test_trace_covers_the_window(tmp_path):
  @jax.jit
  def profiled_step(x):
    return jnp.tanh(x @ x) + 1.0

  config = ml_collections.ConfigDict({"profile_start_step": 2, "profile_steps": 2})
  profiler = StepProfiler.from_config(config, str(tmp_path))
  logdir = os.path.join(str(tmp_path), "profile")
  x, out = jnp.ones((64, 64)), None
  for step in range(6):
    profiler.before_step(step, out)
    assert profiler.active == (2 <= step < 4), step
    if step < 2:
      assert not _traces(logdir)
    out = profiled_step(x)
  profiler.close(out)
  assert profiler.done and not profiler.active
  traces = _traces(logdir)
  assert len(traces) == 1
  assert any("profiled_step" in name for name in _event_names(traces[0]))


def test_close_stops_a_window_cut_short(tmp_path):
  profiler = StepProfiler(str(tmp_path), start_step=0, num_steps=100)
  profiler.before_step(0)
  out = jnp.arange(8.0) * 2
  profiler.close(out)
  assert len(_traces(str(tmp_path))) == 1
  profiler.before_step(1)  # After the window nothing restarts.
  assert not profiler.active


def test_from_config_off_and_defaults(tmp_path):
  assert StepProfiler.from_config(ml_collections.ConfigDict({}), str(tmp_path)) is None
  assert StepProfiler.from_config(ml_collections.ConfigDict({"profile_steps": 0}),
                                  str(tmp_path)) is None
  p = StepProfiler.from_config(ml_collections.ConfigDict({"profile_steps": 3}), str(tmp_path))
  assert (p.start_step, p.stop_step) == (DEFAULT_START_STEP, DEFAULT_START_STEP + 3)
  with pytest.raises(ValueError, match="profile_steps"):
    StepProfiler(str(tmp_path), start_step=0, num_steps=0)


def test_op_scope_and_gpu_library_calls():
  """Trace attribution without a GPU: a cuBLAS call (tuple output) parses, counts as a matmul
  with its FLOPs, and gets the model scope of its metadata."""
  from clip_jax.profiling import _hlo_instructions, _kernel_category, _library_call, op_scope
  name = ("jit(step_fn)/transpose(jvp(CLIP.encode_image))/visual/transformer/while/body/"
          "closed_call/resblocks/attn/qkv/dot_general")
  hlo = (
      '%p0 = bf16[4096,1024]{1,0} parameter(0)\n'
      '%p1 = bf16[1024,3072]{1,0} parameter(1)\n'
      '%custom-call.12 = (bf16[4096,3072]{1,0}, s8[33554432]{0}) custom-call(%p0, %p1), '
      'custom_call_target="__cublas$lt$matmul", metadata={op_name="' + name + '"}, '
      'backend_config={"gemm_backend_config":{"dot_dimension_numbers":'
      '{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}\n')
  instructions = _hlo_instructions(hlo)
  dims, opcode, line = instructions["custom-call.12"]
  assert (dims, opcode) == ("4096,3072", "custom-call")
  assert _library_call(line, instructions) == ("matmul", 2 * 4096 * 3072 * 1024)
  assert op_scope(name) == "bwd:visual/resblocks/attn/qkv"
  assert op_scope("jit(step_fn)/jvp(CLIP.encode_text)/text/transformer/while/body/"
                  "closed_call/resblocks/attn/bqhd,bkhd->bhqk/dot_general") == \
      "fwd:text/resblocks/attn"
  assert op_scope("jit(step_fn)/mul") == "other:step" and op_scope("") == "?"
  assert _kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma") == \
      "fused_attention"
  assert _kernel_category("nvjet_sm90_tst_256x160_64x4_1x2_h_bz_coopA_NNT") == "matmul"
  assert _kernel_category("loop_add_fusion_4") == ""
  assert _kernel_category("__cudnn$norm") == "layer_norm"
  assert _kernel_category("__cudnn$fmhaSoftmax") == "fused_attention"
