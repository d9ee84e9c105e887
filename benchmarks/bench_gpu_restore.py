"""GPU restore pipeline: checkpoints into GPU memory, beside safetensors, same run, same card.

For each model size (bf16, transformer-shaped, generated on the GPU): a full save and a
dense step into a store in /dev/shm (page cache), then, each timed with its phases:

* ``Store.load(device="cuda")`` through the pipeline: latest after the full save (full
  chunks) and after the dense step (XOR deltas: bases read too);
* ``safetensors.torch.load_file(device="cuda")`` of the same weights (written by
  ``Store.restore`` into /dev/shm);
* the previous CPU-decoding load (``--old``), for the before/after table;
* hot restore of every block into the live tensors (``Store.restore_into``, only_changed
  False: back to the full save), and forward one dense step (live bases);
* read floors: every chunk object of the checkpoint read with the pipeline's reader,
  and the safetensors file read with 16 threads;
* frames: exponent planes of real chunks as one 512 KiB frame (today) against 128 and
  64 KiB frames, decoded in one nvCOMP batch (report only).

Every load is checked bit-exact: the loaded tensors' block digests (GPU kernel) must
equal the manifest's chunk ids.

    python benchmarks/bench_gpu_restore.py --sizes 16GiB --out benchmarks/results/gpu_restore.json

``--smoke`` runs tiny sizes on the CPU (checks the script only).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from apollo_cas import examples
from apollo_cas.cli.common import parse_size
from apollo_cas.gpu.blocks import byte_view, tensor_digests
from apollo_cas.gpu.restore import Arena, file_reader, object_reader
from apollo_cas.store import Store
from apollo_cas.targets.tensors import load_tensors, load_tensors_pipeline

GB = 1e9


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(size: int, dev: str) -> dict[str, torch.Tensor]:
    shape = examples.ModelShape.for_bytes(size)
    g = torch.Generator(device=dev).manual_seed(0)
    model = {}
    for name, s in shape.tensor_shapes().items():
        scale, shift = (0.05, 1.0) if name.endswith("norm.weight") else (0.02, 0.0)
        model[name] = (shift + scale * torch.randn(s, generator=g, device=dev)).to(torch.bfloat16)
    sync(dev)
    return model


def dense_step(model: dict[str, torch.Tensor], seed: int) -> None:
    g = torch.Generator(device=next(iter(model.values())).device).manual_seed(seed)
    for t in model.values():
        noise = torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32)
        t.copy_((t.float() * (1 + 1e-3 * noise)).to(t.dtype))


def exact(st: Store, ref: str, tensors: dict[str, torch.Tensor]) -> bool:
    """Block digests of ``tensors`` (GPU kernel) equal the manifest's chunk ids."""
    m = st.manifest(st.resolve(ref))
    names = [e.name for e in m.tensors]
    ds = tensor_digests([byte_view(tensors[n]) for n in names], m.block_size)
    return all(list(e.chunks) == d for e, d in zip(m.tensors, ds, strict=True))


def timed_load(st: Store, ref: str, dev: str, **options: Any) -> dict[str, Any]:
    try:
        return _timed_load(st, ref, dev, **options)
    except Exception as exc:  # keep the run going: the JSON says what failed
        import traceback

        traceback.print_exc()
        free(dev)
        return {"error": repr(exc), "seconds": float("nan")}


def _timed_load(st: Store, ref: str, dev: str, **options: Any) -> dict[str, Any]:
    m = st.manifest(st.resolve(ref))
    pipe = st.restore_pipeline(m.block_size, dev, **options)
    sync(dev)
    t0 = time.perf_counter()
    out = load_tensors_pipeline(pipe, m)
    sync(dev)
    dt = time.perf_counter() - t0
    ok = exact(st, ref, out)
    stats = pipe.stats.to_dict()
    pipe.close()
    del out
    free(dev)
    return {
        "seconds": round(dt, 4),
        "gb_per_s": round(m.logical_bytes / dt / GB, 2),
        "bit_exact": ok,
        "phases": stats,
    }


def free(dev: str) -> None:
    gc.collect()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()


def read_floor(st: Store, ref: str, workers: int, into_arena: bool) -> dict[str, Any]:
    """Every chunk object of ``ref`` read as new bytes, or into a reused arena."""
    m = st.manifest(st.resolve(ref))
    ids = list(dict.fromkeys(c for e in m.tensors for c in e.chunks))
    if into_arena:
        reader = file_reader(st.backend.root, workers)  # type: ignore[attr-defined]
    else:
        reader = object_reader(st.chunks.get_blob, workers)
    arena = Arena()
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(ids), 512):
        arena.reset(600 << 20)
        n += sum(len(b) for b in reader(ids[i : i + 512], arena if into_arena else None))
    dt = time.perf_counter() - t0
    return {
        "chunks": len(ids),
        "bytes": n,
        "seconds": round(dt, 4),
        "gb_per_s": round(n / dt / GB, 2),
    }


