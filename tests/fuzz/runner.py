"""Run fuzz cases fast and safely: one warm parent, one forked child per case.

The parent imports crossdistill and torch once (one thread); each case runs in a forked child
that gets its own session (so a timeout kills everything it started), an address-space limit
(an OOM is a MemoryError, not the kernel's killer), a file-size limit (a runaway error message
is cut off) and stdout/stderr redirected to files. The parent kills a child past its timeout.

Outcomes: ``ok`` (exit 0), ``clean-error`` (exit 2 and stderr is one line of at most
:data:`MAX_LINE` characters starting ``crossdistill: error:``), and the failures in
:data:`FAILURES`.
"""

from __future__ import annotations

import io
import os
import re
import resource
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import bases, corrupt
from .generate import Case

PASS = ("ok", "clean-error")
FAILURES = (
    "traceback", "traceback+exit2", "multi-line error", "long error", "internal error",
    "other exit", "hang", "killed", "accepted", "refused-valid", "ok-nonfinite",
)
MAX_LINE = 4096  # "a few KB" at most (issue #11)
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
PROGRESS = re.compile(r"^(epoch \d+/\d+  |training teacher \S+ once \(cached in )")
FRAME = re.compile(r'File "[^"]*?/crossdistill/([^"]+)", line (\d+), in (\S+)')
HEAVY = {"train/lm": "crossdistill.models.hf", "train/lm-kd": "crossdistill.models.hf",
         "train/av": "crossdistill.data.av", "train/av-kd": "crossdistill.data.av"}


@dataclass
class Result:
    case: Case
    outcome: str
    rc: int | None
    seconds: float
    detail: str = ""  # the error line, or the last traceback line
    frame: str = ""  # innermost crossdistill frame of a traceback
    stderr_bytes: int = 0

    def owner(self) -> str:
        """The likely owner area of a failure: the case's, refined by the traceback's frame."""
        if self.case.area in ("store", "training/NaN") or not self.frame:
            return self.case.area
        f = self.frame
        if f.startswith("teachers/"):
            return "store"
        if f.startswith("train/"):
            return "training/NaN"
        if f.startswith(("io.py", "data/", "cli.py", "text/", "condense/cli.py")):
            return "files/YAML/CLI"
        if f.startswith(("config.py", "schema", "models/", "losses/", "projectors", "methods/",
                         "build.py", "distiller.py", "taps.py", "registry.py", "condense/")):
            return "schema"
        return "other"


def warm(surfaces) -> None:
    """Import what the cases use once, in the parent (children inherit it by fork)."""
    import importlib

    import torch

    torch.set_num_threads(1)
    mods = ["crossdistill.cli", "crossdistill.build", "crossdistill.teachers.cli",
            "crossdistill.condense.cli", "crossdistill.condense.harness",
            "crossdistill.teachers.store", "safetensors.numpy"]
    mods += sorted({HEAVY[s] for s in surfaces if s in HEAVY})
    for m in mods:
        try:
            importlib.import_module(m)
        except Exception:  # noqa: BLE001  (a broken module shows up in the cases themselves)
            pass
    try:
        from crossdistill import cli, data

        cli._import_all()  # noqa: SLF001
        data.load("digits", "train", limit=20)
        with torch.device("meta"):  # shape dry runs import torch's decompositions lazily
            net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(),
                                      torch.nn.Linear(8, 2), torch.nn.LayerNorm(2))
            net(torch.zeros(1, 1, 4, 4))
    except Exception:  # noqa: BLE001
        pass


def warm_run(workdir: Path) -> None:
    """One valid ``train --check`` in the parent, output discarded: what a first run imports
    or caches lazily is then inherited by every child."""
    import contextlib

    d = workdir / "c" / "warm"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(_dump(bases.base("train/digits")[1]))
    cwd = os.getcwd()
    sink = io.StringIO()
    try:
        os.chdir(d)
        from crossdistill import cli

        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            cli.main(["train", "config.yaml", "--check", "--out", "out"])
    except BaseException:  # noqa: BLE001  (no --check yet, or a broken tree: the cases show it)
        pass
    finally:
        os.chdir(cwd)
        shutil.rmtree(d, ignore_errors=True)


