"""The tradeoff sweep's report: one flat summary row per point, the best defended point,
and ``tradeoff.md``. Pure: it reads the result document :func:`bastion.lab.sweep.run_sweep`
wrote (and ``bastion lab tradeoff`` recorded), so a stored ``tradeoff.json`` can be
reported again without a server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TARGET_DROPS", "baseline_point", "best_point", "escalation_label", "markdown_report", "summary_rows"]


def _num(x: Any, spec: str = ".3f") -> str:
    # None (JSON null) and NaN both mean "not measured"
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _drop(base: Any, value: Any) -> Any:
    """What the defense took off ``base`` in percentage points (None: a side not measured)."""
    if base is None or value is None:
        return None
    if not (math.isfinite(base) and math.isfinite(value)):
        return None
    return round((base - value) * 100.0, 2)


def baseline_point(result: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The undefended point: no selection defense and no output hardening."""
    return next((p for p in result["points"] if p["defense"] == "none" and p.get("hardening", "none") == "none"
                 and not p.get("escalation")), None)


def _headline(ext: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """A point's (accuracy, fidelity, target): the best training target when several were tried."""
    best = ext.get("best")
    if best:
        return best.get("accuracy"), best.get("fidelity"), best.get("target")
    return ext.get("accuracy"), ext.get("fidelity"), None


def escalation_label(esc: Mapping[str, Any] | None) -> str | None:
    """How a point's attacker was escalated, in words (None: it was not)."""
    if not esc:
        return None
    if esc.get("kind") == "probe-monitor":
        return f"probe detector ({esc['action']} after {esc['max_refused']} refused targets)"
    return f"quota {esc['quota']}/{esc['quota_period']} requests"


def summary_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per point, drops in points (percentage points) vs the undefended
    fingerprinted attack (positive: the defense protects). ``accuracy``/``fidelity`` are the
    attacker's best training target (max accuracy of soft/hard) where both were tried."""
    base = baseline_point(result)
    b_acc, b_fid, _ = _headline((base or {}).get("extraction") or {})
    rows = []
    for p in result["points"]:
        ext = p.get("extraction") or {}
        fp = p.get("fingerprint") or {}
        acc, fid, target = _headline(ext)
        by = ext.get("by_target") or {}
        esc = p.get("escalation")
        rows.append({
            "hardening": p.get("hardening", "none"),
            "escalation": escalation_label(esc),
            "extraction_rows": ext.get("rows_answered"),
            "defense": p["defense"], "strength": p["strength"], "defense_class": p["defense_class"],
            "goodput": p["goodput"]["goodput"], "consistency": fp.get("victim_consistency"),
            "variants_found": fp.get("variants_found"), "fingerprint_queries": fp.get("queries"),
            "accuracy": acc, "fidelity": fid, "best_target": target,
            "soft_accuracy": (by.get("soft") or {}).get("accuracy"),
            "soft_fidelity": (by.get("soft") or {}).get("fidelity"),
            "hard_accuracy": (by.get("hard") or {}).get("accuracy"),
            "hard_fidelity": (by.get("hard") or {}).get("fidelity"),
            "accuracy_drop": _drop(b_acc, acc),
            "fidelity_drop": _drop(b_fid, fid),
        })
    return rows


TARGET_DROPS = ((19.6, 9.6), (9.8, 4.8))  # (accuracy, fidelity) drops in points the issue asks about


def best_point(rows: Sequence[Mapping[str, Any]], min_goodput: float = 0.8) -> Mapping[str, Any] | None:
    """The defended point (not the undefended baseline) with goodput >= ``min_goodput`` and
    the largest accuracy drop of the attacker's best target (ties: the larger fidelity
    drop, then the higher goodput); None when no such point was measured."""
    def finite(x: Any) -> bool:
        return x is not None and isinstance(x, (int, float)) and math.isfinite(x)

    ok = [r for r in rows
          if not (r["defense"] == "none" and r.get("hardening", "none") == "none" and not r.get("escalation"))
          and finite(r["goodput"]) and r["goodput"] >= min_goodput
          and finite(r["accuracy_drop"]) and finite(r["fidelity_drop"])]
    return max(ok, key=lambda r: (r["accuracy_drop"], r["fidelity_drop"], r["goodput"])) if ok else None


def _selection_label(r: Mapping[str, Any]) -> str:
    label = "none" if r["defense"] == "none" else f"{r['defense']} {r['strength']:g}"
    return f"{label} + escalated: {r['escalation']}" if r.get("escalation") else label


def _hardening_section(rows: Sequence[Mapping[str, Any]], result: Mapping[str, Any]) -> list[str]:
    specs = {p.get("hardening", "none"): p.get("hardening_spec") for p in result["points"]}
    lines = ["## Output hardening x selection defense", "",
             "One server per hardening setting (written into every variant's `config.yaml` of the copy), the "
             "selection points swept on it. The fingerprinted attacker's answers train two surrogates: `soft` "
             "(the returned scores) and `hard` (one-hot of their argmax: the adaptive attacker). `best` is the "
             "attacker's better one (max accuracy); drops are of `best` vs the undefended best, in points. "
             "`rows`: extraction rows the attacker got answered. An *escalated* point is the same point for a "
             "fresh attacker tenant whose quota (requests in total, fingerprint included) the operator set through "
             "`PUT /v2/admin/tenants/{t}/limits`; the server's 429 ended its queries (its goodput is the benign "
             "tenant's of the same point). Consistency under hardening is what the attacker can observe: "
             "variants whose hardened answers look alike count as one.", "",
             "| hardening | selection | goodput | consistency | rows | soft acc | soft fid | hard acc | hard fid | "
             "best | best acc | Δacc (pts) | best fid | Δfid (pts) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        n = "-" if r["extraction_rows"] is None else r["extraction_rows"]
        lines.append(f"| {r['hardening']} | {_selection_label(r)} | {_num(r['goodput'])} | "
                     f"{_num(r['consistency'], '.2f')} | {n} | "
                     f"{_num(r['soft_accuracy'])} | {_num(r['soft_fidelity'])} | "
                     f"{_num(r['hard_accuracy'])} | {_num(r['hard_fidelity'])} | {r['best_target'] or '-'} | "
                     f"{_num(r['accuracy'])} | {_num(r['accuracy_drop'], '+.1f')} | {_num(r['fidelity'])} | "
                     f"{_num(r['fidelity_drop'], '+.1f')} |")
    lines += ["", "Hardening settings: " + "; ".join(
        f"`{name}` = `{yaml.safe_dump(spec, default_flow_style=True).strip() if spec else 'none'}`"
        for name, spec in specs.items()), ""]
    return lines


def _best_point_lines(rows: Sequence[Mapping[str, Any]], min_goodput: float = 0.8) -> list[str]:
    best = best_point(rows, min_goodput)
    lines = [f"## Best point with goodput >= {min_goodput:g}", ""]
    if best is None:
        return [*lines, f"No defended point with goodput >= {min_goodput:g} and a measured extraction.", ""]
    lines.append(f"Hardening `{best['hardening']}` x selection `{_selection_label(best)}`: goodput "
                 f"{_num(best['goodput'])}, fingerprinted attacker's best ({best['best_target'] or 'soft'}) accuracy "
                 f"{_num(best['accuracy'])} ({_num(best['accuracy_drop'], '+.1f')} pts), fidelity "
                 f"{_num(best['fidelity'])} ({_num(best['fidelity_drop'], '+.1f')} pts).")
    for acc, fid in TARGET_DROPS:
        met = best["accuracy_drop"] >= acc and best["fidelity_drop"] >= fid
        verdict = "reached" if met else "NOT reached"
        lines.append(f"- target drop {acc:g} / {fid:g} pts (accuracy / fidelity): {verdict}")
    return [*lines, ""]


def _detector_lines(result: Mapping[str, Any]) -> list[str]:
    points = [p for p in result["points"] if (p.get("escalation") or {}).get("kind") == "probe-monitor"]
    if not points:
        return []
    base = baseline_point(result)
    b_acc, b_fid, _ = _headline((base or {}).get("extraction") or {})
    lines = ["## Zoo-probing detector", "",
             "A server with `probe_monitor` (guard/probes.py); fresh tenants. The fingerprinted attacker trains on "
             "every row answered before the server refused it (fingerprint probes included); the naive attacker "
             "(no targets: nothing for the detector to see) is its best response. Drops vs the undefended "
             "fingerprinted attack.", "",
             "| action | hardening | goodput | attacker requests before refusal | rows it holds | "
             "fingerprinted acc / fid | Δ (pts) | naive acc / fid | Δ (pts) |",
             "|---|---|---:|---:|---:|---|---|---|---|"]
    for p in points:
        det, ext, naive = p.get("detector") or {}, p.get("extraction") or {}, p.get("naive_under_detector") or {}
        acc, fid, _ = _headline(ext)
        lines.append(
            f"| {p['escalation']['action']} (after {p['escalation']['max_refused']} refused targets) | "
            f"{p.get('hardening', 'none')} | {_num(p['goodput']['goodput'])} | "
            f"{det.get('attacker_requests_before_refusal', '-') if det.get('flagged') else 'not refused'} | "
            f"{ext.get('rows_answered', '-')} | {_num(acc)} / {_num(fid)} | "
            f"{_num(_drop(b_acc, acc), '+.1f')} / {_num(_drop(b_fid, fid), '+.1f')} | "
            f"{_num(naive.get('accuracy'))} / {_num(naive.get('fidelity'))} | "
            f"{_num(_drop(b_acc, naive.get('accuracy')), '+.1f')} / "
            f"{_num(_drop(b_fid, naive.get('fidelity')), '+.1f')} |")
    return [*lines, ""]


def markdown_report(doc: Mapping[str, Any]) -> str:
    """``tradeoff.md``: the configuration, the baseline attackers, one table per defense."""
    result = doc["result"]
    cfg = doc["config"]
    lines = [f"# Protection vs goodput: zoo `{result['zoo']}`", ""]
    lines.append(f"Command: `{doc.get('command', '')}`  ")
    lines.append(f"Date: {doc.get('started_at', '')}, {doc.get('seconds', '-')} s; seed {doc.get('seed')}; "
                 f"machine: {doc.get('machine', {}).get('cpu', '?')} ({doc.get('machine', {}).get('cores', '?')} "
                 f"cores)  ")
    lines.append(f"Victim: `{result['victim']}`; extraction budget {cfg.get('budget')} rows, fingerprint budget "
                 f"{cfg.get('fingerprint_budget')} rows, goodput workload {cfg.get('goodput_requests')} reachable "
                 f"targets, surrogate {cfg.get('train')}.")
    lines += ["", "Goodput: met / all from the server's `bastion_zoo_requests_total` deltas over the benign "
              "replay. Consistency: fraction of replays of the fingerprinted victim trigger answered by the same "
              "variant. Accuracy / fidelity: the fingerprinted attacker's surrogate on the zoo's held-out rows "
              "(fidelity = agreement with the victim's top-1). Drops in points vs the undefended fingerprinted "
              "attack (positive = the defense protects).", ""]
    base = baseline_point(result)
    if base is not None:
        lines += ["## Undefended baseline", "", "| attacker | queries | accuracy | fidelity |", "|---|---:|---:|---:|"]
        attacks = dict(result.get("baseline_attacks", {}))
        if base.get("extraction"):
            attacks = {"fingerprinted": base["extraction"], **attacks}
        for name in ("explicit", "naive", "fingerprinted"):
            a = attacks.get(name)
            if a:
                lines.append(f"| {name} | {a['queries']} | {_num(a['accuracy'])} | {_num(a['fidelity'])} |")
        fp = base.get("fingerprint") or {}
        lines += ["", f"Baseline goodput {_num(base['goodput']['goodput'])}; fingerprint: "
                  f"{fp.get('variants_found', '-')} variant(s) found in {fp.get('queries', '-')} rows, victim "
                  f"trigger consistency {_num(fp.get('victim_consistency'), '.2f')}.", ""]
    all_rows = summary_rows(result)
    rows = [r for r in all_rows if r["hardening"] == "none" and not r["escalation"]]
    base_row = next((r for r in rows if r["defense"] == "none"), None)
    for kind in dict.fromkeys(r["defense"] for r in rows if r["defense"] != "none"):
        unit = "scale_accuracy" if kind == "metric-noise" else "ε"
        lines += [f"## {kind}", "",
                  f"| {unit} | goodput | consistency | variants found | fp rows | accuracy | Δacc (pts) | fidelity "
                  "| Δfid (pts) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        kind_rows = [r for r in rows if r["defense"] == kind]
        if base_row is not None:
            kind_rows = [{**base_row, "strength": None}, *kind_rows]
        for r in kind_rows:
            s = "none" if r["strength"] is None else f"{r['strength']:g}"
            lines.append(f"| {s} | {_num(r['goodput'])} | {_num(r['consistency'], '.2f')} | "
                         f"{r['variants_found'] if r['variants_found'] is not None else '-'} | "
                         f"{r['fingerprint_queries'] if r['fingerprint_queries'] is not None else '-'} | "
                         f"{_num(r['accuracy'])} | {_num(r['accuracy_drop'], '+.1f')} | {_num(r['fidelity'])} | "
                         f"{_num(r['fidelity_drop'], '+.1f')} |")
        lines.append("")
    if any(r["hardening"] != "none" for r in all_rows) or any(
            "best" in (p.get("extraction") or {}) for p in result["points"]):
        lines += _hardening_section(all_rows, result)
    lines += _detector_lines(result)
    lines += _best_point_lines(all_rows)
    plots = doc.get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)
