"""apollo_cas side by side with the tools users would pick instead, on the same work.

    python benchmarks/compare.py                 # ~1 GiB models, 10-20 minutes on 2 cores
    python benchmarks/compare.py --size 4GiB     # scale up
    python benchmarks/compare.py --quick         # tiny smoke run (< 2 minutes), results in --dir

Tools (benchmarks/tools.py): apollo_cas through its CLI and its Python API, the
original apollo-checkpoint method, torch.save, safetensors save_file, restic
(default zstd "auto", and --compression max) and borg (default lz4, and
--compression zstd,3). Sequences (benchmarks/sequences.py): a generated
transformer in bf16 and in fp32 saved as full, (a) a few layers fine-tuned,
(b) norms and biases only, (c) a dense optimizer step, (d) nothing changed;
and real all-MiniLM-L6-v2 weights after each of a few Adam steps, fp32 and bf16.

For every tool and save: seconds, bytes on disk of its repository after the
save (allocated, as du counts), CPU seconds and peak memory of the child
process; then the time to restore the latest save (to a file for the file
tools, into memory for the in-process ones), with caches warm and, when
/proc/sys/vm/drop_caches is writable, cold. Every restore is checked against
the saved weights. Start-up times are measured separately.

Writes compare.json, compare.md and compare.png to --out (default
benchmarks/results; --quick defaults to the work directory so a smoke run
never overwrites the committed results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/ is a directory of scripts, not a package

import sequences as seqs  # noqa: E402
import tools as tl  # noqa: E402

from apollo_cas import examples  # noqa: E402
from apollo_cas.cli.common import human_bytes, parse_size  # noqa: E402

MiB = 1 << 20
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
#: The competitors the targets are stated against.
COMPETITORS = ("restic", "restic-max", "borg", "borg-zstd3")
#: "Incremental saves at least 5x faster when under 5% of blocks change."
SMALL_CHANGE = 0.05
SMALL_CHANGE_SPEEDUP = 5.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- environment ----------------------------------------------------------------------


def ensure_backup_tools(install: bool) -> list[str]:
    """Install restic and borg from Debian's packages if missing; return what is still missing."""
    need = {"restic": "restic", "borg": "borgbackup"}
    missing = [pkg for cmd, pkg in need.items() if not shutil.which(cmd)]
    if not missing:
        return []
    how = f"apt-get update && apt-get install -y {' '.join(missing)}"
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        log(f"installing {', '.join(missing)}: {how}")
        subprocess.run(["sh", "-c", how], check=False)
    else:
        log(f"missing {', '.join(missing)}; install with: sudo sh -c '{how}'")
    return [pkg for cmd, pkg in need.items() if not shutil.which(cmd)]


