"""Narrow exceptions; each message says what is wrong and how to fix it."""


class MailflowError(Exception):
    """Base of every error mailflow raises on purpose."""


class ConfigError(MailflowError):
    """The configuration file is missing, unreadable or invalid."""


class RuleError(MailflowError):
    """A rule file in rules/ is invalid; the message names the file and key."""


class TemporaryFailure(MailflowError):
    """Something outside us (database, server) failed; retrying later may succeed."""
