"""`--trace` on `lab warmup` and `lab loadtest` writes a Perfetto-viewable torch.profiler trace."""

import json


def _is_chrome_trace(path) -> bool:
    data = json.loads(path.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    return isinstance(events, list) and len(events) > 0


def test_warmup_and_loadtest_trace(lab_cli, tmp_path):
    w = lab_cli(
        "warmup",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--prompt-len",
        "8",
        "--max-new-tokens",
        "4",
        "--mode",
        "eager",
        "--device",
        "cpu",
        "--compile-cache-dir",
        "",
        "--no-roofline",
        "--output-json",
        str(tmp_path / "warmup.json"),
        "--trace",
        str(tmp_path / "warmup.trace.json"),
    )
    assert w.returncode == 0, w.stderr
    assert _is_chrome_trace(tmp_path / "warmup.trace.json")
    lt = lab_cli(
        "loadtest",
        "--allow-smaller-world",
        "--duration",
        "3",
        "--target-qps",
        "2",
        "--max-new-tokens",
        "2",
        "--prompt-len-min",
        "4",
        "--prompt-len-max",
        "8",
        "--device",
        "cpu",
        "--no-progress",
        "--max-dispatch-lag-ms",
        "1000",
        "--output-json",
        str(tmp_path / "lt.json"),
        "--trace",
        str(tmp_path / "lt.trace.json"),
    )
    assert lt.returncode in (0, 1), (
        lt.stderr
    )  # 1 = INVALID verdict on a loaded machine; the trace still lands
    assert (tmp_path / "lt.json").exists() and _is_chrome_trace(tmp_path / "lt.trace.json")