class Runner:
    def __init__(self, workdir: str | Path, *, timeout: float = 20.0, mem_gb: float = 6.0,
                 fsize_mb: int = 64, keep_failures: bool = True):
        self.work = Path(workdir).resolve()
        self.fx, self.cache = self.work / "fx", self.work / "cache"
        for d in (self.fx / "cfg", self.cache, self.work / "log", self.work / "c"):
            d.mkdir(parents=True, exist_ok=True)
        self._link(self.work / "runs" / "cache", self.cache)
        self.timeout, self.keep = timeout, keep_failures
        self.mem, self.fsize = int(mem_gb * 2**30), fsize_mb * 2**20
        self.built: set[str] = set()
        self.has_check: bool | None = None

    @staticmethod
    def _link(at: Path, to: Path) -> None:
        at.parent.mkdir(parents=True, exist_ok=True)
        if not at.is_symlink():
            at.symlink_to(to, target_is_directory=True)

    # -- fixtures ------------------------------------------------------------------------------
    def fixture(self, name: str) -> None:
        if name in self.built:
            return
        if name == "mnist":
            bases.write_mnist(self.fx / "mnist")
        else:
            argv, cfg, deps = bases.FIXTURE_RUNS[name]
            for d in deps:
                self.fixture(d)
            from .generate import dump

            (self.fx / "cfg" / f"{name}.yaml").write_text(dump(cfg))
            rc, _, err, _ = self.fork(argv, self.work, f"fixture-{name}", timeout=300)
            if rc != 0:
                raise RuntimeError(f"fixture {name} failed (rc {rc}):\n{err[-3000:]}")
        self.built.add(name)

    def detect_check(self) -> bool:
        """Whether ``crossdistill train --check`` exists (validate + build + one step)."""
        if self.has_check is None:
            d = self.work / "c" / "detect-check"
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.yaml").write_text(_dump(bases.base("train/digits")[1]))
            rc, _, _, _ = self.fork(["train", "config.yaml", "--check", "--out", "out"], d,
                                     "detect-check", timeout=120)
            self.has_check = rc == 0
            shutil.rmtree(d, ignore_errors=True)
        return self.has_check

    # -- one case ------------------------------------------------------------------------------
    def fork(self, argv, cwd: Path, tag: str, timeout: float):
        out, err = self.work / "log" / f"{tag}.out", self.work / "log" / f"{tag}.err"
        env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if SHARED_DATA.is_dir():
            env["CROSSDISTILL_DATA"] = str(SHARED_DATA)
        sys.stdout.flush()
        sys.stderr.flush()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _child(argv, cwd, out, err, env, self.mem, self.fsize)
        status, delay, hung = None, 0.002, False
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            if time.monotonic() - t0 > timeout:
                hung = True
                _killpg(pid)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(delay)
            delay = min(delay * 1.5, 0.05)
        _killpg(pid)  # anything it left running (e.g. a launched torch.distributed.run)
        secs = time.monotonic() - t0
        text, size = _read(err)
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        if hung:
            return "hang", secs, text, size
        if os.WIFSIGNALED(status):
            return f"signal {signal.Signals(os.WTERMSIG(status)).name}", secs, text, size
        return os.WEXITSTATUS(status), secs, text, size

    def prepare(self, case: Case) -> Path:
        """The case's directory: its files, its corruptions, links to the fixtures."""
        for n in case.needs:
            self.fixture(n)
        d = self.work / "c" / (case.id or "case")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        self._link(d / "fx", self.fx)
        self._link(d / "runs" / "cache", self.cache)
        for rel, data in case.files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
        corrupt.apply(case.ops, d, self.fx, self.cache)
        return d

    def run(self, case: Case) -> Result:
        d = self.prepare(case)
        argv = list(case.argv)
        checked = case.check and self.detect_check()
        if checked:
            argv.insert(2, "--check")
        rc, secs, err, size = self.fork(argv, d, case.id, self.timeout)
        res = classify(case, rc, err, size, secs)
        if res.outcome == "ok" and not checked and _nonfinite(d):
            res.outcome, res.detail = "ok-nonfinite", "written weights hold NaN/inf"
        if self.keep and res.outcome in FAILURES:
            self._keep(case, d, argv)
        shutil.rmtree(d, ignore_errors=True)
        return res

    def _keep(self, case: Case, d: Path, argv) -> None:
        """Keep a failing case's input files (not its outputs) under WORKDIR/fail/ID."""
        keep = self.work / "fail" / case.id
        keep.mkdir(parents=True, exist_ok=True)
        for rel in case.files:
            if (d / rel).is_file() and (d / rel).stat().st_size < 2**20:
                shutil.copyfile(d / rel, keep / Path(rel).name)
        (keep / "argv.txt").write_text(" ".join(argv) + f"\n# {case.mutation}\n")


