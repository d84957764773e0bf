"""An OpenAI-style client session against ``mlx_lm.server --draft-model``.

    python examples/server_client.py [--model T --draft-model D] [--max-tokens N]

Starts ``mlx_lm server --model T --draft-model D`` on a free loopback port,
sends one chat completion without streaming and one with streaming (using only
the standard library; any OpenAI client works the same way), prints each reply and the acceptance statistics the
server adds to ``usage`` as ``speculative``, then stops the server.  Defaults
to the demo pair shipped in the package, offline.
"""

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request

from mlx_lm_dspark.demo import pair_paths


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url, server, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not answer within {seconds} s")


def post(url, body):
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=300)


def main():
    demo_target, demo_drafter = pair_paths()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(demo_target))
    parser.add_argument("--draft-model", default=str(demo_drafter))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help="Sent with each request: fixed drafts per round (default: chosen each round).")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", args.model,
                               "--draft-model", args.draft_model, "--host", "127.0.0.1", "--port", str(port),
                               "--log-level", "WARNING"])
    try:
        wait_until_up(url, server)
        body = {"model": args.model, "max_tokens": args.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": "def fibonacci(n):\n"}]}
        if args.num_draft_tokens is not None:
            body["num_draft_tokens"] = args.num_draft_tokens  # an extra field of mlx_lm.server

        with post(url, body) as response:
            answer = json.loads(response.read())
        print("reply:", answer["choices"][0]["message"]["content"])
        print("speculative:", answer["usage"]["speculative"])

        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        pieces, usage = [], None
        with post(url, stream) as response:
            for line in response:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                for choice in chunk.get("choices", []):
                    pieces.append((choice.get("delta") or {}).get("content") or "")
                usage = chunk.get("usage") or usage
        print("streamed reply:", "".join(pieces))
        print("streamed speculative:", usage["speculative"])
        print(f"same reply streamed: {''.join(pieces) == answer['choices'][0]['message']['content']}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
