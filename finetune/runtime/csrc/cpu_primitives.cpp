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
#include <algorithm>
#include <functional>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HAVE_X86_SIMD 1
#endif

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/fast.h"
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

// One row of the RMS norm below, in its roundings.
void rms_row(const float* xr, const float* w, int64_t w_step, float* yr, int n, float inverse_n,
             float eps) {
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
      for (size_t r = 0; r < rows; ++r) rms_row(x + r * n, w, w_step, y + r * n, n, inverse_n, eps);
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

// MLX's exp (its simd::exp, which its compiled kernels and its softmax use), value by value.
float mlx_exp(float v) {
  const float x = v * 1.442695f;
  const float ipart = static_cast<float>(std::floor(static_cast<double>(x) + 0.5));
  const float fpart = x - ipart;
  float p = kExpCoefficients[0];
  for (int i = 1; i < 7; ++i) p = std::fma(p, fpart, kExpCoefficients[i]);
  if (std::isnan(v)) return v;
  if (v > 88.0f) return INFINITY;
  if (v < -88.0f) return 0.0f;
  const int32_t bits = (static_cast<int32_t>(ipart) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return scale * p;
}

float swiglu_one(float g, float u) {
  const float y = 1.0f / (1.0f + mlx_exp(std::fabs(g)));
  const float sigmoid = g < 0.0f ? y : 1.0f - y;
  return (g * sigmoid) * u;
}

#ifdef HAVE_X86_SIMD
// mlx_exp of eight values.
__attribute__((target("avx2,fma"))) __m256 mlx_exp8(__m256 v) {
  const __m256 x = _mm256_mul_ps(v, _mm256_set1_ps(1.442695f));
  const __m256 whole = _mm256_floor_ps(x);
  const __m256 up_one = _mm256_and_ps(
      _mm256_cmp_ps(_mm256_sub_ps(x, whole), _mm256_set1_ps(0.5f), _CMP_GE_OQ),
      _mm256_set1_ps(1.0f));
  const __m256 ipart = _mm256_add_ps(whole, up_one);
  const __m256 fpart = _mm256_sub_ps(x, ipart);
  __m256 p = _mm256_set1_ps(kExpCoefficients[0]);
  for (int c = 1; c < 7; ++c) p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(kExpCoefficients[c]));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(ipart), _mm256_set1_epi32(127)), 23);
  __m256 e = _mm256_mul_ps(_mm256_castsi256_ps(bits), p);
  e = _mm256_blendv_ps(e, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  e = _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY),
                       _mm256_cmp_ps(v, _mm256_set1_ps(88.0f), _CMP_GT_OQ));
  return _mm256_blendv_ps(e, _mm256_setzero_ps(),
                          _mm256_cmp_ps(v, _mm256_set1_ps(-88.0f), _CMP_LT_OQ));
}

__attribute__((target("avx2,fma"))) void swiglu_avx2(const float* g, const float* u, float* y,
                                                     size_t count) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 one = _mm256_set1_ps(1.0f);
  size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = mlx_exp8(_mm256_andnot_ps(sign, gv));
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

// softmax(scale q k^T + mask) v for q [B, Hq, L, D], k and v [B, Hkv, T, D] (Hq a multiple of
// Hkv: grouped heads), out [B, L, Hq * D] (the layout the output projection reads). On this
// backend MLX's own attention is its fallback, ~15 nodes (the scaling, the grouped heads'
// reshapes and broadcasts, two matmuls, the mask, the softmax with a scalar exp, the output's
// transpose and copy): ~1,500 a real-0.6B frame, and a prefill's softmax is ~15 % of it. Here
// one node. Each query row is summed on its own in a fixed order: scores over D in eight lanes,
// the softmax over T left to right (MLX's exp, its max, sum and 1 / sum), the values over T left
// to right. So a row's output never depends on the other rows, and positions it masks (left
// padding of a batch: exp gives exact zeros, and zero values) leave it as the row alone with no
// padding, bit for bit. Against MLX's fallback it differs in the last bits (OpenBLAS sums the
// products in its own order); its vjp is the fallback's.

// Query rows x keys x D (the scores' multiply-adds; the values take as many again) from which an
// attention call is split over threads: ~1 ms of one core's work, where starting a thread costs
// tens of microseconds.
constexpr double kThreadedAttention = 1 << 21;

struct AttentionArgs {
  const float *q, *k, *v;
  const void* mask;  // nullptr, bool or float32, strided as [B, Hq, L, T]
  bool bool_mask, causal;
  int64_t k_strides[3], v_strides[3], mask_strides[4];  // batch, head, position (, column)
  int b, hq, hkv, l, t, d;
  float scale;
  float* y;
};

