"""The model zoo, built the way the CLI builds it: compose the Hydra model config, validate, build.

Exact parameter counts pin the architectures to the paper's Tables 1-2 (and the seed's Keras net);
the structural checks pin what the counts cannot see (padding, where ReLUs and dropout sit).
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch import nn

from allconv_hpc.compose import compose
from allconv_hpc.config import MODEL_NAMES, ConfigError, ModelConfig
from allconv_hpc.models import GlobalAvgPool, build_model, count_parameters, summary

NAMES = ["allcnn_c", "allcnn_seed", "model_c", "strided_cnn_c", "convpool_cnn_c",
         "model_a", "strided_cnn_a", "convpool_cnn_a", "allcnn_a",
         "model_b", "strided_cnn_b", "convpool_cnn_b", "allcnn_b"]

# Width 1.0 and 0.25, counted by hand from Table 1 (3x3 head conv, 1x1 192, 1x1 10 shared: 370,954):
# A = 5x5 3->96 (7,296) + 5x5 96->192 (460,992) + head; B adds a 1x1 conv per stage (9,312 + 37,056);
# ConvPool/All-CNN add a 3x3 conv per stage (83,040 + 331,968); Strided-CNN has the base's count.
PARAMS = {
    "allcnn_c": (1_369_738, 86_698),
    "allcnn_seed": (1_369_738, 86_698),
    "model_c": (954_730, 60_706),
    "strided_cnn_c": (954_730, 60_706),
    "convpool_cnn_c": (1_369_738, 86_698),
    "model_a": (839_242, 54_298),
    "strided_cnn_a": (839_242, 54_298),
    "convpool_cnn_a": (1_254_250, 80_290),
    "allcnn_a": (1_254_250, 80_290),
    "model_b": (885_610, 57_250),
    "strided_cnn_b": (885_610, 57_250),
    "convpool_cnn_b": (1_300_618, 83_242),
    "allcnn_b": (1_300_618, 83_242),
}


def test_every_configured_model_is_tested_and_has_a_config_file():
    assert sorted(NAMES) == sorted(MODEL_NAMES)
    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    assert sorted(p.stem for p in conf.glob("*.yaml")) == sorted(MODEL_NAMES)


def test_hand_counts_add_up():
    head = 192 * 192 * 9 + 192 + 192 * 192 + 192 + 192 * 10 + 10
    a = 3 * 96 * 25 + 96 + 96 * 192 * 25 + 192 + head
    b = a + 96 * 96 + 96 + 192 * 192 + 192
    extra = 96 * 96 * 9 + 96 + 192 * 192 * 9 + 192
    assert (a, a + extra, b, b + extra) == (PARAMS["model_a"][0], PARAMS["allcnn_a"][0],
                                            PARAMS["model_b"][0], PARAMS["allcnn_b"][0])


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@lru_cache(maxsize=None)
def model_cfg(name: str, *extra: str, data: str = "synthetic") -> ModelConfig:
    """The validated ModelConfig that `allconv-hpc train model=<name> data=<data> <extra>` would use."""
    return compose([f"model={name}", f"data={data}", *extra]).cfg.model


def build(name: str, *extra: str, data: str = "synthetic", seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return build_model(model_cfg(name, *extra, data=data))


def before_global_pool(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The activation that enters the global average pooling (the class-score map)."""
    for layer in model:
        if isinstance(layer, GlobalAvgPool):
            return x
        x = layer(x)
    raise AssertionError("no global average pooling layer")


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", NAMES)
def test_exact_parameter_counts(name):
    full, quarter = PARAMS[name]
    cfg = model_cfg(name)
    assert cfg.name == name and cfg.width == 1.0 and cfg.num_classes == 10
    assert count_parameters(build(name)) == full
    assert count_parameters(build(name, "model.width=0.25")) == quarter


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_class_map_size(name):
    model = build(name, "model.width=0.25").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        score_map = before_global_pool(model, x)
    assert out.shape == (3, 10)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # paper models: the 3x3 conv at layer 7 is valid (8x8 -> 6x6); the seed's Keras net keeps 8x8
    side = 8 if name == "allcnn_seed" else 6
    assert score_map.shape == (3, 10, side, side)
    convs3 = [m for m in model if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs3[-1].padding == ((1, 1) if name == "allcnn_seed" else (0, 0))
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs[-2:]] == [(1, 1), (1, 1)] and convs[-1].out_channels == 10


