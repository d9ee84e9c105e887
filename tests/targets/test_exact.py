"""Exact restores through the real CLI (issue 19): a checkpoint saved from files
gives back those files, byte for byte, under the same names."""

from __future__ import annotations

import filecmp
import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apollo_cas import layout
from apollo_cas.filesets import MAX_GAP_BYTES
from apollo_cas.hashing import digest_hex
from apollo_cas.store import Store
from tests.damage import flip_last_byte

INDEX = "model.safetensors.index.json"


def cli_json(run_cli, *args):
    p = run_cli(*args, "--json")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return json.loads(p.stdout)


def fails(p, code: int, *words: str) -> str:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def save(run_cli, store, src, *extra):
    return cli_json(run_cli, "save", src, "--store", store, *extra)


def restore(run_cli, store, out, *extra):
    return cli_json(run_cli, "restore", *extra, "--store", store, "--to", out)


def assert_identical(saved_dir: Path, out: Path, names: list[str]) -> None:
    for n in names:
        assert filecmp.cmp(saved_dir / n, out / n, shallow=False), n
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # nothing else, no temporaries


def hand_file(
    path: Path,
    tensors: dict[str, tuple[str, list[int], bytes, int]],
    header: str,
    tail: bytes = b"",
    fill: bytes = b"\xab",
) -> None:
    """A safetensors file written by hand: ``header`` is the JSON text as it goes on
    disk (key order, spacing and padding as given); each tensor's bytes go at its
    data offset; bytes between them are ``fill``; ``tail`` follows the last one."""
    raw = header.encode()
    end = max((off + len(data) for _, _, data, off in tensors.values()), default=0)
    body = bytearray(fill * end)
    for _, _, data, off in tensors.values():
        body[off : off + len(data)] = data
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(body) + tail)


def entry(tensors, name: str) -> str:
    dtype, shape, data, off = tensors[name]
    return f'"dtype":"{dtype}", "shape": {shape},"data_offsets":[ {off}, {off + len(data)} ]'


def odd_tensors(contiguous: bool):
    a = torch.arange(3, dtype=torch.float32).numpy().tobytes()
    b = torch.randn(2, 3).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    c = bytes(range(5))
    if contiguous:  # c, a, b back to back from offset 0: loadable by the library
        return {
            "c": ("I8", [5], c, 0),
            "a": ("F32", [3], a, 5),
            "b": ("BF16", [2, 3], b, 17),
            "d": ("U8", [0], b"", 29),
        }
    # a 3-byte gap after c, a 9-byte gap before b
    return {
        "c": ("I8", [5], c, 0),
        "a": ("F32", [3], a, 8),
        "b": ("BF16", [2, 3], b, 29),
        "d": ("U8", [0], b"", 41),
    }


def odd_header(t) -> str:
    """Unsorted keys, __metadata__ in the middle with several keys, newlines and
    spaces, and trailing padding so the data starts at an odd offset."""
    text = (
        '{\n  "b": {' + entry(t, "b") + '},\n "__metadata__" : {"zeta":"1", "alpha":"two",'
        ' "format":"pt", "json":"{\\"x\\": [1, 2]}"},\n\t"a":{'
        + entry(t, "a")
        + '} , "d":{'
        + entry(t, "d")
        + '},"c": {'
        + entry(t, "c")
        + "}}"
    )
    text += " " * (-(len(text) + 8) % 8 + 3)  # data starts at 8k + 3
    assert (len(text) + 8) % 8 == 3
    return text


@pytest.fixture
def model(make_model):
    return make_model(layers=2, hidden=64)


# ---------------------------------------------------------------------------
# round trips