def snapshot_code(rev: str, work: Path) -> dict[str, Any]:
    """Export ``apollo_cas/`` at git ``rev`` into the work dir and run every child on it.

    The tree may change while a 20-minute run goes on (other commits, edits in
    progress); a snapshot makes one run measure one version of the code, named
    in the results. PYTHONPATH precedes the editable install's finder, for the
    ``apollo-cas`` script and the workers alike.
    """
    root = HERE.parent
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = work / "code"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", commit, "apollo_cas"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(dest), os.environ.get("PYTHONPATH", "")) if p
    )
    return {"code": "git", "rev": rev, "commit": commit, "path": str(dest)}


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache; False if not permitted here."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def prefault(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory and free it, right before a timed operation.

    Why: on this project's VMs, memory freed for a few seconds goes back to the
    host (free page reporting), and touching it again costs ~2.5 s per GiB,
    against ~0.2 s for pages freed a moment ago (see first_touch_probe). Without
    this, whichever tool allocates first after a pause pays for the VM, not for
    its own work. Costs ~0.2 s per GiB on hot memory; tool-neutral.
    """
    import numpy as np

    if nbytes > 0:
        a = np.ones(nbytes, dtype=np.uint8)
        del a


def first_touch_probe() -> dict[str, float]:
    """Seconds to touch 1 GiB of fresh memory: right after freeing some, and after 5 s idle."""
    import numpy as np

    out = {}
    for label, pause in (("hot", 0.0), ("after_5s_idle", 5.0), ("hot_again", 0.0)):
        time.sleep(pause)
        t0 = time.perf_counter()
        a = np.ones(1 << 30, dtype=np.uint8)
        out[label] = round(time.perf_counter() - t0, 3)
        del a
    return out


def environment(work: Path, tools: list[tl.Tool]) -> dict[str, Any]:
    import numpy
    import torch

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    df = subprocess.run(["df", "-T", str(work)], capture_output=True, text=True).stdout.splitlines()
    disk = df[-1].split()[:2] if len(df) > 1 else ["?", "?"]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "work_dir": str(work),
        "disk_device": disk[0],
        "filesystem": disk[1],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "tools": {t.key: t.version() for t in tools},
        "load_average_start": os.getloadavg(),
    }


def startup_times(tools: list[tl.Tool], repeat: int) -> dict[str, dict[str, Any]]:
    """Median wall time of each tool doing nothing (its start-up), after one warm-up run."""
    out: dict[str, dict[str, Any]] = {}
    cmds: dict[str, list[str]] = {}
    for t in tools:
        cmd = t.startup_cmd()
        if cmd is not None:
            cmds.setdefault(" ".join(cmd), cmd)
    for name, cmd in cmds.items():
        if repeat > 1:
            tl.run_measured(cmd)  # warm-up: the first start reads the program from disk
        walls = [tl.run_measured(cmd).wall_seconds for _ in range(repeat)]
        out[name] = {
            "seconds": round(statistics.median(walls), 4),
            "runs": [round(w, 4) for w in walls],
        }
        log(f"start-up {name}: {out[name]['seconds']:.3f}s")
    return out


# -- one sequence ---------------------------------------------------------------------


def run_sequence(
    seq: seqs.Sequence,
    tools: list[tl.Tool],
    work: Path,
    cold: bool,
    cold_restore: bool,
    prefault_factor: int,
    checkpoint: Callable[[], None],
    record: dict[str, Any],
) -> None:
    """Save every version with every tool, then restore the latest; fill ``record``."""
    seq_dir = work / seq.name
    shutil.rmtree(seq_dir, ignore_errors=True)
    src_dir = seq_dir / "source"
    src_dir.mkdir(parents=True)
    src = src_dir / "model.safetensors"
    for t in tools:
        t.prepare(seq_dir)
    record.update(
        name=seq.name,
        title=seq.title,
        dtype=seq.dtype,
        notes=seq.notes,
        versions=[],
        tools={
            t.key: {
                "label": t.label,
                "family": t.family,
                "timing": t.timing,
                "restore_to": t.restore_to,
                "saves": [],
                "restore": {},
            }
            for t in tools
        },
    )
    prev: dict[str, Any] | None = None
    expected = src_digest = ""
    for step, v in enumerate(seq.versions(), start=1):
        t0 = time.perf_counter()
        changes = seqs.change_stats(prev, v.weights) if prev is not None else None
        examples.write_safetensors(v.weights, str(src), seq.dtype)
        os.sync()  # the source's writeback must not land in the first tool's timing
        expected = tl.digest_arrays(v.weights)
        src_digest = tl.digest_file(src)
        logical = seqs.logical_bytes(v.weights)
        record["versions"].append(
            {
                "label": v.label,
                "description": v.description,
                "logical_bytes": logical,
                "changes": changes,
            }
        )
        record["logical_bytes"] = logical
        log(
            f"{seq.name} {v.label}: {v.description}; {human_bytes(logical)}"
            + (
                f", {changes['elements']:.2%} of elements, {changes['blocks']:.2%} of 1 MiB blocks"
                if changes
                else ""
            )
            + f" (prepared in {time.perf_counter() - t0:.1f}s)"
        )
        for t in tools:
            if cold:
                drop_caches()
            prefault(prefault_factor * logical)
            load = os.getloadavg()[0]
            op = t.save(src, step)
            os.sync()  # untimed: a tool that never fsyncs must not bill the next one
            alloc, apparent = t.stored_bytes()
            entry = {
                "label": v.label,
                **op.to_json(),
                "bytes_on_disk": alloc,
                "apparent_bytes": apparent,
                "load1": round(load, 2),
            }
            record["tools"][t.key]["saves"].append(entry)
            log(
                f"  save {t.key:12s} {op.seconds:7.2f}s  on disk {human_bytes(alloc):>10s}  "
                f"rss {human_bytes(op.max_rss):>10s}  load {load:.1f}"
            )
        prev = v.weights
        checkpoint()
    del prev
    seq_logical = record.get("logical_bytes", 0)
    for t in tools:
        rec = record["tools"][t.key]
        rec["cache_bytes"] = t.cache_bytes()
        modes = ["warm"] + (["cold"] if cold_restore else [])
        for mode in modes:
            out = seq_dir / "restored" / t.key
            shutil.rmtree(out, ignore_errors=True)
            if mode == "cold":
                drop_caches()
            prefault(prefault_factor * seq_logical)
            load = os.getloadavg()[0]
            op = t.restore(out)
            want = src_digest if t.family in ("restic", "borg") else expected
            ok = op.digest == want
            rec["restore"][mode] = {**op.to_json(), "verified": ok, "load1": round(load, 2)}
            log(
                f"  restore {t.key:12s} {mode} {op.seconds:7.2f}s  rss {human_bytes(op.max_rss):>10s}"
                f"  {'verified' if ok else 'MISMATCH'}"
            )
            if not ok:
                raise RuntimeError(f"{t.key} restored something else than what was saved")
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
        checkpoint()
    for t in tools:
        t.cleanup()
    shutil.rmtree(seq_dir, ignore_errors=True)


# -- targets --------------------------------------------------------------------------


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 6 per sequence: the measured ratio and whether it is met."""
    rows: list[dict[str, Any]] = []
    for seq in results["sequences"]:
        tools = seq.get("tools", {})
        if "apollo-cli" not in tools:
            continue
        ours = tools["apollo-cli"]
        api = tools.get("apollo-api")
        changes = [v["changes"] for v in seq["versions"]]
        for comp in COMPETITORS:
            if comp not in tools or not tools[comp]["saves"]:
                continue
            theirs = tools[comp]
            # Bytes: after every save, apollo_cas' store is no larger.
            pairs = list(zip(ours["saves"], theirs["saves"], strict=False))
            worst = min(b["bytes_on_disk"] / max(1, a["bytes_on_disk"]) for a, b in pairs)
            final = pairs[-1][1]["bytes_on_disk"] / max(1, pairs[-1][0]["bytes_on_disk"])
            rows.append(
                {
                    "target": "bytes",
                    "sequence": seq["name"],
                    "vs": comp,
                    "ratio": round(final, 3),
                    "worst_step_ratio": round(worst, 3),
                    "met": worst >= 1.0,
                    "detail": "their bytes on disk / ours, after the last save "
                    "(worst: after any save)",
                }
            )
            # Save time, every save; incremental saves with < 5% blocks changed need 5x.
            for i, (a, b) in enumerate(pairs):
                small = i > 0 and changes[i] is not None and changes[i]["blocks"] < SMALL_CHANGE
                need = SMALL_CHANGE_SPEEDUP if small else 1.0
                r = b["seconds"] / max(a["seconds"], 1e-9)
                row = {
                    "target": "save",
                    "sequence": seq["name"],
                    "vs": comp,
                    "step": a["label"],
                    "ratio": round(r, 2),
                    "need": need,
                    "met": r >= need,
                    "detail": "their save seconds / ours (apollo-cas CLI, process start included)",
                }
                if api is not None and i < len(api["saves"]):
                    ra = b["seconds"] / max(api["saves"][i]["seconds"], 1e-9)
                    row["api_ratio"] = round(ra, 2)
                    row["api_met"] = ra >= need
                rows.append(row)
            # Restore: the latest, to a file, warm and cold.
            for mode, ra in ours["restore"].items():
                rb = theirs["restore"].get(mode)
                if rb is None:
                    continue
                r = rb["seconds"] / max(ra["seconds"], 1e-9)
                rows.append(
                    {
                        "target": "restore",
                        "sequence": seq["name"],
                        "vs": comp,
                        "caches": mode,
                        "ratio": round(r, 2),
                        "met": r > 1.0,
                        "detail": "their restore seconds / ours (both to a file)",
                    }
                )
    return rows


