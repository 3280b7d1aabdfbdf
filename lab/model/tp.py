"""Tensor-parallel sharding of the Llama decoder, gpt-fast style, applied module by module while the model
is materialised (`build_model(..., shard=...)`), so no rank ever holds the whole model.

- Column parallel: `attention.wqkv` (rows [q; k; v]) and `feed_forward.w13` (rows [gate; up]). Each part is
  split separately and this rank's slices re-concatenated, so a rank owns whole query heads, whole KV
  heads (n_heads / N and n_kv_heads / N; GQA groups stay on one rank) and 1/N of the FFN.
- Row parallel: `attention.wo` and `feed_forward.w2` take this rank's input columns; a forward hook on each
  (registered by `mark_sharded`, after quantisation) sums the partial outputs over the ranks: two
  all-reduces per block.
- Vocabulary parallel head: `output` keeps vocab / N rows; a hook gathers the logits along the vocabulary.
- Replicated: the embedding (a lookup, cheap), the norms and the rotary tables.

The collectives live in `lab.distributed` (eager: blocking c10d calls that turn a dead peer into a
`RankFailure`; under torch.compile: functional collectives that trace into the graph).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lab.errors import LabError
from lab.model.llama import Block, ModelArgs, Transformer

# What must divide by the world size, and why.
_DIVISIBLE = (
    ("n_heads", "attention heads"),
    ("n_kv_heads", "KV heads"),
    ("ffn_dim", "FFN width"),
    ("vocab_size", "vocabulary (vocab-parallel head)"),
)


def valid_world_sizes(args: ModelArgs, limit: int = 64) -> list[int]:
    """World sizes (up to `limit`) this model shape can be split over."""
    return [n for n in range(1, limit + 1) if all(getattr(args, f) % n == 0 for f, _ in _DIVISIBLE)]


def check_divisible(args: ModelArgs, world: int, preset: str | None = None) -> None:
    """A LabError naming what does not divide and which GPU counts would, before anything is built."""
    if world < 1:
        raise LabError("--tensor-parallel-gpus must be >= 1")
    bad = [f"{what} {getattr(args, f)}" for f, what in _DIVISIBLE if getattr(args, f) % world]
    if bad:
        ok = ", ".join(str(n) for n in valid_world_sizes(args, 16))
        raise LabError(
            f"{preset or 'the model'} cannot be split over {world} GPUs: {'; '.join(bad)} not divisible by "
            f"{world}; use --tensor-parallel-gpus in {{{ok}}}"
        )


def _keep_rows(w: Tensor, sizes: list[int], rank: int, world: int) -> Tensor:
    """Split the rows into parts of `sizes`, keep this rank's 1/world of each part, re-concatenate.
    The clone drops the reference to the full tensor so its memory is freed."""
    return torch.cat([part.chunk(world, dim=0)[rank] for part in w.split(sizes, dim=0)]).clone()


def _keep_cols(w: Tensor, rank: int, world: int) -> Tensor:
    return w.chunk(world, dim=1)[rank].clone()


def _set_weight(linear: nn.Linear, w: Tensor) -> None:
    linear.weight = nn.Parameter(w, requires_grad=False)
    linear.out_features, linear.in_features = w.shape


def _all_reduce_hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
    from lab.distributed import all_reduce_sum

    return all_reduce_sum(output)


def _gather_vocab_hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
    from lab.distributed import all_gather_last_dim

    return all_gather_last_dim(output)


def _forward_pre_hook(_module: nn.Module, _args: tuple) -> None:
    # Progress for the hang watchdog and the fault-injection point; Python side effects stay out of
    # compiled graphs (is_compiling is True while Dynamo traces, so this body is not traced).
    if not torch.compiler.is_compiling():
        from lab.distributed import note_progress

        note_progress()


@torch.no_grad()
def shard_block(block: Block, rank: int, world: int) -> None:
    att, ff = block.attention, block.feed_forward
    hd, h, hkv = att.head_dim, att.n_heads, att.n_kv_heads
    _set_weight(att.wqkv, _keep_rows(att.wqkv.weight, [h * hd, hkv * hd, hkv * hd], rank, world))
    _set_weight(att.wo, _keep_cols(att.wo.weight, rank, world))
    att.n_heads, att.n_kv_heads = h // world, hkv // world
    _set_weight(ff.w13, _keep_rows(ff.w13.weight, [ff.ffn_dim, ff.ffn_dim], rank, world))
    _set_weight(ff.w2, _keep_cols(ff.w2.weight, rank, world))
    ff.ffn_dim //= world


@torch.no_grad()
def shard_head(output: nn.Linear, rank: int, world: int) -> None:
    # A tied head shares the embedding's Parameter; the slice is a new one, so the embedding stays whole.
    _set_weight(output, output.weight.chunk(world, dim=0)[rank].clone())
    output.register_forward_hook(_gather_vocab_hook)


def shard_fn(args: ModelArgs, rank: int, world: int) -> Callable[[nn.Module], None]:
    """The callback `build_model(..., shard=...)` calls on each module right after materialising it."""

    def shard(module: nn.Module) -> None:
        if world == 1:
            return
        if isinstance(module, Block):
            shard_block(module, rank, world)
        elif isinstance(module, nn.Linear) and module.out_features == args.vocab_size:
            shard_head(module, rank, world)
        # Embedding and final norm: replicated.

    return shard


def mark_sharded(model: Transformer, rank: int, world: int) -> Transformer:
    """After the model is built (and quantised): sum the row-parallel linears' outputs over the ranks,
    record the layout, and count forwards (progress for the hang watchdog). The all-reduce hooks sit on
    `wo` and `w2` themselves, whatever their type by now (quantisation replaces the modules), so any code
    that calls them, not only Attention.forward, gets the reduced output."""
    model.tp_rank, model.tp_world_size = rank, world
    if world > 1:
        for layer in model.layers:
            layer.attention.wo.register_forward_hook(_all_reduce_hook)
            layer.feed_forward.w2.register_forward_hook(_all_reduce_hook)
        model.register_forward_pre_hook(_forward_pre_hook)
    return model


def local_shapes(model: Transformer) -> dict[str, int]:
    """What this rank holds, for artifacts and tests."""
    att, ff = model.layers[0].attention, model.layers[0].feed_forward
    return {
        "n_heads": att.n_heads,
        "n_kv_heads": att.n_kv_heads,
        "ffn_dim": ff.ffn_dim,
        "vocab_rows": model.output.weight.shape[0],
    }
