"""The live-tuning console: a Textual app that watches and steers the engine (issue #6)."""
