"""rlswift.optim: the registry, GaLore target selection, hand-worked first steps, fidelity to the libraries'
own loops, codec-safe state, and exact resume in a fresh process (CPU; the same on CUDA when there is one).

This file is also the worker the resume tests start: `python tests/test_optim.py PHASE MODEL_DIR ROOT DEVICE`.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from rlswift.optim import (OPTIMIZERS, build_optimizer, galore_param_groups, galore_targets, register_optimizer,
                           target_module_matches)

HAVE_LIBS = all(importlib.util.find_spec(m) for m in ("bitsandbytes", "galore_torch", "q_galore_torch"))
needs_libs = pytest.mark.skipif(not HAVE_LIBS, reason="needs the optim extra: pip install 'rlswift[optim]'")
BUILTIN = ["adamw", "adamw_8bit", "galore_adamw", "galore_adamw_8bit", "q_galore_adamw_8bit"]


def sgd_factory(model_or_named_params, *, lr, weight_decay, **_):
    """A user factory named by dotted path in a test."""
    return torch.optim.SGD([p for _, p in model_or_named_params.named_parameters()], lr=lr, weight_decay=weight_decay)


def not_an_optimizer(model_or_named_params, **_):
    return object()


class Net(torch.nn.Module):
    """Embedding + two Linear layers + an untied head: every kind of parameter GaLore must tell apart."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(40, 32)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)
        self.head = torch.nn.Linear(32, 40, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(self.emb(x))))))


def train(model, opt, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        x = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------- registry


def test_registry_names_errors_duplicates_and_dotted_paths():
    for name in BUILTIN + ["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit"]:
        assert name in OPTIMIZERS
    with pytest.raises(KeyError, match=r"Did you mean 'galore_adamw'.*Valid names: adamw, .*q_galore_adamw_8bit"):
        build_optimizer("galore_adam", Net(), lr=1e-3)
    with pytest.raises(KeyError, match="already registered"):
        register_optimizer("adamw", sgd_factory)
    opt = build_optimizer("test_optim.sgd_factory", Net(), lr=0.5, weight_decay=0.1)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        build_optimizer("test_optim.not_an_optimizer", Net(), lr=1e-3)


def test_adamw_is_fused_on_cpu_and_implementation_can_be_chosen():
    assert build_optimizer("adamw", Net(), lr=1e-3).param_groups[0]["fused"] is True
    g = build_optimizer("adamw", Net(), lr=1e-3, implementation="foreach").param_groups[0]
    assert g["foreach"] is True and not g["fused"]
    assert build_optimizer("adamw_torch", Net(), lr=1e-3).param_groups[0]["foreach"] is None
    with pytest.raises(ValueError, match="choose one of fused, foreach, for-loop"):
        build_optimizer("adamw", Net(), lr=1e-3, implementation="fast")
    frozen = Net()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer("adamw", frozen, lr=1e-3)


# ----------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("spec, expected", [
    # transformers.trainer_utils.check_target_module_exists: a str is a regex over the whole name ...
    (r".*\.q_proj", [True, False, False, False]),
    (r"model\.layers\.1\..*", [False, True, False, False]),
    ("lm_head", [False, False, True, False]),
    ("q_proj", [False, False, False, False]),  # ... so a bare str must match the full name
    # ... a list matches equal names, names containing an entry, or names fully matching an entry as a regex
    (["q_proj", "lm_head"], [True, False, True, False]),
    (["attn"], [True, False, False, False]),
    ([r".*mlp.*"], [False, True, False, False]),
    (["nothing"], [False, False, False, False]),
])
def test_target_module_rule_is_transformers_rule(spec, expected):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "lm_head", "model.embed_tokens"]
    assert [target_module_matches(spec, n) for n in names] == expected


def test_galore_targets_pick_trainable_linear_weights():
    net = Net()
    assert galore_targets(net, "all-linear") == ["up.weight", "down.weight", "head.weight"]
    assert galore_targets(net, ["up", "down"]) == ["up.weight", "down.weight"]
    assert galore_targets(net, r"d.*") == ["down.weight"]  # a str is a regex over the whole module name
    assert galore_targets(net.named_parameters(), ["emb", "up"]) == ["emb.weight", "up.weight"]  # no model: 2-D
    groups = galore_param_groups(net, ["up"], rank=4)
    assert [len(g["params"]) for g in groups] == [5, 1] and groups[1]["rank"] == 4 and "rank" not in groups[0]
    net.up.requires_grad_(False)
    with pytest.raises(ValueError, match=r"matches no trainable Linear weight; Linear modules look like: down, head"):
        galore_targets(net, ["up"])
    with pytest.raises(ValueError, match="needs the model"):
        galore_targets(Net().named_parameters(), "all-linear")


