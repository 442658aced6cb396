"""Serving Lyra over HTTP: an OpenAI-compatible chat completions API with continuous batching.

    python -m lyra.serve.api --model outputs/nano/model --port 8000

`lyra.serve.api` holds the request schema, media decoding, the HTTP server and the CLI;
`lyra.serve.batcher` owns the decode loop: requests join and leave the running batch at every step.
See docs/api.md for the request format and client examples.
"""
