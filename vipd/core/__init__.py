"""The pure core: wire format, election state machine, health hysteresis.

Nothing in this package does I/O, reads a clock or imports asyncio, sockets, pyroute2,
aiohttp or prometheus_client; time is always an argument. tests/unit/test_purity.py
enforces it.
"""