# -- reporting ------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / MiB:,.0f}" if n >= 10 * MiB else f"{n / MiB:,.1f}"


def _secs(s: float) -> str:
    return f"{s:.2f}" if s < 10 else f"{s:.1f}"


def _code_name(code: dict[str, Any]) -> str:
    return f"at commit {code['commit'][:12]}" if code.get("commit") else "as installed"


def markdown(results: dict[str, Any]) -> str:
    """compare.md: the main table, what changed per step, the targets, start-up."""
    env = results["env"]
    cfg = results["config"]
    lines = [
        "# apollo_cas vs. the alternatives",
        "",
        f"Generated by `{cfg['command']}` on {results['started']}, apollo_cas "
        f"{_code_name(cfg.get('apollo_cas', {}))} "
        f"({env['cores']} cores, {env['cpu']}, {human_bytes(env['memory_bytes'])} RAM, "
        f"{env['filesystem']} on {env['disk_device']}; load average at start "
        f"{env['load_average_start'][0]:.1f}"
        + (
            f"; touching 1 GiB of fresh memory: {env['first_touch_1GiB_s']['hot']:.2f} s "
            f"hot, {env['first_touch_1GiB_s']['after_5s_idle']:.2f} s after 5 s idle"
            if "first_touch_1GiB_s" in env
            else ""
        )
        + f"; memory prefaulted before each operation: {'yes' if cfg.get('prefault_factor') else 'no'}"
        + "). Saves ran with caches "
        f"{'cold (dropped before each save)' if cfg['cold'] else 'warm'}; restores are shown "
        f"warm{' / cold (page cache dropped first)' if cfg['cold_restore'] else ''}. "
        "See docs/BENCHMARKS.md for what each number means.",
        "",
        "Save seconds are per save, in order (full, then the next versions); CLI tools "
        "(apollo-cas, restic, borg) include process start-up, in-process tools (marked *) "
        "time the call only. Stored MiB is the repository's size on disk after each save. "
        "Restore: the latest save, to a file (CLI tools) or into memory (*). Peak memory: max "
        "RSS of the child process for save / restore, with its peak of anonymous memory in "
        "parentheses (for * tools: the extra over the weights the process already held).",
        "",
    ]
    head = (
        "| sequence | tool | save s (each save) | stored MiB (after each save) | "
        "restore s (warm" + (" / cold" if cfg["cold_restore"] else "") + ") | "
        "peak MiB (save / restore) |"
    )
    lines += [head, "|---|---|---|---|---|---|"]
    for seq in results["sequences"]:
        labels = " / ".join(v["label"] for v in seq["versions"])
        first = True
        for rec in seq["tools"].values():
            if not rec["saves"]:
                continue
            star = "*" if rec["timing"] == "in-process" else ""
            saves = " / ".join(_secs(s["seconds"]) for s in rec["saves"])
            stored = " / ".join(_mib(s["bytes_on_disk"]) for s in rec["saves"])
            rest = " / ".join(_secs(r["seconds"]) for r in rec["restore"].values())
            if rec["timing"] == "in-process":
                save_mem = max(s["extra_rss"] or 0 for s in rec["saves"])
                rest_mem = max([r["extra_rss"] or 0 for r in rec["restore"].values()], default=0)
                mem = f"+{_mib(save_mem)} / +{_mib(rest_mem)}"
            else:
                # Max RSS counts the pages of files a tool maps (apollo-cas maps its
                # source); the anonymous peak in parentheses is what it allocated.
                def peak(ops: list[dict[str, Any]]) -> str:
                    if not ops:
                        return "-"
                    rss = max(o["max_rss"] for o in ops)
                    anon = max(o["peak_anon"] for o in ops)
                    return f"{_mib(rss)} ({_mib(anon)})"

                mem = f"{peak(rec['saves'])} / {peak(list(rec['restore'].values()))}"
            name = (
                f"**{seq['title']}** ({human_bytes(seq['logical_bytes'])}; {labels})"
                if first
                else ""
            )
            first = False
            lines.append(f"| {name} | {rec['label']}{star} | {saves} | {stored} | {rest} | {mem} |")
    lines += [
        "",
        "## CPU seconds",
        "",
        "User + system CPU time of each save and of the warm restore, all threads: less "
        "sensitive than wall time to other work on a shared machine (load average at each "
        "operation is in compare.json).",
        "",
        "| sequence | tool | save CPU s (each save) | restore CPU s (warm) |",
        "|---|---|---|---|",
    ]
    for seq in results["sequences"]:
        for rec in seq["tools"].values():
            if not rec["saves"]:
                continue
            star = "*" if rec["timing"] == "in-process" else ""
            cpu = " / ".join(_secs(s["cpu_seconds"]) for s in rec["saves"])
            warm = rec["restore"].get("warm")
            rcpu = _secs(warm["cpu_seconds"]) if warm else "-"
            lines.append(f"| {seq['name']} | {rec['label']}{star} | {cpu} | {rcpu} |")
    lines += [
        "",
        "## What changed at each save",
        "",
        "| sequence | save | what | elements changed | 1 MiB blocks changed "
        "(bytes in them) | 4 KiB blocks of weights.bin changed |",
        "|---|---|---|---|---|---|",
    ]
    for seq in results["sequences"]:
        for v in seq["versions"]:
            c = v["changes"]
            if c is None:
                lines.append(
                    f"| {seq['name']} | {v['label']} | {v['description']} | all (first) | | |"
                )
            else:
                lines.append(
                    f"| {seq['name']} | {v['label']} | {v['description']} | "
                    f"{c['elements']:.2%} | {c['blocks']:.2%} ({c['block_bytes']:.2%}) | "
                    f"{c['flat_blocks']:.2%} |"
                )
    lines += ["", "## Targets (issue 6)", "", *target_lines(results["targets"]), ""]
    lines += ["## Start-up (median of 5, wall seconds)", "", "| command | seconds |", "|---|---|"]
    for cmd, r in results["startup"].items():
        lines.append(f"| `{cmd}` | {r['seconds']:.3f} |")
    lines.append("")
    return "\n".join(lines)


