"""Resume: auto falls back past undecodable checkpoints, files are read once, best pointer, checkpoint references."""

import hashlib
from pathlib import Path

import orjson
import pytest
import torch

import rlswift.checkpoint.reader as reader
import rlswift.checkpoint.tensorfile as tensorfile
from rlswift.checkpoint import CheckpointError, CheckpointManager, read_checkpoint, resolve_checkpoint, verify
from test_checkpoint_manager import Box, make_hooks


def rewrite(ckpt: Path, rel: str, data: bytes) -> None:
    """Replace a file and recompute its manifest entry: the checksums pass, only decoding can tell."""
    (ckpt / rel).write_bytes(data)
    m = orjson.loads((ckpt / "manifest.json").read_bytes())
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (ckpt / "manifest.json").write_bytes(orjson.dumps(m))


def three(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for s in (1, 2, 3):
        mgr.save(s, {"a": Box({"t": torch.full((2,), float(s)), "s": s})}, config={})
    return mgr


@pytest.mark.parametrize("how,why", [
    ("tree", r"hook 'a' cannot be decoded .*unknown marker '\$future'"),
    ("header", r"a\.safetensors: cannot be parsed .*offsets"),
    ("json", r"a\.json: cannot be parsed"),
])
def test_auto_skips_undecodable_newest(tmp_path, how, why):
    mgr = three(tmp_path)
    newest = tmp_path / "checkpoint-3"
    if how == "tree":
        rewrite(newest, "hooks/a.json", orjson.dumps({"t": {"$future": 1}, "s": 3}))
    elif how == "header":
        data = bytearray((newest / "hooks/a.safetensors").read_bytes())
        head = bytes(data[8:8 + int.from_bytes(data[:8], "little")]).replace(b"[0,8]", b"[0,9]")
        rewrite(newest, "hooks/a.safetensors", bytes(data[:8]) + head + bytes(data[8 + len(head):]))
    else:
        rewrite(newest, "hooks/a.json", b'{"t": ')
    assert verify(newest) == []  # checksums pass
    with pytest.warns(UserWarning, match=r"skipping .*checkpoint-3: .*" + why):
        assert mgr.resolve_resume("auto") == tmp_path / "checkpoint-2"
    b = Box()
    mgr.load(tmp_path / "checkpoint-2", {"a": b})
    assert b.state["s"] == 2
    with pytest.raises(CheckpointError, match=why):  # named explicitly: refused, with the reason
        mgr.resolve_resume(newest)


def test_resume_reads_each_file_once_and_save_reads_none(tmp_path, monkeypatch):
    reads: list[str] = []
    real = reader._read_file

    def counting(f, *a, **k):
        reads.append(Path(f).name)
        return real(f, *a, **k)

    def no_read(*a, **k):
        raise AssertionError("a save read a file back")

    monkeypatch.setattr(reader, "_read_file", counting)
    monkeypatch.setattr(tensorfile, "read_hashed", no_read)
    monkeypatch.setattr(tensorfile, "read_tensors", no_read)
    mgr = CheckpointManager(tmp_path)
    hooks = make_hooks(seed=0)
    out = mgr.save(4, hooks, config={"x": 1})
    assert reads == []  # checksums come from the bytes written, not from reading files back
    monkeypatch.undo()
    monkeypatch.setattr(reader, "_read_file", counting)
    files = orjson.loads((out / "manifest.json").read_bytes())["files"]
    path = mgr.resolve_resume("auto")
    b = make_hooks(seed=1)
    mgr.load(path, b)
    assert sorted(reads) == sorted(Path(rel).name for rel in files)  # each hook file exactly once
    exp_avg = [h["optim"].state_dict()["state"][0]["exp_avg"] for h in (b, hooks)]
    assert torch.equal(*exp_avg)


def test_read_checkpoint_tensors_are_exact_and_writable(tmp_path):
    state = {"f": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "i": torch.tensor(2**40),
             "m": torch.tensor([True, False]), "e": torch.zeros(0, 4), "v": torch.randn(6)[::2]}
    out = CheckpointManager(tmp_path).save(1, {"s": Box(state)}, config={})
    got = read_checkpoint(out).states["s"]
    for k, t in state.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    for k, t in got.items():  # each its own storage: consumers like torch.set_rng_state read it from offset 0
        assert t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size(), k
    got["f"].add_(1)
    assert torch.equal(got["f"], state["f"] + 1)


def test_real_rng_hook_roundtrip(tmp_path):
    from rlswift.state.rng import RNGState

    torch.manual_seed(123)
    mgr = CheckpointManager(tmp_path)
    out = mgr.save(1, {"rng": RNGState()}, config={})
    expected = torch.rand(3)
    torch.manual_seed(999)
    mgr.load(out, {"rng": RNGState()})
    assert torch.equal(torch.rand(3), expected)


def test_best_pointer_kept_by_retention(tmp_path):
    mgr = CheckpointManager(tmp_path, save_total_limit=1, best_metric="reward", best_mode="max")
    for s, r in [(1, 0.1), (2, 0.7), (3, 0.2), (4, 0.5)]:
        mgr.save(s, {"a": Box(s)}, config={}, metrics={"reward": r})
        if s >= 2:
            assert (tmp_path / "best").read_text() == "checkpoint-2\n"
    assert [s for s, _ in mgr.checkpoints()] == [2, 4]
    assert mgr.best_pointer() == tmp_path / "checkpoint-2" and mgr.latest_pointer() == tmp_path / "checkpoint-4"
    mgr.save(5, {"a": Box(5)}, config={}, metrics={"reward": 0.9})
    assert (tmp_path / "best").read_text() == "checkpoint-5\n"
    assert [s for s, _ in mgr.checkpoints()] == [5]
    lo = CheckpointManager(tmp_path / "lo", best_metric="loss", best_mode="min")
    for s, v in [(1, 2.0), (2, 1.0), (3, 3.0)]:
        lo.save(s, {"a": Box(s)}, config={}, metrics={"loss": v})
    assert lo.best_pointer() == tmp_path / "lo" / "checkpoint-2"
    assert not (tmp_path / "lo2" / "best").exists()


def test_resolve_checkpoint_references(tmp_path, monkeypatch):
    run = tmp_path / "run"
    mgr = CheckpointManager(run, best_metric="reward")
    for s, r in [(1, 0.9), (2, 0.1)]:
        mgr.save(s, {"a": Box(s)}, config={}, metrics={"reward": r})
    c1, c2 = run / "checkpoint-1", run / "checkpoint-2"
    assert resolve_checkpoint(c1) == c1
    assert resolve_checkpoint(run) == c2  # a run folder: its latest
    assert resolve_checkpoint(run / "best") == c1 and resolve_checkpoint(run / "latest") == c2
    assert resolve_checkpoint("best", run_dir=run) == c1 and resolve_checkpoint("latest", run_dir=run) == c2
    monkeypatch.chdir(run)
    assert resolve_checkpoint("best") == c1
    (run / "latest").unlink()
    assert resolve_checkpoint(run) == c2  # no pointer: newest complete one
    with pytest.raises(CheckpointError, match="no 'latest' pointer"):
        resolve_checkpoint("latest", run_dir=run)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    (c1 / "hooks" / "a.json").write_bytes(b"9")
    with pytest.raises(CheckpointError, match="unusable: .*sha256"):
        resolve_checkpoint(run / "best")
    assert resolve_checkpoint(run / "best", check=False) == c1
    (run / "best").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="not a checkpoint-<step> folder name"):
        resolve_checkpoint(run / "best")


