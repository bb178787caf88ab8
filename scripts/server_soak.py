"""`bimode serve` over time: does its memory settle? (issue 39, item 6)

Starts `bimode serve MODEL` on a free loopback port, sends it `--requests` chat requests from `--clients` threads, a
fixed mix (seeded) of every kind a long-lived server meets: plain answers in each thinking mode, with and without an
image, n = 2, streamed answers read to the end, streams the client drops after the first event, and plain requests
the client gives up on before the answer (a short timeout). The server's resident memory (VmRSS) is read every
`--sample_every` requests; what counts is its growth from the end of the warm-up (`--warmup` requests: the first
batches grow caches, allocator arenas and compiled paths) to the end. Prints one table and, with `--json`, writes
the figures; exits 1 when the growth passes `--max_growth_mb` or an answer was an error other than a dropped one.

    .venv/bin/python scripts/server_soak.py MODEL                      # CI's size: 3,000 requests
    .venv/bin/python scripts/server_soak.py MODEL --requests 50000    # the by-hand soak of docs/serving_and_eval.md

MODEL: a checkpoint folder (`bimode tiny --out runs/tiny` builds the embedded one).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_serve import start_serve  # noqa: E402 - beside this script

KINDS = ("plain", "image", "n2", "stream", "stream_dropped", "plain_dropped")
WEIGHTS = (30, 20, 10, 20, 10, 10)
MODES = ("auto", "think", "no_think")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def image_urls(count: int = 4) -> list[str]:
    from bimode.data import synthetic

    urls = []
    for sample in synthetic.generate(count, seed=3, families=["count"]):
        buffer = io.BytesIO()
        sample.render().save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def body_for(kind: str, rng: random.Random, images: list[str], max_tokens: int) -> dict:
    content: list = [{"type": "text", "text": f"How many cells are coloured? ({rng.randint(0, 10 ** 6)})"}]
    if kind == "image":
        content.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(images)}})
    body = {"model": "soak", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 1.0, "chat_template_kwargs": {"thinking_mode": rng.choice(MODES)}}
    if kind == "n2":
        body["n"] = 2
    if kind.startswith("stream"):
        body["stream"] = True
    return body


def send(client: httpx.Client, base: str, kind: str, body: dict) -> str:
    """What the request ended as: an HTTP status, or "dropped" where the client gave up on purpose."""
    url = base + "/v1/chat/completions"
    if kind == "plain_dropped":
        try:
            return str(client.post(url, json=body, timeout=httpx.Timeout(0.02, connect=5.0)).status_code)
        except httpx.TimeoutException:
            return "dropped"
    if kind.startswith("stream"):
        with client.stream("POST", url, json=body, timeout=60) as response:
            if response.status_code != 200:
                return str(response.status_code)
            for line in response.iter_lines():
                if kind == "stream_dropped" and line.startswith("data:"):
                    return "dropped"  # leaving the block closes the connection mid-stream
        return "200"
    return str(client.post(url, json=body, timeout=60).status_code)


def soak(model: str, requests: int, clients: int, warmup: int, sample_every: int, max_tokens: int, seed: int,
         log_path: Path) -> dict:
    images = image_urls()
    process, base = start_serve(model, ["--served_model_name", "soak", "--max_tokens", str(max_tokens),
                                        "--max_queued_requests", "256"], log_path)
    rng = random.Random(seed)
    plan = [(kind, body_for(kind, rng, images, max_tokens))
            for kind in rng.choices(KINDS, weights=WEIGHTS, k=requests)]
    outcomes: Counter = Counter()
    samples: list[tuple[int, float]] = [(0, rss_mb(process.pid))]
    lock, done = threading.Lock(), [0]
    started = time.monotonic()

    def one(item) -> None:
        kind, body = item
        with httpx.Client() as client:
            result = send(client, base, kind, body)
        with lock:
            outcomes[(kind, result)] += 1
            done[0] += 1
            if done[0] % sample_every == 0:
                samples.append((done[0], rss_mb(process.pid)))

    try:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(one, plan))
        time.sleep(1.0)  # dropped requests finish their cancellation
        samples.append((requests, rss_mb(process.pid)))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    seconds = time.monotonic() - started
    at_warmup = min((rss for n, rss in samples if n >= warmup), default=samples[-1][1])
    after = [rss for n, rss in samples if n >= warmup]
    errors = {f"{k}:{r}": c for (k, r), c in outcomes.items() if r not in ("200", "dropped")}
    return {"requests": requests, "clients": clients, "warmup": warmup, "max_tokens": max_tokens,
            "seconds": round(seconds, 1), "outcomes": {f"{k}:{r}": c for (k, r), c in sorted(outcomes.items())},
            "errors": errors, "rss_mb": [[n, round(r, 1)] for n, r in samples],
            "rss_at_warmup_mb": round(at_warmup, 1), "rss_end_mb": round(samples[-1][1], 1),
            "peak_after_warmup_mb": round(max(after), 1),
            "growth_after_warmup_mb": round(samples[-1][1] - at_warmup, 1)}


def table(result: dict) -> str:
    lines = [f"{result['requests']} requests from {result['clients']} clients in {result['seconds']} s "
             f"(max_tokens {result['max_tokens']})", "", "| requests done | server RSS, MB |", "|---|---|"]
    lines += [f"| {n} | {rss} |" for n, rss in result["rss_mb"]]
    lines += ["", f"growth after the first {result['warmup']} requests: {result['growth_after_warmup_mb']} MB "
                  f"(from {result['rss_at_warmup_mb']} to {result['rss_end_mb']}; peak "
                  f"{result['peak_after_warmup_mb']})",
              "outcomes: " + ", ".join(f"{k} {v}" for k, v in result["outcomes"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="checkpoint folder to serve")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--warmup", type=int, default=1000, help="requests before the growth is counted")
    parser.add_argument("--sample_every", type=int, default=250, help="read the server's RSS every N requests")
    parser.add_argument("--max_tokens", type=int, default=8)
    parser.add_argument("--max_growth_mb", type=float, default=64.0, help="the bound on the growth after warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--log", type=Path, default=None, help="the server's log (default: beside --json or ./)")
    args = parser.parse_args(argv)
    if args.warmup >= args.requests:
        parser.error(f"--warmup ({args.warmup}) must be below --requests ({args.requests})")
    log_path = args.log or (args.json.with_suffix(".serve.log") if args.json else Path("server_soak.serve.log"))
    result = soak(args.model, args.requests, args.clients, args.warmup, args.sample_every, args.max_tokens,
                  args.seed, log_path)
    result["max_growth_mb"] = args.max_growth_mb
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    failed = []
    if result["errors"]:
        failed.append(f"answers other than 200 or a drop: {result['errors']}")
    if result["growth_after_warmup_mb"] > args.max_growth_mb:
        failed.append(f"RSS grew {result['growth_after_warmup_mb']} MB after warm-up, over {args.max_growth_mb}")
    for reason in failed:
        print("FAILED: " + reason, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
