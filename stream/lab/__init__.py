"""Measurement, never imported by the product: the stream benchmark and its echo peer, the online
experiment, and fault injection."""
