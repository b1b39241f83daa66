"""The licensing rule book and the admission decision of irm-gateway.

Everything here is pure: functions are handed ``now`` and the state they
need and return decisions and events. Only :mod:`policy.store` and
:mod:`policy.sqlite_store` touch a disk, and nothing here reads a clock,
opens a socket or logs.
"""