// The scores of one query row: q . k_t for each of t keys (rows kst apart), each summed over D
// in eight lanes (lane j takes elements j, j + 8, ...), the lanes folded as
// ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)), then the tail. The same sums however many keys.
void scores_scalar(const float* q, const float* k, int64_t kst, int t, int d, float* out) {
  for (int j = 0; j < t; ++j) {
    const float* row = k + j * kst;
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= d; i += 8)
      for (int c = 0; c < 8; ++c) lanes[c] = std::fma(q[i + c], row[i + c], lanes[c]);
    float total = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) +
                  ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    for (; i < d; ++i) total = std::fma(q[i], row[i], total);
    out[j] = total;
  }
}

// y[:d] = sum_t p_t v_t, each element summed over t in order by fused multiply-adds from zero.
void weighted_rows_scalar(const float* p, const float* v, int64_t vst, int t, int d, float* y) {
  for (int i = 0; i < d; ++i) y[i] = 0.0f;
  for (int j = 0; j < t; ++j)
    for (int i = 0; i < d; ++i) y[i] = std::fma(p[j], v[j * vst + i], y[i]);
}

#ifdef HAVE_X86_SIMD
__attribute__((target("avx2,fma"))) inline float fold8(__m256 acc) {
  const __m128 pairs = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 folded = _mm_add_ps(pairs, _mm_movehl_ps(pairs, pairs));
  return _mm_cvtss_f32(_mm_add_ss(folded, _mm_shuffle_ps(folded, folded, 1)));
}

__attribute__((target("avx2,fma"))) float dot_tail(const float* q, const float* row, int from,
                                                   int d, float total) {
  for (int i = from; i < d; ++i) total = std::fma(q[i], row[i], total);
  return total;
}

// scores_scalar's sums, four keys at a time (four independent chains hide the FMA latency).
__attribute__((target("avx2,fma"))) void scores_avx2(const float* q, const float* k, int64_t kst,
                                                     int t, int d, float* out) {
  const int dv = d - d % 8;
  int j = 0;
  for (; j + 4 <= t; j += 4) {
    const float* r0 = k + j * kst;
    const float *r1 = r0 + kst, *r2 = r1 + kst, *r3 = r2 + kst;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int i = 0; i < dv; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r0 + i), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r1 + i), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r2 + i), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r3 + i), a3);
    }
    out[j] = dot_tail(q, r0, dv, d, fold8(a0));
    out[j + 1] = dot_tail(q, r1, dv, d, fold8(a1));
    out[j + 2] = dot_tail(q, r2, dv, d, fold8(a2));
    out[j + 3] = dot_tail(q, r3, dv, d, fold8(a3));
  }
  for (; j < t; ++j) {
    const float* row = k + j * kst;
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < dv; i += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(row + i), acc);
    out[j] = dot_tail(q, row, dv, d, fold8(acc));
  }
}

// weighted_rows_scalar's sums, 64 then 8 elements at a time in registers.
__attribute__((target("avx2,fma"))) void weighted_rows_avx2(const float* p, const float* v,
                                                            int64_t vst, int t, int d, float* y) {
  int i = 0;
  for (; i + 64 <= d; i += 64) {
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
    for (int j = 0; j < t; ++j) {
      const __m256 w = _mm256_set1_ps(p[j]);
      const float* row = v + j * vst + i;
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8 * c), acc[c]);
    }
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(y + i + 8 * c, acc[c]);
  }
  for (; i + 8 <= d; i += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int j = 0; j < t; ++j)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + j * vst + i), acc);
    _mm256_storeu_ps(y + i, acc);
  }
  for (; i < d; ++i) {
    float total = 0.0f;
    for (int j = 0; j < t; ++j) total = std::fma(p[j], v[j * vst + i], total);
    y[i] = total;
  }
}

__attribute__((target("avx2,fma"))) void exp_shifted_avx2(float* x, int n, float shift) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, mlx_exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(shift))));
  for (; i < n; ++i) x[i] = mlx_exp(x[i] - shift);
}
#endif

void exp_shifted_scalar(float* x, int n, float shift) {
  for (int i = 0; i < n; ++i) x[i] = mlx_exp(x[i] - shift);
}

// The attention's three loops for this CPU: AVX2 where it has it, else their scalar twins.
struct AttentionKernels {
  void (*scores)(const float*, const float*, int64_t, int, int, float*);
  void (*exp_shifted)(float*, int, float);
  void (*weighted_rows)(const float*, const float*, int64_t, int, int, float*);
};

