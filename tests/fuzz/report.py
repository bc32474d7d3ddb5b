"""The failures of a fuzz summary as markdown, grouped by likely owner area and outcome,
with up to three reproducers each (case id, surface, the config change, the error line)."""

from __future__ import annotations

from .runner import table


def findings_md(summary: dict, per_group: int = 3) -> str:
    out = [
        f"Seed {summary.get('seed')}, profile {summary.get('profile')}: "
        f"{summary['cases']} cases, {summary['passed']} passed, {summary['failed']} failed.",
        "",
        "```",
        table(summary),
        "```",
        "",
        "Reproduce a case: `.venv/bin/python -m tests.fuzz --n N --seed S --workdir W` keeps "
        "each failing case's input files and argv under `W/fail/<id>/` (case id = seed-index).",
    ]
    for area, outs in summary["failures"].items():
        total = sum(len(r) for r in outs.values())
        out += ["", f"### {area} ({total})"]
        for outcome, rows in outs.items():
            out.append(f"- **{outcome}** x{len(rows)}")
            seen = set()
            for r in rows:
                key = (r["detail"][:60], r["mutation"][:25])
                if key in seen:
                    continue
                seen.add(key)
                out.append(
                    f"  - `{r['id']}` {r['surface']}: `{r['mutation'][:100]}` -> "
                    f"`{r['detail'][:200]}`" + (f" ({r['frame']})" if r.get("frame") else "")
                )
                if len(seen) == per_group:
                    break
    return "\n".join(out) + "\n"
