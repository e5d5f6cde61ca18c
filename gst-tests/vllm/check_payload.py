"""Decodes request bodies written by the plugin's remote client with vLLM's own code, in the
vLLM venv: `CompletionRequest` (the /v1/completions schema), `safe_load_prompt_embeds` (the
server's decoder of `prompt_embeds`: base64, torch.load(weights_only=True), shape and dtype
checks) and `to_sampling_params`. Run by gst-tests/tests/vllm.rs (payload test), which writes

    DIR/<name>.json           the exact body the client sends
    DIR/<name>.expect.json    {"rows", "hidden", "dtype", "max_tokens", "temperature", "top_p",
                               "seed", "stop_token_ids"}

The embeddings hold v[i] = ((37 i) mod 101 - 50) / 64, exact in f32, bf16 and f16.
Prints one line per body and exits non-zero on the first difference.
"""

import json
import pathlib
import sys
import types

import torch
import vllm
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.renderers.embed_utils import safe_load_prompt_embeds

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def main(folder: pathlib.Path) -> int:
    bodies = sorted(p for p in folder.glob("*.json") if not p.name.endswith(".expect.json"))
    if not bodies:
        print(f"no request bodies in {folder}", file=sys.stderr)
        return 1
    for path in bodies:
        body = json.loads(path.read_text())
        expect = json.loads(path.with_suffix(".expect.json").read_text())
        request = CompletionRequest.model_validate(body)
        rows, hidden = expect["rows"], expect["hidden"]
        for served_dtype in (torch.float32, torch.bfloat16):
            config = types.SimpleNamespace(
                enable_prompt_embeds=True,
                get_hidden_size=lambda: hidden,
                dtype=served_dtype,
            )
            tensor = safe_load_prompt_embeds(config, request.prompt_embeds)
            assert tensor.shape == (rows, hidden), (path.name, tensor.shape)
            assert tensor.dtype == served_dtype, (path.name, tensor.dtype)
            index = torch.arange(rows * hidden, dtype=torch.int64)
            values = (((37 * index) % 101 - 50).to(torch.float64) / 64).reshape(rows, hidden)
            assert torch.equal(tensor.to(torch.float64), values), f"{path.name}: values differ"
        # The raw payload keeps the dtype the client chose.
        raw = torch.load(
            __import__("io").BytesIO(__import__("pybase64").b64decode(request.prompt_embeds)),
            weights_only=True,
        )
        assert raw.dtype == DTYPES[expect["dtype"]], (path.name, raw.dtype)
        params = request.to_sampling_params(max_tokens=request.max_tokens)
        assert params.max_tokens == expect["max_tokens"], params
        assert params.temperature == expect["temperature"], params
        assert params.top_p == expect["top_p"], params
        assert params.seed == expect["seed"], params
        assert list(params.stop_token_ids) == expect["stop_token_ids"], params
        assert request.return_token_ids is True
        print(f"{path.name}: decoded by vLLM {vllm.__version__} as {rows}x{hidden} "
              f"{expect['dtype']}, sampling {params.temperature}/{params.top_p}/{params.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1])))
