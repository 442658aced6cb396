"""Serving Lyra over HTTP: an OpenAI-compatible chat completions API with continuous batching.

    python -m lyra.serve.api --model outputs/nano/model --port 8000

`lyra.serve.api` holds the FastAPI app, its uvicorn server and the CLI; `lyra.serve.schema`
the pydantic request models and OpenAI error objects; `lyra.serve.limits` the configuration
and the checks made before any work; `lyra.serve.media` local files and media decoding;
`lyra.serve.batcher` the engine that runs concurrent requests in one decode batch.
See docs/api.md for the request format, the limits and client examples.
"""
