// compass_kernels._cpu: raw-pointer entry points (no libtorch). Signatures and argument order are
// the contract in compass_kernels/_ext.py. Kernels run with the GIL released; argument errors
// throw std::invalid_argument, which pybind11 raises as ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/gemm_tiles.h"

#ifdef COMPASS_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace compass::cpu {  // routing.cpp
void route(uintptr_t ids, bool ids_is_int64, int64_t T, int64_t k, int64_t E, int64_t capacity,
           int64_t align, uintptr_t row_id_map, uintptr_t tokens_per_expert,
           uintptr_t expert_offsets);
void permute(uintptr_t x, int64_t stride_x, int64_t elem_size, int64_t T, int64_t H,
             uintptr_t row_id_map, int64_t k, uintptr_t expert_offsets,
             uintptr_t tokens_per_expert, int64_t E, int64_t num_rows, uintptr_t out);
void unpermute(uintptr_t y, int64_t stride_y, int dtype, int64_t num_rows, int64_t H,
               uintptr_t row_id_map, int64_t T, int64_t k, uintptr_t probs, int probs_dtype,
               uintptr_t out);
void unpermute_bwd(uintptr_t grad_out, int64_t stride_g, uintptr_t y, int64_t stride_y, int dtype,
                   int64_t num_rows, int64_t H, uintptr_t row_id_map, int64_t T, int64_t k,
                   uintptr_t expert_offsets, uintptr_t tokens_per_expert, int64_t E,
                   uintptr_t probs, int probs_dtype, uintptr_t grad_y, uintptr_t grad_probs);
}  // namespace compass::cpu

// Other op families in csrc/cpu/ (built into this module by CMake's glob) register themselves.
void register_ot(py::module_& m);   // ot.cpp: sinkhorn, otpo_weights
void register_fp8(py::module_& m);  // fp8.cpp: quantize_fp8

PYBIND11_MODULE(_cpu, m) {
  using namespace compass::cpu;
  using release = py::call_guard<py::gil_scoped_release>;
  m.doc() = "Compass MoE CPU (OpenMP) kernels; see compass_kernels/_ext.py for the contract.";

#ifdef COMPASS_OPENMP
  m.attr("openmp") = true;
  m.def("num_threads", [] { return omp_get_max_threads(); }, "OpenMP threads a kernel may use.");
#else
  m.attr("openmp") = false;
  m.def("num_threads", [] { return 1; }, "Built without OpenMP: always 1.");
#endif

  m.def("route", &route, release(), py::arg("ids"), py::arg("ids_is_int64"), py::arg("T"),
        py::arg("k"), py::arg("E"), py::arg("capacity"), py::arg("align"), py::arg("row_id_map"),
        py::arg("tokens_per_expert"), py::arg("expert_offsets"),
        "Stable counting-sort routing of topk_ids [T, k] into row_id_map, tokens_per_expert, "
        "expert_offsets. capacity < 0 means none.");
  m.def("permute", &permute, release(), py::arg("x"), py::arg("stride_x"), py::arg("elem_size"),
        py::arg("T"), py::arg("H"), py::arg("row_id_map"), py::arg("k"),
        py::arg("expert_offsets"), py::arg("tokens_per_expert"), py::arg("E"),
        py::arg("num_rows"), py::arg("out"),
        "out[row_id_map[t, j]] = x[t]; rows no slot writes are zeroed. Any element size.");
  m.def("unpermute", &unpermute, release(), py::arg("y"), py::arg("stride_y"), py::arg("dtype"),
        py::arg("num_rows"), py::arg("H"), py::arg("row_id_map"), py::arg("T"), py::arg("k"),
        py::arg("probs"), py::arg("probs_dtype"), py::arg("out"),
        "out[t] = sum_j probs[t, j] * y[row_id_map[t, j]]; fp32 (fp64) sums in slot order.");
  m.def("unpermute_bwd", &unpermute_bwd, release(), py::arg("grad_out"), py::arg("stride_g"),
        py::arg("y"), py::arg("stride_y"), py::arg("dtype"), py::arg("num_rows"), py::arg("H"),
        py::arg("row_id_map"), py::arg("T"), py::arg("k"), py::arg("expert_offsets"),
        py::arg("tokens_per_expert"), py::arg("E"), py::arg("probs"), py::arg("probs_dtype"),
        py::arg("grad_y"), py::arg("grad_probs"),
        "Backward of unpermute: grad_y rows and (when probs != 0) grad_probs.");

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
  register_ot(m);
  register_fp8(m);
}
