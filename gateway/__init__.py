"""The MQTT service around the policy core: hellos in, decisions out."""
