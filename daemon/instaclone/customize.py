"""Moved to :mod:`instaclone.jobs.customize` (and :mod:`instaclone.jobs.guestscript`); this name
stays until every import uses the new ones."""

from .jobs.customize import (
    AGENT_CHANNEL,
    CustomizationFailed,
    customize,
    has_agent,
    has_agent_channel,
    ipv4_interfaces,
    renew_network,
    run_script,
    set_clock,
    validate_script,
    wait_agent,
    wait_nics,
)
from .jobs.guestscript import (
    CONFIG_PATH,
    MAX_SCRIPT_BYTES,
    RNG_BYTES,
    SCRIPT_TAIL_CHARS,
    SEED_BYTES,
    SSH_KEY_TYPES,
    make_host_keys,
    ssh_fingerprint,
)

__all__ = ["AGENT_CHANNEL", "CONFIG_PATH", "MAX_SCRIPT_BYTES", "RNG_BYTES", "SCRIPT_TAIL_CHARS", "SEED_BYTES",
           "SSH_KEY_TYPES", "CustomizationFailed", "customize", "has_agent", "has_agent_channel", "ipv4_interfaces",
           "make_host_keys", "renew_network", "run_script", "set_clock", "ssh_fingerprint", "validate_script",
           "wait_agent", "wait_nics"]
