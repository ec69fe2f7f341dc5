"""The conformance kit (`certify(config)` checks a mixer against the protocol's invariants) and the
independent control model of the studies (`ControlLM`)."""

from mixerzoo.testing.control import ControlLM
from mixerzoo.testing.conformance import (
    CERTIFY_SETTINGS, CHECKS, TOLERANCES, assert_close, assert_rel_close, assert_states_close, build_pair, certify,
)

__all__ = ["CERTIFY_SETTINGS", "CHECKS", "ControlLM", "TOLERANCES", "assert_close", "assert_rel_close", "assert_states_close", "build_pair", "certify"]
