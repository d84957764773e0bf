"""Throughput and latency of ``mlx_lm.server`` with and without a drafter, by concurrent clients.

    python -m mlx_lm_dspark_tools.serve_benchmark --model T --draft-model D --clients 1,2,4,8

Starts two servers on the same target (one with ``--draft-model``, one
without), then for each number of clients runs that many concurrent
clients against each server in turn, every client sending ``--requests``
greedy completion requests one after another.  Reports total generated
tokens per second and per-request latency (p50 / p95) for both servers
side by side, and checks every answer of the drafter's server equals the
plain server's for the same prompt.
"""

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from .benchmark import PROMPTS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(argv, timeout=300, env=None):
    """``mlx_lm.server`` with ``argv`` in its own process; yields (the
    process, its port) once it answers."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", *argv, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env or dict(os.environ))
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/health")
                conn.getresponse().read()
                break
            except (ConnectionRefusedError, ConnectionResetError):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit(f"mlx_lm.server {' '.join(argv)} did not start")
                time.sleep(0.5)
        yield process, port
    finally:
        stop(process)


def stop(process, timeout: float = 30) -> None:
    """End a server process: terminate, then kill if it lingers."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()


def complete(port, prompt, max_tokens):
    """(text, completion tokens, seconds) of one greedy completion request."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}).encode()
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    seconds = time.perf_counter() - start
    if response.status != 200:
        raise SystemExit(f"the server answered {response.status}: {payload}")
    return payload["choices"][0]["text"], payload["usage"]["completion_tokens"], seconds


def load(port, clients, prompts, requests, max_tokens):
    """Run ``clients`` concurrent clients; return (answers by prompt, tokens/s, latencies)."""
    answers, latencies, tokens, errors = {}, [], [0], []
    lock = threading.Lock()

    def client(c):
        try:
            for r in range(requests):
                prompt = prompts[(c * requests + r) % len(prompts)]
                text, n, seconds = complete(port, prompt, max_tokens)
                with lock:
                    answers.setdefault(prompt, set()).add(text)
                    latencies.append(seconds)
                    tokens[0] += n
        except BaseException as e:  # reported after the others finish
            errors.append(e)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return answers, tokens[0] / (time.perf_counter() - start), latencies


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--draft-model", required=True)
    parser.add_argument("--clients", default="1,2,4,8", help="Concurrent clients, comma-separated.")
    parser.add_argument("--requests", type=int, default=4, help="Requests per client.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--server-args", default="", help="More mlx_lm.server options for both servers.")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    prompts = [p for category in PROMPTS.values() for p in category]
    common = ["--model", args.model, *args.server_args.split()]
    rows = []
    with running_server(common) as (_, plain), running_server(common + ["--draft-model", args.draft_model]) as (_, spec):
        complete(plain, prompts[0], 4), complete(spec, prompts[0], 4)  # warm-up
        for n in clients:
            plain_answers, plain_rate, plain_lat = load(plain, n, prompts, args.requests, args.max_tokens)
            spec_answers, spec_rate, spec_lat = load(spec, n, prompts, args.requests, args.max_tokens)
            for prompt, texts in spec_answers.items():
                if texts != plain_answers.get(prompt, texts):
                    raise SystemExit(f"{n} clients: the drafter's answer to {prompt!r} differs from the plain server's")
            rows.append((n, plain_rate, spec_rate, plain_lat, spec_lat))
    print(f"{args.requests} requests per client x {args.max_tokens} tokens, greedy; answers equal in every run")
    print(f"{'clients':>8}{'plain tok/s':>13}{'drafter tok/s':>15}{'ratio':>7}"
          f"{'plain p50/p95 s':>18}{'drafter p50/p95 s':>20}")
    for n, plain_rate, spec_rate, plain_lat, spec_lat in rows:
        print(f"{n:>8}{plain_rate:>13.1f}{spec_rate:>15.1f}{spec_rate / plain_rate:>7.2f}"
              f"{statistics.median(plain_lat):>9.2f}/{percentile(plain_lat, 0.95):<8.2f}"
              f"{statistics.median(spec_lat):>11.2f}/{percentile(spec_lat, 0.95):<8.2f}")
    return rows


if __name__ == "__main__":
    main()