@pytest.mark.parametrize("name", ["allcnn_c", "allcnn_seed", "model_c", "allcnn_a", "strided_cnn_b"])
def test_cifar100_has_100_outputs(name):
    cfg = model_cfg(name, "model.width=0.25", data="cifar100")  # composes without the dataset files
    assert cfg.num_classes == 100
    model = build(name, "model.width=0.25", data="cifar100").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    # only the class-score conv changes: (w2 + 1) * (100 - 10) more parameters (w2 = 48 at width 0.25)
    assert count_parameters(model) == PARAMS[name][1] + 49 * 90


# ----------------------------------------------------------------------------- structure


def _followers(model: nn.Sequential, pred) -> list[tuple[int, nn.Module, nn.Module, nn.Module]]:
    """(index, previous layer, layer, next layer) for each layer matching pred."""
    layers = list(model)
    return [(i, layers[i - 1] if i else None, m, layers[i + 1]) for i, m in enumerate(layers) if pred(m)]


def _strided(m) -> bool:
    return isinstance(m, nn.Conv2d) and m.stride == (2, 2)


@pytest.mark.parametrize("dropout", ["true", "false"])
def test_relu_after_strided_convs_in_allcnn_c_but_not_in_the_seed_net(dropout):
    paper = build("allcnn_c", "model.width=0.25", f"model.dropout={dropout}")
    strided = _followers(paper, _strided)
    assert len(strided) == 2
    assert all(isinstance(nxt, nn.ReLU) for _, _, _, nxt in strided)
    assert all(conv.padding == (1, 1) for _, _, conv, _ in strided)

    seed = build("allcnn_seed", "model.width=0.25", f"model.dropout={dropout}")
    strided = _followers(seed, _strided)
    assert len(strided) == 2
    assert not any(isinstance(nxt, nn.ReLU) for _, _, _, nxt in strided)
    # Keras "same" on a stride-2 conv: pad 0 before, 1 after (an explicit pad layer, conv padding 0)
    assert all(conv.padding == (0, 0) and type(prev).__name__ == "SamePad" for _, prev, conv, _ in strided)
    # every other conv is followed by a ReLU (the class-score conv feeds the global pooling)
    plain = [(i, nxt) for i, _, m, nxt in _followers(seed, lambda m: isinstance(m, nn.Conv2d) and not _strided(m))]
    assert all(isinstance(nxt, nn.ReLU) for _, nxt in plain[:-1])
    assert isinstance(plain[-1][1], GlobalAvgPool)


def _layer_code(m: nn.Module) -> str:
    """A short code per layer: c<k>s<stride>p<pad>, R(eLU), D<p>, M(ax pool), S(ame pad), G(lobal avg)."""
    if isinstance(m, nn.Conv2d):
        return f"c{m.kernel_size[0]}s{m.stride[0]}p{m.padding[0]}"
    if isinstance(m, nn.Dropout):
        return f"D{m.p:g}"
    return {nn.ReLU: "R", nn.MaxPool2d: "M", GlobalAvgPool: "G"}.get(type(m), type(m).__name__[0])