def target_lines(targets: list[dict[str, Any]]) -> list[str]:
    """One row per (target, sequence, competitor): the ratio, worst case, met or not."""
    out = ["| target | sequence | vs | ratio (theirs / ours) | met |", "|---|---|---|---|---|"]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for t in targets:
        groups.setdefault((t["target"], t["sequence"], t["vs"]), []).append(t)
    for (target, seq, vs), rows in groups.items():
        if target == "bytes":
            r = rows[0]
            text = f"{r['ratio']:.2f}x after the last save (worst after any save {r['worst_step_ratio']:.2f}x)"
            met = r["met"]
        elif target == "save":
            parts = []
            for r in rows:
                mark = "" if r["met"] else " (missed)"
                need = f", need {r['need']:.0f}x" if r["need"] > 1 else ""
                api = f", API {r['api_ratio']:.1f}x" if "api_ratio" in r else ""
                parts.append(f"{r['step']} {r['ratio']:.1f}x{api}{need}{mark}")
            text = "; ".join(parts)
            met = all(r["met"] for r in rows)
        else:
            text = "; ".join(f"{r['caches']} {r['ratio']:.1f}x" for r in rows)
            met = all(r["met"] for r in rows)
        out.append(f"| {target} | {seq} | {vs} | {text} | {'yes' if met else '**no**'} |")
    return out


