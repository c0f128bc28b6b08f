// compass_kernels._cpu (no libtorch): the kernel entry points of common/kernels.def, bound by
// common/kernel_bindings.h (called through compass_kernels/_ext.py), and a few plain functions.
// Kernels run with the GIL released; argument errors throw std::invalid_argument, which pybind11
// raises as ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/gemm_tiles.h"
#include "common/kernel_bindings.h"

#ifdef COMPASS_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

PYBIND11_MODULE(_cpu, m) {
  using namespace compass::cpu;
  m.doc() = "Compass MoE CPU (OpenMP) kernels; entry points: common/kernels.def.";

#ifdef COMPASS_OPENMP
  m.attr("openmp") = true;
  m.def("num_threads", [] { return omp_get_max_threads(); }, "OpenMP threads a kernel may use.");
#else
  m.attr("openmp") = false;
  m.def("num_threads", [] { return 1; }, "Built without OpenMP: always 1.");
#endif

  bind_kernels(m);  // route, permute, unpermute, unpermute_bwd, quantize_fp8, sinkhorn, otpo_weights

  // The sm_90a forward grouped GEMM's tile model (common/gemm_tiles.h), here so that it can be
  // tested and reported on machines without a GPU.
  m.def(
      "gemm_forward_tile",
      [](int64_t M, int64_t N, int64_t E, int sm_count) {
        const int i = compass::choose_forward_tile(M, N, E, sm_count);
        if (i < 0) throw std::invalid_argument("COMPASS_GEMM_TILE must be 128x128 or 128x256");
        return std::string(compass::kForwardTiles[i].name);
      },
      py::arg("M"), py::arg("N"), py::arg("E"), py::arg("sm_count"),
      "The tile ('128x128' or '128x256') the CUDA forward grouped GEMM uses for M rows in E groups and "
      "N output columns on a GPU with sm_count SMs.");
  m.def(
      "gemm_forward_tile_cost",
      [](const std::string& tile, int64_t M, int64_t N, int64_t E, int sm_count) {
        for (const auto& t : compass::kForwardTiles)
          if (tile == t.name) return compass::forward_tile_cost(t, M, N, E, sm_count);
        throw std::invalid_argument("tile must be 128x128 or 128x256, got " + tile);
      },
      py::arg("tile"), py::arg("M"), py::arg("N"), py::arg("E"), py::arg("sm_count"),
      "The wave model's cost of that tile (in 128x128 tile-waves at the 128x128 rate).");
}
