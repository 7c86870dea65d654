"""The OpenAI-compatible HTTP server (`batchdeck serve`) and its Prometheus metrics."""
