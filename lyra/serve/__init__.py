"""Serving Lyra over HTTP: an OpenAI-compatible chat completions API with dynamic batching.

    python -m lyra.serve.api --model outputs/nano/model --port 8000

`lyra.serve.api` holds the request schema, media decoding, the HTTP server and the CLI;
`lyra.serve.batcher` groups concurrent requests into batched `generate` calls.
See docs/api.md for the request format and client examples.
"""