@needs_libs
def test_bad_low_rank_options_are_named():
    with pytest.raises(ValueError, match="rank=0"):
        build_optimizer("galore_adamw", Net(), lr=1e-3, rank=0)
    with pytest.raises(ValueError, match="proj_type='diag'"):
        build_optimizer("galore_adamw_8bit", Net(), lr=1e-3, proj_type="diag")
    with pytest.raises(ValueError, match="proj_type='std' only"):
        build_optimizer("q_galore_adamw_8bit", Net(), lr=1e-3, proj_type="full")
    # up.weight is 64x32: its rank-8 projection has 32*8 = 256 elements, not a multiple of 96
    with pytest.raises(ValueError, match=r"proj_group_size=96 does not divide the 256 elements .*up.weight.*e\.g\. 64"):
        build_optimizer("q_galore_adamw_8bit", Net(), lr=1e-3, rank=8, proj_group_size=96)


# ----------------------------------------------------------------------------------------------- the maths


@needs_libs
@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw_8bit", "q_galore_adamw_8bit"])
def test_first_galore_step_by_hand(name):
    """W (4x2) with gradient [[3,0],[0,1],0,0]: its rank-1 right projection is e1 (up to sign), the first Adam step
    of the projected gradient is sign(3) = 1, so W[0,0] moves by -lr*scale and nothing else moves by the update;
    then the decoupled decay multiplies W by (1 - lr*wd)."""
    lin = torch.nn.Linear(2, 4, bias=False)
    w0 = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    lin.weight.data.copy_(w0)
    lr, wd, scale = 0.1, 0.5, 0.25
    opt = build_optimizer(name, lin, lr=lr, weight_decay=wd, rank=1, scale=scale, update_proj_gap=10,
                          proj_group_size=-1, min_8bit_size=1)
    grad = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    lin.weight.grad = grad.clone()
    opt.step()
    expected = w0.clone()
    expected[0, 0] -= lr * scale * 3.0 / (3.0 + 1e-8)
    expected *= 1 - lr * wd
    # Q-GaLore's 4-bit projection of [+-1, 0] is exact (min 0 / max 1 or -1 / 0 map onto the grid)
    torch.testing.assert_close(lin.weight.data, expected, rtol=0, atol=1e-6)
    assert lin.weight.grad.shape == (4, 2) and torch.equal(lin.weight.grad, grad)  # full-rank grad left in place
    assert not hasattr(lin.weight, "saved_data")


@needs_libs
def test_galore_8bit_step_equals_galore_torch_loop():
    """Our bitsandbytes-0.50 loop vs galore-torch's own GaLoreAdamW8bit, whose only CPU blocker is its
    torch.cuda.synchronize() (patched out here): bit-identical weights after 6 steps with 3 projection updates.
    Both use the compact projector (row-major copies of the SVD factors), so only the loops are compared."""
    from rlswift.optim.galore import compact_projector, import_bitsandbytes

    import_bitsandbytes()
    import galore_torch

    kw = dict(rank=4, update_proj_gap=2, scale=0.25, proj_type="std")
    a, b = Net(), Net()
    ours = build_optimizer("galore_adamw_8bit", a, lr=1e-2, weight_decay=0.1, min_8bit_size=1, **kw)
    # min_8bit_size=1: every state is 8-bit block-wise, where galore-torch's positional-argument slip
    # (max_unorm=100, skip_zeros=True under bitsandbytes 0.50) has no effect on CPU.
    theirs = galore_torch.GaLoreAdamW8bit(galore_param_groups(b, "all-linear", **kw), lr=1e-2, weight_decay=0.1,
                                          min_8bit_size=1)
    train(a, ours, 6)
    compact = compact_projector(galore_torch.galore_projector.GaLoreProjector)
    with mock.patch("torch.cuda.synchronize", lambda *args, **kwargs: None), \
            mock.patch.object(galore_torch.adamw8bit, "GaLoreProjector", compact):
        train(b, theirs, 6)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), Net().parameters()))


