"""Tabulates the scaling run: criterion's estimates for `benches/scaling.rs` and the server run of
drive.py, against the targets. Writes OUT/results.md and OUT/results.json and prints the markdown.

    python3 loadtest/scale/report.py target/scale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DIMENSIONS = [
    ("keys", "subscription keys", [10, 1_000, 10_000, 100_000]),
    ("cidrs", "CIDRs in the IP filter", [10, 100, 1_000, 10_000]),
    ("apis", "APIs (request matches the last)", [10, 100, 1_000]),
    ("providers_warm", "identity providers, token cached", [1, 10, 50]),
    ("providers_cold", "identity providers, signature verified", [1, 10, 50]),
]
RATIO_TARGET = 1.2
RSS_TARGET_MIB = 64
RELOAD_TARGET_MS = 250
KEYS_RELOAD_TARGET_MS = 50


def criterion(root: Path) -> dict:
    out = {}
    for dim, label, sizes in DIMENSIONS:
        rows = []
        for n in sizes:
            f = root / "criterion" / "scaling" / dim / str(n) / "new" / "estimates.json"
            if not f.exists():
                continue
            est = json.loads(f.read_text())
            rows.append({"size": n, "median_ns": est["median"]["point_estimate"]})
        if rows:
            base = rows[0]["median_ns"]
            for r in rows:
                r["ratio"] = r["median_ns"] / base
            out[dim] = {"label": label, "rows": rows, "max_ratio": max(r["ratio"] for r in rows),
                        "meets_target": max(r["ratio"] for r in rows) <= RATIO_TARGET}
    return out


def fmt_ns(ns: float) -> str:
    return f"{ns / 1e3:.2f} µs" if ns >= 1e3 else f"{ns:.0f} ns"


def fmt(v, spec=".1f") -> str:
    return "–" if v is None else format(v, spec)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "target/scale")
    target_dir = out.parent
    results: dict = {"decision": criterion(target_dir)}
    for key, name in [("server", "server.json"), ("server_malloc_tuned", "server-malloc-tuned.json")]:
        if (out / name).exists():
            results[key] = json.loads((out / name).read_text())
    gen_f = out / "generated.json"
    if gen_f.exists():
        results["generated"] = json.loads(gen_f.read_text())

    md = ["# Scaling run", ""]
    if results["decision"]:
        md += ["## Decision time as the policy grows (criterion, in-process `PolicySet::decide`, median)", "",
               f"Target: the largest size within {RATIO_TARGET}x of the smallest.", "",
               "| dimension | size | median | ratio to smallest |", "|---|---:|---:|---:|"]
        for dim, d in results["decision"].items():
            for r in d["rows"]:
                md.append(f"| {d['label']} | {r['size']:,} | {fmt_ns(r['median_ns'])} | {r['ratio']:.2f}x |")
            md.append(f"| **{d['label']}: worst ratio** | | | **{d['max_ratio']:.2f}x {'✅' if d['meets_target'] else '❌'}** |")
        md.append("")
    for key, title in [("server", "glibc malloc defaults"),
                       ("server_malloc_tuned", "MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072")]:
        if key in results:
            md += server_section(results[key], results.get("generated", {}), title)
    text = "\n".join(md)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(text)


def server_section(s: dict, g: dict, title: str) -> list[str]:
    md: list[str] = []
    if s:
        hwm_idle = s["rss_idle_kib"]["VmHWM"] / 1024
        hwm_end = s["rss_after_reloads_kib"]["VmHWM"] / 1024
        rl = s["reload"]
        base, during, win = s["baseline"], rl["checks_during_reload_phase"], rl["checks_while_compiling"]
        fails = during["failures"] + during["wrong_decisions"] + base["failures"] + base["wrong_decisions"]
        md += [f"## Largest policy, real server (`portcullis serve`, release build; {title})", "",
               f"Policy: {g.get('keys', '?'):,} subscription keys, {g.get('cidrs', '?'):,} CIDRs, "
               f"{g.get('apis', '?'):,} APIs, {g.get('providers', '?')} identity providers "
               f"(JWKS {g.get('jwks', '?')}); YAML {s['config_bytes'] / 1e6:.1f} MB.", "",
               "| measure | value | target |", "|---|---:|---:|",
               f"| load + compile at start (log `duration_ms`) | {fmt(s['start']['load_compile_ms'])} ms | |",
               f"| process start to gRPC listening | {fmt(s['start']['to_listening_ms'])} ms | |",
               f"| peak RSS (VmHWM) idle after start | {hwm_idle:.1f} MiB | ≤ {RSS_TARGET_MIB} MiB {'✅' if hwm_idle <= RSS_TARGET_MIB else '❌'} |",
               f"| RSS (VmRSS) after baseline traffic | {s['rss_after_traffic_kib']['VmRSS'] / 1024:.1f} MiB | |",
               f"| peak RSS (VmHWM) after traffic and {rl['count']} reloads | {hwm_end:.1f} MiB | ≤ {RSS_TARGET_MIB} MiB {'✅' if hwm_end <= RSS_TARGET_MIB else '❌'} |",
               f"| reload duration min / p50 / max | {fmt(rl['duration_ms']['min'])} / {fmt(rl['duration_ms']['p50'])} / {fmt(rl['duration_ms']['max'])} ms | ≤ {RELOAD_TARGET_MS} ms {'✅' if (rl['duration_ms']['max'] or 1e9) <= RELOAD_TARGET_MS else '❌'} |",
               f"| of which reading the file (p50) | {fmt(rl.get('load_ms_p50'))} ms | |",
               f"| CPU time of the reload thread (p50) | {fmt(rl.get('cpu_ms_p50'))} ms | |",
               f"| checks failed or wrongly decided (baseline + reload phases) | {fails} of {base['n'] + during['n']} | 0 {'✅' if fails == 0 else '❌'} |",
               "", "Checks at a constant rate (grpcio client, open loop; latency includes the Python client's own cost):", "",
               "| phase | checks | achieved rate | p50 | p99 | max |", "|---|---:|---:|---:|---:|---:|",
               f"| no reload | {base['n']} | {base['achieved_rps']:.0f}/s | {fmt(base['p50_ms'], '.2f')} ms | {fmt(base['p99_ms'], '.2f')} ms | {fmt(base['max_ms'], '.2f')} ms |",
               f"| {rl['count']} reloads during the phase | {during['n']} | {during['achieved_rps']:.0f}/s | {fmt(during['p50_ms'], '.2f')} ms | {fmt(during['p99_ms'], '.2f')} ms | {fmt(during['max_ms'], '.2f')} ms |",
               f"| sent while a reload was compiling | {win['n']} | | {fmt(win['p50_ms'], '.2f')} ms | {fmt(win['p99_ms'], '.2f')} ms | {fmt(win['max_ms'], '.2f')} ms |",
               ""]
        kr = s.get("keys_reload")
        if kr:
            kd, kc, kw = kr["duration_ms"], kr["checks_during_key_reloads"], kr["checks_while_reloading_keys"]
            hwm_keys = s["rss_after_key_reloads_kib"]["VmHWM"] / 1024
            kfails = kc["failures"] + kc["wrong_decisions"]
            md += [f"Keys in `subscriptions.keys_file` ({kr['keys_file_bytes'] / 1e6:.1f} MB), reloaded alone {kr['count']} times:", "",
                   "| measure | value | target |", "|---|---:|---:|",
                   f"| keys-file reload min / p50 / max | {fmt(kd['min'])} / {fmt(kd['p50'])} / {fmt(kd['max'])} ms | ≤ {KEYS_RELOAD_TARGET_MS} ms {'✅' if (kd['max'] or 1e9) <= KEYS_RELOAD_TARGET_MS else '❌'} |",
                   f"| CPU time of the reload thread (p50) | {fmt(kr.get('cpu_ms_p50'))} ms | |",
                   f"| peak RSS (VmHWM) after the key reloads | {hwm_keys:.1f} MiB | ≤ {RSS_TARGET_MIB} MiB {'✅' if hwm_keys <= RSS_TARGET_MIB else '❌'} |",
                   f"| checks failed or wrongly decided | {kfails} of {kc['n']} | 0 {'✅' if kfails == 0 else '❌'} |",
                   f"| checks during the phase p50 / p99 / max | {fmt(kc['p50_ms'], '.2f')} / {fmt(kc['p99_ms'], '.2f')} / {fmt(kc['max_ms'], '.2f')} ms | p99 ≤ 2x no-reload p99 ({fmt(2 * (base['p99_ms'] or 0), '.2f')} ms) {'✅' if (kc['p99_ms'] or 1e9) <= 2 * (base['p99_ms'] or 0) else '❌'} |",
                   f"| sent while a key reload ran: n, p99 | {kw['n']}, {fmt(kw['p99_ms'], '.2f')} ms | |",
                   ""]
        if rl.get("failure_samples"):
            md += ["Failures:", ""] + [f"- {x}" for x in rl["failure_samples"]] + [""]
        if s.get("precheck_errors"):
            md += ["Wrong answers before any load:", ""] + [f"- {x}" for x in s["precheck_errors"]] + [""]
    return md


if __name__ == "__main__":
    main()
