"""Protection against goodput: sweep a zoo's selection defenses and measure both sides.

For each point (a defense kind at one strength, or the undefended baseline) the sweep
moves an attacker tenant and a benign tenant into that point's defense class, then:

* **goodput**: the benign tenant replays a fixed, seeded workload of *reachable* targets
  (some variant of the front meets each one); goodput = met / all from the delta of the
  server's ``bastion_zoo_requests_total`` counters over the replay;
* **fingerprint**: the attacker walks the zoo (:func:`bastion.lab.fingerprint.fingerprint`):
  rows spent, variants found, consistency of the victim's trigger;
* **extract**: the attacker queries ``budget`` rows at that trigger and trains a surrogate
  (:func:`bastion.lab.extract.run_extraction`); accuracy on the zoo's held-out rows and
  fidelity to the victim variant (whose answers the experimenter asks by name).

Output hardening (``hardening:`` in a model's ``config.yaml``, see
:mod:`bastion.guard.hardening`) is per model, not per tenant, so it cannot be switched
by a tenant's class: the caller writes one hardening setting into every variant's
``config.yaml`` of the copy (:func:`apply_hardening`), starts a server, sweeps the
selection points on it, and does that again per setting. The fingerprinted attacker's
answers are used twice: a surrogate trained on the returned scores (``soft``) and one
on the one-hot of their argmax (``hard``, the adaptive attacker that ignores perturbed
scores); a point's headline is the better of the two (max accuracy).

The baseline also runs the explicit and the naive attacker. Every attack and the goodput
workload go through the public REST protocol with an API key; the experiment's own
set-up (a copy of the repository with one defense class per point in ``zoo.yaml``, a
``bastion serve`` on loopback, the admin key) is the operator's side, and its
bootstrap admin key is made by the caller (``bastion lab tradeoff``), since this
package imports no server internals. Tenants' keys are created and moved between
classes through the admin API (:class:`bastion.client.AdminClient`), the victim is read from the zoo's profile (the
experimenter knows its own repository).

The parts, one concern each:

* :mod:`bastion.lab.sweep_plan`: the points, their defense classes, the work copy's
  ``zoo.yaml`` and the hardening settings written into its ``config.yaml`` files;
* :mod:`bastion.lab.launch`: ``bastion serve`` on the copy, through the benchmark's launcher;
* :mod:`bastion.lab.benign`: the benign workload and its goodput from the server's counters;
* :mod:`bastion.lab.sweep`: the points measured on one server (:func:`run_sweep`);
* :mod:`bastion.lab.tradeoff_report`: summary rows, the best point, ``tradeoff.md``;
* :mod:`bastion.lab.probing`: the zoo-probing detector's point; :mod:`bastion.lab.plots`: the PNGs.

This module is their public face: ``bastion lab tradeoff`` imports what it needs from here.
"""

from __future__ import annotations

from bastion.lab.benign import counter_delta, goodput_from_delta, latency_slo_range, reachable_workload
from bastion.lab.launch import serve
from bastion.lab.sweep import EscalatedTenants, SweepConfig, run_sweep
from bastion.lab.sweep_plan import (
    BASELINE,
    DEFAULT_HARDENING,
    DEFAULT_STRENGTHS,
    KIND_PREFIX,
    NO_HARDENING,
    QUICK_STRENGTHS,
    HardeningSetting,
    SweepPoint,
    apply_hardening,
    class_name,
    defense_block,
    parse_hardening_setting,
    plan_points,
    prepare_copy,
    rewrite_model_config,
    rewrite_zoo_yaml,
)
from bastion.lab.tradeoff_report import best_point, markdown_report, summary_rows

__all__ = [
    "BASELINE",
    "DEFAULT_HARDENING",
    "DEFAULT_STRENGTHS",
    "KIND_PREFIX",
    "NO_HARDENING",
    "QUICK_STRENGTHS",
    "EscalatedTenants",
    "HardeningSetting",
    "SweepConfig",
    "SweepPoint",
    "apply_hardening",
    "best_point",
    "class_name",
    "counter_delta",
    "defense_block",
    "goodput_from_delta",
    "latency_slo_range",
    "markdown_report",
    "parse_hardening_setting",
    "plan_points",
    "prepare_copy",
    "reachable_workload",
    "rewrite_model_config",
    "rewrite_zoo_yaml",
    "run_sweep",
    "serve",
    "summary_rows",
]
