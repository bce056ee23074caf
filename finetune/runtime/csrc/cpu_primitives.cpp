// MLX primitives for the CPU backend, where MLX runs a composite op by op: products with a
// weight as stored (packed 4/8-bit: `matmul`; bf16: `bf16_matmul`), the RMS norm (`rms_norm`),
// the SwiGLU of the MLPs (`swiglu`) and the ELU (`elu`).
//
// MLX's CPU `quantized_matmul` runs on one thread, compute-bound, and its CPU matmuls in bf16 are
// slower than in fp32, so the runtime used to serve such weights from fp32 copies (4 bytes a
// weight read per product). The products hand the stored weight to the decode GEMM library
// (finetune/runtime/csrc/decode_gemm.c: `vf_qgemm`, `vf_bgemm`; AVX2, the library's threads),
// which widens it in registers; they are bound at run time (`bind`, the kernels' addresses), so
// this extension links only against MLX (as is the ELU kernel: `bind_elu`). `mx.fast.rms_norm` has no CPU kernel: its fallback is
// three nodes a call even compiled (square, sum, the elementwise rest), ~430 calls a real-0.6B
// frame; `rms_norm` is one node with the fallback's values bit for bit. `elu` runs the host ELU
// kernel (csrc/elu.c) as a node of the graph rather than a round trip through numpy. Each is a
// node of MLX's graph like any other: lazy, scheduled on the CPU stream, differentiable (through
// MLX's own ops).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HAVE_X86_SIMD 1
#endif

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/transforms.h"
#include "mlx/utils.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

using qgemm_fn = int (*)(int, int, int, const float*, const uint32_t*, const float*,
                         const float*, int, int, float*);
using bgemm_fn = int (*)(int, int, int, const float*, const uint16_t*, float*);
using elu_fn = int (*)(const float*, float*, long, int);
qgemm_fn qgemm = nullptr;
bgemm_fn bgemm = nullptr;
elu_fn elu_kernel = nullptr;
int elu_threads = 1;

// A fresh output and the CPU stream's encoder, inputs and output registered with it.
mx::cpu::CommandEncoder& prepare(mx::Stream stream, const std::vector<mx::array>& inputs,
                                 mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const mx::array& input : inputs) encoder.set_input_array(input);
  encoder.set_output_array(out);
  return encoder;
}

// The float32 rows of x: x's own memory where it is row-contiguous (nearly always: it is the
// output of a norm, an activation or a reshape), else a row-contiguous copy registered with the
// encoder. Done here, at evaluation, where x's layout is known, rather than as a Contiguous node
// a product at graph building (a real 0.6B frame has ~740 products: ~3,000 nodes of dispatch).
const float* rows_of(const mx::array& x, mx::cpu::CommandEncoder& encoder) {
  if (x.flags().row_contiguous) return x.data<float>();
  mx::array copy(x.shape(), mx::float32, nullptr, {});
  copy.set_data(mx::allocator::malloc(copy.nbytes()));
  encoder.add_temporary(copy);
  encoder.dispatch([src = x.data<float>(), dst = copy.data<float>(), shape = x.shape(),
                    strides = x.strides(), size = x.size()]() {
    const int ndim = static_cast<int>(shape.size());
    std::vector<int> index(ndim, 0);
    for (size_t i = 0; i < size; ++i) {
      int64_t at = 0;
      for (int d = 0; d < ndim; ++d) at += index[d] * strides[d];
      dst[i] = src[at];
      for (int d = ndim - 1; d >= 0 && ++index[d] == shape[d]; --d) index[d] = 0;
    }
  });
  return copy.data<float>();
}

// (rows, output, input) of x[..., k] @ w[n, k]^T.
struct Dims {
  int m, n, k;
};
Dims dims(const mx::array& x, const mx::array& out) {
  const int k = x.shape(-1);
  return {k > 0 ? static_cast<int>(x.size() / k) : 0, out.shape(-1), k};
}

// x[..., k] @ W[n, k]^T: [..., n].
mx::Shape product_shape(const mx::array& x, int n) {
  mx::Shape shape = x.shape();
  shape.back() = n;
  return shape;
}

// A primitive of the CPU stream only: no GPU kernel.
class CpuOnly : public mx::UnaryPrimitive {
 public:
  using mx::UnaryPrimitive::UnaryPrimitive;

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU backend only");
  }
};

