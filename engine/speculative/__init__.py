"""Speculative decoding: drafters propose k tokens, the target verifies them in one forward."""