# -- main -----------------------------------------------------------------------------


def build_sequences(names: list[str], size: int, minilm_steps: int) -> list[seqs.Sequence]:
    cache: list[list[seqs.Weights]] = []

    def states() -> list[seqs.Weights]:
        if not cache:
            log(f"training MiniLM for {minilm_steps} Adam steps on CPU")
            cache.append(seqs.minilm_states(minilm_steps))
        return cache[0]

    out = []
    for name in names:
        if name == "generated-bf16":
            out.append(seqs.generated(size, seqs.BF16))
        elif name == "generated-fp32":
            out.append(seqs.generated(size, seqs.F32))
        elif name in ("minilm-fp32", "minilm-bf16"):
            if seqs.minilm_dir() is None:
                log(f"skipping {name}: pip install {seqs.MINILM_PIP}")
                continue
            out.append(seqs.minilm(seqs.F32 if name.endswith("fp32") else seqs.BF16, states))
        else:
            raise SystemExit(f"unknown sequence {name!r}")
    return out


def write_reports(results: dict[str, Any], out_dir: Path) -> None:
    """compare.md and compare.png from the results."""
    (out_dir / "compare.md").write_text(markdown(results))
    try:
        import plot

        plot.plot(results, out_dir / "compare.png")
    except ImportError as exc:
        log(f"no plot ({exc}); pip install matplotlib")


