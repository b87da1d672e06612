// Python module init for peft_kernels._C (pybind11). Importing it runs the TORCH_LIBRARY
// registrations of the other translation units; the module itself only lists them.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peft_kernels CUDA C++ kernels; ops under torch.ops.peft_kernels_cuda";
  m.attr("ops") = pybind11::make_tuple("lora_fwd", "lora_fwd_small_m", "qlora_fwd_small_m", "lora_bwd", "lora_bwd_small_m");
}
