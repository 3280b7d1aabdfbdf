"""Flag types and flag groups shared by commands. A bad value is a LabError naming the flag."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from lab.errors import LabError


def _number(kind: Callable[[str], Any], lo: float | None, hi: float | None, lo_open: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if lo_open else '>='} {lo:g}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"{text} must be <= {hi:g}")
        return value

    parse.__name__ = what  # argparse uses it in messages
    return parse


positive_int = _number(int, 0, None, True, "a positive integer")
nonneg_int = _number(int, 0, None, False, "a non-negative integer")
positive_float = _number(float, 0, None, True, "a positive number")
nonneg_float = _number(float, 0, None, False, "a non-negative number")
fraction = _number(float, 0, 1, True, "a fraction in (0, 1]")


def auto_or_positive_int(text: str) -> str | int:
    return "auto" if text == "auto" else _positive_int_or_auto(text)


_positive_int_or_auto = _number(int, 0, None, True, "'auto' or a positive integer")


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer, e.g. 1,2,3")
    return values


def float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}' must list positive numbers, e.g. 1,2,4")
    return values


def add_model_args(p: argparse.ArgumentParser, default_dtype: str = "auto") -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--preset",
        default=None,
        help="tiny, llama-1b, llama-8b, gpt-40b, llama-70b (default: tiny on CPU, llama-8b on a GPU)",
    )
    g.add_argument(
        "--model-path",
        default=None,
        help="checkpoint: .pt state_dict, .safetensors, or a Hugging "
        "Face Llama directory (default: $MODEL_PATH; none = random weights from --seed)",
    )
    g.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    g.add_argument(
        "--dtype",
        default=default_dtype,
        help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16",
    )
    g.add_argument("--seed", type=nonneg_int, default=0, help="seed for random weights and sampling")


def add_output_json(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--output-json", default=default, help=f"where to write the artifact (default: {default})")


def check_tp(n: int) -> None:
    """--tensor-parallel-gpus: 1 in-process; N > 1 runs under torchrun (lab.distributed)."""
    if n < 1:
        raise LabError("--tensor-parallel-gpus must be >= 1")


def require(cond: bool, message: str) -> None:
    if not cond:
        raise LabError(message)
