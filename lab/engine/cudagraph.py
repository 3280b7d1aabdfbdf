"""A decode step captured by hand into one CUDA graph: the compare step's `eager-cudagraph` method and the
engine's `regional-cudagraphs` mode (whose transformer blocks are compiled one by one, so the whole step
is one graph replay without CUDA graph trees)."""

from __future__ import annotations

from collections.abc import Callable


class CudaGraphDecode:
    """A decode step captured by hand into one CUDA graph per (shape, sampling) key: static input
    buffers, 3 warm-up calls on a side stream, capture, then copy-in + replay. Outputs live in the
    graph's static memory (the Generator copies them out before the next step)."""

    def __init__(self, fn: Callable | None = None, warmup_calls: int = 3):
        from lab.engine.generate import decode_step

        self.fn = fn or decode_step
        self.warmup_calls = warmup_calls
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, model, tokens, input_pos, rows, temperature: float, top_k: int | None, **kw):
        """kw: passed to the step (the engine's kv_len), and part of the key: one graph per value."""
        cache = model.layers[0].attention.kv_cache
        key = (id(model), cache.k.data_ptr(), tuple(tokens.shape), rows is None, float(temperature), top_k)
        key += tuple(sorted(kw.items()))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(model, tokens, input_pos, rows, temperature, top_k, kw)
        graph, s_tok, s_pos, s_rows, out = entry
        s_tok.copy_(tokens)
        s_pos.copy_(input_pos)
        if rows is not None:
            s_rows.copy_(rows)
        graph.replay()
        return out

    def _capture(self, model, tokens, input_pos, rows, temperature, top_k, kw):
        import torch

        s_tok, s_pos = tokens.clone(), input_pos.clone()
        s_rows = rows.clone() if rows is not None else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up allocations and lazy inits happen outside the capture
            for _ in range(self.warmup_calls):
                self.fn(model, s_tok, s_pos, s_rows, temperature, top_k, **kw)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(model, s_tok, s_pos, s_rows, temperature, top_k, **kw)
        return graph, s_tok, s_pos, s_rows, out
