"""`scalelm calibrate`: measure this machine and write a hardware file the cluster model (`scalelm.perf`) reads.

`machine` measures matmuls, memory, attention, host overhead and collectives and writes the file; `matmul` the GEMMs
inside a step; `parallel` FSDP's and tensor parallelism's costs beyond their bytes; `timing` the shared Timer-based
timing. PyTorch is imported inside the functions."""

from scalelm.calibrate.machine import calibrate, fit_gemm_curve, speed_probe_gflops, write_toml

__all__ = ["calibrate", "fit_gemm_curve", "speed_probe_gflops", "write_toml"]
