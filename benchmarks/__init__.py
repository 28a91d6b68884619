"""mmkernels' benchmarks: the harness (:mod:`benchmarks.harness`), real-model shape
tables (:mod:`benchmarks.shapes`) and one ``bench_<kernel>.py`` per kernel, each a
pytest-benchmark module with a ``run(out_dir, quick=False)`` that ``tools/gpu_suite.py``
calls."""
