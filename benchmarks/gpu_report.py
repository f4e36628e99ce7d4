"""The GPU check's report (``.ci/gpu``): build, CUDA tests and GPU benchmarks in one JSON and one markdown.

    python benchmarks/gpu_report.py --bench-json ops.json certify.json memory.json \\
        --junit cuda-tests=tests.xml --steps steps.jsonl --env env.json \\
        --sanitizer sanitizer.log --out-json gpu_report.json --out-md gpu_report.md

Every input is optional and may be missing or damaged (a step that failed or ran out of time):
its part of the report then says so. The figures (issue 12), each beside its plain-PyTorch way
and a bound of the device:

- votes: ``count_votes_`` on 1.28 M rows x 10 float32 logits against ``max`` + ``index_add_`` and
  against a plain read of the same logits (``sum``); soft votes likewise against
  ``softmax(dtype=float64)`` + ``index_add_``;
- noise: ``perturb_gaussian_out`` on 393 M elements (float32, bfloat16) against ``randn(out=)`` +
  ``addcmul`` and against ``fill_`` of the same buffer (the device's write bandwidth);
- certify against the model's forward passes alone (the floor) and a plain per-input Cohen loop,
  per model and batch size, with the device-to-host synchronisations of one certify call;
- CertificationMemory on the GPU against the same calls on the CPU.

Times are medians of interleaved rounds (timing.py) where a benchmark timed both sides of a
ratio, else medians of each benchmark's own rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# (key, description, bound, kind): kind "min" means measured >= bound, "max" measured <= bound.
VOTES_TARGETS = [
    ("speedup_vs_plain", "count_votes_ vs plain argmax + index_add_", 3.0, "min"),
    ("fraction_of_read", "count_votes_ rate as a fraction of a plain read of the logits", 0.5, "min"),
]
SOFT_TARGETS = [("speedup_vs_plain", "soft_votes_ ({mode}) vs plain softmax + index_add_", 3.0, "min")]
NOISE_TARGETS = [
    ("speedup_vs_plain", "perturb_gaussian_out ({dtype}) vs randn + addcmul", 2.0, "min"),
    ("fraction_of_fill", "perturb_gaussian_out ({dtype}) bytes/s as a fraction of fill_'s", 0.4, "min"),
]
CERTIFY_TARGETS = [
    ("over_floor", "certify / forward floor, {model}, batch {batch}", 1.02, "max"),
    ("speedup_vs_plain", "certify vs the plain Cohen loop, {model}, batch {batch}", 1.0, "min"),
]
MEMORY_TARGETS = [("gpu_over_cpu", "CertificationMemory on the GPU / on the CPU, {mode}", 1.0, "max")]


# ------------------------------------------------------------------------------------------ inputs


def load_json(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_benchmarks(paths: list[Path]) -> tuple[dict[str, dict], dict, list[str]]:
    """Benchmarks by name from several pytest-benchmark jsons, the first one's machine_info, and
    the files that were missing or unreadable."""
    benches: dict[str, dict] = {}
    machine: dict = {}
    problems = []
    for path in paths:
        data = load_json(path)
        if not isinstance(data, dict) or "benchmarks" not in data:
            problems.append(path.name)
            continue
        machine = machine or data.get("machine_info", {})
        for bench in data["benchmarks"]:
            benches[bench["name"]] = bench
    return benches, machine, problems


def load_steps(path: Path | None) -> list[dict]:
    steps = []
    if path is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line))
            except ValueError:
                steps.append({"step": "?", "status": "unreadable", "detail": line[:200]})
    return steps


def load_junit(name: str, path: Path) -> dict:
    """Counts and the failing tests of a pytest junit xml."""
    result: dict[str, Any] = {"name": name, "file": path.name}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        return {**result, "error": f"no readable results ({type(err).__name__})"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skip_reasons = [], {}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
            for tag in ("failure", "error"):
                node = case.find(tag)
                if node is not None:
                    message = (node.get("message") or "").splitlines()
                    failed.append(f"{test_id}: {message[0][:200] if message else tag}")
            node = case.find("skipped")
            if node is not None:
                reason = (node.get("message") or "").strip()[:120]
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**result, **counts, "passed": passed, "failed": failed, "skip_reasons": skip_reasons}


def load_sanitizer(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {"status": "not run"}
    text = path.read_text(errors="replace")
    summaries = [int(m) for m in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
    tests = re.findall(r"(\d+) passed", text)
    out: dict[str, Any] = {"log": path.name}
    if not summaries and "not supported" in text.lower():
        out["status"] = "unsupported on this machine"
    elif not summaries:
        out["status"] = "no summary (stopped before the end?)"
    else:
        out["status"] = "ok" if sum(summaries) == 0 else "errors"
        out["errors"] = sum(summaries)
    if tests:
        out["tests_passed"] = int(tests[-1])
    return out


# ------------------------------------------------------------------------------------------ figures


class Times:
    """Median times of benchmarks, preferring interleaved rounds measured beside another benchmark."""

    def __init__(self, benches: dict[str, dict]) -> None:
        self.benches = benches

    def has(self, *names: str) -> bool:
        return all(name in self.benches or self._interleaved_with(name) for name in names)

    def _interleaved_with(self, name: str) -> list[float] | None:
        for bench in self.benches.values():
            rounds = bench.get("extra_info", {}).get("interleaved", {})
            if rounds.get(name):
                return rounds[name]
        return None

    def own(self, name: str | None, beside: str | None = None) -> float | None:
        """Median time of ``name``: of its rounds interleaved with benchmark ``beside`` if that timed it,
        else of its own rounds (or of its interleaved rounds if it only ran there)."""
        if name is None:
            return None
        rounds = self.benches.get(beside or "", {}).get("extra_info", {}).get("interleaved", {}).get(name)
        if rounds:
            return statistics.median(rounds)
        if name in self.benches:
            return self.benches[name]["stats"]["median"]
        rounds = self._interleaved_with(name)
        return statistics.median(rounds) if rounds else None

    def ratio(self, a: str, b: str) -> float | None:
        """time(a) / time(b): from the rounds of one benchmark that timed both, else each one's own."""
        for bench in self.benches.values():
            rounds = bench.get("extra_info", {}).get("interleaved", {})
            if rounds.get(a) and rounds.get(b):
                return statistics.median(rounds[a]) / statistics.median(rounds[b])
        ta, tb = self.own(a), self.own(b)
        return ta / tb if ta and tb else None

    def rate(self, name: str, unit: str, work_of: str | None = None) -> float | None:
        """work per second of ``name`` in ``unit``, with the work declared by (and, where it timed
        ``name`` in its rounds, the time measured beside) benchmark ``work_of`` (default ``name``)."""
        source = self.benches.get(work_of or name)
        t = self.own(name, beside=work_of)
        if source is None or not t:
            return None
        amount = source.get("extra_info", {}).get("work", {}).get(unit)
        return amount / t if amount is not None else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def votes_figures(t: Times) -> dict | None:
    if "test_votes_ddrs" not in t.benches:
        return None
    extra = t.benches["test_votes_ddrs"]["extra_info"]
    return {
        "label": extra.get("label"),
        "rows_per_s": {
            name: _scale(t.rate(f"test_votes_{name}", "M rows/s", "test_votes_ddrs"), 1e6)
            for name in ("ddrs", "plain", "read")
        },
        "speedup_vs_plain": _inv(t.ratio("test_votes_ddrs", "test_votes_plain")),
        "fraction_of_read": _inv(t.ratio("test_votes_ddrs", "test_votes_read")),
    }


