"""The outbox's readers: the event bus, the webhook sender, metrics.

The store writes events and their deliveries in the transaction of the change
they describe; everything here only reads them or reacts to them, so nothing
here can lose an event or slow a clone job (docs/guide/events.md).
"""
