"""What crosstask's HTTP layer costs over vLLM's own OpenAI server.

Starts, on one machine and the same model folder, vLLM's server
(`python -m vllm.entrypoints.openai.api_server`, its default settings) and `crosstask serve`
(retrieval and routing off), then drives each with vLLM's benchmark client
(`vllm.benchmarks.serve`: the same random prompts, the same concurrency), alternating the two
for several rounds. Prints and writes JSON: output tokens/s and TTFT p50/p99 per round, the
medians, and the ratios. Targets: crosstask >= 0.95x vLLM's throughput, TTFT p50 within
10 ms of it.

    .venv/bin/python bench/serve_overhead.py [--rounds 3] [--num-prompts 256] [--concurrency 64]

Prompts and completions default to 64 tokens each: on 2 CPU cores one round of 256
requests with 256-token prompts and 128-token completions took vLLM alone 5.5 minutes
(100 output tok/s), which would make six rounds take over half an hour.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

NAME = "smollm2-135m-instruct"
# Runs vLLM's benchmark client in a child process and writes its result dict as JSON.
CLIENT = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
args = parser.parse_args(sys.argv[2:])
result = main(args)
keep = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
open(sys.argv[1], "w").write(json.dumps(keep))
"""


@dataclass
class Round:
    server: str
    round: int
    output_throughput: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    completed: int
    duration_s: float
    # CPU time of the HTTP server's own process (the engine core is a child process and
    # not counted) per request of the measured run: the part of the work that differs
    # between the two servers, free of the scheduling noise that moves TTFT under a burst.
    api_cpu_ms_per_request: float


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def _start(
    kind: str, model_dir: Path, port: int, kv_cache_gb: int, log_dir: Path
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    if kind == "vllm":
        # vLLM's CPU backend sizes its KV cache from this variable; crosstask passes the
        # same amount explicitly, so both engines get equal memory.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            NAME,
            "--dtype",
            "float32",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    else:
        # An empty home: no default store is found, so retrieval is off; routing is off
        # with --no-adapters below.
        env["CROSSTASK_HOME"] = str(log_dir / "empty-home")
        command = [
            sys.executable,
            "-m",
            "serve.cli",
            "serve",
            "--no-adapters",
            "--model",
            str(model_dir),
            "--served-model-name",
            NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--kv-cache-gb",
            str(kv_cache_gb),
            "--log-level",
            "warning",
        ]
    log = open(log_dir / f"{kind}.log", "wb")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _drive(
    port: int, model_dir: Path, args: argparse.Namespace, num_prompts: int, seed: int
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        path = out.name
    command = [
        sys.executable,
        "-c",
        CLIENT,
        path,
        "--backend",
        "openai",
        "--endpoint",
        "/v1/completions",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        NAME,
        "--tokenizer",
        str(model_dir),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--ignore-eos",
        "--num-prompts",
        str(num_prompts),
        "--max-concurrency",
        str(args.concurrency),
        "--seed",
        str(seed),
        "--percentile-metrics",
        "ttft,tpot,e2el",
        "--metric-percentiles",
        "50,99",
        "--disable-tqdm",
    ]
    subprocess.run(
        command,
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=args.round_timeout,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    result: dict[str, float] = json.loads(Path(path).read_text())
    os.unlink(path)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="Model folder (default: the prepared embedded model).",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--kv-cache-gb", type=int, default=4)
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=1200,
        help="Seconds one client run may take before the bench fails.",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "serve_overhead.json"
    )
    args = parser.parse_args()

    model_dir = args.model_dir
    if model_dir is None:
        from serve.default_model import ensure_default_model
        from serve.settings import Settings

        model_dir = ensure_default_model(Settings().home_dir)

    log_dir = Path(tempfile.mkdtemp(prefix="serve-overhead-"))
    ports = {"vllm": _free_port(), "crosstask": _free_port()}
    rounds: list[Round] = []
    # One server at a time, so that neither's memory, caches or background threads touch
    # the other's measurement on these 2 cores. Each round starts the server, warms it up,
    # measures, and stops it; the order alternates between rounds.
    for r in range(args.rounds):
        for kind in ("vllm", "crosstask") if r % 2 == 0 else ("crosstask", "vllm"):
            process = _start(kind, model_dir, ports[kind], args.kv_cache_gb, log_dir)
            try:
                _wait_ready(f"http://127.0.0.1:{ports[kind]}/health", process)
                _drive(ports[kind], model_dir, args, num_prompts=16, seed=999)  # warm-up
                cpu_before = _cpu_seconds(process.pid)
                result = _drive(ports[kind], model_dir, args, args.num_prompts, seed=r)
                api_cpu = _cpu_seconds(process.pid) - cpu_before
                row = Round(
                    server=kind,
                    round=r,
                    output_throughput=float(result["output_throughput"]),
                    ttft_p50_ms=float(result["median_ttft_ms"]),
                    ttft_p99_ms=float(result["p99_ttft_ms"]),
                    completed=int(result["completed"]),
                    duration_s=float(result["duration"]),
                    api_cpu_ms_per_request=1000 * api_cpu / max(1, int(result["completed"])),
                )
                rounds.append(row)
                print(
                    f"round {r} {kind:9s} {row.output_throughput:8.1f} out tok/s  "
                    f"TTFT p50 {row.ttft_p50_ms:8.1f} ms  p99 {row.ttft_p99_ms:8.1f} ms  "
                    f"({row.completed} done in {row.duration_s:.1f} s)  "
                    f"API process CPU {row.api_cpu_ms_per_request:.2f} ms/request",
                    flush=True,
                )
            finally:
                _stop(process)

    def median(kind: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in rounds if r.server == kind)

    summary = {
        kind: {
            field: median(kind, field)
            for field in (
                "output_throughput",
                "ttft_p50_ms",
                "ttft_p99_ms",
                "api_cpu_ms_per_request",
            )
        }
        for kind in ("vllm", "crosstask")
    }
    throughput_ratio = (
        summary["crosstask"]["output_throughput"] / summary["vllm"]["output_throughput"]
    )
    ttft_gap = summary["crosstask"]["ttft_p50_ms"] - summary["vllm"]["ttft_p50_ms"]
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_dir": str(model_dir),
        "rounds": [asdict(r) for r in rounds],
        "median": summary,
        "throughput_ratio": throughput_ratio,
        "ttft_p50_gap_ms": ttft_gap,
        "targets": {"throughput_ratio_min": 0.95, "ttft_p50_gap_ms_max": 10.0},
        "meets_targets": throughput_ratio >= 0.95 and ttft_gap <= 10.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        json.dumps(
            {
                k: report[k]
                for k in ("median", "throughput_ratio", "ttft_p50_gap_ms", "meets_targets")
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
