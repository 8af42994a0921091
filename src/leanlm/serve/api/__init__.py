"""The OpenAI-compatible HTTP server (FastAPI): ``create_app`` and the request/response schemas."""