const AttentionKernels& attention_kernels() {
#ifdef HAVE_X86_SIMD
  static const AttentionKernels kernels =
      cpu_has_avx2_fma()
          ? AttentionKernels{scores_avx2, exp_shifted_avx2, weighted_rows_avx2}
          : AttentionKernels{scores_scalar, exp_shifted_scalar, weighted_rows_scalar};
#else
  static const AttentionKernels kernels{scores_scalar, exp_shifted_scalar, weighted_rows_scalar};
#endif
  return kernels;
}

void attend_row(const AttentionArgs& a, int b, int h, int l, float* scaled, float* p) {
  const AttentionKernels& kernels = attention_kernels();
  const int d = a.d, kv = h / (a.hq / a.hkv);
  const float* q = a.q + ((static_cast<size_t>(b) * a.hq + h) * a.l + l) * d;
  for (int i = 0; i < d; ++i) scaled[i] = a.scale * q[i];
  kernels.scores(scaled, a.k + b * a.k_strides[0] + kv * a.k_strides[1], a.k_strides[2], a.t, d,
                 p);
  const int last_seen = l + a.t - a.l;  // causal: the last column this query sees
  for (int t = 0; t < a.t; ++t) {
    if (a.causal && t > last_seen) p[t] = -std::numeric_limits<float>::max();
    if (a.mask != nullptr) {
      const int64_t at = b * a.mask_strides[0] + h * a.mask_strides[1] +
                         l * a.mask_strides[2] + t * a.mask_strides[3];
      if (a.bool_mask) {
        if (!static_cast<const bool*>(a.mask)[at]) p[t] = -std::numeric_limits<float>::max();
      } else {
        p[t] = p[t] + static_cast<const float*>(a.mask)[at];
      }
    }
  }
  float top = -INFINITY;
  for (int t = 0; t < a.t; ++t) top = std::max(p[t], top);
  kernels.exp_shifted(p, a.t, top);
  float total = 0.0f;
  for (int t = 0; t < a.t; ++t) total += p[t];
  const float inverse = 1.0f / total;
  for (int t = 0; t < a.t; ++t) p[t] = p[t] * inverse;
  kernels.weighted_rows(p, a.v + b * a.v_strides[0] + kv * a.v_strides[1], a.v_strides[2], a.t,
                        d, a.y + ((static_cast<size_t>(b) * a.l + l) * a.hq + h) * d);
}

// What the node computes: MLX's attention on this stream, then the output projection's layout.
mx::array attention_ops(const std::vector<mx::array>& in, float scale, bool causal, mx::Stream s) {
  const mx::array& q = in[0];
  std::optional<mx::array> mask;
  if (in.size() > 3) mask = in[3];
  const mx::array out = mx::fast::scaled_dot_product_attention(
      q, in[1], in[2], scale, causal ? "causal" : (mask ? "array" : ""), mask, std::nullopt,
      false, s);
  return mx::reshape(mx::transpose(out, {0, 2, 1, 3}, s), {q.shape(0), q.shape(2), -1}, s);
}