def render(json_path: Path, out_dir: Path | None) -> int:
    """Re-render the reports of an earlier run (targets re-evaluated from its numbers)."""
    results = json.loads(json_path.read_text())
    results["targets"] = evaluate(results)
    write_reports(results, out_dir or json_path.parent)
    log(f"wrote compare.md and compare.png next to {json_path}")
    return 0


ALL_SEQUENCES = ["generated-bf16", "generated-fp32", "minilm-fp32", "minilm-bf16"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1GiB", help="size of the generated models (default 1GiB)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 MiB models, one MiniLM step, fp32 MiniLM only, warm restores",
    )
    ap.add_argument(
        "--dir",
        default=None,
        help="work directory for sources and repositories "
        "(default: a new temporary directory; all on one disk)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="where to write compare.{json,md,png} "
        "(default benchmarks/results; with --quick, the work directory)",
    )
    ap.add_argument(
        "--tools",
        default=",".join(tl.DEFAULT_TOOLS),
        help=f"comma-separated tool keys (default {','.join(tl.DEFAULT_TOOLS)}; "
        f"all: {','.join(t.key for t in tl.all_tools())})",
    )
    ap.add_argument("--sequences", default=None, help=f"comma-separated, from {ALL_SEQUENCES}")
    ap.add_argument("--minilm-steps", type=int, default=None, help="Adam steps (default 3)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every save too")
    ap.add_argument(
        "--no-cold-restore",
        action="store_true",
        help="restore with warm caches only (the default with --quick)",
    )
    ap.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get install restic / borgbackup when missing",
    )
    ap.add_argument(
        "--no-prefault",
        action="store_true",
        help="do not touch 2x the model size of memory before each timed operation "
        "(see prefault() for why it is there)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--render",
        metavar="JSON",
        default=None,
        help="only rewrite compare.md and compare.png from an existing compare.json",
    )
    ap.add_argument(
        "--code",
        default="HEAD",
        help="git revision of apollo_cas to measure (exported to the work dir, so edits "
        "during the run do not mix in), or 'installed' for the installed package "
        "(default HEAD)",
    )
    args = ap.parse_args(argv)

    if args.render:
        return render(Path(args.render), Path(args.out) if args.out else None)
    size = parse_size("8MiB" if args.quick and args.size == "1GiB" else args.size)
    minilm_steps = args.minilm_steps or (1 if args.quick else 3)
    names = (
        args.sequences.split(",")
        if args.sequences
        else ["generated-bf16", "generated-fp32", "minilm-fp32"]
        if args.quick
        else ALL_SEQUENCES
    )
    wanted = args.tools.split(",")
    by_key = {t.key: t for t in tl.all_tools()}
    unknown = [k for k in wanted if k not in by_key]
    if unknown:
        ap.error(f"unknown tools {unknown}; choose from {sorted(by_key)}")
    if any(by_key[k].family in ("restic", "borg") for k in wanted):
        ensure_backup_tools(not args.no_install)
    tools: list[tl.Tool] = []
    for k in wanted:
        why = by_key[k].missing()
        if why:
            log(f"cannot run {k}: {why}")
            return 1
        tools.append(by_key[k])

    work = Path(args.dir or tempfile.mkdtemp(prefix="apollo-compare-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out) if args.out else (work if args.quick else HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    code: dict[str, Any] = {"code": "installed"}
    if args.code != "installed":
        try:
            code = snapshot_code(args.code, work)
        except (OSError, subprocess.CalledProcessError) as exc:
            log(f"cannot export apollo_cas at {args.code!r} ({exc}); pass --code installed")
            return 1
        log(
            f"measuring apollo_cas at {code['commit'][:12]} ({args.code}), exported to {code['path']}"
        )
    can_drop = drop_caches()
    cold_restore = can_drop and not (args.quick or args.no_cold_restore)
    prefault_factor = 0 if args.no_prefault else 2
    if args.cold and not can_drop:
        log("--cold needs root (writing /proc/sys/vm/drop_caches was refused)")
        return 1
    log(f"work dir {work} (sources and every repository on the same disk); results to {out_dir}")
    log(
        f"page cache can {'' if can_drop else 'NOT '}be dropped here: "
        f"restores {'warm and cold' if cold_restore else 'warm only'}"
    )

    results: dict[str, Any] = {
        "benchmark": "apollo_cas vs original method, torch.save, safetensors, restic, borg",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "command": "python benchmarks/compare.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "size": size,
            "quick": args.quick,
            "cold": args.cold,
            "drop_caches_permitted": can_drop,
            "cold_restore": cold_restore,
            "minilm_steps": minilm_steps,
            "prefault_factor": prefault_factor,
            "tools": wanted,
            "sequences": names,
            "apollo_cas": code,
        },
        "env": environment(work, tools),
        "startup": {},
        "sequences": [],
        "targets": [],
    }
    json_path = out_dir / "compare.json"

    def checkpoint() -> None:
        json_path.write_text(json.dumps(results, indent=1) + "\n")

    t_start = time.perf_counter()
    results["startup"] = startup_times(tools, repeat=1 if args.quick else 5)
    if not args.quick:
        results["env"]["first_touch_1GiB_s"] = first_touch_probe()
        log(f"first touch of 1 GiB of fresh memory: {results['env']['first_touch_1GiB_s']}")
    checkpoint()
    try:
        tl.InProcess.start_workers(tools)
        for seq in build_sequences(names, size, minilm_steps):
            record: dict[str, Any] = {}
            results["sequences"].append(record)
            run_sequence(
                seq, tools, work, args.cold, cold_restore, prefault_factor, checkpoint, record
            )
            checkpoint()
    finally:
        tl.InProcess.stop_workers()
        results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        results["env"]["load_average_end"] = os.getloadavg()
        results["targets"] = evaluate(results)
        checkpoint()
    write_reports(results, out_dir)
    if not args.keep and not args.quick and args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    log(
        f"done in {results['elapsed_s']:.0f}s: {json_path}, {out_dir / 'compare.md'}, "
        f"{out_dir / 'compare.png'}"
    )
    print("\n".join(target_lines(results["targets"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
