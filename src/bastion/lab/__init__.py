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
* :mod:`bastion.lab.report`: every result with its configuration, seed and machine.

``bastion lab fingerprint`` and ``bastion lab extract`` drive them. The package imports
``bastion.client``, ``bastion.core`` and the scenarios' data generators only, never the
server's internals (tests/lab/test_extract.py checks it).
"""
