import pytest
import torch

from redi_core.frdiff import (
    CachedDiTBlock,
    CachedFirstConv,
    CachedTransformer,
    FRDiffConfig,
    FRDiffState,
    keyframe_schedule,
    mix_lambda,
    step_index,
)


def test_lambda_is_frdiffs_hard_sigmoid():
    assert mix_lambda(0.0) == 0.0
    assert mix_lambda(0.433) == 0.0
    assert mix_lambda(0.5) == pytest.approx(0.5)
    assert mix_lambda(0.567) == pytest.approx(1.0, abs=0.01)
    assert mix_lambda(1.0) == 1.0
    assert mix_lambda(0.6, bias=0.7) == 0.0  # the bias moves the switch later


def test_keyframe_schedule():
    assert keyframe_schedule(6, 2) == [True, False, True, False, True, False]
    assert keyframe_schedule(6, 3) == [True, False, False, True, False, False]
    assert all(keyframe_schedule(5, 1))
    # outside the window every step is a keyframe
    assert keyframe_schedule(10, 2, 0.3, 0.8) == [True, True, True, False, True, False, True, False, True, True]


def test_step_index_counts_the_sigmas_above():
    sigmas = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    assert [step_index(sigmas, float(s)) for s in sigmas[:-1]] == [0, 1, 2, 3]
    assert step_index(sigmas, 3.0 * (1 + 1e-7)) == 2  # float noise does not shift the step
    assert step_index(sigmas, 2.0) == 3  # a multistep's intermediate evaluation belongs to the next step
    assert step_index(None, 5.0) == 0


class Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.calls = 0

    def forward(self, x, *args):
        self.calls += 1
        return self.lin(x) * 2


def test_reuse_skips_exactly_the_non_keyframe_blocks():
    state = FRDiffState(FRDiffConfig(interval=3, score_mixing=False))
    inner_a, inner_b = Twice(), Twice()
    conv, tr = CachedFirstConv(inner_a, state, "a"), CachedTransformer(inner_b, state, "b")
    x = torch.randn(2, 3)
    for step in range(9):
        state.begin_call(step, step / 9, ("c",))
        xs = x + step
        out_conv = conv(xs)
        out_tr = tr(xs)
        state.end_call(out_conv)
        if step % 3 == 0:
            torch.testing.assert_close(out_conv, inner_a.lin(xs) * 2)
            torch.testing.assert_close(out_tr, inner_b.lin(xs) * 2)
        else:
            kf = x + (step - step % 3)
            torch.testing.assert_close(out_conv, inner_a.lin(kf) * 2)  # the cached output
            torch.testing.assert_close(out_tr, inner_b.lin(kf) * 2 - kf + xs)  # cached inner + current residual
    assert inner_a.calls == inner_b.calls == 3
    assert state.skipped == {"resblock": 6, "transformer": 6}
    assert state.computed == {"resblock": 3, "transformer": 3}


def test_score_mixing_and_jump():
    state = FRDiffState(FRDiffConfig(interval=2, score_mixing=True))
    key = torch.ones(1, 2)
    state.begin_call(0, 0.0, ("c",))
    state.end_call(key)
    assert state.begin_call(1, 0.1, ("c",)) == "jump"  # lambda 0: no network call needed
    assert state.begin_call(1, 0.9, ("c",)) == "reuse"
    state.lam = 0.25
    torch.testing.assert_close(state.end_call(torch.zeros(1, 2)), 0.75 * key)


def test_cache_reset_and_shape_change():
    state = FRDiffState(FRDiffConfig(interval=2, score_mixing=False))
    inner = Twice()
    conv = CachedFirstConv(inner, state, "a")
    state.begin_call(0, 0.0, ("c",))
    conv(torch.randn(2, 3))
    state.end_call(torch.zeros(2, 3))
    state.begin_call(1, 0.5, ("c",))
    conv(torch.randn(4, 3))  # another batch size: computed, not reused
    assert inner.calls == 2 and not state.skipped
    state.reset()
    assert not state.blocks and not state.scores
    assert state.begin_call(1, 0.5, ("c",)) == "key"  # nothing cached: a keyframe


def test_wrappers_keep_the_original_module_names():
    inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.SiLU())
    w = CachedFirstConv(inner, FRDiffState(FRDiffConfig()), "s")
    assert w[0] is inner[0] and getattr(w, "0") is inner[0]
    assert [n for n, _ in w.named_parameters()] == [n for n, _ in inner.named_parameters()] == ["0.weight", "0.bias"]
    parent = torch.nn.Module()
    parent.add_module("in_layers", w)
    assert [n for n, _ in parent.named_modules()] == ["", "in_layers", "in_layers.0", "in_layers.1"]
    # a weight patch addressed by the original path reaches the module the wrapper calls
    new = torch.nn.Parameter(torch.zeros(2, 2))
    parent.in_layers.get_submodule("0").weight = new
    assert inner[0].weight is new


def test_dit_block_reuses_its_residuals():
    state = FRDiffState(FRDiffConfig(interval=2, score_mixing=False))
    calls = []

    def original(args):
        calls.append(1)
        return {"img": args["img"] * 3, "txt": args["txt"] + 1}

    block = CachedDiTBlock(state, "double_block.0")
    x, t = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    state.begin_call(0, 0.0, ("c",))
    out = block({"img": x, "txt": t, "vec": None}, {"original_block": original})
    torch.testing.assert_close(out["img"], x * 3)
    state.end_call(torch.zeros(2))  # the network's output at the keyframe
    assert state.begin_call(1, 0.5, ("c",)) == "reuse"
    x2, t2 = x + 1, t - 1
    out = block({"img": x2, "txt": t2, "vec": None}, {"original_block": original})
    assert len(calls) == 1 and state.skipped == {"dit": 1}
    torch.testing.assert_close(out["img"], x2 + 2 * x)  # current input + the keyframe's residual
    torch.testing.assert_close(out["txt"], t2 + 1)


def test_dit_block_runs_an_earlier_replacement_at_keyframes():
    state = FRDiffState(FRDiffConfig(interval=2, score_mixing=False))
    seen = []

    def earlier(args, extra):
        seen.append(1)
        return {"img": extra["original_block"](args)["img"] + 10}

    block = CachedDiTBlock(state, "single_block.0", earlier)
    state.begin_call(0, 0.0, ("c",))
    out = block({"img": torch.zeros(1, 2)}, {"original_block": lambda a: {"img": a["img"] * 2}})
    torch.testing.assert_close(out["img"], torch.full((1, 2), 10.0))
    assert seen == [1]
