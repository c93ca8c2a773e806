"""Host-side emulation of the generated CUDA kernels (g++ and emu.h) and the test cases shared
with the GPU tests."""
