"""What both sides share: settings, the wire protocol, adapters and their card, devices."""
