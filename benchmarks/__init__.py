"""mmkernels' benchmarks: the harness (:mod:`benchmarks.harness`), real-model shape
tables (:mod:`benchmarks.shapes`), one ``bench_<kernel>.py`` per kernel and the
model-level benchmarks (``bench_models.py``). Each module registers its benchmarks with
``harness.register(BENCH, size_param=...)``; ``python -m mmkernels.bench`` and
``tools/gpu_suite.py`` run what is registered. Each module is also a pytest-benchmark
module."""
