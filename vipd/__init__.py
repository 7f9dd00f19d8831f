"""vipd: keeps virtual IP addresses on exactly one healthy node of an active/passive pair."""

__version__ = "0.1.0"
