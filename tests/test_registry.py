import pytest
import torch
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule

from pyroflows import transforms as T
from pyroflows.transforms.coupling import coupling_ranks


def test_required_names_are_registered():
    required = {
        "planar",
        "radial",
        "sylvester",
        "householder",
        "nice",
        "realnvp",
        "actnorm",
        "lu",
        "permute",
        "iaf",
        "maf",
        "nsf",
        "nsf_ar",
        "bnaf",
        "glow",
    }
    assert required <= set(T.available())


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown flow 'spline'.*nsf.*realnvp"):
        T.build("spline", 3)
    with pytest.raises(ValueError, match="unknown flow 'nope'"):
        T.build(["nsf", "nope"], 3)


def test_a_name_builds_num_layers_blocks_with_alternating_halves():
    flow = T.build("realnvp", 4, num_layers=3, hidden_dims=[8])
    assert isinstance(flow, ComposeTransformModule) and len(flow.parts) == 3
    assert [p.ranks.tolist() for p in flow.parts] == [[0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]]
    assert len(list(flow.parameters())) == 3 * len(list(flow.parts[0].parameters()))


def test_a_list_is_one_block_repeated():
    flow = T.build(["actnorm", "lu", "nsf"], 4, num_layers=2, hidden_dims=[8], count_bins=4)
    names = [type(p).__name__ for p in flow.parts]
    assert names == ["ActNorm", "LULinear", "MaskedAutoregressive"] * 2
    assert flow.parts[2].ranks.tolist() != flow.parts[5].ranks.tolist()  # nsf blocks alternate
    assert flow.parts[2].transformer.count_bins == 4


def test_modules_and_callables_pass_through():
    module = T.Planar(3)
    assert T.build(module, 3) is module
    built = T.build(lambda d: T.ActNorm(d), 3)
    assert isinstance(built, T.ActNorm)
    with pytest.raises(TypeError, match="not a TransformModule"):
        T.build(lambda d: torch.nn.Linear(d, d), 3)
    with pytest.raises(ValueError, match="cannot change an already-built module"):
        T.build(module, 3, hidden_dims=[4])
    with pytest.raises(ValueError, match="module or callable"):  # not silently dropped
        T.build(lambda d: T.ActNorm(d), 3, hidden_dims=[4])


def test_keywords_nobody_takes_are_an_error():
    with pytest.raises(TypeError, match=r"\['count_bin'\] are not used by nsf"):
        T.build("nsf", 3, count_bin=4)
    # shared keywords reach only the families that take them
    flow = T.build(["lu", "nsf"], 3, hidden_dims=[8], count_bins=4)
    assert isinstance(flow, TransformModule)


def test_conditional_only_where_the_family_allows():
    with pytest.raises(ValueError, match="no conditional version of \\['planar'\\]"):
        T.build("planar", 3, context_dim=2)
    flow = T.build(["actnorm", "nsf"], 3, context_dim=2, hidden_dims=[8])
    x = torch.randn(5, 3)
    assert flow.condition(torch.randn(2))(x).shape == (5, 3)


def test_register_and_duplicates():
    @T.register("double_test")
    def double(input_dim, *, layer=0, context_dim=0):
        return T.ActNorm(input_dim)

    try:
        assert "double_test" in T.available()
        with pytest.raises(ValueError, match="already registered"):
            T.register("double_test")(double)
    finally:
        T.unregister("double_test")


def test_bad_inputs():
    with pytest.raises(ValueError, match="input_dim must be a positive integer"):
        T.build("nsf", 0)
    with pytest.raises(TypeError, match="a flow spec is"):
        T.build(3, 3)
    with pytest.raises(ValueError, match="split_dim"):
        coupling_ranks(4, split_dim=4)


def test_repr_says_what_a_layer_is():
    text = repr(T.build("nsf", 4, num_layers=1, hidden_dims=[8]))
    assert "coupling" in text and "RationalQuadraticSpline(count_bins=8, bound=3.0)" in text
    assert "autoregressive" in repr(T.build("iaf", 4, num_layers=1))


def test_num_layers_below_one_is_refused_not_read_as_the_default():
    # num_layers=0 built the family's default depth (4 IAF blocks) without a word.
    from pyroflows import AutoFlowGuide

    with pytest.raises(ValueError, match="num_layers must be a positive integer, got 0"):
        T.build("iaf", 3, num_layers=0)
    with pytest.raises(ValueError, match="num_layers must be a positive integer, got 0"):
        AutoFlowGuide(lambda: None, num_layers=0)