def soft_votes_figures(t: Times) -> dict:
    out = {}
    for mode in ("probabilities", "tangent"):
        name, plain = f"test_soft_votes_ddrs[{mode}]", f"test_soft_votes_plain[{mode}]"
        if name not in t.benches:
            continue
        out[mode] = {
            "label": t.benches[name]["extra_info"].get("label"),
            "rows_per_s": {
                "ddrs": _scale(t.rate(name, "M rows/s"), 1e6),
                "plain": _scale(t.rate(plain, "M rows/s", name), 1e6),
            },
            "speedup_vs_plain": _inv(t.ratio(name, plain)),
            "fraction_of_read": _inv(t.ratio(name, "test_votes_read")) if mode == "probabilities" else None,
        }
    return out


def noise_figures(t: Times) -> dict:
    out = {}
    names = [n for n in t.benches if n.startswith("test_noise_ddrs")]
    for name in names:
        suffix = name[len("test_noise_ddrs") :]
        dtype = suffix.strip("[]") or "float32"
        plain, randn = f"test_noise_plain{suffix}", f"test_noise_plain_randn_only{suffix}"
        fill, copy = f"test_noise_fill{suffix}", f"test_noise_copy{suffix}"
        out[dtype] = {
            "label": t.benches[name]["extra_info"].get("label"),
            "elements_per_s": {
                key: _scale(t.rate(n, "G values/s", name), 1e9)
                for key, n in (("ddrs", name), ("plain", plain), ("randn_only", randn), ("fill", fill))
            },
            "bytes_per_s": {
                key: _scale(t.rate(n, "GB/s written", name), 1e9)
                for key, n in (("ddrs", name), ("fill", fill), ("copy", copy))
            },
            "speedup_vs_plain": _inv(t.ratio(name, plain)),
            "fraction_of_fill": _inv(t.ratio(name, fill)),
        }
    return out