def test_single_file(
    run_cli, tmp_store, fast_tmp_dir, model, write_safetensors, assert_same_tensors
):
    src = write_safetensors(model, fast_tmp_dir / "in" / "weights-a.safetensors")
    save(run_cli, tmp_store, src, "--block-size", "64K")
    out = fast_tmp_dir / "out"
    res = restore(run_cli, tmp_store, out)
    assert res["exact"] is True and res["format"] == "safetensors"
    assert res["not_exact_because"] is None
    assert res["files"] == [str(out / "weights-a.safetensors")]  # the saved name
    assert_identical(src.parent, out, ["weights-a.safetensors"])
    assert_same_tensors(load_file(out / "weights-a.safetensors"), model)
    human = run_cli("restore", "--store", tmp_store, "--to", fast_tmp_dir / "h")
    assert human.returncode == 0 and "exact: the files as they were saved" in human.stdout


def test_sharded_directory_with_index(
    run_cli, tmp_store, fast_tmp_dir, model, write_safetensors, assert_same_tensors
):
    src = fast_tmp_dir / "in"
    write_safetensors(model, src, shards=3)
    names = sorted(p.name for p in src.iterdir())
    save(run_cli, tmp_store, src, "--block-size", "4K")
    out = fast_tmp_dir / "out"
    (out).mkdir()
    (out / "model.safetensors").write_bytes(b"stale output of an older restore")
    res = restore(run_cli, tmp_store, out)
    assert res["exact"] is True
    assert Path(res["files"][-1]).name == INDEX  # the file naming the others comes last
    assert_identical(src, out, names)  # the stale single file is gone, as in a rewritten restore
    got = {}
    for n in names:
        if n != INDEX:
            got.update(load_file(out / n))
    assert_same_tensors(got, model)


def test_hand_written_header_with_metadata_and_odd_alignment(run_cli, tmp_store, fast_tmp_dir):
    src = fast_tmp_dir / "in" / "odd.safetensors"
    src.parent.mkdir()
    t = odd_tensors(contiguous=True)
    hand_file(src, t, odd_header(t))
    want = load_file(src)  # the library accepts it
    save(run_cli, tmp_store, src, "--block-size", "4K")
    out = fast_tmp_dir / "out"
    assert restore(run_cli, tmp_store, out)["exact"] is True
    assert_identical(src.parent, out, ["odd.safetensors"])
    got = load_file(out / "odd.safetensors")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_gaps_between_tensors_are_refused_as_the_format_does(run_cli, tmp_store, fast_tmp_dir):
    # safetensors' reference parser refuses data ranges with gaps and trailing
    # bytes (issue 11, item 8), so such a file is not saved at all: there is no
    # "exact" form of a file the format forbids. Holes are legal in the original
    # tool's weights.bin; test_exact_record covers those.
    src = fast_tmp_dir / "in" / "gappy.safetensors"
    src.parent.mkdir()
    t = odd_tensors(contiguous=False)
    hand_file(src, t, odd_header(t), tail=b"trailing bytes no tensor owns")
    p = run_cli("save", src, "--store", tmp_store)
    fails(p, 1, "inconsistent offsets")


def test_too_many_uncovered_bytes_refuse_exact_with_the_reason(
    run_cli, tmp_store, fast_tmp_dir, write_seed_checkpoint, make_model
):
    d = write_seed_checkpoint(fast_tmp_dir / "in" / "2025-01-01-0000", make_model(layers=1))
    index = json.loads((d / "weights.json").read_text())
    blob = (d / "weights.bin").read_bytes()
    first = min(index, key=lambda n: index[n]["offset"])
    hole = MAX_GAP_BYTES + 1  # more bytes no tensor owns than a record keeps
    for e in index.values():
        e["offset"] += hole
    (d / "weights.bin").write_bytes(b"\x00" * hole + blob)
    (d / "weights.json").write_text(json.dumps(index))
    save(run_cli, tmp_store, d, "--block-size", "4K")
    out = fast_tmp_dir / "out"
    res = restore(run_cli, tmp_store, out)
    assert res["exact"] is False and "not covered by tensors" in res["not_exact_because"]
    assert res["format"] == "flat" and first in json.loads((out / "weights.json").read_text())
    p = run_cli("restore", "--exact", "--store", tmp_store, "--to", fast_tmp_dir / "o2")
    fails(p, 2, "--exact", "not covered by tensors")