def _child(argv, cwd, out, err, env, mem, fsize) -> None:
    rc = 1
    try:
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.chdir(cwd)
        os.environ.update(env)
        nul = os.open(os.devnull, os.O_RDONLY)
        os.dup2(nul, 0)
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdin = open(os.devnull)  # noqa: SIM115
        sys.stdout, sys.stderr = (
            io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",
                             errors="backslashreplace", write_through=True)
            for fd in (1, 2)
        )
        from crossdistill import cli

        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse, or a command's own sys.exit
        if e.code is None or isinstance(e.code, int):
            rc = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            rc = 1
    except BaseException:  # noqa: BLE001  (what a user would see: a traceback, exit 1)
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
        rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
        os._exit(rc if isinstance(rc, int) and 0 <= rc < 256 else 1)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path, cap: int = 64 * 1024) -> tuple[str, int]:
    """The head and tail of a (possibly huge) file, and its size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(cap)
            tail = b""
            if size > 2 * cap:
                f.seek(size - cap)
                tail = b"\n[...]\n" + f.read()
            elif size > cap:
                tail = f.read()
        return (head + tail).decode("utf-8", "backslashreplace"), size
    except OSError:
        return "", 0


def _nonfinite(d: Path) -> bool:
    """True when a weights file the run wrote holds NaN or inf."""
    import numpy as np
    from safetensors.numpy import load_file

    for root, _, names in os.walk(d):  # does not follow the fx / runs/cache links
        for n in names:
            p = Path(root) / n
            if n.endswith(".safetensors") and p.stat().st_size < 50 * 2**20:
                try:
                    arrays = load_file(str(p))
                except Exception:  # noqa: BLE001
                    continue
                if any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in arrays.values()):
                    return True
    return False


def message_lines(err: str) -> list[str]:
    """The non-empty stderr lines, less the run's own progress lines (``epoch 1/3  loss ...``
    once training has started, ``training teacher ... once``): what a clean error leaves
    is its one ``crossdistill: error:`` line."""
    return [ln for ln in err.splitlines() if ln.strip() and not PROGRESS.match(ln)]


def classify(case: Case, rc, err: str, size: int, secs: float) -> Result:
    frames = FRAME.findall(err)
    frame = f"{frames[-1][0]}:{frames[-1][1]} {frames[-1][2]}" if frames else ""
    lines = message_lines(err)
    has_tb = "Traceback (most recent call last)" in err
    tb_last = next((ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Exit|"
                    r"Interrupt|Warning)?\b.*", ln) and not ln.startswith(("crossdistill:",
                    " ", "["))), lines[-1] if lines else "")
    if rc == "hang":
        return Result(case, "hang", None, secs, f"no exit in {secs:.0f}s", frame, size)
    if isinstance(rc, str):
        return Result(case, "killed", None, secs, rc + (f"; {tb_last}" if lines else ""), frame,
                      size)
    if has_tb:
        out = "traceback+exit2" if rc == 2 else "traceback"
        return Result(case, out, rc, secs, tb_last[:300], frame, size)
    if rc == 0:
        if case.expect == "error":
            return Result(case, "accepted", 0, secs, "exit 0 on input that must be refused",
                          frame, size)
        return Result(case, "ok", 0, secs, "", "", size)
    if rc == 2:
        first = lines[-1] if lines else ""
        if len(lines) == 1 and first.startswith("crossdistill: error:"):
            if len(first) > MAX_LINE or size > 16 * MAX_LINE:
                return Result(case, "long error", 2, secs, f"{size} bytes: {first[:200]}...",
                              "", size)
            if case.expect == "ok":
                return Result(case, "refused-valid", 2, secs, first[:300], "", size)
            return Result(case, "clean-error", 2, secs, first[:300], "", size)
        shown = " | ".join(ln[:150] for ln in lines[:3])
        return Result(case, "multi-line error", 2, secs, f"{len(lines)} lines: {shown}", "",
                      size)
    if rc == 1:
        return Result(case, "internal error", 1, secs, " | ".join(lines[-2:])[:300], frame, size)
    return Result(case, "other exit", rc, secs, f"exit {rc}: " + " | ".join(lines[-2:])[:300],
                  frame, size)


def _dump(cfg) -> str:
    from .generate import dump

    return dump(cfg)


def run_cases(cases, workdir, *, timeout: float = 20.0, mem_gb: float = 6.0, progress=None):
    """Run every case (building the fixtures they need); returns the results in order."""
    import torch

    threads = torch.get_num_threads()
    warm({c.surface for c in cases})
    runner = Runner(workdir, timeout=timeout, mem_gb=mem_gb)
    warm_run(runner.work)
    results = []
    try:
        for i, c in enumerate(cases):
            results.append(runner.run(c))
            if progress:
                progress(i, results[-1])
    finally:
        torch.set_num_threads(threads)
    return results, runner


# -- summaries ---------------------------------------------------------------------------------
def summarize(results, runner=None) -> dict:
    counts = Counter(r.outcome for r in results)
    by_surface: dict[str, Counter] = {}
    for r in results:
        by_surface.setdefault(r.case.surface, Counter())[r.outcome] += 1
    fails = [r for r in results if r.outcome in FAILURES]
    groups: dict[str, dict[str, list]] = {}
    for r in fails:
        groups.setdefault(r.owner(), {}).setdefault(r.outcome, []).append(r)
    return {
        "cases": len(results),
        "outcomes": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "passed": sum(counts[o] for o in PASS),
        "failed": len(fails),
        "check_mode": None if runner is None else runner.has_check,
        "seconds": round(sum(r.seconds for r in results), 1),
        "by_surface": {s: dict(c) for s, c in sorted(by_surface.items())},
        "failures": {
            area: {
                out: [
                    {"id": r.case.id, "surface": r.case.surface, "mutation": r.case.mutation,
                     "argv": " ".join(r.case.argv), "detail": r.detail, "frame": r.frame}
                    for r in rs
                ]
                for out, rs in sorted(outs.items())
            }
            for area, outs in sorted(groups.items())
        },
    }


def table(summary: dict) -> str:
    """The outcome counts as a table: one row per outcome, one column per surface."""
    surfaces = list(summary["by_surface"])
    outs = list(summary["outcomes"])
    short = [s.replace("train/", "t/") for s in surfaces]
    w = max([len(o) for o in outs] + [7])
    head = f"{'outcome':{w}s} {'total':>6s} " + " ".join(f"{s:>10s}" for s in short)
    rows = [head, "-" * len(head)]
    for o in outs:
        cells = " ".join(f"{summary['by_surface'][s].get(o, 0) or '':>10}" for s in surfaces)
        rows.append(f"{o:{w}s} {summary['outcomes'][o]:6d} {cells}")
    rows.append(f"{'cases':{w}s} {summary['cases']:6d}   ({summary['passed']} passed, "
                f"{summary['failed']} failed, {summary['seconds']}s, --check "
                f"{'used' if summary['check_mode'] else 'not available: real 1-epoch runs'})")
    return "\n".join(rows)
