"""Print the closing table of scripts/gpu_suite.sh from pytest's JUnit XML and the metrics the
GPU tests append to $GPU_RESULTS (one JSON object a line).

    python3 tests/gpu/gpu_report.py JUNIT.xml RESULTS.jsonl
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _metric(r: dict) -> str:
    if not r:
        return ""
    t = r["test"]
    note = " [name-check fallback]" if r.get("note") else ""
    if "fp32_logits" in t:
        return f"max|dlogit| {r['max_abs_diff']:.2e} (tol 5e-3); argmax {r['argmax_agreement']:.2%}{note}"
    if "bf16_argmax" in t:
        return (f"argmax {r['argmax_agreement']:.2%} (min 99%); max|dlogit| {r['max_abs_diff']:.2e}; "
                f"vs fp32 parent {r.get('hf_vs_fp32_argmax', float('nan')):.2%}{note}")
    if "quantized" in t and "frac_elems_off" not in r:  # the SequentialMLP-on-TE case reports its own keys
        return ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("test", "time"))[:200]
    if "quantized" in t:
        ncpu = r.get("tensors_differing_from_modelopt_reference", r.get("tensors_differing_from_modelopt_cpu_algo"))
        return (f"{','.join(r.get('exported_formats', []))}: vs ModelOpt fake quant "
                f"{r['frac_elems_off']:.3%} elems off ({r.get('unexplained', '?')} not at rounding ties), "
                f"max|d|/amax {r['max_abs_diff_over_amax']:.1e}; vs ModelOpt export (nvfp4: GPU arithmetic, fp8: IEEE div): "
                f"{'bit-exact' if ncpu == 0 else f'{ncpu} differ'}; vs ModelOpt GPU export: "
                f"{r.get('tensors_differing_from_modelopt_gpu_export')} tensors differ "
                f"(with amax*f32(1/d): {r.get('fix_tensors_differing_from_modelopt_gpu_export')}, "
                f"fake-quant off {r.get('fix_frac_elems_off', float('nan')):.3%}){note}")
    if "nccl_collectives" in t:
        return f"NCCL collectives: {'ok' if r.get('ok') else 'FAILED ' + str(r.get('problems'))[:80]}"
    if "two_gpu" in t:
        return (f"{r.get('mode')} (tp{r.get('tp')} ep{r.get('ep')}): max|dlogit| {r['max_abs_diff']:.2e} (tol 5e-3); "
                f"argmax {r['argmax_agreement']:.2%}; vs 1-GPU export: {r.get('vs_one_gpu_export', 'n/a')}{note}")
    if "callback" in t:
        return (f"{r.get('exports')} exports, last {r.get('last')}: max|dlogit| {r.get('max_abs_diff', float('nan')):.2e}; "
                f"verify {r.get('verify', '?')}; train s/step {r.get('step_s', float('nan')):.3f}{note}")
    if "speed" in t:
        runs = r.get("runs", [])
        parts = [f"{x.get('threads')} threads {x.get('wall', 0):.2f} s = {x.get('gb_per_s', 0):.2f} GB/s" for x in runs]
        return (f"{r.get('gb', 0):.2f} GB bf16 ({runs[-1].get('tensors') if runs else '?'} tensors): "
                + "; ".join(parts)
                + f" | plan {r.get('plan_s', 0):.2f} s, +name check {r.get('plan_and_name_check_s', 0):.2f} s, "
                  f"tensors without writing {r.get('produce_tensors_s', 0):.2f} s"
                + f" | baselines: D2H {r.get('baseline_d2h_gb_per_s', 0):.2f} GB/s, "
                  f"write+fsync {r.get('baseline_write_fsync_gb_per_s', 0):.2f} GB/s{note}")
    if "name_check" in t:
        return (r.get("error") or "ok")[:110]
    return ""


def main(junit: str, results: str) -> int:
    rows = []
    metrics: dict[str, dict] = {}
    if Path(results).exists():
        for line in Path(results).read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            metrics[r["test"].split("::", 1)[-1]] = r
    if not Path(junit).exists():
        print(f"no JUnit XML at {junit}: pytest did not finish")
        return 1
    root = ET.parse(junit).getroot()
    for case in root.iter("testcase"):
        name = case.get("name", "")
        result = "passed"
        reason = ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                result = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                reason = (el.get("message") or "").splitlines()[0][:110] if el.get("message") else ""
                break
        try:
            m = _metric(metrics.get(name, {}))
        except (KeyError, TypeError, ValueError):  # a test reporting other keys: show them as they are
            r = metrics.get(name, {})
            m = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("test", "time"))[:200]
        if result != "passed" and reason and (not m or result == "skipped"):
            m = reason
        elif result in ("FAILED", "ERROR") and reason:
            m = f"{m} | {reason}"
        rows.append((name, result, m, float(case.get("time", 0))))
    w = max([len(r[0]) for r in rows] + [4])
    print()
    print(f"{'test':<{w}}  {'result':<7}  {'seconds':>7}  max diff / argmax agreement / metric")
    print(f"{'-' * w}  {'-' * 7}  {'-' * 7}  {'-' * 40}")
    for name, result, m, secs in rows:
        print(f"{name:<{w}}  {result:<7}  {secs:7.1f}  {m}")
    n = {k: sum(1 for r in rows if r[1] == k) for k in ("passed", "FAILED", "ERROR", "skipped")}
    print(f"\n{n['passed']} passed, {n['FAILED'] + n['ERROR']} failed, {n['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
