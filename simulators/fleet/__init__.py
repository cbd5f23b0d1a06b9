"""The fleet simulator: many simulated automation servers with real stores, faults and a report.

``licsim run SCENARIO.toml`` (:mod:`simulators.fleet.cli`) and the Python API
:class:`Fleet` for test benches.
"""

from simulators.fleet.faults import FaultRecord
from simulators.fleet.fleet import Fleet
from simulators.fleet.models import LINKS, MODELS, make_facts
from simulators.fleet.report import Invariant, Summary
from simulators.fleet.scenario import (
    FAULT_KINDS,
    FaultSpec,
    Scenario,
    load_scenario,
    parse_scenario,
)
from simulators.fleet.server import SimServer

__all__ = [
    "FAULT_KINDS",
    "LINKS",
    "MODELS",
    "FaultRecord",
    "FaultSpec",
    "Fleet",
    "Invariant",
    "Scenario",
    "SimServer",
    "Summary",
    "load_scenario",
    "make_facts",
    "parse_scenario",
]
