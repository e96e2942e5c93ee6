"""The cluster model: hardware catalog, FLOPs/memory/communication, the step model, the planner (torch-free).

Entry points: `step.predict_step`, `planner.best_layout` / `planner.search`, `run.estimate_run`,
`evaluate.evaluate_file`, `hardware.load_hardware`; the CLI lives in `perf.cli`. Nothing here imports PyTorch; `scalelm.calibrate`
(which measures a machine with PyTorch) writes the hardware files it reads.
"""
