// pybind11 module compass_kernels._cuda (no libtorch): the kernel entry points of
// common/kernels.def, bound by common/kernel_bindings.h (called through compass_kernels/_ext.py,
// which passes each CUDA entry point the current stream), and the plain functions that size their
// workspaces and say which grouped GEMMs the compiled CUTLASS instances serve.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/kernel_bindings.h"
#include "cuda/common.cuh"
#include "cuda/grouped_gemm.h"
#include "cuda/grouped_gemm_fp8.h"

namespace py = pybind11;

namespace compass::cuda {
int64_t route_workspace_numel(int64_t T, int64_t k, int64_t E);  // routing.cu
}  // namespace compass::cuda

#ifndef COMPASS_CUDA_ARCHS
#define COMPASS_CUDA_ARCHS ""
#endif

namespace {
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
  m.doc() = "Compass MoE CUDA kernels; entry points: common/kernels.def.";
  // route, permute, unpermute, unpermute_bwd, grouped_gemm, grouped_gemm_wgrad, grouped_gemm_fp8; launches are
  // asynchronous and run with the GIL released.
  cc::bind_kernels(m);

  m.def("route_workspace_numel", &cc::route_workspace_numel, py::arg("T"), py::arg("k"), py::arg("E"),
        "Number of int64 elements of device scratch that route(...) needs for T tokens, top-k, E experts.");

  m.def("grouped_gemm_supported", &cc::grouped_gemm_supported, py::arg("dtype"), py::arg("trans_b"), py::arg("K"),
        py::arg("N"),
        "Whether the compiled sm_90a CUTLASS instances serve this grouped GEMM (bf16/fp16, K and N multiples "
        "of 8). The caller also checks 16-byte pointer alignment and compute capability 9.x.");

  m.def("grouped_gemm_workspace_bytes", &cc::grouped_gemm_workspace_bytes, py::arg("M"), py::arg("K"), py::arg("N"),
        py::arg("E"), py::arg("dtype"), py::arg("trans_b"),
        "Bytes of device scratch (128-byte aligned) that grouped_gemm(...) needs on the current device.");

  m.def("grouped_gemm_wgrad_workspace_bytes", &cc::grouped_gemm_wgrad_workspace_bytes, py::arg("M"), py::arg("K"),
        py::arg("N"), py::arg("E"), py::arg("dtype"), py::arg("trans_b"),
        "Bytes of device scratch (128-byte aligned) that grouped_gemm_wgrad(...) needs on the current device.");

  m.def("grouped_gemm_fp8_supported", &cc::grouped_gemm_fp8_supported, py::arg("x_gran"), py::arg("w_gran"),
        py::arg("K"), py::arg("N"), py::arg("out_dtype"),
        "Whether a compiled sm_90a CUTLASS FP8 grouped GEMM serves these scale granularities (tensor=0, row=1, "
        "block=2, block2d=3: row/row or block/block2d with block size 128), K and N (multiples of 16) and out "
        "dtype (bfloat16). The caller also checks 16-byte x/w/y alignment and compute capability 9.x.");

  m.def("grouped_gemm_fp8_workspace_bytes", &cc::grouped_gemm_fp8_workspace_bytes, py::arg("M"), py::arg("K"),
        py::arg("N"), py::arg("E"), py::arg("x_gran"), py::arg("w_gran"), py::arg("out_dtype"),
        "Bytes of device scratch (128-byte aligned) that grouped_gemm_fp8(...) needs on the current device.");

  // Architectures this module was compiled for, e.g. ["90a", "80"] (from COMPASS_CUDA_ARCHS).
  py::list archs;
  for (const auto& a : split_archs(COMPASS_CUDA_ARCHS)) archs.append(a);
  m.attr("archs") = archs;
}
