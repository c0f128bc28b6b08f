// The typed kernel boundary, binding side: bind_kernels(m) defines one pybind11 function per entry
// point of common/kernels.def and the module's signature table, from that one table. Included by
// exactly one file per module (cpu/module.cpp, cuda/module.cu), after common/kernel_args.h.
//
// Each binding takes one bytes object: the entry point's args struct as compass_kernels/_ext.py
// packed it (struct.Struct, at the offsets the module reports), copied into the struct with the GIL
// held; the kernel then runs with the GIL released. One argument instead of 10-18 integers keeps the
// per-call cost of pybind11's argument conversion low, and Python never writes a parameter list:
//   module.signatures = {name: (sizeof(args), ((field, kind, offset, type), ...), doc)}
//   module.dtype_codes = {"float32": 0, ...}  (common/dtype.h)
//   _cpu.cuda_signatures = the table _cuda reports, for tests on machines without a GPU
#pragma once
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/kernel_args.h"

namespace compass {

struct Field {
  const char* name;
  const char* kind;  // rows, tensor, buffer, int, float, bool, stream
  size_t offset;
  const char* type;  // a buffer's element type, else ""
};

inline void record_signature(pybind11::dict& signatures, const char* name, size_t size, const char* doc,
                             const std::vector<Field>& fields) {
  namespace py = pybind11;
  py::tuple fs(fields.size());
  for (size_t i = 0; i < fields.size(); ++i)
    fs[i] = py::make_tuple(fields[i].name, fields[i].kind, fields[i].offset, fields[i].type);
  signatures[name] = py::make_tuple(size, fs, doc);
}

template <class Args>
void bind_kernel(pybind11::module_& m, pybind11::dict& signatures, const char* name, void (*fn)(const Args&),
                 const char* doc, const std::vector<Field>& fields) {
  namespace py = pybind11;
  static_assert(std::is_trivially_copyable_v<Args>, "an args struct is plain data");
  const std::string kernel = name;
  m.def(
      name,
      [fn, kernel](py::bytes packed) {
        char* data = nullptr;
        Py_ssize_t size = 0;
        if (PyBytes_AsStringAndSize(packed.ptr(), &data, &size) != 0) throw py::error_already_set();
        if (size != static_cast<Py_ssize_t>(sizeof(Args)))
          throw py::type_error("compass_kernels: " + kernel + " takes its arguments packed into " +
                               std::to_string(sizeof(Args)) + " bytes, got " + std::to_string(size) +
                               " (call it through compass_kernels._ext)");
        Args a;
        std::memcpy(&a, data, sizeof(Args));
        py::gil_scoped_release nogil;
        fn(a);
      },
      py::arg("packed"), doc);
  record_signature(signatures, name, sizeof(Args), doc, fields);
}

}  // namespace compass

#ifndef __CUDACC__
// The CUDA module's args structs, laid out by this (host) compiler: what _cuda's signature table will
// say, so that the Python marshalling of every CUDA entry point is tested on machines without a GPU
// (_cpu.cuda_signatures). Host and nvcc lay out these plain structs alike.
namespace compass::cuda_layout {
#undef COMPASS_ON_CUDA
#undef COMPASS_ON_CPU
#define COMPASS_ON_CUDA(...) __VA_ARGS__
#define COMPASS_ON_CPU(...)
#define COMPASS_KERNEL_DECL(name)
#include "common/kernel_structs.inc"
#undef COMPASS_KERNEL_DECL
}  // namespace compass::cuda_layout
#undef COMPASS_ON_CUDA
#undef COMPASS_ON_CPU
#define COMPASS_ON_CUDA(...)
#define COMPASS_ON_CPU(...) __VA_ARGS__
#endif

namespace compass::COMPASS_NS {

inline void bind_kernels(pybind11::module_& m) {
  pybind11::dict signatures;
#define COMPASS_ARGS_NS ::compass::COMPASS_NS
#define COMPASS_KERNEL_ACTION(name, doc) ::compass::bind_kernel<Args>(m, signatures, #name, &name, doc, fields);
#include "common/kernel_fields.inc"
#undef COMPASS_KERNEL_ACTION
#undef COMPASS_ARGS_NS
  m.attr("signatures") = signatures;
#ifndef __CUDACC__
  pybind11::dict cuda_signatures;
#undef COMPASS_ON_CUDA
#undef COMPASS_ON_CPU
#define COMPASS_ON_CUDA(...) __VA_ARGS__
#define COMPASS_ON_CPU(...)
#define COMPASS_ARGS_NS ::compass::cuda_layout
#define COMPASS_KERNEL_ACTION(name, doc) ::compass::record_signature(cuda_signatures, #name, sizeof(Args), doc, fields);
#include "common/kernel_fields.inc"
#undef COMPASS_KERNEL_ACTION
#undef COMPASS_ARGS_NS
#undef COMPASS_ON_CUDA
#undef COMPASS_ON_CPU
#define COMPASS_ON_CUDA(...)
#define COMPASS_ON_CPU(...) __VA_ARGS__
  m.attr("cuda_signatures") = cuda_signatures;
#endif
  pybind11::dict codes;
#define COMPASS_DTYPE(enumerator, code, torch_name) codes[torch_name] = code;
  COMPASS_DTYPES(COMPASS_DTYPE)
#undef COMPASS_DTYPE
  m.attr("dtype_codes") = codes;
}

}  // namespace compass::COMPASS_NS
