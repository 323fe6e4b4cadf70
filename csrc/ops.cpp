// The cmfast_ext operator library: schemas here, CPU kernels in cpu/kernels.cpp, the CUDA kernel in
// cuda/group_norm_silu.cu. Python reaches them as torch.ops.cmfast_ext.* after `import cmfast._C` (cmfast.ops loads
// it); the ops registered in cmfast/kernels/ hold their fake implementations and call them as the "ext" backend.
#include <Python.h>

#include <torch/library.h>

extern "C" {
// `import cmfast._C` loads this library, whose static initializers run the registrations below; the module itself
// holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(cmfast_ext, m) {
  // SiLU(GroupNorm(x) a + t) per group of C / num_groups channels, statistics in float32: y in x's dtype and memory
  // format, and the (B, num_groups) float32 mean and rstd. With scale, shift (B x C values, ADM's scale-shift form)
  // a = weight (1 + scale), t = bias (1 + scale) + shift; silu=False leaves out the SiLU.
  m.def(
      "group_norm_silu(Tensor x, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, int num_groups, "
      "float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  // Its backward from the forward's mean and rstd: dx, and the (B, C) float32 per-channel sums of dz xhat and dz
  // (dz = dy act'(xhat a + t)) that the parameter gradients are made of (cmfast.kernels.group_norm_silu.param_grads).
  m.def(
      "group_norm_silu_backward(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, "
      "Tensor mean, Tensor rstd, int num_groups, bool silu) -> (Tensor, Tensor, Tensor)");
  // Its forward mode from the forward's mean and rstd: the tangent of y along tx and the (B, C) float32 tangents ta, tt
  // of the per-channel a and t (cmfast.kernels.group_norm_silu.affine_tangents; None: no parameter tangent).
  m.def(
      "group_norm_silu_jvp(Tensor x, Tensor tx, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, "
      "Tensor mean, Tensor rstd, Tensor? ta, Tensor? tt, int num_groups, bool silu) -> Tensor");
  // c_skip(sigma) x + c_out(sigma) F per sample, with the consistency model's coefficients (Appendix C) computed in
  // float32 from sigma (B,), optionally clamped to [-1, 1].
  m.def("skip_out(Tensor x, Tensor F, Tensor sigma, float sigma_min, float sigma_data, bool clamp) -> Tensor");
  // Its forward mode: c_skip tx + c_out tF + tsigma (c_skip'(sigma) x + c_out'(sigma) F), zero where the clamp holds
  // the output at +-1; a missing tangent is zero.
  m.def(
      "skip_out_jvp(Tensor x, Tensor F, Tensor sigma, Tensor? tx, Tensor? tF, Tensor? tsigma, float sigma_min, "
      "float sigma_data, bool clamp) -> Tensor");
  // TrigFlow's consistency function cos(t) x - sin(t) sigma_data F per sample, t (B,) the TrigFlow time.
  m.def("trig_skip_out(Tensor x, Tensor F, Tensor t, float sigma_data) -> Tensor");
  // Its primal (when `primal`, else an empty tensor) and tangent along tx, tF, tt in one pass over x and F.
  m.def(
      "trig_skip_out_jvp(Tensor x, Tensor F, Tensor t, Tensor? tx, Tensor? tF, Tensor? tt, float sigma_data, "
      "bool primal) -> (Tensor, Tensor)");
  // The teacher's Heun step (cmfast.kernels.heun_step): the Euler point without F_next, the Heun estimate with it.
  m.def(
      "heun_step(Tensor x, Tensor F, Tensor sigma, Tensor sigma_next, Tensor? F_next, float sigma_data, "
      "bool clamp) -> Tensor");
  // channels_last GroupNorm(+scale-shift)(+SiLU) forward on h = x + pre_add + alpha residual (float32, rounded once to
  // x's dtype): y, and h itself when return_sum and something is added (else an empty tensor). pre_add: (C,), (1, C)
  // or (B, C); residual like x. Inference only; CUDA kernel in cuda/group_norm_silu_nhwc.cu.
  m.def(
      "group_norm_silu_nhwc(Tensor x, Tensor weight, Tensor bias, Tensor? pre_add, Tensor? residual, float alpha, "
      "Tensor? scale, Tensor? shift, int num_groups, float eps, bool silu, bool return_sum) -> (Tensor, Tensor)");
}