def certify_figures(t: Times) -> list[dict]:
    rows = []
    for name, bench in t.benches.items():
        if not name.startswith("test_certify_ddrs["):
            continue
        case = name[len("test_certify_ddrs[") : -1]
        extra = bench["extra_info"]
        plain, floor = extra.get("baseline"), extra.get("reference")
        syncs = extra.get("syncs")
        rows.append(
            {
                "case": case,
                "model": extra.get("model", case),
                "inputs": extra.get("inputs"),
                "n0": extra.get("n0"),
                "n": extra.get("n"),
                "batch_size": extra.get("batch_size"),
                "chunks": extra.get("chunks"),
                "seconds": {
                    "certify": t.own(name, beside=name),
                    "floor": t.own(floor, beside=name),
                    "plain": t.own(plain, beside=name),
                },
                "over_floor": t.ratio(name, floor),
                "speedup_vs_plain": _inv(t.ratio(name, plain)),
                "overhead_per_chunk_s": _per_chunk(t, name, floor, extra.get("chunks")),
                "syncs": syncs,
            }
        )
    return sorted(rows, key=lambda r: (r["model"], r["batch_size"] or 0))


def _per_chunk(t: Times, name: str, floor: str, chunks: int | None) -> float | None:
    ratio, floor_time = t.ratio(name, floor), t.own(floor, beside=name)
    if ratio is None or not floor_time or not chunks:
        return None
    return (ratio - 1) * floor_time / chunks


def memory_figures(t: Times) -> list[dict]:
    rows = []
    for name, bench in t.benches.items():
        if not name.startswith("test_memory_ddrs["):
            continue
        extra = bench["extra_info"]
        mode = name[len("test_memory_ddrs[") : -1]
        cpu = extra.get("cpu_memory")
        rows.append(
            {
                "mode": mode,
                "label": extra.get("label"),
                "seconds": {
                    "ddrs": t.own(name, beside=name),
                    "cpu": t.own(cpu, beside=name),
                    "plain": t.own("test_memory_plain", beside=name),
                },
                "gpu_over_cpu": t.ratio(name, cpu) if cpu else None,
                "speedup_vs_plain": _inv(t.ratio(name, "test_memory_plain")),
            }
        )
    return rows


def _inv(v: float | None) -> float | None:
    return 1 / v if v else None


def _scale(v: float | None, factor: float) -> float | None:
    return v * factor if v is not None else None


def targets(report: dict) -> list[dict]:
    out = []

    def add(description: str, value: float | None, bound: float, kind: str) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.append({"target": description, "bound": bound, "kind": kind, "value": None, "met": None})
            return
        met = value >= bound if kind == "min" else value <= bound
        # How far from the bound, as a factor (>1 means missed by that much).
        miss = bound / value if kind == "min" else value / bound
        out.append(
            {"target": description, "bound": bound, "kind": kind, "value": value, "met": met, "miss": miss}
        )

    if report.get("votes"):
        for key, description, bound, kind in VOTES_TARGETS:
            add(description, report["votes"][key], bound, kind)
    for mode, fig in report.get("soft_votes", {}).items():
        for key, description, bound, kind in SOFT_TARGETS:
            add(description.format(mode=mode), fig[key], bound, kind)
    for dtype, fig in report.get("noise", {}).items():
        for key, description, bound, kind in NOISE_TARGETS:
            add(description.format(dtype=dtype), fig[key], bound, kind)
    for row in report.get("certify", []):
        for key, description, bound, kind in CERTIFY_TARGETS:
            add(description.format(model=row["model"], batch=row["batch_size"]), row[key], bound, kind)
    for row in report.get("memory", []):
        if row["gpu_over_cpu"] is not None:
            for key, description, bound, kind in MEMORY_TARGETS:
                add(description.format(mode=row["mode"]), row[key], bound, kind)
    return out


def _name_and_path(spec: str) -> tuple[str, Path]:
    """NAME=PATH, or PATH alone (named by its stem)."""
    name, _, path = spec.rpartition("=")
    return name or Path(path).stem, Path(path)