def test_load_wraps_hook_refusals(tmp_path):
    class Picky(Box):
        def load_state_dict(self, sd):
            raise ValueError("shape (3,) does not match (4,)\nsecond line")

    mgr = CheckpointManager(tmp_path)
    out = mgr.save(1, {"a": Box(1)}, config={})
    with pytest.raises(CheckpointError, match=r"hook 'a' refused its saved state: ValueError: shape \(3,\)") as e:
        mgr.load(out, {"a": Picky()})
    assert "\n" not in str(e.value) and isinstance(e.value.__cause__, ValueError)


def test_big_hooks_are_sharded_and_read_back(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(tensorfile, "SHARD", 64)  # bytes: every tensor of 16 floats gets a file of its own
    state = {f"t{i}": torch.full((16,), float(i)) for i in range(5)} | {"small": torch.ones(2)}
    out = CheckpointManager(tmp_path).save(1, {"big": Box(state), "x": Box({"s": torch.zeros(1)})}, config={})
    rels = orjson.loads((out / "manifest.json").read_bytes())["hooks"]["big"]
    assert rels[:2] == ["hooks/big.json", "hooks/big.safetensors"]
    assert rels[2:] == [f"hooks/big@{k}.safetensors" for k in range(1, len(rels) - 1)] and len(rels) == 7
    parts = [safetensors.torch.load_file(out / r) for r in rels[1:]]  # each shard is a plain safetensors file
    assert sum(len(p) for p in parts) == 6
    got = read_checkpoint(out).states["big"]
    assert list(got) == list(state) and all(torch.equal(got[k], v) for k, v in state.items())


def test_reads_format_1_checkpoints(tmp_path):
    """A checkpoint as rlswift 0.1 wrote it (format 1, safetensors' own writer) still loads."""
    import safetensors.torch

    from rlswift.checkpoint.codec import encode

    state = {"w": torch.arange(4.0), "step": 3, "t": (1, 2)}
    tree, tensors = encode(state, hook="a")
    ck = tmp_path / "checkpoint-3"
    (ck / "hooks").mkdir(parents=True)
    (ck / "hooks" / "a.json").write_bytes(orjson.dumps(tree))
    safetensors.torch.save_file(tensors, str(ck / "hooks" / "a.safetensors"))
    files = {rel: {"sha256": hashlib.sha256((ck / rel).read_bytes()).hexdigest(), "size": (ck / rel).stat().st_size}
             for rel in ("hooks/a.json", "hooks/a.safetensors")}
    (ck / "manifest.json").write_bytes(orjson.dumps({
        "format_version": 1, "step": 3, "config": {}, "metrics": {}, "files": files,
        "hooks": {"a": ["hooks/a.json", "hooks/a.safetensors"]}}))
    b = Box()
    mgr = CheckpointManager(tmp_path)
    mgr.load(mgr.resolve_resume("auto"), {"a": b})
    assert b.state["step"] == 3 and b.state["t"] == (1, 2) and torch.equal(b.state["w"], torch.arange(4.0))
