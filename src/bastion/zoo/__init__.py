"""Model zoos: several variants of one task behind one name, chosen per request.

``spec`` reads ``zoo.yaml``, ``profiles`` measures and stores each variant's quality
and latency (``profile.json``), ``pareto`` keeps the non-dominated variants and
``policy`` picks one of them for the request's targets and the current load;
``defenses`` randomise that pick (metric noise, exponential mechanism,
permute-and-flip) so a client cannot fingerprint and extract one variant.
"""

from bastion.zoo.defenses import (
    DEFENSE_KINDS,
    NOISE_KINDS,
    DefenseSpec,
    ExponentialMechanism,
    MetricNoise,
    PermuteAndFlip,
    build_policy,
    utility,
)
from bastion.zoo.pareto import Point, dominated_by, pareto_front
from bastion.zoo.policy import (
    ON_INFEASIBLE,
    POLICY_NAMES,
    Choice,
    SelectionPolicy,
    Targets,
    make_policy,
    parse_targets,
)
from bastion.zoo.profiles import (
    METRICS,
    PERCENTILES,
    PROFILE_FILE,
    ProfileError,
    VariantProfile,
    ZooProfile,
    load_profile,
    machine_description,
    measure_latencies,
    measure_latency,
    quality,
    save_profile,
)
from bastion.zoo.spec import ZOO_FILE, ZooSpec, ZooSpecError, check_profile, load_zoo_spec, parse_zoo_spec

__all__ = [
    "DEFENSE_KINDS",
    "METRICS",
    "NOISE_KINDS",
    "ON_INFEASIBLE",
    "PERCENTILES",
    "POLICY_NAMES",
    "PROFILE_FILE",
    "ZOO_FILE",
    "Choice",
    "DefenseSpec",
    "ExponentialMechanism",
    "MetricNoise",
    "PermuteAndFlip",
    "Point",
    "ProfileError",
    "SelectionPolicy",
    "Targets",
    "VariantProfile",
    "ZooProfile",
    "ZooSpec",
    "ZooSpecError",
    "build_policy",
    "check_profile",
    "dominated_by",
    "load_profile",
    "load_zoo_spec",
    "machine_description",
    "make_policy",
    "measure_latencies",
    "measure_latency",
    "pareto_front",
    "parse_targets",
    "parse_zoo_spec",
    "quality",
    "save_profile",
    "utility",
]
