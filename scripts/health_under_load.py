#!/usr/bin/env python3
"""`/health` latency while large request bodies are in flight.

Starts `gemma4 serve` (the bundled tiny checkpoint), sends BODIES concurrent chat requests of
SIZE_MB megabytes of user text each (far past the context), and polls `/health` meanwhile. With
`tokenize` last, the bodies go to `/tokenize` as a plain prompt instead, which has no context bound:
every byte is tokenized (on the CPU pool), which shows what the async workers are spared.
Prints the latency of `/health` (median, p99, max), how long each big request took to be answered
and with what status, and the server's peak resident memory.

    python3 scripts/health_under_load.py target/release/gemma4 [BODIES] [SIZE_MB] [tokenize]
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import http.client


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    binary = sys.argv[1]
    bodies = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    size_mb = float(sys.argv[3]) if len(sys.argv) > 3 else 30
    tokenize = len(sys.argv) > 4 and sys.argv[4] == "tokenize"
    port = free_port()
    proc = subprocess.Popen([binary, "serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.2)
        # Words of ordinary text, so tokenizing is not trivially fast.
        words = "the quick brown fox jumps over the lazy dog " * 64
        text = (words * (int(size_mb * 1e6) // len(words) + 1))[: int(size_mb * 1e6)]
        path = "/tokenize" if tokenize else "/v1/chat/completions"
        if tokenize:
            body = json.dumps({"prompt": text}).encode()
        else:
            body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4}).encode()
        results = []

        def big():
            t0 = time.time()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            c.request("POST", path, body, {"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            results.append((r.status, time.time() - t0))

        threads = [threading.Thread(target=big) for _ in range(bodies)]
        peak = [rss_kib(proc.pid)]

        def sample():
            while any(t.is_alive() for t in threads):
                peak[0] = max(peak[0], rss_kib(proc.pid))
                time.sleep(0.05)
        health = []
        start = time.time()
        for t in threads:
            t.start()
        sampler = threading.Thread(target=sample)
        sampler.start()
        while any(t.is_alive() for t in threads):
            t0 = time.time()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            c.request("GET", "/health")
            c.getresponse().read()
            health.append(time.time() - t0)
            time.sleep(0.02)
        sampler.join()
        health.sort()
        pick = lambda q: health[min(len(health) - 1, int(q * len(health)))] * 1000
        print(f"{bodies} bodies of {size_mb:.0f} MB to {path}: answered {sorted(results)} "
              f"(all done after {time.time() - start:.2f} s)")
        print(f"/health during: {len(health)} probes, median {pick(0.5):.1f} ms, "
              f"p99 {pick(0.99):.1f} ms, max {health[-1] * 1000:.1f} ms")
        print(f"server peak RSS {peak[0] / 1024:.0f} MiB")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