class Attention : public CpuOnly {
 public:
  Attention(mx::Stream stream, float scale, bool causal)
      : CpuOnly(stream), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(stream(), inputs, out);
    const mx::array &q = inputs[0], &k = inputs[1], &v = inputs[2];
    AttentionArgs a{};
    a.q = rows_of(q, encoder);
    a.k = last_axis_dense(k, encoder, a.k_strides);
    a.v = last_axis_dense(v, encoder, a.v_strides);
    a.causal = causal_;
    if (inputs.size() > 3) {
      const mx::array& mask = inputs[3];
      a.bool_mask = mask.dtype() == mx::bool_;
      a.mask = a.bool_mask ? static_cast<const void*>(mask.data<bool>())
                           : static_cast<const void*>(mask.data<float>());
      for (int i = 0; i < 4; ++i) a.mask_strides[i] = mask.strides(i);
    }
    a.b = q.shape(0), a.hq = q.shape(1), a.l = q.shape(2), a.d = q.shape(3);
    a.hkv = k.shape(1), a.t = k.shape(2);
    a.scale = scale_;
    a.y = out.data<float>();
    encoder.dispatch([a]() {
      const int rows = a.b * a.hq * a.l;
      auto attend = [&a](int first, int last) {
        std::vector<float> scaled(a.d), p(std::max(a.t, 1));
        for (int r = first; r < last; ++r)
          attend_row(a, r / (a.hq * a.l), r / a.l % a.hq, r % a.l, scaled.data(), p.data());
      };
      // A prompt's prefill (rows x keys in the tens of thousands) over the cores, each taking
      // whole query rows, so the values are the same; a decode step's few rows on this thread.
      const int threads = static_cast<double>(rows) * a.t * a.d < kThreadedAttention
                              ? 1
                              : static_cast<int>(std::clamp(std::thread::hardware_concurrency(),
                                                            1u, 8u));
      std::vector<std::thread> others;
      for (int i = 1; i < threads; ++i) {
        const int first = static_cast<int>(static_cast<long>(rows) * i / threads);
        const int last = static_cast<int>(static_cast<long>(rows) * (i + 1) / threads);
        try {
          others.emplace_back(attend, first, last);
        } catch (const std::system_error&) {  // no thread to be had: its rows on this one
          attend(first, last);
        }
      }
      attend(0, rows / threads);
      for (std::thread& other : others) other.join();
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    return composite_vjp(
        [scale = scale_, causal = causal_, s = stream()](const std::vector<mx::array>& in) {
          return attention_ops(in, scale, causal, s);
        },
        primals, cotangents, argnums);
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const mx::array& q = inputs[0];
    return {{q.shape(0), q.shape(2), q.shape(1) * q.shape(3)}};
  }

  const char* name() const override { return "Attention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& that = static_cast<const Attention&>(other);
    return scale_ == that.scale_ && causal_ == that.causal_;
  }

 private:
  // The rows of a [B, H, T, D] input with D contiguous (a KV cache's view is): its memory and
  // its batch, head and position strides; anything else is laid out row-major first.
  static const float* last_axis_dense(const mx::array& x, mx::cpu::CommandEncoder& encoder,
                                      int64_t* strides) {
    if (x.strides(3) == 1 || x.shape(3) == 1) {
      for (int i = 0; i < 3; ++i) strides[i] = x.strides(i);
      return x.data<float>();
    }
    const float* rows = rows_of(x, encoder);
    strides[2] = x.shape(3);
    strides[1] = strides[2] * x.shape(2);
    strides[0] = strides[1] * x.shape(1);
    return rows;
  }

  float scale_;
  bool causal_;
};

// Qwen3-TTS's attention inputs, the query's or the key's: the projection x [B, L, H * D] as H
// heads, each head RMS-normed over D (q_norm / k_norm), laid out [B, H, L, D], and rotated by
// the position embeddings cos, sin [B, L, D]: n * cos + rotate_half(n) * sin, rotate_half(n) =
// [-n[D/2:], n[:D/2]]. mlx-audio builds this from a reshape, the norm, a transpose and a compiled
// rotation with two expand_dims, two slices, a negation and a concatenation: ~10 nodes each for
// the query and the key of every attention, ~2,000 a real-0.6B frame. Here one node, with the
// norm's roundings (rms_row) and the compiled rotation's (each product rounded, then the sum), so
// its values are those ops' bit for bit; each head of each position alone.
mx::array norm_rope_ops(const mx::array& x, const mx::array& weight, const mx::array& cos,
                        const mx::array& sin, int heads, float eps, mx::Stream s) {
  const int b = x.shape(0), l = x.shape(1), d = weight.shape(0), half = d / 2;
  const mx::array normed = mx::transpose(
      rms_norm_ops(mx::reshape(x, {b, l, heads, d}, s), weight, eps, s), {0, 2, 1, 3}, s);
  const mx::array rotated = mx::concatenate(
      {mx::negative(mx::slice(normed, {0, 0, 0, half}, {b, heads, l, d}, s), s),
       mx::slice(normed, {0, 0, 0, 0}, {b, heads, l, half}, s)},
      -1, s);
  return mx::add(mx::multiply(normed, mx::expand_dims(cos, 1, s), s),
                 mx::multiply(rotated, mx::expand_dims(sin, 1, s), s), s);
}

class NormRope : public CpuOnly {
 public:
  NormRope(mx::Stream stream, int heads, float eps) : CpuOnly(stream), heads_(heads), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(stream(), inputs, out);
    const mx::array& weight = inputs[1];
    encoder.dispatch([x = rows_of(inputs[0], encoder), w = weight.data<float>(),
                      w_step = weight.strides(0), c = rows_of(inputs[2], encoder),
                      s = rows_of(inputs[3], encoder), y = out.data<float>(), b = out.shape(0),
                      h = out.shape(1), l = out.shape(2), d = out.shape(3),
                      inverse_n = static_cast<float>(1.0 / out.shape(3)), eps = eps_]() {
      std::vector<float> normed(d);
      const int half = d / 2;
      for (int row = 0; row < b; ++row)
        for (int pos = 0; pos < l; ++pos) {
          const float* cr = c + (static_cast<size_t>(row) * l + pos) * d;
          const float* sr = s + (static_cast<size_t>(row) * l + pos) * d;
          for (int head = 0; head < h; ++head) {
            rms_row(x + ((static_cast<size_t>(row) * l + pos) * h + head) * d, w, w_step,
                    normed.data(), d, inverse_n, eps);
            float* yr = y + ((static_cast<size_t>(row) * h + head) * l + pos) * d;
            for (int i = 0; i < half; ++i) {
              const float direct = normed[i] * cr[i];
              const float turned = -normed[i + half] * sr[i];
              yr[i] = direct + turned;
            }
            for (int i = half; i < d; ++i) {
              const float direct = normed[i] * cr[i];
              const float turned = normed[i - half] * sr[i];
              yr[i] = direct + turned;
            }
          }
        }
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    return composite_vjp(
        [heads = heads_, eps = eps_, s = stream()](const std::vector<mx::array>& in) {
          return norm_rope_ops(in[0], in[1], in[2], in[3], heads, eps, s);
        },
        primals, cotangents, argnums);
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const mx::array& x = inputs[0];
    return {{x.shape(0), heads_, x.shape(1), inputs[1].shape(0)}};
  }

  const char* name() const override { return "NormRope"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& that = static_cast<const NormRope&>(other);
    return heads_ == that.heads_ && eps_ == that.eps_;
  }

 private:
  int heads_;
  float eps_;
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

mx::array norm_rope(const mx::array& x, const mx::array& weight, const mx::array& cos,
                    const mx::array& sin, int heads, float eps) {
  for (const mx::array* a : {&x, &weight, &cos, &sin}) {
    check(a->dtype() == mx::float32, "norm_rope takes float32 arrays");
  }
  check(x.ndim() == 3 && weight.ndim() == 1 && heads > 0, "x must be [B, L, heads * D]");
  const int d = weight.shape(0);
  check(d % 2 == 0 && x.shape(2) == heads * d, "x's last axis must be heads * D, D even");
  const mx::Shape rows = {x.shape(0), x.shape(1), d};
  check(cos.shape() == sin.shape() && cos.ndim() == 3 &&
            mx::broadcast_shapes(cos.shape(), rows) == rows,
        "cos and sin must broadcast to [B, L, D]");
  mx::Stream stream = cpu_stream();
  return mx::array({x.shape(0), heads, x.shape(1), d}, mx::float32,
                   std::make_shared<NormRope>(stream, heads, eps),
                   {x, stored(weight, stream), mx::broadcast_to(cos, rows, stream),
                    mx::broadcast_to(sin, rows, stream)});
}

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    const std::string& mask_mode, const std::optional<mx::array>& mask) {
  for (const mx::array* a : {&q, &k, &v}) {
    check(a->dtype() == mx::float32 && a->ndim() == 4, "attention takes float32 [B, H, L, D]");
  }
  check(k.shape() == v.shape() && q.shape(0) == k.shape(0) && q.shape(3) == k.shape(3),
        "k and v must be [B, Hkv, T, D] with q's B and D");
  check(k.shape(1) > 0 && q.shape(1) % k.shape(1) == 0, "q's heads must be a multiple of k's");
  check(mask_mode == "" || mask_mode == "causal" || mask_mode == "array",
        "mask_mode must be '', 'causal' or 'array'");
  check((mask_mode == "array") == mask.has_value(), "an array mask comes with mask_mode 'array'");
  mx::Stream stream = cpu_stream();
  std::vector<mx::array> inputs = {q, k, v};
  if (mask) {
    check(mask->dtype() == mx::bool_ || mask->dtype() == mx::float32,
          "the mask must be bool or float32");
    inputs.push_back(
        mx::broadcast_to(*mask, {q.shape(0), q.shape(1), q.shape(2), k.shape(2)}, stream));
  }
  return mx::array({q.shape(0), q.shape(2), q.shape(1) * q.shape(3)}, mx::float32,
                   std::make_shared<Attention>(stream, scale, mask_mode == "causal"),
                   std::move(inputs));
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
  m.def("attention", &attention, "q"_a, "k"_a, "v"_a, "scale"_a, "mask_mode"_a = "",
        "mask"_a = nb::none());
  m.def("norm_rope", &norm_rope, "x"_a, "weight"_a, "cos"_a, "sin"_a, "heads"_a, "eps"_a);
  m.def(
      "bind_elu",
      [](uintptr_t kernel, int threads) {
        elu_kernel = reinterpret_cast<elu_fn>(kernel);
        elu_threads = threads;
      },
      "kernel"_a, "threads"_a, "Bind the host ELU kernel: the address of elu's vf_elu.");
  m.def("elu", &elu, "x"_a);
}
