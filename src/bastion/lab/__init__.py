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
* :mod:`bastion.lab.tradeoff`, :mod:`bastion.lab.plots`: the protection-vs-goodput sweep
  (each defense at several strengths; goodput from the server's own counters) and its
  Markdown report and PNG plots.

``bastion lab fingerprint``, ``bastion lab extract`` and ``bastion lab tradeoff`` drive
them (``tradeoff`` also starts the server it measures, as the experimenter; its attacks
and workload still go through the public protocol). The package imports
``bastion.client``, ``bastion.core`` and the scenarios' data generators only, never the
server's internals (tests/lab/test_extract.py checks it).
"""
