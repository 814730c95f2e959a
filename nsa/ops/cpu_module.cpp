// The one extension module of the fused CPU ops, built at first use by nsa/ops/cpu_build.py from
// this file, decode_cpu.cpp (one-token decode step) and attention_cpu.cpp (the branches' forward
// and backward over whole sequences). Each source registers its own functions.
#include <pybind11/pybind11.h>

void bind_decode(pybind11::module_& m);
void bind_attention(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_decode(m);
  bind_attention(m);
}
