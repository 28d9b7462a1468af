"""The tracker: a pure scheduler, the protocol and the twistd service."""