@needs_libs
def test_q_galore_unquantized_equals_galore_8bit():
    """With quantization off and an adaptive threshold no cosine can reach, Q-GaLore's projector is GaLore's."""
    from rlswift.optim.galore import q_galore_adamw_8bit_class

    a, b = Net(), Net()
    kw = dict(rank=4, update_proj_gap=2, scale=0.25, proj_type="std")
    ref = build_optimizer("galore_adamw_8bit", a, lr=1e-2, weight_decay=0.1, min_8bit_size=1, **kw)
    groups = galore_param_groups(b, "all-linear", quant=False, quant_n_bit=4, quant_group_size=-1,
                                 cos_threshold=2.0, gamma_proj=2, queue_size=2, **kw)
    q = q_galore_adamw_8bit_class()(groups, lr=1e-2, weight_decay=0.1, min_8bit_size=1)
    train(a, ref, 6)
    train(b, q, 6)
    assert all(torch.equal(p, r) for p, r in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------------------------- state


@needs_libs
@pytest.mark.parametrize("name", BUILTIN)
def test_state_dict_is_codec_safe_and_round_trips(name):
    from rlswift.checkpoint import decode, encode

    net = Net()
    opt = build_optimizer(name, net, lr=1e-2, weight_decay=0.1, rank=4, update_proj_gap=2, proj_group_size=64,
                          min_8bit_size=1)
    train(net, opt, 3)
    tree, tensors = encode(opt.state_dict(), hook="optimizer")
    state = decode(tree, {k: v.clone() for k, v in tensors.items()})
    if "galore" in name:
        # parameter 3 is up.weight (64x32; the group of other parameters comes first): a right projection,
        # rank 4 -> a (4, 32) matrix; q-galore stores it as uint8 codes in groups of 64 and keeps the shape
        proj = state["state"][3]["projector"]
        if name != "q_galore_adamw_8bit":
            assert proj["ortho_matrix"].shape == (4, 32) and proj["ortho_matrix"].dtype == torch.float32
        else:
            assert proj["ortho_matrix_shape"] == (4, 32) and proj["ortho_matrix"].shape == (2, 64)
            assert proj["ortho_matrix"].dtype == torch.uint8 and int(proj["ortho_matrix"].max()) <= 15  # 4-bit
            assert proj["svd_count"] == 2 and len(proj["queue"]) == 1  # SVDs at steps 0 and 2
    twin = Net()
    twin.load_state_dict(net.state_dict())
    opt2 = build_optimizer(name, twin, lr=1e-2, weight_decay=0.1, rank=4, update_proj_gap=2, proj_group_size=64,
                           min_8bit_size=1)
    opt2.load_state_dict(state)
    train(net, opt, 3, start=3)
    train(twin, opt2, 3, start=3)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))


@needs_libs
def test_library_projector_objects_are_refused_by_the_codec_ours_are_not():
    import galore_torch

    from rlswift.checkpoint import CodecError, encode

    net = Net()
    raw = galore_torch.GaLoreAdamW(galore_param_groups(net, "all-linear", rank=4, update_proj_gap=2, scale=0.25,
                                                       proj_type="std"), lr=1e-2, no_deprecation_warning=True)
    train(net, raw, 1)
    with pytest.raises(CodecError, match="GaLoreProjector"):
        encode(raw.state_dict(), hook="optimizer")
    ours = build_optimizer("galore_adamw", net, lr=1e-2, rank=4, update_proj_gap=2)
    train(net, ours, 1)
    encode(ours.state_dict(), hook="optimizer")
    assert isinstance(ours.state[net.up.weight]["projector"], galore_torch.galore_projector.GaLoreProjector)


@needs_libs
def test_projector_fields_of_another_library_version_are_refused():
    net = Net()
    opt = build_optimizer("galore_adamw", net, lr=1e-2, rank=4)
    train(net, opt, 1)
    sd = opt.state_dict()
    sd["state"][3]["projector"]["renamed_field"] = sd["state"][3]["projector"].pop("ortho_matrix")
    with pytest.raises(ValueError, match="renamed_field.*resume with the GaLore library version"):
        build_optimizer("galore_adamw", Net(), lr=1e-2, rank=4).load_state_dict(sd)


# ----------------------------------------------------------------------------------------------- exact resume

# (label, optimizer, options, K steps before the checkpoint, M steps after). The step counter GaLore compares with
# update_proj_gap is the number of steps already taken, so a projection update happens at steps taken = 0, gap, 2gap...
GALORE = dict(rank=8, scale=0.25, min_8bit_size=256)
CASES = [
    ("adamw-fused", "adamw", {"implementation": "fused"}, 3, 3),
    ("adamw-foreach", "adamw", {"implementation": "foreach"}, 3, 3),
    ("adamw_8bit", "adamw_8bit", {"min_8bit_size": 256}, 3, 3),
    ("galore-inside", "galore_adamw", {**GALORE, "update_proj_gap": 3}, 4, 4),  # SVDs at 0, 3 | 6 (inside)
    ("galore-at-resume", "galore_adamw", {**GALORE, "update_proj_gap": 2}, 4, 3),  # SVD at 4 = first resumed
    ("galore-full-inside", "galore_adamw", {**GALORE, "update_proj_gap": 3, "proj_type": "full"}, 4, 4),
    ("galore8-inside", "galore_adamw_8bit", {**GALORE, "update_proj_gap": 3}, 4, 4),
    ("galore8-at-resume", "galore_adamw_8bit", {**GALORE, "update_proj_gap": 2}, 4, 3),
    # Adaptive gap: cos_threshold=-1 doubles the gap at every SVD once the queue (2) is full: SVDs at
    # 0, 1, 2 (gap -> 2), 4 (-> 4), 8 (-> 8). Resumed at 3: SVDs at 4 and 8 inside; resumed at 4: at the resume.
    ("qgalore-inside", "q_galore_adamw_8bit",
     {**GALORE, "update_proj_gap": 1, "cos_threshold": -1.0, "queue_size": 2, "proj_group_size": 64}, 3, 6),
    ("qgalore-at-resume", "q_galore_adamw_8bit",
     {**GALORE, "update_proj_gap": 1, "cos_threshold": -1.0, "queue_size": 2, "proj_group_size": 64}, 4, 2),
]
CONTROLS = ["galore-inside", "qgalore-inside"]  # resumed with fresh projectors: must NOT match