# The whole layer sequence of each model with dropout on: pins what parameter counts cannot see
# (where every ReLU, dropout and pooling layer sits, and every conv's kernel, stride and padding).
HEAD = "c3s1p0 R c1s1p0 R c1s1p0 G"  # the paper's: layer 7 (3x3 valid), two 1x1 convs, global averaging
SEQUENCES = {
    "allcnn_c": "D0.2 c3s1p1 R c3s1p1 R c3s2p1 R D0.5 c3s1p1 R c3s1p1 R c3s2p1 R D0.5 c3s1p0 R c1s1p0 R c1s1p0 G",
    "allcnn_seed": "c3s1p1 R c3s1p1 R S c3s2p0 D0.5 c3s1p1 R c3s1p1 R S c3s2p0 D0.5 c3s1p1 R c1s1p0 R c1s1p0 G",
    "model_c": "D0.2 c3s1p1 R c3s1p1 R M D0.5 c3s1p1 R c3s1p1 R M D0.5 " + HEAD,
    "strided_cnn_c": "D0.2 c3s1p1 R c3s2p1 R D0.5 c3s1p1 R c3s2p1 R D0.5 " + HEAD,
    "convpool_cnn_c": "D0.2 c3s1p1 R c3s1p1 R c3s1p1 R M D0.5 c3s1p1 R c3s1p1 R c3s1p1 R M D0.5 " + HEAD,
    "model_a": "D0.2 c5s1p2 R M D0.5 c5s1p2 R M D0.5 " + HEAD,
    "strided_cnn_a": "D0.2 c5s2p2 R D0.5 c5s2p2 R D0.5 " + HEAD,
    "convpool_cnn_a": "D0.2 c5s1p2 R c3s1p1 R M D0.5 c5s1p2 R c3s1p1 R M D0.5 " + HEAD,
    "allcnn_a": "D0.2 c5s1p2 R c3s2p1 R D0.5 c5s1p2 R c3s2p1 R D0.5 " + HEAD,
    "model_b": "D0.2 c5s1p2 R c1s1p0 R M D0.5 c5s1p2 R c1s1p0 R M D0.5 " + HEAD,
    # the paper strides "the convolution preceding the max-pool": in B that is the 1x1 conv
    "strided_cnn_b": "D0.2 c5s1p2 R c1s2p0 R D0.5 c5s1p2 R c1s2p0 R D0.5 " + HEAD,
    "convpool_cnn_b": "D0.2 c5s1p2 R c1s1p0 R c3s1p1 R M D0.5 c5s1p2 R c1s1p0 R c3s1p1 R M D0.5 " + HEAD,
    "allcnn_b": "D0.2 c5s1p2 R c1s1p0 R c3s2p1 R D0.5 c5s1p2 R c1s1p0 R c3s2p1 R D0.5 " + HEAD,
}


@pytest.mark.parametrize("name", NAMES)
def test_exact_layer_sequence(name):
    codes = [_layer_code(m) for m in build(name, "model.width=0.25") if not isinstance(m, nn.Identity)]
    assert " ".join(codes) == SEQUENCES[name]


def test_pooling_and_strided_variants():
    variants = {"model": (0, 2), "convpool_cnn": (0, 2), "strided_cnn": (2, 0), "allcnn": (2, 0)}
    for name, (n_strided, n_pool) in ((f"{v}_{b}", n) for v, n in variants.items() for b in "abc"):
        model = build(name, "model.width=0.25")
        assert sum(map(_strided, model)) == n_strided, name
        pools = [m for m in model if isinstance(m, nn.MaxPool2d)]
        assert len(pools) == n_pool, name
        assert all(p.kernel_size == 3 and p.stride == 2 for p in pools), name
    # conv counts: base C 7, Strided-CNN-C 7 (the conv before each pool strided), ConvPool/All-CNN-C 9;
    # A has one conv per stage fewer than C, B as many (its second is 1x1)
    counts = {n: sum(isinstance(m, nn.Conv2d) for m in build(n, "model.width=0.25")) for n in NAMES}
    assert counts == {"allcnn_c": 9, "allcnn_seed": 9, "model_c": 7, "strided_cnn_c": 7, "convpool_cnn_c": 9,
                      "model_a": 5, "strided_cnn_a": 5, "convpool_cnn_a": 7, "allcnn_a": 7,
                      "model_b": 7, "strided_cnn_b": 7, "convpool_cnn_b": 9, "allcnn_b": 9}


@pytest.mark.parametrize("name", NAMES)
def test_dropout_layers_and_probabilities(name):
    model = build(name, "model.width=0.25")
    ps = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    if name == "allcnn_seed":
        assert ps == [0.5, 0.5]  # the seed has no input dropout
    else:
        assert ps == [0.2, 0.5, 0.5]
        assert isinstance(model[0], nn.Dropout) and model[0].p == 0.2  # on the input image


@pytest.mark.parametrize("name", NAMES)
def test_dropout_false_removes_every_dropout(name):
    x = torch.randn(4, 3, 32, 32)
    off = build(name, "model.width=0.125", "model.dropout=false")
    assert not any(isinstance(m, nn.Dropout) for m in off.modules())
    with torch.no_grad():
        torch.manual_seed(1)
        train_out = off.train()(x)
        eval_out = off.eval()(x)
    assert torch.equal(train_out, eval_out)
    # control: with dropout on, training-mode outputs are stochastic (so the check above can fail)
    on = build(name, "model.width=0.125")
    with torch.no_grad():
        torch.manual_seed(1)
        assert not torch.equal(on.train()(x), on.eval()(x))


