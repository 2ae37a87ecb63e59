import pytest
import torch

from redi_core.frdiff import (
    CachedDiTBlock,
    CachedFirstConv,
    CachedTransformer,
    FRDiffConfig,
    FRDiffState,
    extrapolation_weights,
    forecast,
    keyframe_schedule,
    mix_lambda,
    ramp_gap,
    step_index,
    unwrap,
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


def test_dit_block_survives_a_model_clone():
    """ModelPatcher.clone() deep-copies model_options, where the block patch lives: the copy must drive
    the same state as the sampling wrappers (a copied state stayed in keyframe mode: nothing reused)."""
    import copy

    state = FRDiffState(FRDiffConfig(interval=2, score_mixing=False))
    inner = {"offset": torch.ones(1)}

    def earlier(args, extra, inner=inner):
        return {"img": extra["original_block"](args)["img"] + inner["offset"]}

    block = copy.deepcopy({"dit": {("double_block", 0): CachedDiTBlock(state, "double_block.0", earlier)}})["dit"][("double_block", 0)]
    assert block.state is state and block.slot == "double_block.0" and block.inner is not None
    calls = []

    def original(args):
        calls.append(1)
        return {"img": args["img"] * 3}

    x = torch.randn(2, 4)
    state.begin_call(0, 0.0, ("c",))
    block({"img": x}, {"original_block": original})
    state.end_call(torch.zeros(2))
    assert state.begin_call(1, 0.5, ("c",)) == "reuse"
    block({"img": x + 1}, {"original_block": original})
    assert len(calls) == 1 and state.slot_skips == {"double_block.0": 1}


def test_extrapolation_weights_are_lagrange():
    assert extrapolation_weights([0.3], 0.9) == [1.0]
    assert extrapolation_weights([0.0, 1.0], 2.0) == pytest.approx([-1.0, 2.0])
    assert extrapolation_weights([0.0, 1.0, 2.0], 3.0) == pytest.approx([1.0, -3.0, 3.0])
    assert sum(extrapolation_weights([0.1, 0.25, 0.4], 0.47)) == pytest.approx(1.0)


def test_forecast_is_exact_on_polynomials_of_its_order():
    a, b, c = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)

    def f(r, quad=True):
        return a + b * r + (c * r * r if quad else 0)

    lin = [(r, f(r, quad=False)) for r in (0.1, 0.3)]
    torch.testing.assert_close(forecast(lin, 0.45), f(0.45, quad=False))
    quad = [(r, f(r)) for r in (0.1, 0.3, 0.5)]
    torch.testing.assert_close(forecast(quad, 0.6), f(0.6))
    before = [v.clone() for _, v in quad]
    forecast(quad, 0.7)
    assert all(torch.equal(v, w) for (_, v), w in zip(quad, before))  # the history is not changed
    dicts = [(r, {"img": f(r), "txt": -f(r)}) for r in (0.1, 0.3, 0.5)]
    out = forecast(dicts, 0.6)
    torch.testing.assert_close(out["img"], f(0.6))
    torch.testing.assert_close(out["txt"], -f(0.6))


@pytest.mark.parametrize("order", [0, 1, 2])
def test_reuse_forecasts_block_features_of_the_given_order(order):
    """A block whose output moves linearly with the step: order >= 1 predicts the skipped
    steps exactly, order 0 returns the last keyframe's output."""
    state = FRDiffState(FRDiffConfig(interval=2, score_mixing=False, order=order))
    w = torch.randn(3)
    block = CachedFirstConv(torch.nn.Identity(), state, "a")
    for step in range(8):
        r = step / 8
        state.begin_call(step, r, ("c",))
        out = block(w * step)
        state.end_call(out)
        if step % 2 == 0:
            torch.testing.assert_close(out, w * step)
        elif order == 0 or step == 1:  # step 1: only one keyframe seen, nothing to extrapolate from
            torch.testing.assert_close(out, w * (step - 1))
        else:
            torch.testing.assert_close(out, w * step)
    assert state.slot_skips == {"a": 4}
    assert all(len(h) <= order + 1 for h in state.blocks.values())


def test_jump_score_is_forecast_with_order():
    state = FRDiffState(FRDiffConfig(interval=2, score_mixing=True, order=1))
    for step, r in ((0, 0.0), (2, 0.1)):
        state.begin_call(step, r, ("c",))
        state.end_call(torch.full((1, 2), 10.0 * r))
    assert state.begin_call(3, 0.15, ("c",)) == "jump"
    torch.testing.assert_close(state.keyframe_score(), torch.full((1, 2), 1.5))


def test_ramp_schedule_is_dense_early():
    assert ramp_gap(0.0, 4, 0.0, 1.0) == 1 and ramp_gap(1.0, 4, 0.0, 1.0) == 4 and ramp_gap(0.5, 4, 0.0, 1.0) == 3
    flags = keyframe_schedule(20, 4, schedule="ramp")
    gaps = [j - i for i, j in zip([i for i, f in enumerate(flags) if f], [i for i, f in enumerate(flags) if f][1:])]
    assert flags[:3] == [True, True, True] and gaps == sorted(gaps) and max(gaps) <= 4
    # the state follows the same schedule
    state = FRDiffState(FRDiffConfig(interval=4, score_mixing=False, schedule="ramp"))
    got = []
    for i in range(20):
        got.append(state.begin_call(i, i / 20, ("c",)) == "key")
        state.end_call(torch.zeros(1))
    assert got == flags


def test_adaptive_schedule_follows_the_input_change():
    """Keyframes where the predicted output change (input change x the output/input rate
    measured between the last two keyframes) passes the threshold, and at least every
    `interval` steps."""

    def run(xs, threshold, interval=10):
        state = FRDiffState(FRDiffConfig(interval=interval, score_mixing=False, schedule="adaptive", threshold=threshold))
        keys = []
        for i, x in enumerate(xs):
            keys.append(state.begin_call(i, i / len(xs), ("c",), x) == "key")
            state.end_call(x * 2)  # output = 2 x: the rate is 2
        return keys

    slow = [torch.full((1, 4), 1.0 + 0.01 * i) for i in range(8)]
    assert run(slow, 0.025) == [True, True, False, False, True, False, False, True]
    assert all(run(slow, 0.0))  # threshold 0: every step is a keyframe
    assert run(slow, 10.0, interval=3) == [True, True, False, False, True, False, False, True]  # the max-run bound


def test_state_reset_forgets_the_schedule():
    state = FRDiffState(FRDiffConfig(interval=3, score_mixing=False, schedule="ramp"))
    state.begin_call(5, 0.5, ("c",))
    state.end_call(torch.zeros(1))
    state.reset()
    assert state.decided is None and state.last_key_step is None and not state.slot_skips


def test_unwrap_finds_the_original_module():
    state = FRDiffState(FRDiffConfig())
    inner = torch.nn.Linear(2, 2)
    assert unwrap(CachedFirstConv(CachedFirstConv(inner, state, "a"), state, "a")) is inner
    assert unwrap(CachedTransformer(inner, state, "b")) is inner and unwrap(inner) is inner
    fn = object()
    assert unwrap(CachedDiTBlock(state, "s", CachedDiTBlock(state, "s", fn))) is fn
    assert unwrap(CachedDiTBlock(state, "s")) is None
