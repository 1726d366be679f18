"""Outbound relay: queue, MX resolution, delivery, retries and bounces."""