// A product with a stored weight (inputs[1], [n, k]): x's shape with the weight's n last.
class CpuMatmul : public CpuOnly {
 public:
  using CpuOnly::CpuOnly;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {product_shape(inputs[0], inputs[1].shape(0))};
  }
};

// A primitive whose output has its first input's shape.
class CpuSameShape : public CpuOnly {
 public:
  using CpuOnly::CpuOnly;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
};

// The vjp of a primitive that computes what `ops` computes: MLX's vjp of those ops, for the
// inputs asked for.
std::vector<mx::array> composite_vjp(
    std::function<mx::array(const std::vector<mx::array>&)> ops,
    const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums) {
  auto composite = [&ops](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{ops(in)};
  };
  auto grads = mx::vjp(composite, primals, cotangents).second;
  std::vector<mx::array> wanted;
  for (int arg : argnums) wanted.push_back(grads[arg]);
  return wanted;
}

class PackedMatmul : public CpuMatmul {
 public:
  PackedMatmul(mx::Stream stream, int group_size, int bits)
      : CpuMatmul(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    const mx::array& scales = inputs[2];
    const mx::array& biases = inputs[3];
    auto& encoder = prepare(stream(), inputs, out);
    const auto [m, n, k] = dims(x, out);
    encoder.dispatch([m, n, k, x = rows_of(x, encoder), w = w.data<uint32_t>(),
                      scales = scales.data<float>(), biases = biases.data<float>(),
                      y = out.data<float>(), group = group_size_, bits = bits_]() {
      if (qgemm(m, n, k, x, w, scales, biases, bits, group, y) != 0) {
        throw std::runtime_error("vf_qgemm refused a layout packed matmul accepted");
      }
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    for (int arg : argnums) {
      if (arg != 0) {
        throw std::invalid_argument("packed_matmul is differentiable in its input only");
      }
    }
    // d(x @ W^T) / dx = cotangent @ W, with W the dequantised weight.
    return {mx::quantized_matmul(cotangents[0], primals[1], primals[2], primals[3],
                                 /*transpose=*/false, group_size_, bits_, "affine", stream())};
  }

  const char* name() const override { return "PackedMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const PackedMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

 private:
  int group_size_;
  int bits_;
};

class Bf16Matmul : public CpuMatmul {
 public:
  explicit Bf16Matmul(mx::Stream stream) : CpuMatmul(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(stream(), inputs, out);
    const auto [m, n, k] = dims(inputs[0], out);
    encoder.dispatch([m, n, k, x = rows_of(inputs[0], encoder),
                      w = inputs[1].data<uint16_t>(),
                      y = out.data<float>()]() {
      if (bgemm(m, n, k, x, w, y) != 0) {
        throw std::runtime_error("vf_bgemm refused a product bf16 matmul accepted");
      }
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    const mx::array& x = primals[0];
    const mx::array& w = primals[1];
    const mx::array& cotangent = cotangents[0];
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      if (arg == 0) {  // d(x @ W^T) / dx = cotangent @ W
        grads.push_back(mx::matmul(cotangent, mx::astype(w, mx::float32, stream()), stream()));
      } else {  // d / dW = cotangent^T @ x, over every leading axis
        const int k = x.shape(-1);
        const int n = w.shape(0);
        auto rows = [&](const mx::array& a, int width) {
          return mx::reshape(a, {-1, width}, stream());
        };
        mx::array dw = mx::matmul(mx::transpose(rows(cotangent, n), stream()), rows(x, k),
                                  stream());
        grads.push_back(mx::astype(dw, w.dtype(), stream()));
      }
    }
    return grads;
  }

  const char* name() const override { return "Bf16Matmul"; }

  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

// What mx.fast.rms_norm computes on CPU (its fallback), op for op: the composite the vjp
// differentiates.
mx::array rms_norm_ops(const mx::array& x, const mx::array& weight, float eps, mx::Stream s) {
  const mx::array xf = mx::astype(x, mx::float32, s);
  const mx::array mean_square = mx::mean(mx::square(xf, s), -1, /*keepdims=*/true, s);
  const mx::array normed =
      mx::multiply(xf, mx::rsqrt(mx::add(mean_square, mx::array(eps, mx::float32), s), s), s);
  return mx::multiply(mx::astype(normed, x.dtype(), s), weight, s);
}

// x * rsqrt(mean(x^2) + eps) * weight over the last axis, float32 x and weight. The same
// roundings in the same order as the fallback on this backend (MLX's x86 CPU build reduces one
// value at a time): each square rounded, summed left to right from zero, times the float of
// 1 / n, plus eps, one over the square root, times x, times the weight. So its values are the
// fallback's bit for bit (tests/test_runtime_conv.py), and a row's never depend on the others.
class RmsNorm : public CpuSameShape {
 public:
  RmsNorm(mx::Stream stream, float eps) : CpuSameShape(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(stream(), inputs, out);
    const int n = out.shape(-1);
    const size_t rows = n > 0 ? out.size() / n : 0;
    const mx::array& weight = inputs[1];
    encoder.dispatch([x = rows_of(inputs[0], encoder), w = weight.data<float>(),
                      w_step = weight.strides(0), y = out.data<float>(), rows, n,
                      inverse_n = static_cast<float>(1.0 / n), eps = eps_]() {
      for (size_t r = 0; r < rows; ++r) {
        const float* xr = x + r * n;
        float* yr = y + r * n;
        float total = 0.0f;
        for (int i = 0; i < n; ++i) {
          const float square = xr[i] * xr[i];  // rounded alone (built with -ffp-contract=off)
          total += square;
        }
        const float scale = 1.0f / std::sqrt(total * inverse_n + eps);
        for (int i = 0; i < n; ++i) {
          const float normed = xr[i] * scale;
          yr[i] = normed * w[i * w_step];
        }
      }
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    return composite_vjp(
        [eps = eps_, s = stream()](const std::vector<mx::array>& in) {
          return rms_norm_ops(in[0], in[1], eps, s);
        },
        primals, cotangents, argnums);
  }

  const char* name() const override { return "RmsNorm"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }

 private:
  float eps_;
};

// silu(gate) * up = (gate * sigmoid(gate)) * up: what mlx-audio's compiled `swiglu` computes on
// this backend, op for op. MLX's x86 CPU build runs a compiled elementwise kernel one value at a
// time (its Simd<float, 1>) and calls libm's fmaf for each fused multiply-add: ~20 ns a value,
// the largest elementwise cost of a decode step. Here eight values at a time with the same
// roundings: MLX's sigmoid, 1 / (1 + exp(|g|)) taken as is for g < 0 and as 1 - it otherwise,
// and its exp: x = |g| * log2(e) in float, the integer part floor(x + 0.5) taken in double (exact
// here: floor(x), plus one where x - floor(x) >= 0.5), the Cephes polynomial of the fraction by
// six fused multiply-adds, times 2^ipart built in the exponent bits, inf above 88. So its
// values are the compiled kernel's bit for bit (tests/test_runtime_primitives.py).
constexpr float kExpCoefficients[7] = {1.535336188319500e-4f, 1.339887440266574e-3f,
                                       9.618437357674640e-3f, 5.550332471162809e-2f,
                                       2.402264791363012e-1f, 6.931472028550421e-1f,
                                       1.000000000000000f};

float swiglu_one(float g, float u) {
  const float a = std::fabs(g);
  const float x = a * 1.442695f;
  const float ipart = static_cast<float>(std::floor(static_cast<double>(x) + 0.5));
  const float fpart = x - ipart;
  float p = kExpCoefficients[0];
  for (int i = 1; i < 7; ++i) p = std::fma(p, fpart, kExpCoefficients[i]);
  float e;
  if (std::isnan(a)) {
    e = a;
  } else if (a > 88.0f) {
    e = INFINITY;
  } else {
    const int32_t bits = (static_cast<int32_t>(ipart) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    e = scale * p;
  }
  const float y = 1.0f / (1.0f + e);
  const float sigmoid = g < 0.0f ? y : 1.0f - y;
  return (g * sigmoid) * u;
}

#ifdef HAVE_X86_SIMD
__attribute__((target("avx2,fma"))) void swiglu_avx2(const float* g, const float* u, float* y,
                                                     size_t count) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 log2e = _mm256_set1_ps(1.442695f);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 limit = _mm256_set1_ps(88.0f);
  const __m256 inf = _mm256_set1_ps(INFINITY);
  const __m256i bias = _mm256_set1_epi32(127);
  size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 a = _mm256_andnot_ps(sign, gv);
    const __m256 x = _mm256_mul_ps(a, log2e);
    const __m256 whole = _mm256_floor_ps(x);
    const __m256 up_one = _mm256_and_ps(
        _mm256_cmp_ps(_mm256_sub_ps(x, whole), half, _CMP_GE_OQ), one);
    const __m256 ipart = _mm256_add_ps(whole, up_one);
    const __m256 fpart = _mm256_sub_ps(x, ipart);
    __m256 p = _mm256_set1_ps(kExpCoefficients[0]);
    for (int c = 1; c < 7; ++c) p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(kExpCoefficients[c]));
    const __m256i bits =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(ipart), bias), 23);
    __m256 e = _mm256_mul_ps(_mm256_castsi256_ps(bits), p);
    e = _mm256_blendv_ps(e, a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    e = _mm256_blendv_ps(e, inf, _mm256_cmp_ps(a, limit, _CMP_GT_OQ));
    const __m256 yv = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 sigmoid = _mm256_blendv_ps(_mm256_sub_ps(one, yv), yv,
                                            _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_LT_OQ));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid), _mm256_loadu_ps(u + i)));
  }
  for (; i < count; ++i) y[i] = swiglu_one(g[i], u[i]);
}

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

