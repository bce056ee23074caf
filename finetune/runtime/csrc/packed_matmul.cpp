// An MLX primitive that multiplies by a packed 4/8-bit weight on the CPU backend.
//
// MLX's CPU `quantized_matmul` runs on one thread, compute-bound, so the runtime used to serve
// a quantised layer from a dequantised fp32 copy (4 bytes a weight read per product, the same as
// an fp32 checkpoint). This primitive hands the packed weight to the decode GEMM library's
// `vf_qgemm` (finetune/runtime/csrc/decode_gemm.c: AVX2, the library's threads), which reads it
// packed and dequantises in registers. It is a node of MLX's graph like any other: lazy,
// scheduled on the CPU stream, differentiable in its input (through MLX's own quantized_matmul).
// The kernel is bound at run time (`bind`, the address of `vf_qgemm`), so this extension links
// only against MLX.

#include <cstdint>
#include <sstream>
#include <stdexcept>

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
qgemm_fn qgemm = nullptr;

class PackedMatmul : public mx::UnaryPrimitive {
 public:
  PackedMatmul(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    const mx::array& scales = inputs[2];
    const mx::array& biases = inputs[3];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_input_array(scales);
    encoder.set_input_array(biases);
    encoder.set_output_array(out);
    const int k = x.shape(-1);
    const int n = out.shape(-1);
    const int m = k > 0 ? static_cast<int>(x.size() / k) : 0;
    encoder.dispatch([m, n, k, x = x.data<float>(), w = w.data<uint32_t>(),
                      scales = scales.data<float>(), biases = biases.data<float>(),
                      y = out.data<float>(), group = group_size_, bits = bits_]() {
      if (qgemm(m, n, k, x, w, scales, biases, bits, group, y) != 0) {
        throw std::runtime_error("vf_qgemm refused a layout packed_matmul accepted");
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("packed_matmul runs on the CPU backend only");
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

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
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

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("packed_matmul: " + what);
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
  mx::Stream stream = mx::to_stream({}, mx::Device::cpu);
  auto contiguous = [&](const mx::array& a) { return mx::contiguous(a, false, stream); };
  mx::Shape shape = x.shape();
  shape.back() = n;
  return mx::array(shape, mx::float32,
                   std::make_shared<PackedMatmul>(stream, group_size, bits),
                   {contiguous(mx::astype(x, mx::float32, stream)), contiguous(w),
                    contiguous(scales), contiguous(biases)});
}

}  // namespace

NB_MODULE(packed_matmul, m) {
  m.doc() = "x @ dequantise(w).T on MLX's CPU stream, reading w packed (4 or 8 bits, affine)";
  m.def(
      "bind", [](uintptr_t address) { qgemm = reinterpret_cast<qgemm_fn>(address); },
      "address"_a, "Bind the kernel: the address of decode_gemm's vf_qgemm.");
  m.def("matmul", &packed_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a);
}
