"""`peftkit serve --ray`: a router and two replicas on a local Ray cluster; requests for an adapter go to the
replica that holds it (Ray Serve's model multiplexing), and answers equal `generate` alone."""
from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from peftkit.serve.ray_serve import REPLICA_HEADER, deployment

from .serve_http_checks import save_adapters, smollm2_tokenizer, solo_answer, tiny_server

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    root = tmp_path_factory.mktemp("adapters")
    reference = save_adapters(root)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    here = str(Path(__file__).resolve().parents[1])  # the replicas import this test package's builder
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(partial(tiny_server, root), "tiny", 2, adapters_per_replica=4)
        serve.run(app, route_prefix="/")
        yield f"http://127.0.0.1:{port}", reference
    finally:
        serve.shutdown()
        ray.shutdown()


def test_requests_follow_their_adapter_and_equal_generate_alone(cluster) -> None:
    url, reference = cluster
    tokenizer = smollm2_tokenizer()
    replicas: dict[str, set[str]] = {}
    for round_ in range(3):
        for adapter in ["lora", "ia3", "prefix", "peft-lora"]:
            prompt = f"Round {round_} for"
            reply = httpx.post(f"{url}/v1/completions", timeout=60,
                               json={"model": adapter, "prompt": prompt, "max_tokens": 5, "temperature": 0})
            assert reply.status_code == 200, reply.text
            answer = reply.json()
            assert (answer["choices"][0]["text"], answer["usage"]["completion_tokens"]) == solo_answer(
                reference, adapter, tokenizer(prompt)["input_ids"], 5)
            replicas.setdefault(adapter, set()).add(reply.headers[REPLICA_HEADER])
    assert all(len(held) == 1 for held in replicas.values()), replicas


def test_streams_and_errors_pass_through(cluster) -> None:
    url, reference = cluster
    body = {"model": "lora-small", "prompt": "Hello", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines)
    assert text == solo_answer(reference, "lora-small", smollm2_tokenizer()("Hello")["input_ids"], 6)[0]
    missing = httpx.post(f"{url}/v1/completions", json={"model": "nobody", "prompt": "x"}, timeout=60)
    assert missing.status_code == 404 and "nobody" in missing.json()["error"]["message"]
    refused = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "lora"}, timeout=60)
    assert refused.status_code == 400 and "--adapter" in refused.json()["error"]["message"]
