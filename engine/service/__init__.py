"""The service around the core: async engine, telemetry bus, metrics windows, NVML sampler, control
commands, MQTT bridge, offline generation and the headless runner. It may import the core
(`batchdeck.engine`) and the policies, never the console or presets."""
