// pybind11 module compass_kernels._cuda: raw pointers, sizes, row strides, dtype codes and a
// stream handle in; no libtorch. The calling convention is the docstring of
// compass_kernels/_ext.py; every entry point here takes a trailing `stream` (cudaStream_t as an
// integer); `route` also takes `workspace` (route_workspace_numel(T, k, E) int64s) and the grouped
// GEMMs take `workspace` + `workspace_bytes` (grouped_gemm[_wgrad|_fp8]_workspace_bytes(...) bytes).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/common.cuh"

namespace py = pybind11;

namespace compass {
namespace cuda {
// Defined in routing.cu.
int64_t route_workspace_numel(int64_t T, int64_t k, int64_t E);
void route(const void* ids, bool ids_is_int64, int64_t T, int64_t k, int64_t E, int64_t capacity,
           int64_t align, int64_t* row_id_map, int64_t* tokens_per_expert, int64_t* expert_offsets,
           int64_t* workspace, cudaStream_t stream);
void permute(const void* x, int64_t stride_x, int64_t elem_size, int64_t T, int64_t H, const int64_t* row_id_map,
             int64_t k, const int64_t* expert_offsets, const int64_t* tokens_per_expert, int64_t E,
             int64_t num_rows, void* out, cudaStream_t stream);
void unpermute(const void* y, int64_t stride_y, int dtype, int64_t num_rows, int64_t H, const int64_t* row_id_map,
               int64_t T, int64_t k, const void* probs, int probs_dtype, void* out, cudaStream_t stream);
void unpermute_bwd(const void* grad_out, int64_t stride_g, const void* y, int64_t stride_y, int dtype,
                   int64_t num_rows, int64_t H, const int64_t* row_id_map, int64_t T, int64_t k,
                   const int64_t* expert_offsets, const int64_t* tokens_per_expert, int64_t E,
                   const void* probs, int probs_dtype, void* grad_y, void* grad_probs, cudaStream_t stream);
// Defined in grouped_gemm.cu.
bool grouped_gemm_supported(int dtype, bool trans_b, int64_t K, int64_t N);
int64_t grouped_gemm_workspace_bytes(int64_t M, int64_t K, int64_t N, int64_t E, int dtype, bool trans_b);
int64_t grouped_gemm_wgrad_workspace_bytes(int64_t M, int64_t K, int64_t N, int64_t E, int dtype, bool trans_b);
void grouped_gemm(const void* x, const void* w, const int64_t* offsets, void* y, int64_t M, int64_t K, int64_t N,
                  int64_t E, int dtype, bool trans_b, void* workspace, int64_t workspace_bytes, cudaStream_t stream);
void grouped_gemm_wgrad(const void* x, const void* dy, const int64_t* offsets, void* dw, int64_t M, int64_t K,
                        int64_t N, int64_t E, int dtype, bool trans_b, void* workspace, int64_t workspace_bytes,
                        cudaStream_t stream);
// Defined in grouped_gemm_fp8.cu.
bool grouped_gemm_fp8_supported(int x_gran, int w_gran, int64_t K, int64_t N, int out_dtype);
int64_t grouped_gemm_fp8_workspace_bytes(int64_t M, int64_t K, int64_t N, int64_t E, int x_gran, int w_gran,
                                         int out_dtype);
void grouped_gemm_fp8(const void* x, const float* x_scale, const void* w, const float* w_scale,
                      const int64_t* offsets, void* y, int64_t M, int64_t K, int64_t N, int64_t E, int x_gran,
                      int w_gran, int out_dtype, void* workspace, int64_t workspace_bytes, cudaStream_t stream);
}  // namespace cuda
}  // namespace compass

#ifndef COMPASS_CUDA_ARCHS
#define COMPASS_CUDA_ARCHS ""
#endif

namespace {
// Python passes data_ptr() / cuda_stream as plain ints.
template <typename P>
P* as_ptr(uintptr_t p) {
  return reinterpret_cast<P*>(p);
}
cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// "90a,80" -> ["90a", "80"]
std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t end = s.find(',', start);
    const std::string item = s.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!item.empty()) out.push_back(item);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}
}  // namespace

