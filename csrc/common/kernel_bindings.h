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
  py::tuple fs(fields.size());
  for (size_t i = 0; i < fields.size(); ++i)
    fs[i] = py::make_tuple(fields[i].name, fields[i].kind, fields[i].offset, fields[i].type);
  signatures[name] = py::make_tuple(sizeof(Args), fs, doc);
}

}  // namespace compass

namespace compass::COMPASS_NS {

inline void bind_kernels(pybind11::module_& m) {
  pybind11::dict signatures;
#define COMPASS_FIELD(n, kind, type) fields.push_back(::compass::Field{#n, kind, offsetof(Args, n), type});
#define COMPASS_ROWS(n) COMPASS_FIELD(n, "rows", "")
#define COMPASS_TENSOR(n) COMPASS_FIELD(n, "tensor", "")
#define COMPASS_BUFFER(n, type) COMPASS_FIELD(n, "buffer", #type)
#define COMPASS_INT(n) COMPASS_FIELD(n, "int", "")
#define COMPASS_FLOAT(n) COMPASS_FIELD(n, "float", "")
#define COMPASS_BOOL(n) COMPASS_FIELD(n, "bool", "")
#define COMPASS_STREAM(n) COMPASS_FIELD(n, "stream", "")
#define COMPASS_KERNEL(name, doc, fields_)                                           \
  {                                                                                  \
    using Args = name##_args;                                                        \
    std::vector<::compass::Field> fields;                                            \
    fields_ ::compass::bind_kernel<Args>(m, signatures, #name, &name, doc, fields); \
  }
#define COMPASS_CPU_KERNEL(name, doc, fields) COMPASS_ON_CPU(COMPASS_KERNEL(name, doc, fields))
#define COMPASS_CUDA_KERNEL(name, doc, fields) COMPASS_ON_CUDA(COMPASS_KERNEL(name, doc, fields))
#include "common/kernels.def"
#undef COMPASS_FIELD
#undef COMPASS_ROWS
#undef COMPASS_TENSOR
#undef COMPASS_BUFFER
#undef COMPASS_INT
#undef COMPASS_FLOAT
#undef COMPASS_BOOL
#undef COMPASS_STREAM
#undef COMPASS_KERNEL
#undef COMPASS_CPU_KERNEL
#undef COMPASS_CUDA_KERNEL
  m.attr("signatures") = signatures;
  pybind11::dict codes;
#define COMPASS_DTYPE(enumerator, code, torch_name) codes[torch_name] = code;
  COMPASS_DTYPES(COMPASS_DTYPE)
#undef COMPASS_DTYPE
  m.attr("dtype_codes") = codes;
}

}  // namespace compass::COMPASS_NS
