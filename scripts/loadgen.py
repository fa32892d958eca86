#!/usr/bin/env python3
"""Load generator for a running `gemma4 serve` (stdlib only): C concurrent clients, each sending
streaming chat requests in a loop for D seconds. Reports requests/s, time to first token
(first content-bearing SSE frame) and end-to-end latency percentiles as one JSON line.

    python3 scripts/loadgen.py --url http://127.0.0.1:8000 --concurrency 16 --duration 20 --max-tokens 16
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def one_request(host, port, body, key):
    conn = http.client.HTTPConnection(host, port, timeout=120)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    ttft = None
    tokens = 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for ch in chunk.get("choices", []):
            d = ch.get("delta", {})
            if d.get("content") or d.get("reasoning") or d.get("tool_calls"):
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    conn.close()
    return ttft, time.perf_counter() - start, tokens


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--api-key", default=None)
    a = ap.parse_args()
    u = urllib.parse.urlparse(a.url)
    body = json.dumps({"messages": [{"role": "user", "content": "Write a short poem about the sea."}],
                       "max_tokens": a.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True})
    results, errors = [], []
    lock = threading.Lock()
    deadline = time.perf_counter() + a.duration

    def worker():
        while time.perf_counter() < deadline:
            try:
                r = one_request(u.hostname, u.port, body, a.api_key)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - reported, not raised
                with lock:
                    errors.append(str(e))
                return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results if r[0] is not None]
    e2e = [r[1] for r in results]
    print(json.dumps({
        "concurrency": a.concurrency, "requests": len(results), "errors": len(errors), "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "output_tokens_per_s": round(sum(r[2] for r in results) / wall, 1),
        "ttft_p50_s": round(statistics.median(ttft), 4) if ttft else None, "ttft_p90_s": pct(ttft, 90),
        "e2e_p50_s": round(statistics.median(e2e), 4) if e2e else None, "e2e_p90_s": pct(e2e, 90),
        "first_error": errors[0] if errors else None,
    }))


if __name__ == "__main__":
    main()
