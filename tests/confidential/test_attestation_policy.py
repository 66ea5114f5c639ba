"""verify_evidence and MeasurementPolicy, driven with dev evidence: the checks every
kind shares (bounds, dev opt-in, nonce, freshness, key length, measurement)."""

from __future__ import annotations

import datetime

import pytest

from bastion.confidential.attestation import (
    MAX_EVIDENCE_BYTES,
    Attestation,
    AttestationError,
    MeasurementPolicy,
    parse_expected_measurement,
    verifier_for,
    verify_evidence,
)
from bastion.confidential.dev_evidence import DevEvidenceProducer

MEASUREMENT = bytes.fromhex("ab" * 48)
KEY = b"\x09" * 32
NONCE = b"fresh-nonce-0001"
ALLOW = MeasurementPolicy({"measurement": MEASUREMENT.hex()}, allow_dev=True)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def producer() -> DevEvidenceProducer:
    return DevEvidenceProducer(MEASUREMENT)


# --- parse_expected_measurement -----------------------------------------------------------


def test_parse_bare_hex_names_the_dev_measurement() -> None:
    assert parse_expected_measurement("  ABcd01 ") == {"measurement": "abcd01"}


def test_parse_named_values() -> None:
    assert parse_expected_measurement("pcr0=AA, pcr1 = bb,PCR2=cc") == {"pcr0": "aa", "pcr1": "bb", "pcr2": "cc"}


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", r"^expected measurement: empty$"),
        ("   ", r"^expected measurement: empty$"),
        ("0x=ab", r"^expected measurement: bad name '0x'$"),
        ("pcr-0=ab", r"^expected measurement: bad name 'pcr-0'$"),
        ("abc", r"^expected measurement measurement: expected hex digits, got 'abc'$"),
        ("pcr0=zz", r"^expected measurement pcr0: expected hex digits, got 'zz'$"),
        ("pcr0=", r"^expected measurement pcr0: expected hex digits"),
        ("ab" * 129, r"^expected measurement measurement: expected hex digits"),
    ],
)
def test_parse_refuses(spec: str, reason: str) -> None:
    with pytest.raises(AttestationError, match=reason):
        parse_expected_measurement(spec)


# --- MeasurementPolicy.check -------------------------------------------------------------


def _att(**measurement: str) -> Attestation:
    return Attestation(
        kind="dev", measurement=measurement, public_key=KEY, nonce=None, user_data=None, timestamp=_utcnow()
    )


def test_policy_requires_an_expectation() -> None:
    with pytest.raises(AttestationError, match=r"^no expected measurement given: refusing to trust any worker$"):
        MeasurementPolicy({}).check(_att(measurement="ab"))


def test_policy_every_named_value_must_match() -> None:
    policy = MeasurementPolicy({"pcr0": "aa", "pcr1": "bb"})
    policy.check(_att(pcr0="aa", pcr1="bb", pcr2="cc"))  # extra values are not constrained
    with pytest.raises(AttestationError, match=r"^measurement pcr1: expected bb, the worker attests bc$"):
        policy.check(_att(pcr0="aa", pcr1="bc"))
    with pytest.raises(
        AttestationError,
        match=r"measurement pcr1: expected bb, but dev evidence has no value named 'pcr1' \(it has pcr0\)",
    ):
        policy.check(_att(pcr0="aa"))


# --- verify_evidence ---------------------------------------------------------------------


def test_dev_evidence_accepted_when_allowed(producer: DevEvidenceProducer) -> None:
    att = verify_evidence("dev", producer.evidence(KEY, NONCE), nonce=NONCE, policy=ALLOW)
    assert (att.kind, att.public_key, att.nonce) == ("dev", KEY, NONCE)
    assert att.measurement == {"measurement": MEASUREMENT.hex()}
    # the expectation as an operator writes it
    policy = MeasurementPolicy(parse_expected_measurement(MEASUREMENT.hex().upper()), allow_dev=True)
    verify_evidence("dev", producer.evidence(KEY, NONCE), nonce=NONCE, policy=policy)


def test_dev_evidence_refused_unless_allowed(producer: DevEvidenceProducer) -> None:
    policy = MeasurementPolicy({"measurement": MEASUREMENT.hex()})
    with pytest.raises(AttestationError, match=r"^dev evidence is self-signed and proves nothing about the host"):
        verify_evidence("dev", producer.evidence(KEY, NONCE), nonce=NONCE, policy=policy)


