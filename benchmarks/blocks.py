"""The driver every block benchmark shares (``benchmarks/vl.py``, ``benchmarks/dense.py``).

A benchmark ``<prefix>.py`` is a list of blocks, each a module ``benchmarks/<prefix>_<block>
.py`` with one interface (``BLOCK``, ``METHODS``, ``BASELINE``, ``METRIC``, ``EXTRA``,
``PROFILES``, ``teachers(P, cache)``, ``run(method, seed, P, cache)``, ``CLAIMS``; optional
``COST`` (seconds per cell, for scheduling the longest first), ``SCALES`` and ``ROWS``: the
table's rows when a cell also returns rows of other methods, under ``"also"``, e.g. a peer
trained side by side in the same worker, and ``notes(rows, P)``). The driver trains each
block's teachers once (cached by a hash of the block's profile), runs every cell (block x
method x seed) on a pool of single-thread workers, and writes one table per block, the
baseline plateau check, the claims (held / not held, with the gains and whether they clear
the seeds' spread), ``benchmarks/results/<prefix>.json`` and ``docs/results/<prefix>.md``.
Finished cells are recorded as they end, so a killed or ``--max-minutes``-cut run resumes.

In every cell the checkpoint (and any test-time setting) is chosen on the validation split
and the test split is read once. A claim is judged only where each of its baselines (the
``b`` of every pair it compares, and the block's BASELINE) plateaued: its val metric's range
over the last 20 % of epochs within 0.5 points (benchmarks/verdicts.py).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from hetero import _pool, cache_key  # noqa: E402  (the benchmarks' shared helpers)
from verdicts import compare, lookup, parity, plateau_of, unjudged, verdict  # noqa: E402

from crossdistill.report import aggregate, format_table, pm  # noqa: E402


def available(prefix: str, names) -> dict:
    """The block modules ``<prefix>_<name>`` present (a missing or broken one is reported,
    not fatal)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.import_module(f"{prefix}_{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{prefix}_{name}":
                print(f"block {name}: cannot import ({err})", file=sys.stderr)
        except Exception as err:  # a broken block is reported, the others still run
            print(f"block {name}: cannot import ({type(err).__name__}: {err})", file=sys.stderr)
    return out


def profile(mod, quick: bool) -> dict:
    return copy.deepcopy(mod.PROFILES["quick" if quick else "full"])


def block_key(block: str, P: dict, version: int = 1) -> str:
    return cache_key({"block": block, "P": P, "v": version})


# -- workers ------------------------------------------------------------------------------
def _quiet() -> None:
    os.environ["CROSSDISTILL_QUIET"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _work(item):
    kind, prefix, block, payload, P, cache, deadline = item
    _quiet()
    torch.set_num_threads(1)
    mod = importlib.import_module(f"{prefix}_{block}")
    if kind == "teacher":
        t0 = time.time()
        meta = mod.teachers(P, Path(cache)) or {}
        return ("teacher", block), {"meta": meta, "wall_seconds": time.time() - t0}
    method, seed = payload
    if deadline and time.time() > deadline:
        return (block, method, seed), None
    t0 = time.time()
    try:
        row = mod.run(method, seed, P, Path(cache))
    except Exception as err:  # one broken cell must not sink the benchmark
        import traceback

        row = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(-4)}
    row.update(block=block, method=method, seed=seed, seconds=time.time() - t0)
    for r in row.get("also", []):
        r.update(block=block, seed=seed)
    return (block, method, seed), row


def expand(row: dict) -> list[dict]:
    """A cell's row and the rows of other methods it returned (``"also"``)."""
    return [{k: v for k, v in row.items() if k != "also"}, *row.get("also", [])]


# -- summaries ------------------------------------------------------------------------------
def metric_keys(mods: dict) -> list[str]:
    keys = {"seconds"}
    for mod in mods.values():
        keys.add(mod.METRIC[0])
        keys.update(k for k, _ in getattr(mod, "EXTRA", []))
    return sorted(keys)


def stats(rows: list[dict], mods: dict) -> list[dict]:
    return aggregate([r for r in rows if "error" not in r], by=["block", "method"],
                     metrics=metric_keys(mods))


def baselines(mod) -> list[str]:
    """The cells a block's claims are judged against: its BASELINE and each pair's ``b``
    (a block without a BASELINE runs fixed schedules from its paper: no plateau check)."""
    base = getattr(mod, "BASELINE", None)
    if not base:
        return []
    out = [base, *(b for c in getattr(mod, "CLAIMS", []) for _, b in c["pairs"])]
    return list(dict.fromkeys(out))


def plateau(rows: list[dict], mods: dict) -> list[dict]:
    out = [plateau_of(rows, block, m) for block, mod in mods.items() for m in baselines(mod)]
    return [p for p in out if p is not None]


def claims(st, plat, mods: dict) -> list[dict]:
    checked = {(p["block"], p["method"]): p for p in plat}
    out = []
    for block, mod in mods.items():
        for c in getattr(mod, "CLAIMS", []):
            metric = c.get("metric") or mod.METRIC[0]
            higher = c.get("higher", True)
            scale = dict(getattr(mod, "SCALES", {})).get(metric, 100.0)
            unit = "points" if scale == 100.0 else ""
            res = [compare(st, block, a, b, metric, higher, scale) for a, b in c["pairs"]]
            measured = parity(res) if c.get("parity") else verdict(res)
            bases = [checked.get((block, b)) for _, b in c["pairs"]] if baselines(mod) else []
            ev = [f"{a} vs {b}: {r[0]:+.2f} {unit or metric.removeprefix('test_')}"
                  for (a, b), r in zip(c["pairs"], res) if r is not None]
            out.append(dict(block=block, method=c["name"], claim=c["text"], metric=metric,
                            verdict=unjudged(measured, bases), evidence=ev))
    return out


def tables(st, mods: dict, seeds: int) -> str:
    parts = []
    for block, mod in mods.items():
        metric, header, scale = mod.METRIC
        extra = list(getattr(mod, "EXTRA", []))
        head = ["method", header, *[h for _, h in extra], "s/run"]
        body = []
        for m in getattr(mod, "ROWS", mod.METHODS):
            r = lookup(st, block, m, metric)
            if r is None:
                continue
            line = [m, pm(r[0], r[1], scale) + (f" (n={r[2]})" if r[2] != seeds else "")]
            for key, _ in extra:
                x = lookup(st, block, m, key)
                line.append(pm(x[0], x[1], dict(getattr(mod, "SCALES", {})).get(key, scale))
                            if x else "-")
            s = lookup(st, block, m, "seconds")
            line.append(f"{s[0]:.0f}" if s else "-")
            body.append(line)
        if body:
            parts.append(f"{block}\n" + format_table(head, body))
    return "\n\n".join(parts)


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [
        f"# {cfg['title']}",
        "",
        f"Generated by `benchmarks/{cfg['prefix']}.py`"
        + (" **--quick (smoke run: not a result)**" if cfg["quick"] else "")
        + f". Wall time {res['wall_seconds'] / 60:.1f} min"
        + (" (" + " + ".join(f"{w / 60:.1f}" for w in res["invocation_wall_seconds"])
           + ": resumed from its record)" if len(res["invocation_wall_seconds"]) > 1 else "")
        + f", {cfg['workers']} worker(s) x 1 "
        f"thread; mean +- std over {cfg['seeds']} seed(s); checkpoints and test-time settings "
        "chosen on val, test read once. Metrics in % unless marked.",
        "",
        *([f"**Incomplete: {len(res['runs_not_run'])} of {res['runs_planned']} runs not run "
           "(past --max-minutes; a rerun resumes them).**", ""] if res["runs_not_run"] else []),
        "```",
        res["table"],
        "```",
        "",
        "## Baseline plateau (each claim's baselines: val metric range over the last 20 % of "
        "epochs, worst seed)",
        "",
        "| block | baseline | epochs | range (points) | plateaued |",
        "|---|---|---|---|---|",
    ]
    for p in res["plateau"]:
        lines.append(f"| {p['block']} | {p['method']} | {p['epochs']} | "
                     f"{p['range_points']:.2f} | {p['plateaued']} |")
    lines += ["", "## Claims", "", "| block | method | claim | verdict | evidence |",
              "|---|---|---|---|---|"]
    for c in res["claims"]:
        lines.append(f"| {c['block']} | {c['method']} | {c['claim']} | {c['verdict']} | "
                     f"{'; '.join(c['evidence'])} |")
    lines += ["", "## Teachers and sources", ""]
    for name, meta in res["teachers"].items():
        shown = {k: round(v, 4) if isinstance(v, float) else v
                 for k, v in (meta.get("meta") or {}).items()}
        lines.append(f"- {name} ({meta.get('wall_seconds', 0):.0f} s): {shown}")
    for name, text in res.get("notes", {}).items():
        lines += ["", f"### {name}", "", text]
    for r in res.get("failed", []):
        lines.append(f"- FAILED {r['block']}/{r['method']} seed {r['seed']}: {r['error']}")
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------
def main(prefix: str, names, title: str, argv=None, version: int = 1) -> int:
    """The command line of a block benchmark ``benchmarks/<prefix>.py`` whose blocks are the
    modules ``benchmarks/<prefix>_<name>.py`` (see the module doc)."""
    mods_all = available(prefix, names)
    ap = argparse.ArgumentParser(description=title)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed (< 5 min)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--blocks", nargs="+", default=list(mods_all), choices=list(mods_all))
    ap.add_argument("--cache", default=str(ROOT / "runs/cache"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args(argv)
    mods = {b: mods_all[b] for b in args.blocks}
    seeds = args.seeds or (1 if args.quick else 3)
    Ps = {b: profile(m, args.quick) for b, m in mods.items()}
    sub = f"runs/{prefix}-quick" if args.quick else None
    args.out = args.out or str(
        ROOT / (f"{sub}/{prefix}.json" if sub else f"benchmarks/results/{prefix}.json")
    )
    args.md = args.md or str(ROOT / (f"{sub}/{prefix}.md" if sub else f"docs/results/{prefix}.md"))
    _quiet()
    cache = Path(args.cache).resolve()
    t_start = time.time()
    deadline = t_start + 60 * args.max_minutes if args.max_minutes else None
    jobs = [(b, m, s) for s in range(seeds) for b, mod in mods.items() for m in mod.METHODS]
    partial = cache.parent / prefix / f"{Path(args.out).stem}.partial.jsonl"
    done = {}
    if partial.exists() and not args.fresh:
        for line in partial.read_text().splitlines():
            rec = json.loads(line)
            b = rec["job"][0]
            if b in Ps and rec.get("profile") == block_key(b, Ps[b], version):
                done[tuple(rec["job"])] = rec["row"]
    rows = [r for j in jobs if j in done for r in expand(done[j])]
    # what earlier invocations of this record measured: their wall times (a resumed run
    # reports the sum) and the teachers they trained (not retrained on resume)
    record = partial.with_suffix(".record.json")
    before = json.loads(record.read_text()) if record.exists() and not args.fresh and done \
        else {"walls": [], "teachers": {}}
    # longest first (a block's COST hints, seconds per cell): a long cell started last would
    # leave the other workers idle at the end
    todo = sorted((j for j in jobs if j not in done),
                  key=lambda j: -dict(getattr(mods[j[0]], "COST", {})).get(j[1], 0.0))
    print(f"{len(jobs)} runs ({len(todo)} to do) in blocks {', '.join(mods)}", flush=True)
    teacher_meta, failed, skipped = {}, [], []
    bar = tqdm(total=len(todo), desc=prefix, dynamic_ncols=True, disable=None)
    with _pool(args.workers, 1) as pmap:
        phases = [  # teachers first (each block's cells read them from the cache)
            [("teacher", prefix, b, None, Ps[b], str(cache), None) for b in mods
             if any(j[0] == b for j in todo)],
            [("run", prefix, b, (m, s), Ps[b], str(cache), deadline) for b, m, s in todo],
        ]
        for phase in phases:
            for job, row in pmap(_work, phase):
                if job[0] == "teacher":
                    teacher_meta[job[1]] = row
                    tqdm.write(f"teachers of {job[1]}: {row['wall_seconds']:.0f} s")
                    continue
                bar.update(1)
                if row is None:
                    skipped.append(job)
                    continue
                if "error" in row:
                    failed.append(row)
                    tqdm.write(f"{job} FAILED: {row['error']}")
                    continue
                rows += expand(row)
                partial.parent.mkdir(parents=True, exist_ok=True)
                with partial.open("a") as f:
                    key = block_key(job[0], Ps[job[0]], version)
                    f.write(json.dumps({"job": list(job), "profile": key, "row": row},
                                       default=str) + "\n")
                metric = mods[job[0]].METRIC[0]
                tqdm.write(f"{job[0]:>9} {job[1]:>18} seed {job[2]}: {metric} "
                           f"{row.get(metric, float('nan')):.4f} ({row['seconds']:.0f} s)")
    bar.close()
    notes = {}
    for b, mod in mods.items():  # a block may derive columns across its cells (in place)
        fn = getattr(mod, "notes", None)
        if fn is not None:
            text = fn([r for r in rows if r["block"] == b and "error" not in r], Ps[b])
            if text:
                notes[b] = text
    st = stats(rows, mods)
    plat = plateau(rows, mods)
    walls = [*before["walls"], time.time() - t_start]
    teacher_meta = {**before["teachers"], **teacher_meta}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"walls": walls, "teachers": teacher_meta}, default=str))
    res = dict(
        config=dict(title=title, prefix=prefix, quick=args.quick, workers=args.workers,
                    seeds=seeds, profiles=Ps,
                    blocks=list(mods), torch=torch.__version__,
                    python=platform.python_version()),
        wall_seconds=sum(walls),
        invocation_wall_seconds=walls,
        sum_run_seconds=sum(r.get("seconds", 0.0) for r in rows),
        teachers=teacher_meta,
        cells=st,
        plateau=plat,
        claims=claims(st, plat, mods),
        table=tables(st, mods, seeds),
        notes=notes,
        failed=failed,
        runs_planned=len(jobs),
        runs_not_run=[list(j) for j in skipped],
        runs=rows,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(md)
    print(md)
    return 1 if failed else 0