def test_final_relu_option():
    model = build("allcnn_c", "model.width=0.125", "model.final_relu=true").eval()
    assert isinstance(model[-2], nn.ReLU) and isinstance(model[-1], GlobalAvgPool)
    with torch.no_grad():
        assert (model(torch.randn(8, 3, 32, 32)) >= 0).all()
    assert not isinstance(build("allcnn_c", "model.width=0.125")[-2], nn.ReLU)


def test_final_relu_scores_stay_alive_at_the_paper_lr():
    """The paper recipe (final ReLU, lr 0.05, momentum 0.9, no warmup) must not kill every class score:
    with zero score biases most of them sat at <= 0 after 60 steps here (0.2-0.3 alive on these data;
    on CIFAR-10 none from step 5 on, loss stuck at log 10), so no gradient reached the net."""
    from allconv_hpc import data as D
    from allconv_hpc.config import DataConfig
    torch.manual_seed(0)
    model = build("allcnn_c", "model.width=0.125", "model.final_relu=true")
    ds = D.load(DataConfig(name="synthetic", train_size=2048, test_size=100), 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    scores = {}
    model[-3].register_forward_hook(lambda m, i, o: scores.__setitem__("pre_relu", o))
    alive, losses = [], []
    batches = D.TrainBatches(ds.train.images, ds.train.labels, 64, 0, 1, 0, "paper", ds.mean, ds.std)
    for x, y, _ in (b for epoch in (0, 1) for b in batches.epoch(epoch)):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        alive.append((scores["pre_relu"] > 0).float().mean().item())
        losses.append(loss.item())
    assert len(alive) == 64 and alive[0] == 1.0
    assert min(alive[-10:]) > 0.6, alive
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses


@pytest.mark.parametrize("name", NAMES)
def test_initial_loss_is_about_log_num_classes(name):
    # the small class-score init: the first losses sit at log(C) instead of exploding
    model = build(name, "model.width=0.25", "model.dropout=false").eval()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(x), y).item()
    assert abs(loss - math.log(10)) < 0.25


# ----------------------------------------------------------------------------- summary


@pytest.mark.parametrize("name", NAMES)
def test_summary_lists_layers_and_total(name):
    model = build(name, "model.width=0.25")
    text = summary(model)
    assert text.splitlines()[-1].split()[-1] == f"{PARAMS[name][1]:,}"
    assert "total parameters" in text.splitlines()[-1]
    layer_rows = [ln for ln in text.splitlines() if re.match(r"^\s*\d+ ", ln)]
    assert len(layer_rows) == len(model)
    side = "8, 8" if name == "allcnn_seed" else "6, 6"
    assert f"(10, {side})" in text  # the class-score map's shape is printed
    assert model.training  # summary() leaves the mode as it found it


def test_summary_total_at_full_width():
    assert f"{1_369_738:,}" in summary(build("allcnn_c")).splitlines()[-1]


# ----------------------------------------------------------------------------- width validation


@pytest.mark.parametrize("width", ["0.001", "0.005", "0", "-0.5"])
def test_width_too_small_is_a_config_error(width):
    with pytest.raises(ConfigError) as e:
        compose(["model=allcnn_c", "data=synthetic", f"model.width={width}"])
    msg = str(e.value)
    assert "\n" not in msg
    assert f"model.width={float(width)}" in msg or f"model.width={width}" in msg


def test_smallest_valid_width_builds():
    # 96 * w must round to >= 1 channel: 0.0053 -> 1 and 2 channels
    model = build("allcnn_c", "model.width=0.0053")
    assert [m.out_channels for m in model if isinstance(m, nn.Conv2d)][:3] == [1, 1, 1]


def test_width_error_suggests_a_width_that_works():
    with pytest.raises(ConfigError) as e:
        compose(["model=allcnn_c", "data=synthetic", "model.width=0.001"])
    suggested = re.search(r"width >= ([0-9.]+)", str(e.value)).group(1)
    compose(["model=allcnn_c", "data=synthetic", f"model.width={suggested}"])  # must not raise