def test_nonce_must_match(producer: DevEvidenceProducer) -> None:
    reason = r"^evidence nonce does not match the nonce sent: stale or replayed evidence$"
    with pytest.raises(AttestationError, match=reason):
        verify_evidence("dev", producer.evidence(KEY, NONCE), nonce=b"another-nonce-01", policy=ALLOW)
    with pytest.raises(AttestationError, match=reason):
        verify_evidence("dev", producer.evidence(KEY, None), nonce=NONCE, policy=ALLOW)
    # no nonce asked for: freshness comes from the timestamp alone
    assert verify_evidence("dev", producer.evidence(KEY, None), nonce=None, policy=ALLOW).nonce is None


def test_stale_evidence_is_refused(producer: DevEvidenceProducer) -> None:
    evidence = producer.evidence(KEY, NONCE)
    later = _utcnow() + datetime.timedelta(seconds=400)
    with pytest.raises(AttestationError, match=r"^evidence is 4\d\d s old, more than the 300 s accepted$"):
        verify_evidence("dev", evidence, nonce=NONCE, policy=ALLOW, now=later)
    strict = MeasurementPolicy(ALLOW.expected, allow_dev=True, max_age_s=10)
    with pytest.raises(AttestationError, match=r"^evidence is \d+ s old, more than the 10 s accepted$"):
        verify_evidence("dev", evidence, nonce=NONCE, policy=strict, now=_utcnow() + datetime.timedelta(seconds=20))
    verify_evidence("dev", evidence, nonce=NONCE, policy=ALLOW, now=_utcnow() + datetime.timedelta(seconds=200))


def test_evidence_from_the_future_is_refused(producer: DevEvidenceProducer) -> None:
    evidence = producer.evidence(KEY, NONCE)
    with pytest.raises(AttestationError, match=r"^evidence timestamp is 1\d\d s in the future$"):
        verify_evidence("dev", evidence, nonce=NONCE, policy=ALLOW, now=_utcnow() - datetime.timedelta(seconds=120))
    # a verifier clock a little behind is tolerated
    verify_evidence("dev", evidence, nonce=NONCE, policy=ALLOW, now=_utcnow() - datetime.timedelta(seconds=30))


def test_wrong_measurement_is_refused(producer: DevEvidenceProducer) -> None:
    policy = MeasurementPolicy({"measurement": "cd" * 48}, allow_dev=True)
    with pytest.raises(
        AttestationError, match=rf"^measurement measurement: expected {'cd' * 48}, the worker attests {'ab' * 48}$"
    ):
        verify_evidence("dev", producer.evidence(KEY, NONCE), nonce=NONCE, policy=policy)
    nitro_policy = MeasurementPolicy({"pcr0": "ab" * 48}, allow_dev=True)
    with pytest.raises(AttestationError, match=r"has no value named 'pcr0' \(it has measurement\)"):
        verify_evidence("dev", producer.evidence(KEY, NONCE), nonce=NONCE, policy=nitro_policy)


def test_oversized_evidence_is_refused_before_parsing() -> None:
    with pytest.raises(
        AttestationError,
        match=rf"^evidence: {MAX_EVIDENCE_BYTES + 1} bytes, more than the {MAX_EVIDENCE_BYTES} accepted$",
    ):
        verify_evidence("dev", b"\x00" * (MAX_EVIDENCE_BYTES + 1), nonce=NONCE, policy=ALLOW)
    with pytest.raises(AttestationError, match=r"^evidence: expected bytes$"):
        verify_evidence("dev", "not bytes", nonce=NONCE, policy=ALLOW)  # type: ignore[arg-type]


def test_attested_key_must_be_32_bytes(producer: DevEvidenceProducer) -> None:
    with pytest.raises(AttestationError, match=r"^evidence public key: expected a 32-byte X25519 key, got 16 bytes$"):
        verify_evidence("dev", producer.evidence(KEY[:16], NONCE), nonce=NONCE, policy=ALLOW)
    with pytest.raises(AttestationError, match=r"got 33 bytes$"):
        verify_evidence("dev", producer.evidence(KEY + b"\x00", NONCE), nonce=NONCE, policy=ALLOW)


def test_unknown_kind_and_tampered_evidence(producer: DevEvidenceProducer) -> None:
    with pytest.raises(AttestationError, match=r"^evidence kind 'sgx': expected one of dev, nitro$"):
        verifier_for("sgx")
    tampered = bytearray(producer.evidence(KEY, NONCE))
    tampered[-1] ^= 0x80
    with pytest.raises(AttestationError, match=r"^COSE signature does not verify with the embedded signing key$"):
        verify_evidence("dev", bytes(tampered), nonce=NONCE, policy=ALLOW)