def file_read_floor(path: Path, threads: int = 16) -> dict[str, Any]:
    size = path.stat().st_size
    piece = 64 << 20
    bufs = [bytearray(piece) for _ in range(threads)]
    fd = os.open(path, os.O_RDONLY)
    offs = list(range(0, size, piece))
    lock = threading.Lock()

    def work(i: int) -> None:
        buf = memoryview(bufs[i])
        while True:
            with lock:
                if not offs:
                    return
                o = offs.pop()
            os.preadv(fd, [buf[: min(piece, size - o)]], o)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    os.close(fd)
    return {
        "bytes": size,
        "threads": threads,
        "seconds": round(dt, 4),
        "gb_per_s": round(size / dt / GB, 2),
    }


def frames_experiment(st: Store, ref: str, n_chunks: int) -> dict[str, Any]:
    """Exponent planes of real chunks: one 512 KiB frame vs 128 / 64 KiB frames on nvCOMP."""
    import numpy as np

    from apollo_cas.codecs import _zstd, planes
    from apollo_cas.gpu.zstd import NvcompFrames, nvcomp_available

    if not nvcomp_available():
        return {"skipped": "no nvCOMP"}
    m = st.manifest(st.resolve(ref))
    ids = [c for e in m.tensors for c in e.chunks if e.nbytes >= m.block_size][:n_chunks]
    exps = [planes.split(st.chunks.read(c), 2)[0][1] for c in ids]
    plane = len(exps[0])
    stream = torch.cuda.Stream()
    dec = NvcompFrames(torch.device("cuda", 0), stream)
    out: dict[str, Any] = {"chunks": len(ids), "plane_bytes": plane}
    for frame in (plane, 128 << 10, 64 << 10):
        frames = [
            _zstd.compress_plane(p[o : o + frame], 1) for p in exps for o in range(0, plane, frame)
        ]
        offs, pos = [], 0
        for f in frames:
            offs.append(pos)
            pos = -(-(pos + len(f)) // 16) * 16
        host = np.zeros(pos, dtype=np.uint8)
        for o, f in zip(offs, frames, strict=True):
            host[o : o + len(f)] = np.frombuffer(f, np.uint8)
        src = torch.from_numpy(host).cuda()
        sizes = [min(frame, plane - o) for _ in exps for o in range(0, plane, frame)]
        outs = torch.empty(len(exps) * plane, dtype=torch.uint8, device="cuda")
        o_offs = [i * plane + o for i in range(len(exps)) for o in range(0, plane, frame)]
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                keep = dec.decode(src, offs, [len(f) for f in frames], outs, o_offs, sizes)
            stream.synchronize()
            times.append(time.perf_counter() - t0)
            del keep
        ok = all(
            torch.equal(
                outs[i * plane : (i + 1) * plane].cpu(), torch.from_numpy(np.asarray(exps[i]))
            )
            for i in (0, len(exps) - 1)
        )
        stored = sum(len(f) for f in frames)
        med = statistics.median(times[1:])
        out[f"frame_{frame >> 10}KiB"] = {
            "frames": len(frames),
            "ratio": round(len(exps) * plane / stored, 4),
            "seconds_median": round(med, 5),
            "first_call_seconds": round(times[0], 5),
            "output_gb_per_s": round(len(exps) * plane / med / GB, 1),
            "exact": ok,
        }
        print(f"  frames {frame >> 10:4d} KiB: {out[f'frame_{frame >> 10}KiB']}", flush=True)
    return out


def run_size(size: int, dev: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    model = build_model(size, dev)
    logical = sum(t.numel() * t.element_size() for t in model.values())
    res["model"] = {
        "tensors": len(model),
        "bytes": logical,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    print(f"== model {logical / GB:.2f} GB, {len(model)} tensors", flush=True)
    st = Store.open(root / "store", create=True)
    t0 = time.perf_counter()
    r = st.save(model)
    res["save_full_seconds"] = round(time.perf_counter() - t0, 2)
    res["stored_full_bytes"] = r.stats.new_stored_bytes
    full = st.resolve("latest")
    print(
        f"full save {res['save_full_seconds']} s, stored {r.stats.new_stored_bytes / GB:.2f} GB",
        flush=True,
    )

    # safetensors of the same weights (written by our streaming writer), loaded by the library.
    from safetensors.torch import load_file

    st_dir = root / "st"
    st.restore(full, st_dir, max_shard_size=1 << 40)
    st_file = next(st_dir.glob("*.safetensors"))
    load_file(str(st_file), device=dev)  # warm (page cache, CUDA context)
    free(dev)
    sync(dev)
    t0 = time.perf_counter()
    ref = load_file(str(st_file), device=dev)
    sync(dev)
    res["safetensors_load_file_seconds"] = round(time.perf_counter() - t0, 4)
    del ref
    free(dev)
    res["read_floor_file_16_threads"] = file_read_floor(st_file)
    shutil.rmtree(st_dir)
    print(f"safetensors load_file {res['safetensors_load_file_seconds']} s", flush=True)

    res["read_floor_chunk_objects"] = read_floor(st, full, st.workers, False)
    res["read_floor_chunk_files_into_arena"] = read_floor(st, full, st.workers, True)
    print(f"read floor (objects as bytes): {res['read_floor_chunk_objects']}", flush=True)
    print(f"read floor (files into arena): {res['read_floor_chunk_files_into_arena']}", flush=True)
    first = timed_load(st, full, dev)
    res["load_full_first_call"] = first
    res["load_full"] = timed_load(st, full, dev)
    print(f"load full: first {first['seconds']} s, then {res['load_full']}", flush=True)
    if args.batch_sweep:
        for bb in (128 << 20, 1 << 30):
            res[f"load_full_batch_{bb >> 20}MiB"] = timed_load(st, full, dev, batch_bytes=bb)
            print(
                f"  batch {bb >> 20} MiB: {res[f'load_full_batch_{bb >> 20}MiB']['seconds']} s",
                flush=True,
            )
    if args.old:
        from apollo_cas.decoding import Decoder

        m = st.manifest(full)
        sync(dev)
        t0 = time.perf_counter()
        out = load_tensors(Decoder.for_store(st, m.logical_bytes), m, dev)
        sync(dev)
        res["load_full_old_cpu_decode_seconds"] = round(time.perf_counter() - t0, 3)
        del out
        free(dev)
        print(f"old CPU-decoding load: {res['load_full_old_cpu_decode_seconds']} s", flush=True)

    dense_step(model, 1)
    sync(dev)
    t0 = time.perf_counter()
    r = st.save(model)
    res["save_dense_seconds"] = round(time.perf_counter() - t0, 2)
    res["stored_dense_bytes"] = r.stats.new_stored_bytes
    dense = st.resolve("latest")
    print(
        f"dense save {res['save_dense_seconds']} s, stored {r.stats.new_stored_bytes / GB:.3f} GB",
        flush=True,
    )
    res["load_dense"] = timed_load(st, dense, dev)
    res["dense_over_full"] = round(res["load_dense"]["seconds"] / res["load_full"]["seconds"], 3)
    print(f"load dense: {res['load_dense']}", flush=True)

    # Hot restore into the live tensors: back to the full save (every block), forward again.
    for label, target, only in (
        ("hot_every_block_back", full, False),
        ("hot_forward_dense", dense, True),
    ):
        sync(dev)
        t0 = time.perf_counter()
        try:
            rep = st.restore_into(target, model, only_changed=only)
        except Exception as exc:
            res[label] = {"error": repr(exc), "seconds": float("nan")}
            continue
        sync(dev)
        dt = time.perf_counter() - t0
        res[label] = {
            "seconds": round(dt, 4),
            "report": rep.to_dict(),
            "bit_exact": exact(st, target, model),
        }
        print(
            f"{label}: {dt:.3f} s, {rep.blocks_written} blocks, exact {res[label]['bit_exact']}",
            flush=True,
        )
    if args.frames:
        res["frames"] = frames_experiment(st, full, args.frames)
    del model
    free(dev)
    st.close()
    shutil.rmtree(root, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16GiB")
    ap.add_argument("--dir", default="/dev/shm/apollo-bench-restore")
    ap.add_argument("--out", default="benchmarks/results/gpu_restore.json")
    ap.add_argument("--old", action="store_true", help="also time the previous CPU-decoding load")
    ap.add_argument("--frames", type=int, default=0, help="chunks for the frame-size experiment")
    ap.add_argument("--batch-sweep", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    args = ap.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "sizes": {},
    }
    sizes = ["8MiB"] if args.smoke else args.sizes.split(",")
    for s in sizes:
        result["sizes"][s] = run_size(parse_size(s), dev, Path(args.dir), args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        "\n| model | safetensors load_file | load full | load dense | dense/full | hot every block | hot fwd dense |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in result["sizes"].values():
        print(
            f"| {r['model']['bytes'] / GB:.1f} GB | {r['safetensors_load_file_seconds']:.3f} s | "
            f"{r['load_full']['seconds']:.3f} s | {r['load_dense']['seconds']:.3f} s | {r['dense_over_full']} | "
            f"{r['hot_every_block_back']['seconds']:.3f} s | {r['hot_forward_dense']['seconds']:.3f} s |"
        )


if __name__ == "__main__":
    main()