PYBIND11_MODULE(_cuda, m) {
  namespace cc = compass::cuda;
  m.doc() = "Compass MoE CUDA kernels (raw-pointer calling convention: see compass_kernels/_ext.py)";
  // Launches are asynchronous: drop the GIL so other Python threads run while we enqueue.
  auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("route_workspace_numel", &cc::route_workspace_numel, py::arg("T"), py::arg("k"), py::arg("E"),
        "Number of int64 elements of device scratch that route(...) needs for T tokens, top-k, E experts.");

  m.def(
      "route",
      [](uintptr_t ids, bool ids_is_int64, int64_t T, int64_t k, int64_t E, int64_t capacity, int64_t align,
         uintptr_t row_id_map, uintptr_t tokens_per_expert, uintptr_t expert_offsets, uintptr_t workspace,
         uintptr_t stream) {
        cc::route(as_ptr<const void>(ids), ids_is_int64, T, k, E, capacity, align, as_ptr<int64_t>(row_id_map),
                  as_ptr<int64_t>(tokens_per_expert), as_ptr<int64_t>(expert_offsets), as_ptr<int64_t>(workspace),
                  as_stream(stream));
      },
      py::arg("ids"), py::arg("ids_is_int64"), py::arg("T"), py::arg("k"), py::arg("E"), py::arg("capacity"),
      py::arg("align"), py::arg("row_id_map"), py::arg("tokens_per_expert"), py::arg("expert_offsets"),
      py::arg("workspace"), py::arg("stream"), nogil,
      "Stable expert routing: row_id_map [T, k], tokens_per_expert [E], expert_offsets [E + 1] (int64).");

  m.def(
      "permute",
      [](uintptr_t x, int64_t stride_x, int64_t elem_size, int64_t T, int64_t H, uintptr_t row_id_map, int64_t k,
         uintptr_t expert_offsets, uintptr_t tokens_per_expert, int64_t E, int64_t num_rows, uintptr_t out,
         uintptr_t stream) {
        cc::permute(as_ptr<const void>(x), stride_x, elem_size, T, H, as_ptr<const int64_t>(row_id_map), k,
                    as_ptr<const int64_t>(expert_offsets), as_ptr<const int64_t>(tokens_per_expert), E, num_rows,
                    as_ptr<void>(out), as_stream(stream));
      },
      py::arg("x"), py::arg("stride_x"), py::arg("elem_size"), py::arg("T"), py::arg("H"), py::arg("row_id_map"),
      py::arg("k"), py::arg("expert_offsets"), py::arg("tokens_per_expert"), py::arg("E"), py::arg("num_rows"),
      py::arg("out"), py::arg("stream"), nogil,
      "out[row_id_map[t, j]] = x[t] (bytes); all other rows of out [num_rows, H] zeroed.");

  m.def(
      "unpermute",
      [](uintptr_t y, int64_t stride_y, int dtype, int64_t num_rows, int64_t H, uintptr_t row_id_map, int64_t T,
         int64_t k, uintptr_t probs, int probs_dtype, uintptr_t out, uintptr_t stream) {
        cc::unpermute(as_ptr<const void>(y), stride_y, dtype, num_rows, H, as_ptr<const int64_t>(row_id_map), T, k,
                      as_ptr<const void>(probs), probs_dtype, as_ptr<void>(out), as_stream(stream));
      },
      py::arg("y"), py::arg("stride_y"), py::arg("dtype"), py::arg("num_rows"), py::arg("H"), py::arg("row_id_map"),
      py::arg("T"), py::arg("k"), py::arg("probs"), py::arg("probs_dtype"), py::arg("out"), py::arg("stream"),
      nogil, "out[t] = sum_j probs[t, j] * y[row_id_map[t, j]] (weight 1 when probs == 0), fp32/fp64 accumulation.");

  m.def(
      "unpermute_bwd",
      [](uintptr_t grad_out, int64_t stride_g, uintptr_t y, int64_t stride_y, int dtype, int64_t num_rows, int64_t H,
         uintptr_t row_id_map, int64_t T, int64_t k, uintptr_t expert_offsets, uintptr_t tokens_per_expert,
         int64_t E, uintptr_t probs, int probs_dtype, uintptr_t grad_y, uintptr_t grad_probs, uintptr_t stream) {
        cc::unpermute_bwd(as_ptr<const void>(grad_out), stride_g, as_ptr<const void>(y), stride_y, dtype, num_rows,
                          H, as_ptr<const int64_t>(row_id_map), T, k, as_ptr<const int64_t>(expert_offsets),
                          as_ptr<const int64_t>(tokens_per_expert), E, as_ptr<const void>(probs), probs_dtype,
                          as_ptr<void>(grad_y), as_ptr<void>(grad_probs), as_stream(stream));
      },
      py::arg("grad_out"), py::arg("stride_g"), py::arg("y"), py::arg("stride_y"), py::arg("dtype"),
      py::arg("num_rows"), py::arg("H"), py::arg("row_id_map"), py::arg("T"), py::arg("k"),
      py::arg("expert_offsets"), py::arg("tokens_per_expert"), py::arg("E"), py::arg("probs"),
      py::arg("probs_dtype"), py::arg("grad_y"), py::arg("grad_probs"), py::arg("stream"), nogil,
      "grad_y[row_id_map[t, j]] = probs[t, j] * grad_out[t], other rows zero; grad_probs[t, j] = "
      "<grad_out[t], y[row_id_map[t, j]]> (skipped when probs == 0).");

  m.def("grouped_gemm_supported", &cc::grouped_gemm_supported, py::arg("dtype"), py::arg("trans_b"), py::arg("K"),
        py::arg("N"),
        "Whether the compiled sm_90a CUTLASS instances serve this grouped GEMM (bf16/fp16, K and N multiples "
        "of 8). The caller also checks 16-byte pointer alignment and compute capability 9.x.");

  m.def("grouped_gemm_workspace_bytes", &cc::grouped_gemm_workspace_bytes, py::arg("M"), py::arg("K"), py::arg("N"),
        py::arg("E"), py::arg("dtype"), py::arg("trans_b"),
        "Bytes of device scratch (128-byte aligned) that grouped_gemm(...) needs on the current device.");

  m.def(
      "grouped_gemm",
      [](uintptr_t x, uintptr_t w, uintptr_t offsets, uintptr_t y, int64_t M, int64_t K, int64_t N, int64_t E,
         int dtype, bool trans_b, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
        cc::grouped_gemm(as_ptr<const void>(x), as_ptr<const void>(w), as_ptr<const int64_t>(offsets),
                         as_ptr<void>(y), M, K, N, E, dtype, trans_b, as_ptr<void>(workspace), workspace_bytes,
                         as_stream(stream));
      },
      py::arg("x"), py::arg("w"), py::arg("offsets"), py::arg("y"), py::arg("M"), py::arg("K"), py::arg("N"),
      py::arg("E"), py::arg("dtype"), py::arg("trans_b"), py::arg("workspace"), py::arg("workspace_bytes"),
      py::arg("stream"), nogil,
      "y [M, N] rows offsets[e]:offsets[e+1] = x[rows] @ w[e] (w [E, K, N]; trans_b: @ w[e]^T, w [E, N, K]), fp32 "
      "accumulation; rows outside [offsets[0], offsets[E]) zero.");

  m.def("grouped_gemm_wgrad_workspace_bytes", &cc::grouped_gemm_wgrad_workspace_bytes, py::arg("M"), py::arg("K"),
        py::arg("N"), py::arg("E"), py::arg("dtype"), py::arg("trans_b"),
        "Bytes of device scratch (128-byte aligned) that grouped_gemm_wgrad(...) needs on the current device.");

  m.def(
      "grouped_gemm_wgrad",
      [](uintptr_t x, uintptr_t dy, uintptr_t offsets, uintptr_t dw, int64_t M, int64_t K, int64_t N, int64_t E,
         int dtype, bool trans_b, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
        cc::grouped_gemm_wgrad(as_ptr<const void>(x), as_ptr<const void>(dy), as_ptr<const int64_t>(offsets),
                               as_ptr<void>(dw), M, K, N, E, dtype, trans_b, as_ptr<void>(workspace),
                               workspace_bytes, as_stream(stream));
      },
      py::arg("x"), py::arg("dy"), py::arg("offsets"), py::arg("dw"), py::arg("M"), py::arg("K"), py::arg("N"),
      py::arg("E"), py::arg("dtype"), py::arg("trans_b"), py::arg("workspace"), py::arg("workspace_bytes"),
      py::arg("stream"), nogil,
      "dw[e] = x_e^T @ dy_e ([E, K, N]; trans_b: dy_e^T @ x_e, [E, N, K]) over the rows of group e; empty groups "
      "zero.");

  m.def("grouped_gemm_fp8_supported", &cc::grouped_gemm_fp8_supported, py::arg("x_gran"), py::arg("w_gran"),
        py::arg("K"), py::arg("N"), py::arg("out_dtype"),
        "Whether a compiled sm_90a CUTLASS FP8 grouped GEMM serves these scale granularities (tensor=0, row=1, "
        "block=2, block2d=3: row/row or block/block2d with block size 128), K and N (multiples of 16) and out "
        "dtype (bfloat16). The caller also checks 16-byte x/w/y alignment and compute capability 9.x.");

  m.def("grouped_gemm_fp8_workspace_bytes", &cc::grouped_gemm_fp8_workspace_bytes, py::arg("M"), py::arg("K"),
        py::arg("N"), py::arg("E"), py::arg("x_gran"), py::arg("w_gran"), py::arg("out_dtype"),
        "Bytes of device scratch (128-byte aligned) that grouped_gemm_fp8(...) needs on the current device.");

  m.def(
      "grouped_gemm_fp8",
      [](uintptr_t x, uintptr_t x_scale, uintptr_t w, uintptr_t w_scale, uintptr_t offsets, uintptr_t y, int64_t M,
         int64_t K, int64_t N, int64_t E, int x_gran, int w_gran, int out_dtype, uintptr_t workspace,
         int64_t workspace_bytes, uintptr_t stream) {
        cc::grouped_gemm_fp8(as_ptr<const void>(x), as_ptr<const float>(x_scale), as_ptr<const void>(w),
                             as_ptr<const float>(w_scale), as_ptr<const int64_t>(offsets), as_ptr<void>(y), M, K, N,
                             E, x_gran, w_gran, out_dtype, as_ptr<void>(workspace), workspace_bytes,
                             as_stream(stream));
      },
      py::arg("x"), py::arg("x_scale"), py::arg("w"), py::arg("w_scale"), py::arg("offsets"), py::arg("y"),
      py::arg("M"), py::arg("K"), py::arg("N"), py::arg("E"), py::arg("x_gran"), py::arg("w_gran"),
      py::arg("out_dtype"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"), nogil,
      "y [M, N] rows offsets[e]:offsets[e+1] = (sx * x[rows]) @ (sw[e] * w[e])^T, x [M, K] and w [E, N, K] "
      "float8_e4m3fn, fp32 accumulation; rows outside [offsets[0], offsets[E]) zero. Scales fp32, contiguous: "
      "row/row: x_scale [M], w_scale [E, N]; block/block2d: x_scale [M, ceil(K/128)] (row-major, as "
      "quantize_fp8 makes it), w_scale [E, ceil(N/128), ceil(K/128)].");

  // Architectures this module was compiled for, e.g. ["90a", "80"] (from COMPASS_CUDA_ARCHS).
  py::list archs;
  for (const auto& a : split_archs(COMPASS_CUDA_ARCHS)) archs.append(a);
  m.attr("archs") = archs;
}
