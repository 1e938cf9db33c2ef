"""`bitfold serve`: an OpenAI-compatible HTTP server over one shared engine.

`async_engine.py` (the engine thread), `protocol.py` (request bodies), `responses.py` (response
bodies and stream chunks), `generate.py` (one request, streamed or not), `http_errors.py`
(OpenAI's error shape), `metrics.py` (Prometheus text), `app.py` (the FastAPI app), `cli.py`
(the command). Nothing here is imported by `bitfold` itself: fastapi and uvicorn are the
`serve` extras.
"""