def test_original_tool_directory(
    run_cli, tmp_store, fast_tmp_dir, model, write_seed_checkpoint, assert_same_tensors
):
    src = write_seed_checkpoint(fast_tmp_dir / "in" / "2025-03-01-1200", model)
    save(run_cli, tmp_store, src, "--block-size", "4K")
    out = fast_tmp_dir / "out"
    res = restore(run_cli, tmp_store, out)  # no --format: the saved form
    assert res["exact"] is True and res["format"] == "flat"
    assert [Path(p).name for p in res["files"]] == ["weights.bin", "weights.json"]
    assert_identical(src, out, ["weights.bin", "weights.json"])
    assert restore(run_cli, tmp_store, fast_tmp_dir / "f", "--format", "flat")["exact"] is True

    st = restore(run_cli, tmp_store, fast_tmp_dir / "st", "--format", "safetensors")
    assert st["exact"] is False and "--format safetensors" in st["not_exact_because"]
    assert_same_tensors(load_file(st["files"][0]), model)


def test_original_tool_history(run_cli, tmp_store, fast_tmp_dir, make_model, write_seed):
    seeds = write_seed(fast_tmp_dir / "root", [make_model(seed=i) for i in range(2)])
    p = run_cli("save", seeds.root, "--store", tmp_store, "--block-size", "4K")
    assert p.returncode == 0, p.stderr
    with Store.open(tmp_store) as st:
        ids = [c.checkpoint_id for c in st.checkpoints()]
    assert len(ids) == 2
    for cid, d in zip(ids, seeds.dirs, strict=True):
        out = fast_tmp_dir / f"out-{cid[:8]}"
        assert restore(run_cli, tmp_store, out, cid)["exact"] is True
        assert_identical(d, out, ["weights.bin", "weights.json"])


def test_transformers_loads_an_exact_restore(run_cli, tmp_store, fast_tmp_dir, assert_same_tensors):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    src = fast_tmp_dir / "hf"
    model.save_pretrained(src, max_shard_size="10KB")  # shards + index, as transformers writes them
    weights = sorted(p.name for p in src.iterdir() if "safetensors" in p.name)
    assert INDEX in weights and len(weights) > 2
    save(run_cli, tmp_store, src, "--block-size", "4K")
    out = fast_tmp_dir / "out"
    assert restore(run_cli, tmp_store, out)["exact"] is True
    assert_identical(src, out, weights)  # config.json is not a weight file: not restored
    shutil.copy(src / "config.json", out / "config.json")
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert_same_tensors(loaded.state_dict(), model.state_dict())


# ---------------------------------------------------------------------------
# when the exact form is not the default


def test_options_that_ask_for_another_form(
    run_cli, tmp_store, fast_tmp_dir, model, write_safetensors
):
    src = write_safetensors(model, fast_tmp_dir / "in" / "model.safetensors")
    save(run_cli, tmp_store, src, "--block-size", "4K")
    for extra, why in [
        (["--max-shard-size", "100KB"], "--max-shard-size"),
        (["--layout", "hf"], "--layout hf"),
        (["--format", "flat"], "--format flat"),
        (["--no-exact"], "--no-exact"),
    ]:
        out = fast_tmp_dir / ("o" + extra[0])
        res = restore(run_cli, tmp_store, out, *extra)
        assert res["exact"] is False and why in res["not_exact_because"], extra
    # the rewritten single file is today's form: another header, same tensors
    assert not filecmp.cmp(src, fast_tmp_dir / "o--no-exact" / "model.safetensors", shallow=False)
    for extra in (["--layout", "hf"], ["--format", "flat"], ["--max-shard-size", "1MB"]):
        p = run_cli("restore", "--exact", *extra, "--store", tmp_store, "--to", fast_tmp_dir / "x")
        fails(p, 2, "--exact cannot be honoured", extra[0])
    assert not (fast_tmp_dir / "x").exists()