class _ModelHook:
    def __init__(self, model):
        self.model = model

    def state_dict(self):
        from rlswift.models import policy_state_dict

        return policy_state_dict(self.model)

    def load_state_dict(self, sd):
        from rlswift.models import load_policy_state

        load_policy_state(self.model, sd)


def _build(model_dir: str, name: str, options: dict, device: str):
    """A fresh tiny Qwen2 + optimizer + warmup schedule, as a recipe builds them."""
    from rlswift.models import load_policy

    model = load_policy(model_dir, dtype="float32").to(device)
    model.train()
    opt = build_optimizer(name, model, lr=3e-3, weight_decay=0.01, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, {"model": _ModelHook(model), "optimizer": opt, "scheduler": sched}


def _steps(model, opt, sched, start: int, n: int, device: str) -> None:
    for step in range(start, start + n):
        ids = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(1000 + step)).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def _worker(phase: str, model_dir: str, root: str, device: str) -> None:
    from rlswift.checkpoint import CheckpointManager

    if device == "cuda":
        torch.use_deterministic_algorithms(True)
    for label, name, options, k, m in CASES:
        runs = {"first": ["ref", "part"], "resume": ["resumed"] + (["control"] if label in CONTROLS else [])}[phase]
        for run in runs:
            model, opt, hooks = _build(model_dir, name, options, device)
            mgr = CheckpointManager(Path(root) / label / run)
            start, n = {"ref": (0, k + m), "part": (0, k), "resumed": (k, m), "control": (k, m)}[run]
            if run in ("resumed", "control"):
                CheckpointManager(Path(root) / label / "part").load(Path(root) / label / "part" / f"checkpoint-{k}",
                                                                    hooks)
                if run == "control":
                    for state in opt.state.values():
                        state.pop("projector", None)
            _steps(model, opt, hooks["scheduler"], start, n, device)
            mgr.save(start + n, hooks, config={"case": label})


def _run_resume_cases(model_dir: Path, root: Path, device: str) -> None:
    from rlswift.checkpoint import compare_states, read_hook_states

    for phase in ("first", "resume"):  # each phase in its own fresh process
        proc = subprocess.run([sys.executable, __file__, phase, str(model_dir), str(root), device],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for label, _, _, k, m in CASES:
        ref = read_hook_states(root / label / "ref" / f"checkpoint-{k + m}")
        res = read_hook_states(root / label / "resumed" / f"checkpoint-{k + m}")
        assert ref["optimizer"]["state"], label  # the optimizer really has state to compare
        diffs = compare_states(ref, res)
        assert not diffs, f"{label}: resume differs from the uninterrupted run: {diffs[:3]}"
        if label in CONTROLS:
            ctl = read_hook_states(root / label / "control" / f"checkpoint-{k + m}")
            assert compare_states({"model": ref["model"]}, {"model": ctl["model"]}), \
                f"{label}: dropping the projectors did not change the run, so the test cannot see them"


@needs_libs
@pytest.mark.slow
def test_resume_in_fresh_process_is_bit_exact(tiny_model_dir, tmp_path):
    """K steps -> CheckpointManager -> a new process loads into a fresh model + optimizer -> M steps equals K+M
    uninterrupted steps bit for bit (weights, optimizer state, scheduler), for every optimizer and GaLore
    projection updates inside the resumed part and right at the resume."""
    _run_resume_cases(tiny_model_dir, tmp_path, "cpu")


@needs_libs
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)")
def test_resume_in_fresh_process_is_bit_exact_on_cuda(tiny_model_dir, tmp_path, monkeypatch):
    """The same cases with the model and optimizer on the GPU (bitsandbytes' CUDA kernels, cuSOLVER SVDs)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _run_resume_cases(tiny_model_dir, tmp_path, "cuda")


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
