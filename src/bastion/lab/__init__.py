"""The extraction lab: attacks on a live Bastion zoo, through the public protocol only.

A zoo answers under one name and picks a variant per request from the client's
targets; the lab shows what an outside attacker learns from that (PSML):

* :mod:`bastion.lab.oracle`: the black box, a thin REST client that sends batches with
  targets and an API key, counts queries, waits out 429s;
* :mod:`bastion.lab.pools`: the attacker's own unlabelled inputs per scenario;
* :mod:`bastion.lab.fingerprint`: how many variants answer, and targets that trigger
  each one consistently (a bisection walk over the refusals);
* :mod:`bastion.lab.extract`: a surrogate trained on the answers, its accuracy and its
  fidelity to the victim, for the explicit, naive and fingerprinted attackers;
* :mod:`bastion.lab.report`: every result with its configuration, seed and machine;
* :mod:`bastion.lab.tradeoff`: the protection-vs-goodput sweep (each defense at several
  strengths; goodput from the server's own counters), the public face of its parts:
  :mod:`~bastion.lab.sweep_plan` (points, classes, the work copy's zoo.yaml and hardening),
  :mod:`~bastion.lab.launch` (the experimenter's server, through the benchmark's launcher),
  :mod:`~bastion.lab.benign` (the benign workload and its goodput), :mod:`~bastion.lab.sweep`
  (the points measured on one server), :mod:`~bastion.lab.probing` (the detector point),
  :mod:`~bastion.lab.tradeoff_report` and :mod:`~bastion.lab.plots` (Markdown and PNGs).

``bastion lab fingerprint``, ``bastion lab extract`` and ``bastion lab tradeoff`` drive
them (``tradeoff`` also starts the server it measures, as the experimenter; its attacks
and workload still go through the public protocol). The package imports
``bastion.client``, ``bastion.core``, the scenarios' data generators and the benchmark's
client-side launcher only, never the server's internals (tests/lab/test_outsider.py checks it).
"""