def build_report(args: argparse.Namespace) -> dict:
    benches, machine, missing = load_benchmarks(args.bench_json or [])
    t = Times(benches)
    report: dict[str, Any] = {
        "format": "ddrs_ext.gpu_report",
        "version": 1,
        "env": load_json(args.env) or {},
        "machine_info": machine.get("ddrs", {}),
        "steps": load_steps(args.steps),
        "tests": [load_junit(*_name_and_path(spec)) for spec in (args.junit or [])],
        "sanitizer": load_sanitizer(args.sanitizer),
        "benchmark_files_missing": missing,
        "votes": votes_figures(t),
        "soft_votes": soft_votes_figures(t),
        "noise": noise_figures(t),
        "certify": certify_figures(t),
        "memory": memory_figures(t),
    }
    report["targets"] = targets(report)
    return report


# ------------------------------------------------------------------------------------------ markdown


def num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.{digits}g}"
    return f"{v:.{digits - 1}e}"


def giga(v: float | None) -> str:
    return "–" if v is None else f"{v / 1e9:.3g} G"


def tera_bytes(v: float | None) -> str:
    return "–" if v is None else f"{v / 1e12:.3g} TB/s"


def seconds(v: float | None) -> str:
    if v is None:
        return "–"
    sign, v = ("-" if v < 0 else ""), abs(v)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if v >= scale:
            return f"{sign}{v / scale:.3g} {unit}"
    return f"{sign}{v * 1e9:.0f} ns"


def ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}x"


def pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.0%}"


