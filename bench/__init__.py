"""Benchmarks of irm-gateway: the policy core alone, and the whole path over MQTT."""
