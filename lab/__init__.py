"""The single-GPU serving fallback drill lab.

Public entry points a serving harness imports: `compare_inference_methods` (lab.bench.compare),
`build_model` (lab.model), `Generator` (lab.engine.generate).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import lab` stays cheap (no torch import) for the CLI's usage errors.
    if name == "compare_inference_methods":
        from lab.bench.compare import compare_inference_methods

        return compare_inference_methods
    raise AttributeError(name)
