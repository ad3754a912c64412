"""mailflow: an email-driven IT service desk (ITIL incidents and service requests by mail)."""

__version__ = "0.1.0"
