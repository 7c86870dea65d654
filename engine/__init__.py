"""batchdeck's engine: the mechanism (requests, KV blocks, scheduler, model runner, telemetry)."""