void swiglu_values(const float* g, const float* u, float* y, size_t count) {
#ifdef HAVE_X86_SIMD
  static const bool simd = cpu_has_avx2_fma();
  if (simd) {
    swiglu_avx2(g, u, y, count);
    return;
  }
#endif
  for (size_t i = 0; i < count; ++i) y[i] = swiglu_one(g[i], u[i]);
}

// The composite the vjp differentiates: mlx-audio's swiglu in MLX ops.
mx::array swiglu_ops(const mx::array& gate, const mx::array& up, mx::Stream s) {
  return mx::multiply(mx::multiply(gate, mx::sigmoid(gate, s), s), up, s);
}

// silu(gate) * up of float32 gate and up of one shape: one node, each value alone.
class SwiGlu : public CpuSameShape {
 public:
  explicit SwiGlu(mx::Stream stream) : CpuSameShape(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(stream(), inputs, out);
    encoder.dispatch([g = rows_of(inputs[0], encoder), u = rows_of(inputs[1], encoder),
                      y = out.data<float>(), count = out.size()]() {
      swiglu_values(g, u, y, count);
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    return composite_vjp(
        [s = stream()](const std::vector<mx::array>& in) { return swiglu_ops(in[0], in[1], s); },
        primals, cotangents, argnums);
  }

  const char* name() const override { return "SwiGlu"; }

  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

// ELU (alpha 1), x > 0 ? x : expm1(x), of float32 x by the host ELU kernel (csrc/elu.c,
// bound by `bind_elu`): one lazy node where a host round trip (evaluate, copy out, copy back) was
// a sync point of the graph each call. A dense input (row-major or any transpose of it, as
// SEANet's [B, C, T] views of [B, T, C] buffers are) is taken in its own memory order and the
// output keeps its strides; anything else is laid out row-major first. Each value is computed
// alone, so a row never depends on the others.
class Elu : public CpuSameShape {
 public:
  explicit Elu(mx::Stream stream) : CpuSameShape(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    const float* source;
    size_t count;
    if (x.flags().contiguous) {
      out.set_data(mx::allocator::malloc(x.data_size() * sizeof(float)), x.data_size(),
                   x.strides(), x.flags());
      source = x.data<float>();
      count = x.data_size();
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
      source = rows_of(x, encoder);
      count = out.size();
    }
    encoder.set_output_array(out);
    encoder.dispatch([source, y = out.data<float>(), count, threads = elu_threads]() {
      elu_kernel(source, y, static_cast<long>(count), threads);
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>&,
                             const std::vector<mx::array>& outputs) override {
    // d elu / dx = 1 where x > 0, exp(x) = elu(x) + 1 elsewhere.
    const mx::Stream s = stream();
    const mx::array slope = mx::where(mx::greater(primals[0], mx::array(0.0f), s),
                                      mx::array(1.0f), mx::add(outputs[0], mx::array(1.0f), s), s);
    return {mx::multiply(cotangents[0], slope, s)};
  }

  const char* name() const override { return "Elu"; }

  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("cpu_primitives: " + what);
}

mx::Stream cpu_stream() { return mx::to_stream({}, mx::Device::cpu); }

// x in float32; its layout is settled at evaluation (rows_of).
mx::array as_float(const mx::array& x, mx::Stream stream) {
  return mx::astype(x, mx::float32, stream);
}

// A weight-side input as the kernel reads it: itself when it is already evaluated and
// row-contiguous (a model's parameters), else a Contiguous node.
mx::array stored(const mx::array& a, mx::Stream stream) {
  if (a.is_available() && a.flags().row_contiguous) return a;
  return mx::contiguous(a, false, stream);
}

mx::array packed_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                        const mx::array& biases, int group_size, int bits) {
  check(qgemm != nullptr, "no kernel bound (call bind first)");
  check(bits == 4 || bits == 8, "bits must be 4 or 8");
  check(group_size > 0 && group_size % 8 == 0, "group_size must be a positive multiple of 8");
  check(w.ndim() == 2 && w.dtype() == mx::uint32, "the weight must be a 2-D uint32 array");
  const int n = w.shape(0);
  const int k = w.shape(1) * (32 / bits);
  check(k % group_size == 0, "the input size must be a multiple of group_size");
  for (const mx::array* a : {&scales, &biases}) {
    check(a->ndim() == 2 && a->shape(0) == n && a->shape(1) == k / group_size &&
              a->dtype() == mx::float32,
          "scales and biases must be float32 [output, input / group_size]");
  }
  check(x.ndim() >= 1 && x.shape(-1) == k, "the input's last axis must match the weight");
  mx::Stream stream = cpu_stream();
  return mx::array(product_shape(x, n), mx::float32,
                   std::make_shared<PackedMatmul>(stream, group_size, bits),
                   {as_float(x, stream), stored(w, stream), stored(scales, stream),
                    stored(biases, stream)});
}

mx::array bf16_matmul(const mx::array& x, const mx::array& w) {
  check(bgemm != nullptr, "no kernel bound (call bind first)");
  check(w.ndim() == 2 && w.dtype() == mx::bfloat16, "the weight must be a 2-D bfloat16 array");
  check(x.ndim() >= 1 && x.shape(-1) == w.shape(1), "the input's last axis must match the weight");
  mx::Stream stream = cpu_stream();
  return mx::array(product_shape(x, w.shape(0)), mx::float32, std::make_shared<Bf16Matmul>(stream),
                   {as_float(x, stream), stored(w, stream)});
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps) {
  check(x.dtype() == mx::float32 && weight.dtype() == mx::float32,
        "rms_norm takes float32 x and weight");
  check(x.ndim() >= 1 && weight.ndim() == 1 && weight.shape(0) == x.shape(-1),
        "the weight must be 1-D, the size of x's last axis");
  mx::Stream stream = cpu_stream();
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(stream, eps),
                   {x, stored(weight, stream)});
}

mx::array swiglu(const mx::array& gate, const mx::array& up) {
  check(gate.dtype() == mx::float32 && up.dtype() == mx::float32, "swiglu takes float32");
  check(gate.shape() == up.shape(), "gate and up must have one shape");
  mx::Stream stream = cpu_stream();
  return mx::array(gate.shape(), mx::float32, std::make_shared<SwiGlu>(stream), {gate, up});
}

mx::array elu(const mx::array& x) {
  check(elu_kernel != nullptr, "no ELU kernel bound (call bind_elu first)");
  check(x.dtype() == mx::float32, "elu takes float32");
  mx::Stream stream = cpu_stream();
  return mx::array(x.shape(), mx::float32, std::make_shared<Elu>(stream), {x});
}

}  // namespace

NB_MODULE(cpu_primitives, m) {
  m.doc() =
      "MLX primitives for the CPU stream: products with weights as stored, the RMS norm, the "
      "SwiGLU, the ELU";
  m.def(
      "bind",
      [](uintptr_t packed, uintptr_t half) {
        qgemm = reinterpret_cast<qgemm_fn>(packed);
        bgemm = reinterpret_cast<bgemm_fn>(half);
      },
      "packed"_a, "half"_a, "Bind the kernels: the addresses of decode_gemm's vf_qgemm, vf_bgemm.");
  m.def("matmul", &packed_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a);
  m.def("bf16_matmul", &bf16_matmul, "x"_a, "w"_a);
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "eps"_a);
  m.def("swiglu", &swiglu, "gate"_a, "up"_a);
  m.def(
      "bind_elu",
      [](uintptr_t kernel, int threads) {
        elu_kernel = reinterpret_cast<elu_fn>(kernel);
        elu_threads = threads;
      },
      "kernel"_a, "threads"_a, "Bind the host ELU kernel: the address of elu's vf_elu.");
  m.def("elu", &elu, "x"_a);
}