def test_exact_of_tensors_from_memory_is_an_error(run_cli, tmp_store, fast_tmp_dir, model):
    with Store.open(tmp_store, create=True) as st:
        st.save(model, block_size=4096)
    p = run_cli("restore", "--exact", "--store", tmp_store, "--to", fast_tmp_dir / "o")
    fails(p, 2, "--exact", "saved from mapping, not files")
    res = restore(run_cli, tmp_store, fast_tmp_dir / "o")
    assert res["exact"] is False and "not files" in res["not_exact_because"]
    assert [Path(p).name for p in res["files"]] == ["model.safetensors"]


def test_checkpoint_saved_before_records_restores_as_before(
    run_cli, tmp_store, fast_tmp_dir, model, write_safetensors
):
    src = write_safetensors(model, fast_tmp_dir / "in" / "a.safetensors")
    cid = save(run_cli, tmp_store, src, "--block-size", "4K")["checkpoint"]
    with Store.open(tmp_store) as st:  # the manifest an older apollo_cas wrote: no record
        data = replace(st.manifest(cid), saved_files=None, parent=None).encode()
        assert b"saved_files" not in data
        old = digest_hex(data)
        st.backend.put_if_absent(layout.manifest_key(old), data)
        st.tag(old, "old")
    res = restore(run_cli, tmp_store, fast_tmp_dir / "old", "old")
    assert res["exact"] is False and "saved before" in res["not_exact_because"]
    rewritten = restore(run_cli, tmp_store, fast_tmp_dir / "new", cid, "--no-exact")
    assert [Path(p).name for p in res["files"]] == ["model.safetensors"]
    assert filecmp.cmp(res["files"][0], rewritten["files"][0], shallow=False)


# ---------------------------------------------------------------------------
# the record in the store


def record_chunk(store: str) -> str:
    """The chunk holding the latest checkpoint's saved-file record."""
    with Store.open(store) as st:
        ref = st.manifest(st.resolve("latest")).saved_files
    assert ref is not None
    return ref.chunk.hex()


def test_damaged_record_is_an_error_never_another_file(
    run_cli, tmp_store, fast_tmp_dir, model, write_safetensors
):
    src = write_safetensors(model, fast_tmp_dir / "in" / "a.safetensors")
    save(run_cli, tmp_store, src, "--block-size", "4K")
    assert cli_json(run_cli, "verify", "--store", tmp_store, "--read-data")["ok"] is True
    hex_id = record_chunk(tmp_store)
    with Store.open(tmp_store) as st:  # its chunk object (format 1) or its pack range (2)
        flip_last_byte(st, bytes.fromhex(hex_id))
    out = fast_tmp_dir / "out"
    fails(run_cli("restore", "--store", tmp_store, "--to", out), 1, hex_id)
    assert not out.exists() or list(out.iterdir()) == []  # no file, no temporary
    p = run_cli("verify", "--store", tmp_store, "--read-data", "--json")
    assert p.returncode == 3
    (damage,) = json.loads(p.stdout)["damaged_chunks"]
    assert damage["chunk"] == hex_id and damage["tensors"] == ["(saved-file record)"]
    assert len(damage["checkpoints"]) == 1
    # the tensors are intact: the rewritten form still restores
    assert restore(run_cli, tmp_store, out, "--no-exact")["exact"] is False


def test_gc_keeps_the_record_and_verify_counts_it(
    run_cli, tmp_store, fast_tmp_dir, model, write_safetensors
):
    src = write_safetensors(model, fast_tmp_dir / "in" / "a.safetensors")
    save(run_cli, tmp_store, src, "--block-size", "4K")
    record = bytes.fromhex(record_chunk(tmp_store))
    with Store.open(tmp_store) as st:
        data_chunks = {c for t in st.manifest(st.resolve("latest")).tensors for c in t.chunks}
    assert run_cli("gc", "--store", tmp_store, "--grace", "0s").returncode == 0
    with Store.open(tmp_store) as st:  # in either format
        assert record in st.inventory.ids()
    v = cli_json(run_cli, "verify", "--store", tmp_store)
    assert v["chunks_referenced"] == len(data_chunks) + 1
    assert restore(run_cli, tmp_store, fast_tmp_dir / "out")["exact"] is True
    assert_identical(src.parent, fast_tmp_dir / "out", ["a.safetensors"])
