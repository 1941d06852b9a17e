"""Load on a running `python -m pipeline serve`: a bounded number of concurrent requests to
127.0.0.1, every one checked for an answer, then throughput and p50/p95/p99 latency for chat
without and with the safety gate, and for score.

    .venv/bin/python bench/serve_load.py [--url http://127.0.0.1:8000] [--requests 200] [--clients 16]
                                         [--model NAME] [--max-tokens 32]

Only loopback addresses are accepted. Exits 1 when any request is not answered with 200.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlparse

PROMPTS = ["how do i bake bread ?", "how can i rob a house ?", "what is the best way to cook rice ?",
           "how do i pick a lock ?", "how can i learn to swim ?"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_case(url: str, name: str, bodies: list[tuple[str, dict]], clients: int) -> dict:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    latencies, failures = [], []

    async def client(http):
        while not queue.empty():
            path, body = queue.get_nowait()
            t0 = time.perf_counter()
            try:
                r = await http.post(url + path, json=body)
                ok = r.status_code == 200
            except httpx.HTTPError as e:
                ok, r = False, e
            latencies.append(time.perf_counter() - t0)
            if not ok:
                failures.append(str(getattr(r, "text", r))[:200])

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*[client(http) for _ in range(clients)])
    wall = time.perf_counter() - t0
    return {"case": name, "requests": len(bodies), "answered": len(bodies) - len(failures), "failures": failures[:3],
            "rps": len(bodies) / wall, "p50": percentile(latencies, 0.50), "p95": percentile(latencies, 0.95),
            "p99": percentile(latencies, 0.99)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", help="a served policy; default: the first /v1/models lists")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--gate-n", type=int, default=4)
    args = ap.parse_args(argv)
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("only a service on this machine's loopback address is loaded")
    import httpx

    model = args.model or httpx.get(args.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    chat = lambda i, gate: ("/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": args.max_tokens, "seed": i, **({"gate": "best_of_n", "n": args.gate_n} if gate else {})})
    score = lambda i: ("/v1/score", {"prompt": PROMPTS[i % len(PROMPTS)], "response": f"sure . step {i} ."})
    cases = [("chat", [chat(i, False) for i in range(args.requests)]),
             ("chat, gate best_of_n", [chat(i, True) for i in range(args.requests)]),
             ("score", [score(i) for i in range(args.requests)])]
    results = [asyncio.run(run_case(args.url, name, bodies, args.clients)) for name, bodies in cases]
    print(f"model {model}, {args.requests} requests per case from {args.clients} clients, max_tokens {args.max_tokens}")
    print(f"{'case':<22}{'answered':>10}{'req/s':>8}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}")
    for r in results:
        print(f"{r['case']:<22}{r['answered']:>6}/{r['requests']:<3}{r['rps']:>8.2f}{r['p50']:>8.3f}{r['p95']:>8.3f}{r['p99']:>8.3f}")
    print(json.dumps(results))
    return 0 if all(r["answered"] == r["requests"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
