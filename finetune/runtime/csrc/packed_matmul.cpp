// MLX primitives that multiply by a weight as stored, on the CPU backend: packed 4/8-bit
// (`matmul`) and bf16 (`bf16_matmul`).
//
// MLX's CPU `quantized_matmul` runs on one thread, compute-bound, and its CPU matmuls in bf16 are
// slower than in fp32, so the runtime used to serve such weights from fp32 copies (4 bytes a
// weight read per product). These primitives hand the stored weight to the decode GEMM library
// (finetune/runtime/csrc/decode_gemm.c: `vf_qgemm`, `vf_bgemm`; AVX2, the library's threads),
// which widens it in registers. Each is a node of MLX's graph like any other: lazy, scheduled on
// the CPU stream, differentiable (through MLX's own ops). The kernels are bound at run time
// (`bind`, their addresses), so this extension links only against MLX.

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include <nanobind/nanobind.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

using qgemm_fn = int (*)(int, int, int, const float*, const uint32_t*, const float*,
                         const float*, int, int, float*);
using bgemm_fn = int (*)(int, int, int, const float*, const uint16_t*, float*);
qgemm_fn qgemm = nullptr;
bgemm_fn bgemm = nullptr;

// A fresh output and the CPU stream's encoder, inputs and output registered with it.
mx::cpu::CommandEncoder& prepare(mx::Stream stream, const std::vector<mx::array>& inputs,
                                 mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const mx::array& input : inputs) encoder.set_input_array(input);
  encoder.set_output_array(out);
  return encoder;
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

// A product with a stored weight (inputs[1], [n, k]) on the CPU stream: its shape, and no GPU.
class CpuMatmul : public mx::UnaryPrimitive {
 public:
  using mx::UnaryPrimitive::UnaryPrimitive;

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU backend only");
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {product_shape(inputs[0], inputs[1].shape(0))};
  }
};

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
    encoder.dispatch([m, n, k, x = x.data<float>(), w = w.data<uint32_t>(),
                      scales = scales.data<float>(), biases = biases.data<float>(),
                      y = out.data<float>(), group = group_size_, bits = bits_]() {
      if (qgemm(m, n, k, x, w, scales, biases, bits, group, y) != 0) {
        throw std::runtime_error("vf_qgemm refused a layout packed_matmul accepted");
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
    encoder.dispatch([m, n, k, x = inputs[0].data<float>(), w = inputs[1].data<uint16_t>(),
                      y = out.data<float>()]() {
      if (bgemm(m, n, k, x, w, y) != 0) {
        throw std::runtime_error("vf_bgemm refused a product bf16_matmul accepted");
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

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("packed_matmul: " + what);
}

mx::Stream cpu_stream() { return mx::to_stream({}, mx::Device::cpu); }

mx::array as_rows(const mx::array& x, mx::Stream stream) {
  return mx::contiguous(mx::astype(x, mx::float32, stream), false, stream);
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
  auto contiguous = [&](const mx::array& a) { return mx::contiguous(a, false, stream); };
  return mx::array(product_shape(x, n), mx::float32,
                   std::make_shared<PackedMatmul>(stream, group_size, bits),
                   {as_rows(x, stream), contiguous(w), contiguous(scales), contiguous(biases)});
}

mx::array bf16_matmul(const mx::array& x, const mx::array& w) {
  check(bgemm != nullptr, "no kernel bound (call bind first)");
  check(w.ndim() == 2 && w.dtype() == mx::bfloat16, "the weight must be a 2-D bfloat16 array");
  check(x.ndim() >= 1 && x.shape(-1) == w.shape(1), "the input's last axis must match the weight");
  mx::Stream stream = cpu_stream();
  return mx::array(product_shape(x, w.shape(0)), mx::float32, std::make_shared<Bf16Matmul>(stream),
                   {as_rows(x, stream), mx::contiguous(w, false, stream)});
}

}  // namespace

NB_MODULE(packed_matmul, m) {
  m.doc() = "x @ w.T on MLX's CPU stream, reading w as stored: packed 4/8-bit (affine) or bf16";
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
}