def markdown(report: dict) -> str:
    env, info = report["env"], report["machine_info"]
    gpu = info.get("gpu") or env.get("gpu") or {}
    out = ["# GPU check (.ci/gpu)", ""]
    lines = []
    if gpu:
        lines.append(
            f"GPU: {gpu.get('name', '?')} (compute capability {gpu.get('capability', '?')}, "
            f"{gpu.get('memory_gib', '?')} GiB, {gpu.get('multiprocessors', '?')} SMs)"
        )
    if env:
        lines.append(
            "; ".join(
                f"{k}: {env[k]}"
                for k in ("torch", "torch_cuda", "python", "nvcc", "cxx", "driver", "arch_list", "mode")
                if env.get(k)
            )
        )
    if info:
        lines.append(
            f"Benchmarks on {info.get('device', '?')}" + (" (quick sizes)" if info.get("quick") else "")
        )
    out += [line + "  " for line in lines] + [""]

    out += ["## Steps", "", "| step | status | seconds | detail |", "|---|---|---:|---|"]
    for s in report["steps"]:
        out.append(
            f"| {s.get('step')} | {s.get('status')} | {num(s.get('seconds'))} | {s.get('detail', '')} |"
        )
    if not report["steps"]:
        out.append("| – | no step log | | |")

    out += ["", "## Tests", ""]
    for r in report["tests"]:
        if "error" in r:
            out.append(f"- {r['name']}: {r['error']}")
            continue
        out.append(
            f"- {r['name']}: {r['passed']} passed, {r['failures']} failed, {r['errors']} errors, "
            f"{r['skipped']} skipped (of {r['tests']})"
        )
        out += [f"  - FAILED {f}" for f in r["failed"][:40]]
        out += [
            f"  - skipped ×{n}: {reason}"
            for reason, n in sorted(r["skip_reasons"].items(), key=lambda kv: -kv[1])[:8]
        ]
    if not report["tests"]:
        out.append("- no test results")
    san = report["sanitizer"]
    out += [
        "",
        f"compute-sanitizer memcheck: {san['status']}"
        + (f", {san['errors']} errors" if "errors" in san else "")
        + (f", {san['tests_passed']} tests passed under it" if "tests_passed" in san else ""),
    ]

    out += ["", "## Votes", ""]
    v = report["votes"]
    if v:
        r = v["rows_per_s"]
        out += [
            "| way | rows/s | time ratio |",
            "|---|---:|---:|",
            f"| ddrs_ext count_votes_ | {giga(r['ddrs'])} | 1 |",
            f"| plain max + index_add_ | {giga(r['plain'])} | {ratio(v['speedup_vs_plain'])} slower |",
            f"| plain read (sum) | {giga(r['read'])} | ddrs reaches {pct(v['fraction_of_read'])} of it |",
        ]
    else:
        out.append("not run")
    if report["soft_votes"]:
        out += [
            "",
            "| soft votes | ddrs rows/s | plain rows/s | speedup vs plain | fraction of read |",
            "|---|---:|---:|---:|---:|",
        ]
        for mode, f in report["soft_votes"].items():
            out.append(
                f"| {mode} | {giga(f['rows_per_s']['ddrs'])} | {giga(f['rows_per_s']['plain'])} | "
                f"{ratio(f['speedup_vs_plain'])} | {pct(f['fraction_of_read'])} |"
            )

    out += ["", "## Noise", ""]
    if report["noise"]:
        out += [
            "| dtype | ddrs elements/s | ddrs written | plain elements/s | randn alone | fill_ written "
            "| speedup vs plain | fraction of fill_ |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for dtype, f in report["noise"].items():
            e, b = f["elements_per_s"], f["bytes_per_s"]
            out.append(
                f"| {dtype} | {giga(e['ddrs'])} | {tera_bytes(b['ddrs'])} | {giga(e['plain'])} | "
                f"{giga(e['randn_only'])} | {tera_bytes(b['fill'])} | {ratio(f['speedup_vs_plain'])} | "
                f"{pct(f['fraction_of_fill'])} |"
            )
    else:
        out.append("not run")

    out += ["", "## certify", ""]
    if report["certify"]:
        out += [
            "| model | inputs × (n0 + n) | batch | chunks | certify | forward floor | plain loop "
            "| certify ÷ floor | speedup vs plain | overhead per chunk | syncs per call (debug mode) "
            "| blocking CUDA calls per call (profiler) | syncs per chunk |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in report["certify"]:
            s = c["seconds"]
            syncs = c["syncs"] or {}
            total, runtime = syncs.get("total"), syncs.get("runtime_total")
            most = max((v for v in (total, runtime) if v is not None), default=None)
            per_chunk = None if most is None or not c["chunks"] else most / c["chunks"]
            cells = [
                c["model"],
                f"{c['inputs']} × ({c['n0']} + {c['n']})",
                str(c["batch_size"]),
                str(c["chunks"]),
                seconds(s["certify"]),
                seconds(s["floor"]),
                seconds(s["plain"]),
                num(c["over_floor"], 4),
                ratio(c["speedup_vs_plain"]),
                seconds(c["overhead_per_chunk_s"]),
                "n/a" if total is None else str(total),
                "n/a" if runtime is None else str(runtime),
                "n/a" if per_chunk is None else num(per_chunk),
            ]
            out.append("| " + " | ".join(cells) + " |")
        where = {}
        for c in report["certify"]:
            for place, n in ((c["syncs"] or {}).get("where") or {}).items():
                where.setdefault(place, []).append(f"{c['case']}: {n}")
        if where:
            out += ["", "Where certify synchronises (innermost ddrs_ext frame: count per call, by case):", ""]
            out += [f"- `{place}`: {', '.join(counts)}" for place, counts in where.items()]
    else:
        out.append("not run")

    if report["memory"]:
        out += [
            "",
            "## CertificationMemory",
            "",
            "| calls | on the device | on the CPU | device ÷ CPU | speedup vs plain |",
            "|---|---:|---:|---:|---:|",
        ]
        for m in report["memory"]:
            s = m["seconds"]
            out.append(
                f"| {m['mode']} | {seconds(s['ddrs'])} | {seconds(s['cpu'])} | {ratio(m['gpu_over_cpu'])} | "
                f"{ratio(m['speedup_vs_plain'])} |"
            )

    out += ["", "## Targets", "", "| target | bound | measured | met |", "|---|---:|---:|:---:|"]
    for tg in report["targets"]:
        want = (">= " if tg["kind"] == "min" else "<= ") + num(tg["bound"])
        if tg["value"] is None:
            out.append(f"| {tg['target']} | {want} | not measured | |")
            continue
        met = "yes" if tg["met"] else f"**no** (missed by {tg['miss']:.2f}x)"
        out.append(f"| {tg['target']} | {want} | {num(tg['value'], 4)} | {met} |")
    if report["benchmark_files_missing"]:
        out += [
            "",
            f"Benchmark results missing or unreadable: {', '.join(report['benchmark_files_missing'])}",
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bench-json", type=Path, nargs="*", help="pytest-benchmark json files")
    parser.add_argument("--junit", nargs="*", help="NAME=PATH of pytest junit xml files")
    parser.add_argument("--steps", type=Path, help="the step log (json lines) of .ci/gpu")
    parser.add_argument("--env", type=Path, help="json: the machine and toolchain (.ci/gpu writes it)")
    parser.add_argument("--sanitizer", type=Path, help="the compute-sanitizer log")
    parser.add_argument("--out-json", type=Path, required=True)
    parser.add_argument("--out-md", type=Path, required=True)
    args = parser.parse_args(argv)
    report = build_report(args)
    args.out_json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = markdown(report)
    args.out_md.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
